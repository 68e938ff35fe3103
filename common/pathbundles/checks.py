"""Range checks of the numbers a run consumes (probabilities, thresholds), in one place so that every consumer
refuses the same values with the same words: a threshold of 2 on probabilities gives no detection at all, and a
score of 500 is a column read in the wrong order, both silently wrong results otherwise."""

from __future__ import annotations

import math

import numpy as np

from pathbundles.errors import SettingError


def probability(value: float, name: str) -> float:
    """``value`` as a float when it is a probability in [0, 1]; :class:`SettingError` (a ValueError) naming ``name``
    otherwise.

    Args:
        value: the number to check (a threshold on probabilities, a score).
        name: what the value is, as the user set it (``"detection_threshold"``, ``"score_threshold"``).
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingError(f"{name} must be a probability in [0, 1], got {value!r}") from None
    if not (math.isfinite(number) and 0.0 <= number <= 1.0):
        raise SettingError(f"{name} must be a probability in [0, 1], got {value!r}")
    return number


def out_of_unit_range(values: np.ndarray) -> np.ndarray:
    """Indices of the entries of ``values`` that are not probabilities (outside [0, 1], or NaN)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    return np.flatnonzero(~((values >= 0.0) & (values <= 1.0)))
