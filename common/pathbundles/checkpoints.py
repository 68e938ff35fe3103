"""Checkpoints: the weights a bundle runs, the settings they were trained with, and the checks made at load.

A checkpoint written by a bundle's ``train.json`` is ``{"model": state_dict, "training": {...}}``: MONAI's
``CheckpointSaver`` with ``save_dict={"model": network, "training": TrainingSettings(@trained_with)}``, where the
config key ``trained_with`` lists what the weights depend on (the bundle, the resolution they read, the patch
geometry, the network's width and architecture keys). The bundles' ``inference.json`` lists the same keys with the
values the run uses, and :class:`CheckpointLoader` refuses weights trained with other values, naming the
checkpoint, the key and both values (``--scan_mpp 8`` on weights trained at 1.0 um/px gave a meaningless score).

Checkpoints saved before they carried their settings (the shipped ``models/*.pt``, plain state dicts) are described
in the bundle's ``metadata.json`` field ``trained_with``: ``{"models/model.pt": {"sha256": ..., "demo": true,
"settings": {...}}}``, which applies only to a file with that exact hash (and marks it as demo weights:
:mod:`pathbundles.weights`). Any other checkpoint without settings loads with a logged warning that they could not
be checked.

A missing, truncated or foreign file (another bundle's weights) is an :class:`~pathbundles.errors.InputError`
naming it. ``python -m monai.bundle ckpt_export`` takes ``--key_in_ckpt model`` for checkpoints trained by this
version (the shipped plain state dicts need none).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pathbundles.checks import flag
from pathbundles.errors import InputError, SettingError
from pathbundles.weights import identify

logger = logging.getLogger(__name__)

#: Keys of a checkpoint saved by the bundles' train.json.
MODEL_KEY, TRAINING_KEY = "model", "training"


class TrainingSettings:
    """The settings a network is trained with, saved beside its weights.

    MONAI's ``CheckpointSaver`` saves every object of its ``save_dict`` by ``state_dict()``; this one's is the
    settings themselves, so the checkpoint gets ``"training": {...}``.

    Args:
        settings: ``{config key: value}`` with JSON values (``{"bundle": "scannet", "scan_mpp": 1.0, ...}``).
    """

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = {str(k): _plain(v) for k, v in settings.items()}

    def state_dict(self) -> dict[str, Any]:
        return dict(self.settings)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.settings = dict(state)


def _plain(value: Any) -> Any:
    """A config value as plain JSON (tuples as lists), so settings compare equal after a save and load."""
    return json.loads(json.dumps(value))


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint file (weights only), or raise an InputError naming it and what is wrong.

    Args:
        path: a ``.pt`` file: a state dict, or ``{"model": state_dict, "training": {...}}``.
        map_location: as for ``torch.load``.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint does not exist" if not path.exists() else "checkpoint is not a file")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # zip, pickle and EOF errors alike: the user needs the file and that it is unreadable
        first = str(exc).split(". ")[0].strip()  # torch appends paragraphs of advice after the first sentence
        raise InputError(path, f"not a readable PyTorch checkpoint ({path.stat().st_size} bytes; truncated, or not "
                               f"a checkpoint: {type(exc).__name__}: {first})") from exc
    if not isinstance(checkpoint, Mapping):
        raise InputError(path, f"holds a {type(checkpoint).__name__}, not a state dict of weights")
    return dict(checkpoint)


def split_checkpoint(checkpoint: Mapping[str, Any]) -> tuple[dict, dict | None]:
    """``(state_dict, training settings or None)`` of a loaded checkpoint, whichever of the two layouts it has."""
    if isinstance(checkpoint.get(MODEL_KEY), Mapping):
        settings = checkpoint.get(TRAINING_KEY)
        return dict(checkpoint[MODEL_KEY]), dict(settings) if isinstance(settings, Mapping) else None
    return dict(checkpoint), None


def read_weights(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """The state dict of a checkpoint file of either layout (InputError naming the file when unreadable)."""
    return split_checkpoint(read_checkpoint(path, map_location))[0]


def metadata_settings(path: str | os.PathLike, metadata_file: str | os.PathLike | None) -> dict | None:
    """Settings that ``metadata_file``'s ``trained_with`` field gives for a checkpoint with ``path``'s sha256."""
    from pathbundles.bundle_runner import sha256_file
    from pathbundles.weights import described_weights

    if metadata_file is None or not Path(metadata_file).is_file():
        return None
    entry = described_weights(json.loads(Path(metadata_file).read_text(encoding="utf-8"))).get(sha256_file(path))
    return None if entry is None else dict(entry.get("settings") or {})


def check_training_settings(path: str | os.PathLike, trained: Mapping[str, Any] | None, expected: Mapping[str, Any],
                            source: str) -> None:
    """Refuse weights whose training settings differ from the run's.

    Args:
        path: the checkpoint (named in the error).
        trained: the settings the weights were trained with; None when unknown (a warning, nothing checked).
        expected: the run's values of the same keys.
        source: where ``trained`` came from, for the message ("the checkpoint", "metadata.json").

    Raises:
        InputError: naming the checkpoint, the first differing key and both values.
    """
    if not expected:
        return
    if trained is None:
        logger.warning("%s: the checkpoint records no training settings and is not a checkpoint the bundle's "
                       "metadata.json describes: %s not checked against this run", path, ", ".join(expected))
        return
    if "bundle" in expected and "bundle" in trained and trained["bundle"] != expected["bundle"]:
        raise InputError(path, f"holds weights of the {trained['bundle']!r} bundle (by {source}), not of "
                               f"{expected['bundle']!r}")
    for key, value in expected.items():
        if key not in trained:
            logger.warning("%s: %s does not record %r: not checked", path, source, key)
        elif not _same(trained[key], value):
            raise InputError(path, f"weights trained with {key} = {_plain(trained[key])!r} (by {source}), but this "
                                   f"run has {key} = {_plain(value)!r}; set {key} to {_plain(trained[key])!r} or "
                                   f"use weights trained with {_plain(value)!r}")


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON values, numbers within a relative 1e-6 (an mpp computed as 0.243 * 32 is the same mpp), a bool
    and its command-line spelling (True and 'true') alike."""
    a, b = _plain(a), _plain(b)
    if isinstance(a, bool) or isinstance(b, bool):
        try:  # a switch set on the command line arrives as a string ('false')
            return flag(a, "") is flag(b, "")
        except SettingError:
            return False
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-6)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def check_fit(path: str | os.PathLike, network: Any, state: Mapping[str, Any]) -> None:
    """An InputError naming the file when ``state`` does not fit ``network`` (a strict load would fail): how many of
    the network's weights are missing, how many are foreign, which shapes differ."""
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    foreign = [k for k in state if k not in own]
    reshaped = [k for k in own if k in state and tuple(own[k].shape) != tuple(getattr(state[k], "shape", ()))]
    if missing or foreign or reshaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of the network's {len(own)} weights are not in the file (e.g. "
                         f"{missing[0]!r})")
        if foreign:
            parts.append(f"{len(foreign)} weights in the file are not the network's (e.g. {foreign[0]!r})")
        if reshaped:
            k = reshaped[0]
            parts.append(f"{len(reshaped)} differ in shape (e.g. {k!r}: {tuple(state[k].shape)} in the file, "
                         f"{tuple(own[k].shape)} in the network: another width?)")
        raise InputError(path, f"does not fit this bundle's {type(network).__name__}: {'; '.join(parts)}; is it "
                               "another bundle's checkpoint?")


class CheckpointLoader:
    """Ignite handler (for the bundles' inference/evaluate configs): load the network's weights when the engine
    starts, after checking the file and its training settings when the handler is built.

    Built before the engine runs, so a missing, truncated or foreign checkpoint or one trained with other settings
    fails before any slide is read.

    Args:
        load_path: the checkpoint (a state dict, or ``{"model": ..., "training": {...}}``).
        load_dict: ``{"model": network}``, as for MONAI's ``CheckpointLoader``.
        map_location: as for ``torch.load``.
        expected: the run's values of the settings the weights depend on (the config's ``trained_with``).
        metadata_file: the bundle's ``metadata.json``, describing checkpoints saved without settings and marking
            the shipped demo weights.

    Attributes:
        weights: the checkpoint's :class:`~pathbundles.weights.WeightsIdentity` (sha256, demo or not), which the
            bundles' writers record in every output; demo weights are warned of (logger WARNING) when the
            handler is built, before any slide is read.
    """

    def __init__(self, load_path: str | os.PathLike, load_dict: Mapping[str, Any], map_location: Any = None,
                 expected: Mapping[str, Any] | None = None, metadata_file: str | os.PathLike | None = None) -> None:
        if set(load_dict) != {MODEL_KEY}:
            raise ValueError(f"load_dict must be {{'{MODEL_KEY}': network}}, got keys {sorted(load_dict)}")
        self.load_path, self.network, self.map_location = Path(load_path), load_dict[MODEL_KEY], map_location
        self.expected = dict(expected or {})
        state, trained = split_checkpoint(read_checkpoint(self.load_path, map_location))
        source = "the checkpoint"
        if trained is None:
            trained, source = metadata_settings(self.load_path, metadata_file), f"{metadata_file}"
        check_training_settings(self.load_path, trained, self.expected, source)
        check_fit(self.load_path, self.network, state)
        self._state: dict | None = state
        self.weights = identify(self.load_path, metadata_file)
        self.weights.log_warning("start")  # here, not when the engine starts: a run without batches never starts it

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Any = None) -> None:
        # The weights read when the handler was built, once; a second run of the engine reads the file again.
        state = self._state if self._state is not None else read_weights(self.load_path, self.map_location)
        self._state = None
        check_fit(self.load_path, self.network, state)
        self.network.load_state_dict(state)
        logger.info("Restored weights from %s", self.load_path)
