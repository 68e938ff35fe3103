"""Tests of pathbundles.wsi: backends agree pixel for pixel, geometry and mpp come from the file, reads at any mpp,
tile-only decoding, the MONAI adapter, and bad input raising SlideError that names the file."""

from __future__ import annotations

import importlib.util
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from geometry_helpers import box_reference
from hostile_files import aperio_like, million_px_square, patch_tag, small_tiff, sparse_tiff
from pathbundles import wsi
from pathbundles.errors import SlideError

CMU = "CMU-1-Small-Region.svs"
CAMELYON = "camelyon16_tumor_001_level5.tif"
CAMELYON_MPP = 0.243 * 32
GENERATED_MPP = 0.25
LEVEL0_WH = (2112, 1712)  # not a multiple of the 256 tile (edge tiles are partial), but of 16 (whole downsamples)


def _backend_param(name: str):
    marks = []
    if name == "cucim" and importlib.util.find_spec("cucim") is None:
        marks.append(pytest.mark.skip(reason="cuCIM is an optional extra and not installed (needs a CUDA machine)"))
    if name == "openslide" and importlib.util.find_spec("openslide") is None:
        marks.append(pytest.mark.skip(reason="openslide-python is not installed"))
    return pytest.param(name, marks=marks, id=name)


ALL_BACKENDS = [_backend_param(name) for name in ("cucim", "openslide", "tifffile")]
OTHER_BACKENDS = [_backend_param(name) for name in ("cucim", "openslide")]  # compared against tifffile


def _pyramid(level0: np.ndarray, step: int, count: int) -> list[np.ndarray]:
    """Levels made by `step` x `step` block means, cropping rows/columns that do not fill a block."""
    levels = [level0]
    for _ in range(count - 1):
        prev = levels[-1]
        h, w = prev.shape[0] // step, prev.shape[1] // step
        blocks = prev[:h * step, :w * step].reshape(h, step, w, step, 3).astype(np.float64)
        levels.append(blocks.mean(axis=(1, 3)).round().astype(np.uint8))
    return levels


def _write_pyramid(path: Path, levels: list[np.ndarray], compression: str, subifds: bool,
                   unit: str = "CENTIMETER") -> None:
    um_per_unit = {"CENTIMETER": 1e4, "INCH": 25400.0}[unit]
    with tifffile.TiffWriter(path) as writer:
        for i, level in enumerate(levels):
            level_mpp = GENERATED_MPP * levels[0].shape[1] / level.shape[1]
            options = dict(tile=(256, 256), compression=compression, photometric="rgb",
                           resolution=(um_per_unit / level_mpp,) * 2, resolutionunit=unit)
            if i == 0:
                writer.write(level, subifds=len(levels) - 1 if subifds else None, **options)
            else:
                writer.write(level, subfiletype=1, **options)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[np.ndarray]]]:
    """Small pyramidal TIFFs: {name: (path, the level arrays written)} with 2x and 4x steps, JPEG and deflate,
    reduced pages (NewSubfileType=1) and a SubIFD pyramid; resolution tags in centimetres (0.25 um/px)."""
    from scipy import ndimage

    rng = np.random.default_rng(7)
    w, h = LEVEL0_WH
    coarse = rng.random((h // 16 + 2, w // 16 + 2, 3))
    smooth = ndimage.zoom(coarse, (16, 16, 1), order=1)[:h, :w]
    level0 = (smooth * 180 + 40 + rng.integers(0, 20, (h, w, 3))).astype(np.uint8)  # fine texture for resampling
    folder = tmp_path_factory.mktemp("pyramids")
    variants = {"jpeg_2x": ("jpeg", 2, 3, False), "deflate_2x": ("zlib", 2, 3, False),
                "deflate_4x": ("zlib", 4, 3, False), "deflate_subifd_2x": ("zlib", 2, 3, True),
                "deflate_odd_4x": ("zlib", 4, 3, False)}
    out = {}
    for name, (compression, step, count, subifds) in variants.items():
        # The odd variant's levels have non-integer downsamples (2100 / 131 = 16.03), as real scans do.
        levels = _pyramid(level0[:1700, :2100] if "odd" in name else level0, step, count)
        _write_pyramid(folder / f"{name}.tif", levels, compression, subifds)
        out[name] = (folder / f"{name}.tif", levels)
    return out


def _regions(width: int, height: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(level_xy, size) pairs in level pixels: inside, across tile boundaries, across each edge, outside."""
    return [((10, 20), (100, 80)), ((200, 230), (300, 290)), ((width - 150, height - 100), (300, 250)),
            ((-40, -30), (120, 100)), ((width + 5, 0), (50, 50))]


def _expected(level: np.ndarray, xy: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    out = np.full((size[1], size[0], 3), 255, np.uint8)
    (x, y), (w, h) = xy, size
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, level.shape[1]), min(y + h, level.shape[0])
    if x0 < x1 and y0 < y1:
        out[y0 - y:y1 - y, x0 - x:x1 - x] = level[y0:y1, x0:x1]
    return out


# ---- real slides ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_svs_geometry_mpp_and_associated_pages(shared_data: Path, backend: str) -> None:
    with wsi.open_slide(shared_data / CMU, backend=backend) as slide:
        assert slide.backend == backend
        assert slide.vendor == "aperio"
        assert slide.level_dimensions == [(2220, 2967)]  # thumbnail, label and macro pages are not levels
        assert slide.level_downsamples == [1.0]
        assert slide.mpp == pytest.approx((0.499, 0.499))
        assert {"thumbnail", "label", "macro"} <= set(slide.associated_images)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_camelyon_level5_tiff_needs_explicit_mpp(shared_data: Path, backend: str) -> None:
    with wsi.open_slide(shared_data / CAMELYON, backend=backend) as slide:
        assert slide.level_dimensions == [(3072, 7168)]
        assert slide.file_mpp is None
        with pytest.raises(SlideError, match=rf"{CAMELYON}.*no resolution \(mpp\); set the slide's level-0 mpp: the "
                                             r"bundle config key slide_mpp"):
            _ = slide.mpp
        with pytest.raises(SlideError, match=rf"{CAMELYON}.*no resolution"):
            slide.read_region((0, 0), (10, 10), mpp=8.0)
    with wsi.open_slide(shared_data / CAMELYON, backend=backend, mpp=CAMELYON_MPP) as slide:
        assert slide.mpp == pytest.approx((CAMELYON_MPP, CAMELYON_MPP))
        thumb, actual = slide.read_thumbnail(8.0)  # 7.776 is within 10 %: the level itself, not resampled
        assert thumb.shape == (7168, 3072, 3) and actual == pytest.approx(CAMELYON_MPP)


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
@pytest.mark.parametrize("name", [CMU, CAMELYON])
def test_backends_agree_on_real_slides(shared_data: Path, name: str, backend: str) -> None:
    with wsi.open_slide(shared_data / name, backend="tifffile", mpp=1.0) as ours, \
            wsi.open_slide(shared_data / name, backend=backend, mpp=1.0) as other:
        width, height = ours.dimensions
        for xy, size in _regions(width, height) + [((230, 470), (256, 256))]:
            a = ours.read_level_region(0, xy, size)
            b = other.read_level_region(0, xy, size)
            assert a.shape == (size[1], size[0], 3) and a.dtype == np.uint8
            assert np.abs(a.astype(int) - b).mean() < 2, (xy, size)  # same JPEG decoder family, same colours
            outside = _expected(np.zeros((height, width, 3), np.uint8), xy, size) == 255
            assert (a[outside] == 255).all() and (b[outside] == 255).all()


# ---- generated pyramids -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_generated_pyramid_geometry(generated: dict, backend: str) -> None:
    for name, (path, levels) in generated.items():
        with wsi.open_slide(path, backend=backend) as slide:
            # OpenSlide does not read SubIFD pyramids: it sees level 0 only.
            count = 1 if "subifd" in name and backend == "openslide" else len(levels)
            assert slide.level_dimensions == [(a.shape[1], a.shape[0]) for a in levels[:count]], name
            step = 4 if "4x" in name else 2
            # Whole decimation factors, also where the sizes were rounded (the odd variant's 2100 -> 525 -> 131: the
            # last level holds 16 x 16 blocks although 2100 / 131 = 16.03).
            assert slide.level_downsamples == [float(step ** k) for k in range(count)], name
            assert slide.mpp == pytest.approx((GENERATED_MPP, GENERATED_MPP))
            assert slide.level_mpp(count - 1) == pytest.approx((GENERATED_MPP * step ** (count - 1),) * 2)


@pytest.mark.parametrize("sizes,factors", [
    # An Aperio SVS (CMU-1): sizes floor-divided by 4; OpenSlide's ratios 4.00012, 16.0014.
    ([(46000, 32914), (11500, 8228), (2875, 2057)], [1, 4, 16]),
    # A 2x chain rounded up (NDPI, DICOM converters): ratios 1.9995, 3.9991, 7.998, 15.996.
    ([(4415, 4415), (2208, 2208), (1104, 1104), (552, 552), (276, 276)], [1, 2, 4, 8, 16]),
    # Floor-halved from 3000: 2.0, 4.0, 8.0, 16.04 (a real DICOM pyramid's 16.06 is of this kind).
    ([(3000, 2000), (1500, 1000), (750, 500), (375, 250), (187, 125)], [1, 2, 4, 8, 16]),
])
def test_levels_are_placed_by_whole_decimation_factors(sizes: list, factors: list) -> None:
    """A level that is its predecessor's size divided by a whole m and rounded either way is m-fold decimated:
    placing it by the ratio of the sizes instead puts its far pixels up to m - 1 level-0 px off."""
    assert wsi._level_scales(sizes) == [(float(k), float(k)) for k in factors]


def test_levels_of_no_whole_factor_keep_the_ratio_of_their_sizes() -> None:
    """A level that is not a rounded whole fraction of its predecessor (a resampled 1.5x level, an odd crop) is
    placed by the ratio of its sides to level 0's, per axis, and so is every level after it."""
    scales = wsi._level_scales([(3000, 2000), (2000, 1333), (1000, 666), (500, 333)])
    assert scales == [(1.0, 1.0), (1.5, 2000 / 1333), (3.0, 2000 / 666), (6.0, 2000 / 333)]


@pytest.mark.parametrize("name", ["deflate_2x", "deflate_4x", "deflate_subifd_2x", "deflate_odd_4x", "jpeg_2x"])
def test_tifffile_reads_the_pixels_written(generated: dict, name: str) -> None:
    path, levels = generated[name]
    with wsi.open_slide(path, backend="tifffile") as slide:
        for level, array in enumerate(levels):
            for xy, size in _regions(array.shape[1], array.shape[0]):
                ds = slide.level_downsamples[level]
                got = slide.read_level_region(level, (round(xy[0] * ds), round(xy[1] * ds)), size)
                want = _expected(array, xy, size)
                if name.startswith("deflate"):
                    np.testing.assert_array_equal(got, want)
                else:
                    assert np.abs(got.astype(int) - want).mean() < 8  # JPEG loss on a noisy texture


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
@pytest.mark.parametrize("name", ["deflate_2x", "deflate_4x", "deflate_subifd_2x", "deflate_odd_4x", "jpeg_2x"])
def test_backends_agree_on_generated(generated: dict, name: str, backend: str) -> None:
    path, _ = generated[name]
    with wsi.open_slide(path, backend="tifffile") as ours, wsi.open_slide(path, backend=backend) as other:
        for level in range(other.level_count):
            width, height = other.level_dimensions[level]
            ds = other.level_downsamples[level]
            for xy, size in _regions(width, height):
                level0_xy = (round(xy[0] * ds), round(xy[1] * ds))
                a = ours.read_level_region(level, level0_xy, size)
                b = other.read_level_region(level, level0_xy, size)
                # OpenSlide finds a level pixel by dividing a level-0 position by the ratio of the level sizes; where
                # that ratio is not whole (2100 / 131 = 16.03) it lands between stored pixels and interpolates.
                whole = all((n0 / n).is_integer() for n0, n in zip(other.dimensions, (width, height)))
                if name.startswith("deflate") and whole:
                    np.testing.assert_array_equal(a, b)
                else:  # JPEG decoders, or OpenSlide interpolating at a fractional level offset
                    assert np.abs(a.astype(int) - b).mean() < 2


def test_generated_pyramid_in_inches(tmp_path: Path) -> None:
    level0 = np.random.default_rng(1).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    _write_pyramid(tmp_path / "inch.tif", [level0], "zlib", subifds=False, unit="INCH")
    with wsi.open_slide(tmp_path / "inch.tif", backend="tifffile") as slide:
        assert slide.mpp == pytest.approx((GENERATED_MPP, GENERATED_MPP))


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((256, 256, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[:, 128:, 3] = 255  # left half fully transparent, right half opaque
    rgba[:10, 128:, 3] = 128
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, tile=(128, 128), photometric="rgb", extrasamples=["unassalpha"])
    with wsi.open_slide(tmp_path / "rgba.tif", backend="tifffile") as slide:
        got = slide.read_level_region(0, (0, 0), (256, 256))
    assert (got[:, :128] == 255).all()
    assert (got[10:, 128:] == (200, 100, 50)).all()
    np.testing.assert_array_equal(got[0, 200], (227, 177, 152))  # half alpha: halfway to white


# ---- reads at an mpp ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("factor", [2, 3])
def test_read_region_resamples_between_levels(generated: dict, backend: str, factor: int) -> None:
    """deflate_4x has levels at 0.25, 1.0 and 4.0 um/px: 0.5 and 0.75 must be area-averaged from level 0."""
    path, levels = generated["deflate_4x"]
    x, y, w, h = 300, 212, 200, 150
    block = levels[0][y:y + h * factor, x:x + w * factor].reshape(h, factor, w, factor, 3)
    reference = block.astype(np.float64).mean(axis=(1, 3))
    with wsi.open_slide(path, backend=backend) as slide:
        got = slide.read_region((x, y), (w, h), mpp=GENERATED_MPP * factor)
    assert got.shape == (h, w, 3) and got.dtype == np.uint8
    assert np.abs(got - reference).max() <= 1.0


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_read_region_at_a_level_mpp_returns_that_level(generated: dict, backend: str) -> None:
    path, levels = generated["deflate_4x"]
    with wsi.open_slide(path, backend=backend) as slide:
        got = slide.read_region((400, 800), (120, 90), mpp=1.0)  # level 1 is exactly 1.0 um/px
    np.testing.assert_array_equal(got, levels[1][200:290, 100:220])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_read_region_near_a_level_resamples_unless_snapping_is_asked_for(generated: dict, backend: str) -> None:
    """1.02 um/px is 2 % from level 1: an exact read resamples level 0 (its pixels cover 1.02 um), while
    read_region_near with a 10 % tolerance returns level 1 as stored and says it is at 1.0 um/px."""
    path, levels = generated["deflate_4x"]
    x, y, w, h = 400, 800, 120, 90
    with wsi.open_slide(path, backend=backend) as slide:
        exact = slide.read_region((x, y), (w, h), mpp=1.02)
        snapped, actual = slide.read_region_near((x, y), (w, h), mpp=1.02, tolerance=0.1)
        far, far_actual = slide.read_region_near((x, y), (w, h), mpp=2.0, tolerance=0.1)
    np.testing.assert_array_equal(snapped, levels[1][200:290, 100:220])
    assert actual == pytest.approx((1.0, 1.0))
    # The exact read's last pixel ends 4.08 level-0 px per pixel from the corner: 489.6 level-0 px right, not 480.
    reference = box_reference(levels[0], (x, y), (w, h), 1.02 / GENERATED_MPP)
    assert np.abs(exact.astype(float) - reference).mean() < 6.0  # the texture has per-pixel noise of +-10
    assert np.abs(snapped.astype(float) - reference).mean() > 2 * np.abs(exact.astype(float) - reference).mean()
    assert far_actual == (2.0, 2.0)
    np.testing.assert_array_equal(far, slide_read(path, backend, (x, y), (w, h), 2.0))


def slide_read(path: Path, backend: str, xy: tuple[float, float], size: tuple[int, int], mpp: float) -> np.ndarray:
    with wsi.open_slide(path, backend=backend) as slide:
        return slide.read_region(xy, size, mpp)


def test_read_region_finer_than_level0_upsamples(generated: dict) -> None:
    path, levels = generated["deflate_2x"]
    with wsi.open_slide(path, backend="tifffile") as slide:
        got = slide.read_region((100, 100), (80, 60), mpp=GENERATED_MPP / 2)
    assert got.shape == (60, 80, 3)
    assert np.abs(got.astype(float).mean() - levels[0][100:130, 100:140].mean()) < 2


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_read_thumbnail(generated: dict, shared_data: Path, backend: str) -> None:
    with wsi.open_slide(shared_data / CMU, backend=backend) as slide:
        thumb, actual = slide.read_thumbnail(8.0)
    assert thumb.shape == (round(2967 * 0.499 / 8), round(2220 * 0.499 / 8), 3)
    assert actual == pytest.approx(8.0, rel=0.01)
    assert thumb.mean() < 250  # tissue, not an all-white read
    path, levels = generated["deflate_4x"]
    with wsi.open_slide(path, backend=backend) as slide:
        thumb, actual = slide.read_thumbnail(2.0)  # between levels 1 (1.0) and 2 (4.0): resampled from level 1
    assert actual == pytest.approx(2.0, rel=0.01)
    reference = levels[1][:thumb.shape[0] * 2, :thumb.shape[1] * 2].reshape(thumb.shape[0], 2, -1, 2, 3).mean((1, 3))
    assert np.abs(thumb - reference).max() <= 1.0


# ---- the tifffile backend decodes only touched tiles ---------------------------------------------------------


def test_tifffile_decodes_only_touched_tiles(generated: dict, shared_data: Path, monkeypatch) -> None:
    decoded: list[tuple[int, int]] = []
    original = wsi.TiffSlide._decode_tile

    def counting(self, level: int, index: int):
        decoded.append((level, index))
        return original(self, level, index)

    monkeypatch.setattr(wsi.TiffSlide, "_decode_tile", counting)
    with wsi.open_slide(generated["jpeg_2x"][0], backend="tifffile") as slide:
        slide.read_level_region(0, (300, 300), (256, 256))  # 256 tiles: spans 2 x 2
        assert sorted(decoded) == [(0, 10), (0, 11), (0, 19), (0, 20)]  # of 9 x 7 tiles
        decoded.clear()
        slide.read_level_region(0, (768, 512), (256, 256))  # aligned: one tile
        assert decoded == [(0, 21)]
        decoded.clear()
        slide.read_level_region(0, (768, 512), (256, 256))  # cached
        assert decoded == []
    with wsi.open_slide(shared_data / CMU, backend="tifffile") as slide:
        decoded.clear()
        slide.read_level_region(0, (1000, 1500), (244, 244))
        assert 1 <= len(decoded) <= 4  # of 130 tiles


# ---- MONAI adapter ----------------------------------------------------------------------------------------------


def test_import_does_not_import_monai() -> None:
    code = "import sys, pathbundles.wsi; assert 'monai' not in sys.modules, 'monai imported'"
    common = str(Path(wsi.__file__).resolve().parents[1])
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": common})


def test_monai_reader_matches_slide(generated: dict, shared_data: Path) -> None:
    from monai.data import MaskedPatchWSIDataset, PatchWSIDataset

    reader_cls = wsi.TiledTiffWSIReader
    path, _ = generated["jpeg_2x"]
    reader = reader_cls(channel_dim=0)
    handle = reader.read(str(path))
    with wsi.open_slide(path, backend="tifffile") as slide:
        # MONAI: location (row, col) at level 0, size (height, width) at the level.
        patch, meta = reader.get_data(handle, location=(600, 300), size=(90, 120), level=1)
        np.testing.assert_array_equal(patch, slide.read_level_region(1, (300, 600), (120, 90)).transpose(2, 0, 1))
        patch, _ = reader.get_data(handle, location=(600, 300), size=(90, 120), mpp=GENERATED_MPP * 4)
        np.testing.assert_array_equal(patch, slide.read_level_region(2, (300, 600), (120, 90)).transpose(2, 0, 1))
    assert meta["backend"] == "tifffile" and meta["path"] == str(path.resolve())
    assert reader.get_mpp(handle, 1) == pytest.approx((2 * GENERATED_MPP, 2 * GENERATED_MPP))

    data = [{"image": str(shared_data / CMU), "location": [1500, 1000], "size": [64, 64], "level": 0, "label": 1}]
    sample = PatchWSIDataset(data, center_location=False, reader=reader_cls)[0]
    with wsi.open_slide(shared_data / CMU, backend="tifffile") as slide:
        expected = slide.read_level_region(0, (1000, 1500), (64, 64)).transpose(2, 0, 1)
    np.testing.assert_array_equal(np.asarray(sample["image"]), expected)

    # MaskedPatchWSIDataset: a tissue mask from the whole level, then patches through the same reader.
    path, _ = generated["deflate_4x"]
    masked = MaskedPatchWSIDataset([{"image": str(path)}], patch_size=64, patch_level=0, mask_level=2,
                                   reader=reader_cls)
    sample = masked[len(masked) // 2]
    row, col = (int(v) for v in sample["image"].meta["location"])
    with wsi.open_slide(path, backend="tifffile") as slide:
        expected = slide.read_level_region(0, (col, row), (64, 64)).transpose(2, 0, 1)
    np.testing.assert_array_equal(np.asarray(sample["image"]), expected)


# ---- info, pickling, bad input -------------------------------------------------------------------------------


def test_slide_info_is_json_ready(generated: dict) -> None:
    info = wsi.slide_info(generated["deflate_4x"][0], backend="tifffile")
    json.dumps(info)
    assert info["backend"] == "tifffile" and info["vendor"] == "generic-tiff"
    assert [(lv["width"], lv["height"]) for lv in info["levels"]] == [(2112, 1712), (528, 428), (132, 107)]
    assert info["levels"][1]["mpp"] == pytest.approx([1.0, 1.0])
    assert info["mpp"] == pytest.approx([0.25, 0.25]) and info["associated_images"] == []


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_slide_pickles_by_path(generated: dict, backend: str) -> None:
    with wsi.open_slide(generated["deflate_2x"][0], backend=backend, mpp=0.3) as slide:
        clone = pickle.loads(pickle.dumps(slide))
        assert clone.mpp == (0.3, 0.3)
        np.testing.assert_array_equal(clone.read_level_region(1, (64, 64), (50, 40)),
                                      slide.read_level_region(1, (64, 64), (50, 40)))
        clone.close()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bad_files_raise_slide_error_naming_the_file(generated: dict, tmp_path: Path, backend: str) -> None:
    missing = tmp_path / "absent.svs"
    with pytest.raises(SlideError, match=r"absent\.svs: file does not exist"):
        wsi.open_slide(missing, backend=backend)

    text = tmp_path / "notes.svs"
    text.write_text("not a slide\n")
    with pytest.raises(SlideError, match=r"notes\.svs: not a whole-slide image") as info:
        wsi.open_slide(text, backend=backend)
    assert info.value.__cause__ is not None

    data = generated["deflate_4x"][0].read_bytes()
    for keep in (0.6, 0.99):
        truncated = tmp_path / f"cut{int(keep * 100)}.tif"
        truncated.write_bytes(data[:int(len(data) * keep)])
        # tifffile checks every tile's byte range at open; OpenSlide fails while hashing the tiles.
        problem = "file is truncated" if backend == "tifffile" else "not a whole-slide image"
        with pytest.raises(SlideError, match=rf"{truncated.name}: {problem}"):
            with wsi.open_slide(truncated, backend=backend) as slide:
                for level in range(slide.level_count):
                    slide.read_level_region(level, (0, 0), slide.level_dimensions[level])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bad_requests_raise_slide_error_naming_the_file(generated: dict, backend: str) -> None:
    path = generated["deflate_2x"][0]
    with wsi.open_slide(path, backend=backend) as slide:
        with pytest.raises(SlideError, match=rf"{path.name}: no pyramid level 3"):
            slide.read_level_region(3, (0, 0), (10, 10))
        with pytest.raises(SlideError, match=rf"{path.name}: no pyramid level -1"):
            slide.level_mpp(-1)
        for size in [(0, 10), (10, -5)]:
            with pytest.raises(SlideError, match=rf"{path.name}: region size must be positive"):
                slide.read_level_region(0, (0, 0), size)
            with pytest.raises(SlideError, match=rf"{path.name}: region size must be positive"):
                slide.read_region((0, 0), size, mpp=0.5)
        with pytest.raises(SlideError, match=rf"{path.name}: requested mpp must be positive"):
            slide.read_thumbnail(0.0)
    with pytest.raises(SlideError, match=rf"{path.name}: mpp override must be positive"):
        wsi.open_slide(path, backend=backend, mpp=-1.0)
    # A datalist item's mpp is any JSON: it used to raise ValueError without the file, or TypeError (stopping the run).
    for value in ("$1", "abc", [None, None], [[0.5], 0.5], {"x": 0.5}, [], [0.5, 0.5, 0.5], float("nan")):
        with pytest.raises(SlideError, match=rf"{path.name}: mpp override must be positive um/px, got "):
            wsi.open_slide(path, backend=backend, mpp=value)


def test_unknown_backend(generated: dict) -> None:
    with pytest.raises(SlideError, match="unknown backend 'pillow'"):
        wsi.open_slide(generated["deflate_2x"][0], backend="pillow")


def test_auto_backend_prefers_cucim_then_openslide() -> None:
    found = wsi.available_backends()
    assert "tifffile" in found
    assert found == [name for name in ("cucim", "openslide", "tifffile", "dicom") if name in found]


def test_auto_backend_falls_back_when_one_refuses_the_file(shared_data: Path, monkeypatch) -> None:
    """OpenSlide refuses a QuPath/Bio-Formats OME-TIFF (OpenSlideUnsupportedFormatError): "auto" used to stop there.
    Taken as no OME-TIFF, the file goes to OpenSlide first, which refuses it, and the tifffile backend reads it."""
    path = shared_data / "openslide_os1_he_40x_crop.ome.tif"
    if importlib.util.find_spec("openslide") is not None:
        with pytest.raises(SlideError, match="OpenSlideUnsupportedFormatError"):
            wsi.open_slide(path, backend="openslide")
    monkeypatch.setattr(wsi, "is_ome_tiff", lambda _: False)
    with wsi.open_slide(path) as slide:
        assert slide.backend == "tifffile" and slide.dimensions == (1101, 1101)


def test_auto_backend_names_each_backends_reason_when_none_reads_the_file(tmp_path: Path) -> None:
    text = tmp_path / "notes.tif"
    text.write_text("not a slide\n")
    with pytest.raises(SlideError) as info:
        wsi.open_slide(text)
    message = str(info.value)
    assert message.startswith(f"{text}: no slide backend reads it (")
    for name in set(wsi.available_backends()) - {"dicom"}:  # the DICOM backend is tried for DICOM sources only
        assert f"{name}: not a whole-slide image the {name} backend can read" in message


def test_auto_backend_refuses_an_unsound_file_at_once(tmp_path: Path) -> None:
    """A file the first backend reads but finds unsound (here: more level-0 pixels than allowed) goes to no other
    backend: that backend's reason is the error. One it refuses and the next finds unsound gives both reasons."""
    sparse = sparse_tiff(tmp_path / "sparse.tif", 16384, 16384)
    with pytest.raises(SlideError) as alone:
        wsi.open_slide(sparse, backend=wsi.available_backends()[0], max_level0_px=10**8)
    with pytest.raises(SlideError) as auto:
        wsi.open_slide(sparse, max_level0_px=10**8)
    assert str(auto.value) == str(alone.value)
    assert "more than the 1e+08 px a slide may have" in str(auto.value)
    if "openslide" in wsi.available_backends():
        hostile = million_px_square(tmp_path)  # OpenSlide: "Invalid TIFF"; tifffile: too few tiles for the size
        with pytest.raises(SlideError, match=r"hostile\.tif: no slide backend reads it \(openslide: not a "
                                             r"whole-slide image .*; tifffile: level 0 claims 1000000 x 1000000 px"):
            wsi.open_slide(hostile)


def test_real_ome_tiff_reads_as_its_ome_xml_says(shared_data: Path) -> None:
    """A single-level OME-TIFF exported by QuPath/Bio-Formats: mpp, size and pixels as tifffile reads them itself."""
    path = shared_data / "openslide_os1_he_40x_crop.ome.tif"
    with tifffile.TiffFile(path) as tif:
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
        levels = [level.shape for level in tif.series[0].levels]
        stored = tif.series[0].asarray()
    assert pixels["PhysicalSizeXUnit"] == "\u00b5m"
    with wsi.open_slide(path) as slide:
        assert (slide.backend, slide.vendor) == ("tifffile", "ome-tiff")
        assert slide.level_count == len(levels) == 1
        assert slide.dimensions == (levels[0][1], levels[0][0]) == (1101, 1101)
        assert slide.mpp == (float(pixels["PhysicalSizeX"]), float(pixels["PhysicalSizeY"]))
        assert slide.mpp == pytest.approx((0.2271, 0.2271), abs=1e-4)
        np.testing.assert_array_equal(slide.read_level_region(0, (700, 300), (256, 200)),
                                      stored[300:500, 700:956])


def _ome_subifd_pyramid(path: Path, level0: np.ndarray, physical_size: float, unit: str) -> list[np.ndarray]:
    """An OME-TIFF as Bio-Formats 6+ writes a pyramid: level 0 with its 2x and 4x levels as SubIFDs (marked
    reduced), PhysicalSizeX/Y in ``unit`` and resolution tags without a unit, so that its mpp is only in the
    OME-XML."""
    levels = _pyramid(level0, 2, 3)
    options = dict(tile=(256, 256), compression="zlib", photometric="rgb")
    with tifffile.TiffWriter(path, ome=True) as writer:
        writer.write(levels[0], subifds=2, metadata={"PhysicalSizeX": physical_size, "PhysicalSizeXUnit": unit,
                                                     "PhysicalSizeY": physical_size, "PhysicalSizeYUnit": unit},
                     **options)
        for level in levels[1:]:
            writer.write(level, subfiletype=1, **options)
    return levels


@pytest.mark.parametrize("physical_size, unit", [(0.2527, "\u00b5m"), (252.7, "nm")])
def test_ome_tiff_subifd_pyramid_levels_mpp_and_pixels(tmp_path: Path, physical_size: float, unit: str) -> None:
    rng = np.random.default_rng(3)
    level0 = rng.integers(0, 256, (1000, 1200, 3), dtype=np.uint8)
    path = tmp_path / "pyramid.ome.tif"
    levels = _ome_subifd_pyramid(path, level0, physical_size, unit)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and tif.pages.first.tags.valueof("ResolutionUnit") == 1  # NONE: the tags give no mpp
    if importlib.util.find_spec("openslide") is not None:
        with wsi.open_slide(path, backend="openslide") as slide:  # why "auto" takes tifffile first for OME-TIFF
            assert slide.level_count == 1
    with wsi.open_slide(path) as slide:
        assert (slide.backend, slide.vendor) == ("tifffile", "ome-tiff")
        assert slide.level_dimensions == [(1200, 1000), (600, 500), (300, 250)]
        assert slide.level_downsamples == [1.0, 2.0, 4.0]
        for level, factor in enumerate((1, 2, 4)):
            assert slide.level_mpp(level) == pytest.approx((0.2527 * factor,) * 2, rel=1e-9)
        # Level 1 at level-0 (x, y) = (400, 240) is its pixel (200, 120), as written.
        np.testing.assert_array_equal(slide.read_level_region(1, (400, 240), (150, 100)),
                                      levels[1][120:220, 200:350])
        np.testing.assert_array_equal(slide.read_region((400, 240), (150, 100), mpp=0.2527 * 4),
                                      levels[2][60:160, 100:250])
        np.testing.assert_array_equal(slide.read_level_region(0, (1100, 900), (100, 100)), level0[900:, 1100:])


@pytest.mark.parametrize("xml, expected", [
    ('<OME><Image><Pixels PhysicalSizeX="0.5" PhysicalSizeY="0.25"/></Image></OME>', (0.5, 0.25)),
    ('<OME><Image><Pixels PhysicalSizeX="0.5" PhysicalSizeXUnit="mm" PhysicalSizeY="2" PhysicalSizeYUnit="cm"/>'
     '</Image></OME>', (500.0, 20000.0)),
    ('<OME><Image><Pixels PhysicalSizeX="0.5" PhysicalSizeXUnit="s" PhysicalSizeY="0.5"/></Image></OME>', None),
    ('<OME><Image><Pixels PhysicalSizeX="0.5"/></Image></OME>', None),
    ('<OME><Image><Pixels PhysicalSizeX="x" PhysicalSizeY="0.5"/></Image></OME>', None),
    ("<OME><Image>", None),
])
def test_ome_mpp_reads_physical_sizes_in_their_units(xml: str, expected: tuple | None) -> None:
    assert wsi.ome_mpp(xml) == (pytest.approx(expected) if expected else None)


# ---- hostile and implausible files ----------------------------------------------------------------------------


def test_header_claiming_a_million_pixels_square_is_refused(tmp_path: Path) -> None:
    hostile = million_px_square(tmp_path)
    # tifffile reads the patched header without complaint; the four tiles listed cannot cover 10^6 x 10^6 px.
    with pytest.raises(SlideError, match=r"hostile\.tif: level 0 claims 1000000 x 1000000 px, which takes 15264649 "
                                         r"tiles of 256 x 256 px, but the file lists 4"):
        wsi.open_slide(hostile, backend="tifffile")
    if importlib.util.find_spec("openslide") is not None:
        with pytest.raises(SlideError, match=r"hostile\.tif: "):
            wsi.open_slide(hostile, backend="openslide")
    # The base class bounds every backend: by the absolute limit, and by the file's size below that limit.
    with pytest.raises(SlideError, match=r"hostile\.tif: claims 1000000 x 1000000 px at level 0 \(1e\+12 px\), more "
                                         r"than the 1e\+11 px a slide may have"):
        wsi.Slide._check_claims(_Claims(hostile, [(10**6, 10**6)]))
    with pytest.raises(SlideError, match=rf"hostile\.tif: claims 100000 x 100000 px at level 0 \(1e\+10 px\) in a "
                                         rf"file of {hostile.stat().st_size} bytes"):
        wsi.Slide._check_claims(_Claims(hostile, [(10**5, 10**5)]))
    with pytest.raises(SlideError, match=r"hostile\.tif: level 1 claims 1024 x 0 px, which is not a positive size"):
        wsi.Slide._check_claims(_Claims(hostile, [(100, 100), (1024, 0)]))


class _Claims:
    """What `Slide._check_claims` reads from a slide, without a backend."""

    file_mpp = None

    def __init__(self, path: Path, level_dimensions: list[tuple[int, int]],
                 tile_sizes: dict[int, tuple[int, int]] | None = None) -> None:
        self.path, self.level_dimensions, self._max_level0_px = path, level_dimensions, wsi.MAX_LEVEL0_PX
        self.tile_sizes = tile_sizes or {}

    def _stored_bytes(self) -> int:
        return self.path.stat().st_size

    def _tile_sizes(self) -> dict[int, tuple[int, int]]:
        return self.tile_sizes


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_level0_pixel_limit_for_every_backend(tmp_path: Path, monkeypatch, backend: str) -> None:
    path = sparse_tiff(tmp_path / "sparse.tif", 16384, 16384)
    with wsi.open_slide(path, backend=backend) as slide:
        assert slide.dimensions == (16384, 16384)
    claim = r"sparse\.tif: claims 16384 x 16384 px at level 0 \(2\.68e\+08 px\), more than the 1e\+08 px"
    with pytest.raises(SlideError, match=claim):
        wsi.open_slide(path, backend=backend, max_level0_px=10**8)
    monkeypatch.setenv("PATHBUNDLES_MAX_LEVEL0_PX", "1e8")
    with pytest.raises(SlideError, match=claim):
        wsi.open_slide(path, backend=backend)
    monkeypatch.delenv("PATHBUNDLES_MAX_LEVEL0_PX")
    # 16384^2 px in ~33 kB is 8e3 px per byte: refused once the bound is below that.
    monkeypatch.setattr(wsi, "MAX_PX_PER_FILE_BYTE", 1000)
    with pytest.raises(SlideError, match=r"sparse\.tif: claims 16384 x 16384 px at level 0 .* px per byte"):
        wsi.open_slide(path, backend=backend)


def test_a_header_claiming_huge_tiles_is_refused_before_a_read(tmp_path: Path) -> None:
    """OpenSlide opened a TIFF claiming tiles of 256 x 2^30 px and aborted the whole process (GLib: failed to
    allocate 1 TiB) at the first read; the tifffile backend refused it by its tile table."""
    huge = patch_tag(small_tiff(tmp_path / "small.tif"), tmp_path / "huge.tif", "TileLength", [2**30])
    backends = ["tifffile"] + (["openslide"] if importlib.util.find_spec("openslide") is not None else [])
    for backend in backends:
        with pytest.raises(SlideError, match=r"huge\.tif: level 0 claims (tiles of 256 x 1073741824 px, more than the "
                                             r"2\.68e\+08 px a tile may have|512 x 512 px, which takes 2 tiles)"):
            wsi.open_slide(huge, backend=backend)
    with pytest.raises(SlideError, match=r"huge\.tif: level 1 claims tiles of 16384 x 16385 px"):
        wsi.Slide._check_claims(_Claims(huge, [(100, 100), (50, 50)], {0: (256, 256), 1: (16384, 16385)}))
    wsi.Slide._check_claims(_Claims(huge, [(200000, 100)], {0: (200000, 8)}))  # NDPI: a level's width by 8 rows


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_an_mpp_that_makes_the_slide_larger_than_glass_is_refused(tmp_path: Path, backend: str) -> None:
    """A resolution tag of 1e-9 px per cm (1e13 um/px) was only a warning; planning a run on it overflowed
    (OverflowError, stopping the whole run), and a smaller absurd value would read a thumbnail of billions of px."""
    huge = patch_tag(small_tiff(tmp_path / "small.tif"), tmp_path / "huge.tif", "XResolution", [1, 10**9])
    with pytest.raises(SlideError, match=r"huge\.tif: 512 x 512 px at 1e\+13 x 0\.25 um/px would be a scan of "
                                         r"5\.12e\+12 x 0\.128 mm, larger than any glass slide \(200 mm a side\); "
                                         r"the mpp is wrong: set the slide's level-0 mpp"):
        wsi.open_slide(huge, backend=backend)
    with wsi.open_slide(huge, backend=backend, mpp=0.25) as slide:  # the right mpp opens it; an absurd one does not
        assert slide.mpp == (0.25, 0.25)
    with pytest.raises(SlideError, match=r"small\.tif: 512 x 512 px at 500 x 500 um/px would be a scan of 256 x"):
        wsi.open_slide(tmp_path / "small.tif", backend=backend, mpp=500)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_camelyon16_sized_slide_is_accepted(tmp_path: Path, backend: str) -> None:
    path = sparse_tiff(tmp_path / "tumor_like.tif", 97792, 221184)  # Camelyon16 Tumor_001's level 0
    with wsi.open_slide(path, backend=backend) as slide:
        assert slide.dimensions == (97792, 221184)
        assert slide.mpp == pytest.approx((0.243, 0.243))


def test_tiles_smaller_than_their_codec_allows_are_refused(tmp_path: Path) -> None:
    level0 = np.random.default_rng(3).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, level0, tile=(256, 256), compression="zlib", photometric="rgb")
    bad = tmp_path / "bad.tif"
    patch_tag(good, bad, "TileByteCounts", [40, 40, 40, 40])  # 256 x 256 x 3 bytes deflate to >= 191 bytes
    with pytest.raises(SlideError, match=r"bad\.tif: level 0 tile 0 holds 40 bytes, fewer than the 191 that any "
                                         r"256 x 256 px tile compressed as ADOBE_DEFLATE takes"):
        wsi.open_slide(bad, backend="tifffile")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_truncated_svs_says_what_is_missing(shared_data: Path, tmp_path: Path, backend: str) -> None:
    data = (shared_data / CMU).read_bytes()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[:len(data) // 2])  # the SVS's first image directory lies at byte 1275950, after the tiles
    with pytest.raises(SlideError, match=rf"cut\.svs: file is truncated: the TIFF header puts the first image "
                                         rf"directory at byte 1275950, but the file has only {len(data) // 2} bytes"):
        wsi.open_slide(cut, backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_implausible_mpp_is_a_warning_naming_the_file(tmp_path: Path, caplog, backend: str) -> None:
    wrong = aperio_like(tmp_path / "wrong.svs", 0.1, 40)
    right = aperio_like(tmp_path / "right.svs", 0.2525, 40)
    caplog.set_level("WARNING", logger="pathbundles.wsi")
    wsi._warned_mpp.clear()
    with wsi.open_slide(right, backend=backend) as slide:
        assert slide.mpp == pytest.approx((0.2525, 0.2525))
    assert not caplog.records
    with wsi.open_slide(wrong, backend=backend) as slide:
        assert slide.mpp == pytest.approx((0.1, 0.1))  # a warning, not a refusal: the user decides
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    message = caplog.records[0].getMessage()
    assert message.startswith(f"{wrong}: the file states a level-0 resolution of 0.1 x 0.1 um/px")
    assert "objective power 40x, which scans at about 0.25 um/px" in message and "slide_mpp" in message
    caplog.clear()
    with wsi.open_slide(wrong, backend=backend, mpp=0.25) as slide:  # the override is the user's word: no warning
        assert slide.mpp == (0.25, 0.25)
    assert not caplog.records

    far = tmp_path / "far.tif"  # no objective power: only the absolute range applies
    tifffile.imwrite(far, np.zeros((256, 256, 3), np.uint8), tile=(256, 256), photometric="rgb",
                     resolution=(1e4 / 25.0, 1e4 / 25.0), resolutionunit="CENTIMETER")
    with wsi.open_slide(far, backend=backend):
        pass
    assert "outside the 0.1-20.0 um/px a scanner produces" in caplog.records[0].getMessage()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_stated_mpp_that_is_no_positive_number_states_none(tmp_path: Path, backend: str) -> None:
    """An Aperio ``MPP = -`` or ``AppMag = .`` made the tifffile backend raise ValueError at open (a traceback from
    ``pathbundles info``); ``MPP = 1e999`` and a resolution tag of 1/0 px per cm gave an mpp of inf and 0, on which
    a run's planning overflowed or divided by zero and stopped every slide."""
    for name, mpp in (("dash", "-"), ("dot", "."), ("e", "e"), ("inf", "1e999")):
        with wsi.open_slide(aperio_like(tmp_path / f"{name}.svs", mpp, 40), backend=backend) as slide:
            assert slide.file_mpp is None, name
            with pytest.raises(SlideError, match=rf"{name}\.svs: the slide states no resolution"):
                _ = slide.mpp
    with wsi.open_slide(aperio_like(tmp_path / "mag.svs", 0.25, "."), backend=backend) as slide:
        assert slide.mpp == pytest.approx((0.25, 0.25))  # the power is unknown, the mpp stands
    zero = patch_tag(small_tiff(tmp_path / "small.tif"), tmp_path / "zero.tif", "XResolution", [1, 0])
    with wsi.open_slide(zero, backend=backend) as slide:
        assert slide.file_mpp is None
