"""Progress bars for long work: tiles or slides done and the rate, silent when stderr is not a terminal."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "tile") -> tqdm:
    """Wrap ``iterable`` (or make a manual bar of ``total`` steps) in a tqdm bar.

    The bar is shown only on an interactive terminal, or when ``PATHBUNDLES_PROGRESS=1``; ``PATHBUNDLES_PROGRESS=0``
    silences it everywhere.
    """
    forced = os.environ.get("PATHBUNDLES_PROGRESS")
    show = sys.stderr.isatty() if forced is None else forced == "1"
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not show, dynamic_ncols=True, leave=False)
