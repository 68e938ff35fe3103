"""Metrics of the four bundles, exact to the published definitions: Camelyon16 FROC, slide ROC AUC, mitosis F1,
multi-class segmentation IoU; plots and command-line entry points.

The modules here need only numpy/scipy/scikit-image; the MONAI/ignite wrappers live in
:mod:`pathbundles.metrics.handlers` so that importing a metric never imports torch.
"""

from pathbundles.metrics.classification import SlideAUC, roc_auc, roc_curve, slide_auc
from pathbundles.metrics.froc import (FP_RATES, FROCResult, LesionMask, SlideHits, evaluation_mask,
                                      evaluation_mask_from_annotations, froc, interpolate_sensitivity, slide_hits)
from pathbundles.metrics.mitosis import (DetectionCounts, PrecisionRecallCurve, best_threshold, match_points,
                                         mitosis_counts, mitosis_f1, precision_recall_curve)
from pathbundles.metrics.segmentation import SegmentationScores, confusion_matrix, segmentation_scores

__all__ = [
    "FP_RATES", "DetectionCounts", "FROCResult", "LesionMask", "PrecisionRecallCurve", "SegmentationScores",
    "SlideAUC", "SlideHits", "best_threshold", "confusion_matrix", "evaluation_mask",
    "evaluation_mask_from_annotations", "froc", "interpolate_sensitivity", "match_points", "mitosis_counts",
    "mitosis_f1", "precision_recall_curve", "roc_auc", "roc_curve", "segmentation_scores", "slide_auc",
    "slide_hits",
]
