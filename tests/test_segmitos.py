"""SegMitos: FCN-32s/16s/8s geometry, bilinear kernels, the 32s -> 16s -> 8s chain, concentric labels and loss,
tiled inference and TorchScript export."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pathbundles.segmitos import (COARSER, ConcentricLoss, RandConcentricLabeld, RandMitosisAugmentd, SegMitosFCN,
                                  SegMitosInferer, bilinear_kernel, chain_network, concentric_label)

WIDTH = 1 / 16  # VGG 4..32 channels, fc6/fc7 256: the same geometry as VGG16 at a fraction of the cost


def _net(variant: str, seed: int = 0) -> SegMitosFCN:
    """An eval-mode narrow net whose logits span several units, so softmax comparisons are not trivially ~0.5."""
    torch.manual_seed(seed)
    net = SegMitosFCN(variant, width=WIDTH).eval()
    torch.nn.init.normal_(net.score_fr.weight, std=1.0)
    for skip in (net.score_pool4, net.score_pool3):
        if skip is not None:
            torch.nn.init.normal_(skip.weight, std=1.0)
    return net


@pytest.mark.parametrize("variant", ["32s", "16s", "8s"])
def test_output_size_equals_input_size(variant: str) -> None:
    net = _net(variant)
    with torch.no_grad():
        for height, width in [(1, 1), (33, 31), (100, 120), (257, 311), (500, 500)]:
            assert net(torch.zeros(1, 3, height, width)).shape == (1, 2, height, width)


def test_layer_recipe() -> None:
    with torch.device("meta"):  # full width for the channel counts, without allocating VGG16's weights
        net = SegMitosFCN("8s", width=1.0)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].padding == (100, 100) and all(c.padding == (1, 1) for c in convs[1:13])
    assert [c.out_channels for c in convs[:15]] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512,
                                                    4096, 4096]
    assert net.fc[0].kernel_size == (7, 7) and net.fc[3].kernel_size == (1, 1) and net.fc[2].p == 0.5
    assert all(m.ceil_mode for m in net.modules() if isinstance(m, torch.nn.MaxPool2d))
    assert net.score_pool4.in_channels == 512 and net.score_pool3.in_channels == 256
    assert (net.upscore.kernel_size, net.upscore.stride, net.crop_px) == ((16, 16), (8, 8), 31)


def test_bilinear_kernels_and_which_are_trained() -> None:
    ramp = torch.tensor([0.25, 0.75, 0.75, 0.25])
    assert torch.equal(bilinear_kernel(4), torch.outer(ramp, ramp))
    ramp64 = 1 - (torch.arange(64) - 31.5).abs() / 32
    assert torch.allclose(bilinear_kernel(64), torch.outer(ramp64, ramp64))
    net = SegMitosFCN("8s", width=WIDTH)
    # Per-class (diagonal) filters: class c only feeds class c.
    assert torch.equal(net.upscore2.weight[0, 0], bilinear_kernel(4)) and not net.upscore2.weight[0, 1].any()
    assert not net.upscore.weight.requires_grad
    assert net.upscore2.weight.requires_grad and net.upscore_pool4.weight.requires_grad
    frozen = SegMitosFCN("16s", width=WIDTH, learnable_upsampling=False)
    assert not frozen.upscore2.weight.requires_grad


def _interp_bound(scores: torch.Tensor) -> float:
    """Largest possible gap between one bilinear upsampling by 2f and a 2x-then-f one of the same score map.

    Both are piecewise-linear interpolations of the (zero-padded) samples; the composite one interpolates the first
    at +-1/4 sample around each knot, so it cuts each corner by at most |second difference| / 8 per axis, and the
    two axes add (the other axis' interpolation has non-negative weights summing to <= 1).
    """
    p = F.pad(scores, (2, 2, 2, 2))
    dxx = (p[..., 2:] - 2 * p[..., 1:-1] + p[..., :-2]).abs().amax()
    dyy = (p[..., 2:, :] - 2 * p[..., 1:-1, :] + p[..., :-2, :]).abs().amax()
    return float(dxx + dyy) / 8


def test_from_coarser_chain() -> None:
    net32 = _net("32s")
    net16 = SegMitosFCN.from_coarser(net32, "16s").eval()
    net8 = SegMitosFCN.from_coarser(net16, "8s").eval()
    for name, value in net32.state_dict().items():
        if not name.startswith("upscore."):
            assert torch.equal(net16.state_dict()[name], value), name
    assert torch.equal(net8.score_pool4.weight, net16.score_pool4.weight)
    assert not net16.score_pool4.weight.any() and not net8.score_pool3.weight.any()
    x = torch.randn(1, 3, 161, 193, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # Exact: with a zero score_pool4 the 16s score map is the 2x-upsampled 32s one.
        assert torch.equal(net16.score_map(x), net16.upscore2(net32.score_map(x)))
        # Outputs: the same samples on the same grid (the crop offsets align them), interpolated in one or two
        # bilinear steps; they differ only near the knots, by at most _interp_bound (plus float rounding).
        out32, out16, out8 = net32(x), net16(x), net8(x)
        gap = (out16 - out32).abs().max().item()
        assert 0 < gap <= _interp_bound(net32.score_map(x)) + 1e-4
        assert (out8 - out16).abs().max().item() <= _interp_bound(net16.score_map(x)) + 1e-4
        assert (out16.argmax(1) == out32.argmax(1)).float().mean() > 0.9
    with pytest.raises(ValueError, match="finer"):
        SegMitosFCN.from_coarser(net16, "32s")


def test_concentric_label_geometry() -> None:
    circle = concentric_label((80, 60), [(30, 40)], r_px=12)
    assert math.pi * 11 ** 2 < (circle == 1).sum() < math.pi * 13 ** 2
    assert set(np.unique(circle)) == {0, 1}
    ring = concentric_label((80, 60), [(30, 40)], r_px=12, R_px=24)
    assert np.array_equal(ring == 1, circle == 1)
    assert math.pi * (24 ** 2 - 13 ** 2) < (ring == 255).sum() < math.pi * (25 ** 2 - 12 ** 2)
    assert (concentric_label((80, 60), [(30, 40)], 12, 24, ignore_index=99) == 99).sum() == (ring == 255).sum()
    # (x, y) = (column, row).
    rows, cols = np.nonzero(concentric_label((50, 30), [(10, 40)], r_px=2))
    assert (rows.mean(), cols.mean()) == (40, 10) and (40, 10) in zip(rows, cols)
    # Overlap: the second mitosis' disc wins over the first one's ring; per-centroid radii.
    two = concentric_label((80, 80), [(20, 40), (40, 40)], r_px=[10, 5], R_px=[25, 6])
    assert two[40, 40] == 1 and two[40, 20] == 1 and two[40, 32] == 255 and two[40, 79] == 0
    assert two[40, 46] == 255 and two[40, 47] == 0


def test_rand_concentric_labeld_modes_and_seed() -> None:
    data = {"image": torch.zeros(3, 96, 128), "centroids": np.array([[30.0, 40.0], [90.0, 50.0]])}
    fixed = RandConcentricLabeld(mode="fixed")(data)["label"]
    assert fixed.shape == (1, 96, 128) and fixed.dtype == torch.uint8 and (fixed == 255).any()
    expected = concentric_label((96, 128), data["centroids"], 12, 24)
    assert np.array_equal(fixed[0].numpy(), expected)
    circle = RandConcentricLabeld(mode="circle", fixed_r_px=15)(data)["label"]
    assert not (circle == 255).any() and (circle == 1).any()
    # Radii in um: 3 um at 0.25 um/px = 12 px (the paper's r12R24).
    in_um = RandConcentricLabeld(mode="fixed", r_um=3.0, mpp=0.25)(data)["label"]
    assert torch.equal(in_um, fixed)

    rand = RandConcentricLabeld(mode="random").set_random_state(seed=7)
    draws = [rand(data)["label"] for _ in range(4)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    for label in draws:
        per_mitosis = (label == 1).sum().item() / 2
        assert math.pi * 9 ** 2 < per_mitosis < math.pi * 18 ** 2 and (label == 255).any()
    again = RandConcentricLabeld(mode="random").set_random_state(seed=7)
    assert all(torch.equal(again(data)["label"], d) for d in draws)
    r, outer = rand.radii
    assert np.all((r >= 10) & (r <= 17) & (outer >= 1.5 * r) & (outer <= 2.5 * r))


def test_concentric_loss_by_hand() -> None:
    # One 2x2 image: pixel logits (background, mitosis); the bottom-left pixel is in a ring.
    logits = torch.tensor([[[[2.0, 0.0], [5.0, 1.0]], [[0.0, 1.0], [-5.0, 3.0]]]])
    target = torch.tensor([[[[1, 0], [255, 0]]]], dtype=torch.uint8)
    nll = [-math.log(math.exp(0.0) / (math.exp(2.0) + math.exp(0.0))),  # (0, 0): mitosis
           -math.log(math.exp(0.0) / (math.exp(0.0) + math.exp(1.0))),  # (0, 1): background
           -math.log(math.exp(1.0) / (math.exp(1.0) + math.exp(3.0)))]  # (1, 1): background
    loss = ConcentricLoss()(logits, target)
    assert loss.item() == pytest.approx(sum(nll) / 3, rel=1e-6)
    all_ring = ConcentricLoss()(logits.requires_grad_(), torch.full((1, 2, 2), 255))
    all_ring.backward()
    assert all_ring.item() == 0 and torch.isfinite(logits.grad).all()


def test_tiled_inference_matches_one_pass() -> None:
    net = _net("8s")
    x = torch.randn(1, 3, 480, 544, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = SegMitosInferer()(x, net)
        tiled = SegMitosInferer(tile_px=704, overlap_px=256)(x, net)
        short = SegMitosInferer(tile_px=192, overlap_px=32)(x, net)
    assert torch.allclose(whole.sum(1), torch.ones(1, 480, 544))
    assert whole.min() < 0.05 and whole.max() > 0.95  # the comparison is not between flat ~0.5 maps
    # With >= 256 px of context a pixel sees everything it sees in the one-pass run (fc6's 404 px receptive field
    # plus the upsampling's reach), on the same 32 px pooling grid: only float rounding differs.
    assert (tiled - whole).abs().max() < 1e-5
    # With 32 px of context it does not: the tolerance above is not trivially met.
    assert (short - whole).abs().max() > 1e-3
    with pytest.raises(ValueError, match="multiples"):
        SegMitosInferer(tile_px=500, overlap_px=256)


def test_torchscript_matches_eager() -> None:
    net = _net("8s")
    scripted = torch.jit.script(net)
    with torch.no_grad():
        for height, width in [(100, 120), (67, 45)]:
            x = torch.randn(1, 3, height, width)
            assert torch.allclose(scripted(x), net(x), atol=1e-6)


def test_mitosis_augment_negative_crops_get_the_8_dihedral_variants_only() -> None:
    image = torch.arange(3 * 6 * 6, dtype=torch.float32).reshape(3, 6, 6)
    label = torch.zeros(1, 6, 6, dtype=torch.uint8)
    dihedral = [torch.rot90(image, k, dims=(1, 2)) for k in range(4)]
    dihedral += [torch.flip(d, dims=(2,)) for d in dihedral]
    aug = RandMitosisAugmentd(keys=["image", "label"])
    aug.set_random_state(0)
    seen = set()
    for _ in range(64):
        out = aug({"image": image, "label": label, "centroids": torch.zeros(0, 2)})
        match = [i for i, d in enumerate(dihedral) if torch.equal(out["image"], d)]
        assert len(match) == 1  # exact, no resampling
        seen.add(match[0])
    assert seen == set(range(8))


def test_mitosis_augment_moves_image_and_label_together_on_positive_crops() -> None:
    # A dark disc in the image where the label's mitosis disc is: they must stay aligned in every variant.
    label = torch.from_numpy(concentric_label((96, 96), [[40.0, 52.0]], 8.0, 14.0))[None]
    image = torch.where(label == 1, 0.0, 200.0).repeat(3, 1, 1).float()
    aug = RandMitosisAugmentd(keys=["image", "label"], translate_px=8)
    aug.set_random_state(1)
    angles, shifts = set(), set()
    for _ in range(40):
        out = aug({"image": image, "label": label, "centroids": torch.tensor([[40.0, 52.0]])})
        angles.add(round(aug.angle, 6))
        shifts.add(aug.shift)
        assert out["label"].dtype == torch.uint8 and set(out["label"].unique().tolist()) <= {0, 1, 255}
        disc = out["label"][0] == 1
        assert abs(int(disc.sum()) - int((label == 1).sum())) <= 12  # nearest resampling keeps the disc's area
        # Where the label says mitosis the image is dark, and the dark pixels are (nearly) all mitosis.
        dark = out["image"][0] < 100
        assert float(out["image"][0][disc].mean()) < 40
        assert int((dark & ~disc).sum()) <= 0.1 * int(disc.sum())
    assert len(angles) > 8 and len(shifts) > 3  # many more variants than a negative crop gets


def test_chain_network_starts_each_stage_from_the_previous_checkpoint(tmp_path) -> None:
    assert COARSER == {"16s": "32s", "8s": "16s"}
    coarse = _net("32s")
    torch.save({"model": coarse.state_dict()}, tmp_path / "model_32s.pt")  # a MONAI CheckpointSaver file
    fine = chain_network("16s", width=WIDTH, coarser_ckpt=str(tmp_path / "model_32s.pt")).eval()
    torch.testing.assert_close(fine.score_fr.weight, coarse.score_fr.weight)
    assert float(fine.score_pool4.weight.detach().abs().sum()) == 0.0
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():  # the new stage starts where the old one ended (up to the two-step bilinear upsampling)
        assert float((fine(x) - coarse(x)).abs().max()) < 0.25 * float(coarse(x).abs().max())
    with pytest.raises(FileNotFoundError, match="train the 16s stage first"):
        chain_network("8s", width=WIDTH, coarser_ckpt=str(tmp_path / "model_16s.pt"))
    with pytest.raises(ValueError, match="no coarser stage"):
        chain_network("32s", width=WIDTH, coarser_ckpt=str(tmp_path / "model_32s.pt"))
    assert chain_network("8s", width=WIDTH).variant == "8s"  # no checkpoint: from scratch


def test_inferer_goes_whole_when_the_image_fits() -> None:
    net = _net("8s")
    x = torch.randn(1, 3, 200, 232)
    with torch.no_grad():
        whole = SegMitosInferer()(x, net)
        fits = SegMitosInferer(tile_px=576, overlap_px=256, whole_max_px=232)(x, net)
        tiled = SegMitosInferer(tile_px=576, overlap_px=256, whole_max_px=199)(x, net)
    assert torch.equal(fits, whole)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)


def test_mitosis_augment_items_collate_whichever_branch_they_took() -> None:
    from monai.data import list_data_collate

    aug = RandMitosisAugmentd(keys=["image", "label"])
    aug.set_random_state(3)
    items = [aug({"image": torch.zeros(3, 32, 32), "label": torch.zeros(1, 32, 32, dtype=torch.uint8),
                  "centroids": torch.tensor([[16.0, 16.0]]) if i % 2 else torch.zeros(0, 2)}) for i in range(6)]
    batch = list_data_collate([{k: v for k, v in item.items() if k != "centroids"} for item in items])
    assert batch["image"].shape == (6, 3, 32, 32) and batch["label"].dtype == torch.uint8


def test_chain_network_init_ckpt_resumes_the_same_variant(tmp_path) -> None:
    net = _net("8s", seed=4)
    torch.save(net.state_dict(), tmp_path / "model.pt")  # a bare state dict works too
    again = chain_network("8s", width=WIDTH, init_ckpt=str(tmp_path / "model.pt"),
                          coarser_ckpt=str(tmp_path / "absent_16s.pt"))
    for key, value in net.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value)


def test_trunk_ckpt_starts_a_coarser_variant_from_a_finer_nets_trunk(tmp_path) -> None:
    """FCN-32s from a trained FCN-8s's trunk (the bundle's demo FCN-32s was started so, standing in for the paper's
    pre-trained FCN): VGG16, fc6, fc7 and score_fr are copied, the 32s's own upsampling keeps its bilinear start;
    weights of another width are refused naming the file."""
    from pathbundles.errors import InputError
    from pathbundles.segmitos import load_trunk, weights_filename

    fine = _net("8s", seed=5)
    torch.save({"model": fine.state_dict(), "training": {"variant": "8s"}}, tmp_path / "model_8s.pt")
    coarse = chain_network("32s", width=WIDTH, trunk_ckpt=str(tmp_path / "model_8s.pt"),
                           coarser_ckpt=str(tmp_path / "ignored.pt")).eval()
    scratch = SegMitosFCN("32s", width=WIDTH)
    for key, value in coarse.state_dict().items():
        if key.startswith("upscore."):
            torch.testing.assert_close(value, scratch.state_dict()[key])  # the bilinear kernel, not the 8s's
        else:
            torch.testing.assert_close(value, fine.state_dict()[key])
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():  # the 32s computes the 8s's coarse score path: same score_fr map
        torch.testing.assert_close(coarse.score_map(x), fine.score_fr(fine.fc(fine.to_pool5(fine.to_pool4(
            fine.to_pool3(x))))))
    with pytest.raises(InputError, match="model_8s.pt.*not a SegMitos trunk"):
        load_trunk(SegMitosFCN("32s", width=2 * WIDTH), str(tmp_path / "model_8s.pt"))
    assert [weights_filename(v) for v in ("32s", "16s", "8s")] == ["model.pt", "model_16s.pt", "model_8s.pt"]
    assert weights_filename("32s", default_variant="8s") == "model_32s.pt"
    with pytest.raises(ValueError, match="unknown SegMitos variant"):
        weights_filename("4s")
