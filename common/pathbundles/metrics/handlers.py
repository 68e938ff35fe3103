"""MONAI/ignite wrappers of the metrics, for ``evaluate.json``: ignite ``Metric`` classes and a report handler.

The metrics accumulate what an evaluator's output transform hands them, and compute with the numpy functions of
:mod:`pathbundles.metrics`, so a config and a script get the same numbers. ``compute()`` returns the scalar that
MONAI's ``key_val_metric`` compares (FROC score, AUC, F1, mean IoU); the full result (per-rate sensitivities,
interval, counts, per-class scores) is on ``.result`` after ``compute()``, and ``MetricsReport`` writes it with the
plots. Output transforms return ``(y_pred, y)``; a Python list or tuple in either place is a batch of items.

Example ``evaluate.json`` fragment::

    "key_val_metric": {"froc": {"_target_": "pathbundles.metrics.handlers.FROCMetric",
                                "output_transform": "$monai.handlers.from_engine(['detections', 'tumour_mask'])",
                                "level0_mpp": 0.243, "mask_downsample": 32}},
    "val_handlers": [{"_target_": "pathbundles.metrics.handlers.MetricsReport", "output_dir": "@output_dir"}]

This module imports torch and ignite; the numpy metrics never do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric

from pathbundles.atomic import atomic_path
from pathbundles.checks import flag
from pathbundles.metrics import plots
from pathbundles.metrics.classification import SlideAUC, roc_curve, slide_auc
from pathbundles.metrics.froc import FROCResult, LesionMask, evaluation_mask, froc, slide_hits
from pathbundles.metrics.mitosis import DetectionCounts, check_matching, mitosis_f1
from pathbundles.metrics.segmentation import SegmentationScores, confusion_matrix

#: Attribute of ``engine.state`` where the metrics below register themselves for ``MetricsReport``.
REPORT_STATE = "pathbundles_metrics"


def _numpy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return value


def _items(value: Any) -> list:
    """A Python list/tuple is a batch; anything else (array, tensor, mask object, None) is one item."""
    return [_numpy(v) for v in value] if isinstance(value, (list, tuple)) else [_numpy(value)]


class _ReportedMetric(Metric):
    """An ignite metric that keeps its full result and registers itself on the engine for ``MetricsReport``."""

    result: Any = None
    #: file name (without .png) of this metric's plot in a report; None = no plot.
    plot_kind: str | None = None

    def __init__(self, output_transform: Callable = lambda x: x) -> None:
        super().__init__(output_transform=output_transform, skip_unrolling=True)

    def completed(self, engine: Engine, name: str) -> None:
        super().completed(engine, name)
        if not hasattr(engine.state, REPORT_STATE):
            setattr(engine.state, REPORT_STATE, {})
        getattr(engine.state, REPORT_STATE)[name] = self

    def details(self) -> dict:
        """JSON-ready full result (after ``compute()``)."""
        raise NotImplementedError

    def plot(self, path: Path) -> Path:
        """Write this metric's plot (after ``compute()``) as PNG ``path``."""
        raise NotImplementedError


class FROCMetric(_ReportedMetric):
    """Camelyon16 FROC over slides (ignite metric). Each item: ``y_pred`` = (N, 3) detections [score, x, y] in
    level-0 pixels; ``y`` = a ``LesionMask``, a tumour mask at ``mask_downsample`` (tumour > 0), or None for a
    normal slide.

    Args:
        level0_mpp: micrometres per level-0 pixel, used to build lesion masks from tumour masks.
        mask_downsample: level-0 pixels per tumour-mask pixel.
        output_transform: engine output -> (y_pred, y).
    """

    plot_kind = "froc"

    def __init__(self, level0_mpp: float = 0.243, mask_downsample: float = 32.0,
                 output_transform: Callable = lambda x: x) -> None:
        self.level0_mpp = level0_mpp
        self.mask_downsample = mask_downsample
        super().__init__(output_transform)

    def reset(self) -> None:
        self._slides = []

    def update(self, output: Sequence[Any]) -> None:
        detections, truth = output
        for found, lesions in zip(_items(detections), _items(truth), strict=True):
            if lesions is not None and not isinstance(lesions, LesionMask):
                lesions = evaluation_mask(np.squeeze(lesions), self.level0_mpp, self.mask_downsample)
            self._slides.append(slide_hits(found, lesions))

    def compute(self) -> float:
        self.result: FROCResult = froc(self._slides)
        return self.result.score

    def details(self) -> dict:
        return self.result.as_dict()

    def plot(self, path: Path) -> Path:
        r = self.result
        return plots.plot_froc(r.fp_per_slide, r.sensitivity, path, r.fp_rates, r.sensitivities)


class SlideAUCMetric(_ReportedMetric):
    """Slide-classification ROC AUC with a bootstrap interval (ignite metric). ``y_pred`` = slide scores,
    ``y`` = labels (1 = tumour, 0 = normal), each a number, an array or a list of them.

    Args:
        n_bootstrap, confidence, seed: as in ``slide_auc``.
        output_transform: engine output -> (y_pred, y).
    """

    plot_kind = "roc"

    def __init__(self, n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0,
                 output_transform: Callable = lambda x: x) -> None:
        self.n_bootstrap, self.confidence, self.seed = n_bootstrap, confidence, seed
        super().__init__(output_transform)

    def reset(self) -> None:
        self._scores: list[float] = []
        self._labels: list[int] = []

    def update(self, output: Sequence[Any]) -> None:
        scores, labels = output
        self._scores.extend(float(s) for item in _items(scores) for s in np.ravel(item))
        self._labels.extend(int(v) for item in _items(labels) for v in np.ravel(item))

    def compute(self) -> float:
        self.result: SlideAUC = slide_auc(np.asarray(self._labels), np.asarray(self._scores), self.n_bootstrap,
                                          self.confidence, self.seed)
        return self.result.auc

    def details(self) -> dict:
        return self.result.as_dict()

    def plot(self, path: Path) -> Path:
        fpr, tpr, _ = roc_curve(np.asarray(self._labels), np.asarray(self._scores))
        return plots.plot_roc(fpr, tpr, path, self.result.auc, (self.result.ci_low, self.result.ci_high))


class MitosisF1Metric(_ReportedMetric):
    """Pooled mitosis F1 over images (ignite metric). ``y_pred`` = (N, 3) detections [x, y, score] (or (N, 2)
    [x, y]) in pixels, ``y`` = (M, 2) ground-truth [x, y].

    Args:
        radius_px: matching radius in pixels.
        score_threshold: detections scoring below this are dropped (choose it on validation data).
        matching: ``"optimal"`` or ``"greedy"`` (the challenge scorers'; ``pathbundles.metrics.mitosis``).
        output_transform: engine output -> (y_pred, y).
    """

    def __init__(self, radius_px: float = 30.0, score_threshold: float = 0.0, matching: str = "optimal",
                 output_transform: Callable = lambda x: x) -> None:
        self.radius_px, self.score_threshold = radius_px, score_threshold
        self.matching = check_matching(matching)
        super().__init__(output_transform)

    def reset(self) -> None:
        self._images: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []

    def update(self, output: Sequence[Any]) -> None:
        detections, truth = output
        for found, truth_xy in zip(_items(detections), _items(truth), strict=True):
            found = np.asarray(found, dtype=np.float64).reshape(-1, np.shape(found)[-1] if np.size(found) else 3)
            scores = found[:, 2] if found.shape[1] == 3 else None
            self._images.append((np.asarray(truth_xy, dtype=np.float64).reshape(-1, 2), found[:, :2], scores))

    def compute(self) -> float:
        self.result: DetectionCounts = mitosis_f1(self._images, radius_px=self.radius_px,
                                                  score_threshold=self.score_threshold, matching=self.matching)
        return self.result.f1

    def details(self) -> dict:
        return self.result.as_dict()


class MeanIoUMetric(_ReportedMetric):
    """Mean IoU over annotated pixels (ignite metric). ``y_pred`` = predicted label maps (H, W) in 0..C, or class
    scores (C + 1, H, W) / (B, C + 1, H, W) that are arg-maxed; ``y`` = ground-truth label maps, 0 = unannotated.

    Args:
        num_classes: C, the number of real classes (labels 1..C).
        output_transform: engine output -> (y_pred, y).
    """

    plot_kind = "confusion"

    def __init__(self, num_classes: int, output_transform: Callable = lambda x: x) -> None:
        self.num_classes = int(num_classes)
        super().__init__(output_transform)

    def reset(self) -> None:
        self._confusion = np.zeros((self.num_classes + 1, self.num_classes + 1), dtype=np.int64)

    def _label_maps(self, value: Any, truth: bool) -> list[np.ndarray]:
        maps = []
        for item in _items(value):
            item = np.asarray(item)
            if not truth and item.ndim >= 3 and item.shape[-3] == self.num_classes + 1:
                item = item.argmax(axis=-3)  # class scores -> labels
            maps.extend(item.reshape(-1, *item.shape[-2:]))
        return maps

    def update(self, output: Sequence[Any]) -> None:
        pred, truth = output
        for p, t in zip(self._label_maps(pred, False), self._label_maps(truth, True), strict=True):
            self._confusion += confusion_matrix(t, p, self.num_classes)

    def compute(self) -> float:
        self.result = SegmentationScores(self._confusion.copy())
        return self.result.mean_iou

    def details(self) -> dict:
        return self.result.as_dict()

    def plot(self, path: Path) -> Path:
        names = ["none"] + [str(c) for c in range(1, self.num_classes + 1)]
        return plots.plot_confusion_matrix(self.result.confusion, path, names)


class MetricsReport:
    """Ignite handler: when the engine completes, write ``metrics.json`` and each metric's plots.

    ``metrics.json`` holds the scalars of ``engine.state.metrics`` under ``"metrics"`` and, for the metrics of
    this module, their full results under ``"details"``. Plots are ``froc.png``, ``roc.png`` and
    ``confusion.png``; a second metric of the same kind gets its name in front (``<name>_roc.png``).

    Args:
        output_dir: folder for ``metrics.json`` and the PNGs.
        plot: whether to draw the plots.
    """

    def __init__(self, output_dir: str | os.PathLike, plot: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.plot = flag(plot, "plot")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> dict:
        reported: dict[str, _ReportedMetric] = getattr(engine.state, REPORT_STATE, {})
        scalars = {k: float(v) for k, v in engine.state.metrics.items() if np.isscalar(v) or np.ndim(v) == 0}
        return write_report(self.output_dir, scalars, reported, self.plot)


def write_report(output_dir: str | os.PathLike, scalars: dict[str, float],
                 reported: dict[str, _ReportedMetric], plot: bool = True, weights: dict | None = None,
                 extra: dict | None = None) -> dict:
    """Write ``metrics.json`` (scalars plus each reported metric's details, ``weights``: the weights measured,
    :meth:`pathbundles.weights.WeightsIdentity.record`, when given, and ``extra`` fields such as the slides an
    exclusion list left out) and the plots; return the JSON dict."""
    directory = Path(output_dir)
    report = {"metrics": {k: (None if np.isnan(v) else v) for k, v in scalars.items()},
              "details": {name: metric.details() for name, metric in reported.items()},
              **({"weights": dict(weights)} if weights else {}), **(extra or {})}
    if plot:
        written: list[str] = []
        for name, metric in reported.items():
            if metric.plot_kind is None:
                continue
            file_name = f"{metric.plot_kind}.png"
            if file_name in written:
                file_name = f"{name}_{file_name}"
            metric.plot(directory / file_name)
            written.append(file_name)
        report["plots"] = written
    with atomic_path(directory / "metrics.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return report
