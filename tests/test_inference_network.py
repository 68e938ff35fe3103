"""Inference-time network rewrites (pathbundles.inference_network): BatchNorm folded into convolutions and
channels_last give every bundle's shipped network the outputs of the plain one, within 1e-4 of the logit scale;
pairs are found through torch.fx, through Sequentials when tracing fails, and never where folding would change the
result."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from torch import nn

from pathbundles.errors import SettingError
from pathbundles.inference_network import (PrepareNetworkForInference, conv_batchnorm_pairs, fold_batchnorm,
                                           prepare_for_inference)

REPO = Path(__file__).resolve().parents[1]
#: Per shipped weights file: the bundle, config overrides that fit it, an input.
SHIPPED = {
    "scannet/models/model.pt": ("scannet", {}, (1, 3, 340, 340)),
    "spatial_lstm/models/model.pt": ("spatial_lstm", {}, (2, 9, 3, 224, 224)),
    "segmitos/models/model.pt": ("segmitos", {}, (1, 3, 333, 411)),
    "segmitos/models/model_8s.pt": ("segmitos", {"variant": "8s"}, (1, 3, 333, 411)),
    "dmmn/models/model.pt": ("dmmn", {}, (1, 9, 256, 256)),
}
TOLERANCE = 1e-4  # of the logit scale (std of the plain network's output)


def _shipped_network(weights: str) -> nn.Module:
    bundle, overrides, _ = SHIPPED[weights]
    parser = ConfigParser()
    parser.read_config(REPO / "bundles" / bundle / "configs" / "inference.json")
    parser.update(overrides)
    network = parser.get_parsed_content("network_def")
    state = torch.load(REPO / "bundles" / weights, map_location="cpu", weights_only=True)
    network.load_state_dict(state.get("model", state) if isinstance(state.get("model"), dict) else state)
    return network.eval()


@pytest.mark.parametrize("weights", sorted(SHIPPED))
def test_shipped_networks_folded_and_channels_last_equal_the_plain_ones(weights: str) -> None:
    torch.manual_seed(0)
    network = _shipped_network(weights)
    n_norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in network.modules())
    names = {name for name, _ in network.named_modules()}
    x = torch.rand(SHIPPED[weights][2]) * 2 - 1
    with torch.no_grad():
        plain = network(x)
        for channels_last in (False, True):
            fast = copy.deepcopy(network)
            prepare_for_inference(fast, fold=True, channels_last=channels_last)
            assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fast.modules())
            assert {name for name, _ in fast.named_modules()} == names  # the module tree is kept
            out = fast(x)
            assert out.shape == plain.shape
            assert float((out - plain).abs().max()) <= TOLERANCE * float(plain.std()), weights
    assert n_norms > 0 and len(conv_batchnorm_pairs(network)) == n_norms


class _Branching(nn.Module):
    """Data-dependent control flow (torch.fx cannot trace it) around a Sequential of conv, BN, ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                                  nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) if float(x.mean()) > -10 else x


class _NotFoldable(nn.Module):
    """A conv whose output is used beside its BN, and a conv called twice: folding either would change results."""

    def __init__(self) -> None:
        super().__init__()
        self.skip, self.skip_bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.shared, self.shared_bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.skip(x)
        return self.skip_bn(y) + y + self.shared_bn(self.shared(self.shared(x)))


def _randomise_norms(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 2)
            m.bias.data.uniform_(-1, 1)
    return module.eval()


def test_untraceable_module_is_folded_through_its_sequential() -> None:
    torch.manual_seed(1)
    net = _randomise_norms(_Branching())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        plain = net(x)
        assert conv_batchnorm_pairs(net) == [("body.0", "body.1"), ("body.3", "body.4")]
        assert fold_batchnorm(net) == 2
        assert isinstance(net.body[1], nn.Identity) and isinstance(net.body[4], nn.Identity)
        torch.testing.assert_close(net(x), plain, rtol=0, atol=1e-5)


def test_no_fold_where_it_would_change_the_result() -> None:
    torch.manual_seed(2)
    net = _randomise_norms(_NotFoldable())
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        plain = net(x)
        assert conv_batchnorm_pairs(net) == [] and fold_batchnorm(net) == 0
        torch.testing.assert_close(net(x), plain, rtol=0, atol=0)


def test_handler_settings_and_exported_graphs() -> None:
    with pytest.raises(SettingError, match="channels_last"):
        PrepareNetworkForInference(channels_last="maybe")
    off = PrepareNetworkForInference(fold_batchnorm="false", channels_last="False")
    assert (off.fold_batchnorm, off.channels_last) == (False, False)
    net = _randomise_norms(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))
    engine = type("Engine", (), {"network": net})()
    off(engine)
    assert isinstance(net[1], nn.BatchNorm2d)  # both off: untouched
    PrepareNetworkForInference()(engine)
    assert isinstance(net[1], nn.Identity)
    scripted = torch.jit.script(_randomise_norms(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))))
    assert prepare_for_inference(scripted) is scripted  # an exported graph is left as it is


class _CountingNet(nn.Sequential):
    """A Sequential that counts the ``train``/``eval`` calls reaching it (each one walks every sub-module)."""

    def __init__(self, *modules: nn.Module) -> None:
        super().__init__(*modules)
        self.mode_calls = 0

    def train(self, mode: bool = True) -> nn.Module:
        self.mode_calls += 1
        return super().train(mode)


def _evaluate(net: nn.Module, handlers: list, n_batches: int = 4) -> tuple[list[torch.Tensor], object]:
    from monai.engines import SupervisedEvaluator

    torch.manual_seed(1)
    data = [{"image": torch.rand(2, 3, 12, 10)} for _ in range(n_batches)]
    outputs: list[torch.Tensor] = []
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=data, network=net,
                                    val_handlers=handlers, decollate=False)
    from ignite.engine import Events

    evaluator.add_event_handler(Events.ITERATION_COMPLETED,
                                lambda engine: outputs.append(engine.state.output["pred"].clone()))
    evaluator.run()
    return outputs, evaluator


def test_prepared_network_is_not_walked_into_eval_mode_every_batch() -> None:
    """After the handler, the evaluator enters ``prepared_eval_mode`` per batch: no ``eval()`` walk over the
    modules (MONAI's ``eval_mode`` makes one per batch), gradients off, the same outputs as MONAI's own; a
    network set back to training gets MONAI's ``eval_mode`` again."""
    from monai.networks.utils import eval_mode

    from pathbundles.inference_network import prepared_eval_mode

    def network() -> _CountingNet:
        torch.manual_seed(0)
        return _CountingNet(nn.Conv2d(3, 4, 3, padding=1), _randomise_norms(nn.BatchNorm2d(4)), nn.ReLU())

    plain_net = network()
    plain, plain_engine = _evaluate(plain_net, [])
    assert plain_engine.mode is eval_mode and plain_net.mode_calls >= 4  # MONAI: one eval() per batch
    prepared_net = network()
    prepared, engine = _evaluate(prepared_net, [PrepareNetworkForInference(fold_batchnorm=False)])
    assert engine.mode is prepared_eval_mode
    assert prepared_net.mode_calls == 1  # the handler's one eval(), none per batch
    assert len(prepared) == len(plain) == 4
    for ours, theirs in zip(prepared, plain):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        assert not ours.requires_grad
    with prepared_eval_mode(prepared_net) as nets:
        assert nets == [prepared_net] and not torch.is_grad_enabled() and not prepared_net.training
    prepared_net.train()
    with prepared_eval_mode(prepared_net):
        assert not prepared_net.training and not prepared_net[1].training
    assert prepared_net.training  # MONAI's eval_mode restores what it found


def test_compile_key_is_off_by_default_and_the_compiled_network_gives_the_eager_outputs() -> None:
    """``compile_network`` (every bundle, default false) compiles the prepared network in place: the module and its
    sub-modules stay the same objects, the outputs equal the eager ones to float rounding; exported graphs are
    left as they are."""
    from pathbundles.inference_network import compile_for_inference

    for bundle in ("scannet", "segmitos", "dmmn"):
        doc = json.loads((REPO / "bundles" / bundle / "configs" / "inference.json").read_text())
        assert doc["compile_network"] is False and doc["prepare_network"]["compile"] == "@compile_network", bundle
    # spatial_lstm's inferer calls the network's cnn, lstm and classifier, never the network: nothing to compile.
    doc = json.loads((REPO / "bundles" / "spatial_lstm" / "configs" / "inference.json").read_text())
    assert "compile_network" not in doc and "compile" not in doc["prepare_network"]
    torch.manual_seed(0)
    net = _randomise_norms(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                         nn.Conv2d(8, 2, 1)))
    x = torch.rand(2, 3, 40, 48)
    with torch.no_grad():
        eager = net.eval()(x)
        engine = type("Engine", (), {"network": net})()
        PrepareNetworkForInference(compile="true")(engine)
        assert engine.network is net and isinstance(net[1], nn.Identity)
        assert net._compiled_call_impl is not None  # noqa: SLF001 - what nn.Module.compile sets
        compiled = net(x)
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(net(x[:1]), eager[:1], rtol=1e-5, atol=1e-5)  # a new shape compiles again
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 3, 1)))
    assert compile_for_inference(scripted) is scripted


def test_every_bundle_config_with_a_checkpoint_loader_prepares_the_network_after_it() -> None:
    """Each handler list that loads weights lists the rewrite right after the loader (it must see loaded weights);
    exported graphs switch it off."""
    for config in sorted((REPO / "bundles").glob("*/configs/*.json")):
        doc = json.loads(config.read_text())
        handlers = doc.get("handlers")
        if isinstance(handlers, list) and "@checkpoint_loader" in handlers:
            at = handlers.index("@checkpoint_loader")
            assert handlers[at + 1] == "@prepare_network", config
        if config.name == "exported.json":
            assert doc["fold_batchnorm"] is False and doc["channels_last"] is False, config


#: bfloat16 autocast against float32, per bundle: the largest probability difference allowed on a random input
#: through the bundle's own inferer with its shipped network (measured 2026-12-07: scannet 2.7e-6, spatial_lstm
#: 1.3e-4, segmitos 4.2e-3, dmmn 0.091 on noise; the held-out phantoms' metrics are in benchmarks/bench_autocast.py).
AUTOCAST = {
    "scannet/models/model.pt": ({"lp": 4}, 0.01),
    "spatial_lstm/models/model.pt": ({"tile_px": 2, "tta": False}, 0.01),
    "segmitos/models/model.pt": ({}, 0.05),
    "dmmn/models/model.pt": ({}, 0.25),
}


def _autocast_input(bundle: str, inferer) -> torch.Tensor:
    geometry = getattr(getattr(inferer, "inferer", None), "geometry", None)
    if bundle == "dmmn":
        return torch.rand(1, 9, 256, 256) * 2 - 1
    if bundle == "segmitos":
        return torch.rand(1, 3, 320, 352) * 2 - 1
    return torch.rand(1, 3, geometry.read_px, geometry.read_px) * 2 - 1


@pytest.mark.parametrize("weights", sorted(AUTOCAST))
def test_autocast_key_is_off_by_default_and_bfloat16_stays_close(weights: str) -> None:
    """Each bundle's ``inferer`` is its method's inferer under ``AutocastInferer``, off by default (the float32
    result exactly); ``--autocast true`` runs the shipped network in bfloat16 within the stated difference."""
    from pathbundles.inferers import AutocastInferer

    bundle, overrides, _ = SHIPPED[weights]
    parser = ConfigParser()
    parser.read_config(REPO / "bundles" / bundle / "configs" / "inference.json")
    parser.update({**overrides, **AUTOCAST[weights][0]})
    inferer = parser.get_parsed_content("inferer")
    assert isinstance(inferer, AutocastInferer) and inferer.enabled is False and inferer.dtype == torch.bfloat16
    if bundle != "dmmn":
        assert inferer.inferer is parser.get_parsed_content("network_inferer")
    network = prepare_for_inference(_shipped_network(weights), channels_last=True)
    conv_dtypes: list[torch.dtype] = []
    first_conv = next(m for m in network.modules() if isinstance(m, nn.Conv2d))
    first_conv.register_forward_hook(lambda m, i, o: conv_dtypes.append(o.dtype))
    torch.manual_seed(1)
    x = _autocast_input(bundle, inferer)
    with torch.no_grad():
        plain = inferer.inferer(x, network)
        off = inferer(x, network)
        assert set(conv_dtypes) == {torch.float32}
        conv_dtypes.clear()
        inferer.enabled = True
        on = inferer(x, network)
        assert set(conv_dtypes) == {torch.bfloat16}  # the convolutions ran in bfloat16
    assert torch.equal(off, plain)
    if bundle == "dmmn":  # the bare network: logits in bfloat16
        assert on.dtype == torch.bfloat16
        plain, on = plain.softmax(1), on.float().softmax(1)
    else:
        assert on.dtype == torch.float32
    assert on.shape == plain.shape
    difference = float((on - plain).abs().max())
    assert difference <= AUTOCAST[weights][1], (weights, difference)
    assert float((on.argmax(1) == plain.argmax(1)).float().mean()) >= 0.95
