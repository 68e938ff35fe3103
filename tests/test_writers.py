"""Tests of pathbundles.writers: pyramid TIFF round trips (tifffile and OpenSlide), streaming memory, atomicity,
disk canvas, overlay PNGs and detection files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

import pathbundles
from pathbundles.errors import InputError
from pathbundles.writers import (
    DiskCanvas,
    colormap_lut,
    read_detections_csv,
    read_detections_geojson,
    read_pyramid_fields,
    read_pyramid_mpp,
    write_detections_asap_xml,
    write_detections_csv,
    write_detections_geojson,
    write_label_overlay_png,
    write_overlay_png,
    write_pyramid_tiff,
)


def gradient_rgb(h: int, w: int) -> np.ndarray:
    """Deterministic RGB test image: horizontal, vertical and diagonal ramps plus fine texture."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, (x + 2 * y) % 256 ^ (x * y % 7)], axis=-1).astype(np.uint8)


def block_mean(image: np.ndarray, step: int) -> np.ndarray:
    """Reference area downsample: mean of each step x step block, partial edge blocks over their own pixels."""
    h, w = image.shape[:2]
    oh, ow = -(-h // step), -(-w // step)
    padded = np.zeros((oh * step, ow * step, *image.shape[2:]))
    padded[:h, :w] = image
    counts = np.zeros((oh * step, ow * step))
    counts[:h, :w] = 1
    sums = padded.reshape(oh, step, ow, step, *image.shape[2:]).sum(axis=(1, 3))
    n = counts.reshape(oh, step, ow, step).sum(axis=(1, 3))
    return sums / n.reshape(n.shape + (1,) * (image.ndim - 2))


def mpp_from_tags(page: tifffile.TiffPage) -> tuple[float, float]:
    assert page.tags.valueof("ResolutionUnit") == 3  # centimetre
    xres, yres = page.tags.valueof("XResolution"), page.tags.valueof("YResolution")
    return 10_000 * xres[1] / xres[0], 10_000 * yres[1] / yres[0]


@pytest.fixture(scope="module")
def rgb_image() -> np.ndarray:
    return gradient_rgb(3000, 2000)


@pytest.fixture(scope="module")
def rgb_tiff(tmp_path_factory: pytest.TempPathFactory, rgb_image: np.ndarray) -> Path:
    out = tmp_path_factory.mktemp("pyr") / "rgb.tif"
    return write_pyramid_tiff(out, rgb_image, mpp=0.243, compression="deflate")


# ---------------------------------------------------------------------------------------------------------------
# Pyramid TIFF, read with tifffile
# ---------------------------------------------------------------------------------------------------------------


def test_deflate_round_trip_levels_tags(rgb_tiff: Path, rgb_image: np.ndarray) -> None:
    with tifffile.TiffFile(rgb_tiff) as tif:
        pages = list(tif.pages)
        # One top-level page per level (OpenSlide's pyramid), and the reduced levels again as SubIFDs of level 0
        # (the OME-TIFF pyramid), pixel for pixel the same.
        assert [p.shape for p in pages] == [(3000, 2000, 3), (1500, 1000, 3), (750, 500, 3), (375, 250, 3)]
        subifds = list(pages[0].pages)
        assert [p.shape for p in subifds] == [p.shape for p in pages[1:]]
        assert tif.is_ome and tif.series[0].is_pyramidal and len(tif.series) == 1
        assert all(p.is_tiled and p.tilewidth == 256 and p.tilelength == 256 for p in pages + subifds)
        assert [p.subfiletype for p in pages + subifds] == [0, 1, 1, 1, 1, 1, 1]
        assert all(p.compression == tifffile.COMPRESSION.ADOBE_DEFLATE for p in pages)
        np.testing.assert_array_equal(pages[0].asarray(), rgb_image)
        level1 = pages[1].asarray().astype(np.float64)
        assert np.abs(level1 - block_mean(rgb_image, 2)).max() <= 1
        for copy, page in zip(subifds, pages[1:], strict=True):
            np.testing.assert_array_equal(copy.asarray(), page.asarray())
            assert mpp_from_tags(copy) == mpp_from_tags(page)
        for k, page in enumerate(pages):
            np.testing.assert_allclose(mpp_from_tags(page), (0.243 * 2**k, 0.243 * 2**k), rtol=1e-6)
            fields = read_pyramid_fields(rgb_tiff, k)
            assert fields["mpp"] == 0.243 and fields["level"] == k
            assert fields["level_mpp"] == pytest.approx([0.243 * 2**k] * 2)
        # Level 0's OME-XML states the physical pixel size (um, the OME default unit) and holds the fields.
        pixels = tif.ome_metadata.split("<Pixels ")[1].split(">")[0]
        assert 'PhysicalSizeX="0.243"' in pixels and 'PhysicalSizeY="0.243"' in pixels and "Unit" not in pixels
        assert tif.ome_metadata.isascii()
    assert read_pyramid_mpp(rgb_tiff) == 0.243


def test_mpp_and_fields_of_older_and_foreign_files(tmp_path: Path, shared_data: Path) -> None:
    """A pyramid written before the OME layout (JSON in page 0's own description) still reads back; an OME-TIFF
    written by QuPath/Bio-Formats gives its OME-XML PhysicalSizeX (0.2271 um/px, as its README states)."""
    old = tmp_path / "old.tif"
    fields = {"pathbundles": "pyramid", "mpp": 0.972, "level": 0, "level_mpp": [0.972, 0.972]}
    tifffile.imwrite(old, np.zeros((64, 64), np.uint8), tile=(16, 16), description=json.dumps(fields), metadata=None,
                     resolution=(10_000 / 2.0, 10_000 / 2.0), resolutionunit="CENTIMETER")
    assert read_pyramid_mpp(old) == 0.972 and read_pyramid_fields(old) == fields  # the JSON wins over the tags
    ome = shared_data / "openslide_os1_he_40x_crop.ome.tif"
    assert read_pyramid_mpp(ome) == pytest.approx(0.2271, abs=1e-4)
    with pytest.raises(InputError, match="no pathbundles pyramid fields"):
        read_pyramid_fields(ome)


def test_step4_ceil_sizes_and_partial_blocks(tmp_path: Path) -> None:
    image = gradient_rgb(3001, 1999)
    out = write_pyramid_tiff(tmp_path / "s4.tif", image, mpp=0.5, downsample_step=4, tile_px=512)
    with tifffile.TiffFile(out) as tif:
        assert [p.shape[:2] for p in tif.pages] == [(3001, 1999), (751, 500), (188, 125)]
        assert [p.subfiletype for p in tif.pages] == [0, 1, 1]
        assert np.abs(tif.pages[1].asarray() - block_mean(image, 4)).max() <= 0.5  # rounded, edges included
        # Level 2 is made from level 1 (cascaded), as a reader would expect of a pyramid.
        assert np.abs(tif.pages[2].asarray() - block_mean(tif.pages[1].asarray(), 4)).max() <= 0.5
        # The mpp tags are the blocks' (4 x 0.5 um), not the ratio of the rounded sizes (1999 / 500 = 3.998).
        np.testing.assert_allclose(mpp_from_tags(tif.pages[1]), (2.0, 2.0), rtol=1e-6)
        assert read_pyramid_fields(out, 2)["downsample"] == [16.0, 16.0]


def test_floor_rounded_levels_drop_partial_blocks(tmp_path: Path) -> None:
    """Levels of floor-divided size, as Aperio SVS has: partial blocks at the right and bottom are left out, and the
    slide layer still places every level as 4-fold blocks (3001 / 750 = 4.0013 is not the factor)."""
    image = gradient_rgb(3001, 1999)
    out = write_pyramid_tiff(tmp_path / "f4.tif", image, mpp=0.5, downsample_step=4, tile_px=512,
                             level_rounding="floor", min_level_px=130)
    with tifffile.TiffFile(out) as tif:
        assert [p.shape[:2] for p in tif.pages] == [(3001, 1999), (750, 499), (187, 124)]
        assert np.abs(tif.pages[1].asarray() - block_mean(image[:3000, :1996], 4)).max() <= 0.5
        assert np.abs(tif.pages[2].asarray() - block_mean(tif.pages[1].asarray()[:748, :496], 4)).max() <= 0.5
    from pathbundles.wsi import open_slide

    with open_slide(out, backend="openslide") as slide:
        assert slide.level_downsamples == [1.0, 4.0, 16.0]
        assert slide.level_mpp(2) == pytest.approx((8.0, 8.0))


def test_float_map_lossless_and_label_map_nearest(tmp_path: Path) -> None:
    y, x = np.mgrid[0:700, 0:900]
    prob = ((np.sin(x / 40.0) * np.cos(y / 30.0) + 1) / 2).astype(np.float32)
    out = write_pyramid_tiff(tmp_path / "prob.tif", prob, mpp=8.0, min_level_px=100,
                             description={"scale": "probability, float32 0..1"})
    with tifffile.TiffFile(out) as tif:
        np.testing.assert_array_equal(tif.pages[0].asarray(), prob)
        np.testing.assert_allclose(tif.pages[1].asarray(), block_mean(prob, 2), atol=1e-6)
        assert read_pyramid_fields(out)["scale"] == "probability, float32 0..1"
    labels = ((x // 100 + y // 100) % 3 * 2 + 1).astype(np.uint8)  # labels 1, 3, 5: a mean would invent 2 and 4
    out = write_pyramid_tiff(tmp_path / "labels.tif", labels, mpp=8.0, min_level_px=100, resample="nearest")
    with tifffile.TiffFile(out) as tif:
        for k, page in enumerate(tif.pages):
            np.testing.assert_array_equal(page.asarray(), labels[::2**k, ::2**k])


# ---------------------------------------------------------------------------------------------------------------
# Pyramid TIFF, read with OpenSlide
# ---------------------------------------------------------------------------------------------------------------


def test_openslide_reads_rgb_pyramid_and_mpp(rgb_tiff: Path, rgb_image: np.ndarray) -> None:
    with openslide.OpenSlide(rgb_tiff) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert slide.level_count == 4
        assert slide.level_dimensions == ((2000, 3000), (1000, 1500), (500, 750), (250, 375))
        assert slide.level_downsamples == pytest.approx((1.0, 2.0, 4.0, 8.0))
        # OpenSlide derives mpp from the centimetre resolution tags of the generic TIFF.
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.243, rel=1e-6)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.243, rel=1e-6)
        region = np.asarray(slide.read_region((0, 0), 0, (2000, 3000)))
        assert (region[..., 3] == 255).all()
        np.testing.assert_array_equal(region[..., :3], rgb_image)
        with tifffile.TiffFile(rgb_tiff) as tif:
            level2 = tif.pages[2].asarray()
        np.testing.assert_array_equal(np.asarray(slide.read_region((400, 800), 2, (120, 90)))[..., :3],
                                      level2[200:290, 100:220])


def test_openslide_reads_single_channel_map(tmp_path: Path) -> None:
    y, x = np.mgrid[0:1200, 0:1500]
    prob = ((x + y) % 256).astype(np.uint8)
    out = write_pyramid_tiff(tmp_path / "map.tif", prob, mpp=3.888, description={"scale": "probability * 255"})
    with openslide.OpenSlide(out) as slide:
        assert slide.level_dimensions == ((1500, 1200), (750, 600), (375, 300), (188, 150))
        assert 'PhysicalSizeX="3.888"' in slide.properties[openslide.PROPERTY_NAME_COMMENT]  # the OME-XML
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(3.888, rel=1e-6)
        assert read_pyramid_fields(out)["scale"] == "probability * 255"
        region = np.asarray(slide.read_region((0, 0), 0, (1500, 1200)))
    # Grey pages come back as R = G = B = value, opaque.
    for channel in range(3):
        np.testing.assert_array_equal(region[..., channel], prob)
    assert (region[..., 3] == 255).all()


def test_openslide_rejects_float_map_as_documented(tmp_path: Path) -> None:
    out = write_pyramid_tiff(tmp_path / "float.tif", np.zeros((300, 300), np.float32), mpp=1.0,
                             description="probability, float32 0..1")
    with pytest.raises(openslide.OpenSlideError, match="32-bit samples"):
        with openslide.OpenSlide(out) as slide:
            slide.read_region((0, 0), 0, (8, 8))
    assert read_pyramid_mpp(out) == 1.0  # the tifffile path still works
    assert read_pyramid_fields(out)["note"] == "probability, float32 0..1"


def test_jpeg_rgb_round_trip(tmp_path: Path, rgb_image: np.ndarray) -> None:
    out = write_pyramid_tiff(tmp_path / "rgb_jpeg.tif", rgb_image, mpp=0.25, compression="jpeg", quality=90)
    with tifffile.TiffFile(out) as tif:
        assert all(p.compression == tifffile.COMPRESSION.JPEG for p in tif.pages)
        from_tifffile = tif.pages[0].asarray()
    with openslide.OpenSlide(out) as slide:
        assert slide.level_count == 4
        from_openslide = np.asarray(slide.read_region((0, 0), 0, (2000, 3000)))[..., :3]
    for decoded in (from_tifffile, from_openslide):
        assert np.abs(decoded.astype(np.int16) - rgb_image).mean() < 3


def test_invalid_arguments_raise_before_writing(tmp_path: Path) -> None:
    image = np.zeros((64, 64), np.float32)
    with pytest.raises(ValueError, match="jpeg"):
        write_pyramid_tiff(tmp_path / "a.tif", image, mpp=1.0, compression="jpeg")
    with pytest.raises(ValueError, match="tile_px"):
        write_pyramid_tiff(tmp_path / "a.tif", image, mpp=1.0, tile_px=100)
    with pytest.raises(ValueError, match="mpp"):
        write_pyramid_tiff(tmp_path / "a.tif", image, mpp=0.0)
    with pytest.raises(ValueError, match="uint8 single-channel"):
        write_pyramid_tiff(tmp_path / "a.tif", image, mpp=1.0, colormap={1: (255, 0, 0)})
    with pytest.raises(ValueError, match="uint8 single-channel"):
        write_pyramid_tiff(tmp_path / "a.tif", np.zeros((64, 64, 3), np.uint8), mpp=1.0, store_rgb=True)
    labels = np.zeros((64, 64), np.uint8)
    with pytest.raises(ValueError, match="palette"):
        write_pyramid_tiff(tmp_path / "a.tif", labels, mpp=1.0, colormap={1: (255, 0, 0)}, compression="jpeg")
    with pytest.raises(ValueError, match="colormap entry 1"):
        write_pyramid_tiff(tmp_path / "a.tif", labels, mpp=1.0, colormap={1: (256, 0, 0)})
    with pytest.raises(ValueError, match="OME-TIFF"):
        write_pyramid_tiff(tmp_path / "a.tif", np.zeros((64, 64), np.int64), mpp=1.0)
    assert list(tmp_path.iterdir()) == []


class FailingSource:
    """A lazy source whose band at row ``fail_row`` raises, as a crashing renderer or reader would."""

    def __init__(self, shape: tuple[int, ...], fail_row: int) -> None:
        self.shape, self.dtype, self.fail_row = shape, np.dtype(np.uint8), fail_row

    def __getitem__(self, rows: slice) -> np.ndarray:
        y0, y1, _ = rows.indices(self.shape[0])
        if y0 >= self.fail_row:
            raise RuntimeError("renderer crashed")
        return np.full((y1 - y0, *self.shape[1:]), 7, np.uint8)


@pytest.mark.parametrize("compression", ["deflate", "jpeg"])
def test_failure_mid_write_leaves_no_file(tmp_path: Path, compression: str) -> None:
    with pytest.raises(RuntimeError, match="renderer crashed"):
        write_pyramid_tiff(tmp_path / "out.tif", FailingSource((2048, 1024, 3), 1024), mpp=0.5,
                           compression=compression)
    assert sorted(os.listdir(tmp_path)) == []  # no final, no .partial, no level temporaries


def test_bad_band_shape_is_reported(tmp_path: Path) -> None:
    class Narrow(FailingSource):
        def __getitem__(self, rows: slice) -> np.ndarray:
            return super().__getitem__(rows)[:, :-1]

    with pytest.raises(ValueError, match=r"source\[0:256\] gave \(256, 511\)"):
        write_pyramid_tiff(tmp_path / "out.tif", Narrow((600, 512), 10_000), mpp=1.0)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# Streaming memory: a 50k x 50k map must not be held in memory
# ---------------------------------------------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from pathbundles.writers import write_pyramid_tiff

    class Checkerboard:
        # 50_000 x 50_000 uint8 rendered band by band from coordinates: 1000 px squares of 0 and 200.
        def __init__(self, n):
            self.shape, self.dtype = (n, n), np.dtype(np.uint8)
            self.row = np.where(np.arange(n) // 1000 % 2 == 1, 200, 0).astype(np.uint8)
            self.inverse = 200 - self.row
        def __getitem__(self, rows):
            y0, y1, _ = rows.indices(self.shape[0])
            band = np.empty((y1 - y0, self.shape[1]), np.uint8)
            odd = np.arange(y0, y1) // 1000 % 2 == 1
            band[~odd] = self.row
            band[odd] = self.inverse
            return band

    def status_kb(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    out = sys.argv[1]
    # Warm up codecs, threads and imports so that the baseline holds everything but the big write.
    write_pyramid_tiff(out, Checkerboard(3000), mpp=0.25, tile_px=512, deflate_level=1)
    # Reset the peak-RSS mark (VmHWM) to the current RSS. ru_maxrss cannot serve: a child inherits its parent's
    # (here pytest's) high-water mark through fork.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base_kb = status_kb("VmRSS")
    start = time.perf_counter()
    write_pyramid_tiff(out, Checkerboard(50_000), mpp=0.25, tile_px=512, deflate_level=1)
    seconds = time.perf_counter() - start
    peak_kb = status_kb("VmHWM")
    print(json.dumps({"base_mb": base_kb / 1024, "peak_mb": peak_kb / 1024, "seconds": seconds}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc/self/status")
def test_50k_map_streams_in_bounded_memory(tmp_path: Path) -> None:
    out = tmp_path / "map50k.tif"
    common = str(Path(pathbundles.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [common, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(out)], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    grown_mb = stats["peak_mb"] - stats["base_mb"]
    print(f"50k x 50k uint8: peak RSS {stats['peak_mb']:.0f} MiB, {grown_mb:.0f} MiB above the "
          f"{stats['base_mb']:.0f} MiB before the write, "
          f"in {stats['seconds']:.1f} s")
    map_mb = 50_000 * 50_000 / 2**20
    assert grown_mb < map_mb / 20  # < 119 MiB for a 2.3 GiB map

    assert sorted(os.listdir(tmp_path)) == ["map50k.tif"]  # level temporaries removed
    with tifffile.TiffFile(out) as tif:
        assert tif.is_bigtiff
        assert [p.shape for p in tif.pages][:3] == [(50_000, 50_000), (25_000, 25_000), (12_500, 12_500)]
        assert tif.pages[-1].shape == (196, 196) and len(tif.pages) == 9
    with openslide.OpenSlide(out) as slide:
        assert slide.level_count == 9
        # Inside squares: level 0 exact; level 3 (8x) away from the square edges is the same value.
        assert np.asarray(slide.read_region((49_100, 500), 0, (64, 64)))[..., 0].tolist() == [[200] * 64] * 64
        assert (np.asarray(slide.read_region((1100, 1100), 0, (32, 32)))[..., 0] == 0).all()
        assert (np.asarray(slide.read_region((1200, 100), 3, (50, 50)))[..., 0] == 200).all()


# ---------------------------------------------------------------------------------------------------------------
# DiskCanvas
# ---------------------------------------------------------------------------------------------------------------


def test_disk_canvas_stitch_read_and_write_as_pyramid(tmp_path: Path, rgb_image: np.ndarray) -> None:
    with DiskCanvas((3000, 2000, 3), np.uint8, fill=255, dir=tmp_path) as canvas:
        files = [p for p in tmp_path.iterdir()]
        assert len(files) == 1 and files[0].name.startswith(".")
        assert (canvas[:10] == 255).all()
        for y0 in range(0, 3000, 700):
            for x0 in range(0, 2000, 600):
                canvas[y0:y0 + 700, x0:x0 + 600] = rgb_image[y0:y0 + 700, x0:x0 + 600]
        np.testing.assert_array_equal(canvas[1234:1300, 5:1999], rgb_image[1234:1300, 5:1999])
        out = write_pyramid_tiff(tmp_path / "out" / "stitched.tif", canvas, mpp=0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # canvas file removed on exit
    assert canvas.closed
    with pytest.raises(ValueError, match="closed"):
        canvas[0:1]
    np.testing.assert_array_equal(tifffile.imread(out, key=0), rgb_image)


def test_disk_canvas_weighted_accumulate_averages_overlaps(tmp_path: Path) -> None:
    canvas = DiskCanvas((10, 12), np.uint8, fill=9, dir=tmp_path, weighted=True)
    canvas.accumulate((0, 0), np.full((6, 6), 100.0))
    canvas.accumulate((3, 3), np.full((6, 6), 200.0), weight=3.0)
    canvas.accumulate((-2, 10), np.full((4, 4), 50.0))  # clipped at the top and right edges
    values = canvas[0:10, 0:12]
    assert values[0, 0] == 100 and values[7, 7] == 200
    assert values[4, 4] == 175  # (100 * 1 + 200 * 3) / 4
    assert values[9, 0] == 9  # nothing added: fill
    assert (values[0:2, 10:12] == 50).all()
    with pytest.raises(TypeError):
        canvas[0:1, 0:1] = 3
    canvas.close()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# Overlay PNGs
# ---------------------------------------------------------------------------------------------------------------


def test_overlay_png_blends_resized_map(tmp_path: Path) -> None:
    thumb = np.full((120, 160, 3), 200, np.uint8)
    prob = np.zeros((30, 40), np.float32)
    prob[:, 20:] = 1.0
    out = write_overlay_png(tmp_path / "overlay.png", thumb, prob, alpha=0.5, threshold=0.5, resample="nearest")
    blended = np.asarray(Image.open(out))
    assert blended.shape == (120, 160, 3)
    np.testing.assert_array_equal(blended[:, :80], thumb[:, :80])  # below threshold: untouched
    top = colormap_lut("jet")[255].astype(float)
    np.testing.assert_allclose(blended[:, 80:], np.broadcast_to((200 + top) / 2, (120, 80, 3)), atol=1)
    assert [p.name for p in tmp_path.iterdir()] == ["overlay.png"]
    # uint8 maps are read as probability * 255 by default.
    uint8_map = write_overlay_png(tmp_path / "u8.png", thumb, (prob * 255).astype(np.uint8), threshold=0.5,
                                  resample="nearest")
    assert np.abs(np.asarray(Image.open(uint8_map)).astype(int) - blended).max() <= 1


def test_colormap_jet_endpoints() -> None:
    lut = colormap_lut("jet")
    assert lut.shape == (256, 3)
    assert tuple(lut[0]) == (0, 0, 128) and tuple(lut[255]) == (128, 0, 0)
    assert np.abs(lut[128].astype(int) - (124, 255, 122)).max() <= 4  # green-ish middle


def test_label_overlay_png(tmp_path: Path) -> None:
    rgb = np.zeros((40, 40, 3), np.uint8)
    labels = np.array([[0, 1], [2, 3]], np.uint8)
    out = write_label_overlay_png(tmp_path / "labels.png", rgb, labels, {1: (255, 0, 0), 2: (0, 0, 255)}, alpha=1.0)
    image = np.asarray(Image.open(out))
    assert tuple(image[5, 5]) == (0, 0, 0)  # label 0 not in the palette
    assert tuple(image[5, 35]) == (255, 0, 0)
    assert tuple(image[35, 5]) == (0, 0, 255)
    assert tuple(image[35, 35]) == (0, 0, 0)  # label 3 not in the palette


# ---------------------------------------------------------------------------------------------------------------
# Detections
# ---------------------------------------------------------------------------------------------------------------

DETECTIONS = np.array([[0.9731, 51234.0, 80211.5], [0.5, 12.0, 7.0], [1.0, 0.0, 99999.0]])
# Detections as post-processing gives them on the real SVS: sub-pixel level-0 positions.
SUBPIXEL = np.array([[0.8123456789, 1462.925852, 2047.5], [0.51, 63.999, 31.0001], [1.0, 0.25, 2218.75]])


def test_detections_csv_round_trip(tmp_path: Path) -> None:
    out = write_detections_csv(tmp_path / "Test_001.csv", DETECTIONS)
    assert out.read_text().splitlines()[0] == "0.9731,51234,80211"  # Camelyon16: no header, prob,x,y
    np.testing.assert_array_equal(read_detections_csv(out), np.column_stack([DETECTIONS[:, 0],
                                                                             np.floor(DETECTIONS[:, 1:])]))
    empty = write_detections_csv(tmp_path / "empty.csv", [])
    assert read_detections_csv(empty).shape == (0, 3)


def test_detections_csv_opens_in_the_organisers_parser_and_keeps_the_froc(tmp_path: Path) -> None:
    """readCSVContent does int() on x and y: it must parse every row, giving the level-0 pixel that holds each
    detection, and the FROC hit test (mask pixel floor(x / 32), floor(y / 32)) must find the same lesion pixel
    for the written whole numbers as for the sub-pixel positions."""
    from challenge_parsers import read_csv_content
    from pathbundles.metrics.froc import LesionMask

    out = write_detections_csv(tmp_path / "Test_001.csv", SUBPIXEL)
    assert out.read_text().splitlines() == ["0.8123456789,1462,2047", "0.51,63,31", "1,0,2218"]
    probs, xs, ys = read_csv_content(out)
    assert probs == pytest.approx(SUBPIXEL[:, 0].tolist(), abs=1e-10)
    assert (xs, ys) == ([1462, 63, 0], [2047, 31, 2218])
    rng = np.random.default_rng(0)
    positions = np.concatenate([rng.uniform(0, 3200, (500, 2)), [[63.999, 31.0001], [95.99, 127.5]]])
    detections = np.column_stack([np.full(len(positions), 0.9), positions])
    written = read_detections_csv(write_detections_csv(tmp_path / "many.csv", detections))
    mask = LesionMask(labels=np.arange(100 * 100, dtype=np.int32).reshape(100, 100), itc=(), mask_downsample=32.0,
                      level0_mpp=0.243)
    np.testing.assert_array_equal(mask.label_at(written[:, 1:]), mask.label_at(positions))


def test_detections_geojson_round_trip_qupath_fields(tmp_path: Path) -> None:
    out = write_detections_geojson(tmp_path / "det.geojson", DETECTIONS, mpp=0.243)
    collection = json.loads(out.read_text())
    assert collection["type"] == "FeatureCollection" and collection["properties"]["mpp"] == 0.243
    feature = collection["features"][0]
    assert feature["geometry"] == {"type": "Point", "coordinates": [51234.0, 80211.5]}  # sub-pixel, as detected
    assert feature["properties"]["objectType"] == "detection"
    assert feature["properties"]["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
    assert feature["properties"]["score"] == 0.9731 and feature["properties"]["name"] == "Tumor 1"
    np.testing.assert_array_equal(read_detections_geojson(out), DETECTIONS)


def test_detection_geojson_ids_are_stable_uuids_and_every_class_has_a_colour(tmp_path: Path) -> None:
    import uuid

    first = json.loads(write_detections_geojson(tmp_path / "a" / "Test_001.geojson", SUBPIXEL).read_text())
    again = json.loads(write_detections_geojson(tmp_path / "b" / "Test_001.geojson", SUBPIXEL).read_text())
    other = json.loads(write_detections_geojson(tmp_path / "Test_002.geojson", SUBPIXEL).read_text())
    mitoses = json.loads(write_detections_geojson(tmp_path / "m.geojson", SUBPIXEL, class_name="Mitosis",
                                                  color=(255, 255, 0), id_scope="Test_001/detections").read_text())
    ids = [f["id"] for f in first["features"]]
    assert ids == [f["id"] for f in again["features"]]  # the same slide's file written twice
    assert ids == [f["id"] for f in mitoses["features"]]  # the same scope given explicitly
    assert len(set(ids)) == len(ids) and not set(ids) & {f["id"] for f in other["features"]}
    assert all(uuid.UUID(i).version == 5 for i in ids)  # QuPath reads a feature's id as its object's UUID
    assert {tuple(f["properties"]["classification"]["color"]) for f in mitoses["features"]} == {(255, 255, 0)}
    assert all(len(f["properties"]["classification"]["color"]) == 3 for f in first["features"])


def test_detections_asap_xml_reads_back_as_dots_at_the_level0_positions(tmp_path: Path) -> None:
    from pathbundles.annotations import read_annotations

    out = write_detections_asap_xml(tmp_path / "Test_001.xml", SUBPIXEL, class_name="Tumor", color=(200, 0, 0))
    dots = read_annotations(out)
    assert [(a.kind, a.group, a.label) for a in dots] == [("point", "Tumor", "Tumor")] * 3
    np.testing.assert_array_equal(np.vstack([a.xy for a in dots]), SUBPIXEL[:, 1:])  # exact, sub-pixel
    scores = [float(a.name.split("score=")[1]) for a in dots]
    assert [a.name.split(" score=")[0] for a in dots] == ["Tumor 1", "Tumor 2", "Tumor 3"]
    np.testing.assert_allclose(scores, SUBPIXEL[:, 0], rtol=1e-5)
    text = out.read_text()
    assert text.count('Type="Dot"') == 3 and text.count('Color="#C80000"') == 4  # 3 dots and their group
    assert read_annotations(write_detections_asap_xml(tmp_path / "none.xml", [])) == []


def test_detections_csv_bad_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("0.9,100,200\n0.8,110,210\n0.7,abc,220\n")
    with pytest.raises(InputError, match=r"bad\.csv, line 3: expected three numbers") as info:
        read_detections_csv(path)
    assert info.value.line == 3
    path.write_text("0.9,100,200\n\n0.8,110\n")
    with pytest.raises(InputError, match="line 3"):
        read_detections_csv(path)


def test_detections_geojson_bad_feature(tmp_path: Path) -> None:
    path = tmp_path / "bad.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": []}, "properties": {"score": 1}}]}))
    with pytest.raises(InputError, match="feature 0"):
        read_detections_geojson(path)
    path.write_text('{"type": "FeatureCollection",\n "features": [,]}')
    with pytest.raises(InputError, match="line 2"):
        read_detections_geojson(path)


def test_bad_detections_leave_no_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        write_detections_csv(tmp_path / "x.csv", [[0.5, 1.0]])
    with pytest.raises(ValueError):
        write_detections_geojson(tmp_path / "x.geojson", [[np.nan, 1.0, 2.0]])
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_names_the_file_being_written(tmp_path: Path, monkeypatch) -> None:
    """ENOSPC says nothing of the file (or names the hidden temporary one): the error names the final path."""
    import errno

    from pathbundles.annotations import Annotation, write_geojson
    from pathbundles.atomic import atomic_path
    from pathbundles.errors import OutputError

    final = tmp_path / "out" / "result.json"
    with pytest.raises(OutputError) as info:
        with atomic_path(final) as tmp:
            tmp.write_text("partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(info.value) == f"{final}: cannot write the file: No space left on device"
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert list((tmp_path / "out").iterdir()) == []  # neither the result nor the partial file

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full)
    square = Annotation("a", "_0", "polygon", "Tumor", np.array([[0, 0], [10, 0], [10, 10]], float))
    with pytest.raises(OutputError, match=rf"^{tmp_path / 'a.geojson'}: cannot write the file: No space left"):
        write_geojson(tmp_path / "a.geojson", [square])
    with pytest.raises(FileNotFoundError):  # other errors of the block pass through unchanged
        with atomic_path(tmp_path / "b.txt"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", "input.csv")
