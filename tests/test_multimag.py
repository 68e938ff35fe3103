"""Concentric multi-magnification reads and the DMMN tile dataset on a small multi-class phantom."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pathbundles import multimag
from pathbundles.annotations import rasterize, read_annotations
from pathbundles.multimag import (READ_PATHS, MultiMagnificationDataset, choose_read_path, deform_views,
                                  elastic_fields, read_concentric, tile_class)
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
    with pytest.raises(ValueError, match="pad_value"):
        read_concentric(slide, (0, 0), pad_value=256)


# Hand-computed: a view pixel j (0..255) at s level-0 px per pixel has its centre at c + (j + 0.5 - 128) * s.
# Centre (100, 60), top-left corner: x < 0 for j + 0.5 < 128 - 100 / s, y < 0 for j + 0.5 < 128 - 60 / s.
#   20x (s=1): 28 columns, 68 rows; 10x (s=2): 78, 98; 5x (s=4): 103, 113 (j + 0.5 < 103 and < 113).
# Centre (1990, 2000), bottom-right corner of the 2048 px slide: x >= 2048 for j + 0.5 >= 128 + 58 / s, y >= 2048
# for j + 0.5 >= 128 + 48 / s. 20x: j >= 186 and j >= 176 -> 70 columns, 80 rows; 10x: j >= 157, j >= 152 ->
# 99, 104; 5x: j + 0.5 >= 142.5, >= 140 -> j >= 142, j >= 140 -> 114, 116.
PADDED_COLS_ROWS = {(100, 60): ((28, 68), (78, 98), (103, 113)),
                    (1990, 2000): ((70, 80), (99, 104), (114, 116))}


@pytest.mark.parametrize("path", ["levels", "tile"])
@pytest.mark.parametrize("centre", sorted(PADDED_COLS_ROWS))
def test_views_are_padded_exactly_where_their_pixels_leave_the_slide(slide, centre, path):
    padded = read_concentric(slide, centre, path=path)
    grey = read_concentric(slide, centre, path=path, pad_value=128)
    unpadded = read_concentric(slide, centre, path=path, pad_value=None)
    top_left = centre[0] < SIZE_PX / 2
    for view, view128, raw, (cols, rows) in zip(padded, grey, unpadded, PADDED_COLS_ROWS[centre]):
        outside = np.zeros((256, 256), bool)
        outside[:, :cols] = outside[:rows] = True
        if not top_left:
            outside = outside[::-1, ::-1]
        assert outside.sum() == 256 * 256 - (256 - cols) * (256 - rows)
        assert np.count_nonzero((view == 0).all(-1)) == outside.sum()  # the corner of the slide is glass, not black
        assert (view[outside] == 0).all() and (view128[outside] == 128).all()
        assert np.array_equal(view[~outside], raw[~outside]) and np.array_equal(view128[~outside], raw[~outside])


def test_views_inside_the_slide_are_not_padded(slide):
    for path in READ_PATHS:
        assert all(np.array_equal(a, b) for a, b in zip(read_concentric(slide, (1024, 1024), path=path),
                                                         read_concentric(slide, (1024, 1024), path=path,
                                                                         pad_value=None)))


class _ClockedSlide:
    """A fake slide whose reads advance a fake clock by 1 us per source pixel decoded.

    A read at an mpp within 10 % of one of ``level_mpps`` decodes its own pixels; any other mpp decodes the
    covering region of level 0 (0.5 um/px), as ``Slide.read_region`` resamples.
    """

    mpp = (0.5, 0.5)
    dimensions = (4096, 4096)

    def __init__(self, clock: list[float], level_mpps: tuple[float, ...]) -> None:
        self.clock, self.level_mpps, self.calls = clock, level_mpps, []

    def read_region(self, level0_xy, size_px, mpp):
        w, h = size_px
        exact = any(abs(m - mpp) <= 0.1 * mpp for m in self.level_mpps)
        self.clock[0] += w * h * (1 if exact else (mpp / 0.5) ** 2) * 1e-6
        self.calls.append((size_px, mpp))
        return np.full((h, w, 3), 200, np.uint8)


@pytest.mark.parametrize("level_mpps, expected, seconds", [
    ((0.5, 1.0, 2.0), "levels", {"levels": 3 * 256 ** 2 * 1e-6, "tile": 1024 ** 2 * 1e-6}),
    # No 10x / 5x levels: "levels" resamples 512 and 1024 px of level 0 besides its 256, "tile" reads 1024 once.
    ((0.5,), "tile", {"levels": (256 ** 2 + 512 ** 2 + 1024 ** 2) * 1e-6, "tile": 1024 ** 2 * 1e-6}),
])
def test_choose_read_path_keeps_the_faster_path(monkeypatch, level_mpps, expected, seconds):
    clock = [0.0]
    monkeypatch.setattr(multimag, "perf_counter", lambda: clock[0])
    fake = _ClockedSlide(clock, level_mpps)
    centres = [(600 + 450 * k, 900) for k in range(1 + 2 * 3)]
    path, measured = choose_read_path(fake, centres, repeats=3)
    assert path == expected
    assert measured == {p: pytest.approx(s) for p, s in seconds.items()}
    assert len(fake.calls) == 4 * (3 + 1)  # warm-up + 3 timed sets per path: 3 reads per "levels" set, 1 per "tile"


class _CachedClockedSlide(_ClockedSlide):
    """A :class:`_ClockedSlide` with a tile cache: a read at the centre and mpp of an earlier read (by either path)
    costs a tenth, its tiles being decoded already."""

    def __init__(self, clock: list[float], level_mpps: tuple[float, ...]) -> None:
        super().__init__(clock, level_mpps)
        self.seen: set[tuple[int, int, float]] = set()

    def read_region(self, level0_xy, size_px, mpp):
        half = size_px[0] * mpp / self.mpp[0] / 2
        key = (round(level0_xy[0] + half), round(level0_xy[1] + half), mpp)
        before = self.clock[0]
        out = super().read_region(level0_xy, size_px, mpp)
        if key in self.seen:
            self.clock[0] = before + (self.clock[0] - before) / 10
        self.seen.add(key)
        return out


def test_choose_read_path_times_each_path_on_tiles_of_its_own(monkeypatch):
    # Had both paths read the same centres, the path reading second would have been timed on cached tiles: "tile"
    # would have won here with a median of 0.105 s (2 of its 3 reads cached) against 0.197 s for "levels".
    clock = [0.0]
    monkeypatch.setattr(multimag, "perf_counter", lambda: clock[0])
    fake = _CachedClockedSlide(clock, (0.5, 1.0, 2.0))
    centres = [(600 + 400 * k, 900) for k in range(1 + 2 * 3)]
    path, measured = choose_read_path(fake, centres, repeats=3)
    assert path == "levels"
    assert measured == {"levels": pytest.approx(3 * 256 ** 2 * 1e-6), "tile": pytest.approx(1024 ** 2 * 1e-6)}
    assert len({key[:2] for key in fake.seen}) == 7  # the warm-up centre and one centre per timed read


def test_choose_read_path_reads_no_tile_twice_when_given_few_centres(monkeypatch):
    # 3 timed centres for 2 paths x 3 repeats: "levels" is timed at 2 centres of its own, "tile" at 1, none cached.
    clock = [0.0]
    monkeypatch.setattr(multimag, "perf_counter", lambda: clock[0])
    fake = _CachedClockedSlide(clock, (0.5,))
    centres = [(600 + 700 * k, 900) for k in range(4)]
    path, measured = choose_read_path(fake, centres, repeats=3)
    assert path == "tile"
    assert measured == {"levels": pytest.approx((256 ** 2 + 512 ** 2 + 1024 ** 2) * 1e-6),
                        "tile": pytest.approx(1024 ** 2 * 1e-6)}
    assert len(fake.calls) == 4 + 2 * 3 + 1  # warm-up (3 + 1 reads), 2 "levels" sets, 1 "tile" set


def test_choose_read_path_breaks_ties_towards_levels_and_refuses_no_centres(monkeypatch):
    monkeypatch.setattr(multimag, "perf_counter", lambda: 0.0)
    fake = _ClockedSlide([0.0], (0.5, 1.0, 2.0))
    assert choose_read_path(fake, [(2048, 2048)], repeats=1) == ("levels", {"levels": 0.0, "tile": 0.0})
    with pytest.raises(ValueError, match="at least one centre"):
        choose_read_path(fake, [])


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
    edge = whole[7]  # top-right tile: the 5x view reaches 384 level-0 px (96 of its px) past two sides: zeros
    assert edge["location"].tolist() == [7 * 256 + 128, 128]
    x5 = edge["x5"]
    assert (x5[:, :96] == 0).all() and (x5[:, :, -96:] == 0).all()
    assert (x5[:, 96:, :-96] > 0).any(-3).all()  # the rest is the slide (glass or tissue, never black)
    white = MultiMagnificationDataset(data, mode="infer", use_tissue=False, pad_value=None)[7]["x5"]
    assert (white[:, :96] == 255).all() and torch.equal(white[:, 96:, :-96], x5[:, 96:, :-96])
    loader = torch.utils.data.DataLoader(tissue, batch_size=4, num_workers=2)
    batch = next(iter(loader))
    assert batch["x20"].shape == (4, 3, 256, 256)
    assert torch.equal(batch["x10"][1], tissue[1]["x10"])


def test_dataset_times_the_read_path_per_slide(data, caplog):
    with caplog.at_level(logging.INFO, logger="pathbundles.multimag"):
        ds = MultiMagnificationDataset(data, mode="infer", use_tissue=False)  # read_path="auto" is the default
    name = ds.slides[0].name
    assert set(ds.read_paths) == {name} and ds.read_paths[name] in READ_PATHS
    assert any("read path" in r.getMessage() and "ms per patch set" in r.getMessage() for r in caplog.records)
    forced = MultiMagnificationDataset(data, mode="infer", use_tissue=False, read_path="tile")
    assert forced.read_paths == {name: "tile"}
    with pytest.raises(ValueError, match="read_path 'fast'"):
        MultiMagnificationDataset(data, mode="infer", read_path="fast")


def test_dataset_reads_each_slide_by_the_chosen_path(data, monkeypatch):
    chosen = []

    def fake_choice(slide, centres, mpps, patch_px, repeats=3):
        chosen.append([tuple(c) for c in centres])
        return "tile", {"levels": 2.0, "tile": 1.0}

    read_with = []

    def spy(slide, centre, mpps, patch_px, path, pad_value):
        read_with.append(path)
        return real(slide, centre, mpps, patch_px, path, pad_value)

    real = multimag.read_concentric
    monkeypatch.setattr(multimag, "choose_read_path", fake_choice)
    monkeypatch.setattr(multimag, "read_concentric", spy)
    ds = MultiMagnificationDataset(data, class_order=ORDER)
    assert ds.read_paths == {ds.slides[0].name: "tile"}
    # Timed on 7 tile centres (1 warm-up + 3 per path) spread over the slide's list, first and last tile included.
    centres = {(x + 128.0, y + 128.0) for _, x, y, _ in ds.tiles.tolist()}
    assert len(chosen) == 1 and len(chosen[0]) == 7 and set(chosen[0]) <= centres
    assert chosen[0][0] == tuple(float(v) + 128 for v in ds.tiles[0, 1:3])
    assert chosen[0][-1] == tuple(float(v) + 128 for v in ds.tiles[-1, 1:3])
    ds[0]
    assert read_with == ["tile"]


def test_inference_keeps_an_unreadable_slide_without_tiles_and_training_refuses_it(data, tmp_path):
    from pathbundles.errors import SlideError

    good = Path(data[0]["image"])
    cut = tmp_path / "cut.tif"
    cut.write_bytes(good.read_bytes()[:4096])
    ds = MultiMagnificationDataset([data[0], {"image": str(cut)}], mode="infer", use_tissue=False,
                                   read_path="levels")
    assert [e.name for e in ds.slides] == [good.stem, "cut"]
    assert ds.slides[0].error == "" and str(cut) in ds.slides[1].error
    assert len(ds) == len(ds.tiles) > 0 and set(ds.tiles[:, 0].tolist()) == {0}
    with pytest.raises(SlideError, match="cut.tif"):
        MultiMagnificationDataset([dict(data[0], image=str(cut))], mode="train", read_path="levels")
