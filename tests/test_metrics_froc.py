"""Camelyon16 FROC: evaluation mask (growth, ITC), hit test, hand-computed curves, real Tumor_001 polygons,
properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pathbundles.metrics.froc import (LesionMask, SlideHits, evaluation_mask, evaluation_mask_from_annotations, froc,
                                      interpolate_sensitivity, slide_hits)

MPP, DS = 0.243, 32.0  # Camelyon16 Radboud level 0, level-5 mask: 7.776 um per mask pixel


def _hand_mask() -> LesionMask:
    """10 x 10 labels at downsample 1: lesion 1 top-left, lesion 2 bottom-right, lesion 3 an ITC."""
    labels = np.zeros((10, 10), dtype=np.int32)
    labels[0:3, 0:3] = 1
    labels[6:9, 6:9] = 2
    labels[0:2, 7:9] = 3
    return LesionMask(labels=labels, itc=(3,), mask_downsample=1.0, level0_mpp=1.0)


def test_tumour_one_and_255_give_the_same_lesions() -> None:
    mask = np.zeros((60, 60), dtype=np.uint8)
    mask[10:20, 10:50] = 1
    ones, full = evaluation_mask(mask, MPP, DS), evaluation_mask(mask * 255, MPP, DS)
    assert ones.n_labels == full.n_labels == 1
    np.testing.assert_array_equal(ones.labels, full.labels)


def test_growth_merges_within_75_um() -> None:
    """Grown by distance < 75 / 2 / 7.776 = 4.82 mask px: a gap of 8 px closes (every gap pixel is within 4 px of
    tumour), a gap of 9 px does not (its middle pixel is 5 px from both sides)."""
    for gap, expected in ((8, 1), (9, 2)):
        mask = np.zeros((40, 80), dtype=np.uint8)
        mask[10:30, 10:30] = 255
        mask[10:30, 30 + gap:60 + gap] = 255
        assert evaluation_mask(mask, MPP, DS).n_labels == expected, gap


def test_growth_scales_with_the_mask_resolution() -> None:
    """At downsample 16 (3.888 um/px) the threshold is 37.5 / 3.888 = 9.65 px: a 9 px gap and an 18 px gap close,
    a 19 px gap (middle pixel 10 px from tumour) does not. No level number is involved."""
    for gap, expected in ((9, 1), (18, 1), (19, 2)):
        mask = np.zeros((40, 100), dtype=np.uint8)
        mask[10:30, 10:30] = 1
        mask[10:30, 30 + gap:60 + gap] = 1
        assert evaluation_mask(mask, MPP, 16).n_labels == expected, gap


def test_hole_filling() -> None:
    mask = np.zeros((60, 60), dtype=np.uint8)
    mask[5:55, 5:55] = 1
    mask[15:45, 15:45] = 0  # a 30 px hole: far more than the growth closes
    lesions = evaluation_mask(mask, MPP, DS)
    assert lesions.n_labels == 1
    assert lesions.labels[30, 30] == 1


def test_itc_decision_uses_the_major_axis_in_um() -> None:
    """A single tumour pixel grows to a ~10 px disk (~75 um) -> ITC; a 40 px bar (311 um, 5 um wide) -> not ITC."""
    mask = np.zeros((80, 80), dtype=np.uint8)
    mask[10, 10] = 1
    mask[50, 20:60] = 1
    lesions = evaluation_mask(mask, MPP, DS)
    assert lesions.n_labels == 2
    dot = int(lesions.labels[10, 10])
    assert lesions.itc == (dot,)
    assert lesions.lesion_labels.tolist() == [int(lesions.labels[50, 40])]


def test_hit_test_uses_floor_of_level0_over_downsample() -> None:
    labels = np.zeros((4, 4), dtype=np.int32)
    labels[1, 2] = 1
    lesions = LesionMask(labels=labels, itc=(), mask_downsample=32.0, level0_mpp=MPP)
    xy = np.array([[64.0, 32.0], [95.9, 63.9], [63.9, 32.0], [96.0, 32.0], [-1.0, 32.0], [5000.0, 40.0]])
    assert lesions.label_at(xy).tolist() == [1, 1, 0, 0, 0, 0]  # outside the mask = no lesion


def test_hand_computed_froc() -> None:
    """Slide A: lesion 1 hit twice (0.9, 0.6), an ITC hit (0.8), a FP (0.7), lesion 2 hit (0.3).
    Slide B (normal): FPs 0.5 and 0.2. Slide C: one lesion, no detections.

    Lesions 3 (A1, A2, C1); slides 3. Curve (FP/slide, sensitivity) by threshold:
    inf (0, 0); 0.9 (0, 1/3); 0.7 (1/3, 1/3); 0.5 (2/3, 1/3); 0.3 (2/3, 2/3); 0.2 (1, 2/3).
    At 1/4: between (0, 1/3) and (1/3, 1/3) -> 1/3. At 1/2: 1/3. At 1, 2, 4, 8: 2/3. Mean = 5/9.
    """
    a = slide_hits(np.array([[0.9, 1, 1], [0.6, 2, 2], [0.8, 8, 1], [0.7, 5, 5], [0.3, 7, 7]]), _hand_mask())
    b = slide_hits(np.array([[0.5, 10, 10], [0.2, 20, 20]]), None)
    c_labels = np.zeros((5, 5), dtype=np.int32)
    c_labels[1:4, 1:4] = 1
    c = slide_hits(np.zeros((0, 3)), LesionMask(c_labels, (), 1.0, 1.0))
    assert a.fp_scores.tolist() == [0.7] and a.lesion_scores.tolist() == [0.9, 0.3] and a.n_itc == 1
    result = froc([a, b, c])
    np.testing.assert_allclose(result.fp_per_slide, [0, 0, 1 / 3, 2 / 3, 2 / 3, 1])
    np.testing.assert_allclose(result.sensitivity, [0, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(result.sensitivities, [1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3])
    assert result.score == pytest.approx(5 / 9)
    assert result.as_dict() == {"froc": pytest.approx(5 / 9),
                                "sensitivity": {"0.25": pytest.approx(1 / 3), "0.5": pytest.approx(1 / 3),
                                                "1": pytest.approx(2 / 3), "2": pytest.approx(2 / 3),
                                                "4": pytest.approx(2 / 3), "8": pytest.approx(2 / 3)},
                                "n_slides": 3, "n_lesions": 3, "n_itc": 1}


def test_itc_hit_is_neither_true_nor_false() -> None:
    """One counted lesion hit at 0.9, an ITC hit at 0.95: no FP at all, so sensitivity is 1 everywhere."""
    hits = slide_hits(np.array([[0.95, 8, 1], [0.9, 1, 1]]), _hand_mask())
    assert hits.fp_scores.size == 0
    labels = _hand_mask().labels.copy()
    labels[labels == 2] = 0  # leave only lesion 1 and the ITC
    only = slide_hits(np.array([[0.95, 8, 1], [0.9, 1, 1]]), LesionMask(labels, (3,), 1.0, 1.0))
    assert froc([only]).score == pytest.approx(1.0)


def test_lowest_threshold_is_kept() -> None:
    """The organisers' script drops the lowest distinct score; with one detection that hits the only lesion it
    would report 0. The lesion is found with no false positive, so the FROC score is 1."""
    labels = np.zeros((4, 4), dtype=np.int32)
    labels[1:3, 1:3] = 1
    hits = slide_hits(np.array([[0.4, 2, 2]]), LesionMask(labels, (), 1.0, 1.0))
    assert froc([hits]).score == pytest.approx(1.0)


def test_tied_scores_enter_together() -> None:
    """A TP and a FP both at 0.5 on one slide: the curve goes (0, 0) -> (1, 1) in one step, never (0, 1).
    Sensitivity at 1/4 = 0.25, at 1/2 = 0.5, at 1..8 = 1: FROC = (0.25 + 0.5 + 4) / 6."""
    labels = np.zeros((4, 4), dtype=np.int32)
    labels[0:2, 0:2] = 1
    hits = slide_hits(np.array([[0.5, 3, 3], [0.5, 1, 1]]), LesionMask(labels, (), 1.0, 1.0))
    result = froc([hits])
    np.testing.assert_allclose(result.fp_per_slide, [0, 1])
    np.testing.assert_allclose(result.sensitivity, [0, 1])
    assert result.score == pytest.approx(4.75 / 6)


def test_normal_slide_false_positives_lower_the_score() -> None:
    labels = np.zeros((4, 4), dtype=np.int32)
    labels[0:2, 0:2] = 1
    tumour = slide_hits(np.array([[0.6, 1, 1]]), LesionMask(labels, (), 1.0, 1.0))
    normal = slide_hits(np.array([[0.9, 1, 1], [0.8, 1, 1], [0.7, 1, 1]]), None)
    # 2 slides: FPs at 0.9, 0.8, 0.7 give 0.5, 1, 1.5 FP/slide before the lesion is found at 1.5 FP/slide.
    # Curve: (0,0) (0.5,0) (1,0) (1.5,0) (1.5,1). At 1/4, 1/2, 1: 0; at 2, 4, 8: 1. FROC = 3/6.
    assert froc([tumour, normal]).score == pytest.approx(0.5)
    assert froc([tumour]).score == pytest.approx(1.0)


def test_empty_detections() -> None:
    labels = np.zeros((4, 4), dtype=np.int32)
    labels[0:2, 0:2] = 1
    result = froc([slide_hits(np.zeros((0, 3)), LesionMask(labels, (), 1.0, 1.0)), slide_hits(np.zeros(0), None)])
    assert result.score == 0.0 and result.n_slides == 2 and result.n_lesions == 1


def test_no_lesion_is_an_error() -> None:
    with pytest.raises(ValueError, match="lesion"):
        froc([slide_hits(np.array([[0.5, 1, 1]]), None)])


def test_interpolation_hand_case() -> None:
    fp = np.array([0.0, 0.0, 0.5, 1.0, 1.0])
    sens = np.array([0.0, 0.2, 0.4, 0.6, 0.8])
    # 0.25: from (0, 0.2) to (0.5, 0.4) -> 0.3; 0.5 -> 0.4; 1: highest at that rate -> 0.8; beyond the curve: 0.8.
    np.testing.assert_allclose(interpolate_sensitivity(fp, sens), [0.3, 0.4, 0.8, 0.8, 0.8, 0.8])


def _random_slides(draw: st.DrawFn) -> list[SlideHits]:
    scores = st.sampled_from([0.1, 0.2, 0.3, 0.5, 0.5, 0.7, 0.9, 1.0])
    slides = []
    for _ in range(draw(st.integers(1, 4))):
        fp = draw(st.lists(scores, max_size=12))
        lesions = draw(st.lists(st.one_of(scores, st.just(-np.inf)), max_size=4))
        slides.append(SlideHits(np.asarray(fp, dtype=float), np.asarray(lesions, dtype=float)))
    if sum(len(s.lesion_scores) for s in slides) == 0:
        slides.append(SlideHits(np.zeros(0), np.array([draw(scores)])))
    return slides


random_slides = st.composite(_random_slides)


@settings(max_examples=150, deadline=None)
@given(random_slides(), st.data())
def test_froc_properties(slides: list[SlideHits], data: st.DataObject) -> None:
    result = froc(slides)
    assert 0.0 <= result.score <= 1.0
    assert np.all(np.diff(result.fp_per_slide) >= 0) and np.all(np.diff(result.sensitivity) >= 0)
    # The interpolation is NCRF's np.interp on the curve.
    np.testing.assert_allclose(result.sensitivities, np.interp(result.fp_rates, result.fp_per_slide,
                                                               result.sensitivity))
    # Adding a true hit (raising one lesion's score) never lowers the FROC score.
    i = data.draw(st.integers(0, len(slides) - 1))
    while len(slides[i].lesion_scores) == 0:
        i = (i + 1) % len(slides)
    j = data.draw(st.integers(0, len(slides[i].lesion_scores) - 1))
    new_score = data.draw(st.sampled_from([0.05, 0.2, 0.5, 0.6, 0.95, 1.0]))
    lesion_scores = slides[i].lesion_scores.copy()
    lesion_scores[j] = max(lesion_scores[j], new_score)
    better = list(slides)
    better[i] = SlideHits(slides[i].fp_scores, lesion_scores)
    assert froc(better).score >= result.score - 1e-12


def test_adding_a_detection_on_a_lesion_through_slide_hits() -> None:
    lesions = _hand_mask()
    base = np.array([[0.7, 5, 5], [0.4, 1, 1]])
    before = froc([slide_hits(base, lesions)]).score
    after = froc([slide_hits(np.vstack([base, [[0.8, 7, 7]]]), lesions)]).score
    assert after >= before


# ------------------------------------------------------------------------------------------- real Tumor_001 polygons


def _polygon_major_axis(xy: np.ndarray) -> float:
    """Major axis (4 sqrt of the largest eigenvalue of the second moments) of a filled polygon, by Green's theorem:
    the same quantity regionprops measures on pixels, computed independently from the vertices."""
    x, y = xy[:, 0], xy[:, 1]
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    cross = x * y1 - x1 * y
    area = cross.sum() / 2
    cx, cy = ((x + x1) * cross).sum() / (6 * area), ((y + y1) * cross).sum() / (6 * area)
    sxx = ((x * x + x * x1 + x1 * x1) * cross).sum() / (12 * area) - cx * cx
    syy = ((y * y + y * y1 + y1 * y1) * cross).sum() / (12 * area) - cy * cy
    sxy = ((x * y1 + 2 * x * y + 2 * x1 * y1 + x1 * y) * cross).sum() / (24 * area) - cx * cy
    return float(4 * np.sqrt(np.linalg.eigvalsh([[sxx, sxy], [sxy, syy]]).max()))


def test_tumor_001_polygons(shared_data) -> None:
    from pathbundles.annotations import read_annotations

    path = shared_data / "camelyon16_tumor_001_annotation.json"
    polygons = read_annotations(path)
    assert len(polygons) == 2
    # By hand from the vertices: bounding boxes 573 x 691 um and 790 x 1272 um, major axes 946 and 1290 um, both far
    # above 275 um, and the polygons lie ~900 um apart (more than 75 um): two lesions, no ITC.
    majors_um = sorted(_polygon_major_axis(p.xy) * MPP for p in polygons)
    assert majors_um == pytest.approx([945.7, 1290.2], abs=1.0)
    for p in polygons:
        assert ((p.xy.max(axis=0) - p.xy.min(axis=0)) * MPP > 275).all()
    # The level-5 image geometry: 3072 x 7168 (W x H) at downsample 32.
    lesions = evaluation_mask_from_annotations(path, (3072 * 32, 7168 * 32), level0_mpp=MPP, mask_downsample=32)
    assert lesions.labels.shape == (7168, 3072)
    assert lesions.n_labels == 2 and lesions.itc == ()
    from skimage.measure import regionprops

    grown_um = sorted(r.axis_major_length * MPP * 32 for r in regionprops(lesions.labels))
    for grown, polygon in zip(grown_um, majors_um):
        assert 0 < grown - polygon < 100  # growth by 37.5 um on each side, plus rasterising
    # A detection at each polygon's vertex mean hits that polygon's lesion; one far away is a false positive.
    hit = lesions.label_at(np.array([p.xy.mean(axis=0) for p in polygons] + [[10_000.0, 10_000.0]]))
    assert sorted(hit[:2].tolist()) == [1, 2] and hit[2] == 0
    result = froc([slide_hits(np.array([[0.9, *polygons[0].xy.mean(axis=0)], [0.8, 10_000.0, 10_000.0]]), lesions)])
    # Lesion found at 0.9 with no FP, the other missed: sensitivity 1/2 at every rate.
    assert result.score == pytest.approx(0.5) and result.n_lesions == 2


def test_detection_report_leaves_out_the_organisers_excluded_slides(tmp_path) -> None:
    """evaluate.json's report over a run's outputs: Camelyon16's Test_114 (a normal slide here, scored 0.99 with an FP
    at 0.99) is left out of FROC and AUC by default and named in metrics.json; with no exclusion it counts."""
    import json
    from types import SimpleNamespace

    from PIL import Image

    from pathbundles.evaluation import DetectionMetricsReport

    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[8:48, 8:48] = 255  # 40 mask px at 7.776 um/px = 311 um: a lesion, not an ITC
    Image.fromarray(mask).save(tmp_path / "tumour_1_mask.png")
    (tmp_path / "tumour_1.csv").write_text(f"0.8,{20 * 32},{20 * 32}\n")
    (tmp_path / "Test_114.csv").write_text("0.99,100,100\n")
    (tmp_path / "normal_2.csv").write_text("")
    datalist = [{"image": str(tmp_path / "tumour_1.tif"), "mask": str(tmp_path / "tumour_1_mask.png"), "label": 1},
                {"image": str(tmp_path / "Test_114.tif"), "label": 0},
                {"image": str(tmp_path / "normal_2.tif"), "label": 0}]
    plans = [SimpleNamespace(name=n, level0_size=(64 * 32, 64 * 32), level0_mpp=MPP)
             for n in ("tumour_1", "Test_114", "normal_2")]
    writer = SimpleNamespace(dataset=SimpleNamespace(plans=plans),
                             scores={"tumour_1": (0.8,), "Test_114": (0.99,), "normal_2": (0.1,)},
                             outputs=lambda name: {"detections": tmp_path / f"{name}.csv"}, weights_record=dict)
    default = DetectionMetricsReport(writer, datalist, tmp_path / "default", n_bootstrap=10)
    (tmp_path / "default").mkdir()
    report = default()
    # Without Test_114: the lesion is found with no FP (FROC 1) and the tumour slide outscores the normal one.
    assert report["metrics"] == {"froc": 1.0, "slide_auc": 1.0}
    assert report["excluded_slides"] == ["Test_114"]
    assert json.loads((tmp_path / "default" / "metrics.json").read_text())["excluded_slides"] == ["Test_114"]
    (tmp_path / "all").mkdir()
    counted = DetectionMetricsReport(writer, datalist, tmp_path / "all", n_bootstrap=10, exclude_slides=None)()
    # With it: 1 FP (0.99) above the lesion's 0.8 over 3 slides (1/3 FP per slide): sensitivity 0 at 1/4, 1 from 1/2
    # on: FROC 5/6. AUC: the tumour slide (0.8) beats normal_2 (0.1), loses to Test_114 (0.99): 1/2.
    assert counted["metrics"]["froc"] == pytest.approx(5 / 6)
    assert counted["metrics"]["slide_auc"] == pytest.approx(0.5)
    assert counted["excluded_slides"] == []
