"""Slide classification: ROC curve, ROC AUC (Mann-Whitney, ties count one half) and a bootstrap 95% interval."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata


def _labels_scores(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"labels and scores differ in length: {labels.shape[0]} and {scores.shape[0]}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (tumour)")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    labels = labels.astype(bool)
    if labels.all() or not labels.any():
        raise ValueError("ROC AUC needs both tumour (1) and normal (0) slides")
    return labels, scores


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a tumour slide > score of a normal slide) + 0.5 P(equal).

    Args:
        labels: (N,) 1 = tumour slide, 0 = normal slide.
        scores: (N,) slide scores (e.g. the maximum of the probability map).
    """
    labels, scores = _labels_scores(labels, scores)
    return float(_auc_from_ranks(labels[None, :], scores[None, :])[0])


def _auc_from_ranks(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Row-wise Mann-Whitney AUC of (B, N) arrays; average ranks give ties half credit."""
    ranks = rankdata(scores, axis=1)
    n_pos = labels.sum(axis=1)
    n_neg = labels.shape[1] - n_pos
    rank_sum = (ranks * labels).sum(axis=1)
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve over every distinct score (slides with equal scores enter together).

    Returns:
        (fpr, tpr, thresholds): thresholds descending, the first +inf (the point (0, 0)); a slide is called tumour
        when its score >= threshold.
    """
    labels, scores = _labels_scores(labels, scores)
    thresholds = np.concatenate([[np.inf], np.unique(scores)[::-1]])
    pos, neg = np.sort(scores[labels]), np.sort(scores[~labels])
    tpr = (len(pos) - np.searchsorted(pos, thresholds, side="left")) / len(pos)
    fpr = (len(neg) - np.searchsorted(neg, thresholds, side="left")) / len(neg)
    return fpr, tpr, thresholds


@dataclass(frozen=True)
class SlideAUC:
    """Slide-level ROC AUC with its bootstrap confidence interval.

    Args:
        auc: ROC AUC on all slides.
        ci_low, ci_high: percentile bootstrap interval (``confidence``, 95% by default).
        n_tumour, n_normal: slides of each class.
        n_bootstrap: resamples drawn.
    """

    auc: float
    ci_low: float
    ci_high: float
    n_tumour: int
    n_normal: int
    n_bootstrap: int
    confidence: float = 0.95

    def as_dict(self) -> dict:
        """Plain-JSON form."""
        return {"auc": self.auc, "ci_low": self.ci_low, "ci_high": self.ci_high, "confidence": self.confidence,
                "n_tumour": self.n_tumour, "n_normal": self.n_normal, "n_bootstrap": self.n_bootstrap}


def slide_auc(labels: np.ndarray, scores: np.ndarray, n_bootstrap: int = 1000, confidence: float = 0.95,
              seed: int = 0) -> SlideAUC:
    """ROC AUC of slide scores with a stratified percentile-bootstrap confidence interval.

    Each resample draws tumour and normal slides separately with replacement, keeping both class counts, so a
    resample never lacks a class and none has to be skipped.

    Args:
        labels: (N,) 1 = tumour slide, 0 = normal slide.
        scores: (N,) slide scores.
        n_bootstrap: number of resamples (0 = no interval: both bounds equal the AUC).
        confidence: coverage of the interval.
        seed: seed of the resampling generator (the interval is reproducible).
    """
    labels, scores = _labels_scores(labels, scores)
    auc = roc_auc(labels, scores)
    pos, neg = scores[labels], scores[~labels]
    low = high = auc
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        resampled = np.concatenate([rng.choice(pos, size=(n_bootstrap, len(pos))),
                                    rng.choice(neg, size=(n_bootstrap, len(neg)))], axis=1)
        resampled_labels = np.zeros(resampled.shape, dtype=bool)
        resampled_labels[:, :len(pos)] = True
        aucs = _auc_from_ranks(resampled_labels, resampled)
        alpha = (1.0 - confidence) / 2.0
        low, high = (float(v) for v in np.quantile(aucs, [alpha, 1.0 - alpha]))
    return SlideAUC(auc=auc, ci_low=low, ci_high=high, n_tumour=int(labels.sum()), n_normal=int((~labels).sum()),
                    n_bootstrap=int(n_bootstrap), confidence=float(confidence))
