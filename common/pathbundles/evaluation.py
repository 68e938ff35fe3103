"""Evaluation of a whole-slide detection run (scannet, spatial_lstm): Camelyon16 FROC and slide AUC over the
outputs a :class:`pathbundles.slide_inference.SlideMapWriter` wrote, as an ignite handler for ``evaluate.json``."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pathbundles.metrics.froc import CAMELYON16_EXCLUDED_SLIDES, exclusion_set
from pathbundles.outputs import slide_name
from pathbundles.slide_inference import SlideMapWriter

logger = logging.getLogger(__name__)


def ground_truth_lesions(item: dict, level0_size: tuple[int, int], level0_mpp: float, mask_mpp: float) -> Any:
    """The Camelyon16 evaluation mask of a datalist item, or ``None`` for a normal slide.

    Ground truth comes from ``annotation`` (ASAP XML, NCRF JSON or GeoJSON, rasterised at ``mask_mpp``) or from
    ``mask`` (a tumour mask image over the whole slide; its downsample is level-0 width / mask width). An item
    with neither is a normal slide.

    Args:
        item: datalist item.
        level0_size: the slide's level-0 (width, height) in pixels.
        level0_mpp: micrometres per level-0 pixel.
        mask_mpp: micrometres per pixel of the evaluation mask built from polygons (Camelyon16: 32 x 0.243).
    """
    from pathbundles.metrics.froc import evaluation_mask, evaluation_mask_from_annotations
    from pathbundles.tissue import read_mask_image

    if item.get("annotation"):
        return evaluation_mask_from_annotations(item["annotation"], level0_size, level0_mpp=level0_mpp,
                                                mask_downsample=mask_mpp / level0_mpp)
    if item.get("mask"):
        mask = read_mask_image(item["mask"], allow_colour=True)
        return evaluation_mask(mask, level0_mpp=level0_mpp, mask_downsample=level0_size[0] / mask.shape[1])
    return None


class DetectionMetricsReport:
    """Ignite handler: after the writer has finished every slide, compute FROC (with its curve) and slide ROC AUC
    (with a bootstrap 95% interval) and write ``metrics.json``, ``froc.png`` and ``roc.png`` into ``output_dir``.

    The scalars ``froc`` and ``slide_auc`` also go into ``engine.state.metrics``, where MONAI's MLflow handler
    picks them up when tracking is on. Slides are labelled by the datalist item's ``label`` (1 tumour, 0
    normal), or by whether it has ground-truth lesions when it has no label.

    Args:
        writer: the run's ``SlideMapWriter`` (its slide plans, scores and detection files).
        datalist: the items the run scanned, with ``annotation`` / ``mask`` / ``label``.
        output_dir: folder for the report.
        mask_mpp: resolution of evaluation masks built from polygons (um/px).
        n_bootstrap: bootstrap resamples for the AUC interval.
        exclude_slides: slide names left out of FROC and AUC (without case), by default the Camelyon16
            organisers' Test_049 and Test_114; ``metrics.json`` lists those left out under ``"excluded_slides"``.
    """

    def __init__(self, writer: SlideMapWriter, datalist: Sequence[dict], output_dir: str | os.PathLike,
                 mask_mpp: float = 8.0, n_bootstrap: int = 1000,
                 exclude_slides: str | Sequence[str] | None = CAMELYON16_EXCLUDED_SLIDES) -> None:
        self.writer, self.datalist, self.output_dir = writer, list(datalist), Path(output_dir)
        self.mask_mpp, self.n_bootstrap = mask_mpp, n_bootstrap
        self.excluded = exclusion_set(exclude_slides)
        self.report: dict | None = None

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Any = None) -> dict:
        from pathbundles.metrics.classification import roc_curve
        from pathbundles.metrics.handlers import FROCMetric, SlideAUCMetric, write_report
        from pathbundles.tracking import write_curves
        from pathbundles.writers import read_detections_csv

        items = {slide_name(item)[0]: item for item in self.datalist}
        froc_metric, auc_metric = FROCMetric(), SlideAUCMetric(n_bootstrap=self.n_bootstrap)
        froc_metric.reset()
        auc_metric.reset()
        labels, scores, left_out = [], [], []
        for plan in self.writer.dataset.plans:
            if plan.name not in self.writer.scores:
                continue  # failed slides are reported by the writer
            if plan.name.lower() in self.excluded:
                left_out.append(plan.name)
                continue
            item = items[plan.name]
            lesions = ground_truth_lesions(item, plan.level0_size, plan.level0_mpp, self.mask_mpp)
            detections = read_detections_csv(self.writer.outputs(plan.name)["detections"])
            froc_metric.update(([detections], [lesions]))
            label = item.get("label")
            label = int(lesions is not None and len(lesions.lesion_labels) > 0) if label is None else int(label)
            labels.append(label)
            scores.append(self.writer.scores[plan.name][0])
        auc_metric.update((scores, labels))
        scalars = {"froc": float(froc_metric.compute()), "slide_auc": float(auc_metric.compute())}
        if left_out:
            logger.info("left out of FROC and AUC (exclusion list): %s", ", ".join(left_out))
        self.report = write_report(self.output_dir, scalars, {"froc": froc_metric, "slide_auc": auc_metric},
                                   weights=self.writer.weights_record(), extra={"excluded_slides": left_out})
        fpr, tpr, _ = roc_curve(np.asarray(labels), np.asarray(scores))
        write_curves(self.output_dir, fp_per_slide=froc_metric.result.fp_per_slide,
                     sensitivity=froc_metric.result.sensitivity, fpr=fpr, tpr=tpr)
        if engine is not None:
            engine.state.metrics.update(scalars)
        logger.info("FROC %.4f, slide AUC %.4f -> %s", scalars["froc"], scalars["slide_auc"],
                    self.output_dir / "metrics.json")
        return self.report
