"""Atomic file output: write to a temporary name in the target folder, rename on success."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from pathbundles.errors import OutputError
from pathbundles.outputs import partial_path

# Errors that can only mean the write failed (no room, no writable file system), whatever the block was doing.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` when the block succeeds.

    The temporary name keeps the suffix (writers that pick a format from it still work) and starts with a dot, so
    an interrupted run leaves no file under the final name and nothing that looks like a result; a run killed
    before it could remove it leaves the temporary file to the next run of the folder
    (:func:`pathbundles.outputs.remove_stale_work_files`). On any exception the temporary file is removed and the
    exception propagates; a full disk, quota or read-only file system (ENOSPC, EDQUOT, EFBIG, EROFS) becomes an
    :class:`~pathbundles.errors.OutputError` naming ``path``.
    """
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if err.errno in _WRITE_ERRNOS:
            raise OutputError(final, err) from err
        raise
    tmp = partial_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(err, OSError) and not isinstance(err, OutputError) and err.errno in _WRITE_ERRNOS:
            raise OutputError(final, err) from err
        raise
