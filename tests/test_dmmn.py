"""DMMN networks: M3 concatenation channels, output shapes of every variant, Eq. 1-2 loss, TorchScript."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pathbundles.dmmn import DMMN, VARIANTS, WeightedCELoss, centre_crop, class_weights, label_counts, \
    labels_from_logits


def _inputs(n: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(n, 3, 256, 256, generator=g) for _ in range(3))


def test_m3_concatenation_channels_at_width_1():
    # Shapes need no arithmetic: a width-1 model on the meta device runs the forward pass instantly.
    with torch.device("meta"):
        model = DMMN("M3", num_classes=6, width=1.0)
        inputs = [torch.empty(1, 3, 256, 256) for _ in range(3)]
    seen: dict[int, tuple[int, ...]] = {}
    for i, stage in enumerate(model.dec20.stages):
        stage.up.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, tuple(args[0].shape)))
    out = model(*inputs)
    # (N, channels, H, W) entering each 20x transposed convolution, up4 .. up1: the NOTES table.
    assert seen == {0: (1, 896, 16, 16), 1: (1, 448, 32, 32), 2: (1, 224, 64, 64), 3: (1, 96, 128, 128)}
    assert [s.up[0].in_channels for s in model.dec20.stages] == [896, 448, 224, 96]
    assert [s.up[0].out_channels for s in model.dec20.stages] == [256, 128, 64, 32]
    assert tuple(out.shape) == (1, 6, 256, 256)


def test_centre_crop_matches_the_notes_indices():
    for size, rate, lo, hi in ((32, 2, 8, 24), (64, 4, 24, 40), (256, 2, 64, 192), (256, 4, 96, 160)):
        full = torch.arange(float(size * size)).reshape(1, 1, size, size)
        assert torch.equal(centre_crop(full, rate), full[..., lo:hi, lo:hi])


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_gives_full_size_logits(variant):
    model = DMMN(variant, num_classes=6, width=1 / 8).eval()
    with torch.no_grad():
        out = model(*_inputs(n=2))
    assert out.shape == (2, 6, 256, 256)
    assert torch.isfinite(out).all()
    labels = labels_from_logits(out)
    assert labels.min() >= 1 and labels.max() <= 6


def test_s2_ignores_the_coarse_inputs_and_m3_uses_them():
    x20, x10, x5 = _inputs()
    s2, m3 = DMMN("S2", width=1 / 16).eval(), DMMN("M3", width=1 / 16).eval()
    with torch.no_grad():
        assert torch.equal(s2(x20, x10, x5), s2(x20, torch.zeros_like(x10), torch.zeros_like(x5)))
        assert not torch.equal(m3(x20, x10, x5), m3(x20, torch.zeros_like(x10), x5))
        assert not torch.equal(m3(x20, x10, x5), m3(x20, x10, torch.zeros_like(x5)))


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="M4"):
        DMMN("M4")


def test_class_weights_eq_2():
    w = class_weights([10, 30, 60])
    assert torch.allclose(w, torch.tensor([0.9, 0.7, 0.4]))
    assert np.array_equal(label_counts(np.array([[0, 1, 1], [3, 3, 3]]), 3), [2, 0, 3])
    with pytest.raises(ValueError):
        class_weights([0, 0])


def test_weighted_ce_by_hand():
    # Two classes, 1 x 1 x 3 pixels: class 1, class 2, unannotated.
    logits = torch.tensor([[[[2.0, 0.0, 5.0]], [[0.0, 1.0, -5.0]]]])  # (N=1, C=2, H=1, W=3)
    target = torch.tensor([[[1, 2, 0]]])
    w = torch.tensor([0.25, 0.75])
    p1 = math.exp(2) / (math.exp(2) + 1)  # pixel 0, class 1
    p2 = math.exp(1) / (1 + math.exp(1))  # pixel 1, class 2
    expected = -(0.25 * math.log(p1) + 0.75 * math.log(p2)) / 3  # N = 3 pixels, the unannotated one adds 0
    loss = WeightedCELoss(w)(logits, target)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert WeightedCELoss()(logits, target.unsqueeze(1)).item() == pytest.approx(
        -(math.log(p1) + math.log(p2)) / 3, rel=1e-6)
    logits.requires_grad_(True)
    WeightedCELoss(w)(logits, torch.zeros_like(target)).backward()  # nothing annotated: zero loss, zero gradient
    assert torch.count_nonzero(logits.grad) == 0


def test_m3_traces_to_torchscript_with_the_eager_output(tmp_path):
    model = DMMN("M3", num_classes=6, width=1 / 16).eval()
    inputs = _inputs(seed=1)
    with torch.no_grad():
        traced = torch.jit.trace(model, inputs)
        path = tmp_path / "dmmn_m3.ts"
        traced.save(str(path))
        loaded = torch.jit.load(str(path))
        other = _inputs(seed=2)  # a trace must generalise to new inputs, not replay the example
        assert torch.allclose(loaded(*other), model(*other), atol=1e-5)
