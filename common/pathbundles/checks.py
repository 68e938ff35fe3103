"""Checks of the values a run consumes (probabilities, thresholds, on/off switches), in one place so that every
consumer refuses the same values with the same words: a threshold of 2 on probabilities gives no detection at all, a
score of 500 is a column read in the wrong order, and ``--tta false`` reaches a component as the string ``'false'``
(python-fire passes it so), which ``bool()`` takes for True: all silently wrong results otherwise."""

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


_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})


def flag(value: object, name: str) -> bool:
    """``value`` as a bool: a bool, 0 or 1, or one of true/false, yes/no, 1/0 in any case (what a command line or a
    config override gives); :class:`SettingError` naming ``name`` otherwise.

    Args:
        value: the setting's value.
        name: the setting, as the user sets it (``"tta"``, ``"batch_norm"``).
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise SettingError(f"{name} must be true or false (also yes/no, 1/0), got {value!r}")


def choice(value: object, choices: tuple[str, ...], name: str) -> str:
    """``value`` when it is one of ``choices`` (a setting with named options); :class:`SettingError` naming ``name``
    and the options otherwise."""
    if value not in choices:
        raise SettingError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


def out_of_unit_range(values: np.ndarray) -> np.ndarray:
    """Indices of the entries of ``values`` that are not probabilities (outside [0, 1], or NaN)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    return np.flatnonzero(~((values >= 0.0) & (values <= 1.0)))
