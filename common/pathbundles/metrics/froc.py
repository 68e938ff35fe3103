"""Camelyon16 lesion-level FROC, exact to the official evaluation, in micrometres.

Evaluation mask (from a ground-truth tumour mask at ``mask_downsample`` from level 0, so at
``mask_mpp = level0_mpp * mask_downsample`` um/px):

1. tumour = mask > 0 (any value: masks with tumour = 1 and = 255 both work);
2. grow: a pixel is tumour when its Euclidean distance to tumour is < ``grow_um / 2 / mask_mpp`` mask pixels
   (75 um / 2 by default; 4.82 px at 0.243 um/px and downsample 32);
3. fill holes, label 8-connected components: each is a lesion;
4. isolated tumour cells (ITC): a lesion whose regionprops major axis length * ``mask_mpp`` < ``itc_um`` (275 um).

Hit test: a detection at level-0 (x, y) hits ``labels[floor(y / mask_downsample), floor(x / mask_downsample)]``;
positions outside the mask count as label 0. Label 0 = false positive; a hit on an ITC lesion is neither a true nor
a false positive; a lesion's score is the maximum score of its hits (further hits count as nothing); on a normal
slide (no mask) every detection is a false positive.

Curve: for every distinct score t (all of them, including the lowest, which the organisers' script drops),
FP per slide = #FP with score >= t / #slides and sensitivity = #non-ITC lesions with score >= t / #non-ITC lesions,
plus the point (0, 0) for a threshold above every score. Detections of equal score enter together. The FROC score
is the mean sensitivity at 1/4, 1/2, 1, 2, 4 and 8 FP per slide, linearly interpolated on the curve as NCRF's
evaluation does with ``np.interp``: where several points share one FP rate the highest sensitivity counts, between
rates the line runs from the highest sensitivity of the lower rate to the lowest of the higher rate, and past the
curve's last point the sensitivity stays at its last value.

Excluded slides: the organisers left Camelyon16 slides Test_049 and Test_114 out of the challenge's evaluation
(:data:`CAMELYON16_EXCLUDED_SLIDES`). The FROC and slide-AUC evaluations (``python -m pathbundles froc``, the
bundles' ``evaluate.json``) leave out the slides of an exclusion list, by default those two (names compared without
case, as the test set ships ``test_049.tif`` while the reference uses ``Test_049``), and report which they left out.
"""


from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from scipy import ndimage

FP_RATES: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

#: Camelyon16 test slides the organisers excluded from the evaluation.
CAMELYON16_EXCLUDED_SLIDES: tuple[str, ...] = ("Test_049", "Test_114")


def exclusion_set(exclude_slides: str | Sequence[str] | None) -> frozenset[str]:
    """Lower-case slide names of an exclusion list: a sequence of names, one comma-separated string (the command
    line), or None / "" for none."""
    if exclude_slides is None:
        return frozenset()
    if isinstance(exclude_slides, str):
        exclude_slides = exclude_slides.split(",")
    names = [str(name).strip() for name in exclude_slides]
    return frozenset(name.lower() for name in names if name)


@dataclass(frozen=True)
class LesionMask:
    """Camelyon16 evaluation mask of one slide.

    Args:
        labels: (H, W) int32 lesion labels at ``mask_downsample``; 0 = no lesion.
        itc: sorted labels of the lesions excluded as isolated tumour cells.
        mask_downsample: level-0 pixels per mask pixel.
        level0_mpp: micrometres per level-0 pixel.
    """

    labels: np.ndarray
    itc: tuple[int, ...]
    mask_downsample: float
    level0_mpp: float

    @cached_property
    def present_labels(self) -> np.ndarray:
        """Labels (> 0) that occur in ``labels``, ITC included, ascending (labels need not be consecutive)."""
        counts = np.bincount(self.labels.ravel(), minlength=1)
        counts[0] = 0
        return np.flatnonzero(counts)

    @property
    def n_labels(self) -> int:
        """Number of lesions, ITC included."""
        return len(self.present_labels)

    @property
    def lesion_labels(self) -> np.ndarray:
        """Labels of the lesions that count (not ITC)."""
        return np.setdiff1d(self.present_labels, np.asarray(self.itc, dtype=np.int64))

    def label_at(self, xy: np.ndarray) -> np.ndarray:
        """Lesion label under each level-0 (x, y), shape (N, 2); 0 outside lesions and outside the mask."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        col = np.floor(xy[:, 0] / self.mask_downsample)
        row = np.floor(xy[:, 1] / self.mask_downsample)
        height, width = self.labels.shape
        inside = (row >= 0) & (row < height) & (col >= 0) & (col < width)
        out = np.zeros(len(xy), dtype=np.int64)
        out[inside] = self.labels[row[inside].astype(np.int64), col[inside].astype(np.int64)]
        return out


def evaluation_mask(tumour_mask: np.ndarray, level0_mpp: float = 0.243, mask_downsample: float = 32.0,
                    grow_um: float = 75.0, itc_um: float = 275.0) -> LesionMask:
    """Camelyon16 evaluation mask (lesion labels and ITC list) from a ground-truth tumour mask.

    Args:
        tumour_mask: (H, W) array at ``mask_downsample`` from level 0; tumour = any value > 0.
        level0_mpp: micrometres per level-0 pixel (0.243 for Radboud, 0.226 for Utrecht slides).
        mask_downsample: level-0 pixels per mask pixel (any positive number, not only powers of 2).
        grow_um: tumour is grown by half of this distance in micrometres (75 um: a detection within 37.5 um counts).
        itc_um: lesions whose major axis is shorter than this in micrometres are ITC (275 um = 200 + 75).
    """
    tumour_mask = np.asarray(tumour_mask)
    if tumour_mask.ndim != 2:
        raise ValueError(f"expected a 2-D tumour mask (H, W), got shape {tumour_mask.shape}")
    if level0_mpp <= 0 or mask_downsample <= 0:
        raise ValueError(f"level0_mpp and mask_downsample must be > 0, got {level0_mpp} and {mask_downsample}")
    mask_mpp = level0_mpp * mask_downsample
    tumour = tumour_mask > 0
    if tumour.any():
        grown = ndimage.distance_transform_edt(~tumour) < grow_um / 2.0 / mask_mpp
        labels, n = ndimage.label(ndimage.binary_fill_holes(grown), structure=np.ones((3, 3), dtype=bool))
    else:
        labels, n = np.zeros(tumour.shape, dtype=np.int32), 0
    itc: list[int] = []
    if n:
        from skimage.measure import regionprops

        itc = [region.label for region in regionprops(labels) if region.axis_major_length * mask_mpp < itc_um]
    return LesionMask(labels=labels.astype(np.int32), itc=tuple(sorted(itc)), mask_downsample=float(mask_downsample),
                      level0_mpp=float(level0_mpp))


def evaluation_mask_from_annotations(path: str | os.PathLike, level0_size: tuple[int, int],
                                     level0_mpp: float = 0.243, mask_downsample: float = 32.0) -> LesionMask:
    """Evaluation mask from tumour polygons (ASAP XML, NCRF JSON or GeoJSON), rasterised by the annotation layer.

    Exclusion polygons (ASAP group ``_2``, NCRF ``negative``) are cut out by the rasteriser.

    Args:
        path: annotation file with polygons in level-0 pixel (x, y).
        level0_size: slide size (width, height) in level-0 pixels; the mask is ceil(size / mask_downsample).
        level0_mpp: micrometres per level-0 pixel.
        mask_downsample: level-0 pixels per mask pixel.
    """
    from pathbundles.annotations import rasterize, read_annotations

    width, height = level0_size
    shape_hw = (int(np.ceil(height / mask_downsample)), int(np.ceil(width / mask_downsample)))
    mask = rasterize(read_annotations(path), shape_hw, mask_downsample)
    return evaluation_mask(np.asarray(mask), level0_mpp=level0_mpp, mask_downsample=mask_downsample)


@dataclass(frozen=True)
class SlideHits:
    """One slide's contribution to the FROC: false-positive scores and the score of every counted lesion.

    Args:
        fp_scores: scores of the detections that hit no lesion.
        lesion_scores: one entry per non-ITC lesion, its best hit's score, -inf when missed.
        n_itc: number of ITC lesions on the slide.
    """

    fp_scores: np.ndarray
    lesion_scores: np.ndarray
    n_itc: int = 0


def _as_detections(detections: np.ndarray) -> np.ndarray:
    detections = np.asarray(detections, dtype=np.float64)
    if detections.size == 0:
        return np.zeros((0, 3))
    if detections.ndim != 2 or detections.shape[1] != 3:
        raise ValueError(f"detections must be (N, 3) [score, x, y], got shape {detections.shape}")
    if not np.isfinite(detections).all():
        raise ValueError("detections contain NaN or infinite values")
    return detections


def slide_hits(detections: np.ndarray, lesions: LesionMask | None) -> SlideHits:
    """Sort one slide's detections into false positives and lesion scores.

    Args:
        detections: (N, 3) ``[score, x, y]`` with x, y in level-0 pixels.
        lesions: the slide's evaluation mask, or None for a normal slide.
    """
    detections = _as_detections(detections)
    scores = detections[:, 0]
    if lesions is None:
        return SlideHits(fp_scores=scores.copy(), lesion_scores=np.zeros(0))
    hit = lesions.label_at(detections[:, 1:3])
    best = np.full(int(lesions.labels.max(initial=0)) + 1, -np.inf)
    np.maximum.at(best, hit, scores)
    counted = lesions.lesion_labels
    return SlideHits(fp_scores=scores[hit == 0], lesion_scores=best[counted], n_itc=len(lesions.itc))


@dataclass(frozen=True)
class FROCResult:
    """FROC curve and score over a set of slides.

    Args:
        thresholds: score thresholds, descending; the first is +inf (no detection kept).
        fp_per_slide: mean false positives per slide at each threshold (non-decreasing).
        sensitivity: fraction of non-ITC lesions detected at each threshold (non-decreasing).
        score: mean sensitivity at ``fp_rates``.
        sensitivities: the interpolated sensitivity at each of ``fp_rates``.
        fp_rates: false positives per slide at which sensitivity is read.
        n_slides, n_lesions, n_itc: slides evaluated, counted lesions, excluded ITC lesions.
    """

    thresholds: np.ndarray
    fp_per_slide: np.ndarray
    sensitivity: np.ndarray
    score: float
    sensitivities: np.ndarray
    fp_rates: tuple[float, ...] = field(default=FP_RATES)
    n_slides: int = 0
    n_lesions: int = 0
    n_itc: int = 0

    def as_dict(self) -> dict:
        """The JSON result of ``python -m pathbundles froc``."""
        return {"froc": float(self.score),
                "sensitivity": {f"{rate:g}": float(s) for rate, s in zip(self.fp_rates, self.sensitivities)},
                "n_slides": self.n_slides, "n_lesions": self.n_lesions, "n_itc": self.n_itc}


def interpolate_sensitivity(fp_per_slide: np.ndarray, sensitivity: np.ndarray,
                            fp_rates: Sequence[float] = FP_RATES) -> np.ndarray:
    """Sensitivity at each FP rate, linearly interpolated on a FROC curve (rules in the module docstring).

    Args:
        fp_per_slide: curve x, non-decreasing, starting at 0.
        sensitivity: curve y, non-decreasing along the curve.
        fp_rates: FP-per-slide values to read.
    """
    fp = np.asarray(fp_per_slide, dtype=np.float64)
    sens = np.asarray(sensitivity, dtype=np.float64)
    unique_fp, first = np.unique(fp, return_index=True)
    low = np.minimum.reduceat(sens, first)
    high = np.maximum.reduceat(sens, first)
    out = []
    for rate in fp_rates:
        i = int(np.searchsorted(unique_fp, rate, side="right")) - 1
        if i < 0:
            out.append(0.0)  # before the curve's first point, which is (0, 0) for a curve built by froc()
        elif unique_fp[i] == rate or i == len(unique_fp) - 1:
            out.append(float(high[i]))
        else:
            x0, x1 = unique_fp[i], unique_fp[i + 1]
            out.append(float(high[i] + (low[i + 1] - high[i]) * (rate - x0) / (x1 - x0)))
    return np.asarray(out)


def froc(slides: Sequence[SlideHits], fp_rates: Sequence[float] = FP_RATES) -> FROCResult:
    """FROC curve and score of a set of slides (normal slides included: they add false positives and slides).

    Args:
        slides: one ``SlideHits`` per slide (from ``slide_hits``).
        fp_rates: false positives per slide at which sensitivity is averaged.

    Raises:
        ValueError: no slides, or no non-ITC lesion on any slide (sensitivity undefined).
    """
    if not slides:
        raise ValueError("FROC needs at least one slide")
    fp_scores = np.concatenate([np.asarray(s.fp_scores, dtype=np.float64) for s in slides])
    lesion_scores = np.concatenate([np.asarray(s.lesion_scores, dtype=np.float64) for s in slides])
    n_slides, n_lesions = len(slides), len(lesion_scores)
    if n_lesions == 0:
        raise ValueError("FROC needs at least one lesion that is not an ITC; sensitivity is undefined without")
    detected = lesion_scores[np.isfinite(lesion_scores)]
    thresholds = np.concatenate([[np.inf], np.unique(np.concatenate([fp_scores, detected]))[::-1]])
    # Counts of scores >= t for every t at once: sort ascending, count from the right.
    fp_sorted, lesion_sorted = np.sort(fp_scores), np.sort(detected)
    n_fp = len(fp_sorted) - np.searchsorted(fp_sorted, thresholds, side="left")
    n_tp = len(lesion_sorted) - np.searchsorted(lesion_sorted, thresholds, side="left")
    fp_per_slide = n_fp / n_slides
    sensitivity = n_tp / n_lesions
    sensitivities = interpolate_sensitivity(fp_per_slide, sensitivity, fp_rates)
    return FROCResult(thresholds=thresholds, fp_per_slide=fp_per_slide, sensitivity=sensitivity,
                      score=float(np.mean(sensitivities)), sensitivities=sensitivities,
                      fp_rates=tuple(float(r) for r in fp_rates), n_slides=n_slides, n_lesions=n_lesions,
                      n_itc=int(sum(s.n_itc for s in slides)))
