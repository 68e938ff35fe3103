"""Which weights a run uses: their identity (sha256), whether they are a bundle's shipped demo weights, and the
performance claims that hold for them.

Every bundle ships ``models/model.pt`` as DEMO WEIGHTS, trained on synthetic phantom slides: on tissue they give
confident, meaningless numbers (scannet scored a real SVS 0.998 with 3 detections). The bundle's ``metadata.json``
marks them in its ``trained_with`` field, by hash: ``{"models/model.pt": {"sha256": ..., "demo": true,
"settings": {...}}}``. Demo is decided by that hash, never by the file's name or place: weights retrained into
``models/model.pt`` are not demo weights, and a copy of the demo file anywhere still is.

``metadata.json``'s ``eval_metrics`` name the weights they were measured on (their ``weights_sha256`` field); any
other weights (a training run's, even written to the same ``models/model.pt`` under the same bundle version) have
none: :attr:`WeightsIdentity.eval_metrics` is :data:`NOT_MEASURED` for them, and ``registry register`` tags their
version so. Their own measurements are the tracked ``evaluate`` runs, which carry the weights' sha256
(:mod:`pathbundles.tracking`) and which the registry's review reads.

Runs record the identity in their outputs under the names of :meth:`WeightsIdentity.record`
(``weights_sha256``, ``demo_weights``, ``weights_warning``), and log :data:`DEMO_WARNING` at their start and end.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: The one line every output of a run on demo weights carries.
DEMO_WARNING = "DEMO WEIGHTS trained on synthetic phantoms: not a result on tissue"
#: ``eval_metrics`` of weights that no evaluation in the bundle's metadata describes.
NOT_MEASURED = "not measured"
#: The metadata.json field naming the shipped weights by hash (see :mod:`pathbundles.checkpoints`).
METADATA_FIELD = "trained_with"
#: Column names (CSV) and keys (JSON) of the identity in a run's outputs, in this order.
RECORD_FIELDS = ("weights_sha256", "demo_weights", "weights_warning")


@dataclass(frozen=True)
class WeightsIdentity:
    """The weights a run loads.

    Args:
        path: the weights file (a checkpoint, or an exported TorchScript/ONNX model).
        sha256: hex sha256 of the file's bytes; None when the file does not exist.
        demo: True for a bundle's shipped demo weights (by hash, or by the tensors of an export of them), False
            for any other weights, None when it could not be told (an ONNX export).
        eval_metrics: the metadata's ``eval_metrics`` when they were measured on these weights, else
            :data:`NOT_MEASURED`.
    """

    path: str
    sha256: str | None
    demo: bool | None
    eval_metrics: Any = NOT_MEASURED

    @property
    def warning(self) -> str | None:
        """:data:`DEMO_WARNING` for demo weights (and for weights that may be an export of them), else None."""
        if self.demo:
            return DEMO_WARNING
        if self.demo is None:
            return f"weights {self.path} could not be compared with the demo weights: they may be {DEMO_WARNING}"
        return None

    def record(self) -> dict[str, Any]:
        """``{"weights_sha256", "demo_weights", "weights_warning"}``: the fields every output of a run carries."""
        return {"weights_sha256": self.sha256, "demo_weights": self.demo, "weights_warning": self.warning}

    def csv_values(self) -> list[str]:
        """The :data:`RECORD_FIELDS` as CSV cells: demo as ``true``/``false``/``unknown``, no warning as empty."""
        demo = "unknown" if self.demo is None else str(self.demo).lower()
        return [self.sha256 or "", demo, self.warning or ""]

    def log_warning(self, when: str) -> None:
        """Log the warning (WARNING level) of demo weights, naming the file and the moment (``start``/``end``)."""
        if self.warning:
            logger.warning("%s (%s of the run; weights %s, sha256 %s)", self.warning, when, self.path,
                           (self.sha256 or "?")[:12])


def _metadata(metadata_file: str | os.PathLike | None) -> dict:
    if metadata_file is None or not Path(metadata_file).is_file():
        return {}
    return json.loads(Path(metadata_file).read_text(encoding="utf-8"))


def described_weights(metadata: Mapping[str, Any]) -> dict[str, dict]:
    """``{sha256: entry}`` of the weights a bundle's metadata describes in its ``trained_with`` field."""
    entries = (metadata.get(METADATA_FIELD) or {}).values()
    return {e["sha256"]: dict(e) for e in entries if isinstance(e, Mapping) and isinstance(e.get("sha256"), str)}


def measured_metrics(metadata: Mapping[str, Any], sha256: str) -> Any:
    """``metadata.json``'s ``eval_metrics`` when they were measured on the weights with ``sha256`` (their own
    ``weights_sha256`` field names them), else :data:`NOT_MEASURED`."""
    metrics = metadata.get("eval_metrics")
    return dict(metrics) if isinstance(metrics, Mapping) and metrics.get("weights_sha256") == sha256 else NOT_MEASURED


def identify(path: str | os.PathLike, metadata_file: str | os.PathLike | None) -> WeightsIdentity:
    """The identity of a checkpoint file, by its sha256 against the bundle's ``metadata.json``.

    Args:
        path: the weights file.
        metadata_file: the bundle's ``configs/metadata.json`` (None: no weights are known as demo).
    """
    from pathbundles.bundle_runner import sha256_file

    path = Path(path)
    if not path.is_file():
        return WeightsIdentity(str(path), None, False)
    digest = sha256_file(path)
    metadata = _metadata(metadata_file)
    entry = described_weights(metadata).get(digest) or {}
    return WeightsIdentity(str(path), digest, bool(entry.get("demo")), measured_metrics(metadata, digest))


def identify_exported(path: str | os.PathLike, metadata_file: str | os.PathLike | None,
                      network: Any = None) -> WeightsIdentity:
    """The identity of an exported model (``ckpt_export``/``onnx_export``): its own sha256; demo when its tensors
    equal those of the bundle's demo checkpoint (a TorchScript export of the demo weights), not demo when they
    differ, unknown (None) when they could not be compared: an ONNX file (its exporter may fold weights together),
    tensors of other names, or a bundle whose demo checkpoint is not there.

    Args:
        path: the exported file.
        metadata_file: the bundle's ``configs/metadata.json``; its demo checkpoints are looked for beside it, at the
            paths its ``trained_with`` entries name (relative to the bundle folder).
        network: the loaded exported network (:func:`pathbundles.exported.load_exported`), whose tensors are
            compared when it is TorchScript; None loads a TorchScript file here.
    """
    import torch

    from pathbundles.bundle_runner import sha256_file
    from pathbundles.checkpoints import read_weights

    path = Path(path)
    if not path.is_file():
        return WeightsIdentity(str(path), None, False)
    digest = sha256_file(path)
    if network is None and path.suffix.lower() != ".onnx":
        from pathbundles.exported import TorchScriptNetwork

        network = TorchScriptNetwork(path)
    module = getattr(network, "module", None)
    if not isinstance(module, torch.jit.ScriptModule):
        return WeightsIdentity(str(path), digest, None)
    exported = module.state_dict()
    metadata = _metadata(metadata_file)
    bundle_root = Path(metadata_file).resolve().parent.parent if metadata_file else None
    compared = False
    for relative, entry in (metadata.get(METADATA_FIELD) or {}).items():
        if not (isinstance(entry, Mapping) and entry.get("demo") and bundle_root is not None):
            continue
        demo_file = bundle_root / relative
        if not demo_file.is_file() or sha256_file(demo_file) != entry.get("sha256"):
            continue
        demo_state = read_weights(demo_file)
        if demo_state.keys() != exported.keys():
            continue  # other tensor names (an exporter that renames them): not comparable
        compared = True
        if all(torch.equal(demo_state[k].cpu(), exported[k].cpu()) for k in exported):
            return WeightsIdentity(str(path), digest, True, measured_metrics(metadata, entry["sha256"]))
    # Not compared with any demo checkpoint: unknown, so that an export of the demo weights is never called clean.
    return WeightsIdentity(str(path), digest, False if compared else None)


class RecordsWeights:
    """Mixin of the bundles' writers: the run's weights (``weights``, None when not told) as the fields their files
    record."""

    weights: WeightsIdentity | None = None

    def weights_record(self) -> dict[str, Any]:
        """:meth:`WeightsIdentity.record` of the run's weights, ``{}`` when the writer was not told them."""
        return {} if self.weights is None else self.weights.record()

    def warn_at_end(self) -> None:
        """Log the demo warning of the run's end, once per writer (the report and the config's run list both end
        the run)."""
        if self.weights is not None and not getattr(self, "_warned_at_end", False):
            self.weights.log_warning("end")
            self._warned_at_end = True


def csv_header_and_row(identity: WeightsIdentity | None) -> tuple[list[str], list[str]]:
    """The columns a run's CSV tables append after their own (none when the run's weights are unknown)."""
    return ([], []) if identity is None else (list(RECORD_FIELDS), identity.csv_values())


def weights_identity(info: Mapping[str, Any]) -> WeightsIdentity | None:
    """The identity a :func:`pathbundles.bundle_runner.bundle_info` record carries (None when it has none)."""
    if "demo_weights" not in info:
        return None
    return WeightsIdentity(str(info.get("weights")), info.get("weights_sha256"), info.get("demo_weights"))
