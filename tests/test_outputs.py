"""Output folders (``pathbundles.outputs``): output names from untrusted datalists, paths that stay inside the output
folder, the folder lock, and the work files a killed run leaves; and that the datasets and writers of all four
bundles use them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from pathbundles.errors import FolderInUseError, InputError
from pathbundles.outputs import (LOCK_FILE, WORK_AREA, FolderLock, check_name, claim_folder, inside, output_file,
                                 output_names, remove_stale_work_files, slide_name)

REPO = Path(__file__).resolve().parents[1]

#: Names a manifest from another system may carry, each of which would write or delete outside the output folder
#: (or among this project's hidden work files).
ESCAPING = ["../../x", "/tmp/x", "a/b", "a\\b", "..", ".", ".hidden", "x\ny"]


@pytest.mark.parametrize("name", ESCAPING)
def test_a_name_that_is_not_one_plain_file_name_is_refused(name: str) -> None:
    with pytest.raises(InputError, match=r"^/d/s\.tif: output name .* (path separator|starts with|control)"):
        slide_name({"image": "/d/s.tif", "name": name})
    with pytest.raises(InputError, match="^/d/s.tif: output name '' is empty"):
        check_name("", "/d/s.tif")


def test_names_are_plain_text_and_file_stems_are_checked_too() -> None:
    code = "$__import__('os').system('touch pwned') and 'n'"
    assert slide_name({"image": "/d/s.tif", "name": code}) == (code, "/d/s.tif")
    assert slide_name({"image": "/d/@ref %macro.tif"})[0] == "@ref %macro"
    assert slide_name("/d/tumor_001.tif") == ("tumor_001", "/d/tumor_001.tif")
    with pytest.raises(InputError, match=r"^/d/\.\.\.tif: output name '\.\.' starts with '\.'"):
        slide_name({"image": "/d/...tif"})  # the stem of '...tif' is '..'
    with pytest.raises(InputError, match="longer than 200 bytes"):
        slide_name({"image": "/d/s.tif", "name": "é" * 101})


@pytest.mark.parametrize("box", ["abc", 5, [1], [1, None, 3, 4], [float("nan"), 0, 1, 1], [0, 0, 0, 10],
                                 [0, 0, 10, 10, 10], {"x": 0}])
def test_a_box_that_is_not_four_numbers_is_refused_naming_the_item(box: object) -> None:
    """It raised ValueError or TypeError (a traceback stopping the run) while the outputs were named."""
    with pytest.raises(InputError, match=r"^/d/s\.tif: box must be \[x, y, width, height\] in level-0 px, got "):
        slide_name({"image": "/d/s.tif", "box": box})
    assert slide_name({"image": "/d/s.tif", "box": [10.7, 20, 5, 5]})[0] == "s_x10_y20"


def test_two_items_with_one_output_name_are_refused_naming_both() -> None:
    assert output_names([{"image": "/a/case1.tif"}, {"image": "/b/case1.tif", "name": "case1-b"}]) == \
        ["case1", "case1-b"]
    with pytest.raises(InputError, match=r"^/b/case1\.tif: output name 'case1' is the same name as that of "
                                         r"/a/case1\.tif"):
        output_names([{"image": "/a/case1.tif"}, {"image": "/b/case1.tif"}])
    with pytest.raises(InputError, match="same name"):  # one file on a case-insensitive share
        output_names([{"image": "/a/Case1.tif"}, {"image": "/b/case1.svs"}])


def test_paths_that_leave_the_folder_are_refused(tmp_path: Path) -> None:
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    assert output_file(out, "maps", "s", ".tif") == out / "maps" / "s.tif"
    assert inside(out, "manifest", "x.jsonl") == out / "manifest" / "x.jsonl"
    for name in ("../../x", "/tmp/x", "a/b"):
        with pytest.raises(InputError, match="output name"):
            output_file(out, "maps", name, ".tif")
    for parts in (("..", "x"), ("/tmp/x",), ("maps", "..", "..", "x"), ("..",)):
        with pytest.raises(InputError, match="outside the output folder"):
            inside(out, *parts)
    (out / "maps").symlink_to(elsewhere)  # a subfolder that points elsewhere is elsewhere
    with pytest.raises(InputError, match="outside the output folder"):
        output_file(out, "maps", "s", ".tif")
    (out / "overlays").mkdir()
    (out / "overlays" / "s.png").symlink_to(elsewhere / "s.png")  # the link itself is replaced, not its target
    assert output_file(out, "overlays", "s", ".png") == out / "overlays" / "s.png"


@pytest.mark.parametrize("name", ["../../victim", "/abs/victim"])
def test_every_bundle_dataset_refuses_escaping_names_before_reading(tmp_path: Path, name: str) -> None:
    from pathbundles.hpf import HPFDataset
    from pathbundles.multimag import MultiMagnificationDataset
    from pathbundles.scannet import ScanGeometry
    from pathbundles.slide_inference import SlideROIDataset

    items = [{"image": str(tmp_path / "never-read.tif"), "name": name}]
    with pytest.raises(InputError, match="output name"):  # scannet and spatial_lstm
        SlideROIDataset(items, ScanGeometry(lp=8).grid(), scan_mpp=1.0)
    with pytest.raises(InputError, match="output name"):  # dmmn
        MultiMagnificationDataset(items, mode="infer")
    with pytest.raises(InputError, match="output name"):  # segmitos
        HPFDataset(items)


def test_every_bundle_dataset_refuses_two_slides_with_one_name(tmp_path: Path) -> None:
    """``a/case1.tif`` and ``b/case1.tif`` in one plain run: refused up front (a failing one deleted the other's
    outputs, and the writers counted failures by name)."""
    from pathbundles.hpf import HPFDataset
    from pathbundles.multimag import MultiMagnificationDataset
    from pathbundles.scannet import ScanGeometry
    from pathbundles.slide_inference import SlideROIDataset

    items = [{"image": str(tmp_path / "a" / "case1.tif")}, {"image": str(tmp_path / "b" / "case1.tif")}]
    for build in (lambda: SlideROIDataset(items, ScanGeometry(lp=8).grid(), scan_mpp=1.0),
                  lambda: MultiMagnificationDataset(items, mode="infer"), lambda: HPFDataset(items)):
        with pytest.raises(InputError, match=r"b/case1\.tif: output name 'case1' is the same name as that of .*a/"):
            build()


def test_writers_build_their_paths_inside_the_output_folder(tmp_path: Path) -> None:
    from pathbundles.hpf import HPFDetectionWriter
    from pathbundles.slide_inference import SlideMapWriter

    writers = [SlideMapWriter(types.SimpleNamespace(plans=[]), str(tmp_path), detect=None),
               HPFDetectionWriter(types.SimpleNamespace(names=[]), tmp_path)]
    for writer in writers:
        assert all(p.parent.parent == tmp_path for p in writer.outputs("s").values())
        with pytest.raises(InputError, match="output name"):
            writer.outputs("../../x")


# ---- the lock ----------------------------------------------------------------------------------------------------


def test_a_second_run_into_a_locked_folder_fails_fast_naming_the_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from pathbundles.outputs import FolderLock; "
                               f"lock = FolderLock({str(tmp_path)!r}).acquire(); print('held', flush=True); "
                               "time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "common")})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUseError, match=rf"^{tmp_path}: another run is writing into this folder "
                                                   rf"\(PID {holder.pid} on host {socket.gethostname()}, started "):
            FolderLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    # Killed (-9): its lock went with it, its lock file stayed; the next run takes the folder over.
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid
    with FolderLock(tmp_path) as lock:
        assert lock.held and json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(FolderInUseError, match=f"PID {os.getpid()}"):  # also within one process
            FolderLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_stale_lock_file_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                                  "started": "2026-01-01T00:00:00+00:00", "command": "x"}))
    lock = FolderLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    lock.release()  # releasing twice is harmless
    assert not (tmp_path / LOCK_FILE).exists()


# ---- work files of a killed run ----------------------------------------------------------------------------------


def _leave_work_files(out: Path) -> tuple[list[Path], list[Path]]:
    """The work files a run killed while writing leaves in ``out``, and user files that look a little like them."""
    ours = [out / "maps" / ".s.partial-0123abcd.tif", out / ".summary.partial-89abcdef.json",
            out / "maps" / ".s-levels-a1b2_c3d" / "level1.raw",
            out / WORK_AREA / ".pathbundles-canvas-k2j3h4.raw",
            out / "dicom" / "s" / ".labels_0.partial-4567cdef.dcm"]  # a killed DICOM export (dicom/<slide>/)
    theirs = [out / "maps" / "s.partial-0123abcd.tif", out / "maps" / ".s.partial-notours.tif", out / ".hidden",
              out / "notes" / ".x-levels-a1b2c3d4e5", out / "a" / "b" / ".s.partial-0123abcd.tif",
              out / "dicom" / "s" / "labels_0.dcm", out / "dicom" / "s" / "x" / ".s.partial-0123abcd.dcm"]
    for path in ours + theirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return ours, theirs


def test_only_this_project_s_work_files_are_removed(tmp_path: Path) -> None:
    ours, theirs = _leave_work_files(tmp_path)
    removed = remove_stale_work_files(tmp_path)
    assert sorted(removed) == sorted([*ours[:2], ours[2].parent, *ours[3:]])
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)


def test_a_writer_cleans_its_folder_and_keeps_its_canvases_there(tmp_path: Path) -> None:
    """A plain bundle run removes what a killed run left in its output folder, stitches in the folder's work area
    (not $TMPDIR), and leaves neither the lock nor the work area behind."""
    from pathbundles.scannet import ScanGeometry
    from pathbundles.slide_inference import SlidePlan, SlideMapWriter, SlideROIDataset

    out = tmp_path / "out"
    ours, theirs = _leave_work_files(out)
    missing = [{"image": str(tmp_path / f"missing-{k}.tif")} for k in "abc"]
    dataset = SlideROIDataset(missing, ScanGeometry(lp=8).grid(), scan_mpp=1.0)
    writer = SlideMapWriter(dataset, str(out), detect=lambda *a, **k: np.zeros((0, 3)))
    with pytest.raises(RuntimeError, match=r"^3 slide\(s\) failed, no slide was written: missing-a: .*; "
                                           r"missing-b: .*; missing-c: "):
        writer.ensure_completed()
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)
    assert not (out / LOCK_FILE).exists() and not (out / WORK_AREA).exists()

    stitching = SlideMapWriter(types.SimpleNamespace(plans=[SlidePlan("s", "s.tif", map_shape=(4, 4))],
                                                     backend="tifffile"), str(out), detect=None)
    canvas = stitching._canvas_for(0)
    assert [Path(p).parent for p in canvas._paths] == [out / WORK_AREA]
    canvas.close()


def test_claim_folder_locks_then_cleans(tmp_path: Path) -> None:
    ours, _ = _leave_work_files(tmp_path)
    with claim_folder(tmp_path) as lock:
        assert lock.held and not any(p.exists() for p in ours)
        with pytest.raises(FolderInUseError):
            claim_folder(tmp_path)
