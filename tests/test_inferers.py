"""AutocastInferer: mixed precision on the inputs' device, switchable off."""

from __future__ import annotations

import pytest
import torch

from pathbundles.inferers import AutocastInferer


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1))


def test_bfloat16_on_cpu_close_to_full_precision() -> None:
    net, x = _net(), torch.rand(2, 3, 16, 16)
    full = net(x)
    out = AutocastInferer("bfloat16")(x, net)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 2, 16, 16)
    # bfloat16 keeps 8 significant bits: relative error about 2^-8 per product, summed over 8 x 3 x 9 terms.
    assert torch.allclose(out.float(), full, atol=0.05, rtol=0.02)
    assert not torch.equal(out.float(), full)


def test_disabled_is_the_plain_network() -> None:
    net, x = _net(), torch.rand(1, 3, 8, 8)
    out = AutocastInferer(torch.bfloat16, enabled=False)(x, net)
    assert out.dtype == torch.float32 and torch.equal(out, net(x))


def test_gradients_flow_in_float32_parameters() -> None:
    net, x = _net(), torch.rand(2, 3, 8, 8)
    AutocastInferer()(x, net).float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.parameters())


def test_unknown_dtype_name_is_refused() -> None:
    with pytest.raises(ValueError, match="half_precision"):
        AutocastInferer("half_precision")


class _Doubling:
    """An inferer of its own that casts the network's output to float32, as the method inferers do."""

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
        self.dtype_seen = network(inputs).dtype
        return torch.softmax(network(inputs).float(), dim=1) * 2


def test_wraps_another_inferer_whose_network_calls_run_in_bfloat16() -> None:
    net, x = _net(), torch.rand(2, 3, 16, 16)
    inner = _Doubling()
    with torch.no_grad():
        out = AutocastInferer("bfloat16", inferer=inner)(x, net)
        assert inner.dtype_seen == torch.bfloat16 and out.dtype == torch.float32
        full = torch.softmax(net(x), dim=1) * 2
        assert float((out - full).abs().max()) < 0.02 and not torch.equal(out, full)
        off = AutocastInferer("bfloat16", enabled=False, inferer=inner)(x, net)
    assert inner.dtype_seen == torch.float32 and torch.equal(off, full)


def test_an_inferer_that_is_not_callable_is_refused() -> None:
    with pytest.raises(TypeError, match="inferer must be an inferer"):
        AutocastInferer(inferer="ScanNetInferer")


class _Recording(torch.nn.Module):
    """A network that notes the type of what it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _net()
        self.seen: list[type] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(type(x))
        return self.net(x)


def test_a_metatensor_batch_reaches_the_network_as_a_plain_tensor_with_the_same_result() -> None:
    from monai.data import MetaTensor

    net, x = _Recording(), torch.rand(2, 3, 16, 16)
    batch = MetaTensor(x.clone(), meta={"location": [[0, 0], [16, 0]]})
    with torch.no_grad():
        plain = AutocastInferer(enabled=False)(batch, net)
        assert net.seen == [torch.Tensor] and type(plain) is torch.Tensor
        meta = net.net(batch)  # the network on the MetaTensor itself: every op carries the metadata along
    assert isinstance(meta, MetaTensor) and torch.equal(plain, meta.as_tensor())
    assert batch.meta["location"] == [[0, 0], [16, 0]]  # the batch keeps its metadata for the writers
