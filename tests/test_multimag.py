"""Concentric multi-magnification reads and the DMMN tile dataset on a small multi-class phantom."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pathbundles.annotations import rasterize, read_annotations
from pathbundles.multimag import MultiMagnificationDataset, deform_views, elastic_fields, read_concentric, tile_class
from pathbundles.sampling import read_datalist
from pathbundles.wsi import open_slide

SIZE_PX = 2048  # level-0 px at 0.5 um/px = 20x: an 8 x 8 grid of 256 px tiles
ORDER = (2, 1, 4, 6, 3, 5)  # the paper's TNBC order: benign epithelium, carcinoma, necrosis, background, ...


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[dict]:
    from pathbundles.phantom import make_phantom

    path = make_phantom(tmp_path_factory.mktemp("mc"), kind="multiclass", n=1, seed=2, size_px=(SIZE_PX, SIZE_PX))
    return read_datalist(path)


@pytest.fixture(scope="module")
def slide(data):
    with open_slide(data[0]["image"]) as s:
        yield s


@pytest.mark.parametrize("centre", [(1000, 1100), (1024, 1024)])
def test_levels_and_tile_paths_agree(slide, centre):
    levels = read_concentric(slide, centre, path="levels")
    tile = read_concentric(slide, centre, path="tile")
    for a, b in zip(levels, tile):
        assert a.shape == b.shape == (256, 256, 3) and a.dtype == b.dtype == np.uint8
        diff = np.abs(a.astype(float) - b).mean()
        shifted = np.abs(a[2:].astype(float) - b[:-2]).mean()
        # JPEG pyramid levels vs area-averaged level 0: a few grey levels, far below a 2 px misalignment.
        assert diff < 7 and diff < 0.7 * shifted


@pytest.mark.parametrize("path", ["levels", "tile"])
def test_20x_view_is_the_centre_of_the_10x_view(slide, path):
    x20, x10, x5 = read_concentric(slide, (1000, 1100), path=path)
    centre = x10[64:192, 64:192].astype(float)
    up = np.asarray(Image.fromarray(x10[64:192, 64:192]).resize((256, 256), Image.Resampling.BILINEAR)).astype(float)
    assert np.abs(up - x20).mean() < 0.6 * np.abs(up[4:] - x20[:-4]).mean()  # aligned, up to the lost detail
    down = np.asarray(Image.fromarray(x20).resize((128, 128), Image.Resampling.BOX)).astype(float)
    assert np.abs(down - centre).mean() < (0.5 if path == "tile" else 7)  # "tile": exact up to rounding
    assert np.abs(np.asarray(Image.fromarray(x10).resize((128, 128), Image.Resampling.BOX)).astype(float)
                  - x5[64:192, 64:192]).mean() < (1 if path == "tile" else 7)  # rounded twice


def test_read_concentric_refuses_bad_arguments(slide):
    with pytest.raises(ValueError, match="finest first"):
        read_concentric(slide, (0, 0), mpps=(2.0, 1.0, 0.5))
    with pytest.raises(ValueError, match="read path"):
        read_concentric(slide, (0, 0), path="pyramid")


def test_tile_class_takes_the_highest_order_present():
    labels = np.zeros((8, 8), np.uint8)
    assert tile_class(labels, ORDER) == 0
    labels[0, :3] = 3
    labels[5, 5] = 6
    assert tile_class(labels, ORDER) == 6  # 6 ranks above 3
    labels[7, 7] = 2
    assert tile_class(labels, ORDER) == 2
    assert tile_class(np.array([[5, 9]]), (5,)) == 5
    assert tile_class(np.array([[7, 9]]), (5,)) == 7  # unlisted classes rank below, lowest id first


def _expected_tiles(label_map_20x: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    """Brute force: every 256 tile of a 20x label map with > 1 % annotated pixels."""
    out = {}
    for y in range(0, label_map_20x.shape[0], 256):
        for x in range(0, label_map_20x.shape[1], 256):
            block = label_map_20x[y:y + 256, x:x + 256]
            if np.count_nonzero(block) > 0.01 * block.size:
                out[(x, y)] = block
    return out


def test_training_tiles_from_annotations_match_brute_force(data):
    item = data[0]
    names = {v: int(k) for k, v in item["classes"].items()}
    full = rasterize(read_annotations(item["annotation"]), (SIZE_PX, SIZE_PX), 1.0, label_of=names)
    expected = _expected_tiles(full)
    ds = MultiMagnificationDataset(data, class_order=ORDER)
    listed = {(int(x), int(y)): int(c) for _, x, y, c in ds.tiles}
    assert 0 < len(listed) < 64 and set(listed) == set(expected)
    assert listed == {xy: tile_class(block, ORDER) for xy, block in expected.items()}
    assert len(ds) == len(listed)  # no rates: one item per tile
    item0 = ds[0]
    x, y = (int(v) for v in ds.tiles[0, 1:3])
    assert torch.equal(item0["label"], torch.from_numpy(full[y:y + 256, x:x + 256].astype(np.int64)))
    assert item0["location"].tolist() == [x + 128, y + 128]
    assert {k: tuple(item0[k].shape) for k in ("x20", "x10", "x5")} == {k: (3, 256, 256) for k in ("x20", "x10", "x5")}
    assert item0["x20"].dtype == torch.uint8 and item0["label"].dtype == torch.long


def test_training_tiles_from_the_partial_label_image(data):
    # The PNG is the same polygons rasterised at downsample 4: nearly the same tiles (a 1 % borderline may differ).
    labels = np.asarray(Image.open(data[0]["partial_labels"]))
    expected = _expected_tiles(np.kron(labels, np.ones((4, 4), labels.dtype)))
    ds = MultiMagnificationDataset(data, class_order=ORDER, label_keys=("partial_labels",))
    assert {(int(x), int(y)) for _, x, y, _ in ds.tiles} == set(expected)


def test_hand_made_label_map_gives_tiles_and_classes(data, tmp_path):
    labels = np.zeros((SIZE_PX // 4, SIZE_PX // 4), np.uint8)  # downsample 4: a tile is 64 x 64 here
    labels[0:10, 0:10] = 3
    labels[20:30, 20:30] = 1  # tile (0, 0): classes 3 and 1 -> 1 (higher order)
    labels[0:6, 64:70] = 5  # tile (256, 0): 36 / 4096 = 0.9 % -> not a training tile
    labels[64:74, 64:128] = 5  # tile (256, 256): 640 / 4096 = 16 % of class 5
    labels[200:201, 200:242] = 4  # tile (768, 768): 42 / 4096 = 1.03 % -> kept
    path = tmp_path / "labels.png"
    Image.fromarray(labels).save(path)
    ds = MultiMagnificationDataset([{"image": data[0]["image"], "labels": str(path)}], class_order=ORDER,
                                   rates={1: 2, 5: 1})
    assert {(int(x), int(y)): int(c) for _, x, y, c in ds.tiles} == {(0, 0): 1, (256, 256): 5, (768, 768): 4}
    assert ds.class_counts(balanced=False) == {1: 1, 4: 1, 5: 1}
    assert ds.class_counts() == {1: 3, 4: 1, 5: 2}


def test_balancing_multiplies_each_class_and_is_reproducible(data):
    rates = {2: 3, 1: 1, 5: 2}
    ds = MultiMagnificationDataset(data, class_order=ORDER, rates=rates, seed=7)
    before, after = ds.class_counts(balanced=False), ds.class_counts()
    assert after == {c: n * (1 + rates.get(c, 0)) for c, n in before.items()}
    deformed = [i for i in range(len(ds)) if ds.item_copy[i] > 0][:2]
    again = MultiMagnificationDataset(data, class_order=ORDER, rates=rates, seed=7)
    other = MultiMagnificationDataset(data, class_order=ORDER, rates=rates, seed=8)
    for i in deformed:
        a, b, c = ds[i], again[i], other[i]
        assert all(torch.equal(a[k], b[k]) for k in ("x20", "x10", "x5", "label"))
        assert not torch.equal(a["x20"], c["x20"])
        original = ds[i - int(ds.item_copy[i])]  # copy 0 of the same tile
        assert not torch.equal(a["x20"], original["x20"])
        assert torch.equal(a["location"], original["location"])
        # A deformation moves pixels by a few px: most labels stay, the class set does not grow.
        assert set(a["label"].unique().tolist()) <= set(original["label"].unique().tolist())
        assert (a["label"] == original["label"]).float().mean() > 0.8


def test_deformation_keeps_the_views_aligned():
    # A level-0 pattern seen at three scales: a disc of radius 48 (20x px) at the centre.
    size, views = 64, []
    for scale in (1, 2, 4):
        r = (np.arange(size) + 0.5 - size / 2) * scale
        disc = (np.hypot(*np.meshgrid(r, r)) < 24) * 255
        views.append(np.repeat(disc[..., None], 3, -1).astype(np.uint8))
    field = elastic_fields(np.random.default_rng(0))
    out, _ = deform_views(views, field, (1, 2, 4))
    centre20 = out[0][::2, ::2, 0].astype(float)  # the deformed 20x view at 10x spacing
    # Same deformed disc in the centre 32 of the deformed 10x view; the undeformed one differs far more.
    assert np.abs(centre20 - out[1][16:48, 16:48, 0]).mean() < 0.6 * np.abs(centre20 - views[1][16:48, 16:48, 0]).mean()


def test_inference_grid_and_dataloader_workers(data):
    whole = MultiMagnificationDataset(data, mode="infer", use_tissue=False)
    assert len(whole) == 64 and "label" not in whole[0]
    tissue = MultiMagnificationDataset(data, mode="infer")
    assert 0 < len(tissue) <= 64
    assert {tuple(t) for t in tissue.tiles[:, 1:3].tolist()} <= {tuple(t) for t in whole.tiles[:, 1:3].tolist()}
    edge = whole[7]  # top-right tile: the 5x view reaches past the slide, which reads white
    assert edge["location"].tolist() == [7 * 256 + 128, 128]
    assert (edge["x5"][:, :64] == 255).all() and (edge["x5"][:, :, -64:] == 255).all()
    loader = torch.utils.data.DataLoader(tissue, batch_size=4, num_workers=2)
    batch = next(iter(loader))
    assert batch["x20"].shape == (4, 3, 256, 256)
    assert torch.equal(batch["x10"][1], tissue[1]["x10"])
