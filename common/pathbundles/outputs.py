"""Output folders: what each input's outputs are called, that nothing is written or deleted outside the folder, which
process owns the folder, and the work files a killed run leaves behind.

Datalists come from other systems, so everything in them is untrusted:

- :func:`slide_name` is the one rule for the name an item's outputs and records go by (its ``name``, else its file
  stem; plus ``_x<x>_y<y>`` for an HPF box of a slide). A name must be one plain file name (:func:`check_name`);
  :func:`output_names` also refuses two items of one run with the same name, before anything is written.
- :func:`output_file` builds every per-input output path of the writers and the cohort and refuses one that would
  leave its folder (``..``, an absolute name, a symlinked subfolder pointing elsewhere).
- :class:`FolderLock` (``<folder>/.pathbundles.lock``) lets one run at a time write into a folder; :func:`claim_folder`
  takes it and then removes the work files an earlier, killed run left there (:func:`remove_stale_work_files`). The
  work files are named here: temporary names of atomic writes (:func:`partial_path`), pyramid level folders
  (:func:`levels_dir_prefix`) and stitching canvases (:data:`CANVAS_PREFIX`, in :func:`work_area`).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import uuid
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pathbundles.errors import FolderInUseError, InputError

logger = logging.getLogger(__name__)

#: Longest output name in UTF-8 bytes: file names may have 255, and the temporary name of an atomic write adds 27
#: (``.<name>.partial-12345678.geojson``).
MAX_NAME_BYTES = 200
#: The lock file of an output folder (see :class:`FolderLock`).
LOCK_FILE = ".pathbundles.lock"
#: Folder of an output folder's work files (stitching canvases), removed when empty.
WORK_AREA = ".pathbundles-work"
#: Start of a stitching canvas file's name (:class:`pathbundles.writers.DiskCanvas`).
CANVAS_PREFIX = ".pathbundles-canvas-"
#: Subfolder of an output folder that holds the DICOM results, one folder per slide
#: (:func:`pathbundles.dicom_writers.export_slide_results`).
DICOM_SUBFOLDER = "dicom"

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# The work files' names as partial_path, levels_dir_prefix (plus tempfile's 8 random characters) and DiskCanvas
# make them; nothing else in an output folder is removed as stale.
_PARTIAL = re.compile(r"^\..*\.partial-[0-9a-f]{8}(\.[^.]*)?$")
_LEVELS = re.compile(r"^\..*-levels-[a-z0-9_]{8}$")
_CANVAS = re.compile(r"^" + re.escape(CANVAS_PREFIX) + r".*\.raw$")


# ---- names -------------------------------------------------------------------------------------------------------


def check_name(name: str, source: str | os.PathLike) -> str:
    """``name`` when it is one plain file name; else InputError naming ``source`` (the item's image).

    Refused: empty, longer than :data:`MAX_NAME_BYTES` UTF-8 bytes, a path separator (``/``, ``\\``), a control
    character, or a leading ``.`` (``.``, ``..``, and hidden names, which this project's work files use).
    """
    problem = None
    if not isinstance(name, str) or not name:
        problem = "is empty"
    elif "/" in name or "\\" in name:
        problem = "contains a path separator"
    elif _CONTROL.search(name):
        problem = "contains a control character"
    elif name.startswith("."):
        problem = "starts with '.'"
    elif len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        problem = f"is longer than {MAX_NAME_BYTES} bytes"
    if problem:
        raise InputError(source, f"output name {name!r} {problem}: outputs are named by one plain file name "
                                 "(give the datalist item a 'name' that is one)")
    return name


def slide_name(item: Mapping[str, Any] | str) -> tuple[str, str]:
    """(name, image path) of a datalist item: a path, or a dict with ``image`` and optionally ``name`` and ``box``.

    The name is what the item's outputs and records are called: its ``name``, else, for a DICOM slide (a series'
    folder or file, a DICOMweb URL), its series' name (:func:`pathbundles.dicom_wsi.series_name`: the container
    identifier, never an instance UID), else its image's file stem; plus ``_x<x>_y<y>`` (level-0 px) when it is a
    ``box`` of a slide (an HPF). Checked by :func:`check_name`.
    """
    path = item if isinstance(item, str) else str(item["image"])
    base = None if isinstance(item, str) else item.get("name")
    if not base:
        from pathbundles.dicom_wsi import is_dicom_source, series_name
        from pathbundles.dicomweb import is_dicomweb_url

        dicom = is_dicom_source(path) and (is_dicomweb_url(path) or Path(path).exists())
        base = series_name(path) if dicom else Path(path).stem
    base = str(base)
    box = None if isinstance(item, str) else item.get("box")
    if box is not None:
        x, y = _box_origin(box, path)
        base = f"{base}_x{x}_y{y}"
    return check_name(base, path), path


def _box_origin(box: Any, source: str) -> tuple[int, int]:
    """(x, y) of an item's ``box``; InputError naming ``source`` unless it is [x, y, width, height] of finite
    numbers (level-0 px) with a positive size."""
    try:
        values = [float(v) for v in box] if isinstance(box, (list, tuple)) else []
    except (TypeError, ValueError):
        values = []
    if len(values) != 4 or not all(math.isfinite(v) for v in values) or min(values[2:]) <= 0:
        raise InputError(source, f"box must be [x, y, width, height] in level-0 px, got {box!r}")
    return int(values[0]), int(values[1])


def output_names(items: Sequence[Mapping[str, Any] | str]) -> list[str]:
    """:func:`slide_name` of every item of one run; InputError when two items would get the same outputs.

    Names are compared ignoring case, as a case-insensitive file system (SMB shares, macOS) would.
    """
    names: list[str] = []
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        name, path = slide_name(item)
        other = first.setdefault(name.casefold(), i)
        if other != i:
            raise InputError(path, f"output name {name!r} is the same name as that of {slide_name(items[other])[1]}: "
                                   "their outputs would overwrite each other (give the datalist items distinct "
                                   "'name' entries)")
        names.append(name)
    return names


# ---- paths inside a folder ---------------------------------------------------------------------------------------


def inside(folder: str | os.PathLike, *parts: str) -> Path:
    """``folder / parts...``, refused (InputError) unless it stays inside ``folder``.

    The check resolves the folders on the way (a symlinked subfolder counts where it points) but not the last
    part, because writes replace and deletes remove a symlink itself, not what it points to.
    """
    root = Path(folder)
    path = root.joinpath(*parts)
    try:
        real_root = root.resolve()
        real = path.parent.resolve() / path.name
    except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop (Python < 3.13)
        raise InputError(path, f"cannot resolve the path: {err}") from err
    if path.name in ("", ".", "..") or not real.is_relative_to(real_root) or real == real_root:
        raise InputError(path, f"outside the output folder {root}: refused")
    return path


def output_file(folder: str | os.PathLike, subfolder: str, name: str, suffix: str) -> Path:
    """``folder/subfolder/<name><suffix>``, the path of one output of one input; InputError when ``name`` is not
    one plain file name (:func:`check_name`) or the path leaves ``folder`` (:func:`inside`)."""
    return inside(folder, subfolder, check_name(name, Path(folder, subfolder, name + suffix)) + suffix)


# ---- work files --------------------------------------------------------------------------------------------------


def partial_path(final: str | os.PathLike) -> Path:
    """The temporary name an atomic write of ``final`` goes to first (hidden, same folder, same suffix)."""
    final = Path(final)
    return final.with_name(f".{final.stem}.partial-{uuid.uuid4().hex[:8]}{final.suffix}")


def levels_dir_prefix(final: str | os.PathLike) -> str:
    """Start of the name of the temporary folder of the reduced levels of the pyramid TIFF ``final``."""
    return f".{Path(final).stem}-levels-"


def work_area(folder: str | os.PathLike) -> Path:
    """The folder's work area (created): where stitching canvases live, so that a killed run's are found."""
    path = Path(folder) / WORK_AREA
    path.mkdir(parents=True, exist_ok=True)
    return path


def remove_stale_work_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the work files a killed run left in ``folder``, its subfolders (one level down, where the outputs
    are) and the slide folders of its DICOM results (``dicom/<slide>/``, :data:`DICOM_SUBFOLDER`): partial atomic
    writes, pyramid level folders, stitching canvases. Only names this module makes are removed; symlinks are not
    followed. Call it holding the folder's lock (:func:`claim_folder`).

    Returns:
        The paths removed.
    """
    root = Path(folder)
    removed = []
    subfolders = [p for p in _entries(root) if p.is_dir() and not p.is_symlink()]
    dicom = root / DICOM_SUBFOLDER
    if dicom in subfolders:
        subfolders += [p for p in _entries(dicom) if p.is_dir() and not p.is_symlink()]
    for directory in [root, *subfolders]:
        for path in _entries(directory):
            if path.is_symlink():
                continue
            if path.is_dir() and _LEVELS.match(path.name):
                shutil.rmtree(path, ignore_errors=True)
            elif path.is_file() and (_PARTIAL.match(path.name) or _CANVAS.match(path.name)):
                path.unlink(missing_ok=True)
            else:
                continue
            removed.append(path)
    if removed:
        logger.warning("%s: removed %d work file(s) a killed run left: %s", root, len(removed),
                       ", ".join(str(p.relative_to(root)) for p in removed[:10]))
    return removed


def _entries(directory: Path) -> list[Path]:
    try:
        return sorted(directory.iterdir())
    except OSError:  # not there yet, or unreadable: nothing of ours to remove
        return []


# ---- the folder lock ---------------------------------------------------------------------------------------------


class FolderLock:
    """One run at a time per output folder: an exclusive ``flock`` on ``<folder>/.pathbundles.lock``.

    The file records the holder (PID, host, start time, command) for the error a second run gets. The kernel drops
    the lock when its holder dies (``kill -9`` included), so a lock file left by a dead process is taken over by the
    next run; on NFS, Linux maps ``flock`` to byte-range locks that every client sees. Ranks of one torchrun job do
    not take it: rank 0 holds it for the job.

    Args:
        folder: the output folder (created).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None
        self._pid = 0
        self._finalizer: Any = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FolderLock:
        """Take the lock; FolderInUseError naming the holder when another run has it."""
        import fcntl

        if self._fd is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise FolderInUseError(self.folder, f"another run is writing into this folder ({holder}); wait for "
                                                    "it to end or choose another output folder") from None
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                logger.warning("%s: the file system offers no locks (%s): concurrent runs into this folder are not "
                               "detected", self.folder, err)
                return self
            # A holder that was releasing removed the file after we opened it: lock the file now at the path.
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            os.close(fd)
        previous = _read_holder(fd)
        if previous != "holder unknown":
            logger.warning("%s: taking over the lock of a run that is no longer running (%s)", self.folder, previous)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd, self._pid = fd, os.getpid()
        # A lock never released (its run raised) is dropped with this object. Closing, unlike release(), leaves the
        # lock to the parent when this is a forked DataLoader worker's copy.
        self._finalizer = weakref.finalize(self, os.close, fd)
        return self

    def release(self) -> None:
        """Give the lock back (removing the lock file and the empty work area); nothing when not held."""
        import fcntl

        if self._fd is None or self._pid != os.getpid():
            return
        fd, self._fd = self._fd, None
        self._finalizer.detach()
        # Removed while still held, so no other run can lock this file and then see it vanish.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            (self.folder / WORK_AREA).rmdir()
        # LOCK_UN first: DataLoader workers forked while the lock was held share the open file.
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    """The holder a lock file describes, as text for a message."""
    try:
        doc = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"PID {doc['pid']} on host {doc['host']}, started {doc['started']}: {doc['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def claim_folder(folder: str | os.PathLike) -> FolderLock:
    """Lock an output folder for this run (:class:`FolderLock`) and remove what a killed run left in it
    (:func:`remove_stale_work_files`); returns the held lock, which the caller releases."""
    lock = FolderLock(folder).acquire()
    remove_stale_work_files(folder)
    return lock
