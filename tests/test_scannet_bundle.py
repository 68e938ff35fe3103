"""The scannet bundle end to end, through ``python -m monai.bundle`` as a user runs it (slow: subprocesses)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bundle_helpers import REPO, check_metadata_and_network, run_bundle
from pathbundles.weights import DEMO_WARNING
from pathbundles.writers import read_pyramid_fields

BUNDLE = REPO / "bundles" / "scannet"
CONFIGS = BUNDLE / "configs"

pytestmark = pytest.mark.slow

#: sha256 of the shipped demo weights, models/model.pt (metadata.json's trained_with).
DEMO_SHA256 = json.loads((CONFIGS / "metadata.json").read_text())["trained_with"]["models/model.pt"]["sha256"]




@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    """Two small phantom slides (one tumour, one normal) plus an empty (all-glass) slide and a truncated one."""
    from pathbundles.phantom import make_phantom
    from pathbundles.writers import write_pyramid_tiff

    root = tmp_path_factory.mktemp("scannet-data")
    dataset = make_phantom(root, kind="metastasis", n=2, seed=7, size_px=(3072, 3072))
    write_pyramid_tiff(root / "empty.tif", np.full((1024, 1024, 3), 245, np.uint8), mpp=0.5, compression="jpeg")
    good = (root / "phantom_normal_001.tif").read_bytes()
    (root / "truncated.tif").write_bytes(good[: len(good) // 3])
    doc = json.loads(dataset.read_text())
    with_bad = dict(doc, items=doc["items"] + [{"image": "empty.tif", "label": 0}, {"image": "truncated.tif",
                                                                                      "label": 0}])
    (root / "with_bad.json").write_text(json.dumps(with_bad))
    return root


def test_metadata_and_network_verify() -> None:
    check_metadata_and_network(CONFIGS, "--n", "2")


def test_inference_reports_bad_slide_and_writes_the_others(small_dataset: Path, tmp_path: Path) -> None:
    from openslide import OpenSlide

    from pathbundles.writers import read_detections_csv

    out = tmp_path / "out"
    result = run_bundle("run", "--config_file", str(CONFIGS / "inference.json"), "--data_source",
                        str(small_dataset / "with_bad.json"), "--output_dir", str(out), "--lp", "8",
                        "--num_workers", "0")
    # The truncated slide fails by name, the run finishes the others and exits non-zero.
    assert result.returncode != 0
    assert "truncated" in (result.stdout + result.stderr)
    rows = {r["name"]: r for r in csv.DictReader(open(out / "slide_scores.csv"))}
    assert set(rows) == {"phantom_tumor_000", "phantom_normal_001", "empty"}
    assert float(rows["empty"]["score"]) == 0.0 and int(rows["empty"]["n_detections"]) == 0
    assert not list(out.rglob("truncated*")) and not list(out.rglob(".*partial*"))
    # The map is an mpp-tagged pyramid that OpenSlide opens: stride 32 / alpha 2 = 16 px at 1.0 um/px.
    with OpenSlide(str(out / "maps" / "phantom_tumor_000.tif")) as osr:
        assert osr.level_dimensions[0] == (3072 // 2 // 16, 3072 // 2 // 16)
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(16.0, rel=1e-3)
    det = read_detections_csv(out / "detections" / "phantom_tumor_000.csv")
    assert det.ndim == 2 and det.shape[1] == 3
    if len(det):
        assert np.all((det[:, 0] > 0.5) & (det[:, 0] <= 1.0))
        assert np.all((det[:, 1:] >= 0) & (det[:, 1:] < 3072))
    assert (out / "overlays" / "phantom_tumor_000.png").stat().st_size > 1000


@pytest.mark.parametrize("slide", ["truncated", "empty"])
def test_inference_on_a_lone_slide_that_gives_no_roi(small_dataset: Path, tmp_path: Path, slide: str) -> None:
    # No ROI at all reaches the evaluator, so MONAI's Workflow.run fires no event; the config's run list completes
    # the writer itself: the unreadable slide fails by name, the all-glass one gets its all-zero outputs.
    datalist = tmp_path / "lone.json"
    datalist.write_text(json.dumps({"items": [{"image": str(small_dataset / f"{slide}.tif"), "label": 0}]}))
    out = tmp_path / "out"
    result = run_bundle("run", "--config_file", str(CONFIGS / "inference.json"), "--data_source", str(datalist),
                        "--output_dir", str(out), "--num_workers", "0")
    log = result.stdout + result.stderr
    if slide == "truncated":
        assert result.returncode != 0
        # the lone slide failed: nothing was written, and the message says so
        assert f"1 slide(s) failed, no slide was written: truncated: {small_dataset / 'truncated.tif'}" in log
        assert not list(out.rglob("truncated*")) and not list(out.rglob(".*partial*"))
    else:
        assert result.returncode == 0, log[-3000:]
        # The shipped weights are demo weights: the table, the map's fields, the GeoJSON, the printed report and the
        # log (start and end of the run) all say so.
        demo = {"weights_sha256": DEMO_SHA256, "demo_weights": "true", "weights_warning": DEMO_WARNING}
        rows = list(csv.DictReader(open(out / "slide_scores.csv")))
        assert rows == [{"name": "empty", "score": "0.000000", "n_detections": "0", **demo}]
        assert (out / "maps" / "empty.tif").exists() and (out / "overlays" / "empty.png").exists()
        record = {**demo, "demo_weights": True}
        assert read_pyramid_fields(out / "maps" / "empty.tif").items() >= record.items()
        assert json.loads((out / "detections" / "empty.geojson").read_text())["properties"].items() >= record.items()
        report = result.stdout[result.stdout.index('{\n  "output_dir"'):]
        assert json.loads(report[:report.index("\n}\n") + 2])["weights"] == record
        warnings = [line for line in log.splitlines() if DEMO_WARNING in line and "WARNING" in line]
        assert [w.split(DEMO_WARNING)[1].split(";")[0] for w in warnings] == [" (start of the run", " (end of the run"]
        assert all(f"sha256 {DEMO_SHA256[:12]})" in w for w in warnings)
    # Either way the report is written: the engine never started, and write_run_report completed the writer.
    page = (out / "report.html").read_text(encoding="utf-8")
    assert ("<td>failed</td>" in page) == (slide == "truncated") and ("<td>done</td>" in page) == (slide == "empty")
    if slide == "empty":  # and it says the demo weights made it (from the table's weights columns)
        assert '<div class="banner">' in page and DEMO_WARNING in page


@pytest.mark.parametrize("case", ["scan_mpp", "foreign_weights", "truncated_weights", "missing_datalist",
                                  "detection_threshold"])
def test_bad_input_ends_the_run_in_one_line_with_status_2(small_dataset: Path, tmp_path: Path, case: str) -> None:
    """A bad file or setting ends ``python -m monai.bundle run`` as the CLI does: no MONAI traceback, exit 2, one
    line naming the file and the problem; the checkpoint is checked before any slide is read."""
    weights = BUNDLE / "models" / "model.pt"
    cut = tmp_path / "cut.pt"
    cut.write_bytes(weights.read_bytes()[:100_000])
    args, expected = {
        # Weights trained at 1.0 um/px read at 8 um/px gave a meaningless score with status 0.
        "scan_mpp": (["--scan_mpp", "8.0"], f"{weights}: weights trained with scan_mpp = 1.0 (by {CONFIGS}/"
                                            "metadata.json), but this run has scan_mpp = 8.0"),
        "foreign_weights": (["--ckpt_path", str(REPO / "bundles" / "dmmn" / "models" / "model.pt")],
                            f"{REPO}/bundles/dmmn/models/model.pt: does not fit this bundle's ScanNet"),
        "truncated_weights": (["--ckpt_path", str(cut)], f"{cut}: not a readable PyTorch checkpoint (100000 bytes"),
        "missing_datalist": (["--data_source", str(tmp_path / "absent.json")], f"{tmp_path / 'absent.json'}: "),
        "detection_threshold": (["--detection_threshold", "2", "--data_source", str(small_dataset / "dataset.json")],
                                "detection_threshold must be a probability in [0, 1], got 2"),
    }[case]
    result = run_bundle("run", "--config_file", str(CONFIGS / "inference.json"), "--output_dir",
                        str(tmp_path / "out"), "--num_workers", "0", *args)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"pathbundles: error: {expected}"), last
    assert not (tmp_path / "out").exists()  # nothing was scanned


def test_evaluate_writes_froc_and_auc(small_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    result = run_bundle("run", "--config_file",
                        f"['{CONFIGS / 'inference.json'}','{CONFIGS / 'evaluate.json'}']", "--data_source",
                        str(small_dataset / "dataset.json"), "--output_dir", str(out), "--lp", "8",
                        "--num_workers", "0", "--n_bootstrap", "50")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= report["metrics"]["froc"] <= 1.0
    assert report["details"]["froc"]["n_slides"] == 2
    assert report["details"]["slide_auc"]["n_tumour"] == 1 and report["details"]["slide_auc"]["n_normal"] == 1
    assert (out / "froc.png").stat().st_size > 1000 and (out / "roc.png").stat().st_size > 1000
    # The numbers are those of the demo weights, and the report says so.
    assert report["weights"] == {"weights_sha256": DEMO_SHA256, "demo_weights": True, "weights_warning": DEMO_WARNING}
    # The evaluation's report: the metrics as metrics.json has them, both curves, both slides with their overlays.
    page = (out / "report.html").read_text(encoding="utf-8")
    assert f"<td>froc</td><td>{report['metrics']['froc']:.4g}" in page
    assert 'alt="froc"' in page and 'alt="roc"' in page and page.count('alt="overlay"') == 2


TINY_TRAIN = ["--epochs", "1", "--samples_per_epoch", "8", "--val_samples", "8", "--batch_size", "4",
              "--num_workers", "0", "--hnm_rounds", "1", "--hnm_epochs_per_round", "1", "--hnm_lp", "8",
              "--hnm_threshold", "0.0", "--hnm_max_per_slide", "5"]


def test_train_with_hard_negative_mining(small_dataset: Path, tmp_path: Path) -> None:
    import torch

    data = str(small_dataset / "dataset.json")
    result = run_bundle("run", "--config_file", str(CONFIGS / "train.json"), "--train_source", data,
                        "--val_source", data, "--ckpt_dir", str(tmp_path), *TINY_TRAIN)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    # threshold 0 makes every normal-tissue location a false positive: 5 per slide, 2 slides.
    assert "hard negative mining: 10 false positives added" in log
    assert "Epoch[2] Complete" in log  # the fine-tuning epoch after mining ran
    checkpoint = torch.load(tmp_path / "model.pt", map_location="cpu")
    assert checkpoint["model"]["classifier.6.weight"].shape == (2, 128, 1, 1)
    assert checkpoint["training"] == {"bundle": "scannet", "scan_mpp": 1.0, "width": 0.125, "batch_norm": True}
    # Trained weights are not the demo weights, and metadata.json's eval_metrics are not claimed for them.
    from pathbundles.weights import NOT_MEASURED, identify

    trained = identify(tmp_path / "model.pt", CONFIGS / "metadata.json")
    assert (trained.demo, trained.eval_metrics, trained.warning) == (False, NOT_MEASURED, None)


def test_multi_gpu_overlay_runs_with_gloo_on_two_processes(small_dataset: Path, tmp_path: Path) -> None:
    data = str(small_dataset / "dataset.json")
    configs = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multi_gpu_train.json'}']"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         "-m", "monai.bundle", "run", "--config_file", configs, "--train_source", data, "--val_source", data,
         "--ckpt_dir", str(tmp_path), *TINY_TRAIN],
        cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    # Both ranks mine the same slides with the same (synchronised) weights; only rank 0 writes checkpoints.
    assert log.count("hard negative mining: 10 false positives added") == 2
    assert log.count("Train completed, saved final checkpoint") == 2  # one per training stage, rank 0 only
    assert (tmp_path / "model.pt").exists()


def test_evaluate_demo_weights_on_held_out_phantom_slides(tmp_path: Path) -> None:
    """The demo claim of metadata.json's eval_metrics (the weights after hard negative mining): FROC 1.0 and slide
    AUC 1.0 on the 6 held-out phantom slides (seed 1000), at most 2 false positives per slide at threshold 0.5
    (the model before mining had 32.7)."""
    from bundle_helpers import merged

    out = tmp_path / "eval"
    result = run_bundle("run", "--config_file", merged(CONFIGS, "inference.json", "evaluate.json"),
                        "--output_dir", str(out), "--n_bootstrap", "200")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    claimed = json.loads((CONFIGS / "metadata.json").read_text())["eval_metrics"]
    assert claimed["weights_sha256"] == DEMO_SHA256 == report["weights"]["weights_sha256"]
    assert report["details"]["froc"]["n_slides"] == 6 and report["details"]["froc"]["n_lesions"] == 5
    assert report["metrics"]["froc"] == pytest.approx(claimed["phantom_heldout_froc"], abs=0.05)
    assert report["metrics"]["slide_auc"] == pytest.approx(claimed["phantom_heldout_slide_auc"], abs=1e-9)
    curve = json.loads((out / "curves.json").read_text())["froc"]
    assert curve["fp_per_slide"][-1] <= 2.0
