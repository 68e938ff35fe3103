"""Metric commands on files in the challenges' own formats; ``python -m pathbundles froc|mitosis_f1|iou`` call these.

Each command writes its result as JSON to ``out`` (atomically) and returns the same dict. The functions can also be
instantiated from a bundle config (``"_target_": "pathbundles.metrics.commands.froc_command"``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pathbundles.atomic import atomic_path
from pathbundles.errors import InputError
from pathbundles.tissue import read_mask_image

_MASK_SUFFIXES = (".png", ".tif", ".tiff")


def _folder(path: str | os.PathLike, what: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(folder, f"{what} must be a folder")
    return folder


def _by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Files of ``folder`` with one of ``suffixes`` (case-insensitive), by stem; two files sharing a stem fail."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in suffixes or path.name.startswith("."):
            continue
        if path.stem in found:
            raise InputError(path, f"two files for '{path.stem}': {found[path.stem].name} and {path.name}")
        found[path.stem] = path
    return found


def _paired(truth: dict[str, Path], other: dict[str, Path], truth_dir: Path, other_dir: Path) -> list[str]:
    """Stems present in both folders; a file without its partner is an error naming it."""
    for stem, path in sorted(other.items()):
        if stem not in truth:
            raise InputError(path, f"no ground truth '{stem}' with the same stem in {truth_dir}")
    for stem, path in sorted(truth.items()):
        if stem not in other:
            raise InputError(path, f"no file '{stem}' with the same stem in {other_dir}")
    return sorted(truth)


def _write_json(out: str | os.PathLike, result: dict) -> dict:
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return result


def froc_command(masks: str | os.PathLike, detections: str | os.PathLike, out: str | os.PathLike,
                 level0_mpp: float = 0.243, mask_downsample: float = 32) -> dict:
    """Camelyon16 FROC of a folder of detection CSVs against a folder of ground-truth tumour masks.

    Args:
        masks: folder of ``<slide>.png|.tif`` tumour masks (tumour > 0) at ``mask_downsample`` from level 0.
        detections: folder of ``<slide>.csv`` files, no header, rows ``prob,x,y`` in level-0 pixels.
        out: JSON file to write.
        level0_mpp: micrometres per level-0 pixel.
        mask_downsample: level-0 pixels per mask pixel.

    A CSV without a mask is a normal slide; a mask without a CSV is a slide with no detections.

    Returns:
        ``{"froc", "sensitivity": {"0.25", "0.5", "1", "2", "4", "8"}, "n_slides", "n_lesions", "n_itc"}``.
    """
    from pathbundles.metrics.froc import evaluation_mask, froc, slide_hits
    from pathbundles.writers import read_detections_csv

    mask_dir, detection_dir = _folder(masks, "masks"), _folder(detections, "detections")
    mask_files = _by_stem(mask_dir, _MASK_SUFFIXES)
    csv_files = _by_stem(detection_dir, (".csv",))
    slides = []
    for stem in sorted(set(mask_files) | set(csv_files)):
        lesions = None
        if stem in mask_files:
            lesions = evaluation_mask(read_mask_image(mask_files[stem], allow_colour=True), level0_mpp=level0_mpp,
                                      mask_downsample=mask_downsample)
        found = read_detections_csv(csv_files[stem]) if stem in csv_files else np.zeros((0, 3))
        slides.append(slide_hits(found, lesions))
    if not slides:
        raise InputError(detection_dir, f"no detection CSVs here and no masks in {mask_dir}")
    if sum(len(s.lesion_scores) for s in slides) == 0:
        raise InputError(mask_dir, "no lesion other than isolated tumour cells in any mask: sensitivity is undefined")
    return _write_json(out, froc(slides).as_dict())


def mitosis_f1_command(truth: str | os.PathLike, detections: str | os.PathLike, out: str | os.PathLike,
                       radius_px: float = 30.0, score_threshold: float = 0.0) -> dict:
    """Pooled mitosis precision, recall and F1 over images, one CSV per image in each folder (same stem).

    Args:
        truth: folder of ``<image>.csv`` ground-truth centroids, rows ``x,y``.
        detections: folder of ``<image>.csv`` detections, rows ``x,y,score``.
        out: JSON file to write.
        radius_px: matching radius in pixels (30 px = 7.5 um at 0.25 um/px; 20 px for MITOS 2012).
        score_threshold: detections scoring below this are dropped (choose it on validation data, not on test).

    Returns:
        ``{"precision", "recall", "f1", "tp", "fp", "fn"}``.
    """
    from pathbundles.annotations import read_points_csv
    from pathbundles.metrics.mitosis import mitosis_f1

    truth_dir, detection_dir = _folder(truth, "truth"), _folder(detections, "detections")
    truth_files, detection_files = _by_stem(truth_dir, (".csv",)), _by_stem(detection_dir, (".csv",))
    images = []
    for stem in _paired(truth_files, detection_files, truth_dir, detection_dir):
        truth_xy, extra = read_points_csv(truth_files[stem], "xy")
        if extra is not None:
            raise InputError(truth_files[stem], "ground truth rows must be 'x,y' (two columns), found three")
        detection_xy, scores = read_points_csv(detection_files[stem], "xy")
        if scores is None and len(detection_xy):
            raise InputError(detection_files[stem], "detection rows must be 'x,y,score' (three columns), found two")
        images.append((truth_xy, detection_xy, scores))
    if not images:
        raise InputError(truth_dir, "no ground-truth CSVs found")
    return _write_json(out, mitosis_f1(images, radius_px=radius_px, score_threshold=score_threshold).as_dict())


def iou_command(truth: str | os.PathLike, pred: str | os.PathLike, out: str | os.PathLike, num_classes: int) -> dict:
    """Per-class IoU, recall, precision and mean IoU of PNG label maps (same stem), over annotated pixels.

    Args:
        truth: folder of ``<image>.png`` ground-truth label maps, 0 = unannotated, 1..C = classes.
        pred: folder of ``<image>.png`` predicted label maps in 0..C.
        out: JSON file to write.
        num_classes: C, the number of real classes.

    Returns:
        ``{"iou": {"1": f, ...}, "mean_iou": f, "recall": {...}, "precision": {...}}``; undefined values are null.
    """
    from pathbundles.metrics.segmentation import SegmentationScores, confusion_matrix

    num_classes = int(num_classes)
    truth_dir, pred_dir = _folder(truth, "truth"), _folder(pred, "pred")
    truth_files, pred_files = _by_stem(truth_dir, (".png",)), _by_stem(pred_dir, (".png",))
    stems = _paired(truth_files, pred_files, truth_dir, pred_dir)
    if not stems:
        raise InputError(truth_dir, "no ground-truth PNG label maps found")
    total = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    for stem in stems:
        truth_map = read_mask_image(truth_files[stem])
        pred_map = read_mask_image(pred_files[stem])
        if truth_map.shape != pred_map.shape:
            raise InputError(pred_files[stem], f"shape {pred_map.shape} differs from the ground truth's "
                                               f"{truth_map.shape} ({truth_files[stem]})")
        for path, labels in ((truth_files[stem], truth_map), (pred_files[stem], pred_map)):
            if labels.size and int(labels.max()) > num_classes:
                raise InputError(path, f"label {int(labels.max())} is outside 0..{num_classes} (num_classes)")
        total += confusion_matrix(truth_map, pred_map, num_classes)
    return _write_json(out, SegmentationScores(total).as_dict())
