"""The level check (`Slide._level_agrees`): a pyramid level that does not agree with a downsampled finer level in
colour or position is skipped with one warning, and reads come from level 0; a sound uneven pyramid is used."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from pathbundles import wsi
from pathbundles.resample import resample_area
from pathbundles.wsi import open_slide

MPP = 0.2527
#: A pyramid with uneven downsamples (3.7 then about 13.7), as converters that resize to a target mpp write.
LEVEL_SIZES = [(2048, 1536), (554, 415), (150, 112)]


@pytest.fixture(scope="module")
def tissue(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """Level 0 of a small phantom slide: (1536, 2048, 3) uint8 tissue and glass."""
    from pathbundles.phantom import make_metastasis_dataset

    folder = tmp_path_factory.mktemp("phantom")
    make_metastasis_dataset(folder, n=1, size_px=LEVEL_SIZES[0], mpp=MPP)
    with open_slide(next(folder.glob("*.tif")), backend="tifffile") as slide:
        return slide.read_level_region(0, (0, 0), slide.dimensions)


def pyramid_levels(level0: np.ndarray, sizes: list[tuple[int, int]] = LEVEL_SIZES) -> list[np.ndarray]:
    """``level0`` and its area-averaged levels of ``sizes`` (whole-image resizes: level scale = size ratio)."""
    h, w = level0.shape[:2]
    return [level0] + [resample_area(level0, (0, 0, w, h), wh) for wh in sizes[1:]]


def write_pyramid(path: Path, levels: list[np.ndarray], mpp: float = MPP, compression: str = "zlib") -> Path:
    """A tiled pyramid TIFF: level 0, then reduced-resolution pages (NewSubfileType 1) with their own resolution
    tags (pixels per cm), as OpenSlide and the tifffile backend read them."""
    (h0, w0) = levels[0].shape[:2]
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate(levels):
            h, w = level.shape[:2]
            tif.write(level, tile=(256, 256), photometric="rgb", compression=compression, subfiletype=1 if i else 0,
                      resolution=(1e4 / (mpp * w0 / w), 1e4 / (mpp * h0 / h)), resolutionunit="CENTIMETER")
    return path


def ycbcr_as_rgb(rgb: np.ndarray) -> np.ndarray:
    """What a reader shows for a level stored as YCbCr but tagged RGB (a converter's mislabelled level)."""
    return np.asarray(Image.fromarray(rgb).convert("YCbCr"))


@pytest.fixture(autouse=True)
def fresh_checks() -> None:
    wsi._LEVEL_CHECKS.clear()  # every test opens new files, but tmp paths may repeat across runs in one process


def level_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pathbundles.wsi" and "is not used" in r.getMessage()]


@pytest.mark.parametrize("backend", ["tifffile", "openslide"])
def test_sound_uneven_pyramid_is_used(tissue: np.ndarray, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                      backend: str) -> None:
    path = write_pyramid(tmp_path / "uneven.tif", pyramid_levels(tissue))
    with caplog.at_level(logging.WARNING), open_slide(path, backend=backend) as slide:
        assert slide.level_dimensions == LEVEL_SIZES
        assert slide.level_downsamples[1] == pytest.approx((2048 / 554 + 1536 / 415) / 2)
        mpp1 = slide.level_mpp(1)
        assert slide._level_for(max(mpp1) * 1.2) == 1 and slide._level_within(mpp1[0], 0.01) == 1
        assert all(slide._level_agrees(level) for level in range(slide.level_count))
        assert wsi._LEVEL_CHECKS[(str(path), backend, 1)] == ""
    assert level_warnings(caplog) == []


@pytest.mark.parametrize("fault", ["ycbcr", "shift"])
def test_faulty_level_is_skipped(tissue: np.ndarray, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                 fault: str) -> None:
    levels = pyramid_levels(tissue)
    if fault == "ycbcr":
        levels[1] = ycbcr_as_rgb(levels[1])
    else:
        levels[1] = np.ascontiguousarray(np.roll(levels[1], (2, 2), axis=(0, 1)))  # 2 level px down and right
    path = write_pyramid(tmp_path / f"{fault}.tif", levels)
    with caplog.at_level(logging.WARNING), open_slide(path, backend="tifffile") as slide:
        mpp1 = slide.level_mpp(1)[0]
        wanted = 1.2 * max(slide.level_mpp(1))  # a sound level 1 would be read (and resampled) for it
        origin, size = (512, 384), (64, 48)
        region = slide.read_region(origin, size, wanted)
        # Level 1 is skipped: the read is level 0 area-averaged, exactly.
        span = (size[0] * wanted / MPP, size[1] * wanted / MPP)
        expected = resample_area(tissue, (origin[0], origin[1], origin[0] + span[0], origin[1] + span[1]), size)
        np.testing.assert_array_equal(region, expected)
        assert slide._level_for(wanted) == 0
        assert slide._level_within(mpp1, 0.1) is None  # thumbnails and snapped reads do not take it either
        thumb, actual_mpp = slide.read_thumbnail(mpp1, tolerance=0.1)
        assert actual_mpp == pytest.approx(mpp1, rel=0.01)
        # Level 2 is checked against level 0 (the finer level that passed) and used.
        assert slide._level_agrees(2) and slide._level_for(1.2 * max(slide.level_mpp(2))) == 2
    warnings = level_warnings(caplog)
    assert len(warnings) == 1, warnings  # one warning, however many reads
    assert str(path) in warnings[0] and "level 1 (554 x 415 px)" in warnings[0]
    assert ("shifted by about (2, 2)" if fault == "shift" else "colour differs") in warnings[0]
    with open_slide(path, backend="tifffile") as again:  # checked once per process: no second warning
        again.read_region(origin, size, wanted)
    assert len(level_warnings(caplog)) == 1


def test_small_shift_from_size_rounding_passes(tissue: np.ndarray, tmp_path: Path) -> None:
    """A level made from a level 0 cropped by under a level px (sizes ceiled by a converter) is not 'shifted'."""
    levels = pyramid_levels(tissue)
    h, w = tissue.shape[:2]
    levels[1] = resample_area(tissue, (1.5, 1.5, w, h), LEVEL_SIZES[1])  # 1.5 level-0 px = 0.4 level-1 px off
    path = write_pyramid(tmp_path / "rounded.tif", levels)
    with open_slide(path, backend="tifffile") as slide:
        assert slide._check_level_agreement(1, 0) == ""


def test_content_found_without_a_small_coarsest_level(tissue: np.ndarray, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the coarsest level is too large to read whole, the window is the most tissue-like of 9 on the level:
    a shifted level is still found, a sound one still passes."""
    monkeypatch.setattr(wsi, "LEVEL_CHECK_MAP_PX", 0)
    levels = pyramid_levels(tissue)
    sound = write_pyramid(tmp_path / "sound.tif", levels)
    levels[1] = np.ascontiguousarray(np.roll(levels[1], (0, -1), axis=(0, 1)))  # 1 level px to the left
    shifted = write_pyramid(tmp_path / "shifted.tif", levels)
    with open_slide(sound, backend="tifffile") as slide:
        assert slide._check_level_agreement(1, 0) == ""
        x, y = slide._content_window(1, (256, 256))
        assert slide.read_level_region(1, (x * 3.7, y * 3.7), (256, 256)).mean() < 235  # tissue, not glass
    with open_slide(shifted, backend="tifffile") as slide:
        assert slide._check_level_agreement(1, 0).startswith("it is shifted by about (-1, 0) level px")


def test_a_level_too_far_from_a_sound_one_is_not_read_to_check_it(tissue: np.ndarray, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Checking a level 256 times coarser than level 0 (the levels between having failed) would read about 5600 px
    a side of level 0, and gigabytes as floats for coarser ones: such a level is refused unread, with the warning."""
    level0 = np.tile(tissue[:256, :256], (16, 24, 1))  # 6144 x 4096 px, so that the 1/256 level is 24 x 16 px
    path = write_pyramid(tmp_path / "far.tif", [level0, resample_area(level0, (0, 0, 6144, 4096), (24, 16))])
    with caplog.at_level(logging.WARNING), open_slide(path, backend="tifffile") as slide:
        assert not slide._level_agrees(1)
        assert slide._level_for(slide.level_mpp(1)[0]) == 0
    (warning,) = level_warnings(caplog)
    assert "256 times coarser than level 0" in warning and "not checked, not used" in warning
