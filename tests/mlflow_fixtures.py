"""Fixtures for the MLflow tests: a real ``mlflow server`` on 127.0.0.1, a SQLite store, a tiny bundle, a phantom
slide. Imported by ``tests/test_mlflow.py``; the tiny bundle's configs call :func:`tiny_inference` and
:func:`tiny_evaluation` from here (the tests put this folder on ``PYTHONPATH`` for the bundle subprocesses).
"""

from __future__ import annotations

import contextlib
import csv
import json
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
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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
        try:
            server.wait(timeout=20)
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


@pytest.fixture(scope="session")
def phantom_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small phantom metastasis slide (pyramidal TIFF)."""
    from pathbundles.phantom import make_metastasis_dataset

    from pathbundles.sampling import read_datalist

    dataset = make_metastasis_dataset(tmp_path_factory.mktemp("phantom"), n=1, seed=7, size_px=(2048, 2048))
    return Path(read_datalist(dataset)[0]["image"])


# ---------------------------------------------------------------------------------------------------------------
# The tiny bundle: a 2-class linear classifier of 4x4 patches, engine-based training (MONAI SupervisedTrainer with a
# validator, as the real bundles), engine-free inference and evaluation writing the real bundles' output layout.

_BUNDLE_ROOT = {"_target_": "pathbundles.bundle.root_of_running_bundle"}

TINY_TRAIN = {
    "bundle_root": _BUNDLE_ROOT,
    "ckpt_dir": "$@bundle_root + '/models'",
    "output_dir": "$@bundle_root + '/eval/train'",
    "epochs": 2,
    "learning_rate": 0.05,
    "batch_size": 4,
    "train_datalist": [{"image": float(i % 2), "label": i % 2} for i in range(8)],
    "val_datalist": [{"image": float(i % 2), "label": i % 2} for i in range(4)],
    "network": "$torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 2))",
    "transform": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "Lambdad", "keys": "image", "func": "$lambda v: torch.full((3, 4, 4), float(v))"},
            {"_target_": "Lambdad", "keys": "label", "func": "$lambda v: torch.tensor(v)"},
        ],
    },
    "optimizer": {"_target_": "torch.optim.SGD", "params": "$@network.parameters()", "lr": "@learning_rate"},
    "train": {
        "dataset": {"_target_": "Dataset", "data": "@train_datalist", "transform": "@transform"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@train#dataset", "batch_size": "@batch_size"},
        "handlers": [
            {"_target_": "ValidationHandler", "validator": "@validate#evaluator", "epoch_level": True,
             "interval": 1},
            {"_target_": "CheckpointSaver", "save_dir": "@ckpt_dir", "save_dict": {"model": "@network"},
             "save_final": True, "final_filename": "model.pt"},
        ],
        "trainer": {"_target_": "SupervisedTrainer", "max_epochs": "@epochs", "device": "$torch.device('cpu')",
                    "train_data_loader": "@train#dataloader", "network": "@network",
                    "loss_function": "$torch.nn.CrossEntropyLoss()", "optimizer": "@optimizer",
                    "train_handlers": "@train#handlers"},
    },
    "validate": {
        "dataset": {"_target_": "Dataset", "data": "@val_datalist", "transform": "@transform"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@validate#dataset", "batch_size": "@batch_size"},
        "handlers": [],
        "evaluator": {
            "_target_": "SupervisedEvaluator", "device": "$torch.device('cpu')",
            "val_data_loader": "@validate#dataloader", "network": "@network",
            "postprocessing": {"_target_": "Compose", "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {"_target_": "Lambdad", "keys": ["pred", "label"], "func": "$lambda x: torch.as_tensor(x).flatten()[-1:].float()"},
            ]},
            "key_val_metric": {"val_auc": {"_target_": "ROCAUC",
                                           "output_transform": "$monai.handlers.from_engine(['pred', 'label'])"}},
            "val_handlers": "@validate#handlers",
        },
    },
    "run": ["$@train#trainer.run()"],
}

TINY_INFERENCE = {
    "bundle_root": _BUNDLE_ROOT,
    "output_dir": "$@bundle_root + '/eval'",
    "ckpt_path": "$@bundle_root + '/models/model.pt'",
    "data_source": None,
    "datalist": {"_target_": "pathbundles.bundle.datalist", "source": "@data_source", "kind": "metastasis",
                 "split": "test", "first": 1},
    "run": [{"_target_": "mlflow_fixtures.tiny_inference", "datalist": "@datalist", "ckpt_path": "@ckpt_path",
             "output_dir": "@output_dir"}],
}

TINY_EVALUATE = {
    "bundle_root": _BUNDLE_ROOT,
    "output_dir": "$@bundle_root + '/eval/evaluate'",
    "ckpt_path": "$@bundle_root + '/models/model.pt'",
    "datalist": [{"image": "phantom_tumor_000.tif", "label": 1}, {"image": "phantom_normal_001.tif", "label": 0}],
    "froc": 0.6,
    "slide_auc": 0.8,
    "run": [{"_target_": "mlflow_fixtures.tiny_evaluation", "output_dir": "@output_dir", "froc": "@froc",
             "slide_auc": "@slide_auc"}],
}

TINY_METADATA = {
    "version": "0.0.1",
    "changelog": {"0.0.1": "test bundle"},
    "monai_version": "1.6.1",
    "pytorch_version": "2.13.0",
    "numpy_version": "2.4.6",
    "required_packages_version": {},
    "name": "Tiny test bundle",
    "task": "tests of tracking and registry",
    "description": "a linear classifier of 4x4 patches",
    "authors": "pathbundles tests",
    "copyright": "none",
    "network_data_format": {"inputs": {}, "outputs": {}},
}


def make_tiny_bundle(root: Path) -> Path:
    """Write the tiny bundle (configs, docs; no weights yet) into ``root``."""
    configs = root / "configs"
    configs.mkdir(parents=True)
    for name, content in (("metadata", TINY_METADATA), ("train", TINY_TRAIN), ("inference", TINY_INFERENCE),
                          ("evaluate", TINY_EVALUATE)):
        (configs / f"{name}.json").write_text(json.dumps(content, indent=2) + "\n")
    (root / "docs").mkdir()
    (root / "docs" / "README.md").write_text("# Tiny test bundle\n\nA linear classifier used by the MLflow tests.\n")
    (root / "models").mkdir()
    return root


def tiny_inference(datalist: list[dict], ckpt_path: str, output_dir: str) -> dict:
    """Score each slide by the tiny network on its mean colour; write the real bundles' output layout."""
    import numpy as np
    import torch
    from PIL import Image

    from pathbundles.atomic import atomic_path
    from pathbundles.wsi import open_slide
    from pathbundles.writers import write_detections_csv

    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 2))
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    network.load_state_dict(state.get("model", state))
    out = Path(output_dir)
    scores = {}
    for item in datalist:
        name = Path(item["image"]).stem
        with open_slide(item["image"]) as slide:
            thumbnail, _ = slide.read_thumbnail(32.0)
            width, height = slide.level_dimensions[0]
        value = 1.0 - float(np.asarray(thumbnail).mean()) / 255.0
        with torch.no_grad():
            score = float(torch.softmax(network(torch.full((1, 3, 4, 4), value)), 1)[0, 1])
        write_detections_csv(out / "detections" / f"{name}.csv", [[score, width / 2, height / 2]])
        with atomic_path(out / "overlays" / f"{name}.png") as tmp:
            Image.fromarray(np.asarray(thumbnail)).save(tmp)
        scores[name] = (score, 1)
    with atomic_path(out / "slide_scores.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "score", "n_detections"])
        for name, (score, n) in scores.items():
            writer.writerow([name, f"{score:.6f}", n])
    return scores


def tiny_evaluation(output_dir: str, froc: float, slide_auc: float) -> dict:
    """Write metrics.json, curves.json, froc.png and roc.png with the given scores (shaped like real curves)."""
    import numpy as np

    from pathbundles.metrics.plots import plot_froc, plot_roc
    from pathbundles.tracking import write_curves

    out = Path(output_dir)
    fp = np.array([0.0, 0.25, 0.5, 1, 2, 4, 8])
    sensitivity = np.minimum(1.0, froc * np.array([0.0, 0.6, 0.8, 1.0, 1.1, 1.2, 1.3]))
    fpr, tpr = np.array([0.0, 0.0, 1 - slide_auc, 1.0]), np.array([0.0, slide_auc, 1.0, 1.0])
    metrics = {"froc": froc, "slide_auc": slide_auc, "details": {"n_slides": 2}}
    from pathbundles.atomic import atomic_path

    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics))
    write_curves(out, fp_per_slide=fp, sensitivity=sensitivity, fpr=fpr, tpr=tpr)
    plot_froc(fp, sensitivity, out / "froc.png")
    plot_roc(fpr, tpr, out / "roc.png", auc=slide_auc)
    return metrics


def run_bundle(config: Path, *args: str, tracking: bool = True, env: dict | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run --config_file CONFIG [--tracking mlflow/tracking.json] ARGS``; fails the test
    with the output when it fails."""
    command = [PYTHON, "-m", "monai.bundle", "run", "--config_file", str(config)]
    if tracking:
        command += ["--tracking", str(MLFLOW_TRACKING_SETTINGS)]
    run_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               **(env or {})}
    done = subprocess.run(command + list(args), capture_output=True, text=True, env=run_env, timeout=timeout)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command + list(args))} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                    f"{done.stderr[-5000:]}")
    return done


def copy_bundle(source: Path, target: Path) -> Path:
    """Copy a bundle folder (without its eval outputs)."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("eval", "__pycache__"))
    return target
