"""ScanNet: Table 1 shapes, Eq. (1)-(4) geometry, and the FCN == patch-classifier property at tensor and slide level."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pathbundles.scannet import ScanGeometry, ScanNet, ScanNetInferer, dense_scan


def _random_bn(net: ScanNet, seed: int = 0) -> ScanNet:
    """Give BatchNorm layers non-trivial running statistics so eval-mode BN is a real affine map."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net.eval()


@pytest.fixture(scope="module")
def net() -> ScanNet:
    torch.manual_seed(0)
    return _random_bn(ScanNet(width=0.0625, batch_norm=True))


def test_table1_output_sizes(net: ScanNet) -> None:
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 244, 244)).shape == (1, 2, 1, 1)
        assert net(torch.zeros(1, 3, 244 + 32 * 5, 244 + 32 * 5)).shape == (1, 2, 6, 6)
    # The paper's prediction ROI: 2868 px -> 83 x 83 (checked on the layer arithmetic, not by running it).
    assert ScanGeometry(lp=83).roi_px == 2868


def test_full_width_channels_follow_table1() -> None:
    full = ScanNet(width=1.0)
    convs = [m for m in full.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512,
                                                1024, 1024, 2]
    assert all(c.padding == (0, 0) for c in convs)
    assert convs[13].kernel_size == (2, 2) and convs[14].kernel_size == (1, 1)
    # ReLU between conv6, conv7 and conv8 (one public reimplementation dropped them).
    kinds = [type(m).__name__ for m in full.classifier]
    assert kinds == ["Conv2d", "ReLU", "Dropout", "Conv2d", "ReLU", "Dropout", "Conv2d"]


@pytest.mark.parametrize("lp,alpha", [(3, 1), (2, 2), (1, 4)])
def test_geometry_eq1_to_eq4(lp: int, alpha: int) -> None:
    g = ScanGeometry(lp=lp, alpha=alpha)
    assert g.roi_px == 244 + (lp - 1) * 32  # Eq. (1)
    assert g.roi_stride_px == 32 * lp
    assert g.dense_stride_px == 32 // alpha
    assert g.tile_px * g.dense_stride_px == g.roi_stride_px  # tiles stitch without gaps or overlaps
    assert g.map_to_image(0) == 122 and g.map_to_image(3) == 3 * (32 // alpha) + 122  # Eq. (4)
    with pytest.raises(ValueError):
        ScanGeometry(lp=2, alpha=3)


@pytest.mark.parametrize("alpha", [1, 2])
def test_dense_scan_equals_patch_classifier(net: ScanNet, alpha: int) -> None:
    g = ScanGeometry(lp=3, alpha=alpha)
    region = torch.randn(2, 3, g.read_px, g.read_px, generator=torch.Generator().manual_seed(alpha))
    with torch.no_grad():
        dense = dense_scan(net, region, g)
        assert dense.shape == (2, 2, g.tile_px, g.tile_px)
        sd = g.dense_stride_px
        patches = torch.stack([region[:, :, h * sd:h * sd + 244, w * sd:w * sd + 244]
                               for h in range(g.tile_px) for w in range(g.tile_px)], 1).flatten(0, 1)
        expected = net(patches).reshape(2, g.tile_px, g.tile_px, 2).permute(0, 3, 1, 2)
    torch.testing.assert_close(dense, expected, rtol=1e-4, atol=1e-4)


def test_inferer_returns_probabilities(net: ScanNet) -> None:
    inferer = ScanNetInferer(lp=2, alpha=2)
    g = inferer.geometry
    with torch.no_grad():
        prob = inferer(torch.randn(1, 3, g.read_px, g.read_px), net)
    assert prob.shape == (1, 2, 4, 4)
    torch.testing.assert_close(prob.sum(1), torch.ones(1, 4, 4))


def test_torchscript_export_matches(net: ScanNet, tmp_path) -> None:
    scripted = torch.jit.script(net)
    path = tmp_path / "model.ts"
    scripted.save(str(path))
    loaded = torch.jit.load(str(path))
    x = torch.randn(1, 3, 276, 276)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))


@pytest.mark.parametrize("alpha", [1, 2])
def test_slide_map_equals_patchwise_classification(net: ScanNet, tmp_path, alpha: int) -> None:
    """The stitched whole-slide map equals the patch classifier on every 244 px patch at stride 32 / alpha."""
    from pathbundles.slide_inference import SlideROIDataset, predict_maps
    from pathbundles.wsi import open_slide
    from pathbundles.writers import write_pyramid_tiff

    rng = np.random.default_rng(0)
    size = 640
    image = np.full((size, size, 3), 255, np.uint8)
    # H&E-pink "tissue" with texture (grey noise would average to grey and not count as tissue).
    tissue = np.array([200, 110, 170]) + rng.integers(-50, 50, (440, 460, 1))
    image[100:540, 150:610] = np.clip(tissue, 0, 255).astype(np.uint8)
    path = tmp_path / "slide.tif"
    write_pyramid_tiff(path, image, mpp=0.5, compression="deflate")

    inferer = ScanNetInferer(lp=5, alpha=alpha)
    g = inferer.geometry

    def scale(item: dict) -> dict:
        return {**item, "image": item["image"].float() / 127.5 - 1.0}

    dataset = SlideROIDataset([str(path)], g.grid(), scan_mpp=0.5, backend="tifffile", transform=scale)
    assert dataset.plans[0].map_shape == (int(np.ceil(size / g.dense_stride_px)),) * 2
    (plan, prob), = list(predict_maps(dataset, net, inferer, batch_size=2))

    slide = open_slide(path, backend="tifffile")
    covered = np.zeros(plan.map_shape, bool)
    for r, c in plan.rois_rc:
        covered[r * g.tile_px:(r + 1) * g.tile_px, c * g.tile_px:(c + 1) * g.tile_px] = True
    rows, cols = np.nonzero(covered)
    assert len(rows) > 50
    pick = rng.choice(len(rows), 24, replace=False)
    sd = g.dense_stride_px
    patches = np.stack([slide.read_region((int(cols[i] * sd), int(rows[i] * sd)), (244, 244), 0.5) for i in pick])
    with torch.no_grad():
        x = torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        expected = torch.softmax(net(x), 1)[:, 1, 0, 0].numpy()
    np.testing.assert_allclose(prob[rows[pick], cols[pick]], expected, atol=1e-4)
    # Map pixels outside the tissue ROIs stay 0.
    assert np.all(prob[~covered] == 0)


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def resampled_slide(tmp_path_factory) -> dict:
    """A tumour phantom slide at 0.2527 um/px (a real scanner's resolution), pyramid step 2: read at the bundle's
    scan_mpp of 1.0 it needs resampling (3.957 level-0 px per scan px, no level at 1.0)."""
    from pathbundles.phantom import make_metastasis_dataset
    from pathbundles.sampling import read_datalist

    path = make_metastasis_dataset(tmp_path_factory.mktemp("resampled"), n=1, seed=5, size_px=2048, mpp=0.2527,
                                   downsample_step=2)
    return read_datalist(path)[0]


def _bundle_scan(alpha: int, item: dict, width: float | None = None,
                 lp: int = 2) -> tuple[torch.nn.Module, torch.Tensor, object]:
    """The scannet bundle's own network (its inference.json; the shipped weights unless ``width`` asks for another
    width, then random weights with random BatchNorm statistics) in float64, and the first ROI region its own dataset
    (reading, resampling, normalisation) gives for ``item``, with the bundle's inferer geometry at ``alpha``."""
    from monai.bundle import ConfigParser

    from pathbundles.checkpoints import read_weights

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "scannet" / "configs" / "inference.json"))
    parser["bundle_root"] = str(REPO / "bundles" / "scannet")
    parser.update({"alpha": alpha, "lp": lp, "num_workers": 0, "datalist": [item], "device": "$torch.device('cpu')"})
    if width is None:
        net = parser.get_parsed_content("network_def")
        net.load_state_dict(read_weights(REPO / "bundles" / "scannet" / "models" / "model.pt"))
    else:
        parser["width"] = width
        torch.manual_seed(1)
        net = _random_bn(parser.get_parsed_content("network_def"))
    geometry = parser.get_parsed_content("network_inferer").geometry
    dataset = parser.get_parsed_content("dataset")
    region = next(dataset[i]["image"] for i in range(len(dataset)))
    return net.double().eval(), torch.as_tensor(region).double()[None], geometry


def _patch_logits(net: torch.nn.Module, region: torch.Tensor, geometry: object) -> torch.Tensor:
    """The patch classifier: every 244 px patch at the dense stride through the network alone, (1, C, H, W)."""
    sd, side = geometry.dense_stride_px, geometry.tile_px
    patches = torch.cat([region[:, :, h * sd:h * sd + 244, w * sd:w * sd + 244]
                         for h in range(side) for w in range(side)])
    return net(patches).reshape(side, side, -1).permute(2, 0, 1)[None]


@pytest.mark.parametrize("alpha", [1, 2, 4])
def test_bundle_fcn_scan_equals_patch_classifier_on_a_resampled_slide(resampled_slide: dict, alpha: int) -> None:
    """ScanNet's claim (Sec. 3.2) with what users run: the bundle's network_def and shipped weights, its dataset's
    region of a 0.2527 um/px slide read at 1.0 um/px, alpha 1, 2 and 4, float64. Every dense-map logit equals the
    patch classifier's on the patch at that offset, to 1e-9 of the logits' scale."""
    net, region, geometry = _bundle_scan(alpha, resampled_slide)
    assert region.shape[-1] == geometry.read_px
    with torch.no_grad():
        dense, patches = dense_scan(net, region, geometry), _patch_logits(net, region, geometry)
    assert dense.shape == (1, 2, 2 * alpha, 2 * alpha)
    scale = float(patches.abs().max())
    assert scale > 0.1  # real logits, not a network that outputs ~0 everywhere
    torch.testing.assert_close(dense, patches, rtol=0, atol=1e-9 * scale)


@pytest.mark.slow
def test_paper_width_fcn_scan_equals_patch_classifier(resampled_slide: dict) -> None:
    """The same at the paper's width (VGG16 / 1024, width 1.0, random weights with BatchNorm statistics), alpha 2,
    Lp 1. (Alpha 4 at this width in float64 needs ~20 GB: PyTorch's float64 CPU convolution unfolds all 16 offset
    ROIs at once; the alpha-4 interleaving itself is proven above with the bundle's network.)"""
    net, region, geometry = _bundle_scan(2, resampled_slide, width=1.0, lp=1)
    with torch.no_grad():
        dense, patches = dense_scan(net, region, geometry), _patch_logits(net, region, geometry)
    scale = float(patches.abs().max())
    assert scale > 0.0
    torch.testing.assert_close(dense, patches, rtol=0, atol=1e-9 * scale)
