"""The dmmn bundle end to end, through ``python -m monai.bundle`` as a user runs it (slow: subprocesses).

Inference, evaluation and training run a narrow DMMN (width 1/32) at the real geometry (256 px views at 20x, 10x
and 5x, stride 256) on two small phantom multi-class slides; the shipped weights are checked by metadata
verification, TorchScript export and the demo claim on the held-out phantom slides.
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

BUNDLE = REPO / "bundles" / "dmmn"
CONFIGS = BUNDLE / "configs"
CLASSES = ["carcinoma", "benign epithelium", "stroma", "necrosis", "adipose", "background"]

TINY_NET = ["--width", "0.03125"]
TINY_SCAN = [*TINY_NET, "--num_workers", "0", "--batch_size", "4"]
# Rates are cut so that one epoch is a few dozen tiles; validation on the same slides.
TINY_TRAIN = [*TINY_NET, "--epochs", "1", "--batch_size", "4", "--num_workers", "0", "--class_rates",
              "{'benign epithelium': 1}"]

pytestmark = pytest.mark.slow


def run_bundle(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """``bundle_helpers.run_bundle`` with one thread (tiny networks gain nothing from a second busy core)."""
    return bundle_helpers.run_bundle(*args, OMP_NUM_THREADS="1", **kwargs)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    """Two 1024 px phantom multi-class slides at 0.5 um/px and a tiny checkpoint for them."""
    import torch

    from pathbundles.dmmn import DMMN
    from pathbundles.phantom import make_multiclass_dataset

    root = tmp_path_factory.mktemp("dmmn-data")
    make_multiclass_dataset(root, n=2, seed=7, size_px=1024)
    torch.manual_seed(0)
    torch.save(DMMN("M3", num_classes=6, width=0.03125, batch_norm=True).state_dict(), root / "tiny.pt")
    return root


def test_metadata_and_network_verify() -> None:
    check_metadata_and_network(CONFIGS, OMP_NUM_THREADS="1")


def test_class_keys_follow_the_papers_order_and_rates() -> None:
    from monai.bundle import ConfigParser

    train = ConfigParser()
    train.read_config(str(CONFIGS / "train.json"))
    assert train.get_parsed_content("class_names") == CLASSES
    # Benign epithelium first, then carcinoma, necrosis, background (Sec. III-A), as phantom class ids.
    assert train.get_parsed_content("class_order") == [2, 1, 4, 6]
    assert train.get_parsed_content("rates") == {2: 10, 1: 2, 4: 3, 6: 1}
    assert train.get_parsed_content("optimizer#lr") == 5e-05
    assert train.get_parsed_content("optimizer#momentum") == 0.99
    assert train.get_parsed_content("optimizer#weight_decay") == 1e-04
    infer = ConfigParser()
    infer.read_config(str(CONFIGS / "inference.json"))
    assert infer.get_parsed_content("class_names") == CLASSES


def test_inference_writes_label_map_overlay_areas_and_regions(small_dataset: Path, tmp_path: Path) -> None:
    import tifffile

    from pathbundles.writers import read_overlay_layout

    out = tmp_path / "out"
    result = run_bundle("run", "--config_file", str(CONFIGS / "inference.json"), "--data_source",
                        str(small_dataset / "dataset.json"), "--output_dir", str(out), "--ckpt_path",
                        str(small_dataset / "tiny.pt"), *TINY_SCAN)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "areas.csv")))
    assert [r["name"] for r in rows] == ["phantom_mc_000", "phantom_mc_001"]
    # A tiny random checkpoint: not the demo weights, named by its hash, no warning.
    tiny_sha = hashlib.sha256((small_dataset / "tiny.pt").read_bytes()).hexdigest()
    assert {(r["weights_sha256"], r["demo_weights"], r["weights_warning"]) for r in rows} == {(tiny_sha, "false", "")}
    assert "DEMO WEIGHTS" not in result.stdout + result.stderr
    for row in rows:
        name = row["name"]
        # The label map at the 20x grid: 1024 px at 0.5 um/px, every tile predicted (use_tissue False).
        labels = tifffile.imread(out / "labels" / f"{name}.tif", level=0)
        assert labels.shape == (1024, 1024) and labels.dtype == np.uint8
        assert labels.min() >= 1 and labels.max() <= 6
        areas = json.loads((out / "areas" / f"{name}.json").read_text())
        counts = np.bincount(labels.ravel(), minlength=7)
        for class_id, class_name in enumerate(CLASSES, start=1):
            assert areas["classes"][class_name]["pixels"] == counts[class_id]
            assert areas["classes"][class_name]["area_mm2"] == pytest.approx(counts[class_id] * 0.25e-6)
            assert float(row[f"{class_name.replace(' ', '_')}_mm2"]) == pytest.approx(counts[class_id] * 0.25e-6)
        # The overlay: the 1024 px slide is smaller than overlay_long_side_px (2000), so it is level 0 as stored;
        # the legend beside it, the model and version from metadata.json in the title.
        layout = read_overlay_layout(out / "overlays" / f"{name}.png")
        x0, y0, w, h = layout["slide_box_px"]
        assert (w, h) == (1024, 1024) and layout["panel_box_px"][0] >= x0 + w and y0 > 0
        version = json.loads((CONFIGS / "metadata.json").read_text())["version"]
        assert layout["fields"]["model"] == f"DMMN multi-class breast tissue segmentation {version}"
        regions = json.loads((out / "regions" / f"{name}.geojson").read_text())
        assert regions["type"] == "FeatureCollection"
        assert all(f["properties"]["classification"]["name"].lower() == "carcinoma" for f in regions["features"])
    # The report: per slide its thumbnail, overlay and the area of every class as areas/<name>.json has it.
    report = (out / "report.html").read_text(encoding="utf-8")
    assert report.count('alt="thumbnail"') == 2 and report.count('alt="overlay"') == 2
    for class_name, entry in areas["classes"].items():
        assert f"<td>{class_name}</td><td>{entry['area_mm2']:.4f}</td>" in report


@pytest.mark.parametrize("with_good_slide", [False, True])
def test_unreadable_slide_fails_by_name_and_the_others_are_written(small_dataset: Path, tmp_path: Path,
                                                                   with_good_slide: bool) -> None:
    # Alone, no tile reaches the evaluator and no engine event fires: the run list's writer.ensure_completed()
    # reports it. Beside a good slide, the dataset keeps it without tiles and the writer fails it at the end.
    import tifffile

    source = tmp_path / "slides"
    source.mkdir()
    good = (small_dataset / "phantom_mc_000.tif").read_bytes()
    (source / "cut.tif").write_bytes(good[: len(good) // 3])
    if with_good_slide:
        (source / "good.tif").write_bytes(good)
    out = tmp_path / "out"
    result = run_bundle("run", "--config_file", str(CONFIGS / "inference.json"), "--data_source", str(source),
                        "--output_dir", str(out), "--ckpt_path", str(small_dataset / "tiny.pt"), *TINY_SCAN)
    assert result.returncode != 0
    others = "the others were written" if with_good_slide else "no slide was written"
    assert f"1 slide(s) failed, {others}: cut: {source / 'cut.tif'}" in result.stdout + result.stderr
    assert not list(out.rglob("cut*")) and not list(out.rglob(".*partial*"))
    if with_good_slide:
        assert [r["name"] for r in csv.DictReader(open(out / "areas.csv"))] == ["good"]
        assert tifffile.imread(out / "labels" / "good.tif", level=0).shape == (1024, 1024)


def test_evaluate_writes_table_i_and_is_tracked_in_mlflow(small_dataset: Path, tmp_path: Path) -> None:
    import mlflow

    from pathbundles.tracking import EVALUATION_DIR, sqlite_uri

    uri = sqlite_uri(tmp_path / "mlflow.db")
    out = tmp_path / "eval"
    result = run_bundle("run", "--config_file", merged(CONFIGS, "inference.json", "evaluate.json"), "--data_source",
                        str(small_dataset / "dataset.json"), "--output_dir", str(out), "--ckpt_path",
                        str(small_dataset / "tiny.pt"), *TINY_SCAN, "--tracking",
                        str(REPO / "mlflow" / "tracking.json"), "--tracking_uri", uri, "--experiment_name",
                        "dmmn-test")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    metrics = report["metrics"]
    ious = [metrics[f"iou_{c.replace(' ', '_')}"] for c in CLASSES]
    defined = [v for v in ious if v is not None]
    assert metrics["mean_iou"] == pytest.approx(float(np.mean(defined)))
    table = (out / "table_i.md").read_text()
    assert "| Carcinoma | IOU |" in table and "DMMN-M3" in table and "| Mean | IOU |" in table
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("dmmn-test").experiment_id])
    assert run.data.metrics["mean_iou"] == pytest.approx(metrics["mean_iou"])
    logged = {a.path for a in client.list_artifacts(run.info.run_id, EVALUATION_DIR)}
    assert f"{EVALUATION_DIR}/metrics.json" in logged


def test_train_writes_best_and_final_checkpoints_and_class_weights(small_dataset: Path, tmp_path: Path) -> None:
    import torch

    data = str(small_dataset / "dataset.json")
    result = run_bundle("run", "--config_file", str(CONFIGS / "train.json"), "--train_source", data,
                        "--val_source", data, "--ckpt_dir", str(tmp_path / "models"), "--output_dir",
                        str(tmp_path / "out"), *TINY_TRAIN)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "val_mean_iou" in log and "Train completed, saved final checkpoint" in log
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["model.pt", "model_final.pt"]
    checkpoint = torch.load(tmp_path / "models" / "model.pt", map_location="cpu")
    assert checkpoint["model"]["final.2.weight"].shape[0] == 6
    assert checkpoint["training"]["bundle"] == "dmmn" and len(checkpoint["training"]["class_names"]) == 6
    weights = json.loads((tmp_path / "out" / "class_weights.json").read_text())
    pixels = np.array([weights["label_pixels"][str(c)] for c in range(1, 7)], float)
    expected = 1 - pixels / pixels.sum()
    np.testing.assert_allclose([weights["weights"][str(c)] for c in range(1, 7)], expected, rtol=1e-6)


def test_samples_per_epoch_sets_the_epoch_size(small_dataset: Path) -> None:
    """``samples_per_epoch`` (as in the other bundles) draws that many training tiles per epoch; null keeps the
    whole class-balanced tile set."""
    data = str(small_dataset / "dataset.json")

    probe = ("$print('epoch', len(@train#dataset), len(list(@train#sampler or range(len(@train#dataset)))), "
             "len(@train#dataloader))")

    def epoch(*flags: str) -> str:
        """'epoch <tiles> <tiles drawn per epoch> <batches per epoch>'."""
        result = run_bundle("run", "probe", "--config_file", str(CONFIGS / "train.json"), "--train_source", data,
                            "--val_source", data, *TINY_TRAIN, *flags, "--probe", probe)
        assert result.returncode == 0, result.stderr[-3000:]
        return next(line for line in result.stdout.splitlines() if line.startswith("epoch "))

    tiles = int(epoch().split()[1])
    assert epoch() == f"epoch {tiles} {tiles} {-(-tiles // 4)}"
    assert epoch("--samples_per_epoch", "6") == f"epoch {tiles} 6 2"  # 6 tiles in batches of 4


def test_train_augmentation_moves_views_and_label_together() -> None:
    """The train preprocessing rotates and flips the three views and the label by one draw (before the jitter, so
    that CacheDataset can keep the deterministic reads): a label painted from the 20x view stays on it."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    preprocessing = parser.get_parsed_content("train#preprocessing")
    preprocessing.set_random_state(seed=3)
    rng = np.random.default_rng(0)
    x20 = rng.integers(0, 256, (3, 256, 256), dtype=np.uint8)
    label = (x20[0] >= 128).astype(np.int64) + 1  # 1 where the red channel is dark, 2 where it is bright
    item = {"x20": torch.from_numpy(x20), "x10": torch.from_numpy(x20.copy()), "x5": torch.from_numpy(x20[::-1].copy()),
            "label": torch.from_numpy(label), "location": torch.zeros(2), "slide_index": 0}
    moved = 0
    for _ in range(8):
        out = preprocessing(dict(item))
        image, lab = out["image"], out["label"]
        assert image.shape == (9, 256, 256) and lab.shape == (1, 256, 256)
        assert set(out) == {"image", "label"}
        # The 20x and 10x channels were equal before and must still be (same draw); the jitter is monotone per
        # channel only up to hue mixing, so the red channel's order is checked where it is far from the cut.
        torch.testing.assert_close(image[:3], image[3:6])
        red = image[0]
        far = (red < -0.5) | (red > 0.5)
        agree = ((red > 0) == (lab[0] == 2))[far].float().mean()
        assert agree > 0.97
        moved += int(not torch.equal(lab[0], torch.from_numpy(label)))
    assert moved >= 4  # the draws did rotate or flip most items


def test_demo_recipe_trains_on_full_labels_with_cache_and_autocast(small_dataset: Path, tmp_path: Path) -> None:
    """``demo_train.json`` (the recipe of the shipped weights): full label maps, cached items, bfloat16 on CPU."""
    data = str(small_dataset / "dataset.json")
    result = run_bundle("run", "--config_file", merged(CONFIGS, "train.json", "demo_train.json"), "--train_source",
                        data, "--val_source", data, "--ckpt_dir", str(tmp_path / "models"), "--output_dir",
                        str(tmp_path / "out"), *TINY_NET, "--epochs", "1", "--num_workers", "0", "--class_rates",
                        "{'necrosis': 1}")
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "val_mean_iou" in log and "Train completed, saved final checkpoint" in log
    # Full label maps: every pixel of every 256 px tile is annotated (1024 px slides: 16 tiles each).
    weights = json.loads((tmp_path / "out" / "class_weights.json").read_text())
    assert sum(weights["label_pixels"].values()) == 2 * 16 * 256 * 256


def test_multi_gpu_overlay_runs_with_gloo_on_two_processes(small_dataset: Path, tmp_path: Path) -> None:
    data = str(small_dataset / "dataset.json")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29543",
         "-m", "monai.bundle", "run", "--config_file", merged(CONFIGS, "train.json", "multi_gpu_train.json"),
         "--train_source", data, "--val_source", data, "--ckpt_dir", str(tmp_path / "models"), "--output_dir",
         str(tmp_path / "out"), *TINY_TRAIN],
        cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert log.count("val_mean_iou best value") == 2  # both ranks validate
    assert log.count("Train completed, saved final checkpoint") == 1  # rank 0 only
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["model.pt", "model_final.pt"]


def test_demo_weights_reach_the_target_on_held_out_phantom_slides(tmp_path: Path) -> None:
    """The demo claim: mean IoU >= 0.7 over all pixels of the 2 held-out phantom slides' full label maps (seed
    1000) with the shipped weights and the default inference.json (whole slides, stride 256)."""
    out = tmp_path / "eval"
    result = bundle_helpers.run_bundle("run", "--config_file", merged(CONFIGS, "inference.json", "evaluate.json"),
                                       "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    assert report["metrics"]["mean_iou"] >= 0.7
    slides = list(csv.DictReader((out / "slide_metrics.csv").open()))
    assert len(slides) == 2
