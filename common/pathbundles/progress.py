"""Progress for long work: bars (tiles or slides done and the rate, silent when stderr is not a terminal) and log
lines for the steps before a run's first bar."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)
T = TypeVar("T")


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "tile") -> tqdm:
    """Wrap ``iterable`` (or make a manual bar of ``total`` steps) in a tqdm bar.

    The bar is shown only on an interactive terminal, or when ``PATHBUNDLES_PROGRESS=1``; ``PATHBUNDLES_PROGRESS=0``
    silences it everywhere.
    """
    forced = os.environ.get("PATHBUNDLES_PROGRESS")
    show = sys.stderr.isatty() if forced is None else forced == "1"
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not show, dynamic_ncols=True, leave=False)


def logged_steps(items: Sequence[T], desc: str, unit: str = "slide") -> Iterator[T]:
    """Yield ``items``, logging ``<desc>: <unit> k/n`` (INFO) before each and the time taken after the last.

    For the slow steps before a run's first progress bar (phantom generation, a training set's tissue masks and
    tiles), which passed in silence for minutes: one line a step, in a terminal and in a log file alike.

    Args:
        items: the steps (a sized sequence: the lines count them).
        desc: what is being done ("phantom metastasis slides", "training tiles").
        unit: what one step is.
    """
    start, n = time.monotonic(), len(items)
    for k, item in enumerate(items, 1):
        logger.info("%s: %s %d/%d", desc, unit, k, n)
        yield item
    logger.info("%s: %d %s(s) in %.1f s", desc, n, unit, time.monotonic() - start)
