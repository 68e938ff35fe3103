"""Metric commands on files: froc, mitosis_f1, iou, called directly, through ``python -m pathbundles`` and from a
bundle config; malformed input is reported with file and line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pathbundles.errors import InputError
from pathbundles.metrics.commands import froc_command, iou_command, mitosis_f1_command

REPO = Path(__file__).resolve().parents[1]


def _write_csv(path: Path, rows: list) -> None:
    path.write_text("".join(",".join(str(v) for v in row) + "\n" for row in rows))


@pytest.fixture()
def froc_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """tumour_a: mask with tumour = 1 (PNG), tumour_b: mask with 255 (TIFF) and an empty CSV, normal_c: CSV only."""
    import tifffile

    masks, detections = tmp_path / "masks", tmp_path / "detections"
    masks.mkdir()
    detections.mkdir()
    mask = np.zeros((80, 80), dtype=np.uint8)
    mask[10:50, 10:50] = 1  # 311 um square at 7.776 um/px: a lesion
    Image.fromarray(mask).save(masks / "tumour_a.png")
    tifffile.imwrite(masks / "tumour_b.tif", mask * 255)
    # tumour_a: lesion hit at 0.9 and again at 0.5, FP at 0.7 (x = 70 * 32 lies outside the lesion)
    _write_csv(detections / "tumour_a.csv", [[0.9, 20 * 32, 20 * 32], [0.5, 30 * 32, 30 * 32], [0.7, 70 * 32, 10]])
    _write_csv(detections / "tumour_b.csv", [])  # the detector found nothing there
    _write_csv(detections / "normal_c.csv", [[0.6, 100, 100]])
    return masks, detections


def _expected_froc() -> dict:
    """Slides 3, lesions 2 (tumour_a found at 0.9, tumour_b missed). FPs 0.7, 0.6.
    Curve: (0,0) (0,1/2)@0.9 (1/3,1/2)@0.7 (2/3,1/2)@0.6 (2/3,1/2)@0.5 -> sensitivity 1/2 at every rate."""
    return {"froc": 0.5, "sensitivity": {k: 0.5 for k in ("0.25", "0.5", "1", "2", "4", "8")},
            "n_slides": 3, "n_lesions": 2, "n_itc": 0, "excluded_slides": []}


def test_froc_command(froc_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    masks, detections = froc_dirs
    result = froc_command(masks, detections, tmp_path / "out" / "result.json")
    assert result == _expected_froc()
    assert json.loads((tmp_path / "out" / "result.json").read_text()) == result


def test_froc_mask_downsample_and_mpp_are_used(froc_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    masks, detections = froc_dirs
    # Read at downsample 16 from 0.243 um/px, the 40 px squares are 155 um wide (+ 75 um growth < 275 um): ITC only.
    with pytest.raises(InputError, match="isolated tumour cells"):
        froc_command(masks, detections, tmp_path / "r.json", level0_mpp=0.243, mask_downsample=16)
    # From 0.5 um/px at downsample 16 they are 320 um wide again: lesions. The 0.5 hit now falls at mask pixel 60,
    # outside the lesion: a third FP, which changes no sensitivity (1/2 throughout).
    result = froc_command(masks, detections, tmp_path / "r.json", level0_mpp=0.5, mask_downsample=16)
    assert result == _expected_froc()


def test_froc_leaves_out_the_organisers_excluded_slides(froc_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    """The Camelyon16 test set ships test_049.tif; the organisers left Test_049 and Test_114 out. A normal
    'test_049' with two FPs at 0.95 and 0.8 would, if counted, give 2 FP above the lesion's 0.9 hit among 4 slides."""
    masks, detections = froc_dirs
    _write_csv(detections / "test_049.csv", [[0.95, 100, 100], [0.8, 200, 200]])
    # Default: left out (names compared without case), and the result says so; same numbers as without the file.
    result = froc_command(masks, detections, tmp_path / "r.json")
    assert result == {**_expected_froc(), "excluded_slides": ["test_049"]}
    # No exclusion: 4 slides, FPs 0.95, 0.8, 0.7, 0.6; the lesion (0.9) is found after 1 FP (1/4 FP per slide):
    # sensitivity 0 at 1/4 FP per slide would be interpolated... the curve: (0,0) (1/4,0)@0.95 (1/4,1/2)@0.9
    # (1/2,1/2)@0.8 ... so 1/2 at every rate from 1/4 on (the highest sensitivity at a shared rate counts).
    counted = froc_command(masks, detections, tmp_path / "r.json", exclude_slides="")
    assert counted["n_slides"] == 4 and counted["excluded_slides"] == []
    assert counted["sensitivity"]["0.25"] == 0.5
    # An exclusion list of the user's own, as a comma-separated string (the command line's form).
    own = froc_command(masks, detections, tmp_path / "r.json", exclude_slides="normal_c, TEST_049")
    assert own["excluded_slides"] == ["normal_c", "test_049"] and own["n_slides"] == 2
    assert own["froc"] == 0.5  # tumour_a's FP at 0.7 is 1/2 FP per slide; the lesion at 0.9 comes first


def test_mitosis_f1_command_greedy_matching(tmp_path: Path) -> None:
    """Radius 10, mitoses at x=0 and x=15; detections in file order d1 x=7.6 (nearest B: 7.4 < 7.6), d2 x=22.
    Greedy (the challenge scorers'): d1-B, d2 finds no free mitosis within 10 -> TP 1, FP 1, FN 1; optimal: 2 TP."""
    truth, detections = tmp_path / "truth", tmp_path / "det"
    truth.mkdir()
    detections.mkdir()
    _write_csv(truth / "img.csv", [[0, 0], [15, 0]])
    _write_csv(detections / "img.csv", [[7.6, 0, 0.9], [22, 0, 0.8]])
    greedy = mitosis_f1_command(truth, detections, tmp_path / "f1.json", radius_px=10, matching="greedy")
    assert (greedy["tp"], greedy["fp"], greedy["fn"], greedy["matching"]) == (1, 1, 1, "greedy")
    assert greedy["f1"] == pytest.approx(0.5)
    optimal = mitosis_f1_command(truth, detections, tmp_path / "f1.json", radius_px=10)
    assert (optimal["tp"], optimal["fp"], optimal["fn"]) == (2, 0, 0)
    with pytest.raises(ValueError, match="matching must be one of optimal, greedy"):
        mitosis_f1_command(truth, detections, tmp_path / "f1.json", matching="hungarian")


def test_froc_malformed_csv_names_file_and_line(froc_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    masks, detections = froc_dirs
    (detections / "normal_c.csv").write_text("0.5,1,2\n0.4,abc,3\n")
    with pytest.raises(InputError, match=r"normal_c\.csv, line 2"):
        froc_command(masks, detections, tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


def test_froc_names_that_differ_in_case_are_an_error(froc_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    masks, detections = froc_dirs
    # Tumor_001.png and tumor_001.csv: the CSV would score as a normal slide and the lesion as missed.
    (masks / "tumour_a.png").rename(masks / "Tumour_A.png")
    with pytest.raises(InputError, match=rf"Tumour_A\.png: no file 'Tumour_A' with the same stem in {detections} "
                                         r"\(tumour_a\.csv differs only in case: names must match exactly\)"):
        froc_command(masks, detections, tmp_path / "r.json")
    (masks / "Tumour_A.png").rename(masks / "tumour_a.png")
    (detections / "tumour_b.csv").unlink()  # a mask without detections is an error, not a slide without any
    with pytest.raises(InputError, match=rf"tumour_b\.tif: no file 'tumour_b' with the same stem in {detections} "
                                         r"\(files there without a partner: normal_c\.csv\)$"):
        froc_command(masks, detections, tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


def test_froc_probability_outside_unit_range(froc_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    masks, detections = froc_dirs
    (detections / "normal_c.csv").write_text("0.5,1,2\n100,200,0.5\n")  # an 'x,y,score' row
    with pytest.raises(InputError, match=r"normal_c\.csv, line 2: probability 100 in '100,200,0.5' is outside "
                                         r"\[0, 1\]"):
        froc_command(masks, detections, tmp_path / "r.json")


def test_froc_mask_that_is_not_an_image(froc_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    masks, detections = froc_dirs
    (masks / "broken.png").write_bytes(b"not a png at all")
    _write_csv(detections / "broken.csv", [])
    with pytest.raises(InputError, match=r"broken\.png: not a readable image"):
        froc_command(masks, detections, tmp_path / "r.json")


def test_mitosis_f1_command(tmp_path: Path) -> None:
    truth, detections = tmp_path / "truth", tmp_path / "det"
    truth.mkdir()
    detections.mkdir()
    _write_csv(truth / "img1.csv", [[100, 100], [300, 300]])
    _write_csv(detections / "img1.csv", [[110, 100, 0.9], [600, 600, 0.4]])
    _write_csv(truth / "img2.csv", [])  # an image with no mitoses
    _write_csv(detections / "img2.csv", [[5, 5, 0.8]])
    result = mitosis_f1_command(truth, detections, tmp_path / "f1.json", radius_px=30)
    assert result == {"precision": pytest.approx(1 / 3), "recall": 0.5, "f1": pytest.approx(0.4),
                      "tp": 1, "fp": 2, "fn": 1, "matching": "optimal"}
    thresholded = mitosis_f1_command(truth, detections, tmp_path / "f1.json", radius_px=30, score_threshold=0.85)
    assert (thresholded["tp"], thresholded["fp"], thresholded["fn"]) == (1, 0, 1)


def test_mitosis_f1_mismatched_stems_and_bad_rows(tmp_path: Path) -> None:
    truth, detections = tmp_path / "truth", tmp_path / "det"
    truth.mkdir()
    detections.mkdir()
    _write_csv(truth / "img1.csv", [[1, 1]])
    _write_csv(detections / "img9.csv", [[1, 1, 0.5]])
    with pytest.raises(InputError, match=rf"img9\.csv: no ground truth 'img9' with the same stem in {truth} \(files "
                                         r"there without a partner: img1\.csv\)"):
        mitosis_f1_command(truth, detections, tmp_path / "f1.json")
    (detections / "img9.csv").unlink()
    (detections / "img1.csv").write_text("1,1,0.5\n2,two,0.5\n")
    with pytest.raises(InputError, match=r"img1\.csv, line 2"):
        mitosis_f1_command(truth, detections, tmp_path / "f1.json")
    (detections / "img1.csv").write_text("1,1\n")
    with pytest.raises(InputError, match="x,y,score"):
        mitosis_f1_command(truth, detections, tmp_path / "f1.json")


def test_mitosis_f1_refuses_camelyon_order_and_scores_above_one(tmp_path: Path) -> None:
    truth, detections = tmp_path / "truth", tmp_path / "det"
    truth.mkdir()
    detections.mkdir()
    _write_csv(truth / "img1.csv", [[10, 500]])
    _write_csv(detections / "img1.csv", [[0.9, 10, 500]])  # probability,x,y: read as x=0.9, y=10, score=500
    with pytest.raises(InputError, match=r"img1\.csv: detection 1 \(x=0\.9, y=10, score=500\): the score is not a "
                                         r"probability in \[0, 1\]; rows must be 'x,y,score'; these look like "
                                         r"Camelyon16 'probability,x,y' rows"):
        mitosis_f1_command(truth, detections, tmp_path / "f1.json")
    _write_csv(detections / "img1.csv", [[10, 500, 1.5]])
    with pytest.raises(InputError, match=r"score=1\.5\): the score is not a probability in \[0, 1\]; rows must be "
                                         r"'x,y,score'$"):
        mitosis_f1_command(truth, detections, tmp_path / "f1.json")
    _write_csv(detections / "img1.csv", [[10, 500, 0.5]])
    with pytest.raises(ValueError, match=r"score_threshold must be a probability in \[0, 1\], got 2"):
        mitosis_f1_command(truth, detections, tmp_path / "f1.json", score_threshold=2)
    assert not (tmp_path / "f1.json").exists()


def test_mitosis_f1_with_nothing_to_find_and_nothing_found_is_undefined(tmp_path: Path) -> None:
    from pathbundles.metrics.mitosis import UndefinedMetricWarning

    truth, detections = tmp_path / "truth", tmp_path / "det"
    truth.mkdir()
    detections.mkdir()
    _write_csv(truth / "img1.csv", [])
    _write_csv(detections / "img1.csv", [])
    with pytest.warns(UndefinedMetricWarning, match="no ground-truth mitosis and no detection"):
        result = mitosis_f1_command(truth, detections, tmp_path / "f1.json")
    assert result == {"precision": 1.0, "recall": 1.0, "f1": None, "tp": 0, "fp": 0, "fn": 0,
                      "f1_undefined": "undefined: no ground-truth mitosis and no detection (F1 = 0 / 0)",
                      "matching": "optimal"}
    assert json.loads((tmp_path / "f1.json").read_text()) == result


def _iou_dirs(tmp_path: Path) -> tuple[Path, Path]:
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    truth.mkdir()
    pred.mkdir()
    Image.fromarray(np.array([[0, 1, 1, 2], [0, 1, 2, 2], [0, 0, 3, 3]], dtype=np.uint8)).save(truth / "a.png")
    Image.fromarray(np.array([[2, 1, 2, 2], [3, 1, 2, 0], [1, 1, 3, 1]], dtype=np.uint8)).save(pred / "a.png")
    return truth, pred


def test_iou_command(tmp_path: Path) -> None:
    truth, pred = _iou_dirs(tmp_path)
    result = iou_command(truth, pred, tmp_path / "iou.json", num_classes=4)
    # Same hand case as test_metrics_other; class 4 appears nowhere: null, left out of the mean.
    assert result["iou"] == {"1": 0.5, "2": 0.5, "3": 0.5, "4": None}
    assert result["mean_iou"] == pytest.approx(0.5)
    assert result["recall"]["1"] == pytest.approx(2 / 3) and result["precision"]["3"] == 1.0
    assert json.loads((tmp_path / "iou.json").read_text()) == result


def test_iou_shape_mismatch_and_missing_partner(tmp_path: Path) -> None:
    truth, pred = _iou_dirs(tmp_path)
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(pred / "a.png")
    with pytest.raises(InputError, match=r"a\.png: shape"):
        iou_command(truth, pred, tmp_path / "iou.json", num_classes=3)
    Image.fromarray(np.zeros((3, 4), dtype=np.uint8)).save(truth / "b.png")
    with pytest.raises(InputError, match=r"b\.png: no file 'b'"):
        iou_command(truth, pred, tmp_path / "iou.json", num_classes=3)


def test_command_line(froc_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    if not (REPO / "common" / "pathbundles" / "__main__.py").exists():
        pytest.skip("python -m pathbundles is not wired yet")
    masks, detections = froc_dirs
    env = {**os.environ, "PYTHONPATH": str(REPO / "common")}
    out = tmp_path / "cli.json"
    run = subprocess.run([sys.executable, "-m", "pathbundles", "froc", "--masks", str(masks), "--detections",
                          str(detections), "--level0_mpp", "0.243", "--mask_downsample", "32", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(out.read_text()) == _expected_froc()
    # The exclusion list from the command line: comma-separated names.
    run = subprocess.run([sys.executable, "-m", "pathbundles", "froc", "--masks", str(masks), "--detections",
                          str(detections), "--exclude_slides", "normal_c,Test_049", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(out.read_text())["excluded_slides"] == ["normal_c"]
    seg = tmp_path / "seg"
    seg.mkdir()
    truth, pred = _iou_dirs(seg)
    run = subprocess.run([sys.executable, "-m", "pathbundles", "iou", "--truth", str(truth), "--pred", str(pred),
                          "--num_classes", "3", "--out", str(tmp_path / "iou.json")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "iou.json").read_text())["mean_iou"] == pytest.approx(0.5)
    # mitosis_f1, and a malformed row reported with its file and line.
    mitosis_truth, mitosis_det = tmp_path / "mt", tmp_path / "md"
    mitosis_truth.mkdir()
    mitosis_det.mkdir()
    _write_csv(mitosis_truth / "hpf.csv", [[10, 10]])
    (mitosis_det / "hpf.csv").write_text("12,10,0.9\n50,50,x\n")
    command = [sys.executable, "-m", "pathbundles", "mitosis_f1", "--truth", str(mitosis_truth), "--detections",
               str(mitosis_det), "--radius_px", "30", "--score_threshold", "0.0", "--out", str(tmp_path / "f1.json")]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2 and "hpf.csv, line 2" in run.stderr and "Traceback" not in run.stderr
    (mitosis_det / "hpf.csv").write_text("12,10,0.9\n50,50,0.2\n")
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "f1.json").read_text()) == {"precision": 0.5, "recall": 1.0,
                                                              "f1": pytest.approx(2 / 3), "tp": 1, "fp": 1, "fn": 0,
                                                              "matching": "optimal"}
    run = subprocess.run(command[:-2] + ["--matching", "greedy", *command[-2:]], capture_output=True, text=True,
                         env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "f1.json").read_text())["matching"] == "greedy"
    # An undefined F1 is said in the JSON and warned about by name; a threshold off [0, 1] is one line, exit 2.
    (mitosis_truth / "hpf.csv").write_text("")
    (mitosis_det / "hpf.csv").write_text("")
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["f1"] is None and "f1_undefined" in json.loads(run.stdout)
    assert "UndefinedMetricWarning" in run.stderr
    run = subprocess.run(command[:-4] + ["--score_threshold", "2", *command[-2:]], capture_output=True, text=True,
                         env=env, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip() == "pathbundles: error: score_threshold must be a probability in [0, 1], got 2"


def test_bundle_config_can_run_a_command(froc_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    """An evaluate.json can call the command through MONAI's config parser."""
    from monai.bundle import ConfigParser

    masks, detections = froc_dirs
    parser = ConfigParser({"froc": {"_target_": "pathbundles.metrics.commands.froc_command", "masks": str(masks),
                                    "detections": str(detections), "out": str(tmp_path / "bundle.json"),
                                    "level0_mpp": 0.243, "mask_downsample": 32}})
    assert parser.get_parsed_content("froc") == _expected_froc()
