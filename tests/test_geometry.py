"""Real-scanner geometry: every read and every bundle output lands where it belongs on the slide, on slides at the
resolutions scanners really have (0.2265, 0.243, 0.2527, 0.499 um/px) with 2x and 4x pyramids whose level sizes are
rounded up or down (so uneven downsamples: 1.9995, 3.9991, 4.0027, 16.06 ...), and on the real files of
../shared/data.

Ground truth comes from :func:`pathbundles.phantom.make_geometry_dataset` (dark cone markers at known sub-pixel
positions); the bundles run their own configs with "oracle" networks (tests/geometry_helpers.py) whose response peaks
on the markers, so any misplacement comes from the geometry (reads, scanning, stitching, writing), not from training.
Rasters are read back with OpenSlide and placed by their mpp tag, as a viewer would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from geometry_helpers import (GAIN, THRESHOLD, box_reference, nearest_offsets, oracle_checkpoint,
                              response_centroid_um)
from pathbundles.multimag import READ_PATHS, read_concentric
from pathbundles.phantom import GEOMETRY_MARKER_RGB, GEOMETRY_TISSUE_RGB, make_geometry_dataset
from pathbundles.sampling import read_datalist
from pathbundles.slide_segmentation import DMMN_PALETTE
from pathbundles.writers import read_overlay_layout, read_pyramid_fields
from pathbundles.wsi import open_slide

REPO = Path(__file__).resolve().parents[1]
MPPS = (0.2265, 0.243, 0.2527, 0.499)
PYRAMIDS = ((2, "ceil"), (4, "ceil"), (4, "floor"))  # (step, level size rounding): NDPI/DICOM-like, ours, SVS-like
SIZE_UM, RADIUS_UM = 1000.0, 60.0
GROUND_GREY = float(np.mean(GEOMETRY_TISSUE_RGB))


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """One geometry slide per (mpp, pyramid): 12 slides of 1 mm, each with ~6 markers, its own seed."""
    folder = tmp_path_factory.mktemp("geometry")
    items = []
    for i, mpp in enumerate(MPPS):
        for j, (step, rounding) in enumerate(PYRAMIDS):
            name = f"g{mpp}_{step}{rounding}".replace(".", "p")
            dataset = make_geometry_dataset(folder / name, n=1, seed=3 * i + j, size_um=SIZE_UM, mpp=mpp,
                                            downsample_step=step, level_rounding=rounding,
                                            marker_radius_um=RADIUS_UM)
            for item in read_datalist(dataset):
                items.append({**item, "name": name, "mpp": mpp, "step": step, "rounding": rounding})
    return items


def _dark_centroid_um(view: np.ndarray, mpp: float, radius_um: float) -> np.ndarray:
    """(x, y) in um from a view's centre of the darkness (below the tissue ground) within ``radius_um`` of it."""
    size = view.shape[0]
    offsets = (np.arange(size) + 0.5 - size / 2) * mpp
    x, y = np.meshgrid(offsets, offsets)
    weight = np.clip(GROUND_GREY - view.astype(np.float64).mean(axis=2), 0, None) * (np.hypot(x, y) <= radius_um)
    return np.array([(weight * x).sum(), (weight * y).sum()]) / weight.sum()


# ---- reads ----------------------------------------------------------------------------------------------------


def test_pyramids_are_what_scanners_write(slides: list[dict]) -> None:
    """The matrix really has near-but-not-nominal levels (0.906 um/px, not 1.0) whose size ratios are uneven
    (OpenSlide's downsamples), while the slide layer places each level by its whole decimation factor."""
    import openslide

    uneven = 0
    for item in slides:
        with open_slide(item["image"], backend="openslide") as slide, openslide.OpenSlide(item["image"]) as osr:
            assert slide.mpp == pytest.approx((item["mpp"], item["mpp"]), rel=1e-6)
            assert slide.level_downsamples == [float(item["step"] ** k) for k in range(slide.level_count)]
            assert osr.level_downsamples == pytest.approx(slide.level_downsamples, rel=0.02)
            uneven += sum(abs(a - b) > 1e-3 for a, b in zip(osr.level_downsamples, slide.level_downsamples))
            if item["mpp"] < 0.3:
                assert any(abs(slide.level_mpp(k)[0] - 1.0) < 0.1 for k in range(slide.level_count))
    assert uneven >= 12


@pytest.mark.parametrize("backend", ["openslide", "tifffile"])
@pytest.mark.parametrize("out_mpp", [0.25, 0.5, 1.0, 2.0])
def test_reads_put_the_markers_where_they_are(slides: list[dict], backend: str, out_mpp: float) -> None:
    """A read at any mpp, from whichever level, has the marker's darkness centred where the marker is (within a
    tenth of an output pixel) and matches a reference area-resampling of level 0. (Snapping to a 0.2265 um/px
    slide's 0.906 um/px level for 1.0 put a marker 10 % of its distance from the origin off: tens of um.)"""
    for item in slides:
        with open_slide(item["image"], backend=backend) as slide:
            level0_mpp = slide.mpp[0]
            tolerance_um = 0.1 * out_mpp
            for mx, my in item["markers_xy"][:2]:
                size = int(2 * RADIUS_UM / out_mpp) + 8
                half0 = size / 2 * out_mpp / level0_mpp
                view = slide.read_region((mx - half0, my - half0), (size, size), out_mpp)
                offset = _dark_centroid_um(view, out_mpp, RADIUS_UM)
                assert np.abs(offset).max() <= tolerance_um, (item["name"], out_mpp, offset, tolerance_um)
                x0, y0 = int(mx - half0) - 2, int(my - half0) - 2
                level0 = slide.read_level_region(0, (x0, y0), (int(2 * half0) + 6, int(2 * half0) + 6))
                reference = box_reference(level0, (mx - half0 - x0, my - half0 - y0), (size, size),
                                          out_mpp / level0_mpp)
                assert np.abs(view - reference).mean() < 2.0, (item["name"], out_mpp)


@pytest.mark.parametrize("path", READ_PATHS)
def test_dmmn_views_are_concentric(slides: list[dict], path: str) -> None:
    """DMMN's 20x, 10x and 5x views of a marker are centred on it within one 20x pixel (0.5 um), on every slide
    and by both read paths (at 0.2265 um/px snapping put the 20x view 6.5 um (levels) or 26.5 um (tile) off)."""
    for item in slides:
        with open_slide(item["image"], backend="tifffile") as slide:
            for mx, my in item["markers_xy"][:2]:
                views = read_concentric(slide, (mx, my), path=path)
                for view, mpp in zip(views, (0.5, 1.0, 2.0)):
                    offset = _dark_centroid_um(view, mpp, RADIUS_UM)
                    assert np.abs(offset).max() <= 0.5, (item["name"], path, mpp, offset)


REAL = [("CMU-1-Small-Region.svs", "openslide", 0.499), ("CMU-1-Small-Region.svs", "tifffile", 0.499),
        ("hamamatsu_fluo_dapi_40x.ndpi", "openslide", 0.2282),
        ("openslide_os1_he_40x_crop.ome.tif", "tifffile", 0.2271)]


@pytest.mark.parametrize("name,backend,level0_mpp", REAL, ids=[f"{n}-{b}" for n, b, _ in REAL])
@pytest.mark.parametrize("out_mpp", [0.25, 0.5, 1.0])
def test_reads_of_real_slides_match_a_reference_resampling(shared_data: Path, name: str, backend: str,
                                                           level0_mpp: float, out_mpp: float) -> None:
    """On the real SVS (0.499, one level), NDPI (0.2282, 7 levels in 2x steps) and OME-TIFF (0.2271): a read at
    0.25, 0.5 or 1.0 um/px equals an area resampling of level 0 of the same physical square, and a shift of one
    output pixel either way matches worse (so the read is registered, not just similar)."""
    with open_slide(shared_data / name, backend=backend) as slide:
        assert slide.mpp[0] == pytest.approx(level0_mpp, rel=2e-3)
        w0, h0 = slide.dimensions
        scale = out_mpp / slide.mpp[0]
        size = int(min(w0, h0) / scale / 3)
        origin = (w0 / 3 + 0.37, h0 / 3 + 0.61)  # not on any level's pixel grid
        view = slide.read_region(origin, (size, size), out_mpp).astype(np.float64)
        margin = int(2 * scale) + 4
        x0, y0 = int(origin[0]) - margin, int(origin[1]) - margin
        level0 = slide.read_level_region(0, (x0, y0), (int(size * scale) + 2 * margin, int(size * scale) + 2 * margin))

    def error(dx: int, dy: int) -> float:
        reference = box_reference(level0, (origin[0] - x0 + dx * scale, origin[1] - y0 + dy * scale), (size, size),
                                  scale)
        return float(np.abs(view - reference).mean())

    errors = {(dx, dy): error(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)}
    assert min(errors, key=errors.get) == (0, 0), errors
    assert errors[(0, 0)] < 4.0, errors


# ---- bundle outputs -------------------------------------------------------------------------------------------


def _run(bundle: str, datalist: list[dict], out: Path, overrides: dict) -> dict[str, dict]:
    from pathbundles.bundle_runner import run_inference

    records = run_inference(REPO / "bundles" / bundle, datalist, out, overrides={"num_workers": 0, **overrides})
    return {record["name"]: record for record in records}


def _datalist(slides: list[dict]) -> list[dict]:
    return [{"image": item["image"], "name": item["name"]} for item in slides]


def _read_raster(path: str, channels: slice | int = 0) -> tuple[np.ndarray, float]:
    """A written raster as a viewer sees it: OpenSlide's level 0 (first channel, or ``channels`` of RGBA) and its
    mpp tag."""
    import openslide

    with openslide.OpenSlide(path) as raster:
        mpp = float(raster.properties["openslide.mpp-x"])
        assert float(raster.properties["openslide.mpp-y"]) == pytest.approx(mpp)
        pixels = np.asarray(raster.read_region((0, 0), 0, raster.level_dimensions[0]))[..., channels]
    return pixels, mpp


def _check_detection_files(outputs: dict) -> np.ndarray:
    """A slide's detections as the GeoJSON gives them (sub-pixel level-0 positions), after checking that the
    Camelyon16 CSV parses in the organisers' way (int() of x, y) as the whole level-0 pixels holding them and that
    the ASAP XML has the same points."""
    from challenge_parsers import read_csv_content
    from pathbundles.annotations import read_annotations
    from pathbundles.writers import read_detections_geojson

    detections = read_detections_geojson(outputs["geojson"])
    probs, xs, ys = read_csv_content(outputs["detections"])
    np.testing.assert_allclose(probs, detections[:, 0], rtol=1e-9)
    np.testing.assert_array_equal(np.column_stack([xs, ys]).reshape(-1, 2), np.floor(detections[:, 1:]))
    dots = read_annotations(outputs["asap_xml"])
    np.testing.assert_array_equal(np.vstack([a.xy for a in dots]).reshape(-1, 2), detections[:, 1:])
    return detections


def _check_map_outputs(slides: list[dict], records: dict[str, dict], map_mpp: float, map_origin_um: float) -> None:
    """Detections within half a map pixel of each marker, one per marker; the map TIFF, placed by its mpp tag,
    has each marker's response centred within half a map pixel of the marker; its extent covers the slide.

    The first map pixel is centred ``map_origin_um`` from the slide's top and left edges (the first patch or grid
    lies wholly inside the slide), so markers nearer than that to those edges have no map pixel of their own."""
    responses = 0
    for item in slides:
        outputs = records[item["name"]]["outputs"]
        detections = _check_detection_files(outputs)
        markers_um = np.asarray(item["markers_um"])
        covered = markers_um.min(axis=1) >= map_origin_um - map_mpp / 2
        maybe = markers_um.min(axis=1) >= map_origin_um - map_mpp
        assert covered.sum() >= 1, item["name"]
        assert covered.sum() <= len(detections) <= maybe.sum(), (item["name"], len(detections), covered.sum())
        offsets_um = nearest_offsets(detections[:, 1:] * item["mpp"], markers_um[covered])
        assert np.abs(offsets_um).max() <= map_mpp / 2 + 1e-6, (item["name"], offsets_um)
        assert np.abs(nearest_offsets(markers_um[maybe], detections[:, 1:] * item["mpp"])).max() <= map_mpp
        # The review overlay rings each detection (CSV order) where it lies on the slide, to an overlay pixel.
        layout = read_overlay_layout(outputs["overlay"])
        x0, y0, w, h = layout["slide_box_px"]
        um_per_px = np.asarray(layout["fields"]["overlay_um_per_px"])
        assert max(w, h) == min(2000, round(SIZE_UM / item["mpp"]))
        ringed_um = (np.asarray(layout["markers"]).reshape(-1, 2) - (x0, y0)) * um_per_px
        assert np.abs(ringed_um - detections[:, 1:] * item["mpp"]).max(initial=0) <= um_per_px.max()
        pixels, mpp = _read_raster(outputs["map"])
        assert mpp == pytest.approx(map_mpp, rel=1e-6)
        assert (pixels.shape[1] - 1) * mpp < SIZE_UM <= pixels.shape[1] * mpp + item["mpp"]
        ground = float(np.median(pixels))
        inner = markers_um.min(axis=1) >= map_origin_um + RADIUS_UM  # the whole response inside the map
        found = response_centroid_um(pixels, mpp, markers_um[inner], RADIUS_UM + mpp, ground)
        assert np.abs(found - markers_um[inner]).max() <= map_mpp / 2, (item["name"], found - markers_um[inner])
        responses += int(inner.sum())
    assert responses >= len(slides)  # the map check did not pass for want of markers


@pytest.mark.slow
def test_scannet_outputs_land_on_the_markers(slides: list[dict], tmp_path: Path) -> None:
    records = _run("scannet", _datalist(slides), tmp_path / "out",
                   {"network_def": {"_target_": "geometry_helpers.DarkSpotScanNet"},
                    "ckpt_path": str(oracle_checkpoint(tmp_path)), "lp": 8, "alpha": 2, "batch_size": 4})
    # Sd = 32 / alpha = 16 scan px at 1.0 um/px; map pixel 0 centred on Lf / 2 = 122 scan px.
    _check_map_outputs(slides, records, map_mpp=16.0, map_origin_um=122.0)


@pytest.mark.slow
def test_spatial_lstm_outputs_land_on_the_markers(slides: list[dict], tmp_path: Path) -> None:
    records = _run("spatial_lstm", _datalist(slides), tmp_path / "out",
                   {"network_def": {"_target_": "geometry_helpers.DarkSpotSpatialLSTM", "threshold": 0.45},
                    "ckpt_path": str(oracle_checkpoint(tmp_path)), "tile_px": 4, "tta": False, "batch_size": 2})
    # Stride 64 scan px at 1.0 um/px; map pixel 0 is the grid centred on G * 256 / 2 = 384 scan px.
    _check_map_outputs(slides, records, map_mpp=64.0, map_origin_um=384.0)


@pytest.mark.slow
def test_segmitos_slide_box_detections_land_on_the_markers(slides: list[dict], tmp_path: Path) -> None:
    """Slide boxes read at 0.25 um/px: each marker's detection, written in level-0 px of the slide, is within 1 um
    of it."""
    datalist, truth = [], {}
    for item in slides:
        for k, (mx, my) in enumerate(item["markers_xy"][:2]):
            side0 = 200.0 / item["mpp"]  # a 200 um box, the marker off its centre
            box = [int(mx - side0 * (0.3 + 0.2 * k)), int(my - side0 * (0.6 - 0.1 * k)), int(side0), int(side0)]
            datalist.append({"image": item["image"], "box": box, "name": f"{item['name']}_{k}"})
            truth[f"{item['name']}_{k}"] = (item["mpp"], box, (mx, my))
    from pathbundles.annotations import read_points_csv
    from pathbundles.writers import read_detections_geojson

    records = _run("segmitos", datalist, tmp_path / "out",
                   {"network_def": {"_target_": "geometry_helpers.DarkSpotFCN"},
                    "ckpt_path": str(oracle_checkpoint(tmp_path)), "min_mean_score": 0.0, "min_area_um2": 0.0})
    assert len(records) == len(datalist)
    for record in records.values():
        name = next(n for n in truth if record["name"].startswith(n))
        level0_mpp, box, (mx, my) = truth[name]
        xy, _ = read_points_csv(record["outputs"]["detections"], "xy")  # level-0 px of the slide, with a header
        assert len(xy) == 1, record["name"]
        found_um = xy[0] * level0_mpp
        assert np.abs(found_um - np.array([mx, my]) * level0_mpp).max() <= 1.0, (record["name"], found_um)
        geojson = read_detections_geojson(record["outputs"]["geojson"])
        np.testing.assert_allclose(geojson[:, 1:], xy, rtol=0, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("read_path", READ_PATHS)
def test_dmmn_label_regions_land_on_the_markers(slides: list[dict], tmp_path: Path, read_path: str) -> None:
    """Carcinoma where the 20x view is dark: each marker's region in the label map TIFF (placed by its mpp tag) is
    centred on the marker within half a map pixel (0.25 um) and has the area the oracle's threshold gives. The
    levels path on all 12 slides, the tile path on 4 (each resolution once, every pyramid kind)."""
    if read_path == "tile":  # a 1024 px tile per item costs 3x the levels path: one slide per resolution
        slides = [item for k, item in enumerate(slides) if k % len(PYRAMIDS) == (k // len(PYRAMIDS)) % len(PYRAMIDS)]
    records = _run("dmmn", _datalist(slides), tmp_path / "out",
                   {"network_def": {"_target_": "geometry_helpers.DarkSpotDMMN"},
                    "ckpt_path": str(oracle_checkpoint(tmp_path)), "read_path": read_path, "batch_size": 4})
    # The cone's normalised intensity crosses THRESHOLD at this fraction of its radius.
    ground = (GROUND_GREY - 127.5) / 127.5
    apex = (float(np.mean(GEOMETRY_MARKER_RGB)) - 127.5) / 127.5
    radius_um = RADIUS_UM * (1 - (ground - THRESHOLD) / (ground - apex))
    for item in slides:
        # A viewer sees the label map's palette: carcinoma in the paper's red.
        pixels, mpp = _read_raster(records[item["name"]]["outputs"]["labels"], slice(0, 3))
        assert mpp == pytest.approx(0.5, rel=1e-6)
        carcinoma = (pixels == DMMN_PALETTE["carcinoma"]).all(axis=-1).astype(np.float64)
        found = response_centroid_um(carcinoma, mpp, np.asarray(item["markers_um"]), RADIUS_UM, 0.0)
        assert np.abs(found - item["markers_um"]).max() <= 0.25, (item["name"], found - item["markers_um"])
        area_um2 = carcinoma.sum() * mpp ** 2 / len(item["markers_um"])
        assert area_um2 == pytest.approx(np.pi * radius_um ** 2, rel=0.04), item["name"]
    assert GAIN > 0  # the oracle's sign convention the radius above relies on


@pytest.mark.slow
@pytest.mark.parametrize("bundle,oracle,overrides,map_mpp", [
    ("scannet", "DarkSpotScanNet", {"lp": 8, "alpha": 2}, 16.0),
    ("spatial_lstm", "DarkSpotSpatialLSTM", {"tile_px": 4, "tta": False}, 64.0)])
def test_maps_of_the_real_svs_are_registered_to_it(shared_data: Path, tmp_path: Path, bundle: str, oracle: str,
                                                   overrides: dict, map_mpp: float) -> None:
    """On the real 0.499 um/px SVS the map (oracle: darkness at each patch centre), opened with OpenSlide and placed
    by its mpp tag, correlates best with the slide's own darkness at zero shift: it lies over the tissue it
    describes (an unregistered map lies Lf / 2 = 3-6 map pixels off)."""
    slide_path = shared_data / "CMU-1-Small-Region.svs"
    records = _run(bundle, [{"image": str(slide_path)}], tmp_path / "out",
                   {"network_def": {"_target_": f"geometry_helpers.{oracle}"},
                    "ckpt_path": str(oracle_checkpoint(tmp_path)), "tissue_mpp": 8.0, **overrides})
    pixels, mpp = _read_raster(next(iter(records.values()))["outputs"]["map"])
    assert mpp == pytest.approx(map_mpp)
    with open_slide(slide_path, backend="openslide") as slide:
        darkness = 255 - slide.read_region((0, 0), pixels.shape[::-1], map_mpp).mean(axis=2)
    valid = pixels > 0  # inside the scanned area and over tissue
    a = np.where(valid, pixels, 0).astype(np.float64)

    def correlation(dx: int, dy: int) -> float:
        shifted = np.roll(np.roll(darkness, dy, axis=0), dx, axis=1)
        inner = np.s_[4:-4, 4:-4]
        return float(np.corrcoef(a[inner][valid[inner]], shifted[inner][valid[inner]])[0, 1])

    detections = _check_detection_files(next(iter(records.values()))["outputs"])
    assert len(detections) and (detections[:, 1:] % 1).any()  # sub-pixel positions, written as whole pixels

    scores = {(dx, dy): correlation(dx, dy) for dx in range(-3, 4) for dy in range(-3, 4)}
    assert max(scores, key=scores.get) == (0, 0), sorted(scores.items(), key=lambda kv: -kv[1])[:3]
    with tifffile.TiffFile(next(iter(records.values()))["outputs"]["map"]) as tif:
        assert "starts at the slide's level-0 origin" in read_pyramid_fields(tif.filehandle.path)["registration"]
