"""Atomic file output: write to a temporary name in the target folder, rename on success."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from pathbundles.outputs import partial_path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` when the block succeeds.

    The temporary name keeps the suffix (writers that pick a format from it still work) and starts with a dot, so
    an interrupted run leaves no file under the final name and nothing that looks like a result; a run killed
    before it could remove it leaves the temporary file to the next run of the folder
    (:func:`pathbundles.outputs.remove_stale_work_files`). On any exception the temporary file is removed and the
    exception propagates.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
