"""Inferers shared by the bundles (method-specific ones live in their method's module)."""

from __future__ import annotations

from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, SimpleInferer

from pathbundles.checks import flag


class AutocastInferer(Inferer):
    """Another inferer (default: ``network(inputs)``, MONAI's ``SimpleInferer``) run under :func:`torch.autocast`
    on the inputs' device.

    MONAI's engines autocast only on CUDA (their ``amp`` flag); this gives the same mixed precision on a CPU, where
    bfloat16 convolutions run on oneDNN's AVX-512 BF16 / AMX kernels where the processor has them (the dmmn
    bundle's demo training used it). Wrapping a method's inferer (``ScanNetInferer``, ``SpatialLSTMInferer``,
    ``SegMitosInferer``) runs its network calls in ``dtype`` and keeps what the inferer does in float32 after them
    (those inferers cast the network's output to float32 before their softmax). With no ``inferer`` the outputs are
    the network's, in ``dtype``: losses and metrics that need float32 cast them (``pathbundles.dmmn.WeightedCELoss``
    does).

    A ``MetaTensor`` batch reaches the inferer and the network as a plain tensor (``as_tensor``: the same memory,
    no copy). Every operation on a MetaTensor copies its metadata along, about 5 % of DMMN's forward on a 2-core
    CPU for metadata nothing reads (the writers take positions from the batch); the outputs are the same numbers.

    Args:
        dtype: autocast dtype, a ``torch.dtype`` or its name ("bfloat16", "float16").
        enabled: False runs in full precision (so a config can switch it with one key).
        inferer: the inferer to run under autocast; None: ``SimpleInferer``.
    """

    def __init__(self, dtype: str | torch.dtype = "bfloat16", enabled: Any = True, inferer: Inferer | None = None
                 ) -> None:
        super().__init__()
        self.dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        if not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"dtype {dtype!r}: expected a torch dtype or its name, e.g. 'bfloat16'")
        self.enabled = flag(enabled, "autocast (AutocastInferer enabled)")
        if inferer is not None and not callable(inferer):
            raise TypeError(f"AutocastInferer: inferer must be an inferer (callable), got {type(inferer).__name__}")
        self.inferer = SimpleInferer() if inferer is None else inferer

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(inputs, MetaTensor):
            inputs = inputs.as_tensor()
        with torch.autocast(inputs.device.type, dtype=self.dtype, enabled=self.enabled):
            return self.inferer(inputs, network, *args, **kwargs)
