"""pathbundles: shared slide layer, samplers, post-processing, metrics and method code for the four bundles.

Submodules load on first attribute access (``pathbundles.postprocess.detections_from_components``), so
``import pathbundles`` stays cheap and bundle configs need only ``"$import pathbundles"``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__version__ = "0.1.0"


def __getattr__(name: str) -> ModuleType:
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"{__name__}.{name}":
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        raise
