"""Post-processing: map geometry, ScanNet components, NMS (against the repeated-argmax definition), SegMitos blobs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pathbundles.postprocess import MapGeometry, detections_from_components, mitosis_blobs, non_maximum_suppression

LEVEL0_MPP = 0.243
MAP_MPP = 0.243 * 32  # a level-5-like map: 32 level-0 px per map pixel


def test_geometry_default_origin_is_the_pixel_centre() -> None:
    g = MapGeometry.from_mpp(MAP_MPP, LEVEL0_MPP)
    assert g.step_px == pytest.approx(32.0)
    xy = g.to_level0(np.array([[0, 0], [1, 2]]))
    np.testing.assert_allclose(xy, [[16, 16], [2 * 32 + 16, 32 + 16]])
    # The Camelyon16 hit test floor(x / 32) lands back on the map pixel.
    assert np.floor(xy[1] / 32).tolist() == [2, 1]


def test_geometry_scannet_origin() -> None:
    """ScanNet Eq. 4: map index k -> level-0 k * Sd + Lf / 2 (Sd = 32, Lf = 244), here on a region at (1000, 2000)."""
    g = MapGeometry.from_mpp(32 * LEVEL0_MPP, LEVEL0_MPP, origin_xy=(1000 + 122, 2000 + 122))
    np.testing.assert_allclose(g.to_level0(np.array([[3, 5]])), [[1000 + 5 * 32 + 122, 2000 + 3 * 32 + 122]])


def test_components_one_detection_each_including_the_last_label() -> None:
    prob = np.zeros((20, 20), dtype=np.float32)
    prob[2:6, 2:6] = 0.7
    prob[3, 4] = 0.9            # the maximum of component 1
    prob[12:16, 12:18] = 0.6
    prob[14, 16] = 0.8          # maximum of the last component (label n, which a range(n) loop drops)
    prob[10, 2] = 0.99          # a single pixel: removed by the opening
    det = detections_from_components(prob, MAP_MPP, LEVEL0_MPP, threshold=0.5, opening_px=1)
    assert det.shape == (2, 3)
    np.testing.assert_allclose(det[:, 0], [0.9, 0.8], rtol=1e-6)
    np.testing.assert_allclose(det[:, 1:], [[4 * 32 + 16, 3 * 32 + 16], [16 * 32 + 16, 14 * 32 + 16]])
    # Without opening the lone pixel is a detection too, and it is the best one.
    raw = detections_from_components(prob, MAP_MPP, LEVEL0_MPP, opening_px=0)
    assert raw.shape == (3, 3) and raw[0, 0] == pytest.approx(0.99)


def test_components_diagonal_pixels_are_one_component() -> None:
    prob = np.zeros((5, 5), dtype=np.float32)
    prob[1, 1], prob[2, 2] = 0.7, 0.6
    det = detections_from_components(prob, MAP_MPP, LEVEL0_MPP, opening_px=0)
    assert len(det) == 1  # 8-connectivity


def test_components_saturated_plateau_keeps_its_position_across_one_ulp() -> None:
    """A lesion saturated at 1.0: two runtimes round a pixel to 1.0 or to the float32 below it; the detection stays on
    the first plateau pixel in raster order, where an exact tie moved it across the lesion (scannet's ONNX export
    against the folded channels_last network on an AVX-512 CPU)."""
    below_one = np.nextafter(np.float32(1), np.float32(0))
    prob = np.zeros((12, 12), dtype=np.float32)
    prob[2:9, 2:9] = 1.0
    prob[2, 2:9] = below_one  # runtime A: the top row just under 1
    a = detections_from_components(prob, MAP_MPP, LEVEL0_MPP, opening_px=0)
    prob[2, 2:9] = 1.0        # runtime B: all of it at 1
    b = detections_from_components(prob, MAP_MPP, LEVEL0_MPP, opening_px=0)
    np.testing.assert_array_equal(a[:, 1:], b[:, 1:])
    np.testing.assert_allclose(a[:, 1:], [[2 * 32 + 16, 2 * 32 + 16]])
    assert a[0, 0] == 1.0 and b[0, 0] == 1.0
    # Beyond the tolerance the maximum decides: 0.9 at (row 2, col 5) before 0.95 at (row 6, col 3).
    prob[2:9, 2:9] = 0.7
    prob[2, 5], prob[6, 3] = 0.9, 0.95
    c = detections_from_components(prob, MAP_MPP, LEVEL0_MPP, opening_px=0)
    np.testing.assert_allclose(c, [[0.95, 3 * 32 + 16, 6 * 32 + 16]], rtol=1e-6)


def test_components_empty_map() -> None:
    assert detections_from_components(np.zeros((8, 8)), MAP_MPP, LEVEL0_MPP).shape == (0, 3)


def _nms_reference(prob: np.ndarray, radius_px: float, threshold: float) -> list[tuple[float, int, int]]:
    """The paper's definition, literally: argmax, emit, zero the disk, repeat."""
    work = prob.astype(np.float64).copy()
    rows, cols = np.mgrid[: prob.shape[0], : prob.shape[1]]
    out = []
    while work.max() > threshold:
        r, c = np.unravel_index(np.argmax(work), work.shape)
        out.append((float(work[r, c]), int(r), int(c)))
        work[(rows - r) ** 2 + (cols - c) ** 2 <= radius_px ** 2] = 0
    return out


def test_nms_hand_case() -> None:
    prob = np.zeros((10, 10), dtype=np.float32)
    prob[2, 2], prob[2, 4], prob[2, 8] = 0.9, 0.8, 0.7   # (2, 4) is 2 px from the maximum, (2, 8) 6 px
    prob[9, 9] = 0.4                                       # below the threshold
    # radius 3 map px = 3 * 7.776 um
    det = non_maximum_suppression(prob, MAP_MPP, LEVEL0_MPP, radius_um=3 * MAP_MPP, threshold=0.5)
    np.testing.assert_allclose(det[:, 0], [0.9, 0.7], rtol=1e-6)
    np.testing.assert_allclose(det[:, 1:], [[2 * 32 + 16, 2 * 32 + 16], [8 * 32 + 16, 2 * 32 + 16]])


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 12), st.integers(1, 12)),
              elements=st.sampled_from([0.0, 0.2, 0.55, 0.6, 0.6, 0.8, 0.95])),
       st.floats(0.0, 4.0), st.sampled_from([0.0, 0.5]))
def test_nms_equals_repeated_argmax(prob: np.ndarray, radius_px: float, threshold: float) -> None:
    det = non_maximum_suppression(prob, 1.0, 1.0, radius_um=radius_px, threshold=threshold, origin_xy=(0, 0))
    expected = _nms_reference(prob, radius_px, threshold)
    assert [(round(s, 6), int(y), int(x)) for s, x, y in det] == [(round(s, 6), r, c) for s, r, c in expected]


def test_nms_rejects_a_negative_threshold() -> None:
    with pytest.raises(ValueError, match="threshold"):
        non_maximum_suppression(np.zeros((3, 3)), 1.0, 1.0, radius_um=1.0, threshold=-0.1)


@pytest.mark.parametrize("value", [2, 1.0001, -0.5, float("nan")])
def test_thresholds_on_probabilities_are_probabilities(value: float) -> None:
    """A threshold of 2 on a probability map finds nothing and would report 0 detections as a result."""
    from pathbundles.errors import SettingError

    prob = np.zeros((8, 8), np.float32)
    with pytest.raises(SettingError, match=r"^threshold must be a probability in \[0, 1\]"):
        detections_from_components(prob, MAP_MPP, LEVEL0_MPP, threshold=value)
    with pytest.raises(SettingError, match=r"^threshold must be a probability in \[0, 1\]"):
        non_maximum_suppression(prob, MAP_MPP, LEVEL0_MPP, radius_um=10.0, threshold=value)
    with pytest.raises(SettingError, match=r"^min_mean_score must be a probability in \[0, 1\]"):
        mitosis_blobs(prob, 0.25, 0.25, min_mean_score=value)


@pytest.mark.parametrize("bundle", ["scannet", "spatial_lstm"])
def test_bundle_detector_names_the_detection_threshold_key(bundle: str) -> None:
    """The bundles build their detector with the key's own name in the error, before any slide is scanned."""
    from pathlib import Path

    from monai.bundle import ConfigParser

    from pathbundles.bundle_runner import config_error_cause
    from pathbundles.errors import SettingError

    configs = Path(__file__).resolve().parents[1] / "bundles" / bundle / "configs"
    parser = ConfigParser()
    parser.read_config(configs / "inference.json")
    parser["detection_threshold"] = 2
    with pytest.raises(RuntimeError) as info:  # MONAI wraps what the expression raised
        parser.get_parsed_content("writer#detect")
    cause = config_error_cause(info.value)
    assert isinstance(cause, SettingError)
    assert str(cause) == "detection_threshold must be a probability in [0, 1], got 2"
    parser["detection_threshold"] = 1.0  # the range's end is allowed: nothing exceeds it
    assert parser.get_parsed_content("writer#detect", lazy=False).keywords["threshold"] == 1.0


def _disk_map(shape: tuple[int, int], centres: list[tuple[int, int, float, float]]) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    prob = np.zeros(shape, dtype=np.float32)
    for r, c, radius, value in centres:
        prob[(rows - r) ** 2 + (cols - c) ** 2 <= radius ** 2] = value
    return prob


def test_blobs_area_score_and_weighted_centroid() -> None:
    # An HPF at 0.25 um/px: a big confident blob, a small confident one, a big faint one.
    prob = _disk_map((200, 200), [(50, 60, 12, 0.9), (150, 150, 5, 1.0), (140, 40, 12, 0.45)])
    blobs = mitosis_blobs(prob, 0.25, 0.25, origin_xy=(0, 0), sigma_um=0.5)
    assert blobs.shape == (3, 4)
    # Area alone (> 12.5 um^2 = 200 px) drops the small blob; score alone (> 0.5) the faint one; both keep one.
    by_area = mitosis_blobs(prob, 0.25, 0.25, origin_xy=(0, 0), sigma_um=0.5, min_area_um2=12.5)
    by_score = mitosis_blobs(prob, 0.25, 0.25, origin_xy=(0, 0), sigma_um=0.5, min_mean_score=0.5)
    kept = mitosis_blobs(prob, 0.25, 0.25, origin_xy=(0, 0), sigma_um=0.5, min_mean_score=0.5, min_area_um2=12.5)
    assert sorted(by_area[:, 1].round().tolist()) == [40, 60]
    assert sorted(by_score[:, 1].round().tolist()) == [60, 150]
    assert kept.shape == (1, 4)
    # Symmetric blob: the probability-weighted centroid is its centre (x = col, y = row), area ~ pi r^2 px.
    np.testing.assert_allclose(kept[0, 1:3], [60, 50], atol=0.05)
    assert kept[0, 3] == pytest.approx(np.pi * 12 ** 2 * 0.25 ** 2, rel=0.15)
    assert 0.5 < kept[0, 0] <= 0.9


def test_blob_statistics_equal_scipy_label_statistics_exactly() -> None:
    """Counting over the labelled pixels only gives scipy's float64 sums bit for bit (same pixels, same order)."""
    from scipy import ndimage

    from pathbundles.postprocess import _blob_statistics

    rng = np.random.default_rng(0)
    values = ndimage.gaussian_filter(rng.random((300, 257)).astype(np.float32), 3)
    labels, n = ndimage.label(values > np.quantile(values, 0.9), structure=np.ones((3, 3)))
    assert n > 20
    count, mean, centroid = _blob_statistics(values, labels, n)
    index = np.arange(1, n + 1)
    np.testing.assert_array_equal(count, ndimage.sum_labels(np.ones_like(labels, dtype=np.float64), labels, index))
    np.testing.assert_array_equal(mean, ndimage.mean(values, labels, index))
    np.testing.assert_array_equal(centroid, np.asarray(ndimage.center_of_mass(values, labels, index)))
    # By hand: one 2 x 2 blob of values 1, 1, 1, 3 at rows 4-5, columns 7-8.
    one = np.zeros((10, 10), np.int32)
    one[4:6, 7:9] = 1
    vals = np.zeros((10, 10), np.float32)
    vals[4:6, 7:9] = [[1, 1], [1, 3]]
    count, mean, centroid = _blob_statistics(vals, one, 1)
    assert count.tolist() == [4] and mean.tolist() == [1.5]
    np.testing.assert_allclose(centroid, [[(4 + 4 + 5 + 3 * 5) / 6, (7 + 8 + 7 + 3 * 8) / 6]])


def test_blobs_positions_follow_the_map_geometry() -> None:
    prob = _disk_map((60, 60), [(20, 30, 6, 0.9)])
    # A map at 0.5 um/px of an image at 0.25 um/px (step 2), whose pixel (0, 0) centre is at level-0 (100, 200).
    blobs = mitosis_blobs(prob, 0.5, 0.25, origin_xy=(100, 200), sigma_um=0.5)
    np.testing.assert_allclose(blobs[0, 1:3], [100 + 30 * 2, 200 + 20 * 2], atol=0.1)


def test_blobs_constant_map_has_none() -> None:
    assert mitosis_blobs(np.full((30, 30), 0.3), 0.25, 0.25).shape == (0, 4)
