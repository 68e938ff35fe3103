"""The spatial_lstm bundle end to end, through ``python -m monai.bundle`` as a user runs it (slow: subprocesses).

Inference, evaluation and training run a tiny network (widen factor 1/16, hidden size 16) at the real geometry
(3 x 3 grids of 256 px cells, 224 px crops, stride 64) on two small phantom slides; the shipped weights are checked
by metadata verification and TorchScript export.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bundle_helpers
from bundle_helpers import REPO, check_metadata_and_network, merged

BUNDLE = REPO / "bundles" / "spatial_lstm"
CONFIGS = BUNDLE / "configs"

TINY_NET = ["--widen_factor", "0.0625", "--hidden_size", "16"]
# tile_px 8: 512 px ROI strides, so a 1536 px scan is stitched from several ROIs. Fire reads "False", not "false".
TINY_SCAN = [*TINY_NET, "--tile_px", "8", "--tta", "False", "--num_workers", "0"]
TINY_TRAIN = [*TINY_NET, "--epochs", "1", "--samples_per_epoch", "4", "--val_samples", "8", "--batch_size", "2",
              "--num_workers", "0"]

pytestmark = pytest.mark.slow


def run_bundle(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """``bundle_helpers.run_bundle`` with one thread: the tiny networks only wait on a busy core's OpenMP barriers
    with more."""
    return bundle_helpers.run_bundle(*args, OMP_NUM_THREADS="1", **kwargs)




@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    """Two 3072 px phantom slides at 0.5 um/px (one tumour, one normal) and a tiny checkpoint for them (with the
    configs' ``feature_norm``)."""
    import torch

    from pathbundles.phantom import make_phantom
    from pathbundles.spatial_lstm import SpatialLSTMNet

    root = tmp_path_factory.mktemp("spatial-lstm-data")
    make_phantom(root, kind="metastasis", n=2, seed=7, size_px=(3072, 3072))
    torch.manual_seed(0)
    torch.save(SpatialLSTMNet(widen_factor=0.0625, hidden_size=16, feature_norm=True).state_dict(), root / "tiny.pt")
    return root


def test_metadata_and_network_verify() -> None:
    check_metadata_and_network(CONFIGS, OMP_NUM_THREADS="1")


def test_ablation_overlays_change_network_loss_and_checkpoint_name() -> None:
    from monai.bundle import ConfigParser

    expected = {None: (True, 1.0, "model.pt"), "ablation_lstm.json": (True, 0.0, "model_lstm.pt"),
                "ablation_resnet34.json": (False, 0.0, "model_resnet34.pt")}
    for overlay, (use_lstm, beta, ckpt_name) in expected.items():
        names = ["train.json"] + ([overlay] if overlay else [])
        train = ConfigParser()
        train.read_config([str(CONFIGS / n) for n in names])
        assert train.get_parsed_content("loss").beta == beta
        assert (train.get_parsed_content("network_def").lstm is not None) == use_lstm
        assert train.get_parsed_content("ckpt_name") == ckpt_name
        # The same overlay over inference + evaluate loads that checkpoint into that network.
        names = ["inference.json", "evaluate.json"] + ([overlay] if overlay else [])
        infer = ConfigParser()
        infer.read_config([str(CONFIGS / n) for n in names])
        infer["bundle_root"] = str(BUNDLE)
        assert infer.get_parsed_content("ckpt_path") == f"{BUNDLE}/models/{ckpt_name}"
        assert infer.get_parsed_content("network_def#use_lstm") == use_lstm


def test_inference_writes_maps_detections_and_scores(small_dataset: Path, tmp_path: Path) -> None:
    from openslide import OpenSlide

    from pathbundles.writers import read_detections_csv, read_overlay_layout

    out = tmp_path / "out"
    # Threshold 0: every map pixel with tissue is a candidate, so the suppression radius shows in the output.
    result = run_bundle("run", "--config_file", str(CONFIGS / "inference.json"), "--data_source",
                        str(small_dataset / "dataset.json"), "--output_dir", str(out), "--ckpt_path",
                        str(small_dataset / "tiny.pt"), "--detection_threshold", "0.0", *TINY_SCAN)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["name"]: r for r in csv.DictReader(open(out / "slide_scores.csv"))}
    assert set(rows) == {"phantom_tumor_000", "phantom_normal_001"}
    for name, row in rows.items():
        # The map: stride 64 scan px at 1.0 um/px over the 1536 x 1536 scan of a 3072 px slide at 0.5 um/px.
        with OpenSlide(str(out / "maps" / f"{name}.tif")) as osr:
            assert osr.level_dimensions[0] == (1536 // 64, 1536 // 64)
            assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(64.0, rel=1e-3)
        det = read_detections_csv(out / "detections" / f"{name}.csv")
        assert det.ndim == 2 and det.shape[1] == 3 and len(det) == int(row["n_detections"]) > 1
        assert np.all((det[:, 0] > 0.0) & (det[:, 0] <= 1.0)) and det[0, 0] == pytest.approx(float(row["score"]),
                                                                                              abs=1e-6)
        # Map pixel k is the grid centred on scan pixel 64 k + 3 * 256 / 2, i.e. level-0 pixel 2 (64 k + 384). The
        # map has ceil(1536 / 64) = 24 pixels a side, so its last 6 are grids centred beyond the slide's edge.
        k = (det[:, 1:] / 2 - 384) / 64
        np.testing.assert_allclose(k, np.round(k), atol=1e-6)
        assert np.all((k >= 0) & (k < 24))
        # Non-maximum suppression: no two detections closer than the 187 um radius (374 level-0 px).
        gaps = np.linalg.norm(det[:, None, 1:] - det[None, :, 1:], axis=-1)[np.triu_indices(len(det), 1)]
        assert gaps.min() > 187.0 / 0.5
        # The overlay: the 3072 px slide at overlay_long_side_px = 2000, each detection ringed at its position
        # (CSV order), the model and version from metadata.json in its title.
        layout = read_overlay_layout(out / "overlays" / f"{name}.png")
        x0, y0, w, h = layout["slide_box_px"]
        assert (w, h) == (2000, 2000)
        np.testing.assert_allclose(np.asarray(layout["markers"]) - (x0, y0), det[:, 1:] * 2000 / 3072, atol=1)
        version = json.loads((BUNDLE / "configs" / "metadata.json").read_text())["version"]
        assert layout["fields"]["model"] == f"Spatial LSTM metastasis detection {version}"


def test_tissue_grids_only_writes_the_same_outputs(small_dataset: Path, tmp_path: Path) -> None:
    """The default (tissue_grids_only: only grids centred on tissue go through the network) writes byte for byte what
    computing every grid of the ROIs writes: the writer zeroes the map off tissue either way (tissue_only)."""
    slide = small_dataset / "phantom_tumor_000.tif"
    outputs = {}
    for value in ("True", "False"):
        out = tmp_path / value
        result = run_bundle("run", "--config_file", str(CONFIGS / "inference.json"), "--data_source", str(slide),
                            "--output_dir", str(out), "--ckpt_path", str(small_dataset / "tiny.pt"),
                            "--detection_threshold", "0.0", "--tissue_grids_only", value, *TINY_SCAN)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[value] = {f: (out / f).read_bytes() for f in ("maps/phantom_tumor_000.tif", "slide_scores.csv",
                                                              "detections/phantom_tumor_000.csv",
                                                              "detections/phantom_tumor_000.geojson")}
    assert outputs["True"] == outputs["False"]
    assert len(outputs["True"]["detections/phantom_tumor_000.csv"].splitlines()) > 2  # a map with content


def test_evaluate_writes_froc_and_auc(small_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    result = run_bundle("run", "--config_file", merged(CONFIGS, "inference.json", "evaluate.json"), "--data_source",
                        str(small_dataset / "dataset.json"), "--output_dir", str(out), "--ckpt_path",
                        str(small_dataset / "tiny.pt"), "--n_bootstrap", "50", *TINY_SCAN)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= report["metrics"]["froc"] <= 1.0 and 0.0 <= report["metrics"]["slide_auc"] <= 1.0
    assert report["details"]["froc"]["n_slides"] == 2
    assert report["details"]["slide_auc"]["n_tumour"] == 1 and report["details"]["slide_auc"]["n_normal"] == 1
    assert (out / "froc.png").stat().st_size > 1000 and (out / "roc.png").stat().st_size > 1000


@pytest.mark.parametrize("overlay, ckpt_name, has_lstm", [(None, "model.pt", True),
                                                          ("ablation_lstm.json", "model_lstm.pt", True),
                                                          ("ablation_resnet34.json", "model_resnet34.pt", False)])
def test_train_and_ablations_write_their_own_checkpoint(small_dataset: Path, tmp_path: Path, overlay: str | None,
                                                       ckpt_name: str, has_lstm: bool) -> None:
    import torch

    data = str(small_dataset / "dataset.json")
    configs = merged(CONFIGS, "train.json", *([overlay] if overlay else []))
    result = run_bundle("run", "--config_file", configs, "--train_source", data, "--val_source", data,
                        "--ckpt_dir", str(tmp_path), *TINY_TRAIN)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "val_auc" in log and "Train completed, saved final checkpoint" in log
    # The best validation AUC is saved under ckpt_name (model selection), the last epoch beside it.
    final_name = ckpt_name.replace(".pt", "_final.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ckpt_name, final_name])
    checkpoint = torch.load(tmp_path / ckpt_name, map_location="cpu")
    state = checkpoint["model"]
    assert checkpoint["training"]["use_lstm"] == has_lstm and checkpoint["training"]["bundle"] == "spatial_lstm"
    assert ("lstm.weight_ih_l0" in state) == has_lstm
    assert state["classifier.weight"].shape == (1, 16 if has_lstm else 32)  # hidden size, or int(512 / 16) features


def test_multi_gpu_overlay_runs_with_gloo_on_two_processes(small_dataset: Path, tmp_path: Path) -> None:
    data = str(small_dataset / "dataset.json")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
         "-m", "monai.bundle", "run", "--config_file", merged(CONFIGS, "train.json", "multi_gpu_train.json"),
         "--train_source", data, "--val_source", data, "--ckpt_dir", str(tmp_path), *TINY_TRAIN],
        cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert log.count("val_auc best value") == 2  # both ranks validate (metric gathered across ranks)
    assert log.count("Train completed, saved final checkpoint") == 1  # rank 0 only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "model_final.pt"]


def test_evaluate_demo_weights_on_held_out_phantom_slides(tmp_path: Path) -> None:
    """The demo claim of metadata.json's eval_metrics, on the weights it names by sha256: FROC and slide AUC on the
    6 held-out phantom slides (seed 1000) with the evaluation defaults on a CPU (no TTA), and the demo target FROC
    >= 0.7."""
    out = tmp_path / "eval"
    result = bundle_helpers.run_bundle("run", "--config_file", merged(CONFIGS, "inference.json", "evaluate.json"),
                                       "--output_dir", str(out), "--n_bootstrap", "200")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    claimed = json.loads((CONFIGS / "metadata.json").read_text())["eval_metrics"]
    shipped = hashlib.sha256((BUNDLE / "models" / "model.pt").read_bytes()).hexdigest()
    assert claimed["weights_sha256"] == shipped == report["weights"]["weights_sha256"]
    assert report["details"]["froc"]["n_slides"] == 6 and report["details"]["froc"]["n_lesions"] == 5
    assert report["metrics"]["froc"] == pytest.approx(claimed["phantom_heldout_froc"], abs=0.05)
    assert report["metrics"]["slide_auc"] == pytest.approx(claimed["phantom_heldout_slide_auc"], abs=1e-9)
    assert report["metrics"]["froc"] >= 0.7
