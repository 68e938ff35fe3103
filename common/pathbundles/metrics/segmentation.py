"""Multi-class segmentation scores over annotated pixels (DMMN): per-class IoU, recall, precision, mean IoU.

Labels: 0 = unannotated (ignored wherever the ground truth is 0), classes are 1..C with ``num_classes`` = C, the
number of real classes. Only pixels whose ground truth is > 0 count. A prediction of 0 on an annotated pixel is a
miss for the true class (a false negative for it, a false positive for no class).

For class c over the counted pixels: TP = truth c and prediction c, FP = prediction c and truth another class,
FN = truth c and prediction not c. IoU = TP / (TP + FP + FN), recall = TP / (TP + FN), precision = TP / (TP + FP).
A ratio whose denominator is 0 (a class absent from both truth and prediction, say) is NaN, written as null in JSON,
and left out of the mean IoU. Scores of a data set come from the confusion matrix summed over its images.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C + 1, C + 1) int64 counts of [truth label, predicted label] over annotated pixels (row 0 stays 0).

    Args:
        truth: (H, W) ground-truth labels, 0 = unannotated, 1..C = classes.
        pred: (H, W) predicted labels in 0..C.
        num_classes: C, the number of real classes.
    """
    truth, pred = np.asarray(truth), np.asarray(pred)
    if truth.shape != pred.shape:
        raise ValueError(f"truth and prediction differ in shape: {truth.shape} and {pred.shape}")
    for name, labels in (("truth", truth), ("prediction", pred)):
        if labels.size and (labels.min() < 0 or labels.max() > num_classes):
            raise ValueError(f"{name} labels must lie in 0..{num_classes}, found {labels.min()}..{labels.max()}")
    annotated = truth > 0
    index = truth[annotated].astype(np.int64) * (num_classes + 1) + pred[annotated].astype(np.int64)
    return np.bincount(index, minlength=(num_classes + 1) ** 2).reshape(num_classes + 1, num_classes + 1)


@dataclass(frozen=True)
class SegmentationScores:
    """Per-class scores (index i = class i + 1) and mean IoU, from a confusion matrix.

    Args:
        confusion: (C + 1, C + 1) counts [truth, prediction], row/column 0 = unannotated/no prediction.
    """

    confusion: np.ndarray

    @property
    def num_classes(self) -> int:
        return self.confusion.shape[0] - 1

    def _counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cm = self.confusion.astype(np.float64)
        tp = np.diag(cm)[1:]
        fn = cm[1:, :].sum(axis=1) - tp
        fp = cm[1:, 1:].sum(axis=0) - tp
        return tp, fp, fn

    @staticmethod
    def _divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)

    @property
    def iou(self) -> np.ndarray:
        tp, fp, fn = self._counts()
        return self._divide(tp, tp + fp + fn)

    @property
    def recall(self) -> np.ndarray:
        tp, _, fn = self._counts()
        return self._divide(tp, tp + fn)

    @property
    def precision(self) -> np.ndarray:
        tp, fp, _ = self._counts()
        return self._divide(tp, tp + fp)

    @property
    def mean_iou(self) -> float:
        """Mean of the defined per-class IoUs; NaN when none is defined."""
        iou = self.iou
        return float(np.mean(iou[~np.isnan(iou)])) if (~np.isnan(iou)).any() else float("nan")

    def as_dict(self) -> dict:
        """The JSON result of ``python -m pathbundles iou`` (NaN -> None, i.e. null)."""
        def per_class(values: np.ndarray) -> dict:
            return {str(c + 1): (None if np.isnan(v) else float(v)) for c, v in enumerate(values)}

        mean = self.mean_iou
        return {"iou": per_class(self.iou), "mean_iou": None if np.isnan(mean) else mean,
                "recall": per_class(self.recall), "precision": per_class(self.precision)}


def segmentation_scores(pairs: Iterable[tuple[np.ndarray, np.ndarray]], num_classes: int) -> SegmentationScores:
    """Scores over a set of images from their summed confusion matrix.

    Args:
        pairs: (truth, prediction) label maps, each (H, W), per image.
        num_classes: C, the number of real classes (labels 1..C).
    """
    total = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    for truth, pred in pairs:
        total += confusion_matrix(truth, pred, num_classes)
    return SegmentationScores(total)
