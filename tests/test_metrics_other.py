"""Slide AUC, mitosis F1, segmentation IoU, plots and the MONAI/ignite wrappers."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pathbundles.metrics.classification import roc_auc, roc_curve, slide_auc
from pathbundles.metrics.mitosis import (DetectionCounts, UndefinedMetricWarning, best_threshold, match_points,
                                         mitosis_counts, mitosis_f1, precision_recall_curve)
from pathbundles.metrics.segmentation import confusion_matrix, segmentation_scores

# ------------------------------------------------------------------------------------------------------ slide AUC


def test_auc_hand_case_with_ties() -> None:
    """Tumour 0.9, 0.5; normal 0.5, 0.1. Pairs: (0.9,0.5)=1 (0.9,0.1)=1 (0.5,0.5)=1/2 (0.5,0.1)=1 -> 3.5/4."""
    labels, scores = np.array([1, 1, 0, 0]), np.array([0.9, 0.5, 0.5, 0.1])
    assert roc_auc(labels, scores) == pytest.approx(0.875)
    fpr, tpr, thresholds = roc_curve(labels, scores)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    assert thresholds[0] == np.inf
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(0.875)  # the curve's trapezoid area is the Mann-Whitney AUC


def test_auc_matches_sklearn_when_installed() -> None:
    if importlib.util.find_spec("sklearn") is None:
        pytest.skip("scikit-learn not installed")
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 60)
    labels[:2] = [0, 1]
    scores = np.round(rng.random(60), 1)  # many ties
    assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))


def test_auc_bootstrap_interval() -> None:
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(40), np.zeros(60)].astype(int)
    scores = np.r_[rng.normal(1.0, 1.0, 40), rng.normal(0.0, 1.0, 60)]
    result = slide_auc(labels, scores, n_bootstrap=500, seed=3)
    assert result.ci_low < result.auc < result.ci_high
    assert 0 <= result.ci_low and result.ci_high <= 1
    assert slide_auc(labels, scores, n_bootstrap=500, seed=3) == result  # seeded: reproducible
    assert result.n_tumour == 40 and result.n_normal == 60


def test_auc_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="both"):
        roc_auc(np.ones(3), np.array([0.1, 0.2, 0.3]))


# --------------------------------------------------------------------------------------------------- mitosis F1


def test_mitosis_hand_case() -> None:
    truth = np.array([[100, 100], [300, 300], [500, 500]])
    detections = np.array([[110, 100], [105, 100], [300, 329], [700, 700]])
    counts = mitosis_counts(truth, detections, radius_px=30)
    # (110,100) and (105,100) compete for one mitosis: one TP, one FP; (300,329) is 29 px away: TP; (700,700) FP;
    # (500,500) missed.
    assert counts == DetectionCounts(tp=2, fp=2, fn=1)
    assert counts.precision == pytest.approx(0.5) and counts.recall == pytest.approx(2 / 3)
    assert counts.f1 == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert counts.as_dict() == {"precision": 0.5, "recall": pytest.approx(2 / 3), "f1": pytest.approx(4 / 7),
                                "tp": 2, "fp": 2, "fn": 1}


def test_radius_in_um() -> None:
    truth, detection = np.array([[0, 0]]), np.array([[25, 0]])
    # 7.5 um at 0.25 um/px = 30 px: matched; 5 um = 20 px: not.
    assert mitosis_counts(truth, detection, radius_um=7.5, mpp=0.25).tp == 1
    assert mitosis_counts(truth, detection, radius_um=5.0, mpp=0.25).tp == 0
    with pytest.raises(ValueError):
        mitosis_counts(truth, detection, radius_px=30, radius_um=7.5, mpp=0.25)


def test_optimal_matching_beats_greedy_nearest() -> None:
    """Radius 10. Mitoses A at x=0, B at x=15; detection d1 (best score) at x=7.6 is nearest to B (7.4 vs 7.6),
    d2 at x=22 reaches only B. Greedy-nearest pairs d1-B and leaves d2 unmatched (1 TP); the optimal one-to-one
    matching pairs d1-A and d2-B (2 TP)."""
    truth = np.array([[0.0, 0.0], [15.0, 0.0]])
    detections = np.array([[7.6, 0.0], [22.0, 0.0]])
    pairs = match_points(truth, detections, 10.0)
    assert sorted(map(tuple, pairs.tolist())) == [(0, 0), (1, 1)]
    assert mitosis_counts(truth, detections, np.array([0.9, 0.8]), radius_px=10).tp == 2


def test_greedy_matching_follows_detection_order_and_a_strict_radius() -> None:
    """The challenge scorers' rule: detections in the order given, nearest free mitosis, distance < radius."""
    truth = np.array([[0.0, 0.0], [15.0, 0.0]])
    detections = np.array([[7.6, 0.0], [22.0, 0.0]])
    assert match_points(truth, detections, 10.0, "greedy").tolist() == [[1, 0]]
    # The other order: d2 (x=22) first takes B (7 px), then d1 takes A (7.6 px): both pair, as optimal does.
    assert match_points(truth, detections[::-1], 10.0, "greedy").tolist() == [[1, 0], [0, 1]]
    # Strict radius: exactly 10 px apart pairs optimally (<=) but not greedily (<).
    at_radius = (np.array([[0.0, 0.0]]), np.array([[6.0, 8.0]]))
    assert len(match_points(*at_radius, 10.0)) == 1 and len(match_points(*at_radius, 10.0, "greedy")) == 0
    counts = mitosis_f1([(truth, detections, np.array([0.9, 0.8]))], radius_px=10, matching="greedy")
    assert counts == DetectionCounts(tp=1, fp=1, fn=1)
    with pytest.raises(ValueError, match="matching must be one of"):
        match_points(truth, detections, 10.0, "nearest")


def test_image_without_mitoses_and_empty_detections() -> None:
    no_mitoses = mitosis_counts(np.zeros((0, 2)), np.array([[1.0, 1.0], [5.0, 5.0]]), radius_px=30)
    assert no_mitoses == DetectionCounts(0, 2, 0)
    assert no_mitoses.precision == 0 and no_mitoses.recall == 1 and no_mitoses.f1 == 0
    no_detections = mitosis_counts(np.array([[1.0, 1.0]]), np.zeros((0, 2)), radius_px=30)
    assert no_detections == DetectionCounts(0, 0, 1)
    assert no_detections.precision == 1 and no_detections.recall == 0 and no_detections.f1 == 0
    nothing = mitosis_counts(np.zeros((0, 2)), np.zeros((0, 2)), radius_px=30)
    assert math.isnan(nothing.f1)  # 0 / 0: nothing to find and nothing found is no perfect score
    assert nothing.as_dict()["f1"] is None and "undefined" in nothing.as_dict()["f1_undefined"]
    with pytest.warns(UndefinedMetricWarning, match=r"F1 = 0 / 0"):
        assert math.isnan(mitosis_f1([(np.zeros((0, 2)), np.zeros((0, 2)), None)], radius_px=30).f1)


def test_mitosis_scores_and_threshold_must_be_probabilities() -> None:
    with pytest.raises(ValueError, match=r"detection score 500\.0 \(detection 0\) is not a probability"):
        mitosis_counts(np.array([[10.0, 500.0]]), np.array([[0.9, 10.0]]), np.array([500.0]), radius_px=30)
    with pytest.raises(ValueError, match=r"score_threshold must be a probability in \[0, 1\], got 1\.5"):
        mitosis_counts(np.zeros((0, 2)), np.zeros((0, 2)), radius_px=30, score_threshold=1.5)


def test_pooled_counts_and_score_threshold() -> None:
    images = [(np.array([[0.0, 0.0]]), np.array([[1.0, 0.0], [50.0, 50.0]]), np.array([0.9, 0.3])),
              (np.array([[0.0, 0.0], [100.0, 100.0]]), np.array([[100.0, 101.0]]), np.array([0.6]))]
    assert mitosis_f1(images, radius_px=30) == DetectionCounts(tp=2, fp=1, fn=1)
    assert mitosis_f1(images, radius_px=30, score_threshold=0.5) == DetectionCounts(tp=2, fp=0, fn=1)
    assert mitosis_f1(images, radius_px=30, score_threshold=0.7) == DetectionCounts(tp=1, fp=0, fn=2)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 60)), max_size=8),
       st.lists(st.tuples(st.integers(0, 60), st.integers(0, 60), st.sampled_from([0.2, 0.5, 0.5, 0.9])),
                max_size=8),
       st.sampled_from([5.0, 12.0, 30.0]))
def test_mitosis_properties(truth: list, detections: list, radius: float) -> None:
    truth_xy = np.asarray(truth, dtype=float).reshape(-1, 2)
    det = np.asarray(detections, dtype=float).reshape(-1, 3)
    counts = mitosis_counts(truth_xy, det[:, :2], det[:, 2], radius_px=radius)
    swapped = mitosis_counts(det[:, :2], truth_xy, radius_px=radius)
    if not len(truth_xy) and not len(det):
        assert math.isnan(counts.f1) and math.isnan(swapped.f1)
        return
    # Swapping truth and detections swaps FP and FN, precision and recall, and keeps TP and F1.
    assert (swapped.tp, swapped.fp, swapped.fn) == (counts.tp, counts.fn, counts.fp)
    assert swapped.f1 == pytest.approx(counts.f1)
    assert swapped.precision == pytest.approx(counts.recall) and swapped.recall == pytest.approx(counts.precision)
    # Order of the points does not matter, and TP equals a brute-force maximum matching.
    assert mitosis_counts(truth_xy[::-1], det[::-1, :2], radius_px=radius) == counts
    assert counts.tp == _brute_force_max_matching(truth_xy, det[:, :2], radius)
    assert 0.0 <= counts.f1 <= 1.0
    # The curve equals matching afresh at every threshold.
    if len(det):
        curve = precision_recall_curve([(truth_xy, det[:, :2], det[:, 2])], radius_px=radius)
        for i, t in enumerate(curve.thresholds):
            assert curve.counts(i) == mitosis_counts(truth_xy, det[:, :2], det[:, 2], radius_px=radius,
                                                     score_threshold=t)


def _brute_force_max_matching(truth: np.ndarray, detections: np.ndarray, radius: float) -> int:
    """Maximum bipartite matching by augmenting paths (Kuhn), independent of the assignment solver."""
    near = [[j for j in range(len(detections)) if np.hypot(*(truth[i] - detections[j])) <= radius]
            for i in range(len(truth))]
    owner: dict[int, int] = {}

    def augment(i: int, seen: set) -> bool:
        for j in near[i]:
            if j not in seen:
                seen.add(j)
                if j not in owner or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return sum(augment(i, set()) for i in range(len(truth)))


def test_best_threshold_on_validation() -> None:
    images = [(np.array([[0.0, 0.0], [100.0, 0.0]]),
               np.array([[0.0, 1.0], [100.0, 1.0], [300.0, 0.0], [400.0, 0.0]]), np.array([0.9, 0.7, 0.8, 0.2]))]
    # t=0.9: 1 TP 0 FP 1 FN (F1 2/3); t=0.8: 1, 1, 1 (1/2); t=0.7: 2, 1, 0 (4/5); t=0.2: 2, 2, 0 (2/3).
    threshold, counts = best_threshold(images, radius_px=30)
    assert threshold == 0.7 and counts == DetectionCounts(2, 1, 0)


# ------------------------------------------------------------------------------------------------- segmentation


def test_segmentation_hand_case() -> None:
    truth = np.array([[0, 1, 1, 2],
                      [0, 1, 2, 2],
                      [0, 0, 3, 3]])
    pred = np.array([[2, 1, 2, 2],
                     [3, 1, 2, 0],
                     [1, 1, 3, 1]])
    # Annotated pixels (truth > 0): class 1: 3 px, predicted 1, 1, 2 -> TP 2, FN 1; class 2: 3 px, predicted 2, 2, 0
    # -> TP 2, FN 1 (0 = miss), FP 1 (a truth-1 pixel predicted 2); class 3: 2 px predicted 3, 1 -> TP 1, FN 1.
    # Class 1 FP: the truth-3 pixel predicted 1 -> 1. Unannotated pixels (predicted 2, 3, 1, 1) are ignored.
    cm = confusion_matrix(truth, pred, 3)
    assert cm[0].sum() == 0 and cm.sum() == 8
    scores = segmentation_scores([(truth, pred)], 3)
    np.testing.assert_allclose(scores.iou, [2 / 4, 2 / 4, 1 / 2])
    np.testing.assert_allclose(scores.recall, [2 / 3, 2 / 3, 1 / 2])
    np.testing.assert_allclose(scores.precision, [2 / 3, 2 / 3, 1 / 1])
    assert scores.mean_iou == pytest.approx(0.5)


def test_absent_class_is_nan_and_left_out_of_the_mean() -> None:
    truth = np.array([[1, 1], [2, 0]])
    pred = np.array([[1, 1], [2, 2]])
    scores = segmentation_scores([(truth, pred)], 3)
    assert np.isnan(scores.iou[2]) and scores.mean_iou == pytest.approx(1.0)
    result = scores.as_dict()
    assert result["iou"] == {"1": 1.0, "2": 1.0, "3": None} and result["mean_iou"] == 1.0
    json.dumps(result, allow_nan=False)


def test_segmentation_rejects_labels_out_of_range() -> None:
    with pytest.raises(ValueError, match="0..2"):
        confusion_matrix(np.array([[1, 3]]), np.array([[1, 1]]), 2)


# ---------------------------------------------------------------------------------------------------------- plots


def test_plots_write_pngs(tmp_path) -> None:
    from pathbundles.metrics.froc import SlideHits, froc
    from pathbundles.metrics.plots import plot_confusion_matrix, plot_froc, plot_roc

    result = froc([SlideHits(np.array([0.3, 0.7]), np.array([0.9, 0.5, -np.inf]))])
    fpr, tpr, _ = roc_curve(np.array([1, 0, 1, 0]), np.array([0.9, 0.4, 0.6, 0.7]))
    paths = [plot_froc(result.fp_per_slide, result.sensitivity, tmp_path / "froc.png", result.fp_rates,
                       result.sensitivities),
             plot_roc(fpr, tpr, tmp_path / "roc.png", auc=0.75, ci=(0.5, 1.0)),
             plot_confusion_matrix(np.array([[0, 0, 0], [1, 8, 1], [2, 0, 6]]), tmp_path / "confusion.png")]
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion.png", "froc.png", "roc.png"]  # no leftovers


# ---------------------------------------------------------------------------------------- MONAI / ignite wrappers


def test_ignite_metrics_and_report(tmp_path) -> None:
    import torch
    from ignite.engine import Engine

    from pathbundles.metrics.froc import evaluation_mask, froc, slide_hits
    from pathbundles.metrics.handlers import (FROCMetric, MeanIoUMetric, MetricsReport, MitosisF1Metric,
                                              SlideAUCMetric)

    tumour = np.zeros((60, 60), dtype=np.uint8)
    tumour[5:45, 5:45] = 255  # 311 um wide: a lesion, not an ITC
    slide_a = (np.array([[0.9, 15 * 32, 15 * 32], [0.4, 55 * 32, 55 * 32]]), tumour)
    slide_b = (np.array([[0.6, 100.0, 100.0]]), None)
    truth = np.array([[1, 1], [2, 0]])
    batches = [
        {"det": [torch.as_tensor(slide_a[0])], "mask": [torch.as_tensor(slide_a[1])], "score": [0.9], "label": [1],
         "mitosis": [np.array([[0.0, 0.0, 0.8]])], "mitosis_truth": [np.array([[1.0, 0.0]])],
         "seg": [torch.as_tensor(truth)], "seg_truth": [torch.as_tensor(truth)]},
        {"det": [slide_b[0]], "mask": [slide_b[1]], "score": [0.6], "label": [0],
         "mitosis": [np.zeros((0, 3))], "mitosis_truth": [np.array([[50.0, 50.0]])],
         "seg": [torch.as_tensor(np.array([[1, 2], [2, 2]]))], "seg_truth": [torch.as_tensor(truth)]},
    ]
    engine = Engine(lambda e, batch: batch)
    FROCMetric(0.243, 32, output_transform=lambda o: (o["det"], o["mask"])).attach(engine, "froc")
    SlideAUCMetric(n_bootstrap=50, output_transform=lambda o: (o["score"], o["label"])).attach(engine, "auc")
    MitosisF1Metric(radius_px=30, output_transform=lambda o: (o["mitosis"], o["mitosis_truth"])).attach(engine, "f1")
    MeanIoUMetric(2, output_transform=lambda o: (o["seg"], o["seg_truth"])).attach(engine, "iou")
    MetricsReport(tmp_path).attach(engine)
    engine.run(batches, max_epochs=1)

    expected = froc([slide_hits(slide_a[0], evaluation_mask(slide_a[1], 0.243, 32)), slide_hits(slide_b[0], None)])
    assert engine.state.metrics["froc"] == pytest.approx(expected.score)
    assert engine.state.metrics["auc"] == pytest.approx(1.0)
    assert engine.state.metrics["f1"] == pytest.approx(2 / 3)  # TP 1, FP 0, FN 1
    # Class 1: TP 2 + 1, FN 1 (a truth-1 pixel predicted 2) -> 3/4; class 2: TP 1 + 1, FP 1 -> 2/3.
    assert engine.state.metrics["iou"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["details"]["froc"] == expected.as_dict()
    assert report["details"]["f1"]["tp"] == 1
    assert sorted(report["plots"]) == ["confusion.png", "froc.png", "roc.png"]
    for name in report["plots"]:
        assert (tmp_path / name).stat().st_size > 5_000
