"""Fixtures for the MLflow tests: a real ``mlflow server`` on 127.0.0.1, a SQLite store, a small phantom metastasis
dataset and a copy of the real ``bundles/scannet`` bundle trained (tracked) on it. Imported by
``tests/test_mlflow.py``. Nothing is written into ``bundles/scannet``: every run works on the copy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
PYTHON = sys.executable
MLFLOW_TRACKING_SETTINGS = REPO / "mlflow" / "tracking.json"
SCANNET = REPO / "bundles" / "scannet"
#: What of bundles/scannet is copied: a bundle's content, not its outputs.
BUNDLE_CONTENT = ("configs", "docs", "models", "LICENSE")


#: Project commits seen while the tests ran (others may commit meanwhile); a run's git tag must be one of them.
COMMITS: set[str] = set()


def note_commit() -> set[str]:
    """Add the project's current commit to :data:`COMMITS`; returns them all."""
    from pathbundles.tracking import git_commit

    COMMITS.add(git_commit(REPO).removesuffix("-dirty"))
    return COMMITS


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(root: Path, startup_s: float = 90.0) -> Iterator[str]:
    """Run ``mlflow server`` (SQLite backend, artifact root under ``root``) on a free 127.0.0.1 port; yield its URL.

    The server is waited for on ``/health`` and stopped by its own PID (its process group: the server's
    workers), never by name.
    """
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    log = open(root / "server.log", "w")
    command = [PYTHON, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
               "--default-artifact-root", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    # no job-runner worker processes: they only cost CPU here
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {server.returncode}: "
                                   f"{(root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not healthy after {startup_s} s: "
                                   f"{(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:  # uvicorn waits for the clients' keep-alive connections; do not wait long for it
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=20)
        log.close()


@pytest.fixture(scope="module")
def mlflow_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a real MLflow tracking server for the module's tests."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


@pytest.fixture(scope="module")
def sqlite_tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh SQLite tracking store (no server)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow-sqlite') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def scannet_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``dataset.json`` of a small phantom metastasis dataset: a tumour slide and a normal slide, 3072 px square."""
    from pathbundles.phantom import make_phantom

    return make_phantom(tmp_path_factory.mktemp("phantom"), kind="metastasis", n=2, seed=7, size_px=(3072, 3072))


@pytest.fixture(scope="module")
def tumour_slide(scannet_dataset: Path) -> Path:
    """The dataset's tumour slide, alone in a folder (``--data_source FOLDER`` runs just it)."""
    from pathbundles.sampling import read_datalist

    slide = Path(next(i["image"] for i in read_datalist(scannet_dataset) if i["label"] == 1))
    folder = scannet_dataset.parent / "one-slide"
    folder.mkdir(exist_ok=True)
    (folder / slide.name).symlink_to(slide)
    return folder / slide.name


def copy_bundle(source: Path, target: Path) -> Path:
    """Copy a bundle's content (configs, docs, models, LICENSE; not eval/ or caches) to ``target``."""
    target.mkdir(parents=True)
    for name in BUNDLE_CONTENT:
        path = source / name
        if path.is_dir():
            shutil.copytree(path, target / name, ignore=shutil.ignore_patterns("__pycache__", ".*"))
        elif path.is_file():
            shutil.copy2(path, target / name)
    return target


@pytest.fixture(scope="module")
def trained_scannet(tmp_path_factory: pytest.TempPathFactory, scannet_dataset: Path,
                    mlflow_server_url: str) -> dict:
    """A copy of ``bundles/scannet`` (folder name ``scannet``, so its experiment and model are
    ``pathbundles-scannet``) trained on the phantom dataset by a tiny tracked run logged to the server.

    Returns ``{"bundle", "dataset", "tracking_uri", "train_args"}``.
    """
    bundle = copy_bundle(SCANNET, tmp_path_factory.mktemp("bundles") / "scannet")
    train_args = ["--train_source", str(scannet_dataset), "--val_source", str(scannet_dataset), "--epochs", "1",
                  "--samples_per_epoch", "8", "--val_samples", "8", "--batch_size", "4", "--num_workers", "0",
                  "--hnm_rounds", "0", "--ckpt_dir", str(bundle / "models")]
    note_commit()
    run_bundle(bundle / "configs" / "train.json", *train_args, tracking_uri=mlflow_server_url)
    return {"bundle": bundle, "dataset": scannet_dataset, "tracking_uri": mlflow_server_url,
            "train_args": train_args}


def evaluate_config(bundle: Path) -> str:
    """``--config_file`` value of a bundle's evaluation (``evaluate.json`` merged over ``inference.json``)."""
    return str([str(bundle / "configs" / "inference.json"), str(bundle / "configs" / "evaluate.json")])


def run_bundle(config: Path | str, *args: str, tracking: bool = True, tracking_uri: str | None = None,
               env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run --config_file CONFIG [--tracking mlflow/tracking.json --tracking_uri URI]
    ARGS``; fails the test with the output when it fails."""
    command = [PYTHON, "-m", "monai.bundle", "run", "--config_file", str(config)]
    if tracking:
        command += ["--tracking", str(MLFLOW_TRACKING_SETTINGS)]
        if tracking_uri:
            command += ["--tracking_uri", tracking_uri]
    run_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    run_env.update(env or {})
    done = subprocess.run(command + list(args), capture_output=True, text=True, env=run_env, timeout=timeout)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command + list(args))} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                    f"{done.stderr[-5000:]}")
    return done
