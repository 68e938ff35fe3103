"""Networks exported by MONAI's bundle commands, run inside a bundle in place of its ``network_def``.

``python -m monai.bundle ckpt_export`` writes TorchScript (script mode, or trace mode with ``--use_trace True``) and
``python -m monai.bundle onnx_export`` writes ONNX; every bundle's ``docs/README.md`` gives the commands and its
``configs/onnx_export.json`` the ONNX input shape and dynamic axes. Merging ``configs/exported.json`` after a
bundle's ``inference.json`` runs the bundle from such a file (``--exported_model``, default ``models/model.ts``):

- ``network_def`` becomes :func:`load_exported` of the file: :class:`TorchScriptNetwork`, or
  :class:`OnnxRuntimeNetwork` for a ``.onnx`` file;
- ``checkpoint_loader`` becomes :class:`ExportedWeights`, which loads nothing: the weights are in the file (it
  tells the writer whether they are an export of the demo weights).

An exported network has ``forward`` only; the spatial LSTM's inferer then cuts every grid itself
(:func:`pathbundles.spatial_lstm.lattice_map`), giving the same map. ONNX Runtime comes with the ``export`` extra
(``pip install "pathbundles[export]"``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pathbundles.errors import InputError

logger = logging.getLogger(__name__)

#: ONNX Runtime providers tried in this order, where the installed onnxruntime has them.
ORT_PROVIDERS: tuple[str, ...] = ("CUDAExecutionProvider", "CPUExecutionProvider")


def _unreadable(path: Path, what: str, exc: Exception) -> InputError:
    """An InputError naming the file and the first line of the reader's error (torch and onnxruntime add pages)."""
    text = str(exc).strip()
    return InputError(path, f"not {what} ({type(exc).__name__}: {text.splitlines()[0] if text else ''})")


def _existing_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, f"{what} does not exist" if not path.exists() else f"{what} is not a file")
    return path


class TorchScriptNetwork(nn.Module):
    """A TorchScript file from ``ckpt_export`` (script or trace mode) as a network.

    Args:
        path: the ``.ts`` file (weights included).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        self.path = _existing_file(path, "exported TorchScript model")
        try:
            self.module = torch.jit.load(str(self.path), map_location="cpu")
        except Exception as exc:  # torch reports a zip, a pickle or a TorchScript error alike
            raise _unreadable(self.path, "a readable TorchScript model", exc) from exc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class OnnxRuntimeNetwork(nn.Module):
    """An ONNX file from ``onnx_export`` run by ONNX Runtime, as a network: float32 in, float32 out, on the input's
    device (the session runs on CUDA where the installed onnxruntime has it, else on the CPU).

    Args:
        path: the ``.onnx`` file (weights included; one input, the first output is returned).
        providers: ONNX Runtime execution providers; None = those of :data:`ORT_PROVIDERS` that are installed.
    """

    def __init__(self, path: str | os.PathLike, providers: list[str] | None = None) -> None:
        super().__init__()
        self.path = _existing_file(path, "exported ONNX model")
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise InputError(self.path, 'running an ONNX model needs onnxruntime: pip install "pathbundles[export]"'
                             ) from exc
        available = ort.get_available_providers()
        chosen = providers or [p for p in ORT_PROVIDERS if p in available]
        try:
            self.session = ort.InferenceSession(str(self.path), providers=chosen)
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / InvalidProtobuf types
            raise _unreadable(self.path, "a model ONNX Runtime can run", exc) from exc
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise InputError(self.path, f"has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); a bundle "
                                        "network takes one")
        self.input_name = inputs[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        out = self.session.run(None, {self.input_name: array})[0]
        return torch.from_numpy(out).to(x.device)


def load_exported(path: str | os.PathLike) -> nn.Module:
    """The network of an exported file: :class:`OnnxRuntimeNetwork` for ``.onnx``, else :class:`TorchScriptNetwork`.

    Args:
        path: a file written by ``ckpt_export`` or ``onnx_export``.
    """
    return OnnxRuntimeNetwork(path) if Path(path).suffix.lower() == ".onnx" else TorchScriptNetwork(path)


class ExportedWeights:
    """Stands in for the bundle's ``CheckpointLoader`` when ``network_def`` is an exported model: its weights are
    in the exported file, so nothing is loaded; the run's log names the file they come from.

    Args:
        path: the exported model (as given to :func:`load_exported`).
        network: the network :func:`load_exported` made of it (a TorchScript one has its tensors compared with the
            bundle's demo weights).
        metadata_file: the bundle's ``metadata.json`` (which marks its demo weights).

    Attributes:
        weights: the file's :class:`~pathbundles.weights.WeightsIdentity`
            (:func:`pathbundles.weights.identify_exported`): an export of the demo weights is demo weights.
    """

    def __init__(self, path: str | os.PathLike, network: Any = None,
                 metadata_file: str | os.PathLike | None = None) -> None:
        from pathbundles.weights import identify_exported

        self.path = Path(path)
        self.weights = identify_exported(self.path, metadata_file, network)
        self.weights.log_warning("start")

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Any = None) -> None:
        logger.info("Weights from the exported model %s", self.path)
