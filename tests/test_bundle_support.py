"""Helpers that bundle configs call: bundle root from --config_file, datalists, user tissue masks for ROI plans."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pathbundles.bundle import datalist, root_of_running_bundle
from pathbundles.errors import InputError


@pytest.mark.parametrize("argv", [
    ["monai.bundle", "run", "--config_file", "{root}/configs/inference.json"],
    ["monai.bundle", "run", "--config_file={root}/configs/inference.json"],
    ["monai.bundle", "run", "--config_file", "['{root}/configs/inference.json','{root}/configs/evaluate.json']"],
])
def test_root_of_running_bundle(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, argv: list[str]) -> None:
    root = tmp_path / "bundles" / "scannet"
    monkeypatch.setattr(sys, "argv", [a.format(root=root) for a in argv])
    assert root_of_running_bundle() == str(root.resolve())


SCANNET = Path(__file__).resolve().parents[1] / "bundles" / "scannet"


@pytest.mark.parametrize("value", [
    "['{override}','{bundle}/configs/inference.json']",  # a Python list, the override first
    "{override},{bundle}/configs/inference.json",  # MONAI's comma form
    "{override}, {bundle}/configs/inference.json,{other}/configs/evaluate.json",
])
def test_root_of_running_bundle_is_the_bundle_of_a_list_that_starts_with_an_override(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str) -> None:
    """An override file kept outside the bundle, given first, made bundle_root its own folder (no weights there)."""
    override = tmp_path / "site" / "override.json"
    other = tmp_path / "elsewhere"  # a configs/ folder without metadata.json: not a bundle, so not chosen
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["monai.bundle", "run", "--config_file",
                                      value.format(override=override, bundle=SCANNET, other=other)])
    assert root_of_running_bundle() == str(SCANNET.resolve())
    # Relative to the working directory, as a user types it.
    monkeypatch.chdir(SCANNET.parent.parent)
    monkeypatch.setattr(sys, "argv", ["monai.bundle", "run", f"--config_file=['{override}',"
                                      "'bundles/scannet/configs/inference.json']"])
    assert root_of_running_bundle() == str(SCANNET.resolve())


def test_root_of_running_bundle_names_the_files_when_none_is_in_a_bundle(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    from pathbundles.errors import SettingError

    monkeypatch.setattr(sys, "argv", ["monai.bundle", "run", "--config_file",
                                      f"['{tmp_path / 'a.json'}','{tmp_path / 'b.json'}']"])
    with pytest.raises(SettingError) as caught:
        root_of_running_bundle()
    message = str(caught.value)
    assert message.startswith(f"--config_file ['{tmp_path / 'a.json'}', '{tmp_path / 'b.json'}']: no file lies "
                              "in a bundle's configs/ folder")
    assert "--bundle_root" in message


@pytest.mark.parametrize("value, files", [
    ("a/inference.json", ["a/inference.json"]),
    ("a/site.json,a/inference.json", ["a/site.json", "a/inference.json"]),
    ("a/site.json, a/inference.json,", ["a/site.json", "a/inference.json"]),  # spaces and a trailing comma
    ("['a/site.json', 'a/inference.json']", ["a/site.json", "a/inference.json"]),
    ("'a/inference.json'", ["a/inference.json"]),
])
def test_config_file_list_forms(value: str, files: list[str]) -> None:
    """One parser for --config_file serves the bundle root and the cohort overlay's per-slide runs."""
    from pathbundles.bundle import config_file_list

    assert config_file_list(value) == files


def test_root_defaults_without_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "argv", ["x"])
    assert root_of_running_bundle(tmp_path) == str(tmp_path.resolve())


def test_datalist_from_folder_and_json(tmp_path: Path) -> None:
    for name in ["b.svs", "a.tif", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    items = datalist(tmp_path)
    assert [Path(i["image"]).name for i in items] == ["a.tif", "b.svs"]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.json").write_text(json.dumps({"items": [{"image": "../a.tif", "label": 1,
                                                                     "annotation": "x.xml"}]}))
    (item,) = datalist(tmp_path / "sub" / "d.json")
    assert item["image"] == str((tmp_path / "a.tif").resolve()) and item["label"] == 1
    assert item["annotation"] == str((tmp_path / "sub" / "x.xml").resolve())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no slide files"):
        datalist(empty)


def test_split_fields_give_disjoint_train_and_validation_sets(tmp_path: Path) -> None:
    """One dataset.json with split fields, given as both train_source and val_source, trains and validates on
    different slides (split= used to be ignored for user datalists: both got every item, and the checkpoint was
    selected on training slides); a file without split fields is used whole; a half-split file is refused."""
    doc = {"items": [{"image": f"s{i}.tif", "split": split} for i, split in enumerate(["train", "train", "val",
                                                                                    "test", "train", "val"])]}
    (tmp_path / "d.json").write_text(json.dumps(doc))
    train = [Path(i["image"]).name for i in datalist(tmp_path / "d.json", split="train")]
    val = [Path(i["image"]).name for i in datalist(tmp_path / "d.json", split="val")]
    assert train == ["s0.tif", "s1.tif", "s4.tif"] and val == ["s2.tif", "s5.tif"] and not set(train) & set(val)
    assert [Path(i["image"]).name for i in datalist(tmp_path / "d.json", split="test")] == ["s3.tif"]
    with pytest.raises(InputError, match=r"no item of split 'tune'; the file has splits \['test', 'train', 'val'\]"):
        datalist(tmp_path / "d.json", split="tune")
    (tmp_path / "plain.json").write_text(json.dumps({"items": [{"image": "a.tif"}, {"image": "b.tif"}]}))
    assert len(datalist(tmp_path / "plain.json", split="val")) == 2  # a file per split
    doc["items"][3].pop("split")
    (tmp_path / "half.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match=r"half\.json: items \[3\] have no 'split' while others have one"):
        datalist(tmp_path / "half.json", split="train")


@pytest.mark.parametrize("doc, problem", [
    ({"items": []}, "the datalist lists no items"),
    ([], "the datalist lists no items"),
    ({"items": "abc"}, "the items must be a JSON list, not str"),  # it became the three slides a, b and c
    ("abc.tif", "the items must be a JSON list, not str"),
    ({"slides": [{"image": "a.tif"}]}, "no 'items' list (keys: slides)"),
    ({"items": [{"image": "a.tif"}, {"label": 1}]}, "item 1: no 'image' path (keys: label)"),
    ({"items": [{"image": ""}]}, "item 0: 'image' must be a non-empty path, got ''"),
    ({"items": [{"image": ["a.tif"]}]}, "item 0: 'image' must be a non-empty path, got ['a.tif']"),
    ({"items": ["a.tif", 7]}, "item 1: expected an image path or an object with 'image', got int"),
    ({"items": [{"image": "a.tif", "name": 3}]}, "item 0: 'name' must be a string, got int"),
    # Path fields of other types raised TypeError (a traceback) when the paths were made absolute.
    ({"items": [{"image": "a.tif", "annotation": 5}]}, "item 0: 'annotation' must be a file path, got int"),
    ({"items": ["a.tif", {"image": "b.tif", "mask": ["m.png"]}]}, "item 1: 'mask' must be a file path, got list"),
    ({"items": [{"image": "a.tif", "labels": {"$x": 1}}]}, "item 0: 'labels' must be a file path, got dict"),
])
def test_a_malformed_datalist_is_refused_naming_the_file_and_the_item(tmp_path: Path, doc: object,
                                                                      problem: str) -> None:
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(InputError) as caught:
        datalist(path)
    assert str(caught.value) == f"{path}: {problem}"


def test_a_datalist_nested_too_deeply_is_refused_naming_the_file(tmp_path: Path) -> None:
    """json.loads raised RecursionError, which read_datalist did not turn into an InputError: a traceback."""
    path = tmp_path / "deep.json"
    path.write_text('{"items": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(InputError) as caught:
        datalist(path)
    assert str(caught.value) == f"{path}: cannot read the datalist: its JSON is nested too deeply"


def test_unreadable_entries_are_listed_for_the_run_to_fail_one_by_one(tmp_path: Path) -> None:
    """A symlink loop or a broken link in a slide folder or datalist aborted listing (RuntimeError from resolve())
    before any slide ran; now each is listed as it is, and hidden files (macOS '._' forks) are left out."""
    (tmp_path / "a.tif").write_bytes(b"")
    (tmp_path / "loop.tif").symlink_to(tmp_path / "loop.tif")
    (tmp_path / "broken.svs").symlink_to(tmp_path / "gone.svs")
    (tmp_path / "linked.tif").symlink_to(tmp_path / "a.tif")
    (tmp_path / "._a.tif").write_bytes(b"\0")
    names = ["a.tif", "broken.svs", "linked.tif", "loop.tif"]
    assert [i["image"] for i in datalist(tmp_path)] == [str(tmp_path / n) for n in names]  # links keep their name
    (tmp_path / "dataset.json").write_text(json.dumps({"items": [{"image": n} for n in names]}))
    assert [i["image"] for i in datalist(tmp_path / "dataset.json")] == [str(tmp_path / n) for n in names]


def test_user_tissue_mask_selects_the_rois(tmp_path: Path) -> None:
    """With tissue_mask_key, ROIs come from the user's mask (here: only the left half), not from Otsu."""
    from pathbundles.scannet import ScanGeometry
    from pathbundles.slide_inference import plan_slides
    from pathbundles.writers import write_pyramid_tiff

    slide = np.full((1024, 1024, 3), 245, np.uint8)  # glass ...
    slide[64:-64, 64:-64] = (190, 100, 170)  # ... around tissue that reaches into every 256 px ROI
    write_pyramid_tiff(tmp_path / "s.tif", slide, mpp=0.5, compression="deflate")
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    grid = ScanGeometry(lp=8).grid()  # ROI stride 256 px at 0.5 um/px = 256 level-0 px
    item = {"image": str(tmp_path / "s.tif"), "tissue": str(tmp_path / "m.png")}
    (otsu,) = plan_slides([item], grid, scan_mpp=0.5, backend="tifffile")
    (user,) = plan_slides([item], grid, scan_mpp=0.5, backend="tifffile", tissue_mask_key="tissue")
    assert otsu.n_rois == 16
    # ROI columns 0 and 1 start in the left half; ROI c=1 reads 468 px from x=256, still inside the left half
    # only up to x=512, so columns 0-1 overlap the mask and columns 2-3 do not.
    assert sorted({int(c) for _, c in user.rois_rc}) == [0, 1] and user.n_rois == 8


def test_root_from_a_config_workflow_run_in_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Bundles run from Python (no --config_file in argv) find their root through MONAI's ConfigWorkflow."""
    from monai.bundle import ConfigWorkflow

    configs = tmp_path / "copied_bundle" / "configs"
    configs.mkdir(parents=True)
    (configs / "inference.json").write_text(json.dumps({
        "imports": ["$import pathbundles"],
        "bundle_root": "$pathbundles.bundle.root_of_running_bundle()",
        "initialize": [], "run": ["$@bundle_root"], "finalize": []}))
    monkeypatch.setattr(sys, "argv", ["pytest"])
    monkeypatch.chdir(tmp_path)
    workflow = ConfigWorkflow(config_file=str(configs / "inference.json"), workflow_type="infer",
                              meta_file=None, logging_file=False)
    workflow.initialize()
    assert workflow.run() == [str((tmp_path / "copied_bundle").resolve())]


def test_map_writer_restricts_the_map_to_tissue(tmp_path: Path) -> None:
    """tissue_only zeroes every map pixel whose centre lies outside the tissue mask that chose the ROIs."""
    import tifffile

    from pathbundles.scannet import ScanGeometry
    from pathbundles.slide_inference import SlideMapWriter, SlideROIDataset
    from pathbundles.writers import write_pyramid_tiff

    slide = np.full((1024, 1024, 3), 245, np.uint8)
    slide[64:-64, 64:-64] = (190, 100, 170)
    write_pyramid_tiff(tmp_path / "s.tif", slide, mpp=0.5, compression="deflate")
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255  # tissue = the left half, x < 512 level-0 px
    Image.fromarray(mask).save(tmp_path / "m.png")
    grid = ScanGeometry(lp=8).grid()  # map pixel k centred on 122 + 32 k scan px = level-0 px at 0.5 um/px
    item = {"image": str(tmp_path / "s.tif"), "tissue": str(tmp_path / "m.png")}
    dataset = SlideROIDataset([item], grid, scan_mpp=0.5, backend="tifffile", tissue_mask_key="tissue")
    found = []
    writer = SlideMapWriter(dataset, str(tmp_path / "out"), tissue_only=True,
                            detect=lambda prob, *args, **kwargs: found.append(prob.copy()) or np.zeros((0, 3)))
    plan = dataset.plans[0]
    writer._write_slide(plan, np.ones(plan.map_shape, np.float32))
    expected = np.zeros(plan.map_shape, np.float32)
    expected[:29, :13] = 1.0  # centres 122 + 32 k: columns k <= 12 are < 512, rows k <= 28 are < 1024
    np.testing.assert_array_equal(found[0], expected)
    # The TIFF is registered to the slide: its pixel j covers scan px [32 j, 32 j + 32), i.e. the network's map
    # read (bilinearly, 0 beyond it) at j + 0.5 - 122 / 32 = j - 3.3125.
    written = tifffile.imread(tmp_path / "out" / "maps" / "s.tif", level=0)
    assert (written == written[..., :1]).all()  # stored R = G = B (for TIAToolbox)
    written = written[..., 0]
    rows, cols = np.indices(written.shape, dtype=np.float64) - 3.3125
    from scipy import ndimage

    registered = ndimage.map_coordinates(expected, [rows, cols], order=1, mode="grid-constant", cval=0.0)
    np.testing.assert_array_equal(written, np.rint(registered * 255).astype(np.uint8))
    # Physically: the tissue edge at level-0 x = 512 is where the written row crosses one half, within half a map px.
    row = written[10].astype(float) / 255
    i = np.flatnonzero(row >= 0.5)[-1]
    crossing = i + (row[i] - 0.5) / (row[i] - row[i + 1])  # pixel index, centres at integers
    assert abs((crossing + 0.5) * 32 - 512) <= 16
    assert writer.scores["s"] == (1.0, 0)


def test_map_writer_completes_a_run_that_never_started(tmp_path: Path) -> None:
    """ensure_completed writes a run whose loader was empty (no event fired) once, and never a completed run again."""
    import tifffile

    from pathbundles.scannet import ScanGeometry
    from pathbundles.slide_inference import SlideMapWriter, SlideROIDataset
    from pathbundles.writers import write_pyramid_tiff

    write_pyramid_tiff(tmp_path / "glass.tif", np.full((1024, 1024, 3), 245, np.uint8), mpp=0.5,
                       compression="deflate")
    dataset = SlideROIDataset([{"image": str(tmp_path / "glass.tif")}], ScanGeometry(lp=8).grid(), scan_mpp=0.5,
                              backend="tifffile")
    assert len(dataset) == 0  # no tissue, no ROI: the evaluator would get no batch
    out = tmp_path / "out"
    writer = SlideMapWriter(dataset, str(out), detect=lambda *args, **kwargs: np.zeros((0, 3)))
    writer.ensure_completed()
    assert (out / "slide_scores.csv").read_text() == "name,score,n_detections\nglass,0.000000,0\n"
    level0 = tifffile.imread(out / "maps" / "glass.tif", level=0)
    assert level0.shape == (*dataset.plans[0].map_shape, 3) and not level0.any()
    (out / "slide_scores.csv").unlink()
    writer.ensure_completed()  # already completed: nothing is written again
    assert not (out / "slide_scores.csv").exists()
    writer.started()  # a second run through the events completes itself; ensure_completed then does nothing
    writer.completed()
    (out / "slide_scores.csv").unlink()
    writer.ensure_completed()
    assert not (out / "slide_scores.csv").exists()


def test_failed_slides_end_the_run_after_the_engine_not_inside_it(tmp_path: Path) -> None:
    """The writer raised the failed slides from its end-of-epoch handler, so MONAI's StatsHandler logged the error
    with a traceback and the process ended in MONAI's traceback. The engine's end of epoch now completes the run,
    and ensure_completed (the config's run list) raises SlidesFailedError, which exit_on_bad_input prints as one
    line."""
    from pathbundles.errors import PathBundlesError, SlidesFailedError
    from pathbundles.scannet import ScanGeometry
    from pathbundles.slide_inference import SlideMapWriter, SlideROIDataset
    from pathbundles.writers import write_pyramid_tiff

    write_pyramid_tiff(tmp_path / "glass.tif", np.full((1024, 1024, 3), 245, np.uint8), mpp=0.5,
                       compression="deflate")
    items = [{"image": str(tmp_path / "glass.tif")}, {"image": str(tmp_path / "gone.tif")}]
    dataset = SlideROIDataset(items, ScanGeometry(lp=8).grid(), scan_mpp=0.5, backend="tifffile")
    writer = SlideMapWriter(dataset, str(tmp_path / "out"), detect=lambda *args, **kwargs: np.zeros((0, 3)))
    writer.started()
    writer.completed()  # the engine's EPOCH_COMPLETED: the others are written, nothing is raised
    assert (tmp_path / "out" / "maps" / "glass.tif").is_file() and list(writer.failed) == ["gone"]
    for _ in range(2):  # the run list, then bundle_runner's own call
        with pytest.raises(SlidesFailedError, match=rf"^1 slide\(s\) failed, the others were written: gone: "
                                                    rf"{tmp_path / 'gone.tif'}: file does not exist$") as caught:
            writer.ensure_completed()
        assert isinstance(caught.value, PathBundlesError) and isinstance(caught.value, RuntimeError)


def test_config_error_cause_unwraps_monai_expression_errors() -> None:
    from pathbundles.bundle_runner import config_error_cause
    from pathbundles.errors import InputError

    cause = InputError("/data/s.tif", "truncated")
    try:
        try:
            raise cause
        except InputError as inner:
            raise RuntimeError('Failed to evaluate ConfigExpression: \n"$@evaluator.run()"') from inner
    except RuntimeError as outer:
        wrapped = outer
    assert config_error_cause(wrapped) is cause
    plain = RuntimeError("1 slide(s) failed, the others were written: s: truncated")
    assert config_error_cause(plain) is plain


@pytest.mark.parametrize("raised, status, last_line", [
    # A pathbundles error behind MONAI's wrapper: one line, status 2.
    ("raise RuntimeError('Failed to evaluate ConfigExpression: ...') from InputError('/d/list.json', 'bad\\nrow')",
     2, "pathbundles: error: /d/list.json: bad row"),
    ("raise SettingError('detection_threshold must be a probability in [0, 1], got 2')",
     2, "pathbundles: error: detection_threshold must be a probability in [0, 1], got 2"),
    ("raise RuntimeError('Failed to evaluate ConfigExpression: ...') from SlidesFailedError('1 slide(s) failed, "
     "the others were written: s: /d/s.tif: file does not exist')",
     2, "pathbundles: error: 1 slide(s) failed, the others were written: s: /d/s.tif: file does not exist"),
    # Anything else keeps Python's traceback and status 1; behind MONAI's wrapper, the last line names it.
    ("raise KeyError('other')", 1, "KeyError: 'other'"),
    ("raise RuntimeError('Failed to evaluate ConfigExpression: ...') from FileNotFoundError(2, 'No such file', "
     "'/d/w.pt')", 1, "pathbundles: error: the run failed with FileNotFoundError: [Errno 2] No such file: '/d/w.pt' "
                      "(the traceback above shows where)"),
])
def test_exit_on_bad_input_gives_one_line_and_status_2(raised: str, status: int, last_line: str) -> None:
    import subprocess

    code = ("import pathbundles.bundle as b\nfrom pathbundles.errors import InputError, SettingError, "
            "SlidesFailedError\n"
            f"b.exit_on_bad_input()\nb.exit_on_bad_input()\n{raised}\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == status
    assert run.stderr.strip().splitlines()[-1] == last_line
    assert ("Traceback" in run.stderr) == (status == 1)
    if status == 2:
        assert run.stderr.strip() == last_line


def _no_mpp_slide(path: Path) -> Path:
    """A 1024 px tiled TIFF whose file states no resolution, like a Camelyon16 level saved alone."""
    import tifffile

    rng = np.random.default_rng(0)
    tifffile.imwrite(path, rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8), tile=(256, 256),
                     photometric="rgb", compression="zlib")
    return path


def test_slide_mpp_and_item_mpp_reach_every_slide_dataset(tmp_path: Path) -> None:
    """The bundles' slide_mpp key (mpp_override) and a datalist item's own mpp (which wins) open slides whose files
    state no mpp, in the inference planner, the training samplers and the multi-magnification and HPF datasets."""
    from pathbundles.hpf import HPFDataset
    from pathbundles.multimag import MultiMagnificationDataset
    from pathbundles.sampling import locate
    from pathbundles.scannet import ScanGeometry
    from pathbundles.slide_inference import plan_slides

    slide = str(_no_mpp_slide(tmp_path / "no_mpp.tif"))
    grid = ScanGeometry(lp=8).grid()
    (bare,) = plan_slides([{"image": slide}], grid, scan_mpp=1.0, backend="tifffile")
    assert "states no resolution" in bare.error and "slide_mpp" in bare.error
    run_wide, own = plan_slides([{"image": slide}, {"image": slide, "mpp": 0.5, "name": "own_mpp"}], grid,
                                scan_mpp=1.0, backend="tifffile", mpp_override=0.25)
    assert (run_wide.error, run_wide.level0_mpp, own.error, own.level0_mpp) == (None, 0.25, None, 0.5)
    assert [s.level0_mpp for s in locate([{"image": slide}, {"image": slide, "mpp": [0.5, 0.5]}],
                                         backend="tifffile", mpp_override=0.25)] == [0.25, 0.5]
    multimag = MultiMagnificationDataset([{"image": slide, "mpp": 0.5}], mode="infer", use_tissue=False,
                                         read_path="levels", backend="tifffile", mpp_override=0.25)
    assert multimag.slides[0].level0_mpp == 0.5 and multimag.slides[0].error == ""
    assert multimag[0]["x20"].shape == (3, 256, 256)
    box = HPFDataset([{"image": slide, "box": [0, 0, 400, 200]}], mpp=0.5, backend="tifffile", mpp_override=0.25)
    assert box.read_image(0).shape == (100, 200, 3)  # 400 x 200 level-0 px at 0.25 um/px, read at 0.5 um/px
    refused = HPFDataset([{"image": slide}], mpp=0.25, mpp_override=0.5)  # left out, for the writer to name
    assert len(refused) == 0 and "the HPF is at 0.5 um/px, the model at 0.25 um/px" in refused.failed[0]


def test_a_hostile_slide_is_refused_at_planning_and_the_others_are_planned(tmp_path: Path) -> None:
    """A header claiming 10^6 x 10^6 px used to make the tissue mask run for days, so the good slides of the run
    got nothing; now it fails at once by name and the run plans the others."""
    from hostile_files import million_px_square
    from pathbundles.scannet import ScanGeometry
    from pathbundles.slide_inference import plan_slides

    hostile = million_px_square(tmp_path)
    good = _no_mpp_slide(tmp_path / "good.tif")
    bad_plan, good_plan = plan_slides([{"image": str(hostile)}, {"image": str(good), "mpp": 0.5}],
                                      ScanGeometry(lp=8).grid(), scan_mpp=1.0, backend="tifffile")
    assert "claims 1000000 x 1000000 px" in bad_plan.error
    assert good_plan.error is None and good_plan.level0_size == (1024, 1024)


def test_every_bundle_dataset_takes_the_slide_mpp_key() -> None:
    """Each bundle's inference and train configs have ``slide_mpp`` (null: the files' own mpp) and hand it to every
    dataset that opens slides."""
    repo = Path(__file__).resolve().parents[1]

    def datasets(node: object) -> list[dict]:
        if isinstance(node, dict):
            own = [node] if str(node.get("_target_", "")).endswith("Dataset") and \
                str(node["_target_"]).startswith("pathbundles.") else []
            return own + [d for v in node.values() for d in datasets(v)]
        if isinstance(node, list):
            return [d for v in node for d in datasets(v)]
        return []

    for bundle in ("scannet", "spatial_lstm", "segmitos", "dmmn"):
        for name in ("inference.json", "train.json"):
            config = json.loads((repo / "bundles" / bundle / "configs" / name).read_text())
            assert config["slide_mpp"] is None, (bundle, name)
            found = datasets(config)
            assert found and all(d.get("mpp_override") == "@slide_mpp" for d in found), (bundle, name)
