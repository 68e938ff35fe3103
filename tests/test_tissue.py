"""Tissue masks (synthetic and real slides), the LevelMask grid: tile listing, lookups, PNG/TIFF masks."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pathbundles.annotations import Annotation, rasterize, read_annotations
from pathbundles.errors import InputError
from pathbundles.tissue import LevelMask, TissueMask, tissue_mask

CAMELYON_LEVEL0_MPP = 0.243


class FakeSlide:
    """The part of pathbundles.wsi.Slide that tissue.py uses, over an in-memory level-0 RGB image."""

    def __init__(self, image: np.ndarray, mpp: float) -> None:
        self.image, self.mpp = image, (mpp, mpp)
        self.level_dimensions = [(image.shape[1], image.shape[0])]

    def read_thumbnail(self, mpp: float) -> tuple[np.ndarray, float]:
        factor = max(1, round(mpp / self.mpp[0]))
        h, w = (s // factor * factor for s in self.image.shape[:2])
        blocks = self.image[:h, :w].reshape(h // factor, factor, w // factor, factor, 3).astype(np.float64)
        return np.round(blocks.mean(axis=(1, 3))).astype(np.uint8), self.mpp[0] * factor


@functools.lru_cache(maxsize=2)
def _synthetic_image(blank: bool) -> tuple[np.ndarray, float]:
    rng = np.random.default_rng(0)
    yy, xx = np.ogrid[:2000, :2400]
    image = np.empty((2000, 2400, 3), dtype=np.float32)
    image[:] = (243, 241, 244)
    area = 0.0
    if not blank:
        disc = ((np.hypot(xx - 1200, yy - 1000) < 500) & ~(np.hypot(xx - 1000, yy - 900) < 150)
                & ~(np.hypot(xx - 1400, yy - 1100) < 40))
        speck = np.hypot(xx - 200, yy - 200) < 40  # 5000 um^2: below min_object_um2
        image[disc | speck] = (222, 150, 200)
        # Darker purple "nuclei" inside the disc, so the tissue is not one flat colour.
        image[disc & (rng.random(disc.shape, dtype=np.float32) < 0.05)] = (120, 70, 150)
        area = math.pi * (500 ** 2 - 150 ** 2)
    image += rng.standard_normal(image.shape, dtype=np.float32) * 12
    return np.clip(image, 0, 255).astype(np.uint8), area


def synthetic_slide(*, blank: bool = False) -> tuple[FakeSlide, float]:
    """2400 x 2000 px at 1 um/px: white glass, a pink disc of radius 500 um with a small (filled) and a large (kept)
    hole, a tiny speck, noise; returns the slide (its own copy) and the tissue area in um^2 the mask should find."""
    image, area = _synthetic_image(blank)
    return FakeSlide(image.copy(), mpp=1.0), area


# ------------------------------------------------------------------------------------------- synthetic slides


def test_disc_area_holes_and_specks() -> None:
    slide, area = synthetic_slide()
    mask = tissue_mask(slide, mpp=8.0)
    assert isinstance(mask, TissueMask) and mask.mask.dtype == bool
    assert mask.mask.shape == (250, 300) and mask.mpp == 8.0 and mask.level0_mpp == 1.0
    assert mask.level0_size == (2400, 2000) and mask.downsample == 8.0
    assert mask.mask.sum() * 64 == pytest.approx(area, rel=0.03)
    assert mask.at_level0(1000, 900) == False  # noqa: E712 - large hole (70 700 um^2) kept
    assert mask.at_level0(1400, 1100) == True  # noqa: E712 - small hole (5 000 um^2) filled
    assert not mask.mask[:40, :40].any()  # speck removed


def test_blank_and_near_constant_slides_give_no_tissue() -> None:
    slide, _ = synthetic_slide(blank=True)
    mask = tissue_mask(slide)
    assert mask.mask.shape == (250, 300) and not mask.mask.any()
    origins = mask.tile_origins(256, 256, 0.5)
    assert origins.shape == (0, 2) and origins.dtype == np.float64
    # Thumbnail-level noise (no averaging): Otsu alone would split it in two, the contrast guard must not.
    rng = np.random.default_rng(1)
    noisy = np.clip(rng.normal(235, 6, (300, 400, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(FakeSlide(noisy, mpp=8.0)).mask.any()
    assert not tissue_mask(FakeSlide(np.full((300, 400, 3), 255, np.uint8), mpp=8.0)).mask.any()
    assert not tissue_mask(FakeSlide(np.zeros((300, 400, 3), np.uint8), mpp=8.0)).mask.any()


def test_pen_marks_and_black_padding_are_not_tissue() -> None:
    slide, area = synthetic_slide()
    image = slide.image
    image[1800:, :] = 0  # black padding past the scanned area
    image[100:300, 1900:2300] = (40, 40, 45)  # black marker
    image[400:600, 1900:2300] = (60, 140, 90)  # green pen
    image[1500:1700, 1900:2300] = (50, 80, 170)  # blue pen
    mask = tissue_mask(slide)
    assert not mask.mask[:, 230:].any() and not mask.mask[225:].any()
    assert mask.mask.sum() * 64 == pytest.approx(area, rel=0.03)
    grey = tissue_mask(slide, method="otsu_grey").mask  # darkness: black padding is excluded, pens are not dark
    assert grey.sum() * 64 == pytest.approx(area, rel=0.03) and not grey[225:].any()


# ------------------------------------------------------------------------------------------- grid and tiles


def one_pixel_mask() -> TissueMask:
    """10 x 10 mask at 8 um/px over a 0.5 um/px slide (downsample 16), tissue only at pixel (r=3, c=5), which
    covers level-0 x in [80, 96), y in [48, 64)."""
    mask = np.zeros((10, 10), dtype=bool)
    mask[3, 5] = True
    return TissueMask(mask, mpp=8.0, level0_mpp=0.5, level0_size=(160, 160))


def test_tile_origins_exact() -> None:
    mask = one_pixel_mask()
    # 32 px tiles at 1 um/px = 64 level-0 px; stride 64: starts 0, 64, 128. Only the tile at (64, 0) overlaps.
    assert mask.tile_origins(32, 32, 1.0).tolist() == [[64, 0]]
    # Stride 32 level-0 px: x starts overlapping [80, 96) are 32 and 64, y starts overlapping [48, 64) are 0, 32.
    assert mask.tile_origins(32, 16, 1.0).tolist() == [[32, 0], [64, 0], [32, 32], [64, 32]]
    # Each footprint is 4 x 4 mask pixels with one tissue pixel: fraction 1/16.
    assert len(mask.tile_origins(32, 16, 1.0, min_tissue_fraction=0.05)) == 4
    assert len(mask.tile_origins(32, 16, 1.0, min_tissue_fraction=0.1)) == 0
    # 10 px at 2 um/px = 40 level-0 px tiles and stride: the tile [40, 80) ends exactly on the pixel's left edge
    # and does not touch it.
    assert mask.tile_origins(10, 10, 2.0).tolist() == [[80, 40]]


def test_tile_origins_non_integer_scale_and_edges() -> None:
    full = TissueMask(np.ones((32, 63), dtype=bool), mpp=8.0, level0_mpp=CAMELYON_LEVEL0_MPP, level0_size=(2000, 1000))
    stride0 = 224 * 0.5 / CAMELYON_LEVEL0_MPP  # 460.9 level-0 px
    origins = full.tile_origins(256, 224, 0.5)
    xs, ys = np.arange(5) * stride0, np.arange(3) * stride0  # exact: 460.905... is not rounded to 461
    np.testing.assert_allclose(origins, [[x, y] for y in ys for x in xs], rtol=0, atol=1e-9)
    # The last column starts inside the frame and reaches past it: its footprint is partly outside the mask,
    # which counts as background.
    fractions_kept = full.tile_origins(256, 224, 0.5, min_tissue_fraction=0.99)
    assert fractions_kept[:, 0].max() < 1843 and fractions_kept[:, 1].max() < 921


def test_at_level0_scalars_arrays_and_outside() -> None:
    mask = one_pixel_mask()
    assert mask.at_level0(80, 48) == True and mask.at_level0(95.9, 63.9) == True  # noqa: E712
    assert mask.at_level0(79.9, 48) == False and mask.at_level0(-1, -1) == False  # noqa: E712
    values = mask.at_level0(np.array([[88, 500], [0, 90]]), np.array([[50, 50], [0, 60]]))
    assert values.tolist() == [[True, False], [False, True]]


# ------------------------------------------------------------------------------------------- files


def test_png_round_trip_and_user_masks(tmp_path: Path) -> None:
    slide, _ = synthetic_slide()
    mask = tissue_mask(slide)
    path = tmp_path / "mask.png"
    mask.save_png(path)
    assert np.asarray(Image.open(path)).max() == 255
    back = TissueMask.from_image(path, slide)  # geometry from the PNG's text chunk
    assert np.array_equal(back.mask, mask.mask) and (back.mpp, back.level0_size) == (8.0, (2400, 2000))
    with pytest.raises(InputError, match="made for a slide of level-0 size"):
        TissueMask.load_mask(path, (2400, 2001), 1.0)

    # A plain user PNG (0/1 values) one pixel narrower than 2400 / 16 from rounding: mpp inferred from its size.
    plain = tmp_path / "user.png"
    Image.fromarray(np.pad(np.ones((100, 120), np.uint8), ((12, 13), (15, 14)))).save(plain)
    user = TissueMask.load_mask(plain, (2400, 2000), 1.0)
    assert user.mask.dtype == bool and user.mask.sum() == 12000
    assert user.mpp == pytest.approx((2400 / 149 + 2000 / 125) / 2)

    wrong = tmp_path / "wrong.png"
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(wrong)
    with pytest.raises(InputError) as info:
        TissueMask.from_image(wrong, slide)
    assert str(info.value).startswith(str(wrong)) and "aspect ratio" in str(info.value)
    assert str(info.value).endswith("a mask image must cover the whole slide at one scale (pad or crop it to the "
                                    "slide's aspect ratio; the masks of pathbundles tissue record their own "
                                    "geometry)")  # no Python argument a user cannot set
    assert TissueMask.from_image(wrong, slide, mpp=20.0).mpp == 20.0  # a padded mask with its mpp given

    colour = tmp_path / "colour.png"
    Image.fromarray(np.dstack([np.zeros((125, 150), np.uint8), np.ones((125, 150), np.uint8),
                               np.zeros((125, 150), np.uint8)])).save(colour)
    with pytest.raises(InputError, match="single-channel"):
        TissueMask.from_image(colour, slide)


def test_tiff_label_mask(tmp_path: Path) -> None:
    import tifffile

    labels = np.zeros((125, 150), np.uint8)
    labels[10:20, 30:40] = 3
    tifffile.imwrite(tmp_path / "labels.tif", labels, tile=(16, 16), compression="zlib")
    loaded = LevelMask.load_mask(tmp_path / "labels.tif", (2400, 2000), 1.0)
    assert loaded.mask.dtype == np.uint8 and loaded.mpp == 16.0
    assert loaded.at_level0(30 * 16, 10 * 16) == 3
    assert loaded.tile_origins(16, 16, 16.0).tolist() == [[256, 0], [512, 0], [256, 256], [512, 256]]


def test_annotations_become_level_masks(tmp_path: Path) -> None:
    corners = np.array([[160, 160], [480, 160], [480, 320], [160, 320]], dtype=float)
    square = Annotation("s", "_0", "polygon", "Tumor", corners)
    labels = LevelMask.from_annotations([square], (2400, 2000), 1.0, 16.0)
    assert labels.mask.shape == (125, 150) and labels.mask.dtype == np.uint8
    assert np.array_equal(labels.mask, rasterize([square], (125, 150), 16.0))
    tumour = TissueMask.from_annotations([square], (2400, 2000), 1.0, 16.0)
    assert tumour.mask.dtype == bool and tumour.mask.sum() == 20 * 10
    # Tiles of 160 level-0 px at stride 160 inside the 320 x 160 square: exactly 2 x 1.
    assert tumour.tile_origins(160, 160, 1.0, min_tissue_fraction=0.99).tolist() == [[160, 160], [320, 160]]
    labels.save_png(tmp_path / "labels.png")
    assert np.array_equal(LevelMask.load_mask(tmp_path / "labels.png", (2400, 2000), 1.0).mask, labels.mask)


# ------------------------------------------------------------------------------------------- real slides


def test_cmu_small_region(shared_data: Path) -> None:
    from pathbundles.wsi import open_slide

    with open_slide(shared_data / "CMU-1-Small-Region.svs", backend="openslide") as slide:
        mask = tissue_mask(slide, mpp=8.0)
    assert mask.mpp == pytest.approx(8.0, rel=0.02) and mask.level0_size == (2220, 2967)
    # Viewed: the skin section covers roughly a third of the field; the top left is glass with one dust speck.
    assert 0.30 < mask.mask.mean() < 0.45
    assert not mask.mask[:50, :40].any()
    origins = mask.tile_origins(224, 224, 0.5)
    assert len(origins) > 0 and (origins >= 0).all() and (origins[:, 0] < 2220).all() and (origins[:, 1] < 2967).all()
    assert mask.at_level0(origins[:, 0] + 112, origins[:, 1] + 112).mean() > 0.5


@pytest.fixture(scope="module")
def camelyon_mask(shared_data: Path) -> TissueMask:
    from pathbundles.wsi import open_slide

    # The file holds level 5 only and states no mpp: open it as a slide of 0.243 * 32 um/px.
    with open_slide(shared_data / "camelyon16_tumor_001_level5.tif", backend="openslide",
                    mpp=CAMELYON_LEVEL0_MPP * 32) as slide:
        return tissue_mask(slide, mpp=8.0)


def test_camelyon_level5_tissue_contains_the_tumour(camelyon_mask: TissueMask, shared_data: Path) -> None:
    mask = camelyon_mask.mask
    assert mask.shape == (7168, 3072)
    # Viewed: lymph node tissue (dense parts and stromal strands, not the pale fat) ~7 % of the padded frame.
    assert 0.05 < mask.mean() < 0.10
    assert not mask[300:700, 300:700].any() and not mask[300:700, 2500:2900].any()  # the two black crosses
    assert not mask[5500:].any() and not mask[:1500].any()  # grey glass below, label edge above
    tumour = rasterize(read_annotations(shared_data / "camelyon16_tumor_001_annotation.json"), mask.shape,
                       downsample=camelyon_mask.mpp / CAMELYON_LEVEL0_MPP).astype(bool)
    assert mask[tumour].mean() > 0.99


def test_camelyon_tiles_cover_the_tissue(camelyon_mask: TissueMask) -> None:
    # 3 x 3 mask pixel tiles: every tissue pixel lies in exactly one tile of a stride = tile grid.
    origins = camelyon_mask.tile_origins(3, 3, camelyon_mask.mpp)
    tiled = np.zeros_like(camelyon_mask.mask)
    for x, y in origins.astype(np.int64):  # mpp = mask mpp: origins are whole mask pixels here
        tiled[y:y + 3, x:x + 3] = True
    assert not (camelyon_mask.mask & ~tiled).any()
    assert len(origins) < 0.2 * (7168 // 3) * (3072 // 3)
