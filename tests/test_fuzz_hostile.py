"""Hostile input, all at once (issue 19's closing check): a batch of generated bad slides, datalists and annotation
files (``tests/hostile_files.py``, deterministic) mixed with good phantom slides, through ``pathbundles info``, the
readers and planners in process, one plain scannet bundle run and one cohort run (slow: subprocesses).

Every run must: print no Python traceback, name each bad item (its name and file), write the good items, create,
change or delete nothing outside its output folder (a snapshot of the sandbox with sentinel files, and of the
bundle's own folder, before and after), and leave none of the project's work files (hidden files and folders:
partial atomic writes, pyramid level folders, canvases, the lock, the cohort's work folder) behind.
"""

from __future__ import annotations

import csv
import html
import json
import os
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from bundle_helpers import REPO
from hostile_files import bad_annotation_files, bad_slide_files, malformed_datalists
from pathbundles.errors import AnnotationError, InputError, SlideError

SCANNET = REPO / "bundles" / "scannet"
TRACEBACK = "Traceback (most recent call last)"
#: Text that MONAI's config parser would evaluate ($), resolve (@), expand (%) or instantiate (_target_): put in
#: every field of the mixed datalist, where it must stay text.
CONFIG_TEXT = ["$__import__('os').system('touch PWNED') and 'x'", "@bundle_root", "%configs#version", "_target_"]
#: Bad slide files whose header the auto backend reads (OpenSlide; tifffile for the directory that points back at
#: itself, which OpenSlide refuses), so that ``info`` shows them (without an mpp where the file states none usable).
#: A run fails those without a usable mpp (NO_MPP) and those whose pixels OpenSlide cannot decode (UNDECODABLE); the
#: others (odd sample layouts, an unreadable objective power, that directory) it reads and writes.
HEADER_READABLE = {"no_mpp", "resolution_zero", "aperio_mpp_dash", "aperio_mpp_dot", "aperio_mpp_e", "aperio_mpp_inf",
                   "aperio_appmag_dot", "float_samples", "uint16_samples", "two_samples", "planes_separate",
                   "tiles_of_4gb", "tiles_of_one_byte", "ifd_loop"}
NO_MPP = {"no_mpp", "resolution_zero", "aperio_mpp_dash", "aperio_mpp_dot", "aperio_mpp_e", "aperio_mpp_inf"}
UNDECODABLE = {"float_samples", "tiles_of_4gb", "tiles_of_one_byte"}
#: Datalist items of a good slide whose own ``mpp`` is no usable number.
BAD_MPP = {"mpp_text": "$1", "mpp_nulls": [None, None], "mpp_object": {"_target_": "os.system"}, "mpp_zero": 0,
           "mpp_nan": float("nan"), "mpp_three": [0.5, 0.5, 0.5], "mpp_past_glass": 1e6}


@dataclass
class Fuzz:
    """The sandbox: good slides, bad slide, annotation and datalist files, the mixed datalist, sentinels."""

    root: Path
    slides: dict[str, Path]
    annotations: dict[str, Path]
    datalists: dict[str, Path]
    mixed: Path
    good: dict[str, Path]  # output name -> slide
    bad: set[str]  # output names every run must fail
    items: dict[str, dict]  # output name -> item as written


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory) -> Fuzz:
    from pathbundles.phantom import make_metastasis_dataset

    root = tmp_path_factory.mktemp("fuzz")
    make_metastasis_dataset(root / "good", n=2, seed=7, size_px=1024)
    (root / "good" / "@ref %macro.tif").symlink_to("phantom_normal_001.tif")  # a good slide, config-looking name
    slides = bad_slide_files(root / "slides")
    annotations = bad_annotation_files(root / "annotations")
    datalists = malformed_datalists(root / "lists", root / "good" / "phantom_tumor_000.tif")
    (root / "sentinel.txt").write_text("not the run's\n")
    (root / "x").mkdir()
    (root / "x" / "keep.txt").write_text("a name '../x' must not reach me\n")

    ann = [f"annotations/{p.name}" for p in annotations.values()]
    good = {CONFIG_TEXT[0]: root / "good" / "phantom_tumor_000.tif", "phantom_normal_001": root / "good" /
            "phantom_normal_001.tif", "@ref %macro": root / "good" / "@ref %macro.tif"}
    items = {
        CONFIG_TEXT[0]: {"image": "good/phantom_tumor_000.tif", "name": CONFIG_TEXT[0], "label": CONFIG_TEXT[1],
                         "annotation": ann[0], "mask": CONFIG_TEXT[2], "tissue": CONFIG_TEXT[3],
                         "lesions": CONFIG_TEXT[0]},
        "phantom_normal_001": {"image": "good/phantom_normal_001.tif", "label": 0, "mpp": 0.5, "annotation": ann[1]},
        "@ref %macro": {"image": "good/@ref %macro.tif", "label": "%label", "annotation": CONFIG_TEXT[0],
                        "_target_": "os.system"},
    }
    for k, (name, path) in enumerate(sorted(slides.items())):
        output = f"@{name}" if k % 2 else name  # half of them named by a config-looking name of their own
        items[output] = {"image": f"slides/{path.name}", "label": CONFIG_TEXT[k % 4], "annotation": ann[k % len(ann)],
                         **({"name": output} if k % 2 else {})}
    for name, mpp in BAD_MPP.items():
        items[name] = {"image": "good/phantom_normal_001.tif", "name": name, "mpp": mpp, "label": CONFIG_TEXT[2]}
    mixed = root / "mixed.json"
    mixed.write_text(json.dumps({"items": list(items.values())}))
    readable = HEADER_READABLE - NO_MPP - UNDECODABLE
    bad = {name for name, item in items.items() if name not in good and Path(item["image"]).stem not in readable}
    return Fuzz(root, slides, annotations, datalists, mixed, good, bad, items)


# ---- what every run must leave as it was -------------------------------------------------------------------------


def snapshot(*roots: Path, skip: Path | None = None) -> dict[str, tuple[int, int, int]]:
    """(type, size, mtime) of every entry under ``roots`` (links not followed), leaving out ``skip`` and below."""
    state = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = Path(folder, name)
                if skip is not None and (path == skip or skip in path.parents):
                    continue
                st = os.lstat(path)
                state[str(path)] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return state


def work_files_left(out: Path) -> list[str]:
    """What a run left in its output folder that is not an output: hidden entries (the project's work files,
    lock and work areas all start with '.') and the cohort's manifest fragments."""
    if not out.exists():
        return []
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if p.name.startswith(".") or (p.name == "manifest" and p.is_dir()))


def run_python(fuzz: Fuzz, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python ARGS`` in the sandbox (so that a stray relative write lands where the snapshot sees it)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "common"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], cwd=fuzz.root, capture_output=True, text=True, timeout=timeout,
                          env=env)


def guarded(fuzz: Fuzz, out: Path, *args: str) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` writing into ``out``; assert that nothing else changed and nothing was left in ``out``."""
    out.mkdir()
    before = snapshot(fuzz.root, SCANNET, skip=out)
    result = run_python(fuzz, *args)
    assert snapshot(fuzz.root, SCANNET, skip=out) == before
    assert work_files_left(out) == []
    assert TRACEBACK not in result.stderr, result.stderr[-5000:]
    return result


# ---- in process: readers, planners, datalists (fast) -------------------------------------------------------------


def test_the_batch_is_large_and_deterministic(fuzz: Fuzz, tmp_path: Path) -> None:
    variants = len(fuzz.slides) + len(fuzz.annotations) + len(fuzz.datalists) + len(BAD_MPP)
    assert variants >= 100 and len(fuzz.items) >= 50
    image = fuzz.root / "good" / "phantom_tumor_000.tif"
    for first, again in ((fuzz.slides, bad_slide_files(tmp_path / "slides")),
                         (fuzz.annotations, bad_annotation_files(tmp_path / "annotations")),
                         (fuzz.datalists, malformed_datalists(tmp_path / "lists", image))):
        assert again.keys() == first.keys()
        assert all(p.is_symlink() or not p.is_file() or p.read_bytes() == first[k].read_bytes()
                   for k, p in again.items())


def test_the_tifffile_backend_refuses_each_bad_slide_by_name(fuzz: Fuzz) -> None:
    from pathbundles.scannet import ScanGeometry
    from pathbundles.slide_inference import plan_slides
    from pathbundles.wsi import open_slide

    opened = set()
    for name, path in fuzz.slides.items():
        try:
            with open_slide(path, backend="tifffile"):
                opened.add(name)
        except SlideError as err:
            assert str(err).startswith(f"{path}: "), err
    # It checks every tile table: what opens states no usable mpp, or is sound (an unreadable objective power; a
    # first directory whose next-directory offset points back at itself, which tifffile reads as one page).
    sound = {"aperio_appmag_dot", "ifd_loop"}
    assert opened == NO_MPP | sound
    plans = plan_slides([{"image": str(p)} for p in fuzz.slides.values()], ScanGeometry(lp=8).grid(), scan_mpp=1.0,
                        backend="tifffile")
    failed = {plan.name for plan in plans if plan.error}
    assert failed == set(fuzz.slides) - sound
    assert all(plan.error.startswith(f"{plan.path}: ") for plan in plans if plan.error)


def test_each_bad_annotation_is_refused_naming_the_file(fuzz: Fuzz) -> None:
    from pathbundles.annotations import read_annotations
    from pathbundles.evaluation import ground_truth_lesions

    for name, path in fuzz.annotations.items():
        with pytest.raises(AnnotationError) as caught:
            read_annotations(path)
        assert str(caught.value).startswith(f"{path}"), caught.value
        with pytest.raises(AnnotationError, match=f"^{path}"):  # as evaluate.json reads an item's ground truth
            ground_truth_lesions({"image": "s.tif", "annotation": str(path)}, (1024, 1024), 0.5, 8.0)


def test_each_malformed_datalist_is_refused_as_a_whole_naming_the_file(fuzz: Fuzz) -> None:
    """The file itself (unreadable, not a list of items, a field of the wrong type, a split missing) or one of its
    items' output names (not one plain file name, or taken twice): InputError before any slide is read."""
    from pathbundles.bundle import datalist
    from pathbundles.outputs import output_names
    from pathbundles.scannet import ScanGeometry
    from pathbundles.slide_inference import SlideROIDataset

    image = str(fuzz.root / "good" / "phantom_tumor_000.tif")
    for name, path in fuzz.datalists.items():
        try:
            items = datalist(path)
        except InputError as err:
            assert str(err).startswith(f"{path}: "), (name, err)
            continue
        with pytest.raises(InputError, match=f"^{image}: (output name|box must be)"):
            output_names(items)
        with pytest.raises(InputError, match=f"^{image}: "):  # the bundle's dataset, before reading any slide
            SlideROIDataset(items, ScanGeometry(lp=8).grid(), scan_mpp=1.0)
    # The bad slides as a folder: every entry with a slide suffix is listed (links, the FIFO and the folder too),
    # each to fail alone by name in the run.
    listed = datalist(fuzz.root / "slides")
    assert sorted(output_names(listed)) == sorted(fuzz.slides)


def test_info_names_each_bad_slide_in_one_line_or_shows_its_header(fuzz: Fuzz) -> None:
    """``pathbundles info`` on every bad slide file: exit 2 with one line ``pathbundles: error: <file>: ...``, or (a
    header OpenSlide reads) exit 0 with the file's JSON; never a traceback, never a write."""
    before = snapshot(fuzz.root, SCANNET)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(fuzz.slides, pool.map(lambda p: run_python(fuzz, "-m", "pathbundles", "info", str(p),
                                                                      timeout=120), fuzz.slides.values())))
    assert snapshot(fuzz.root, SCANNET) == before
    shown = set()
    for name, result in results.items():
        path = fuzz.slides[name]
        assert TRACEBACK not in result.stderr, (name, result.stderr[-3000:])
        if result.returncode == 0:
            doc = json.loads(result.stdout)
            assert doc["path"] == str(path)
            shown.add(name)
            if name in NO_MPP:
                assert doc["mpp"] is None, name
        else:
            assert result.returncode == 2, (name, result.returncode, result.stderr[-3000:])
            assert result.stderr.strip().splitlines()[-1].startswith(f"pathbundles: error: {path}: "), name
            assert result.stdout == ""
    assert shown <= HEADER_READABLE


# ---- subprocesses: one bundle run, one cohort run, the malformed datalists (slow) --------------------------------


def _failure_line(stderr: str) -> str:
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("pathbundles: error: ") and " slide(s) failed, the others were written: " in line, line
    return line


@pytest.mark.slow
def test_a_bundle_run_writes_the_good_slides_and_names_each_bad_one(fuzz: Fuzz) -> None:
    out = fuzz.root / "out-bundle"
    result = guarded(fuzz, out, "-m", "monai.bundle", "run", "--config_file", str(SCANNET / "configs" /
                     "inference.json"), "--data_source", str(fuzz.mixed), "--output_dir", str(out), "--lp", "8",
                     "--num_workers", "0")
    assert result.returncode == 2, result.stderr[-5000:]
    line = _failure_line(result.stderr)
    failed = {name for name, item in fuzz.items.items()
              if f" {name}: {(fuzz.root / item['image']).absolute()}: " in line}
    written = {row["name"] for row in csv.DictReader(open(out / "slide_scores.csv", encoding="utf-8"))}
    assert line.startswith(f"pathbundles: error: {len(failed)} slide(s) failed")  # each named with its file
    assert set(fuzz.good) <= written and fuzz.bad <= failed
    assert written | failed == set(fuzz.items) and not written & failed
    for name in written:
        assert {p.name for p in out.rglob(f"{name}.*")} == {f"{name}.tif", f"{name}.png", f"{name}.csv",
                                                            f"{name}.geojson", f"{name}.xml"}
    assert not any(list(out.rglob(f"{name}.*")) for name in failed)
    # The report, written before the run failed, names every slide as text (the names are config expressions):
    # its own script is the page's only one.
    report = (out / "report.html").read_text(encoding="utf-8")
    assert report.count("<script") == 1 and report.count('alt="overlay"') == len(written)
    assert all(html.escape(name) in report for name in written | failed)


@pytest.mark.slow
def test_a_cohort_run_marks_each_bad_slide_failed_and_the_good_ones_done(fuzz: Fuzz) -> None:
    out = fuzz.root / "out-cohort"
    result = guarded(fuzz, out, "-m", "pathbundles", "cohort", "--bundle", str(SCANNET), "--slides", str(fuzz.mixed),
                     "--out", str(out), "--lp", "8", "--num_workers", "0")
    assert result.returncode == 1, result.stderr[-5000:]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["slides"]
    assert manifest.keys() == fuzz.items.keys()
    failed = {name for name, record in manifest.items() if record["status"] == "failed"}
    done = {name for name, record in manifest.items() if record["status"] == "done"}
    assert set(fuzz.good) <= done and fuzz.bad <= failed and done | failed == set(fuzz.items)
    assert set(summary["failed_slides"]) == failed and summary["done"] == len(done)
    for name in failed:
        image = str((fuzz.root / fuzz.items[name]["image"]).absolute())
        assert f"{name}: {image}: " in manifest[name]["error"], manifest[name]["error"]
        assert not list(out.rglob(f"{name}.*"))
    for name in done:
        assert all((out / rel).is_file() for rel in manifest[name]["outputs"].values())
    rows = {row["name"]: row["status"] for row in csv.DictReader(open(out / "slides.csv", encoding="utf-8"))}
    assert rows == {name: record["status"] for name, record in manifest.items()}


@pytest.mark.slow
@pytest.mark.parametrize("command, datalist", [("bundle", "not_json"), ("bundle", "name_parent"),
                                               ("cohort", "annotation_number")])
def test_a_malformed_datalist_ends_the_run_in_one_line_writing_nothing(fuzz: Fuzz, command: str,
                                                                       datalist: str) -> None:
    path = fuzz.datalists[datalist]
    out = fuzz.root / f"out-{command}-{datalist}"
    args = (["-m", "monai.bundle", "run", "--config_file", str(SCANNET / "configs" / "inference.json"),
             "--data_source", str(path), "--output_dir", str(out)] if command == "bundle" else
            ["-m", "pathbundles", "cohort", "--bundle", str(SCANNET), "--slides", str(path), "--out", str(out)])
    result = guarded(fuzz, out, *args, "--num_workers", "0")
    assert result.returncode == 2, result.stderr[-5000:]
    named = str(fuzz.root / "good" / "phantom_tumor_000.tif") if datalist.startswith("name_") else str(path)
    assert result.stderr.strip().splitlines()[-1].startswith(f"pathbundles: error: {named}: ")
    assert list(out.iterdir()) == []
