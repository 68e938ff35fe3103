"""Inference-time rewrites of a trained network that keep its outputs: BatchNorm folded into the convolution before
it, channels_last memory format, and (when asked) ``torch.compile``.

Folding (``fold_batchnorm``): in eval mode a BatchNorm after a convolution is an affine map per channel, so it can be
merged into that convolution's weights and bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``), which saves one pass
over every activation map. The outputs equal the unfolded network's up to float rounding (tested with every bundle's
shipped weights, relative to the logit scale).

Pairs are found by tracing ``forward`` with ``torch.fx`` (a convolution whose output goes only to a BatchNorm); a
module that cannot be traced (data-dependent control flow) is searched in its children, and inside a
``torch.nn.Sequential`` adjacent pairs are used. The module tree is kept: the convolution is replaced by the folded
one and the BatchNorm by ``nn.Identity`` under their own names, so inferers that call sub-modules
(``network.encoder``) still work. Weights must be loaded before folding; the folded network cannot load a
checkpoint of the unfolded one.

:class:`PrepareNetworkForInference` applies them in a MONAI evaluator, after its checkpoint loader.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from pathbundles.checks import flag

logger = logging.getLogger(__name__)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _traced_pairs(module: nn.Module) -> list[tuple[str, str]] | None:
    """(conv name, batchnorm name) pairs in ``module``'s traced forward (names relative to it), or None when it
    cannot be traced."""
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception:  # noqa: BLE001 - any tracing failure: search the children instead
        return None
    modules = dict(module.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _NORMS) or len(node.args) != 1:
            continue
        source = node.args[0]
        if (getattr(source, "op", None) == "call_module" and isinstance(modules.get(source.target), _CONVS)
                and len(source.users) == 1 and calls[source.target] == 1 and calls[node.target] == 1):
            pairs.append((source.target, node.target))
    return pairs


def _sequential_pairs(module: nn.Sequential) -> list[tuple[str, str]]:
    names = list(module._modules)
    return [(a, b) for a, b in zip(names, names[1:])
            if isinstance(module._modules[a], _CONVS) and isinstance(module._modules[b], _NORMS)]


def conv_batchnorm_pairs(module: nn.Module, prefix: str = "") -> list[tuple[str, str]]:
    """Qualified names of every (convolution, BatchNorm) pair whose BatchNorm can be folded into the convolution."""
    pairs = _traced_pairs(module)
    if pairs is not None:
        return [(prefix + a, prefix + b) for a, b in pairs]
    found = [(prefix + a, prefix + b) for a, b in _sequential_pairs(module)] if isinstance(module, nn.Sequential) \
        else []
    paired = {name for pair in found for name in pair}
    for name, child in module.named_children():
        if prefix + name not in paired:
            found += conv_batchnorm_pairs(child, f"{prefix}{name}.")
    return found


def _set(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def fold_batchnorm(network: nn.Module) -> int:
    """Fold every foldable BatchNorm into the convolution before it, in place, and put ``network`` in eval mode;
    returns how many were folded."""
    network.eval()
    pairs = conv_batchnorm_pairs(network)
    for conv_name, norm_name in pairs:
        conv, norm = network.get_submodule(conv_name), network.get_submodule(norm_name)
        _set(network, conv_name, fuse_conv_bn_eval(conv, norm))
        _set(network, norm_name, nn.Identity())
    return len(pairs)


def _exported(network: Any) -> bool:
    """Whether ``network`` is an exported graph (TorchScript, an ONNX session): fixed, never rewritten."""
    return not isinstance(network, nn.Module) or isinstance(network, torch.jit.ScriptModule)


def prepare_for_inference(network: nn.Module, fold: bool = True, channels_last: bool = False) -> nn.Module:
    """``network`` (weights loaded) in eval mode with its BatchNorms folded (``fold``) and in channels_last memory
    format (``channels_last``, 4-D weights only); changed in place and returned. An exported network (TorchScript,
    an ONNX session) is returned as it is: its graph is fixed."""
    if _exported(network):
        logger.info("network is an exported graph (%s): not rewritten for inference", type(network).__name__)
        return network
    network.eval()
    folded = fold_batchnorm(network) if fold else 0
    if channels_last:
        network.to(memory_format=torch.channels_last)
    logger.info("network prepared for inference: %d BatchNorm(s) folded into convolutions, channels_last %s",
                folded, "on" if channels_last else "off")
    return network


def compile_for_inference(network: nn.Module) -> nn.Module:
    """Compile ``network``'s calls with ``torch.compile`` (inductor, one graph per input shape), in place: the
    module, its weights and its sub-modules stay as they are (an inferer that calls ``network.encoder`` runs that
    part eagerly). The first call of each shape compiles (seconds to tens of seconds on a CPU; inductor caches the
    code on disk for later runs). An exported network is returned as it is."""
    if _exported(network):
        logger.info("network is an exported graph (%s): not compiled", type(network).__name__)
        return network
    network.compile(dynamic=False)
    logger.info("network compiled with torch.compile (each new input shape compiles on its first call)")
    return network


@contextmanager
def prepared_eval_mode(*nets: Any) -> Iterator[list[Any]]:
    """MONAI's ``eval_mode`` for networks already in eval mode: ``torch.no_grad`` without calling ``eval()``.

    MONAI's evaluator enters ``eval_mode(network)`` around every batch, and ``eval()`` walks every sub-module:
    2.5 ms per batch for DMMN's 255 modules (0.33 s of a 4096 px slide's 128 batches, measured 2026-12-08), time
    the network waits. A network prepared for inference is put in eval mode once (:class:`PrepareNetworkForInference`
    installs this context in the evaluator); one whose own flag says training again gets MONAI's ``eval_mode``.
    """
    from monai.networks.utils import eval_mode

    if any(getattr(n, "training", False) for n in nets):
        with eval_mode(*nets) as out:
            yield out
        return
    with torch.no_grad():
        yield list(nets)


class PrepareNetworkForInference:
    """MONAI handler: when the evaluator starts (after the checkpoint loader listed before it), rewrite its network
    for inference with :func:`prepare_for_inference`, then compile it (:func:`compile_for_inference`) when asked.
    The network is then in eval mode for the run, and an evaluator in MONAI's eval mode enters
    :func:`prepared_eval_mode` around each batch instead of walking the network's modules every time (the same
    outputs).

    Args:
        fold_batchnorm: fold BatchNorms into the convolutions before them (a bundle's ``fold_batchnorm`` key).
        channels_last: channels_last memory format (``channels_last`` key).
        compile: ``torch.compile`` the network (``compile_network`` key of scannet, segmitos and dmmn; default
            off: on the 2-core CPU whole runs were no faster: dmmn within +-5 % at 16384 px, up to 3x slower on
            small slides, where compilation dominates; benchmarks/README.md, bench_scaling.py).
    """

    def __init__(self, fold_batchnorm: Any = True, channels_last: Any = False, compile: Any = False) -> None:
        self.fold_batchnorm = flag(fold_batchnorm, "fold_batchnorm")
        self.channels_last = flag(channels_last, "channels_last")
        self.compile = flag(compile, "compile")

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Any) -> None:
        network = getattr(engine.network, "module", engine.network)
        if self.fold_batchnorm or self.channels_last:
            prepare_for_inference(network, fold=self.fold_batchnorm, channels_last=self.channels_last)
        if self.compile:
            compile_for_inference(network)
        from monai.networks.utils import eval_mode

        if getattr(engine, "mode", None) is eval_mode:
            if hasattr(engine.network, "eval"):
                engine.network.eval()
            engine.mode = prepared_eval_mode
