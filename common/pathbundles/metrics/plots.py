"""Plots a reviewer asks for: FROC curve, ROC curve, precision-recall curve, confusion matrix, written as PNG files atomically.

matplotlib is imported when a plot is drawn, not on import. Plots are bare ``Figure`` objects rendered by Agg:
no pyplot, no display, no global backend switch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pathbundles.atomic import atomic_path


def _figure(size: tuple[float, float]) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    # A bare Figure (not pyplot) keeps no global state, so plotting from a worker or a handler leaks nothing.
    figure = Figure(figsize=size, dpi=120, layout="constrained")
    return figure, figure.add_subplot()


def _save(figure: Any, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return Path(path)


def plot_froc(fp_per_slide: np.ndarray, sensitivity: np.ndarray, path: str | os.PathLike,
              fp_rates: Sequence[float] = (0.25, 0.5, 1, 2, 4, 8), sensitivities: Sequence[float] | None = None,
              title: str = "FROC") -> Path:
    """FROC curve (sensitivity against mean FP per slide, log x axis) with the evaluation points marked.

    Args:
        fp_per_slide, sensitivity: the curve (e.g. ``FROCResult.fp_per_slide`` and ``.sensitivity``).
        path: PNG to write.
        fp_rates, sensitivities: the interpolated points that make the FROC score, drawn as markers.
    """
    figure, ax = _figure((5.0, 4.0))
    fp = np.asarray(fp_per_slide, dtype=np.float64)
    ax.step(np.maximum(fp, 1e-3), sensitivity, where="post", label="curve")
    if sensitivities is not None:
        score = float(np.mean(sensitivities))
        ax.plot(fp_rates, sensitivities, "o", label=f"FROC score {score:.3f}")
    ax.set_xscale("log")
    ax.set_xlim(1e-2 if fp.max(initial=0) < 1e-2 else min(0.125, fp[fp > 0].min(initial=0.125)),
                max(16.0, fp.max(initial=0) * 1.1))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("mean false positives per slide")
    ax.set_ylabel("sensitivity (non-ITC lesions)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    return _save(figure, path)


def plot_roc(fpr: np.ndarray, tpr: np.ndarray, path: str | os.PathLike, auc: float | None = None,
             ci: tuple[float, float] | None = None, title: str = "Slide classification ROC") -> Path:
    """ROC curve (e.g. from ``roc_curve``) with the AUC and its confidence interval in the legend."""
    figure, ax = _figure((4.5, 4.5))
    label = "ROC" if auc is None else f"AUC {auc:.3f}" + ("" if ci is None else f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})")
    ax.plot(fpr, tpr, drawstyle="default", label=label)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positive rate (normal slides)")
    ax.set_ylabel("true positive rate (tumour slides)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    return _save(figure, path)


def plot_precision_recall(precision: np.ndarray, recall: np.ndarray, path: str | os.PathLike,
                          point: tuple[float, float] | None = None,
                          title: str = "Mitosis detection precision-recall") -> Path:
    """Precision against recall over the detection score threshold, the operating point (precision, recall) marked.

    Args:
        precision, recall: the curve in decreasing-threshold order (e.g. ``PrecisionRecallCurve``).
        path: PNG to write.
        point: the (precision, recall) at the chosen thresholds, drawn with its F1.
    """
    figure, ax = _figure((4.5, 4.5))
    ax.plot(np.concatenate([[0.0], recall]), np.concatenate([[1.0], precision]) if len(precision) else [1.0],
            drawstyle="steps-post", label="curve")
    if point is not None:
        p, r = point
        f1 = 2 * p * r / (p + r) if p + r > 0 else 0.0
        ax.plot([r], [p], "o", label=f"operating point, F1 {f1:.3f}")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left")
    return _save(figure, path)


def plot_confusion_matrix(confusion: np.ndarray, path: str | os.PathLike, class_names: Sequence[str] | None = None,
                          normalise: bool = True, title: str = "Confusion matrix") -> Path:
    """Confusion matrix [truth, prediction] as a heat map, rows normalised to recall by default.

    Args:
        confusion: (K, K) counts, e.g. ``SegmentationScores.confusion``; an all-zero first row (the unannotated
            truth row of a segmentation matrix) is not drawn, its column ("predicted 0") is.
        path: PNG to write.
        class_names: a name per row (defaults to the label numbers).
        normalise: divide each row by its total, so a cell shows the fraction of that true class.
    """
    counts = np.asarray(confusion, dtype=np.float64)
    labels = list(class_names) if class_names is not None else [str(i) for i in range(counts.shape[0])]
    rows = np.arange(counts.shape[0])
    if counts.shape[0] > 1 and not counts[0].any():
        rows = rows[1:]
    shown = counts[rows]
    if normalise:
        totals = shown.sum(axis=1, keepdims=True)
        shown = np.divide(shown, totals, out=np.zeros_like(shown), where=totals > 0)
    size = 1.5 + 0.6 * counts.shape[1]
    figure, ax = _figure((size + 1.0, 1.5 + 0.6 * len(rows)))
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalise else None, aspect="auto")
    for r in range(shown.shape[0]):
        for c in range(shown.shape[1]):
            ax.text(c, r, f"{shown[r, c]:.2f}" if normalise else f"{int(shown[r, c])}", ha="center", va="center",
                    color="white" if shown[r, c] > 0.5 * (shown.max() or 1) else "black", fontsize=8)
    ax.set_xticks(range(counts.shape[1]), labels[:counts.shape[1]])
    ax.set_yticks(range(len(rows)), [labels[r] for r in rows])
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title(title)
    figure.colorbar(image, ax=ax)
    return _save(figure, path)
