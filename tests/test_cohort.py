"""Cohort inference (``pathbundles.cohort``): sharding, manifest and resume rules, summary tables, and the scannet
bundle over phantom slides in one process and in two gloo processes under torchrun (slow: subprocesses)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bundle_helpers import REPO
from orthanc_fixtures import orthanc_url  # noqa: F401 - the fixture
from hostile_files import million_px_square
from pathbundles import cohort
from pathbundles.cohort import LoopTimer, ProcessGroup, is_done, read_manifest, run_cohort, shard_by_area
from pathbundles.errors import FolderInUseError, InputError
from pathbundles.outputs import slide_name

SCANNET = REPO / "bundles" / "scannet"
BUNDLE = {"name": "b", "version": "1", "weights_sha256": "w", "config_sha256": "c"}
#: bundle outputs, as opposed to the cohort's own files
COHORT_FILES = {"manifest.json", "summary.json", "slides.csv", "scores.csv", "report.html"}


# ---- sharding ----------------------------------------------------------------------------------------------------


def test_shards_balance_area_not_count() -> None:
    # Largest first to the least loaded rank: 10->0, 7->1, 6->1 (13), 5->0 (15), 4->1 (17), 2->0 (17).
    assert shard_by_area([10, 7, 6, 5, 4, 2], 2) == [[0, 3, 5], [1, 2, 4]]
    # One huge slide against four small ones: 1 slide on rank 0, 4 on rank 1 (a count split would give 100+1+1).
    assert shard_by_area([1, 100, 1, 1, 1], 2) == [[1], [0, 2, 3, 4]]
    # Slides of unknown area (0) still spread by count; more ranks than slides leaves ranks idle.
    assert shard_by_area([0, 0, 0], 2) == [[0, 2], [1]]
    assert shard_by_area([3, 5], 3) == [[1], [0], []]
    shards = shard_by_area(list(np.random.default_rng(0).uniform(1, 50, 40)), 4)
    assert sorted(i for s in shards for i in s) == list(range(40))
    with pytest.raises(ValueError, match="world_size 0"):
        shard_by_area([1.0], 0)


def test_slides_are_named_as_the_writers_name_them() -> None:
    assert slide_name({"image": "/d/tumor_001.tif"}) == ("tumor_001", "/d/tumor_001.tif")
    assert slide_name({"image": "/d/tumor_001.tif", "name": "case-7"})[0] == "case-7"
    assert slide_name({"image": "/d/slide.svs", "box": [100, 2000.0, 512, 512]})[0] == "slide_x100_y2000"
    assert slide_name({"image": "/d/slide.svs", "name": "case-7", "box": [100, 2000, 512, 512]})[0] == \
        "case-7_x100_y2000"


# ---- manifest and resume -----------------------------------------------------------------------------------------


def _record(slide: str, status: str = "done", outputs: dict | None = None, **bundle: str) -> dict:
    return {"name": slide, "status": status, "bundle": {**BUNDLE, **bundle},
            "outputs": {"map": f"maps/{slide}.tif"} if outputs is None else outputs}


def test_resume_skips_only_slides_done_with_the_same_bundle_and_present_outputs(tmp_path: Path) -> None:
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "a.tif").write_bytes(b"x")
    assert is_done(_record("a"), BUNDLE, tmp_path)
    assert is_done(_record("a", status="skipped"), BUNDLE, tmp_path)  # skipped carries the done record
    assert not is_done(_record("a", status="failed"), BUNDLE, tmp_path)  # failed slides are retried
    assert not is_done(None, BUNDLE, tmp_path)
    for key in ("name", "version", "weights_sha256", "config_sha256"):
        assert not is_done(_record("a", **{key: "other"}), BUNDLE, tmp_path), key
    assert not is_done(_record("b"), BUNDLE, tmp_path)  # its output file is gone
    assert not is_done(_record("a", outputs={}), BUNDLE, tmp_path)


def test_manifest_merges_fragments_in_run_order_and_ignores_a_cut_line(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "slides": {"a": _record("a", "failed"),
                                                                                   "c": _record("c")}}))
    cohort.ManifestFragment(tmp_path, "20260101T000000Z-aaaaaa", 0).append(_record("a"))
    cohort.ManifestFragment(tmp_path, "20260101T000000Z-aaaaaa", 1).append(_record("b", "failed"))
    later = cohort.ManifestFragment(tmp_path, "20260102T000000Z-bbbbbb", 1)
    later.append(_record("b"))
    with open(later.path, "a") as f:
        f.write('{"name": "c", "status": "fai')  # killed while writing
    records = read_manifest(tmp_path)
    assert {k: r["status"] for k, r in records.items()} == {"a": "done", "b": "done", "c": "done"}
    merged = cohort.merge_manifest(tmp_path, skipped={"c": "run-3"})
    assert merged["c"]["status"] == "skipped" and merged["c"]["skipped_in"] == "run-3"
    assert not (tmp_path / "manifest").exists()
    assert json.loads((tmp_path / "manifest.json").read_text())["slides"] == merged


def _tree(root: Path, skip: Path | None = None) -> dict[str, int]:
    """Every file under ``root`` (but under ``skip``) with its size."""
    return {str(p): p.stat().st_size for p in sorted(root.rglob("*"))
            if p.is_file() and (skip is None or not p.is_relative_to(skip))}


def _fake_runner(failing: set[str]):
    """A bundle stand-in: writes maps/<name>.txt and a per-run CSV, raises for the slides in ``failing``."""

    def run(item: dict, work_dir: Path) -> tuple[dict, dict]:
        name = Path(item["image"]).stem
        (work_dir / "maps").mkdir()
        (work_dir / "maps" / f"{name}.txt").write_text(name)
        (work_dir / "slide_scores.csv").write_text("per-run file, not a slide output")
        if name in failing:
            raise RuntimeError(f"{item['image']}: cannot read tile 3")
        timing = {"iterations": 3, "first_batch_s": 0.5, "data_wait_s": 0.25, "iteration_s": 0.75, "tail_s": 0.1,
                  "run_s": 1.6, "steady_data_wait_fraction": 0.25}
        return {"name": name, "score": len(name) / 10, "n_detections": 2, "outputs": {
            "map": str(work_dir / "maps" / f"{name}.txt")}}, timing

    return run


def test_cohort_records_failures_summarises_and_resumes(tmp_path: Path) -> None:
    items = [{"image": str(tmp_path / f"{n}.tif"), "label": label} for n, label in
             (("t1", 1), ("n22", 0), ("bad", 0), ("t333", 1))]
    out = tmp_path / "out"
    summary = run_cohort(items, out, BUNDLE, _fake_runner({"bad"}))
    assert (summary["slides"], summary["done"], summary["failed"], summary["skipped"]) == (4, 3, 1, 0)
    assert "cannot read tile 3" in summary["failed_slides"]["bad"]
    assert summary["steady_data_wait_fraction"] == pytest.approx(0.25)
    assert summary["slide_auc"] == pytest.approx(0.5)  # score = len(name) / 10: tumours 0.2, 0.4; normal 0.3
    # A failed slide leaves no file; per-run files of the bundle are not slide outputs; no work folder is left.
    assert sorted(p.name for p in (out / "maps").iterdir()) == ["n22.txt", "t1.txt", "t333.txt"]
    assert not (out / "slide_scores.csv").exists() and not (out / ".cohort-work").exists()
    manifest = json.loads((out / "manifest.json").read_text())["slides"]
    assert manifest["bad"]["status"] == "failed" and "bad.tif" in manifest["bad"]["error"]
    assert manifest["t1"]["outputs"] == {"map": "maps/t1.txt"} and manifest["t1"]["bundle"] == BUNDLE
    assert manifest["t1"]["timing"]["data_wait_s"] == 0.25 and manifest["t1"]["label"] == 1
    scores = list(csv.DictReader(open(out / "scores.csv")))
    assert [(r["name"], r["label"], r["score"]) for r in scores] == [("t1", "1", "0.200000"), ("n22", "0", "0.300000"),
                                                                     ("t333", "1", "0.400000")]
    rows = {r["name"]: r for r in csv.DictReader(open(out / "slides.csv"))}
    assert rows["bad"]["status"] == "failed" and rows["t1"]["status"] == "done"
    assert float(rows["t1"]["setup_s"]) == pytest.approx(float(rows["t1"]["seconds"]) - 1.6)
    # The cohort's report: the bundle, every slide of the list with its status and score, the failure's reason.
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "b 1: cohort report" in report and "4 slides (3 done, 1 failed)" in report
    assert re.search(r'<a href="#slide-1">n22</a></td><td>0</td><td>done</td><td>0.3</td><td>2</td>', report)
    assert re.search(r'<a href="#slide-2">bad</a></td><td>0</td><td>failed</td>', report)
    assert "cannot read tile 3" in report

    # The same command again: done slides are skipped, the failed one is retried (and now succeeds).
    before = {p.name: p.stat().st_mtime_ns for p in (out / "maps").iterdir()}
    time.sleep(0.01)
    again = run_cohort(items, out, BUNDLE, _fake_runner(set()))
    assert (again["done"], again["failed"], again["skipped"]) == (1, 0, 3)
    manifest = json.loads((out / "manifest.json").read_text())["slides"]
    assert manifest["bad"]["status"] == "done" and manifest["bad"]["run_id"] == again["run_id"]
    assert manifest["t1"]["status"] == "skipped" and manifest["t1"]["run_id"] == summary["run_id"]
    assert all((out / "maps" / n).stat().st_mtime_ns == t for n, t in before.items())
    # Another configuration redoes everything.
    third = run_cohort(items, out, {**BUNDLE, "config_sha256": "c2"}, _fake_runner(set()))
    assert (third["done"], third["skipped"]) == (4, 0)


def test_a_cohort_on_demo_weights_says_so_in_its_tables_summary_and_log(tmp_path: Path, caplog) -> None:
    """The scannet bundle's shipped weights are demo weights: scores.csv ends each row with their hash and the
    warning, summary.json's bundle record has them, the end of the run logs the warning."""
    import logging

    from pathbundles.bundle_runner import bundle_info
    from pathbundles.weights import DEMO_WARNING

    info = bundle_info(SCANNET)
    demo_sha = json.loads((SCANNET / "configs" / "metadata.json").read_text())["trained_with"]["models/model.pt"][
        "sha256"]
    assert (info["weights_sha256"], info["demo_weights"], info["weights_warning"]) == (demo_sha, True, DEMO_WARNING)
    items = [{"image": str(tmp_path / f"{n}.tif"), "label": label} for n, label in (("t1", 1), ("n22", 0))]
    caplog.set_level(logging.WARNING, logger="pathbundles.weights")
    summary = run_cohort(items, tmp_path / "out", info, _fake_runner(set()))
    scores = list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    demo = {"weights_sha256": demo_sha, "demo_weights": "true", "weights_warning": DEMO_WARNING}
    assert scores == [{"name": "t1", "label": "1", "score": "0.200000", "n_detections": "2", **demo},
                      {"name": "n22", "label": "0", "score": "0.300000", "n_detections": "2", **demo}]
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["bundle"]["demo_weights"] is True and written["bundle"]["weights_warning"] == DEMO_WARNING
    assert summary["bundle"]["weights_sha256"] == demo_sha
    assert [r.getMessage() for r in caplog.records] == [
        f"{DEMO_WARNING} (end of the run; weights {SCANNET / 'models' / 'model.pt'}, sha256 {demo_sha[:12]})"]
    # A cohort of other weights (a retraining) carries their hash, and no warning.
    other = tmp_path / "retrained.pt"
    other.write_bytes(b"retrained weights")
    info = bundle_info(SCANNET, overrides={"ckpt_path": str(other)})
    run_cohort(items, tmp_path / "other", info, _fake_runner(set()))
    row = next(csv.DictReader(open(tmp_path / "other" / "scores.csv")))
    assert (row["weights_sha256"], row["demo_weights"], row["weights_warning"]) == (
        hashlib.sha256(b"retrained weights").hexdigest(), "false", "")


def test_a_bad_slide_is_logged_in_one_line_and_a_bug_with_its_traceback(tmp_path: Path, caplog) -> None:
    """Every failed slide was logged with logger.exception: a cohort over a few unreadable slides wrote one
    traceback each to stderr for what is bad input named by its file."""
    from pathbundles.errors import SlidesFailedError

    def run(item: dict, work_dir: Path) -> tuple[dict, dict]:
        if Path(item["image"]).stem == "bad":
            raise SlidesFailedError(f"1 slide(s) failed, the others were written: bad: {item['image']}: truncated")
        raise KeyError("a bug")

    caplog.set_level("ERROR", logger="pathbundles.cohort")
    summary = run_cohort([{"image": str(tmp_path / n)} for n in ("bad.tif", "bug.tif")], tmp_path / "out", BUNDLE,
                         run)
    assert summary["failed"] == 2
    bad, bug = (next(r for r in caplog.records if f"slide {n} failed" in r.getMessage()) for n in ("bad", "bug"))
    assert bad.getMessage() == (f"cohort: slide bad failed: SlidesFailedError: 1 slide(s) failed, the others were "
                                f"written: bad: {tmp_path / 'bad.tif'}: truncated") and not bad.exc_info
    assert bug.exc_info and bug.exc_info[0] is KeyError


def test_cohort_refuses_two_slides_with_one_name(tmp_path: Path) -> None:
    items = [{"image": str(tmp_path / "a" / "s.tif")}, {"image": str(tmp_path / "b" / "s.tif")}]
    with pytest.raises(ValueError, match="same name.*s"):
        run_cohort(items, tmp_path / "out", BUNDLE, _fake_runner(set()), ProcessGroup())


@pytest.mark.parametrize("name", ["../../../../victim", "ABSOLUTE"])
def test_cohort_refuses_a_name_that_leaves_the_output_folder(tmp_path: Path, name: str) -> None:
    """A name like '../../x' or an absolute path made the runner rmtree and write outside the output folder."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("not the cohort's")
    items = [{"image": str(tmp_path / "t1.tif")},
             {"image": str(tmp_path / "t2.tif"), "name": str(victim) if name == "ABSOLUTE" else name}]
    before = _tree(tmp_path)
    with pytest.raises(InputError, match=r"t2\.tif: output name .* path separator"):
        run_cohort(items, tmp_path / "out", BUNDLE, _fake_runner(set()))
    assert _tree(tmp_path, skip=tmp_path / "out") == before
    assert not list((tmp_path / "out").rglob("*.txt"))  # refused before any slide ran


def test_a_second_cohort_into_the_folder_fails_fast_and_a_dead_one_s_lock_is_taken_over(tmp_path: Path) -> None:
    from pathbundles.outputs import LOCK_FILE, FolderLock

    items = [{"image": str(tmp_path / "t1.tif")}]
    out = tmp_path / "out"
    with FolderLock(out):  # another run of this folder, here or on another machine of the shared file system
        with pytest.raises(FolderInUseError, match=rf"^{out}: another run is writing into this folder "
                                                   rf"\(PID {os.getpid()} on host {socket.gethostname()}"):
            run_cohort(items, out, BUNDLE, _fake_runner(set()))
    assert not (out / "maps").exists() and not (out / "summary.json").exists()
    # The lock file of a run killed with -9 (its process is gone): the next run takes the folder over.
    (out / LOCK_FILE).write_text(json.dumps({"pid": 2 ** 22 + 1, "host": socket.gethostname(), "started": "x",
                                             "command": "pathbundles cohort"}))
    summary = run_cohort(items, out, BUNDLE, _fake_runner(set()))
    assert summary["done"] == 1 and not (out / LOCK_FILE).exists()


def test_the_next_cohort_removes_what_a_killed_one_left(tmp_path: Path) -> None:
    out = tmp_path / "out"
    left = [out / "maps" / ".t1.partial-0123abcd.tif", out / "maps" / ".t1-levels-abcd_123" / "level1.raw",
            out / ".pathbundles-work" / ".pathbundles-canvas-x1y2z3.raw", out / ".cohort-work" / "r" / "rank0" / "x",
            out / ".summary.partial-00ff00ff.json"]
    kept = [out / "maps" / "notes.partial.tif", out / "maps" / ".keep"]
    for path in left + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 100)
    run_cohort([{"image": str(tmp_path / "t1.tif")}], out, BUNDLE, _fake_runner(set()))
    assert [p for p in left if p.exists()] == [] and all(p.exists() for p in kept)
    assert not (out / ".pathbundles-work").exists() and not (out / ".cohort-work").exists()


def test_a_slide_past_its_time_budget_fails_by_name_and_the_others_run(tmp_path: Path) -> None:
    hang = _fake_runner(set())

    def run(item: dict, work_dir: Path) -> tuple[dict, dict]:
        if "stuck" in item["image"]:
            time.sleep(60)
        return hang(item, work_dir)

    items = [{"image": str(tmp_path / f"{n}.tif")} for n in ("t1", "stuck", "t3")]
    start = time.perf_counter()
    summary = run_cohort(items, tmp_path / "out", BUNDLE, run, slide_timeout_s=0.5)
    assert time.perf_counter() - start < 20
    assert (summary["done"], summary["failed"]) == (2, 1)
    assert summary["failed_slides"]["stuck"] == (f"SlideTimeoutError: {tmp_path / 'stuck.tif'}: stopped after its "
                                                 "time budget of 0.5 s (slide_timeout_s)")
    assert sorted(p.name for p in (tmp_path / "out" / "maps").iterdir()) == ["t1.txt", "t3.txt"]
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # no alarm left for whatever runs next


def test_loop_timer_separates_data_waits_from_iterations() -> None:
    from ignite.engine import Engine

    def slow_batches():
        for i in range(6):
            time.sleep(0.03)
            yield i

    engine = Engine(lambda e, batch: time.sleep(0.01))
    timer = LoopTimer()
    timer.attach(engine)
    engine.run(slow_batches(), max_epochs=1, epoch_length=6)
    s = timer.summary()
    assert s["iterations"] == 6 and s["first_batch_s"] >= 0.025
    assert s["data_wait_s"] >= 5 * 0.025 and s["iteration_s"] >= 6 * 0.008
    assert 0.5 < s["steady_data_wait_fraction"] < 0.9
    assert s["run_s"] >= s["first_batch_s"] + s["data_wait_s"] + s["iteration_s"]


def test_bundle_run_overlay_takes_configs_and_overrides_from_the_command_line(monkeypatch, tmp_path: Path) -> None:
    calls = {}

    def fake_command(bundle, slides, out, config_files, overrides, slide_timeout_s=None):
        calls.update(bundle=bundle, slides=slides, out=out, config_files=config_files, overrides=overrides,
                     slide_timeout_s=slide_timeout_s)
        return {"failed": 0}

    monkeypatch.setattr(cohort, "cohort_command", fake_command)
    configs = SCANNET / "configs"
    monkeypatch.setattr(sys, "argv", ["monai.bundle", "run", "--config_file",
                                      f"['{configs / 'inference.json'}','{configs / 'cohort.json'}']",
                                      "--data_source", "slides/", "--output_dir=out", "--lp", "8", "--amp",
                                      "--detection_threshold=0.7", "--slide_timeout_s", "600"])
    cohort.bundle_run_command(str(SCANNET), [{"image": "x.tif"}], str(tmp_path), 600)
    assert calls["config_files"] == [str(configs / "inference.json")]
    # The overlay's own setting is the cohort's, not a config id of every slide's run (nor of its config hash).
    assert calls["overrides"] == {"lp": 8, "amp": True, "detection_threshold": 0.7}
    assert calls["slide_timeout_s"] == 600
    monkeypatch.setattr(cohort, "cohort_command", lambda *a, **k: {"failed": 1, "failed_slides": {"x": "broken"},
                                                                    "files": {"slides": "slides.csv"}})
    with pytest.raises(RuntimeError, match="1 slide.*x: broken"):
        cohort.bundle_run_command(str(SCANNET), [{"image": "x.tif"}], str(tmp_path))


def test_a_file_no_reader_takes_has_no_area_and_does_not_stop_the_planning(tmp_path: Path) -> None:
    """Planning opened a FIFO named like a slide with PIL (after the slide backends refused it) and waited forever
    for data: the cohort never started."""
    os.mkfifo(tmp_path / "fifo.tif")
    (tmp_path / "zero.tif").symlink_to("/dev/zero")
    (tmp_path / "folder.tif").mkdir()
    for name in ("fifo.tif", "zero.tif", "folder.tif", "absent.tif"):
        assert cohort.slide_area_px({"image": str(tmp_path / name)}) == 0.0
    # A header claiming 10^6 x 10^6 px: the slide layer refuses it, and PIL's DecompressionBombError stopped the
    # planning with a traceback.
    assert cohort.slide_area_px({"image": str(million_px_square(tmp_path))}) == 0.0
    assert cohort.slide_area_px({"image": "x.svs", "box": [0, 0, 30, 20]}) == 600.0


def test_the_bundle_lists_the_slides_of_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("b.tif", "a.svs", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    items = cohort.bundle_datalist(SCANNET, tmp_path)
    assert [Path(i["image"]).name for i in items] == ["a.svs", "b.tif"]
    # A relative --slides that reads as config syntax is a path, not an expression or a reference.
    monkeypatch.chdir(tmp_path)
    for source in ("$__import__('os').getcwd()", "@bundle_root"):
        (tmp_path / source).mkdir()
        (tmp_path / source / "c.tif").write_bytes(b"")
        assert [i["image"] for i in cohort.bundle_datalist(SCANNET, source)] == [str(tmp_path / source / "c.tif")]


def test_an_empty_datalist_fails_naming_the_file(tmp_path: Path) -> None:
    """It exited 0 having done nothing; a malformed one failed inside MONAI's ConfigExpression traceback."""
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"items": []}))
    with pytest.raises(InputError, match=rf"^{empty}: the datalist lists no items$"):
        cohort.cohort_command(SCANNET, empty, tmp_path / "out")
    assert not (tmp_path / "out" / "summary.json").exists()
    with pytest.raises(ValueError, match="no slides to run"):  # an empty list given from Python
        run_cohort([], tmp_path / "out", BUNDLE, _fake_runner(set()))
    assert not (tmp_path / "out" / "summary.json").exists()


# ---- the scannet bundle, one process and two gloo processes ------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*args: str, nproc: int = 0, **env: str) -> subprocess.CompletedProcess:
    """``python -m ARGS`` in one process (nproc 0) or under torchrun with ``nproc`` gloo processes on CPU."""
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                str(_free_port())] if nproc else []
    environ = {k: v for k, v in os.environ.items() if k != cohort.STOP_AFTER_ENV}
    environ.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, *launcher, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env=environ)


def _cohort(slides: Path, out: Path, nproc: int = 0, **env: str) -> subprocess.CompletedProcess:
    return _run("pathbundles.cohort", "--bundle", str(SCANNET), "--slides", str(slides), "--out", str(out),
                "--lp", "8", "--num_workers", "1", nproc=nproc, **env)


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in COHORT_FILES}


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    """Four 2048 px phantom slides (two tumour, two normal), an all-glass slide, a truncated one and a symlink
    loop."""
    from pathbundles.phantom import make_phantom
    from pathbundles.writers import write_pyramid_tiff

    root = tmp_path_factory.mktemp("cohort-slides")
    dataset = make_phantom(root, kind="metastasis", n=4, seed=7, size_px=(2048, 2048))
    write_pyramid_tiff(root / "empty.tif", np.full((1024, 1024, 3), 245, np.uint8), mpp=0.5, compression="jpeg")
    good = (root / "phantom_normal_001.tif").read_bytes()
    (root / "truncated.tif").write_bytes(good[: len(good) // 3])
    (root / "loop.tif").symlink_to(root / "loop.tif")
    doc = json.loads(dataset.read_text())
    bad = dict(doc, items=doc["items"][:2] + [{"image": "truncated.tif", "label": 0},
                                              {"image": "empty.tif", "label": 0}, {"image": "loop.tif", "label": 1}])
    (root / "with_bad.json").write_text(json.dumps(bad))
    return root


@pytest.mark.slow
def test_two_gloo_processes_write_what_one_process_writes(slides: Path, tmp_path: Path) -> None:
    one, two = _cohort(slides / "dataset.json", tmp_path / "one"), \
        _cohort(slides / "dataset.json", tmp_path / "two", nproc=2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    single, union = _outputs(tmp_path / "one"), _outputs(tmp_path / "two")
    assert len(single) == 4 * 5 and single.keys() == union.keys()  # map, overlay, detections CSV, GeoJSON, XML
    assert single == union  # byte for byte
    assert (tmp_path / "one" / "scores.csv").read_text() == (tmp_path / "two" / "scores.csv").read_text()
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (summary["world_size"], summary["done"], summary["failed"]) == (2, 4, 0)
    ranks = {r["name"]: r["rank"] for r in read_manifest(tmp_path / "two").values()}
    assert sorted(ranks.values()) == [0, 0, 1, 1]  # equal areas: two slides each
    assert summary["slide_auc"] is not None and summary["steady_data_wait_fraction"] is not None


@pytest.mark.slow
def test_killed_job_resumes_without_redoing_its_slides(slides: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    killed = _cohort(slides / "dataset.json", out, nproc=2, **{cohort.STOP_AFTER_ENV: "1"})
    assert killed.returncode != 0
    assert not (out / "manifest.json").exists() and not (out / "summary.json").exists()  # it never merged
    done = {name: r for name, r in read_manifest(out).items() if r["status"] == "done"}
    assert 1 <= len(done) <= 2  # each rank stopped after one slide (the other may have been stopped earlier)
    stamps = {rel: (out / rel).stat().st_mtime_ns for r in done.values() for rel in r["outputs"].values()}

    resumed = _cohort(slides / "dataset.json", out, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["skipped"], summary["done"], summary["failed"]) == (len(done), 4 - len(done), 0)
    manifest = read_manifest(out)
    assert all(manifest[name]["status"] == "skipped" and manifest[name]["run_id"] == r["run_id"]
               for name, r in done.items())
    assert all((out / rel).stat().st_mtime_ns == t for rel, t in stamps.items())  # not rewritten
    assert len(_outputs(out)) == 4 * 5 and not (out / ".cohort-work").exists() and not (out / "manifest").exists()


@pytest.mark.slow
def test_corrupt_slide_fails_by_name_while_the_others_finish(slides: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    configs = SCANNET / "configs"
    # Through the bundle overlay: torchrun ... -m monai.bundle run --config_file [inference.json, cohort.json].
    result = _run("monai.bundle", "run", "--config_file",
                  f"['{configs / 'inference.json'}','{configs / 'cohort.json'}']", "--data_source",
                  str(slides / "with_bad.json"), "--output_dir", str(out), "--lp", "8", "--num_workers", "0", nproc=2)
    assert result.returncode != 0
    manifest = read_manifest(out)
    # The symlink loop aborted the whole run before any slide (listing the datalist); now it fails alone, by name.
    assert {n: r["status"] for n, r in manifest.items()} == {
        "phantom_tumor_000": "done", "phantom_normal_001": "done", "empty": "done", "truncated": "failed",
        "loop": "failed"}
    assert "truncated.tif" in manifest["truncated"]["error"] and "loop.tif" in manifest["loop"]["error"]
    assert manifest["empty"]["score"] == 0.0 and manifest["empty"]["n_detections"] == 0  # no tissue: zero map
    assert not list(out.rglob("truncated*")) and not list(out.rglob(".*partial*"))
    assert [r["name"] for r in csv.DictReader(open(out / "scores.csv"))] == ["phantom_tumor_000",
                                                                             "phantom_normal_001", "empty"]
    # The same cohort again (one process, the pathbundles command): the failed slide is retried, the others skipped.
    again = _run("pathbundles.cohort", "--bundle", str(SCANNET), "--slides", str(slides / "with_bad.json"), "--out",
                 str(out), "--lp", "8", "--num_workers", "0")
    assert again.returncode == 1
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["skipped"], summary["done"], summary["failed"]) == (3, 0, 2)
    assert read_manifest(out)["truncated"]["run_id"] == summary["run_id"]


@pytest.mark.slow
def test_a_cohort_of_dicom_slides_from_a_folder_and_a_pacs(slides: Path, orthanc_url: str,  # noqa: F811
                                                           tmp_path: Path) -> None:
    """A cohort lists a folder of DICOM series and a DICOMweb series URL (a text manifest of both), sizes them for
    its shares, and writes each slide under its container identifier with the scores of the same slides as TIFF."""
    from orthanc_fixtures import dicomize
    from pathbundles.dicomweb import series_url, store_instances

    series = tmp_path / "series"
    dicomize(slides / "phantom_tumor_000.tif", series / "tumour")
    (stored, *_) = store_instances(orthanc_url, dicomize(slides / "phantom_normal_001.tif",
                                                         tmp_path / "normal"))["stored"]
    url = series_url(orthanc_url, stored["study_instance_uid"], stored["series_instance_uid"])
    manifest = tmp_path / "slides.txt"
    manifest.write_text(f"series/tumour\n{url}\n")
    items = cohort.bundle_datalist(SCANNET, manifest)
    assert [(i["name"], i["image"]) for i in items] == [("phantom_tumor_000", str(series / "tumour")),
                                                        ("phantom_normal_001", url)]
    assert [cohort.slide_area_px(i) for i in items] == [2048.0 * 2048.0] * 2
    done = _cohort(manifest, tmp_path / "out")
    assert done.returncode == 0, done.stderr[-3000:]
    tiff = _cohort(slides / "dataset.json", tmp_path / "tiff")
    assert tiff.returncode == 0, tiff.stderr[-3000:]
    with open(tmp_path / "out" / "scores.csv", newline="") as f, open(tmp_path / "tiff" / "scores.csv", newline="") as g:
        dicom_scores = {r["name"]: float(r["score"]) for r in csv.DictReader(f)}
        tiff_scores = {r["name"]: float(r["score"]) for r in csv.DictReader(g)}
    assert sorted(dicom_scores) == ["phantom_normal_001", "phantom_tumor_000"]
    for name, score in dicom_scores.items():  # JPEG re-encoding by the dicomizer aside, the same slide
        assert score == pytest.approx(tiff_scores[name], abs=0.01)
        assert (tmp_path / "out" / "maps" / f"{name}.tif").is_file()
