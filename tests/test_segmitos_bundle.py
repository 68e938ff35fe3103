"""The segmitos bundle end to end, through ``python -m monai.bundle`` as a user runs it (slow: subprocesses)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bundle_helpers import REPO, check_metadata_and_network, merged, run_bundle
from pathbundles.writers import read_overlay_layout

BUNDLE = REPO / "bundles" / "segmitos"
CONFIGS = BUNDLE / "configs"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_hpfs(tmp_path_factory) -> Path:
    """Four 400 px phantom HPFs with centroid CSVs (seed 3), plus a truncated PNG and a symlink loop listed in
    ``with_bad.json``."""
    from pathbundles.phantom import make_phantom

    root = tmp_path_factory.mktemp("segmitos-data")
    dataset = make_phantom(root, kind="mitosis", n=4, seed=3, size_px=400)
    good = (root / "images" / "phantom_hpf_000.png").read_bytes()
    (root / "images" / "truncated.png").write_bytes(good[: len(good) // 3])
    (root / "loop.png").symlink_to(root / "loop.png")
    doc = json.loads(dataset.read_text())
    bad = [{"image": "images/truncated.png"}, {"image": "loop.png"}]
    (root / "with_bad.json").write_text(json.dumps(dict(doc, items=doc["items"] + bad)))
    return root


@pytest.fixture()
def bundle_copy(tmp_path: Path) -> Path:
    """A copy of the bundle (configs and weights), so a tune step can store its thresholds without touching the repo."""
    copy = tmp_path / "segmitos"
    shutil.copytree(BUNDLE, copy, ignore=shutil.ignore_patterns("eval"))
    return copy


def test_metadata_and_network_verify() -> None:
    # "*" x "*" input: MONAI tries sizes the network must map to the same output size, for every variant.
    check_metadata_and_network(CONFIGS, "--any", "37")  # the default FCN-32s
    for variant in ("16s", "8s"):
        net = run_bundle("verify_net_in_out", "network_def", "--meta_file", str(CONFIGS / "metadata.json"),
                         "--config_file", str(CONFIGS / "inference.json"), "--any", "37", "--variant", variant)
        assert net.returncode == 0, net.stderr[-2000:]


TINY_TRAIN = ["--epochs", "1", "--samples_per_epoch", "4", "--batch_size", "2", "--crop_px", "128",
              "--num_workers", "0", "--width", "0.0625"]


def test_training_chain_32s_16s_8s(small_hpfs: Path, tmp_path: Path) -> None:
    import torch

    data = str(small_hpfs / "dataset.json")
    common = ["--config_file", str(CONFIGS / "train.json"), "--train_source", data, "--val_source", data,
              "--ckpt_dir", str(tmp_path), *TINY_TRAIN]
    # The 16s stage needs the 32s checkpoint first: a clear error, no file written.
    early = run_bundle("run", *common, "--variant", "16s")
    assert early.returncode != 0 and "train the 32s stage first" in early.stderr
    assert not list(tmp_path.iterdir())
    for variant in ("32s", "16s", "8s"):
        result = run_bundle("run", *common, "--variant", variant)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "val_f1" in result.stdout + result.stderr
    # The paper's FCN-32s is the bundle's default (model.pt); the finer stages are this project's extension.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "model_16s.pt", "model_8s.pt"]
    s32 = torch.load(tmp_path / "model.pt", map_location="cpu")["model"]
    checkpoint = torch.load(tmp_path / "model_8s.pt", map_location="cpu")
    s8 = checkpoint["model"]
    assert checkpoint["training"]["variant"] == "8s" and checkpoint["training"]["mpp"] == 0.25
    assert "score_pool3.weight" in s8 and "score_pool4.weight" in s8 and "score_pool4.weight" not in s32
    assert s8["fc.0.weight"].shape == s32["fc.0.weight"].shape  # the same trunk carried down the chain


def test_tune_stores_thresholds_that_inference_then_uses(small_hpfs: Path, bundle_copy: Path) -> None:
    from pathbundles.annotations import read_points_csv

    configs = bundle_copy / "configs"
    data = str(small_hpfs / "dataset.json")
    # A target the thresholds cannot be stored in fails before the tuning run, naming it.
    blocked = bundle_copy / "not_a_folder"
    blocked.write_text("")
    early = run_bundle("run", "--config_file", merged(configs, "inference.json", "tune.json"), "--val_source", data,
                       "--num_workers", "0", "--store_in", str(blocked / "thresholds.json"))
    assert early.returncode == 2
    assert early.stderr.strip().splitlines()[-1] == (
        f"pathbundles: error: {blocked / 'thresholds.json'}: cannot store the tuned thresholds: {blocked} is not a "
        "writable folder")
    assert not (bundle_copy / "eval" / "tune" / "tuning.json").exists()

    tune = run_bundle("run", "--config_file", merged(configs, "inference.json", "tune.json"),
                      "--val_source", data, "--num_workers", "0")
    assert tune.returncode == 0, tune.stderr[-3000:]
    tuning = json.loads((bundle_copy / "eval" / "tune" / "tuning.json").read_text())
    # By default the thresholds go to an override file beside tuning.json; the bundle's own config is untouched.
    thresholds = bundle_copy / "eval" / "tune" / "thresholds.json"
    stored = json.loads(thresholds.read_text())
    assert (configs / "inference.json").read_bytes() == (CONFIGS / "inference.json").read_bytes()
    best = tuning["best"]
    assert stored == {"min_mean_score": best["min_mean_score"], "min_area_um2": best["min_area_um2"],
                      "thresholds_tuned_on": {"hpfs": 4, "f1": best["f1"], "radius_px": 30.0, "sigma_um": 1.0}}
    assert f'"stored_in": "{thresholds}"' in tune.stdout
    assert len(tuning["grid"]) == 20 * 41 and best["f1"] == max(g["f1"] for g in tuning["grid"])
    # Inference with the override file listed after inference.json applies them: every score is above s1.
    out = bundle_copy / "eval" / "infer"
    result = run_bundle("run", "--config_file", f"['{configs / 'inference.json'}','{thresholds}']",
                        "--data_source", data, "--output_dir", str(out), "--num_workers", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    for csv_file in (out / "detections").glob("*.csv"):
        xy, scores = read_points_csv(csv_file, "xy")
        assert scores is None or np.all(scores > stored["min_mean_score"])
    assert len(list((out / "overlays").glob("*.png"))) == 4 and len(list((out / "maps").glob("*.png"))) == 4


def test_inference_fails_unreadable_hpfs_by_name_and_writes_the_others(small_hpfs: Path, tmp_path: Path) -> None:
    """A truncated PNG and a symlink loop fail by name in one line (exit 2); the four good HPFs are written (the
    run used to stop before any HPF at the first bad file)."""
    out = tmp_path / "out"
    result = run_bundle("run", "--config_file", str(CONFIGS / "inference.json"), "--data_source",
                        str(small_hpfs / "with_bad.json"), "--output_dir", str(out), "--num_workers", "0")
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "2 HPF(s) failed" in last and "truncated.png" in last and "loop.png" in last
    assert "Traceback" not in result.stderr
    # Each good HPF gets its CSV, GeoJSON and ASAP XML; the failed ones get nothing.
    assert sorted(p.name for p in (out / "detections").iterdir()) == \
        sorted(f"phantom_hpf_00{i}{suffix}" for i in range(4) for suffix in (".csv", ".geojson", ".xml"))
    assert len((out / "hpf_counts.csv").read_text().splitlines()) == 5
    # The overlays name the model and version (metadata.json) they were made with.
    version = json.loads((CONFIGS / "metadata.json").read_text())["version"]
    layout = read_overlay_layout(out / "overlays" / "phantom_hpf_000.png")
    assert layout["fields"] == {"hpf": "phantom_hpf_000", "model": f"SegMitos mitosis detection {version}"}
    # The report is written before the run ends: the four HPFs with their overlays, the two failed ones by name.
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "6 HPFs (4 done, 2 failed)" in report and report.count('alt="overlay"') == 4
    assert report.count("<td>failed</td>") == 2 and "truncated.png" in report


@pytest.mark.parametrize("overlay", [[], ["fcn8s.json"]], ids=["fcn32s_default", "fcn8s_extension"])
def test_evaluate_demo_weights_on_held_out_phantom_hpfs(overlay: list[str], tmp_path: Path) -> None:
    """The demo claim, for the default FCN-32s (the paper's) and the FCN-8s extension (fcn8s.json: its weights
    models/model_8s.pt and thresholds): F1 >= 0.7 on the 12 held-out phantom HPFs (seed 1000) at the stored
    thresholds."""
    out = tmp_path / "eval"
    result = run_bundle("run", "--config_file", merged(CONFIGS, "inference.json", *overlay, "evaluate.json"),
                        "--output_dir", str(out), "--write_images", "False")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    assert report["details"]["n_hpfs"] == 12
    trained_with = json.loads((CONFIGS / "metadata.json").read_text())["trained_with"]
    weights = trained_with["models/model_8s.pt" if overlay else "models/model.pt"]
    assert report["weights"]["weights_sha256"] == weights["sha256"]
    assert weights["settings"]["variant"] == ("8s" if overlay else "32s")
    assert report["metrics"]["f1"] >= 0.7
    assert json.loads((out / "curves.json").read_text())["pr"]["precision"]
    assert (out / "pr.png").stat().st_size > 1000


def test_multi_gpu_overlay_runs_with_gloo_on_two_processes(small_hpfs: Path, tmp_path: Path) -> None:
    data = str(small_hpfs / "dataset.json")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29537",
         "-m", "monai.bundle", "run", "--config_file", merged(CONFIGS, "train.json", "multi_gpu_train.json"),
         "--train_source", data, "--val_source", data, "--ckpt_dir", str(tmp_path), *TINY_TRAIN],
        cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert log.count("Train completed, saved final checkpoint") == 1  # rank 0 only
    # The default FCN-32s writes model.pt (pathbundles.segmitos.weights_filename).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_registry_pyfunc_prediction_on_hpfs(small_hpfs: Path, tmp_path: Path) -> None:
    """The MLflow pyfunc wrapper's predict (registry.predict_bundle) gives the slide bundles' columns for HPFs."""
    from pathbundles.annotations import read_points_csv
    from pathbundles.registry import predict_bundle

    images = sorted(str(p) for p in (small_hpfs / "images").glob("phantom_hpf_00[01].png"))
    frame = predict_bundle(BUNDLE, images, output_dir=str(tmp_path / "out"))
    assert list(frame["name"]) == ["phantom_hpf_000", "phantom_hpf_001"] and list(frame["image"]) == images
    for _, row in frame.iterrows():
        xy, scores = read_points_csv(row["detections_csv"], "xy")
        detections = json.loads(row["detections"])
        assert len(detections) == row["n_detections"] == len(xy)
        if len(xy):  # [score, x, y] as for slides, score = the highest detection score
            np.testing.assert_allclose(np.asarray(detections)[:, 1:], xy, atol=1e-3)
            assert row["score"] == pytest.approx(scores.max(), abs=1e-6)
        assert row["map"].endswith(".png") and row["overlay"].endswith(".png")
    # The shipped weights are demo weights, and every prediction says so.
    from pathbundles.weights import DEMO_WARNING

    demo_sha = json.loads((BUNDLE / "configs" / "metadata.json").read_text())["trained_with"]["models/model.pt"][
        "sha256"]
    assert set(zip(frame["weights_sha256"], frame["demo_weights"], frame["weights_warning"])) == {
        (demo_sha, "true", DEMO_WARNING)}


def test_evaluate_is_tracked_in_mlflow(small_hpfs: Path, tmp_path: Path) -> None:
    """--tracking logs the evaluation's F1, precision and recall and its metrics.json / curves.json (PR curve)."""
    import mlflow

    from pathbundles.tracking import EVALUATION_DIR, sqlite_uri

    uri = sqlite_uri(tmp_path / "mlflow.db")
    out = tmp_path / "eval"
    result = run_bundle("run", "--config_file", merged(CONFIGS, "inference.json", "evaluate.json"), "--data_source",
                        str(small_hpfs / "dataset.json"), "--output_dir", str(out), "--write_images", "False",
                        "--num_workers", "0", "--tracking", str(REPO / "mlflow" / "tracking.json"),
                        "--tracking_uri", uri, "--experiment_name", "segmitos-test")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())["metrics"]
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("segmitos-test").experiment_id])
    for key in ("f1", "precision", "recall", "average_precision"):
        assert run.data.metrics[key] == pytest.approx(report[key])
    logged = {a.path for a in client.list_artifacts(run.info.run_id, EVALUATION_DIR)}
    assert {f"{EVALUATION_DIR}/metrics.json", f"{EVALUATION_DIR}/curves.json"} <= logged
