"""Mitosis detection F-score (MITOS 2012/2014, AMIDA13, TUPAC16 style), with one-to-one matching.

Two matchings (``matching=``):

* ``"optimal"`` (default): a detection and a ground-truth mitosis can be paired when their distance is <= the radius (5 um = 20 px
for MITOS 2012, 7.5 um = 30 px at 0.25 um/px for the others). Each is used at most once. Among all such one-to-one
pairings the one with the most pairs is used (maximum-cardinality matching, ties broken by the smallest total
distance), computed exactly by ``scipy.optimize.linear_sum_assignment``. This is the count a detector is entitled
to; a greedy rule (each detection in turn takes its nearest free mitosis) can pair a detection with
the wrong mitosis and leave another detection without a partner, so it can undercount true positives.
* ``"greedy"``: the rule of the SegMitos authors' ``cal_F.py`` and the challenge scorers, so that F-scores compare
  with published ones (the SegMitos paper's numbers were computed this way): detections are taken in the order
  given (the file's row order), each pairs with the nearest ground-truth mitosis not yet paired whose distance is
  strictly below the radius, and a detection with none is a false positive. It never counts more true positives
  than ``"optimal"``; on well-separated mitoses the two agree.

Counts: TP = pairs, FP = detections - TP, FN = mitoses - TP, summed over images before computing
precision = TP / (TP + FP), recall = TP / (TP + FN) and F1 = 2 TP / (2 TP + FP + FN) (= 2PR / (P + R)). With no
detections precision is 1 (nothing false was claimed); with no mitoses recall is 1 (nothing was missed). When there
is nothing to find and nothing was found, F1 is 0 / 0: undefined, NaN (``null`` in JSON), and :func:`mitosis_f1`
warns with :class:`UndefinedMetricWarning`. Swapping detections and ground truth swaps precision and recall and
keeps F1.

Scores and ``score_threshold`` are probabilities in [0, 1]; anything else is refused (a score of 500 is a
coordinate read as a score: a ``probability,x,y`` Camelyon16 row read as ``x,y,score``).

Score threshold: tune it (and SegMitos' blob thresholds) on a validation set with ``best_threshold`` and apply
the chosen value unchanged to the test set. Never tune on the test set: the F-score it reports would be optimistic
(the SegMitos authors tuned on test).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from pathbundles.checks import choice, out_of_unit_range, probability

#: What ``as_dict`` says in place of an undefined F1.
UNDEFINED_F1 = "undefined: no ground-truth mitosis and no detection (F1 = 0 / 0)"


class UndefinedMetricWarning(UserWarning):
    """A metric that is 0 / 0 on the data given (F1 with nothing to find and nothing found): reported as NaN."""


def radius_in_px(radius_px: float | None = None, radius_um: float | None = None, mpp: float | None = None) -> float:
    """The matching radius in pixels, from pixels or from micrometres and um/px (exactly one of the two)."""
    if (radius_px is None) == (radius_um is None):
        raise ValueError("give the matching radius either in pixels (radius_px) or in um (radius_um with mpp)")
    if radius_um is not None:
        if mpp is None or mpp <= 0:
            raise ValueError(f"radius_um needs the image's mpp (um/px > 0), got {mpp}")
        return float(radius_um) / float(mpp)
    return float(radius_px)


def _points(xy: np.ndarray, what: str) -> np.ndarray:
    xy = np.asarray(xy, dtype=np.float64)
    if xy.size == 0:
        return np.zeros((0, 2))
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"{what} must be (N, 2) (x, y), got shape {xy.shape}")
    return xy


#: The matchings :func:`match_points` knows (see the module docstring).
MATCHINGS = ("optimal", "greedy")


def check_matching(matching: str) -> str:
    """``matching`` when it is one of :data:`MATCHINGS`; :class:`SettingError` (a ValueError) otherwise."""
    return choice(matching, MATCHINGS, "matching")


def match_points(truth_xy: np.ndarray, detection_xy: np.ndarray, radius_px: float,
                 matching: str = "optimal") -> np.ndarray:
    """One-to-one matching of detections to ground-truth points within ``radius_px``.

    Args:
        truth_xy: (M, 2) ground-truth (x, y) in pixels.
        detection_xy: (N, 2) detection (x, y) in pixels, in the detector's order (used by ``"greedy"``).
        radius_px: matching radius in pixels: a pair is possible at distance <= radius (``"optimal"``) or
            < radius (``"greedy"``, as the challenge scorers).
        matching: ``"optimal"`` (maximum cardinality, then smallest total distance) or ``"greedy"``
            (detection order, nearest free mitosis).

    Returns:
        (K, 2) int array of (truth index, detection index) pairs.
    """
    if check_matching(matching) == "greedy":
        return _greedy_pairs(_points(truth_xy, "truth_xy"), _points(detection_xy, "detection_xy"), radius_px)
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    truth_xy, detection_xy = _points(truth_xy, "truth_xy"), _points(detection_xy, "detection_xy")
    if len(truth_xy) == 0 or len(detection_xy) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    near = cKDTree(truth_xy).sparse_distance_matrix(cKDTree(detection_xy), radius_px, output_type="ndarray")
    if len(near) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    m, n = len(truth_xy), len(detection_xy)
    # Assign within each connected group of candidate pairs only: small dense problems instead of one M x N one.
    graph = coo_matrix((np.ones(len(near)), (near["i"], near["j"] + m)), shape=(m + n, m + n))
    _, group = connected_components(graph, directed=False)
    pairs = []
    for g in np.unique(group[near["i"]]):
        rows = np.flatnonzero(group[:m] == g)
        cols = np.flatnonzero(group[m:] == g)
        # An impossible pair costs more than any set of possible ones, so the assignment maximises the number of
        # pairs first and only then minimises their total distance.
        impossible = radius_px * (min(len(rows), len(cols)) + 1) + 1.0
        cost = np.full((len(rows), len(cols)), impossible)
        local = near[group[near["i"]] == g]
        cost[np.searchsorted(rows, local["i"]), np.searchsorted(cols, local["j"])] = local["v"]
        r, c = linear_sum_assignment(cost)
        ok = cost[r, c] <= radius_px
        pairs.append(np.stack([rows[r[ok]], cols[c[ok]]], axis=1))
    return np.concatenate(pairs).astype(np.int64)


def _greedy_pairs(truth_xy: np.ndarray, detection_xy: np.ndarray, radius_px: float) -> np.ndarray:
    """The challenge scorers' matching: each detection in turn takes its nearest free mitosis at distance < radius
    (ties to the lower truth index)."""
    free = np.ones(len(truth_xy), dtype=bool)
    pairs = []
    for j, xy in enumerate(detection_xy):
        if not free.any():
            break
        distance = np.hypot(*(truth_xy - xy).T)
        distance[~free] = np.inf
        i = int(np.argmin(distance))
        if distance[i] < radius_px:
            free[i] = False
            pairs.append((i, j))
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


@dataclass(frozen=True)
class DetectionCounts:
    """True positives, false positives and false negatives, and the scores derived from them."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __add__(self, other: DetectionCounts) -> DetectionCounts:
        return DetectionCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    @property
    def precision(self) -> float:
        """TP / (TP + FP); 1 with no detections."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        """TP / (TP + FN); 1 with no ground truth."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        """2 TP / (2 TP + FP + FN); NaN (undefined) when there is nothing to find and nothing found."""
        denominator = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denominator if denominator else math.nan

    def as_dict(self) -> dict:
        """The JSON result of ``python -m pathbundles mitosis_f1``: an undefined F1 is ``None`` (JSON ``null``),
        with ``"f1_undefined"`` saying why."""
        f1 = self.f1
        result = {"precision": self.precision, "recall": self.recall, "f1": None if math.isnan(f1) else f1,
                  "tp": self.tp, "fp": self.fp, "fn": self.fn}
        if math.isnan(f1):
            result["f1_undefined"] = UNDEFINED_F1
        return result


def _kept(detection_xy: np.ndarray, scores: np.ndarray | None, score_threshold: float) -> np.ndarray:
    detection_xy = _points(detection_xy, "detection_xy")
    if scores is None:
        return detection_xy
    scores = _scores(scores, len(detection_xy))
    return detection_xy[scores >= score_threshold]


def _scores(scores: np.ndarray, n_detections: int) -> np.ndarray:
    """Detection scores as float64 (N,), refusing a count mismatch and values that are not probabilities."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) != n_detections:
        raise ValueError(f"{len(scores)} scores for {n_detections} detections")
    bad = out_of_unit_range(scores)
    if len(bad):
        raise ValueError(f"detection score {float(scores[bad[0]])!r} (detection {int(bad[0])}) is not a probability in "
                         "[0, 1]; were the columns read in the wrong order?")
    return scores


def mitosis_counts(truth_xy: np.ndarray, detection_xy: np.ndarray, scores: np.ndarray | None = None,
                   radius_px: float | None = None, radius_um: float | None = None, mpp: float | None = None,
                   score_threshold: float = 0.0, matching: str = "optimal") -> DetectionCounts:
    """TP/FP/FN of one image: detections with score >= ``score_threshold`` matched one-to-one within the radius.

    Args:
        truth_xy: (M, 2) ground-truth mitosis centroids (x, y) in pixels.
        detection_xy: (N, 2) detection (x, y) in pixels.
        scores: (N,) detection scores, or None to keep every detection.
        radius_px: matching radius in pixels; or give ``radius_um`` with the image's ``mpp`` (um/px).
        score_threshold: detections scoring below this are dropped.
        matching: ``"optimal"`` or ``"greedy"`` (the challenge scorers'; module docstring).
    """
    radius = radius_in_px(radius_px, radius_um, mpp)
    score_threshold = probability(score_threshold, "score_threshold")
    truth_xy = _points(truth_xy, "truth_xy")
    kept = _kept(detection_xy, scores, score_threshold)
    tp = len(match_points(truth_xy, kept, radius, matching))
    return DetectionCounts(tp=tp, fp=len(kept) - tp, fn=len(truth_xy) - tp)


Image = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]
"""One image for the dataset functions: (truth_xy (M, 2), detection_xy (N, 2), scores (N,) or None)."""


def mitosis_f1(images: Iterable[Image], radius_px: float | None = None, radius_um: float | None = None,
               mpp: float | None = None, score_threshold: float = 0.0, matching: str = "optimal") -> DetectionCounts:
    """Pooled TP/FP/FN (and so precision, recall, F1) over images, counts summed before the ratios.

    Warns with :class:`UndefinedMetricWarning` when there is no ground-truth mitosis and no detection at all (F1 is
    then NaN, not a perfect 1).

    Args:
        images: (truth_xy, detection_xy, scores) per image, positions in pixels of that image.
        radius_px: matching radius in pixels; or ``radius_um`` with ``mpp`` (um/px, the same for all images).
        score_threshold: detections scoring below this are dropped (a probability in [0, 1]).
        matching: ``"optimal"`` (default) or ``"greedy"`` (the challenge scorers' rule; compare published F-scores
            with it).
    """
    check_matching(matching)
    total = DetectionCounts()
    for truth_xy, detection_xy, scores in images:
        total = total + mitosis_counts(truth_xy, detection_xy, scores, radius_px, radius_um, mpp, score_threshold,
                                       matching)
    if total.tp + total.fp + total.fn == 0:
        warnings.warn(f"mitosis F1 is {UNDEFINED_F1}", UndefinedMetricWarning, stacklevel=2)
    return total


@dataclass(frozen=True)
class PrecisionRecallCurve:
    """Pooled counts at each score threshold (a detection is kept when its score >= threshold).

    Args:
        thresholds: distinct detection scores, descending.
        tp, fp, fn: pooled counts at each threshold.
    """

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray

    def counts(self, i: int) -> DetectionCounts:
        """Counts at ``thresholds[i]``."""
        return DetectionCounts(int(self.tp[i]), int(self.fp[i]), int(self.fn[i]))

    @property
    def precision(self) -> np.ndarray:
        return np.asarray([self.counts(i).precision for i in range(len(self.thresholds))])

    @property
    def recall(self) -> np.ndarray:
        return np.asarray([self.counts(i).recall for i in range(len(self.thresholds))])

    @property
    def f1(self) -> np.ndarray:
        return np.asarray([self.counts(i).f1 for i in range(len(self.thresholds))])


def precision_recall_curve(images: Sequence[Image], radius_px: float | None = None, radius_um: float | None = None,
                           mpp: float | None = None) -> PrecisionRecallCurve:
    """Pooled TP/FP/FN at every distinct detection score, each threshold matched afresh (matching is optimal
    per threshold, and the number of pairs never falls as detections are added).

    Args:
        images: (truth_xy, detection_xy, scores) per image; scores are required.
        radius_px: matching radius in pixels; or ``radius_um`` with ``mpp`` (um/px).
    """
    radius = radius_in_px(radius_px, radius_um, mpp)
    prepared = []
    for truth_xy, detection_xy, scores in images:
        if scores is None:
            raise ValueError("precision_recall_curve needs detection scores")
        detection_xy = _points(detection_xy, "detection_xy")
        scores = _scores(scores, len(detection_xy))
        prepared.append((_points(truth_xy, "truth_xy"), detection_xy, scores))
    all_scores = np.concatenate([s for _, _, s in prepared]) if prepared else np.zeros(0)
    thresholds = np.unique(all_scores)[::-1]
    tp = np.zeros(len(thresholds), dtype=np.int64)
    n_kept = np.zeros(len(thresholds), dtype=np.int64)
    n_truth = sum(len(t) for t, _, _ in prepared)
    for truth_xy, detection_xy, scores in prepared:
        # Only this image's own scores change its matching; between them its count is constant.
        own = np.unique(scores)[::-1]
        own_tp = np.asarray([len(match_points(truth_xy, detection_xy[scores >= t], radius)) for t in own],
                            dtype=np.int64)
        step = np.searchsorted(-own, -thresholds, side="right") - 1  # last own threshold >= each global one
        tp += np.where(step >= 0, own_tp[np.maximum(step, 0)], 0)
        n_kept += (scores[None, :] >= thresholds[:, None]).sum(axis=1)
    return PrecisionRecallCurve(thresholds=thresholds, tp=tp, fp=n_kept - tp, fn=n_truth - tp)


def best_threshold(images: Sequence[Image], radius_px: float | None = None, radius_um: float | None = None,
                   mpp: float | None = None) -> tuple[float, DetectionCounts]:
    """The score threshold with the highest pooled F1 on a VALIDATION set (highest threshold on ties).

    Apply the returned threshold unchanged to the test set; never choose it on the test set.

    Returns:
        (threshold, counts at that threshold).
    """
    curve = precision_recall_curve(images, radius_px, radius_um, mpp)
    if len(curve.thresholds) == 0:
        raise ValueError("no detections: there is no threshold to choose")
    i = int(np.argmax(curve.f1))
    return float(curve.thresholds[i]), curve.counts(i)
