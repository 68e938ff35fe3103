"""Spatial LSTM: network shapes and scan order, Eq. (3)-(5) by hand, grid sampling and dihedral transforms, and the
feature-lattice inferer against the naive per-grid path, with test-time augmentation and ROI stitching."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pathbundles.spatial_lstm import (GridToPatchesd, LatticeGeometry, RandDihedrald, SpatialGridDataset,
                                      SpatialLSTMInferer, SpatialLSTMLoss, SpatialLSTMNet, dihedral,
                                      inverse_dihedral, lattice_map, naive_grid_map, neighbour_pairs,
                                      LatticeFeatureCache, sparse_lattice_map)

# A small geometry with the paper's proportions (patch = 4 strides, crop = patch - 1/8): cheap enough for a CPU.
SMALL = {"grid_size": 3, "patch_px": 32, "crop_px": 24, "stride_px": 8}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks on a shared 2-core machine: one thread avoids OpenMP waits on a busy core (10-100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _net(seed: int = 0, **kwargs) -> SpatialLSTMNet:
    """A narrow net in eval mode with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    net = SpatialLSTMNet(**{"crop_px": 24, "hidden_size": 8, "widen_factor": 1 / 16, **kwargs})
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net.eval()


@pytest.fixture(scope="module")
def net() -> SpatialLSTMNet:
    return _net()


# ------------------------------------------------------------------------------------------------------------ network


def test_resnet34_trunk_is_monai_resnet34() -> None:
    from monai.networks.nets import ResNet

    full = SpatialLSTMNet()
    cnn = full.cnn
    assert isinstance(cnn, ResNet) and cnn.fc is None
    assert [len(getattr(cnn, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]  # ResNet-34 basic blocks
    assert cnn.conv1.kernel_size == (7, 7) and cnn.conv1.stride == (2, 2)
    # torchvision's ResNet-34 without fc has 21,284,672 parameters; MONAI adds biases to the 3 downsample convs.
    assert sum(p.numel() for p in cnn.parameters()) == 21_284_672 + 128 + 256 + 512
    assert full.feature_size == 512 and full.lstm.input_size == 512 and full.lstm.hidden_size == 256
    ablation = SpatialLSTMNet(use_lstm=False, widen_factor=0.5)
    assert ablation.lstm is None and ablation.classifier.in_features == 256


def test_default_shapes_for_verify_net_in_out() -> None:
    net = _net(crop_px=224)
    x = torch.rand(1, 9, 3, 224, 224)  # metadata: num_channels 9, spatial_shape [3, 224, 224]
    with torch.no_grad():
        logits = net(x)
        features = net.patch_features(x[0])
        assert logits.shape == (1, 9) and logits.dtype == torch.float32
        assert features.shape == (9, 32)  # int(512 / 16)
        torch.testing.assert_close(net.grid_logits(features[None]), logits)


def test_scan_order_is_raster_and_forward_only() -> None:
    """Changing patch 5 (row 1, col 2) changes the outputs of patches 5..8 only (raster order, one forward pass);
    bidirectional changes all; the ResNet-only ablation changes patch 5 only."""
    x = torch.randn(2, 9, 3, 24, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = x.clone()
    y[:, 5] += 1.0
    changed = {}
    for name, kwargs in {"lstm": {}, "bidirectional": {"bidirectional": True}, "ablation": {"use_lstm": False}}.items():
        net = _net(**kwargs).double()  # float64: the influence of patch 5 on patch 8 is ~1e-7 in this tiny net
        with torch.no_grad():
            changed[name] = ((net(x) - net(y)).abs() > 1e-12).all(0).nonzero().flatten().tolist()
    assert changed == {"lstm": [5, 6, 7, 8], "bidirectional": list(range(9)), "ablation": [5]}


def test_bad_arguments_raise_value_errors(net: SpatialLSTMNet) -> None:
    with pytest.raises(ValueError, match="expected grids"):
        net(torch.zeros(1, 4, 3, 24, 24))
    with pytest.raises(ValueError, match="expected patches"):
        net(torch.zeros(1, 9, 3, 32, 32))
    with pytest.raises(ValueError, match="widen_factor"):
        SpatialLSTMNet(widen_factor=0.01)
    with pytest.raises(ValueError, match="odd"):
        LatticeGeometry(tile_px=2, grid_size=4)
    with pytest.raises(ValueError, match="must divide patch_px"):
        LatticeGeometry(tile_px=2, stride_px=48)
    with pytest.raises(ValueError, match="crop_px"):
        LatticeGeometry(tile_px=2, crop_px=225)
    with pytest.raises(ValueError, match="connectivity"):
        SpatialLSTMLoss(connectivity=6)
    with pytest.raises(ValueError, match="beta"):
        SpatialLSTMLoss(beta=-1)
    with pytest.raises(ValueError, match="expected logits"):
        SpatialLSTMLoss()(torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="0..7"):
        dihedral(torch.zeros(2, 2), 8)
    with pytest.raises(ValueError, match="multiple of grid_size"):
        GridToPatchesd(crop_px=4)({"image": torch.zeros(3, 10, 10)})
    g = LatticeGeometry(tile_px=1, **SMALL)
    with pytest.raises(ValueError, match="expected regions"):
        lattice_map(net, torch.zeros(1, 3, g.read_px + 1, g.read_px + 1), g)
    with pytest.raises(ValueError, match="grid_size"):
        lattice_map(net, torch.zeros(1, 3, 8 * 5, 8 * 5), LatticeGeometry(tile_px=1, grid_size=5, patch_px=8,
                                                                          crop_px=8, stride_px=8))


def test_torchscript_export_runs_forward_and_lattice(net: SpatialLSTMNet, tmp_path) -> None:
    """MONAI's converter (what ``ckpt_export`` calls), verified against eager; the export also runs the lattice."""
    from monai.networks.utils import convert_to_torchscript

    path = tmp_path / "model.ts"
    x = torch.randn(2, 9, 3, 24, 24)
    convert_to_torchscript(net, str(path), verify=True, inputs=[x], atol=1e-5)
    loaded = torch.jit.load(str(path))
    g = LatticeGeometry(tile_px=2, **SMALL)
    region = torch.randn(1, 3, g.read_px, g.read_px)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))
        torch.testing.assert_close(lattice_map(loaded, region, g), lattice_map(net, region, g))


# --------------------------------------------------------------------------------------------------------------- loss


def test_neighbour_pairs_follow_the_grid() -> None:
    for connectivity, degrees in [(8, [3, 5, 3, 5, 8, 5, 3, 5, 3]), (4, [2, 3, 2, 3, 4, 3, 2, 3, 2])]:
        pairs = neighbour_pairs(3, connectivity)
        assert torch.bincount(pairs[:, 0], minlength=9).tolist() == degrees
        assert {tuple(p) for p in pairs.tolist()} == {(b, a) for a, b in pairs.tolist()}  # symmetric
    assert sorted(p[1] for p in neighbour_pairs(3, 4).tolist() if p[0] == 0) == [1, 3]
    assert sorted(p[1] for p in neighbour_pairs(3, 8).tolist() if p[0] == 0) == [1, 3, 4]


def test_spatial_loss_matches_hand_computation() -> None:
    """2 x 2 grid, p = (0.9, 0.8, 0.2, 0.6), y = (1, 1, 0, 1). Pair terms (Eq. 3, 4):
    same(0,1) = 0.01, dif(0,2) = 0.8*0.1 + 0.2*0.9 = 0.26, same(0,3) = 0.09, same(1,3) = 0.04,
    dif(1,2) = 0.8*0.2 + 0.2*0.8 = 0.32, dif(2,3) = 0.4*0.8 + 0.6*0.2 = 0.44.
    8-connectivity (all three others are neighbours): per patch 0.36/3, 0.37/3, 1.02/3, 0.57/3 -> mean 2.32/12.
    4-connectivity: 0.27/2, 0.05/2, 0.70/2, 0.48/2 -> mean 1.5/8 = 0.1875.
    BCE = -(ln 0.9 + 2 ln 0.8 + ln 0.6) / 4 = 0.265618."""
    p = torch.tensor([[0.9, 0.8, 0.2, 0.6]], dtype=torch.float64)
    logits = torch.log(p / (1 - p))
    labels = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    bce = -(math.log(0.9) + 2 * math.log(0.8) + math.log(0.6)) / 4
    assert SpatialLSTMLoss(beta=0.0, grid_size=2)(logits, labels).item() == pytest.approx(bce, abs=1e-6)
    spatial8 = SpatialLSTMLoss(beta=1.0, grid_size=2)(logits, labels).item() - bce
    spatial4 = SpatialLSTMLoss(beta=1.0, grid_size=2, connectivity=4)(logits, labels).item() - bce
    assert spatial8 == pytest.approx(2.32 / 12, abs=1e-6)
    assert spatial4 == pytest.approx(0.1875, abs=1e-6)
    # beta weights it; (N, G, G) labels are the same labels.
    total = SpatialLSTMLoss(beta=0.5, grid_size=2)(logits, labels.reshape(1, 2, 2)).item()
    assert total == pytest.approx(bce + 0.5 * 2.32 / 12, abs=1e-6)


def test_spatial_loss_gradient_pulls_towards_the_labels() -> None:
    logits = torch.zeros(1, 9, requires_grad=True)
    labels = torch.tensor([[1.0, 1, 0, 1, 1, 0, 0, 0, 0]])
    SpatialLSTMLoss(beta=1.0)(logits, labels).backward()
    assert (logits.grad[labels == 1] < 0).all() and (logits.grad[labels == 0] > 0).all()


# ------------------------------------------------------------------------------------------ transforms and dataset


def test_dihedral_elements_by_hand() -> None:
    a = torch.tensor([[1, 2], [3, 4]])
    expected = {0: [[1, 2], [3, 4]], 1: [[2, 4], [1, 3]], 2: [[4, 3], [2, 1]], 3: [[3, 1], [4, 2]],
                4: [[2, 1], [4, 3]], 5: [[1, 3], [2, 4]], 6: [[3, 4], [1, 2]], 7: [[4, 2], [3, 1]]}
    for k, e in expected.items():
        assert dihedral(a, k).tolist() == e
        assert dihedral(a.numpy(), k).tolist() == e
        assert inverse_dihedral(dihedral(a, k), k).tolist() == a.tolist()
        assert inverse_dihedral(dihedral(a.numpy(), k), k).tolist() == a.tolist()


def test_grid_to_patches_cuts_centre_crops_in_raster_order() -> None:
    region = torch.arange(2 * 24 * 24, dtype=torch.float32).reshape(2, 24, 24)  # G = 3, cells of 8 px
    out = GridToPatchesd(grid_size=3, crop_px=4)({"image": region, "label": torch.arange(9.0).reshape(3, 3)})
    assert out["image"].shape == (9, 2, 4, 4) and out["label"].tolist() == list(range(9))
    for t in range(9):
        r, c = divmod(t, 3)
        assert torch.equal(out["image"][t], region[:, r * 8 + 2:r * 8 + 6, c * 8 + 2:c * 8 + 6])


def test_rand_dihedral_moves_each_patch_with_its_label() -> None:
    """After the transform, the patch at each grid cell is the transformed patch whose label id moved there."""
    g, cell, crop = 3, 8, 6
    region = torch.randn(3, g * cell, g * cell, generator=torch.Generator().manual_seed(0))
    ids = torch.arange(9.0).reshape(3, 3)
    original = GridToPatchesd(grid_size=g, crop_px=crop)({"image": region, "label": ids})["image"]
    flip = RandDihedrald(["image", "label"])
    flip.set_random_state(0)
    drawn = set()
    for _ in range(40):
        out = GridToPatchesd(grid_size=g, crop_px=crop)(flip({"image": region, "label": ids}))
        drawn.add(flip.k)
        for t in range(9):
            source = int(out["label"][t])
            assert torch.equal(out["image"][t], dihedral(original[source], flip.k))
        assert sorted(out["label"].tolist()) == list(range(9))
    assert drawn == set(range(8))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> list[dict]:
    """One tumour slide (a ~500 um lesion near the centre) and one normal slide, 2048 px at 0.5 um/px."""
    from pathbundles.phantom import make_phantom
    from pathbundles.sampling import read_datalist

    return read_datalist(make_phantom(tmp_path_factory.mktemp("meta"), kind="metastasis", n=2, seed=7,
                                      size_px=(2048, 2048)))


def _inside_tumour(annotation_path: str, xy: np.ndarray) -> np.ndarray:
    """Independent point-in-polygon test (matplotlib): inside a tumour polygon and outside every exclusion."""
    from matplotlib.path import Path as MplPath

    from pathbundles.annotations import read_annotations

    inside = np.zeros(len(xy), bool)
    excluded = np.zeros(len(xy), bool)
    for a in read_annotations(annotation_path):
        hit = MplPath(a.xy).contains_points(xy)
        if a.is_exclusion:
            excluded |= hit
        else:
            inside |= hit
    return inside & ~excluded


def test_paper_patch_label_rule_marks_a_cell_with_any_tumour(phantom: list[dict]) -> None:
    """The paper's rule (default): a cell is tumour when any of its 16 x 16 evenly spread points is (exact polygon
    test), so every cell the centre rule calls tumour stays tumour and border cells join; never on a normal slide."""
    from pathbundles.errors import SettingError

    ds = SpatialGridDataset(phantom, mpp=1.0, grid_size=3, patch_px=64, samples_per_epoch=24, fixed=True, seed=3,
                            backend="tifffile")
    assert ds.label_rule == "any"
    centre_ds = SpatialGridDataset(phantom, mpp=1.0, grid_size=3, patch_px=64, samples_per_epoch=24, fixed=True,
                                   seed=3, backend="tifffile", label_rule="centre")
    cell0 = 64 * 1.0 / 0.5
    sub = (np.arange(16) + 0.5) * cell0 / 16
    gained = 0
    for i in range(len(ds)):
        slide, x, y, _ = ds.draw_item(i)
        labels, centre_labels = ds[i]["label"].numpy(), centre_ds[i]["label"].numpy()
        if slide.name == "phantom_normal_001":
            assert not labels.any()
            continue
        x0, y0 = ds.region_origin(slide, x, y)
        for r in range(3):
            for c in range(3):
                xy = np.stack(np.meshgrid(x0 + c * cell0 + sub, y0 + r * cell0 + sub), -1).reshape(-1, 2)
                assert labels[r, c] == _inside_tumour(phantom[0]["annotation"], xy).any(), (i, r, c)
        assert (labels >= centre_labels).all()
        gained += int((labels > centre_labels).sum())
    assert gained >= 1  # border cells whose centre is outside the lesion but part of it inside
    with pytest.raises(SettingError, match="patch_label_rule must be one of any, centre"):
        SpatialGridDataset(phantom, mpp=1.0, grid_size=3, patch_px=64, backend="tifffile", label_rule="majority")


def test_dataset_grids_labels_and_transform_chain(phantom: list[dict]) -> None:
    from monai.transforms import CastToTyped, Compose, ScaleIntensityRanged

    from pathbundles.transforms import RandHEColorJitterd
    from pathbundles.wsi import open_slide

    ds = SpatialGridDataset(phantom, mpp=1.0, grid_size=3, patch_px=64, samples_per_epoch=24, fixed=True, seed=3,
                            backend="tifffile", label_rule="centre")
    cell0 = 64 * 1.0 / 0.5  # level-0 px per grid cell
    centres = (np.arange(3) + 0.5) * cell0
    mixed = 0
    with open_slide(phantom[0]["image"], backend="tifffile") as tumour_slide:
        for i in range(len(ds)):
            item = ds[i]
            slide, x, y, cls = ds.draw_item(i)
            assert item["image"].shape == (3, 192, 192) and item["image"].dtype == torch.uint8
            assert item["label"].shape == (3, 3) and item["location"].tolist() == [x, y]
            x0, y0 = ds.region_origin(slide, x, y)
            assert (x0, y0) == (round(x - 192), round(y - 192))
            labels = item["label"].numpy()
            assert labels[1, 1] == cls  # the centre patch has the drawn class
            if slide.name == "phantom_normal_001":
                assert not labels.any()
                continue
            xy = np.stack(np.meshgrid(x0 + centres, y0 + centres), -1).reshape(-1, 2)  # raster (x, y)
            assert labels.reshape(-1).tolist() == _inside_tumour(phantom[0]["annotation"], xy).tolist()
            mixed += 0 < labels.sum() < 9
            assert np.array_equal(item["image"].numpy().transpose(1, 2, 0),
                                  tumour_slide.read_region((x0, y0), (192, 192), 1.0))
    assert mixed >= 1  # grids across the lesion border have both labels

    dihedral_t = RandDihedrald(["image", "label"])
    chain = Compose([CastToTyped("image", torch.float32), dihedral_t,
                     ScaleIntensityRanged("image", a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0),
                     RandHEColorJitterd("image", brightness=64 / 255, contrast=0.75, saturation=0.25, hue=0.04,
                                        prob=0.0),
                     ScaleIntensityRanged("image", a_min=0.0, a_max=1.0, b_min=-1.0, b_max=127 / 128),
                     GridToPatchesd("image", grid_size=3, crop_px=56)])
    ds.transform = chain
    out = ds[1]
    ds.transform = None
    raw = ds[1]
    expected = GridToPatchesd(grid_size=3, crop_px=56)(
        {"image": (dihedral(raw["image"].float(), dihedral_t.k) - 128) / 128,
         "label": dihedral(raw["label"], dihedral_t.k)})
    assert out["image"].shape == (9, 3, 56, 56) and out["label"].shape == (9,)
    torch.testing.assert_close(torch.as_tensor(out["image"]), expected["image"], atol=1e-5, rtol=0)
    assert torch.equal(torch.as_tensor(out["label"]), expected["label"])

    # Collated items feed the network and the loss as a SupervisedTrainer would.
    ds.transform = Compose([chain, lambda d: {k: v for k, v in d.items() if k != "location"}])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, 9, 3, 56, 56) and batch["label"].shape == (3, 9)
    net = _net(crop_px=56).train()
    loss = SpatialLSTMLoss(beta=1.0)(net(batch["image"]), batch["label"])
    loss.backward()
    assert torch.isfinite(loss) and net.cnn.conv1.weight.grad.abs().sum() > 0
    assert net.lstm.weight_ih_l0.grad.abs().sum() > 0


def test_dataset_labels_from_a_mask_image(phantom: list[dict], tmp_path) -> None:
    """Without an annotation the labels come from the ``mask`` image: here tumour = the left half (x < 1024)."""
    from PIL import Image

    mask = np.zeros((128, 128), np.uint8)  # downsample 16
    mask[:, :64] = 255
    Image.fromarray(mask).save(tmp_path / "half.png")
    item = {"image": phantom[0]["image"], "mask": str(tmp_path / "half.png")}
    def tumour(u: np.ndarray, v: np.ndarray) -> bool:  # any of the points; off the slide is not tumour
        return bool(((0 <= u[None, :]) & (u[None, :] < 1024) & (0 <= v[:, None]) & (v[:, None] < 2048)).any())

    for rule, points in (("centre", np.array([0.5])), ("any", (np.arange(16) + 0.5) / 16)):
        ds = SpatialGridDataset([item], mpp=1.0, grid_size=3, patch_px=64, samples_per_epoch=8, fixed=True,
                                backend="tifffile", label_rule=rule)
        cells_at_border = 0
        for i in range(len(ds)):
            slide, x, y, _ = ds.draw_item(i)
            x0, y0 = ds.region_origin(slide, x, y)
            expected = [[float(tumour(x0 + (c + points) * 128, y0 + (r + points) * 128)) for c in range(3)]
                        for r in range(3)]
            assert ds[i]["label"].tolist() == expected, rule
            cells_at_border += sum(x0 + c * 128 < 1024 < x0 + (c + 1) * 128 for c in range(3))
        assert cells_at_border  # some cells straddle the mask's edge, where the two rules differ


# ---------------------------------------------------------------------------------------------------------- inference


def test_geometry_of_the_defaults() -> None:
    g = LatticeGeometry(tile_px=16)
    assert (g.grid_step, g.lattice_px, g.read_px, g.roi_stride_px) == (4, 24, 15 * 64 + 768, 1024)
    assert (g.map_origin_px, g.crop_offset_px, g.centre_index) == (384, 16, 4)
    assert g.map_to_image(0) == 384 and g.map_to_image(2) == 512
    grid = g.grid()
    assert (grid.read_px, grid.roi_stride_px, grid.tile_px, grid.map_step_px, grid.map_origin_px) == \
        (1728, 1024, 16, 64, 384)
    # ROI (r, c) reads from scan pixel 1024 * (c, r); its first map pixel is centred 384 px further in.
    assert grid.roi_stride_px * 1 + grid.map_origin_px == g.map_to_image(16)


@pytest.mark.parametrize("kwargs", [{}, {"use_lstm": False}])
def test_lattice_map_equals_naive_per_grid_map(kwargs: dict) -> None:
    net = _net(seed=2, **kwargs)
    g = LatticeGeometry(tile_px=3, **SMALL)
    region = torch.randn(2, 3, g.read_px, g.read_px, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        lattice = lattice_map(net, region, g, patch_batch=5)  # several CNN chunks
        naive = naive_grid_map(net, region, g)
        assert lattice.shape == (2, 3, 3)
        torch.testing.assert_close(lattice, naive, atol=1e-5, rtol=1e-5)
        # Map pixel (1, 2) of ROI 0 by hand: the grid whose top-left window starts at (1 * 8, 2 * 8).
        patches = [region[0, :, 8 + 32 * u + 4:8 + 32 * u + 28, 16 + 32 * v + 4:16 + 32 * v + 28]
                   for u in range(3) for v in range(3)]
        centre = torch.sigmoid(net(torch.stack(patches)[None])[0, 4])
        assert lattice[0, 1, 2].item() == pytest.approx(centre.item(), abs=1e-5)


def test_test_time_augmentation(net: SpatialLSTMNet) -> None:
    g = LatticeGeometry(tile_px=2, **SMALL)
    region = torch.randn(1, 3, g.read_px, g.read_px, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        tta = lattice_map(net, region, g, tta=True)
        # Explicit: run the naive path on each of the 8 rotated / flipped regions and turn each map back.
        maps = []
        for flip in (False, True):
            x = torch.flip(region, (-1,)) if flip else region
            for quarter in range(4):
                m = naive_grid_map(net, torch.rot90(x, quarter, (-2, -1)), g)
                m = torch.rot90(m, -quarter, (-2, -1))
                maps.append(torch.flip(m, (-1,)) if flip else m)
        torch.testing.assert_close(tta, torch.stack(maps).mean(0), atol=1e-5, rtol=1e-5)
        assert (tta - lattice_map(net, region, g)).abs().max() > 1e-4  # the 8 views do differ
        # The averaged map is equivariant: transforming the region transforms the map.
        for k in (1, 4, 7):
            torch.testing.assert_close(lattice_map(net, dihedral(region, k), g, tta=True), dihedral(tta, k),
                                       atol=1e-5, rtol=1e-5)
        inferer = SpatialLSTMInferer(tile_px=2, tta=True, **SMALL)
        out = inferer(region, net)
    assert out.shape == (1, 2, 2, 2)
    torch.testing.assert_close(out[:, 1], tta)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 2, 2))


def test_positions_compute_only_their_grids_and_only_the_patches_those_read() -> None:
    net = _net(seed=6)
    g = LatticeGeometry(tile_px=5, **SMALL)  # grid_step 4: the grid at (0, 4) shares two columns with (0, 0)'s
    region = torch.randn(2, 3, g.read_px, g.read_px, generator=torch.Generator().manual_seed(7))
    positions = torch.zeros(2, 5, 5, dtype=torch.bool)
    positions[0, 0, 0] = positions[0, 0, 4] = True
    positions[1] = torch.rand(5, 5, generator=torch.Generator().manual_seed(8)) > 0.5
    seen = []
    hook = net.cnn.register_forward_hook(lambda module, args, output: seen.append(len(args[0])))
    with torch.no_grad():
        full = lattice_map(net, region, g)
        seen.clear()
        sparse = lattice_map(net, region, g, patch_batch=5, positions=positions)
        patches = list(seen)
        hook.remove()
        # Equal to the full map at the positions, 0 elsewhere.
        torch.testing.assert_close(sparse, full * positions, atol=1e-5, rtol=1e-5)
        assert torch.all(sparse[~positions] == 0) and torch.all(sparse[positions] > 0)
        # ROI 0: grids at (0, 0) and (0, 4) read lattice columns {0, 4, 8} and {4, 8, 12} of rows {0, 4, 8}: 12
        # patches, not 18, in chunks of at most patch_batch 5. ROI 1: the union of its grids' patches.
        union = {(r + 4 * u) * g.lattice_px + c + 4 * v for r, c in positions[1].nonzero().tolist()
                 for u in range(3) for v in range(3)}
        assert sum(patches) == 12 + len(union) < 2 * g.lattice_px ** 2 and max(patches) <= 5
        # Test-time augmentation turns the positions with the region.
        torch.testing.assert_close(lattice_map(net, region, g, tta=True, positions=positions),
                                   lattice_map(net, region, g, tta=True) * positions, atol=1e-5, rtol=1e-5)
        # An exported network (forward only) runs the naive path; the map is masked the same way.
        scripted = torch.jit.trace(net, torch.randn(1, 9, 3, 24, 24))
        torch.testing.assert_close(lattice_map(scripted, region, g, positions=positions), sparse, atol=1e-5,
                                   rtol=1e-5)
        # The inferer passes them on (PrepareBatchExtraInput's keyword), or ignores them when told to.
        inferer = SpatialLSTMInferer(tile_px=5, tta=False, **SMALL)
        torch.testing.assert_close(inferer(region, net, positions=positions)[:, 1], sparse)
        off = SpatialLSTMInferer(tile_px=5, tta=False, tissue_grids_only="false", **SMALL)
        torch.testing.assert_close(off(region, net, positions=positions)[:, 1], full)
        with pytest.raises(ValueError, match="expected positions"):
            lattice_map(net, region, g, positions=positions[:, :4])
        # sparse_lattice_map itself: one position of ROI 1 alone.
        one = torch.zeros_like(positions)
        one[1, 2, 3] = True
        assert sparse_lattice_map(net, region, g, one)[1, 2, 3].item() == pytest.approx(full[1, 2, 3].item(),
                                                                                       abs=1e-5)


def test_stitched_roi_tiles_equal_one_pass_over_the_union(net: SpatialLSTMNet) -> None:
    tile = LatticeGeometry(tile_px=3, **SMALL)
    union = LatticeGeometry(tile_px=6, **SMALL)
    region = torch.randn(1, 3, union.read_px, union.read_px, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        whole = lattice_map(net, region, union)[0]
        stitched = torch.zeros(6, 6)
        for r in range(2):
            for c in range(2):
                y0, x0 = r * tile.roi_stride_px, c * tile.roi_stride_px
                roi = region[:, :, y0:y0 + tile.read_px, x0:x0 + tile.read_px]
                stitched[r * 3:(r + 1) * 3, c * 3:(c + 1) * 3] = lattice_map(net, roi, tile)[0]
    torch.testing.assert_close(stitched, whole, atol=1e-5, rtol=1e-5)


def test_map_pixels_on_tissue_at_a_scanner_resolution() -> None:
    """map_on_tissue (the dataset's tissue item and the writer's tissue_only) on a 0.2527 um/px slide scanned at
    1.0 um/px: map pixel (r, c) is the grid centred (384 + 64 c, 384 + 64 r) um from the slide's origin."""
    from pathbundles.slide_inference import SlidePlan, map_on_tissue
    from pathbundles.tissue import LevelMask

    mask = np.zeros((400, 400), np.uint8)  # 8 um/px over 3.2 mm
    mask[63:188, 125:250] = 1  # tissue at x in [1000, 2000) um, y in [504, 1504) um
    level0 = round(3200 / 0.2527)
    plan = SlidePlan(name="s", path="s.tif", level0_mpp=0.2527, level0_size=(level0, level0), map_shape=(40, 40),
                     tissue=LevelMask(mask, mpp=8.0, level0_mpp=0.2527, level0_size=(level0, level0)))
    on = map_on_tissue(plan, LatticeGeometry(tile_px=32).grid(), 1.0, *np.indices((40, 40)))
    # x: 384 + 64 c in [1000, 2000) um for c = 10..25; y: 384 + 64 r in [504, 1504) um for r = 2..17.
    expected = np.zeros((40, 40), bool)
    expected[2:18, 10:26] = True
    np.testing.assert_array_equal(on, expected)
    assert map_on_tissue(SlidePlan(name="s", path="s.tif", level0_mpp=0.2527), LatticeGeometry(tile_px=32).grid(),
                         1.0, np.arange(3)[:, None], np.arange(2)[None, :]).all()  # no mask: everything


def test_feature_cache_shares_the_lattice_margins_of_neighbouring_rois(net: SpatialLSTMNet) -> None:
    tile = LatticeGeometry(tile_px=3, **SMALL)  # lattice 11 x 11 per ROI (3 + 2 * 4)
    union = LatticeGeometry(tile_px=6, **SMALL)
    region = torch.randn(1, 3, union.read_px, union.read_px, generator=torch.Generator().manual_seed(9))
    everywhere = torch.ones(1, 3, 3, dtype=torch.bool)
    rois = [(r, c) for r in range(2) for c in range(2)]  # raster order, as SlideROIDataset lists them

    def roi(r: int, c: int) -> torch.Tensor:
        y0, x0 = r * tile.roi_stride_px, c * tile.roi_stride_px
        return region[:, :, y0:y0 + tile.read_px, x0:x0 + tile.read_px]

    cache = LatticeFeatureCache()
    with torch.no_grad():
        whole = lattice_map(net, region, union)[0]
        cached = torch.zeros(6, 6)
        for r, c in rois:
            cached[r * 3:(r + 1) * 3, c * 3:(c + 1) * 3] = sparse_lattice_map(net, roi(r, c), tile, everywhere,
                                                                             origins=[(0, r, c)], cache=cache)[0]
    torch.testing.assert_close(cached, whole, atol=1e-5, rtol=1e-5)
    # An ROI's 3 x 3 map reads lattice rows (and columns) {0, 1, 2} + 4 u: 9 of its 11, 81 patches, 4 x 81 = 324
    # for the four ROIs. The slide-wide 6 x 6 map reads every row and column of its 14 x 14 lattice: 196 patches,
    # each computed once, the other 128 requests read from the cache.
    assert (cache.computed, cache.hits) == (196, 324 - 196)
    # Rows above the current ROI row are dropped; another slide starts afresh.
    assert min(a for a, _ in cache.features) >= 3
    cache.start(1, 0)
    assert not cache.features and cache.slide == 1
    with torch.no_grad():
        again = sparse_lattice_map(net, roi(0, 0), tile, everywhere, origins=[(1, 0, 0)], cache=cache)[0]
    assert cache.computed == 196 + 81
    torch.testing.assert_close(again, whole[:3, :3], atol=1e-5, rtol=1e-5)


def test_inferer_keeps_a_cache_per_engine_epoch(net: SpatialLSTMNet) -> None:
    from ignite.engine import Engine, Events

    inferer = SpatialLSTMInferer(tile_px=3, tta=False, **SMALL)
    g = inferer.geometry
    region = torch.randn(1, 3, g.read_px, g.read_px, generator=torch.Generator().manual_seed(10))
    seen = []

    def step(engine: Engine, batch: int) -> torch.Tensor:
        with torch.no_grad():
            return inferer(region, net, positions=torch.ones(1, 3, 3, dtype=torch.bool),
                           slide_index=torch.tensor([0]), roi_row=torch.tensor([batch]), roi_col=torch.tensor([0]))

    engine = Engine(step)
    inferer.attach(engine)
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append((inferer.cache.computed,
                                                                               inferer.cache.hits)))
    engine.run([0, 1], max_epochs=2)
    # ROI (0, 0) reads slide-wide lattice rows {0, 1, 2, 4, 5, 6, 8, 9, 10}, ROI (1, 0) below it rows 3 + those:
    # {3, 4, 5, 7, 8, 9, 11, 12, 13}; rows {4, 5, 8, 9} of its 9 columns (36 patches) come from the cache, 45 go
    # through the CNN. Each epoch starts with a fresh cache (the network may have changed), none is kept after.
    assert seen == [(81, 0), (81 + 45, 36), (81, 0), (81 + 45, 36)]
    assert inferer.cache is None
    with torch.no_grad():  # outside an engine: no cache, the same map
        torch.testing.assert_close(inferer(region, net, positions=torch.ones(1, 3, 3, dtype=torch.bool),
                                           slide_index=torch.tensor([0]), roi_row=torch.tensor([1]),
                                           roi_col=torch.tensor([0])), step(engine, 1))


def test_slide_map_from_roi_tiles_equals_one_pass(net: SpatialLSTMNet, tmp_path) -> None:
    """SlideROIDataset + inferer + stitching give the map one lattice pass over the whole slide gives."""
    from monai.transforms import CastToTyped, Compose, NormalizeIntensityd

    from pathbundles.slide_inference import SlideROIDataset, predict_maps
    from pathbundles.wsi import open_slide
    from pathbundles.writers import write_pyramid_tiff

    rng = np.random.default_rng(0)
    size = 512
    image = np.full((size, size, 3), 255, np.uint8)
    # 150 x 150 um of H&E-pink textured "tissue" in the top-left (the tissue mask drops objects under 20000 um^2).
    image[20:320, 20:320] = np.clip(np.array([200, 110, 170]) + rng.integers(-50, 50, (300, 300, 1)), 0, 255)
    path = tmp_path / "slide.tif"
    write_pyramid_tiff(path, image, mpp=0.5, compression="deflate")

    inferer = SpatialLSTMInferer(tile_px=8, tta=False, **SMALL)
    g = inferer.geometry

    # The documented inference preprocessing: (x - 128) / 128.
    normalise = Compose([CastToTyped("image", torch.float32),
                         NormalizeIntensityd("image", subtrahend=128.0, divisor=128.0)])
    dataset = SlideROIDataset([str(path)], g.grid(), scan_mpp=0.5, backend="tifffile", transform=normalise)
    (plan, prob), = list(predict_maps(dataset, net, inferer, batch_size=4))
    assert plan.map_shape == (64, 64) and 10 < plan.n_rois < 64

    one_pass = LatticeGeometry(tile_px=64, **SMALL)
    with open_slide(path, backend="tifffile") as slide:
        whole = slide.read_region((0, 0), (one_pass.read_px, one_pass.read_px), 0.5)
    with torch.no_grad():
        expected = lattice_map(net, (torch.from_numpy(whole).permute(2, 0, 1)[None].float() - 128) / 128,
                               one_pass)[0].numpy()
    covered = np.zeros(plan.map_shape, bool)
    for r, c in plan.rois_rc:
        covered[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = True
    np.testing.assert_allclose(prob[covered], expected[covered], atol=1e-5)
    assert np.all(prob[~covered] == 0)
    # Map pixel (row, col) is the centre patch of the 96 px grid centred on scan pixel map_to_image(col, row).
    rows, cols = np.nonzero(covered)
    with open_slide(path, backend="tifffile") as slide:
        for i in rng.choice(len(rows), 4, replace=False):
            x, y = g.map_to_image(cols[i]), g.map_to_image(rows[i])
            grid = slide.read_region((int(x - 48), int(y - 48)), (96, 96), 0.5)
            item = GridToPatchesd(grid_size=3, crop_px=24, label_key=None)(
                {"image": (torch.from_numpy(grid).permute(2, 0, 1).float() - 128) / 128})
            with torch.no_grad():
                centre = torch.sigmoid(net(item["image"][None])[0, 4]).item()
            assert prob[rows[i], cols[i]] == pytest.approx(centre, abs=1e-5)

    # With the dataset's tissue_key, items say which of their map pixels lie on tissue (the writer's tissue_only
    # rule) and only those are computed: the same map where they lie, 0 elsewhere.
    from pathbundles.slide_inference import map_on_tissue

    dataset = SlideROIDataset([str(path)], g.grid(), scan_mpp=0.5, backend="tifffile", transform=normalise,
                              tissue_key="tissue")
    on_tissue = map_on_tissue(plan, g.grid(), 0.5, *np.indices(plan.map_shape))
    item = dataset[0]
    r, c = item["roi_row"], item["roi_col"]
    np.testing.assert_array_equal(item["tissue"].numpy(), on_tissue[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8])
    # Map pixel k is centred on level-0 pixel 8 k + 48 (0.5 um/px, no resampling): pixel 13 at 152 px lies inside
    # the tissue square [20, 320) px, pixel 40 at 368 px and pixel 60 at 528 px (beyond the slide) outside it.
    assert on_tissue[13, 13] and not on_tissue[40, 40] and not on_tissue[13, 60] and on_tissue.mean() < 0.5
    (_, sparse), = list(predict_maps(dataset, net, inferer, batch_size=4))
    np.testing.assert_allclose(sparse, prob * on_tissue, atol=1e-5)
    assert np.all(sparse[~on_tissue] == 0) and (sparse[on_tissue & covered] > 0).all()
