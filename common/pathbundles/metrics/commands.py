"""Metric commands on files in the challenges' own formats; ``python -m pathbundles froc|mitosis_f1|iou`` call these.

Each command writes its result as JSON to ``out`` (atomically) and returns the same dict. The functions can also be
instantiated from a bundle config (``"_target_": "pathbundles.metrics.commands.froc_command"``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pathbundles.atomic import atomic_path
from pathbundles.errors import InputError
from pathbundles.metrics.froc import (CAMELYON16_EXCLUDED_SLIDES, evaluation_mask, exclusion_set, froc,
                                      slide_hits)
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


def _paired(truth: dict[str, Path], other: dict[str, Path], truth_dir: Path, other_dir: Path,
            other_alone: bool = False) -> tuple[list[str], list[str]]:
    """Match the files of two folders by stem: ``(stems in both, stems only in other)``, each sorted.

    A file of ``other`` without ground truth is an error unless ``other_alone`` (FROC: a detection CSV without a
    mask is a normal slide), and so is a ground-truth file without its partner. The error names the file, the other
    folder and that folder's files without a partner; names must match exactly, and one that differs only in case
    is pointed out.
    """
    truth_alone, alone = sorted(set(truth) - set(other)), sorted(set(other) - set(truth))

    def missing(path: Path, stem: str, where: Path, unmatched: list[str], files: dict[str, Path],
                what: str) -> InputError:
        near = [files[s].name for s in unmatched if s.lower() == stem.lower()]
        if near:
            hint = f" ({near[0]} differs only in case: names must match exactly)"
        elif unmatched:
            listed = ", ".join(files[s].name for s in unmatched[:3]) + (", ..." if len(unmatched) > 3 else "")
            hint = f" (files there without a partner: {listed})"
        else:
            hint = ""
        return InputError(path, f"no {what} '{stem}' with the same stem in {where}{hint}")

    if alone and not other_alone:
        raise missing(other[alone[0]], alone[0], truth_dir, truth_alone, truth, "ground truth")
    if truth_alone:
        raise missing(truth[truth_alone[0]], truth_alone[0], other_dir, alone, other, "file")
    return sorted(truth), alone


def _write_json(out: str | os.PathLike, result: dict) -> dict:
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return result


def froc_command(masks: str | os.PathLike, detections: str | os.PathLike, out: str | os.PathLike,
                 level0_mpp: float = 0.243, mask_downsample: float = 32,
                 exclude_slides: str | Sequence[str] | None = CAMELYON16_EXCLUDED_SLIDES) -> dict:
    """Camelyon16 FROC of a folder of detection CSVs against a folder of ground-truth tumour masks.

    Args:
        masks: folder of ``<slide>.png|.tif`` tumour masks (tumour > 0) at ``mask_downsample`` from level 0.
        detections: folder of ``<slide>.csv`` files, no header, rows ``prob,x,y`` in level-0 pixels.
        out: JSON file to write.
        level0_mpp: micrometres per level-0 pixel.
        mask_downsample: level-0 pixels per mask pixel.
        exclude_slides: slide names left out (their mask and CSV both), compared without case; by default the
            organisers' Test_049 and Test_114; a comma-separated string or "" for none.

    A CSV without a mask is a normal slide. A mask without a CSV is an error naming both (a detector that found
    nothing writes an empty CSV), so that names differing only in case never score as missed lesions.

    Returns:
        ``{"froc", "sensitivity": {"0.25", "0.5", "1", "2", "4", "8"}, "n_slides", "n_lesions", "n_itc",
        "excluded_slides"}`` (the names found here and left out).
    """
    from pathbundles.writers import read_detections_csv

    mask_dir, detection_dir = _folder(masks, "masks"), _folder(detections, "detections")
    excluded = exclusion_set(exclude_slides)
    mask_files = _by_stem(mask_dir, _MASK_SUFFIXES)
    csv_files = _by_stem(detection_dir, (".csv",))
    left_out = sorted({stem for stem in (*mask_files, *csv_files) if stem.lower() in excluded})
    mask_files = {stem: path for stem, path in mask_files.items() if stem not in left_out}
    csv_files = {stem: path for stem, path in csv_files.items() if stem not in left_out}
    tumour, normal = _paired(mask_files, csv_files, mask_dir, detection_dir, other_alone=True)
    slides = []
    for stem in sorted(tumour + normal):
        lesions = None
        if stem in mask_files:
            lesions = evaluation_mask(read_mask_image(mask_files[stem], allow_colour=True), level0_mpp=level0_mpp,
                                      mask_downsample=mask_downsample)
        slides.append(slide_hits(read_detections_csv(csv_files[stem]), lesions))
    if not slides:
        raise InputError(detection_dir, f"no detection CSVs here and no masks in {mask_dir}")
    if sum(len(s.lesion_scores) for s in slides) == 0:
        raise InputError(mask_dir, "no lesion other than isolated tumour cells in any mask: sensitivity is undefined")
    return _write_json(out, {**froc(slides).as_dict(), "excluded_slides": left_out})


def mitosis_f1_command(truth: str | os.PathLike, detections: str | os.PathLike, out: str | os.PathLike,
                       radius_px: float = 30.0, score_threshold: float = 0.0, matching: str = "optimal") -> dict:
    """Pooled mitosis precision, recall and F1 over images, one CSV per image in each folder (same stem).

    Args:
        truth: folder of ``<image>.csv`` ground-truth centroids, rows ``x,y``.
        detections: folder of ``<image>.csv`` detections, rows ``x,y,score`` with score a probability in [0, 1]
            (a score outside it, as a Camelyon16 ``probability,x,y`` row gives, is an error naming the file).
        out: JSON file to write.
        radius_px: matching radius in pixels (30 px = 7.5 um at 0.25 um/px; 20 px for MITOS 2012).
        score_threshold: detections scoring below this are dropped, in [0, 1] (choose it on validation data, not on
            test).
        matching: ``"optimal"`` (maximum one-to-one matching, distance <= radius) or ``"greedy"`` (the challenge
            scorers' and the SegMitos authors' ``cal_F.py``: rows in file order, nearest free mitosis at distance
            < radius; use it to compare with published F-scores).

    Returns:
        ``{"precision", "recall", "f1", "tp", "fp", "fn", "matching"}``; with no ground-truth mitosis and no detection F1 is
        undefined: ``"f1": null`` and ``"f1_undefined"`` says why.
    """
    from pathbundles.annotations import read_points_csv
    from pathbundles.checks import out_of_unit_range, probability
    from pathbundles.metrics.mitosis import check_matching, mitosis_f1

    check_matching(matching)
    score_threshold = probability(score_threshold, "score_threshold")
    truth_dir, detection_dir = _folder(truth, "truth"), _folder(detections, "detections")
    truth_files, detection_files = _by_stem(truth_dir, (".csv",)), _by_stem(detection_dir, (".csv",))
    images = []
    for stem in _paired(truth_files, detection_files, truth_dir, detection_dir)[0]:
        truth_xy, extra = read_points_csv(truth_files[stem], "xy")
        if extra is not None:
            raise InputError(truth_files[stem], "ground truth rows must be 'x,y' (two columns), found three")
        detection_xy, scores = read_points_csv(detection_files[stem], "xy")
        if scores is None and len(detection_xy):
            raise InputError(detection_files[stem], "detection rows must be 'x,y,score' (three columns), found two")
        bad = out_of_unit_range(scores) if scores is not None else []
        if len(bad):
            k = int(bad[0])
            camelyon = bool(((detection_xy[:, 0] >= 0) & (detection_xy[:, 0] <= 1)).all())
            raise InputError(detection_files[stem], f"detection {k + 1} (x={detection_xy[k, 0]:g}, "
                                                    f"y={detection_xy[k, 1]:g}, score={scores[k]:g}): the score is "
                                                    "not a probability in [0, 1]; rows must be 'x,y,score'"
                                                    + ("; these look like Camelyon16 'probability,x,y' rows"
                                                       if camelyon else ""))
        images.append((truth_xy, detection_xy, scores))
    if not images:
        raise InputError(truth_dir, "no ground-truth CSVs found")
    counts = mitosis_f1(images, radius_px=radius_px, score_threshold=score_threshold, matching=matching)
    return _write_json(out, {**counts.as_dict(), "matching": matching})


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
    stems = _paired(truth_files, pred_files, truth_dir, pred_dir)[0]
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
