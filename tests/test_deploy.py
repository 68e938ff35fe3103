"""MONAI Deploy applications of the bundles (``python -m pathbundles deploy build``, ``pathbundles.deploy``).

The fast tests check the build context and the application's inputs, settings and summary without the SDK. The slow
ones build each existing bundle, run the built application (``python DIR -i INPUT -o OUTPUT``, Holoscan on CPU) and
``python -m monai.bundle run`` on the same two tiny phantom inputs with the same overrides, and compare every output
file; and build one application from the MLflow registry (a temporary SQLite store) and run it with the
``HOLOSCAN_INPUT_PATH``/``HOLOSCAN_OUTPUT_PATH`` variables a MAP sets. Those skip when the SDK is not installed.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dicom_helpers import assert_dicom_results_equal_file_outputs
from orthanc_fixtures import orthanc_url  # noqa: F401 - the fixture

from mlflow_fixtures import free_port
from pathbundles.deploy.build import BUNDLE_EXCLUDED, build, input_kind, parse_model_uri, resources
from pathbundles.deploy.runtime import (DeployError, load_settings, parse_value, slide_list, split_override_args,
                                        summarize)
from pathbundles.dicomweb import DicomWebError
from pathbundles.errors import InputError
from pathbundles.weights import DEMO_WARNING

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
STACK_BYTES = 32 * 1024 * 1024  # what Holoscan asks for (docs/DEPLOY.md: ulimit -s 32768)


def _sdk_missing() -> str | None:
    try:
        import holoscan  # noqa: F401
        import monai.deploy.core  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means the applications cannot run here
        return f"MONAI Deploy App SDK (monai-deploy-app-sdk, holoscan) not importable: {err}; pip install '.[deploy]'"
    return None


needs_sdk = pytest.mark.skipif(_sdk_missing() is not None, reason=str(_sdk_missing()))


def existing_bundle(name: str) -> Path:
    bundle = BUNDLES / name
    if not (bundle / "configs" / "inference.json").is_file():
        pytest.skip(f"bundle {name} does not exist (yet) at {bundle}")
    return bundle


# ------------------------------------------------------------------------------------------------ build context

def test_build_writes_a_complete_build_context(tmp_path: Path) -> None:
    import yaml

    out = tmp_path / "app"
    result = build(out, bundle=BUNDLES / "scannet")
    # The shipped weights are demo weights: the one warning of the build, recorded in build.json.
    assert result["out"] == str(out) and result["kind"] == "metastasis" and result["warnings"] == [DEMO_WARNING]
    assert {p.name for p in out.iterdir()} == {"__main__.py", "app.py", "app.yaml", "requirements.txt", "build.json",
                                               "README.md", "bundle", "pathbundles"}
    # The bundle's content, not its outputs; the pathbundles source the application runs, without caches.
    assert sorted(p.name for p in (out / "bundle").iterdir()) == ["LICENSE", "configs", "docs", "models"]
    assert (out / "bundle" / "models" / "model.pt").read_bytes() == (BUNDLES / "scannet/models/model.pt").read_bytes()
    assert (out / "pathbundles" / "deploy" / "app.py").is_file() and not list(out.rglob("__pycache__"))
    app_yaml = yaml.safe_load((out / "app.yaml").read_text())
    assert app_yaml["application"]["version"] == json.loads((BUNDLES / "scannet/configs/metadata.json").read_text())[
        "version"]
    assert app_yaml["resources"] == {"cpu": 2, "gpu": 0, "memory": "3Gi"}  # 2 x 1136 MiB measured, whole GiB
    assert app_yaml["pathbundles"] == {"bundle": "bundle", "kind": "metastasis", "config_files": ["inference.json"],
                                       "overrides": {}}
    requirements = [r for r in (out / "requirements.txt").read_text().splitlines() if r and not r.startswith("#")]
    pins = dict(r.split("==") for r in requirements)
    assert "+" not in pins["torch"]  # the public version (2.13.0, not 2.13.0+cpu): a GPU image gets CUDA torch
    assert {"monai", "pytorch-ignite", "openslide-python", "numpy"} <= set(pins) and "holoscan-cli" not in pins
    record = json.loads((out / "build.json").read_text())
    assert record["source"] == {"bundle": str(BUNDLES / "scannet")} and record["bundle"] == result["bundle"]
    demo_sha = json.loads((BUNDLES / "scannet/configs/metadata.json").read_text())["trained_with"]["models/model.pt"][
        "sha256"]
    assert (record["bundle"]["weights_sha256"], record["bundle"]["demo_weights"]) == (demo_sha, True)
    assert record["bundle"]["weights_warning"] == DEMO_WARNING
    readme = (out / "README.md").read_text()
    version = json.loads((BUNDLES / "scannet" / "configs" / "metadata.json").read_text())["version"]
    # The image tag names the weights: retrained weights under the same bundle version get another tag.
    assert (f"monai-deploy package {out} --config {out / 'app.yaml'} --tag pathbundles-scannet:{version}-"
            f"{demo_sha[:12]} --platform x86_64 -l DEBUG") in readme
    assert result["package_command"].split("--tag ")[1].split()[0] == f"pathbundles-scannet:{version}-{demo_sha[:12]}"
    assert f"**{DEMO_WARNING}**" in readme
    assert "ulimit -s 32768" in readme and f"python {out} -i INPUT -o OUTPUT" in readme
    assert "from app import main" in (out / "__main__.py").read_text()


def test_build_refuses_a_used_target_and_ambiguous_sources(tmp_path: Path) -> None:
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("x")
    with pytest.raises(DeployError, match="not an empty folder"):
        build(tmp_path / "used", bundle=BUNDLES / "scannet")
    with pytest.raises(DeployError, match="exactly one of"):
        build(tmp_path / "a", bundle=BUNDLES / "scannet", model="models:/pathbundles-scannet@champion")
    with pytest.raises(DeployError, match="not a bundle"):
        build(tmp_path / "b", bundle=tmp_path / "used")
    assert not (tmp_path / "b").exists() and [p.name for p in tmp_path.iterdir()] == ["used"]  # nothing half-built


def test_build_of_a_bundle_without_weights_warns(tmp_path: Path) -> None:
    import shutil

    bundle = tmp_path / "segmitos"
    shutil.copytree(BUNDLES / "segmitos", bundle, ignore=shutil.ignore_patterns("eval", "*.pt"))
    result = build(tmp_path / "app", bundle=bundle)
    assert result["kind"] == "mitosis" and result["bundle"]["weights_sha256"] is None
    assert result["bundle"]["demo_weights"] is False and result["package_command"].split("--tag ")[1].startswith(
        "pathbundles-segmitos:") and "-noweights " in result["package_command"]
    assert any("--override ckpt_path=" in w for w in result["warnings"])
    assert "--override ckpt_path=" in (tmp_path / "app" / "README.md").read_text()


@pytest.mark.parametrize("name, kind", [("scannet", "metastasis"), ("spatial_lstm", "metastasis"),
                                        ("segmitos", "mitosis"), ("dmmn", "multiclass")])
def test_input_kind_is_read_from_the_bundle_s_datalist(name: str, kind: str) -> None:
    assert input_kind(existing_bundle(name)) == kind


def test_resources_and_model_uris() -> None:
    assert resources("segmitos")["memory"] == "4Gi" and resources("spatial_lstm")["memory"] == "2Gi"
    assert resources("dmmn") == {"cpu": 2, "gpu": 0, "memory": "3Gi"}  # 2 x 1160 MiB, rounded up
    assert resources("scannet", gpu=1, memory="16Gi") == {"cpu": 2, "gpu": 1, "memory": "16Gi", "gpuMemory": "8Gi"}
    with pytest.raises(DeployError, match="--gpu 2"):
        resources("scannet", gpu=2)
    assert parse_model_uri("models:/pathbundles-scannet@champion") == ("pathbundles-scannet", "champion", None)
    assert parse_model_uri("models:/pathbundles-scannet/3") == ("pathbundles-scannet", None, "3")
    with pytest.raises(DeployError, match="expected models:/<name>@<alias>"):
        parse_model_uri("runs:/abc/bundle")


def test_bundle_content_is_what_the_registry_registers() -> None:
    from pathbundles import registry

    assert BUNDLE_EXCLUDED == registry._EXCLUDED


# ------------------------------------------------------------------------------------------------ runtime pieces

def test_slide_list_reads_folders_datalists_slides_and_manifests(tmp_path: Path) -> None:
    for name in ("b.tif", "a.svs", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    folder = slide_list(tmp_path, "metastasis")
    assert folder == [{"image": str(tmp_path / "a.svs")}, {"image": str(tmp_path / "b.tif")}]
    assert slide_list(tmp_path / "b.tif", "metastasis") == [{"image": str(tmp_path / "b.tif")}]
    (tmp_path / "sub" / "list.txt").write_text("# slides\n../b.tif\n\n../a.svs\n")
    assert slide_list(tmp_path / "sub" / "list.txt", "metastasis") == [{"image": str(tmp_path / "b.tif")},
                                                                       {"image": str(tmp_path / "a.svs")}]
    (tmp_path / "sub" / "bad.txt").write_text("../b.tif\n../gone.tif\n")
    with pytest.raises(InputError, match=r"bad.txt, line 2: .*gone.tif: no such file"):
        slide_list(tmp_path / "sub" / "bad.txt", "metastasis")
    (tmp_path / "data.json").write_text(json.dumps({"items": [{"image": "b.tif", "label": 1}]}))
    assert slide_list(tmp_path / "data.json", "metastasis") == [{"image": str(tmp_path / "b.tif"), "label": 1}]
    (tmp_path / "hpf").mkdir()
    (tmp_path / "hpf" / "x.png").write_bytes(b"x")
    assert slide_list(tmp_path / "hpf", "mitosis") == [{"image": str(tmp_path / "hpf" / "x.png")}]
    with pytest.raises(InputError, match="no slide files"):
        slide_list(tmp_path / "hpf", "metastasis")
    with pytest.raises(InputError, match="no such file or folder"):
        slide_list(tmp_path / "missing", "metastasis")


def test_overrides_come_from_app_yaml_then_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert [parse_value(v) for v in ("8", "0.5", "False", "true", "null", "[1, 2]", "{'a': 1}", "/x/m.pt")] == \
        [8, 0.5, False, True, None, [1, 2], {"a": 1}, "/x/m.pt"]
    overrides, rest = split_override_args(["app", "-i", "in", "--override", "lp=8", "--override=tta=False", "-o",
                                           "out", "--override", "ckpt_path=/m/a=b.pt"])
    assert overrides == {"lp": 8, "tta": False, "ckpt_path": "/m/a=b.pt"} and rest == ["app", "-i", "in", "-o", "out"]
    with pytest.raises(DeployError, match="expected KEY=VALUE"):
        split_override_args(["app", "--override", "lp"])

    out = tmp_path / "app"
    build(out, bundle=BUNDLES / "scannet")
    monkeypatch.delenv("HOLOSCAN_CONFIG_PATH", raising=False)
    settings = load_settings(out, {"lp": 8})
    assert settings.bundle == out / "bundle" and settings.kind == "metastasis" and settings.overrides == {"lp": 8}
    assert settings.build["bundle_id"] == "scannet"
    # A run-time config (monai-deploy run --config) replaces app.yaml; the command line still wins.
    config = tmp_path / "site.yaml"
    config.write_text((out / "app.yaml").read_text().replace("overrides: {}", "overrides: {lp: 12, alpha: 1}"))
    monkeypatch.setenv("HOLOSCAN_CONFIG_PATH", str(config))
    assert load_settings(out, {"lp": 8}).overrides == {"lp": 8, "alpha": 1}
    config.write_text("application: {title: x}\n")
    with pytest.raises(DeployError, match="no 'pathbundles' section"):
        load_settings(out)


def test_summary_names_outputs_relative_to_the_output_folder(tmp_path: Path) -> None:
    record = {"name": "s1", "score": 0.9, "n_detections": 2, "areas_mm2": {"carcinoma": 1.0},
              "outputs": {"map": str(tmp_path / "maps" / "s1.tif")}}
    info = {"name": "B", "version": "0.1.0", "weights_sha256": "ab", "demo_weights": True,
            "weights_warning": DEMO_WARNING, "config_sha256": "cd"}
    summary = summarize([record], info, tmp_path, datalist=[{"image": "/data/s1.svs"}])
    assert summary["slides"] == [{"slide": "s1", "image": "/data/s1.svs", "score": 0.9, "n_detections": 2,
                                  "areas_mm2": {"carcinoma": 1.0}, "outputs": {"map": "maps/s1.tif"}}]
    assert summary["bundle"]["weights_sha256"] == "ab" and summary["n_slides"] == 1
    assert (summary["bundle"]["demo_weights"], summary["bundle"]["weights_warning"]) == (True, DEMO_WARNING)
    assert summary["n_failed"] == 0

    # A slide that failed is listed after the others, with why and no outputs.
    summary = summarize([record], info, tmp_path, datalist=[{"image": "/data/s1.svs"}, {"image": "/data/bad.svs"}],
                        failed={"bad": "/data/bad.svs: truncated"})
    assert summary["slides"][1] == {"slide": "bad", "image": "/data/bad.svs", "failed": "/data/bad.svs: truncated"}
    assert summary["n_slides"] == 2 and summary["n_failed"] == 1


# ---------------------------------------------------------------------------------- built applications end to end

def _raise_stack_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    wanted = STACK_BYTES if hard == resource.RLIM_INFINITY else min(STACK_BYTES, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_STACK, (wanted, hard))


def _run(command: list[str], cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``command`` with one OpenMP thread (tiny networks gain nothing from a second busy core) and the stack
    Holoscan asks for; fails the test with the output when it fails."""
    environ = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(command, check=False, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=environ, preexec_fn=_raise_stack_limit)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return done


def _files(folder: Path) -> set[str]:
    """Every output file but the bundle run's report.html (a view of the others; the application writes none)."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != "report.html"}


def assert_same_outputs(app_out: Path, bundle_out: Path) -> None:
    """Every file the bundle run wrote, the application wrote too (and only ``summary.json`` besides), with equal
    contents: CSV text, JSON/GeoJSON documents (output folder paths aside), TIFF pixels of every page, PNG pixels."""
    import tifffile
    from PIL import Image

    expected = _files(bundle_out)
    assert expected and _files(app_out) == expected | {"summary.json"}
    for relative in sorted(expected):
        a, b = app_out / relative, bundle_out / relative
        suffix = a.suffix.lower()
        if suffix in (".json", ".geojson"):
            assert json.loads(a.read_text().replace(str(app_out), "<out>")) == \
                json.loads(b.read_text().replace(str(bundle_out), "<out>")), relative
        elif suffix == ".csv":
            assert a.read_text() == b.read_text(), relative
        elif suffix in (".tif", ".tiff"):
            with tifffile.TiffFile(a) as ta, tifffile.TiffFile(b) as tb:
                assert len(ta.pages) == len(tb.pages), relative
                for pa, pb in zip(ta.pages, tb.pages):
                    np.testing.assert_array_equal(pa.asarray(), pb.asarray(), err_msg=relative)
        elif suffix == ".png":
            with Image.open(a) as ia, Image.open(b) as ib:
                np.testing.assert_array_equal(np.asarray(ia), np.asarray(ib), err_msg=relative)
        else:
            assert a.read_bytes() == b.read_bytes(), relative


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two small phantom inputs per kind, each alone in a folder: 2048 px slides (one tumour, one normal), 400 px
    HPFs, 1024 px multi-class slides."""
    from pathbundles.phantom import make_multiclass_dataset, make_phantom

    root = tmp_path_factory.mktemp("deploy-data")
    make_phantom(root / "metastasis", kind="metastasis", n=2, seed=7, size_px=(2048, 2048))
    make_phantom(root / "mitosis", kind="mitosis", n=2, seed=3, size_px=400)
    make_multiclass_dataset(root / "multiclass", n=2, seed=7, size_px=1024)
    return {"metastasis": root / "metastasis", "mitosis": root / "mitosis" / "images",
            "multiclass": root / "multiclass"}


def _tiny_checkpoint(name: str, folder: Path) -> Path | None:
    """A small random checkpoint for the bundles whose tests run a narrow network (None: the shipped weights)."""
    import torch

    torch.manual_seed(0)
    if name == "spatial_lstm":
        from pathbundles.spatial_lstm import SpatialLSTMNet

        net = SpatialLSTMNet(widen_factor=0.0625, hidden_size=16, feature_norm=True)
    elif name == "dmmn":
        from pathbundles.dmmn import DMMN

        net = DMMN("M3", num_classes=6, width=0.03125, batch_norm=True)
    else:
        return None
    torch.save(net.state_dict(), folder / "tiny.pt")
    return folder / "tiny.pt"


#: (input kind, overrides as command-line strings) per bundle: the small settings of tests/test_<bundle>_bundle.py.
CASES = {
    "scannet": ("metastasis", {"lp": "8", "num_workers": "0"}),
    "spatial_lstm": ("metastasis", {"widen_factor": "0.0625", "hidden_size": "16", "tile_px": "8", "tta": "False",
                                    "num_workers": "0"}),
    "segmitos": ("mitosis", {"num_workers": "0"}),
    "dmmn": ("multiclass", {"width": "0.03125", "num_workers": "0", "batch_size": "4"}),
}


@pytest.mark.slow
@needs_sdk
@pytest.mark.parametrize("name", sorted(CASES))
def test_built_application_writes_what_the_bundle_writes(name: str, tiny_inputs: dict, tmp_path: Path) -> None:
    bundle = existing_bundle(name)
    kind, overrides = CASES[name]
    ckpt = _tiny_checkpoint(name, tmp_path)
    if ckpt is not None:
        overrides = {**overrides, "ckpt_path": str(ckpt)}
    app = tmp_path / "app"
    build(app, bundle=bundle)  # the command line is tested with the registry build below
    source = tiny_inputs[kind]
    app_out, bundle_out = tmp_path / "app-out", tmp_path / "bundle-out"
    done = _run([sys.executable, str(app), "-i", str(source), "-o", str(app_out),
                 *[f"--override={k}={v}" for k, v in overrides.items()]], cwd=tmp_path)
    assert "below the recommended minimum" not in done.stderr or \
        resource.getrlimit(resource.RLIMIT_STACK)[1] < STACK_BYTES  # the documented ulimit silences Holoscan
    assert "waiting for execution" not in done.stdout + done.stderr  # the scheduler ends a good run quietly
    _run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
          "--data_source", str(source), "--output_dir", str(bundle_out),
          *[a for k, v in overrides.items() for a in (f"--{k}", v)]], cwd=tmp_path)
    assert_same_outputs(app_out, bundle_out)

    summary = json.loads((app_out / "summary.json").read_text())
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert summary["bundle"]["name"] == metadata["name"] and summary["bundle"]["version"] == metadata["version"]
    # scannet and segmitos run their shipped demo weights here, spatial_lstm and dmmn a random tiny checkpoint.
    demo = ckpt is None
    assert (summary["bundle"]["demo_weights"], summary["bundle"]["weights_warning"]) == (
        demo, DEMO_WARNING if demo else None)
    assert (f"{DEMO_WARNING} (end of the run" in done.stdout + done.stderr) is demo
    assert summary["pathbundles"]["path"] == str(app / "pathbundles")  # the code built into the application ran
    assert summary["bundle"]["overrides"] == {k: parse_value(v) for k, v in overrides.items()}
    assert sorted(s["image"] for s in summary["slides"]) == sorted(i["image"] for i in slide_list(source, kind))
    for slide in summary["slides"]:
        assert slide["outputs"] and all((app_out / p).is_file() for p in slide["outputs"].values())
        assert 0.0 <= slide["score"] <= 1.0 and slide["n_detections"] >= 0
    if (bundle_out / "slide_scores.csv").exists():  # the slide-level bundles' own table agrees with the summary
        with open(bundle_out / "slide_scores.csv", newline="") as f:
            rows = {r["name"]: r for r in csv.DictReader(f)}
        for slide in summary["slides"]:
            assert float(rows[slide["slide"]]["score"]) == pytest.approx(slide["score"], abs=1e-6)
            assert int(rows[slide["slide"]]["n_detections"]) == slide["n_detections"]


@pytest.mark.slow
@needs_sdk
def test_one_unreadable_slide_leaves_a_summary_of_all(tiny_inputs: dict, tmp_path: Path) -> None:
    """The good slides are written and summarised, the bad one is in summary.json with why, the run exits 2 with a
    last line naming it."""
    import shutil

    source = tmp_path / "slides"
    shutil.copytree(tiny_inputs["metastasis"], source)
    good = sorted(p.name for p in source.glob("*.tif"))
    whole = (source / good[0]).read_bytes()
    (source / "zz_cut.tif").write_bytes(whole[: len(whole) // 3])
    app, out = tmp_path / "app", tmp_path / "out"
    build(app, bundle=existing_bundle("scannet"))
    environ = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(app), "-i", str(source), "-o", str(out), "--override=lp=8",
                           "--override=num_workers=0"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=environ, preexec_fn=_raise_stack_limit)
    assert done.returncode == 2, done.stderr[-5000:]
    assert "waiting for execution" not in done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 slide(s) failed, the others were written: zz_cut: ") and "zz_cut.tif" in last
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_slides"] == len(good) + 1 and summary["n_failed"] == 1
    written = [s for s in summary["slides"] if "failed" not in s]
    assert sorted(Path(s["image"]).name for s in written) == good
    assert all((out / p).is_file() for s in written for p in s["outputs"].values())
    assert summary["slides"][-1]["slide"] == "zz_cut" and "zz_cut.tif" in summary["slides"][-1]["failed"]


def _evaluation_run(uri: str, bundle: Path, **metrics: float) -> str:
    """A finished ``evaluate`` run of the bundle's weights with ``metrics``, as a tracked evaluate.json leaves it."""
    import mlflow

    from pathbundles import tracking

    client = mlflow.MlflowClient(uri, registry_uri=uri)
    experiment = client.create_experiment(f"pathbundles-{bundle.name}",
                                          artifact_location=tracking.default_artifact_location(uri))
    run_id = client.create_run(experiment, tags={tracking.TAG_WORKFLOW: "evaluate", tracking.TAG_WEIGHTS_SHA:
                                                 tracking.sha256_file(bundle / "models" / "model.pt")}).info.run_id
    for name, value in metrics.items():
        client.log_metric(run_id, name, value)
    client.set_terminated(run_id)
    return run_id


@pytest.mark.slow
@needs_sdk
def test_application_built_from_the_registry_runs_in_map_mode(tiny_inputs: dict, tmp_path: Path) -> None:
    import shutil

    from pathbundles import registry

    bundle = tmp_path / "bundles" / "scannet"
    shutil.copytree(BUNDLES / "scannet", bundle, ignore=shutil.ignore_patterns(*BUNDLE_EXCLUDED))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _evaluation_run(uri, bundle, froc=0.9)  # promotion needs one; its metrics pass the bundle's default gate
    registered = registry.register(bundle, tracking_uri=uri)
    registry.promote(registered["name"], registered["version"], who="tester", why="deploy test", tracking_uri=uri)

    app = tmp_path / "app"
    done = _run([sys.executable, "-m", "pathbundles", "deploy", "build", "--model",
                 "models:/pathbundles-scannet@champion", "--tracking_uri", uri, "--out", str(app)], cwd=tmp_path)
    result = json.loads(done.stdout[done.stdout.index('{\n  "out"'):])
    assert result["source"] == {"model_uri": "models:/pathbundles-scannet@champion",
                                "registered_name": "pathbundles-scannet", "registered_version": "1"}
    assert result["bundle"]["weights_sha256"] == registered["weights_sha256"]
    for relative in ("configs/inference.json", "configs/metadata.json", "models/model.pt", "LICENSE"):
        assert (app / "bundle" / relative).read_bytes() == (bundle / relative).read_bytes()

    # As inside a MAP: input and output from the environment, the settings from $HOLOSCAN_CONFIG_PATH; the input is
    # a manifest naming one slide.
    tumour = tiny_inputs["metastasis"] / "phantom_tumor_000.tif"
    (tmp_path / "input").mkdir()
    manifest = tmp_path / "input" / "slides.txt"
    manifest.write_text(f"# one slide\n{os.path.relpath(tumour, manifest.parent)}\n")
    config = tmp_path / "site.yaml"
    config.write_text((app / "app.yaml").read_text().replace("overrides: {}", "overrides: {lp: 8, num_workers: 0}"))
    out = tmp_path / "output"
    _run([sys.executable, str(app)], cwd=tmp_path, env={"HOLOSCAN_INPUT_PATH": str(manifest),
                                                        "HOLOSCAN_OUTPUT_PATH": str(out),
                                                        "HOLOSCAN_CONFIG_PATH": str(config)})
    summary = json.loads((out / "summary.json").read_text())
    assert [s["slide"] for s in summary["slides"]] == ["phantom_tumor_000"]
    assert summary["bundle"]["overrides"] == {"lp": 8, "num_workers": 0}
    assert summary["bundle"]["weights_sha256"] == registered["weights_sha256"]
    assert summary["application"]["source"]["registered_version"] == "1"
    assert summary["slides"][0]["score"] > 0.5 and summary["slides"][0]["n_detections"] >= 1  # the demo weights
    assert (out / summary["slides"][0]["outputs"]["map"]).is_file()


# ------------------------------------------------------------------------------------- DICOM in, DICOM out

def test_app_yaml_dicom_section_and_stow_url_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    from pathbundles.deploy.runtime import split_dicom_args

    out = tmp_path / "app"
    build(out, bundle=BUNDLES / "scannet")
    text = (out / "app.yaml").read_text()
    assert yaml.safe_load(text)["dicom"] == {"stow_url": ""}
    assert "# DICOM results of the slides read from DICOM" in text and "--stow_url URL" in text
    assert "DICOM in, DICOM out" in (out / "README.md").read_text()
    monkeypatch.delenv("HOLOSCAN_CONFIG_PATH", raising=False)
    assert load_settings(out).stow_url is None  # empty: results stay in the output folder

    config = tmp_path / "site.yaml"
    monkeypatch.setenv("HOLOSCAN_CONFIG_PATH", str(config))
    config.write_text(text.replace("stow_url: ''", "stow_url: http://pacs.example.org:8042/dicom-web/"))
    assert load_settings(out).stow_url == "http://pacs.example.org:8042/dicom-web"
    assert load_settings(out, stow_url="http://127.0.0.1:9/dicom-web").stow_url == "http://127.0.0.1:9/dicom-web"
    assert load_settings(out, stow_url="").stow_url is None  # --stow_url "" turns it off for the run
    config.write_text(text.replace("stow_url: ''", "stow_url: https://bob:pw@pacs/dicom-web"))
    with pytest.raises(DeployError, match=r"site.yaml: dicom.stow_url: https://\*\*\*@pacs/dicom-web: credentials"):
        load_settings(out)
    config.write_text(text.replace("stow_url: ''", "stow_url: ''\n  stow_ur: x"))
    with pytest.raises(DeployError, match="'dicom' must be a mapping with at most 'stow_url'"):
        load_settings(out)

    series = "http://127.0.0.1:8042/dicom-web/studies/1.2.3/series/1.2.4"
    assert split_dicom_args(["app", "-i", series, "--stow_url", "http://127.0.0.1:8042/dicom-web/", "-o", "out",
                             "-l", "DEBUG"]) == ("http://127.0.0.1:8042/dicom-web", series,
                                                 ["app", "-o", "out", "-l", "DEBUG"])
    # A path input is the SDK's, as before; no --stow_url leaves app.yaml's.
    assert split_dicom_args(["app", "-i", "in", "-o", "out"]) == (None, None, ["app", "--input", "in", "-o", "out"])
    assert split_dicom_args(["app", "--stow_url="]) == ("", None, ["app"])
    with pytest.raises(DicomWebError, match="credentials"):
        split_dicom_args(["app", "-i", "https://u:p@h/dicom-web/studies/1/series/2"])
    with pytest.raises(DicomWebError, match="credentials"):  # as HOLOSCAN_INPUT_PATH, past split_dicom_args
        slide_list("https://u:p@h/dicom-web/studies/1/series/2", "metastasis")


def test_dicom_inputs_are_told_apart_and_unreadable_ones_fail_alone(tmp_path: Path) -> None:
    from pathbundles.deploy.runtime import export_dicom_results, is_dicom_input

    (tmp_path / "series").mkdir()
    assert is_dicom_input("https://h/dicom-web/studies/1.2/series/1.3") and is_dicom_input(tmp_path / "series")
    assert is_dicom_input(tmp_path / "x.DCM") and not is_dicom_input(tmp_path / "x.svs")
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not a DICOM file")
    records = [{"name": "plain", "score": 0.1, "n_detections": 0, "outputs": {}},
               {"name": "broken", "score": 0.2, "n_detections": 0, "outputs": {}}]
    results = export_dicom_results(records, [{"image": str(tmp_path / "plain.tif")},
                                              {"image": str(broken), "name": "broken"}],
                                   tmp_path / "out", {"name": "B"})
    assert list(results) == ["broken"]  # a TIFF slide gets no DICOM results; the broken one fails by itself
    assert results["broken"]["failed"].startswith("DICOM export: ")


def _result_instance(path: Path, study_uid: str) -> str:
    """A small DICOM file in ``study_uid`` (a stand-in for a result object of the slide); returns its SOP UID."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality, ds.PatientID = study_uid, generate_uid(), "OT", "P1"
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return ds.SOPInstanceUID


def test_dicom_results_are_stored_and_failures_reported(orthanc_url: str, tmp_path: Path) -> None:  # noqa: F811
    from pydicom.uid import generate_uid

    from pathbundles.deploy.runtime import AppSettings, store_dicom_results
    from pathbundles.dicomweb import find_series

    out = tmp_path / "out"
    study = generate_uid()
    files = [out / "dicom" / "s1" / "ann.dcm", out / "dicom" / "s1" / "sr.dcm"]
    uids = [_result_instance(f, study) for f in files]
    exported = {"s1": {"files": [str(f) for f in files]}, "s2": {"failed": "DICOM export: SlideError: x"}}
    stored = store_dicom_results(exported, orthanc_url)
    assert stored["s1"]["stored"] == uids and stored["s2"] == exported["s2"]
    assert len(find_series(orthanc_url, study=study, modality="OT")) == 2

    settings = AppSettings(bundle=tmp_path, kind="metastasis", config_files=["inference.json"], stow_url=orthanc_url)
    records = [{"name": n, "score": 0.5, "n_detections": 1, "outputs": {}} for n in ("s1", "s2", "s3")]
    summary = summarize(records, {"name": "B"}, out, settings=settings, dicom=stored)
    by_name = {s["slide"]: s for s in summary["slides"]}
    assert by_name["s1"]["dicom"] == {"files": ["dicom/s1/ann.dcm", "dicom/s1/sr.dcm"], "stored": uids,
                                      "stow_url": orthanc_url}
    assert by_name["s2"]["dicom"] == {"files": [], "failed": "DICOM export: SlideError: x"}
    assert "dicom" not in by_name["s3"] and summary["n_dicom_failed"] == 1

    # A server that is down: the failure names the URL, per slide, never dropped.
    down = f"http://127.0.0.1:{free_port()}/dicom-web"
    failed = store_dicom_results({"s1": exported["s1"]}, down)
    assert failed["s1"]["failed"].startswith(f"STOW-RS: {down}: STOW-RS (store instances) failed: cannot connect")
    assert failed["s1"]["files"] == exported["s1"]["files"]


def test_slide_list_hands_dicomweb_urls_to_the_datalist(orthanc_url: str, tmp_path: Path,  # noqa: F811
                                                        shared_data: Path) -> None:
    """A series URL and a text file of them list the series (pathbundles.dicom_wsi reads them)."""
    from pathbundles.dicomweb import store_instances

    instance = shared_data / "dicom_camelyon_thumbnails" / "multi_frame_jpeg2000_camelyon_challenge_image.dcm"
    (stored,) = store_instances(orthanc_url, [instance])["stored"]
    url = f"{orthanc_url}/studies/{stored['study_instance_uid']}/series/{stored['series_instance_uid']}"
    (item,) = slide_list(url, "metastasis")
    assert item["image"] == url and item["name"]
    manifest = tmp_path / "series.txt"
    manifest.write_text(f"# one series\n{url}\n")
    assert slide_list(manifest, "metastasis") == [item]


@pytest.mark.slow
@needs_sdk
def test_dicom_in_dicom_out_through_orthanc(orthanc_url: str, tiny_inputs: dict,  # noqa: F811
                                            tmp_path: Path) -> None:
    """A dicomized phantom stored in Orthanc goes through the scannet application by its DICOMweb series URL; its
    DICOM results come back into Orthanc in the slide's study (found by QIDO-RS, retrieved by WADO-RS), and the
    slide's score and detections are those of the same application on the TIFF. A server that is down fails the run
    and is named in summary.json, the results staying in the output folder."""
    from orthanc_fixtures import dicomize
    from pathbundles.dicomweb import fetch_series, find_series, series_url, store_instances

    tumour = tiny_inputs["metastasis"] / "phantom_tumor_000.tif"
    (first, *_) = store_instances(orthanc_url, dicomize(tumour, tmp_path / "dicomized"))["stored"]
    study = first["study_instance_uid"]
    url = series_url(orthanc_url, study, first["series_instance_uid"])
    app = tmp_path / "app"
    build(app, bundle=existing_bundle("scannet"))
    overrides = ["--override=lp=8", "--override=num_workers=0"]
    out, tiff_out = tmp_path / "out", tmp_path / "tiff-out"
    _run([sys.executable, str(app), "-i", url, "-o", str(out), "--stow_url", orthanc_url, *overrides], cwd=tmp_path)
    _run([sys.executable, str(app), "-i", str(tumour), "-o", str(tiff_out), *overrides], cwd=tmp_path)

    (slide,) = json.loads((out / "summary.json").read_text())["slides"]
    (tiff_slide,) = json.loads((tiff_out / "summary.json").read_text())["slides"]
    assert slide["slide"] == "phantom_tumor_000" and slide["image"] == url  # named by its container identifier
    assert slide["score"] == pytest.approx(tiff_slide["score"], abs=0.01)
    assert slide["n_detections"] == tiff_slide["n_detections"]
    files = [out / f for f in slide["dicom"]["files"]]
    assert files and all(f.is_file() and f.parent.parent == out / "dicom" for f in files)
    assert slide["dicom"]["stow_url"] == orthanc_url and len(slide["dicom"]["stored"]) == len(files)
    results = [s for s in find_series(orthanc_url, study=study) if s["Modality"] != "SM"]
    fetched = [f.name for s in results
               for f in fetch_series(orthanc_url, study, s["SeriesInstanceUID"], tmp_path / "back")]
    assert sorted(fetched) == sorted(f"{uid}.dcm" for uid in slide["dicom"]["stored"])
    assert_dicom_results_equal_file_outputs(tmp_path / "back", out, slide["slide"], first["series_instance_uid"])

    down = tmp_path / "down"
    done = subprocess.run([sys.executable, str(app), "-i", url, "-o", str(down), "--stow_url",
                           f"http://127.0.0.1:{free_port()}/dicom-web", *overrides], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=_raise_stack_limit)
    assert done.returncode == 2
    assert "error: the DICOM results of 1 slide(s) failed: phantom_tumor_000: STOW-RS: " in done.stderr
    (failed,) = json.loads((down / "summary.json").read_text())["slides"]
    assert "cannot connect" in failed["dicom"]["failed"] and all((down / f).is_file() for f in failed["dicom"]["files"])


@pytest.mark.slow
@needs_sdk
@pytest.mark.parametrize("name", ["spatial_lstm", "dmmn"])
def test_dicom_in_dicom_out_of_every_slide_bundle(name: str, orthanc_url: str, tiny_inputs: dict,  # noqa: F811
                                                  tmp_path: Path) -> None:
    """The other slide bundles' applications (scannet: above) read a dicomized phantom from Orthanc by its series
    URL and store their DICOM results back; retrieved from Orthanc, they equal the run's own file outputs."""
    from orthanc_fixtures import dicomize
    from pathbundles.dicomweb import fetch_series, find_series, series_url, store_instances

    kind, overrides = CASES[name]
    ckpt = _tiny_checkpoint(name, tmp_path)
    overrides = {**overrides, "ckpt_path": str(ckpt)}
    slide = sorted(tiny_inputs[kind].glob("*.tif"))[0]
    (first, *_) = store_instances(orthanc_url, dicomize(slide, tmp_path / "dicomized"))["stored"]
    study = first["study_instance_uid"]
    app = tmp_path / "app"
    build(app, bundle=existing_bundle(name))
    out = tmp_path / "out"
    _run([sys.executable, str(app), "-i", series_url(orthanc_url, study, first["series_instance_uid"]), "-o",
          str(out), "--stow_url", orthanc_url, *[f"--override={k}={v}" for k, v in overrides.items()]], cwd=tmp_path)
    (record,) = json.loads((out / "summary.json").read_text())["slides"]
    assert record["slide"] == slide.stem and len(record["dicom"]["stored"]) == len(record["dicom"]["files"]) > 0
    for series in find_series(orthanc_url, study=study):
        if series["Modality"] != "SM":
            fetch_series(orthanc_url, study, series["SeriesInstanceUID"], tmp_path / "back")
    assert sorted(p.stem for p in (tmp_path / "back").glob("*.dcm")) == sorted(record["dicom"]["stored"])
    assert_dicom_results_equal_file_outputs(tmp_path / "back", out, record["slide"], first["series_instance_uid"])


@pytest.mark.slow
@needs_sdk
def test_segmitos_application_on_hpf_boxes_of_a_dicom_slide(orthanc_url: str, tmp_path: Path) -> None:  # noqa: F811
    """SegMitos takes HPFs; on a DICOM slide they are boxes of it (a datalist of ``{"image": series URL, "box"}``):
    the application reads them from Orthanc and stores one annotation object (points in the slide's pixels) and one
    report per box, equal to the run's GeoJSON of that box."""
    import json as _json

    from PIL import Image

    from orthanc_fixtures import dicomize
    from pathbundles.dicomweb import fetch_series, find_series, series_url, store_instances
    from pathbundles.phantom import make_mitosis_dataset
    from pathbundles.writers import write_pyramid_tiff

    doc = _json.loads(make_mitosis_dataset(tmp_path / "hpfs", n=2, seed=3, size_px=512).read_text())
    hpfs = [np.asarray(Image.open(tmp_path / "hpfs" / item["image"]).convert("RGB")) for item in doc["items"]]
    slide = write_pyramid_tiff(tmp_path / "mitosis_slide.tif", np.concatenate(hpfs, axis=1), mpp=0.25,
                               compression="jpeg", quality=95)
    (first, *_) = store_instances(orthanc_url, dicomize(slide, tmp_path / "dicomized"))["stored"]
    study, url = first["study_instance_uid"], series_url(orthanc_url, first["study_instance_uid"],
                                                         first["series_instance_uid"])
    datalist = tmp_path / "boxes.json"
    datalist.write_text(_json.dumps({"items": [{"image": url, "box": [512 * k, 0, 512, 512]} for k in range(2)]}))
    app = tmp_path / "app"
    build(app, bundle=existing_bundle("segmitos"))
    out = tmp_path / "out"
    _run([sys.executable, str(app), "-i", str(datalist), "-o", str(out), "--stow_url", orthanc_url,
          "--override=num_workers=0"], cwd=tmp_path)
    records = {s["slide"]: s for s in _json.loads((out / "summary.json").read_text())["slides"]}
    assert sorted(records) == ["mitosis_slide_x0_y0", "mitosis_slide_x512_y0"]
    assert sum(r["n_detections"] for r in records.values()) > 0  # points to compare
    stored = [uid for r in records.values() for uid in r["dicom"]["stored"]]
    for series in find_series(orthanc_url, study=study):
        if series["Modality"] != "SM":
            fetch_series(orthanc_url, study, series["SeriesInstanceUID"], tmp_path / "back")
    assert sorted(p.stem for p in (tmp_path / "back").glob("*.dcm")) == sorted(stored)
    for name, record in records.items():
        box_back = tmp_path / f"back-{name}"
        box_back.mkdir()
        for uid in record["dicom"]["stored"]:
            (tmp_path / "back" / f"{uid}.dcm").rename(box_back / f"{uid}.dcm")
        assert_dicom_results_equal_file_outputs(box_back, out, name, first["series_instance_uid"])
