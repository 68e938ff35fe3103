"""High-power fields (HPFs) for mitosis detection: reading, training crops, blob detection, threshold tuning, output.

The SegMitos workflow on HPFs (MITOS/AMIDA13/TUPAC16-style images with centroid CSVs):

* :class:`HPFCropDataset` draws random training crops (500 px crops of 2000 px HPFs in the paper) with a chosen
  share of crops holding a mitosis; follow it with :class:`pathbundles.segmitos.RandConcentricLabeld`.
* :func:`detect_mitoses` turns a whole-HPF probability map into ``x, y, score`` detections (Otsu blobs).
* :func:`tune_thresholds` picks the blob score and area thresholds on a VALIDATION set with the shared metrics.
* :func:`write_detections` and :func:`write_circle_overlay_png` write the challenge CSV and a review overlay.

Coordinates are (x, y) = (column, row) in HPF pixels, pixel centres at integers.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from ignite.metrics import Metric
from PIL import Image

from pathbundles.annotations import read_points_csv, write_points_csv
from pathbundles.atomic import atomic_path
from pathbundles.checks import flag, probability
from pathbundles.errors import InputError, PathBundlesError, SlidesFailedError
from pathbundles.outputs import claim_folder, output_file, output_names
from pathbundles.png import write_png
from pathbundles.metrics.mitosis import check_matching, match_points, mitosis_f1
from pathbundles.postprocess import mitosis_blobs
from pathbundles.weights import RecordsWeights, WeightsIdentity, csv_header_and_row
from pathbundles.writers import (legend_panel, overlay_font_px, write_annotated_png, write_detections_asap_xml,
                                 write_detections_geojson)

#: PIL modes that convert to RGB without losing meaning: 8-bit RGB(A), grey (+alpha), palette, bilevel.
_RGB_CONVERTIBLE = {"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1"}
WHITE = 255  # pad value: blank glass, never tissue
_BLANK_PX = 64  # side of the stand-in image of an HPF whose read failed (the writer drops it)
logger = logging.getLogger(__name__)
NEGATIVE_TRIES = 32  # rejection draws for a mitosis-free crop before settling for any crop

#: overlay colours (RGB)
TP_COLOUR, FP_COLOUR, FN_COLOUR, DETECTION_COLOUR = (0, 255, 0), (255, 0, 0), (0, 0, 255), (255, 255, 0)
#: class name of the detections in the GeoJSON and ASAP XML outputs
MITOSIS_CLASS = "Mitosis"


def read_hpf(path: str | os.PathLike) -> np.ndarray:
    """Read an HPF image (PNG, TIFF, JPEG, anything PIL reads) as uint8 (H, W, 3) RGB.

    Grey and palette images are expanded to RGB; an alpha channel is dropped (HPFs are opaque).

    Raises:
        InputError: the file is missing, unreadable, or not an 8-bit RGB/grey image (e.g. 16-bit, CMYK).
    """
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8) if mode in _RGB_CONVERTIBLE else None
    except OSError as err:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise InputError(path, f"cannot read the image ({err})") from None
    if rgb is None:
        raise InputError(path, f"expected an 8-bit RGB or grey image, got PIL mode {mode!r}")
    return rgb


def _check_hpf_mpp(item: dict, mpp_override: float | None, mpp: float) -> None:
    """Refuse an HPF file stated (by its item's ``mpp``, else ``mpp_override``) to be at another resolution than
    the model's ``mpp`` (um/px): HPFs are never resampled silently."""
    from pathbundles.wsi import item_mpp

    stated = item_mpp(item, mpp_override)
    if stated is not None and not math.isclose(float(np.mean(stated)), mpp, rel_tol=0.01):
        raise InputError(item["image"], f"the HPF is at {stated} um/px, the model at {mpp} um/px")


def _image_size(path: str, verify: bool = False) -> tuple[int, int]:
    """(width, height) in px from the header; ``verify`` also checks the file's integrity without decoding it
    (PIL ``verify``: chunk CRCs of a PNG, so a truncated PNG fails here rather than halfway through a run)."""
    try:
        with Image.open(path) as im:
            size = im.size
            if verify:
                im.verify()
            return size
    except (OSError, SyntaxError) as err:  # PIL's verify raises SyntaxError on a broken PNG
        raise InputError(path, f"cannot read the image ({err or type(err).__name__})") from None


def _pixel(xy: np.ndarray) -> np.ndarray:
    """The integer pixel holding each (x, y) position (pixel k covers [k - 0.5, k + 0.5))."""
    return np.floor(xy + 0.5).astype(np.int64)


class HPFCropDataset(torch.utils.data.Dataset):
    """Random square crops of HPFs with their mitosis centroids, a set share of them holding a mitosis.

    Each draw is positive with probability ``positive_fraction`` (when any image has a mitosis): an image with
    mitoses is chosen uniformly, then one of its mitoses, then a crop origin uniformly among those whose crop holds
    that mitosis's pixel. Otherwise it is negative: an image uniformly, then a uniform crop, redrawn up to 32 times
    until it holds no mitosis (a crop as large as a crowded image may hold one anyway). Classes first, as in
    :class:`pathbundles.sampling.ClassBalancedPatchDataset`, so the share holds whatever the images' counts.

    An image smaller than ``crop_px`` on an axis sits at the crop's top/left and is padded with white (blank glass)
    on the bottom/right. Not reflection: a reflected pad would mirror mitotic figures that have no label.

    Items: ``image`` uint8 (3, crop_px, crop_px) tensor; ``centroids`` float32 (M, 2) crop (x, y) of the mitoses
    inside the crop, padded with NaN rows to M = the most mitoses of any image (so items collate); ``n_centroids``
    the number of real rows; ``location`` int64 (x0, y0) HPF pixel of the crop's (0, 0); ``path`` the image.

    ``transform`` (e.g. ``RandConcentricLabeld``, which needs NaN-free centroids) sees the unpadded item, with
    ``centroids`` a float32 (K, 2) tensor; NaN padding comes after it. A spatial transform placed after the label
    is built moves image and label together; one placed before must move ``centroids`` too.

    Random draws use torch's RNG, so ``monai.utils.set_determinism`` makes a run repeatable and every DataLoader
    worker and epoch draws different crops. HPFs are decoded once per process on first use and kept in memory.

    Args:
        data: datalist dicts with ``image`` (HPF path) and ``centroids`` (CSV of mitosis centroids in HPF px).
        crop_px: crop side in px.
        samples_per_epoch: length of the dataset.
        positive_fraction: share of crops that hold at least one mitosis.
        centroid_order: column order of every centroid CSV of this datalist, "xy" or "rc" (AMIDA13/TUPAC16).
        mpp: resolution the crops are meant for, um/px; an HPF at another resolution (its item's ``mpp``, else
            ``mpp_override``) is refused (crops are never resampled).
        transform: dict transform applied to each unpadded item.
        fixed: draw item ``i`` from a generator seeded with ``(seed, i)`` (a fixed validation set).
        seed: seed of ``fixed`` draws.
        mpp_override: the HPF files' resolution, um/px, when their items give none (the bundle's ``slide_mpp``).
    """

    def __init__(self, data: Sequence[dict], crop_px: int = 500, samples_per_epoch: int = 1024,
                 positive_fraction: float = 0.5, *, centroid_order: Literal["xy", "rc"], mpp: float = 0.25,
                 transform: Callable[[dict], dict] | None = None, fixed: bool = False, seed: int = 0,
                 mpp_override: float | None = None) -> None:
        if not data:
            raise ValueError("HPFCropDataset needs at least one datalist item")
        if not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
        self.crop_px, self.length, self.positive_fraction = int(crop_px), int(samples_per_epoch), positive_fraction
        self.mpp, self.transform, self.fixed, self.seed = float(mpp), transform, flag(fixed, "fixed"), seed
        self.paths: list[str] = []
        self.sizes: list[tuple[int, int]] = []
        self.centroids: list[np.ndarray] = []
        for item in data:
            _check_hpf_mpp(item, mpp_override, self.mpp)
            path = str(item["image"])
            size = _image_size(path)
            xy = read_points_csv(item["centroids"], centroid_order)[0] if item.get("centroids") else np.zeros((0, 2))
            pixel = _pixel(xy)
            if np.any((pixel < 0) | (pixel >= np.asarray(size))):
                raise InputError(item["centroids"], f"centroids outside the {size[0]}x{size[1]} px image {path} "
                                                    f"(wrong centroid_order {centroid_order!r}?)")
            self.paths.append(path)
            self.sizes.append(size)
            self.centroids.append(xy)
        self.max_centroids = max(len(c) for c in self.centroids)
        self.positive_images = [k for k, c in enumerate(self.centroids) if len(c)]
        self._images: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.length

    def _image(self, k: int) -> np.ndarray:
        if k not in self._images:
            image = read_hpf(self.paths[k])
            if image.shape[1::-1] != self.sizes[k]:
                raise InputError(self.paths[k], "the image changed size since the dataset was built")
            self._images[k] = image
        return self._images[k]

    def _holds(self, k: int, origin: np.ndarray) -> np.ndarray:
        """Which centroids of image ``k`` lie in the crop at ``origin`` (x0, y0)."""
        offset = _pixel(self.centroids[k]) - origin
        return np.all((offset >= 0) & (offset < self.crop_px), axis=1)

    def _room(self, k: int) -> np.ndarray:
        """The largest crop origin (x0, y0) in image ``k``; 0 on an axis where the image is smaller than the crop."""
        return np.maximum(np.asarray(self.sizes[k]) - self.crop_px, 0)

    def draw(self, rng: np.random.Generator) -> tuple[int, np.ndarray]:
        """One (image index, crop origin (x0, y0) in px) draw."""
        if self.positive_images and rng.random() < self.positive_fraction:
            k = self.positive_images[rng.integers(len(self.positive_images))]
            centre = _pixel(self.centroids[k][rng.integers(len(self.centroids[k]))])
            lo = np.maximum(centre - self.crop_px + 1, 0)
            hi = np.minimum(centre, self._room(k))
            return k, lo + (rng.random(2) * (hi - lo + 1)).astype(np.int64)
        k = int(rng.integers(len(self.paths)))
        for _ in range(NEGATIVE_TRIES):
            origin = (rng.random(2) * (self._room(k) + 1)).astype(np.int64)
            if not self._holds(k, origin).any():
                break
        return k, origin

    def __getitem__(self, i: int) -> dict:
        seed = (self.seed, i) if self.fixed else int(torch.randint(0, 2**62, (1,)).item())
        k, (x0, y0) = self.draw(np.random.default_rng(seed))
        region = self._image(k)[y0:y0 + self.crop_px, x0:x0 + self.crop_px]
        crop = np.full((self.crop_px, self.crop_px, 3), WHITE, dtype=np.uint8)
        crop[:region.shape[0], :region.shape[1]] = region
        inside = self._holds(k, np.array([x0, y0]))
        item = {"image": torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1))),
                "centroids": torch.from_numpy((self.centroids[k][inside] - [x0, y0]).astype(np.float32)),
                "location": torch.tensor([x0, y0], dtype=torch.int64), "path": self.paths[k]}
        if self.transform is not None:
            item = dict(self.transform(item))
        xy = torch.as_tensor(item["centroids"], dtype=torch.float32).reshape(-1, 2)
        if len(xy) > self.max_centroids:
            raise ValueError(f"the transform returned {len(xy)} centroids, more than the {self.max_centroids} "
                             "rows of the padded array")
        padded = torch.full((self.max_centroids, 2), float("nan"))
        padded[:len(xy)] = xy
        item["centroids"], item["n_centroids"] = padded, len(xy)
        return item


#: Where pixel (0, 0)'s centre lies in HPF coordinates: at (0, 0), as in the challenges' centroid CSVs (a map pixel
#: index is its position), not at (0.5, 0.5) as in level-0 slide coordinates.
HPF_PIXEL_CENTRE_XY = (0.0, 0.0)


def _as_map(prob_map: np.ndarray | torch.Tensor) -> np.ndarray:
    prob = prob_map.detach().cpu().numpy() if isinstance(prob_map, torch.Tensor) else np.asarray(prob_map)
    if prob.ndim != 2:
        raise ValueError(f"expected an (H, W) mitosis probability map, got shape {prob.shape}")
    return prob


def detect_mitoses(prob_map: np.ndarray | torch.Tensor, mpp: float = 0.25, sigma_um: float = 1.0,
                   min_mean_score: float = 0.0, min_area_um2: float = 0.0) -> np.ndarray:
    """SegMitos detections of one whole HPF: Otsu blobs of the smoothed map (``postprocess.mitosis_blobs``).

    Args:
        prob_map: (H, W) mitosis probability of the whole HPF (channel 1 of ``SegMitosInferer``'s output), one
            value per HPF pixel.
        mpp: resolution of the map and the HPF, um/px.
        sigma_um: Gaussian smoothing standard deviation, um.
        min_mean_score: keep blobs whose mean smoothed probability is > this (the paper's s1).
        min_area_um2: keep blobs whose area is > this, um^2 (the paper's a1; 200-500 px = 12.5-31 um^2 at 0.25).

    Returns:
        float64 (N, 3) ``[x, y, score]`` in HPF px (the challenge CSV's columns), highest score first.
    """
    blobs = mitosis_blobs(_as_map(prob_map), mpp, mpp, HPF_PIXEL_CENTRE_XY, sigma_um=sigma_um,
                          min_mean_score=min_mean_score,
                          min_area_um2=min_area_um2)
    return blobs[:, [1, 2, 0]]


def blob_candidates(prob_map: np.ndarray | torch.Tensor, mpp: float = 0.25, sigma_um: float = 1.0) -> np.ndarray:
    """Every Otsu blob of one HPF map, unfiltered: float64 (N, 4) ``[mean_score, x, y, area_um2]`` in HPF px.

    What threshold tuning and precision-recall curves filter; :func:`detect_mitoses` is this plus the filter.
    """
    return mitosis_blobs(_as_map(prob_map), mpp, mpp, HPF_PIXEL_CENTRE_XY, sigma_um=sigma_um)


def filter_blobs(blobs: np.ndarray, min_mean_score: float = 0.0, min_area_um2: float = 0.0) -> np.ndarray:
    """Blobs with mean score > ``min_mean_score`` and area > ``min_area_um2``, as ``[x, y, score]`` detections."""
    blobs = np.asarray(blobs, dtype=np.float64).reshape(-1, 4)
    kept = blobs[(blobs[:, 0] > min_mean_score) & (blobs[:, 3] > min_area_um2)]
    return kept[:, [1, 2, 0]]


def tune_blob_thresholds(blobs: Sequence[np.ndarray], truths: Sequence[np.ndarray], radius_px: float = 30.0,
                         score_grid: Sequence[float] | None = None,
                         area_grid_um2: Sequence[float] | None = None) -> dict:
    """Grid-search (s1, a1) over precomputed :func:`blob_candidates`, for the best pooled F1.

    Run it on a VALIDATION set and apply the result unchanged to the test set; never tune on the test set (the
    F-score would be optimistic; the SegMitos authors tuned on test). Each grid point only filters the blobs and is
    scored with ``metrics.mitosis.mitosis_f1`` (one-to-one matching, counts pooled over images). Ties go to the
    higher score threshold, then the higher area threshold (fewer detections).

    Args:
        blobs: (N, 4) ``[mean_score, x, y, area_um2]`` per HPF.
        truths: (M, 2) ground-truth (x, y) per HPF, HPF px.
        radius_px: matching radius, px (30 px = 7.5 um at 0.25 um/px; 20 px for MITOS 2012).
        score_grid: candidate ``min_mean_score`` values; default 0, 0.05, ..., 0.95.
        area_grid_um2: candidate ``min_area_um2`` values, um^2; default 0, 2.5, ..., 100 (0-1600 px at 0.25 um/px).

    Returns:
        ``min_mean_score``, ``min_area_um2``, ``f1``, ``precision``, ``recall``, ``tp``, ``fp``, ``fn`` at the best
        point, and ``grid``: one dict per grid point with the two thresholds and the same scores.
    """
    if len(blobs) != len(truths):
        raise ValueError(f"{len(blobs)} blob sets for {len(truths)} ground truths")
    if not len(blobs):
        raise ValueError("threshold tuning needs at least one validation HPF")
    scores = np.round(np.arange(20) * 0.05, 2) if score_grid is None else np.asarray(score_grid, np.float64)
    areas = np.arange(41) * 2.5 if area_grid_um2 is None else np.asarray(area_grid_um2, np.float64)
    grid = []
    for s in scores:
        for a in areas:
            images = [(truth, filter_blobs(b, s, a)[:, :2], None) for truth, b in zip(truths, blobs)]
            counts = mitosis_f1(images, radius_px=radius_px)
            grid.append({"min_mean_score": float(s), "min_area_um2": float(a), **counts.as_dict()})
    # An undefined F1 (None: nothing to find and nothing found) ranks below every defined one.
    best = max(grid, key=lambda g: (-1.0 if g["f1"] is None else g["f1"], g["min_mean_score"], g["min_area_um2"]))
    return {**best, "grid": grid}


def tune_thresholds(prob_maps: Sequence[np.ndarray | torch.Tensor], truths: Sequence[np.ndarray], mpp: float = 0.25,
                    radius_px: float = 30.0, sigma_um: float = 1.0, score_grid: Sequence[float] | None = None,
                    area_grid_um2: Sequence[float] | None = None) -> dict:
    """:func:`tune_blob_thresholds` on whole-HPF probability maps (blobs found once per map).

    Args:
        prob_maps: (H, W) mitosis probability maps of the validation HPFs.
        truths, radius_px, score_grid, area_grid_um2: as in :func:`tune_blob_thresholds`.
        mpp: resolution of maps and HPFs, um/px.
        sigma_um: Gaussian smoothing, um.
    """
    if len(prob_maps) != len(truths):
        raise ValueError(f"{len(prob_maps)} probability maps for {len(truths)} ground truths")
    blobs = [blob_candidates(p, mpp, sigma_um) for p in prob_maps]
    return tune_blob_thresholds(blobs, truths, radius_px, score_grid, area_grid_um2)


#: Header of the detection CSV of a slide box, whose positions are level-0 pixels of the slide.
LEVEL0_CSV_HEADER = ("x_level0_px", "y_level0_px", "score")


def write_detections(path: str | os.PathLike, detections: np.ndarray, header: Sequence[str] | None = None) -> None:
    """Write (N, 3) ``[x, y, score]`` detections as ``x,y,score`` CSV rows, atomically.

    Args:
        path: output CSV.
        detections: (N, 3) x, y and score: HPF px as from :func:`detect_mitoses`, or level-0 px of a slide.
        header: column names for a first line (e.g. :data:`LEVEL0_CSV_HEADER`); None: no header, as the
            challenges' CSVs.
    """
    detections = np.asarray(detections, dtype=np.float64).reshape(-1, 3)
    write_points_csv(path, detections[:, :2], order="xy", scores=detections[:, 2], header=header)


def write_circle_overlay_png(path: str | os.PathLike, image: np.ndarray, detections: np.ndarray,
                             truth: np.ndarray | None = None, radius_px: float = 30.0, width_px: int = 3, *,
                             title: Sequence[str] = (), legend: bool = True,
                             fields: dict[str, Any] | None = None) -> None:
    """Draw detections (and ground truth) as circles on an HPF and save it as PNG, atomically.

    With ``truth``: true positives green, false positives red, missed mitoses blue, split by the one-to-one
    matching of ``metrics.mitosis.match_points``. Without it every detection is yellow. Detections are numbered
    1..N in the order given (the rows of the detection CSV). ``title`` lines go in a strip above the HPF and the
    legend of the colours to its right (:func:`pathbundles.writers.read_overlay_layout` says where the HPF lies).

    Args:
        path: output PNG.
        image: (H, W, 3) uint8 HPF.
        detections: (N, 2) or (N, 3) x, y (and score) in HPF px.
        truth: (M, 2) ground-truth x, y in HPF px, or None.
        radius_px: circle radius and matching radius, px (the circle shows where a match was allowed).
        width_px: line width, px.
        title: lines of the title strip (HPF name, model and version, counts).
        legend: draw the legend of the circle colours.
        fields: extra entries for the layout record (e.g. the HPF name and the model).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    found = np.asarray(detections, dtype=np.float64)
    det_xy = (found if found.ndim == 2 else found.reshape(-1, 2))[:, :2]
    markers: list[tuple[float, float, tuple[int, int, int], str | None]]
    if truth is None:
        markers = [(x, y, DETECTION_COLOUR, str(j + 1)) for j, (x, y) in enumerate(det_xy)]
        entries = [("detection", DETECTION_COLOUR)]
    else:
        truth_xy = np.asarray(truth, dtype=np.float64).reshape(-1, 2)
        pairs = match_points(truth_xy, det_xy, radius_px)
        matched_det, matched_truth = set(pairs[:, 1].tolist()), set(pairs[:, 0].tolist())
        markers = ([(x, y, TP_COLOUR if j in matched_det else FP_COLOUR, str(j + 1))
                    for j, (x, y) in enumerate(det_xy)]
                   + [(x, y, FN_COLOUR, None) for i, (x, y) in enumerate(truth_xy) if i not in matched_truth])
        entries = [("true positive", TP_COLOUR), ("false positive", FP_COLOUR), ("missed mitosis", FN_COLOUR)]
    panel = legend_panel(entries, overlay_font_px(max(image.shape[:2]))) if legend else None
    write_annotated_png(path, image.astype(np.uint8), title=title, panel=panel, markers=markers,
                        ring_px=radius_px, ring_width_px=width_px, fields=fields)


# ---------------------------------------------------------------------------------------------------------------
# Whole-HPF inference, evaluation and tuning as MONAI/ignite components (the segmitos bundle's configs)
# ---------------------------------------------------------------------------------------------------------------

class HPFDataset(torch.utils.data.Dataset):
    """Whole HPFs for inference: image files, or level-0 boxes of a whole-slide image read at ``mpp``.

    Datalist items: ``image`` (an HPF image file, or a slide when ``box`` is given), optional ``box``
    ``[x, y, width, height]`` in level-0 px of that slide, optional ``centroids`` (CSV of ground-truth mitoses in
    HPF px, columns in ``centroid_order``) and optional ``mpp`` (an HPF file's resolution, or a slide's level-0
    resolution for a box; an HPF file at another resolution than ``mpp`` is refused: HPFs are never resampled
    silently). Every file is checked when the dataset is built: an item that cannot be used (an unreadable or
    broken image, a symlink loop, a slide without mpp, an HPF at another resolution, centroids outside it) is left
    out of the items with its error in :attr:`failed`, so the writer fails it by name and the others run. Names are
    checked for the whole datalist first (:func:`pathbundles.outputs.output_names`): a bad name refuses the run.

    Items (the usable HPFs, in datalist order): ``image`` uint8 (3, H, W) tensor; ``label`` float32 (M, 2)
    ground-truth (x, y) when the item has ``centroids`` (MONAI engines carry ``label`` into their output, where
    metrics find it); ``name`` (:func:`pathbundles.outputs.slide_name`: the item's ``name`` or file stem, plus
    ``_x{x}_y{y}`` for a slide box); ``index`` (the datalist index) and ``error`` ("" when the read succeeded; a read
    that fails later gives a small blank image and the error, which the writer reports); with ``pixels_key`` also
    that key, the HPF as read (uint8 (H, W, 3), untouched by ``transform``), so that :class:`HPFDetectionWriter`
    draws its overlay without reading the HPF again.

    Args:
        data: datalist items.
        mpp: resolution of the HPFs and of the network, um/px.
        centroid_order: column order of every centroid CSV of this datalist, "xy" or "rc" (AMIDA13/TUPAC16).
        backend: slide backend for ``box`` items (see ``pathbundles.wsi.open_slide``).
        transform: dict transform of each item (e.g. intensity scaling of ``image``).
        mpp_override: um/px of the items that give no ``mpp`` (the bundle's ``slide_mpp``): the slides' level-0
            resolution for ``box`` items, the HPF files' resolution otherwise.
        pixels_key: item key of the HPF's pixels as read (the segmitos configs give ``"hpf_rgb"`` when they write
            overlays); None: not given.
    """

    def __init__(self, data: Sequence[dict], mpp: float = 0.25, *, centroid_order: Literal["xy", "rc"] = "xy",
                 backend: str = "auto", transform: Callable[[dict], dict] | None = None,
                 mpp_override: float | None = None, pixels_key: str | None = None) -> None:
        if not data:
            raise ValueError("HPFDataset needs at least one datalist item")
        self.items, self.mpp, self.backend, self.transform = [dict(d) for d in data], float(mpp), backend, transform
        self.mpp_override, self.pixels_key = mpp_override, pixels_key or None
        self._level0_mpp: dict[str, float] = {}  # slide path -> level-0 um/px, of the box items' slides
        self.names: list[str] = output_names(self.items)
        self.truths: list[np.ndarray | None] = []
        #: {datalist index: why} of the items left out: each file's own problem, never the whole run's.
        self.failed: dict[int, str] = {}
        for index, item in enumerate(self.items):
            try:
                self.truths.append(self._check_item(item, centroid_order))
            except (PathBundlesError, OSError, ValueError) as err:
                self.truths.append(None)
                self.failed[index] = str(err)
                logger.error("HPF %s left out: %s", self.names[index], err)
        #: datalist indices of the usable items, the dataset's items in order
        self.usable = [i for i in range(len(self.items)) if i not in self.failed]

    def _check_item(self, item: dict, centroid_order: Literal["xy", "rc"]) -> np.ndarray | None:
        """Check one datalist item's files; its ground truth (or None)."""
        path = str(item["image"])
        if item.get("box") is not None:
            size = self._box_size(item)
        else:
            _check_hpf_mpp(item, self.mpp_override, self.mpp)
            size = _image_size(path, verify=True)
        if not item.get("centroids"):
            return None
        truth = read_points_csv(item["centroids"], centroid_order)[0]
        if np.any((_pixel(truth) < 0) | (_pixel(truth) >= np.asarray(size))):
            raise InputError(item["centroids"], f"centroids outside the {size[0]}x{size[1]} px HPF {path} "
                                                f"(wrong centroid_order {centroid_order!r}?)")
        return truth

    def _box_size(self, item: dict) -> tuple[int, int]:
        """(width, height) in px at ``mpp`` of a slide box, checking the slide opens and has an mpp."""
        from pathbundles.wsi import item_mpp, open_slide

        box = [float(v) for v in item["box"]]
        if len(box) != 4 or box[2] <= 0 or box[3] <= 0:
            raise InputError(item["image"], f"box must be [x, y, width, height] in level-0 px, got {item['box']}")
        with open_slide(item["image"], backend=self.backend, mpp=item_mpp(item, self.mpp_override)) as slide:
            level0_mpp = float(slide.mpp[0])
        self._level0_mpp[str(item["image"])] = level0_mpp
        return round(box[2] * level0_mpp / self.mpp), round(box[3] * level0_mpp / self.mpp)

    def is_box(self, i: int) -> bool:
        """Whether item ``i`` (datalist index) is a box of a slide rather than an HPF file."""
        return self.items[i].get("box") is not None

    def level0_mpp(self, i: int) -> float:
        """um/px of the level 0 of what item ``i`` (datalist index) is placed on: its slide for a box, else the HPF
        itself (``mpp``)."""
        return self._level0_mpp[str(self.items[i]["image"])] if self.is_box(i) else self.mpp

    def to_level0(self, i: int, xy: np.ndarray) -> np.ndarray:
        """HPF positions of item ``i`` (datalist index) in level-0 pixels of the image a viewer opens.

        HPF pixel u is centred at u (:data:`HPF_PIXEL_CENTRE_XY`) and covers level-0 ``[x0 + u * s, x0 + (u + 1) *
        s)`` as :meth:`pathbundles.wsi.Slide.read_region` reads it, so position u lies at level-0 ``x0 + (u + 0.5) * s``
        (continuous level-0 coordinates: pixel k spans [k, k + 1)).  For a box, (x0, y0) is the box's origin and
        ``s = mpp / level0 mpp`` of the slide; for an HPF file (its own level 0) x0 = y0 = 0 and s = 1.

        Args:
            i: datalist index.
            xy: (N, 2) HPF (x, y) in px.

        Returns:
            float64 (N, 2) level-0 (x, y).
        """
        xy = np.asarray(xy, np.float64).reshape(-1, 2)
        if not self.is_box(i):
            return xy + 0.5
        box = self.items[i]["box"]
        return np.array([float(box[0]), float(box[1])]) + (xy + 0.5) * (self.mpp / self.level0_mpp(i))

    def __len__(self) -> int:
        return len(self.usable)

    def read_image(self, i: int) -> np.ndarray:
        """HPF ``i`` (datalist index) as uint8 (H, W, 3) RGB at ``mpp``."""
        item = self.items[i]
        if item.get("box") is None:
            return read_hpf(item["image"])
        from pathbundles.wsi import item_mpp, open_slide

        x, y = (float(v) for v in item["box"][:2])
        with open_slide(item["image"], backend=self.backend, mpp=item_mpp(item, self.mpp_override)) as slide:
            return slide.read_region((x, y), self._box_size(item), self.mpp)

    def __getitem__(self, k: int) -> dict:
        i = self.usable[k]
        error = ""
        try:
            image = self.read_image(i)
        except (PathBundlesError, OSError, ValueError) as err:  # the file changed or broke after the check
            image, error = np.full((_BLANK_PX, _BLANK_PX, 3), WHITE, np.uint8), f"{self.items[i]['image']}: {err}"
        out: dict = {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                     "name": self.names[i], "index": i, "error": error}
        if self.truths[i] is not None:
            out["label"] = torch.from_numpy(self.truths[i].astype(np.float32))
        out = dict(self.transform(out)) if self.transform is not None else out
        if self.pixels_key and not error:
            out[self.pixels_key] = torch.from_numpy(np.ascontiguousarray(image))
        return out


class HPFDetectionWriter(RecordsWeights):
    """Ignite handler: per HPF, blobs -> detections and the outputs; keeps every blob for metrics and tuning.

    Under ``output_dir``: ``detections/<name>.csv`` (an HPF file: header-less ``x,y,score`` in HPF px, pixel
    centres at integers, as the challenges' CSVs; a slide box: ``x_level0_px,y_level0_px,score`` with that header,
    in level-0 px of the slide, :meth:`HPFDataset.to_level0`), ``detections/<name>.geojson`` (QuPath points, class
    "Mitosis", stable ids) and ``detections/<name>.xml`` (ASAP "Dot" annotations named with their score), both in
    level-0 px of the image a viewer opens (the slide for a box, the HPF file itself otherwise: there pixel k spans
    [k, k + 1), so positions are the CSV's + 0.5), ``maps/<name>.png`` (mitosis probability x 255, 8-bit grey, one
    value per HPF pixel) and ``overlays/<name>.png`` (the HPF with circles: true positives green, false positives red,
    misses blue when the item has ground truth, yellow otherwise; detections numbered as the CSV's rows; a legend,
    and the HPF name, model and version in a title strip); and one ``hpf_counts.csv``
    (``name,n_detections,max_score``, then ``weights_sha256,demo_weights,weights_warning`` when the writer knows the
    run's weights) for the run. Every file is written atomically. The output
    folder is locked from the start of the run to its end, and what a killed run left there is removed
    (:func:`pathbundles.outputs.claim_folder`). An HPF that cannot be read (left out by the dataset, or failing
    when read) gets no output and is named in :attr:`failed`; the others are written, and
    :meth:`ensure_completed`, which the bundle's configs run after the engine, then raises naming the failed ones.

    Args:
        dataset: the run's :class:`HPFDataset` (names, ground truth, and the original pixels for overlays).
        output_dir: folder for all outputs.
        mpp: resolution of maps and HPFs, um/px.
        sigma_um: Gaussian smoothing of the map, um.
        min_mean_score, min_area_um2: the blob thresholds (tuned on validation data by the bundle's tune step).
        radius_px: matching radius for the overlay's colours and circle radius, px.
        write_images: write the map and overlay PNGs (the tune step needs only the blobs).
        prob_channel: channel of the network output holding the mitosis probability.
        pred_key: key of the prediction in ``engine.state.output``.
        model_label: the model and version printed on overlays (:func:`pathbundles.bundle.model_label`).
        weights: the run's weights (the ``checkpoint_loader``'s ``weights``): recorded in ``hpf_counts.csv``
            (columns :data:`pathbundles.weights.RECORD_FIELDS` after its own) and the GeoJSON properties, the demo
            warning logged at the end of the run; None records nothing.
    """

    def __init__(self, dataset: HPFDataset, output_dir: str | os.PathLike, mpp: float = 0.25, sigma_um: float = 1.0,
                 min_mean_score: float = 0.0, min_area_um2: float = 0.0, radius_px: float = 30.0,
                 write_images: bool = True, prob_channel: int = 1, pred_key: str = "pred",
                 model_label: str = "", weights: WeightsIdentity | None = None) -> None:
        self.dataset, self.output_dir = dataset, Path(output_dir)
        self.weights = weights
        self.mpp, self.sigma_um, self.radius_px = mpp, sigma_um, radius_px
        # Checked here, not first at the end of the run: a score threshold above 1 keeps no blob at all.
        self.min_mean_score, self.min_area_um2 = probability(min_mean_score, "min_mean_score"), min_area_um2
        self.write_images = flag(write_images, "write_images")
        self.prob_channel, self.pred_key = prob_channel, pred_key
        self.model_label = str(model_label)
        self.blobs: dict[str, np.ndarray] = {}
        self.detections: dict[str, np.ndarray] = {}
        #: {HPF name: why} of the HPFs that failed.
        self.failed: dict[str, str] = self._failed_in_dataset()
        self._lock: Any = None
        self._completed = False

    def _failed_in_dataset(self) -> dict[str, str]:
        return {self.dataset.names[i]: why for i, why in getattr(self.dataset, "failed", {}).items()}

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        # EPOCH_COMPLETED (not COMPLETED): metric reports and trackers that read the outputs run on it after us.
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.completed)

    def started(self, engine: Any = None) -> None:
        self._claim()
        self.blobs.clear()
        self.detections.clear()
        self.failed = self._failed_in_dataset()

    def _claim(self) -> None:
        """Lock the output folder for this run and remove a killed run's work files from it."""
        if self._lock is None or not self._lock.held:
            self._lock = claim_folder(self.output_dir)

    def results(self) -> list[dict]:
        """One record per HPF written by the run: ``name``, ``score`` (highest detection score, 0 without any),
        ``n_detections`` and ``outputs`` (the writer protocol of :mod:`pathbundles.bundle_runner`)."""
        return [{"name": name, "score": float(d[:, 2].max()) if len(d) else 0.0, "n_detections": int(len(d)),
                 "outputs": {k: v for k, v in self.outputs(name).items() if v.exists()}}
                for name in self.dataset.names if (d := self.detections.get(name)) is not None]

    def outputs(self, name: str) -> dict[str, Path]:
        """The files written for HPF ``name``."""
        files = {"detections": output_file(self.output_dir, "detections", name, ".csv"),
                 "geojson": output_file(self.output_dir, "detections", name, ".geojson"),
                 "asap_xml": output_file(self.output_dir, "detections", name, ".xml")}
        if self.write_images:
            files |= {"map": output_file(self.output_dir, "maps", name, ".png"),
                      "overlay": output_file(self.output_dir, "overlays", name, ".png")}
        return files

    def iteration_completed(self, engine: Any) -> None:
        for item, out in zip(engine.state.batch, engine.state.output):
            index = int(item["index"])
            if item.get("error"):
                name = self.dataset.names[index]
                self.failed[name] = str(item["error"])
                logger.error("HPF %s failed: %s", name, item["error"])
                continue
            prob = out[self.pred_key][self.prob_channel].detach().float().cpu().numpy()
            key = getattr(self.dataset, "pixels_key", None)
            pixels = item.get(key) if key else None
            self.add(index, prob, None if pixels is None else np.asarray(pixels, np.uint8))

    def add(self, index: int, prob: np.ndarray, pixels: np.ndarray | None = None) -> np.ndarray:
        """Post-process and write HPF ``index`` of the dataset from its (H, W) probability map; its detections.
        ``pixels``: the HPF as the dataset read it, uint8 (H, W, 3), for the overlay (None: read again)."""
        name = self.dataset.names[index]
        blobs = blob_candidates(prob, self.mpp, self.sigma_um)
        detections = filter_blobs(blobs, self.min_mean_score, self.min_area_um2)
        self.blobs[name], self.detections[name] = blobs, detections
        files = self.outputs(name)
        level0 = np.column_stack([detections[:, 2], self.dataset.to_level0(index, detections[:, :2])])
        if self.dataset.is_box(index):
            write_detections(files["detections"], level0[:, [1, 2, 0]], header=LEVEL0_CSV_HEADER)
        else:
            write_detections(files["detections"], detections)
        write_detections_geojson(files["geojson"], level0, mpp=self.dataset.level0_mpp(index),
                                 class_name=MITOSIS_CLASS, color=DETECTION_COLOUR, id_scope=f"{name}/detections",
                                 properties=self.weights_record())
        write_detections_asap_xml(files["asap_xml"], level0, class_name=MITOSIS_CLASS, color=DETECTION_COLOUR)
        if self.write_images:
            with atomic_path(files["map"]) as tmp:
                write_png(tmp, np.clip(np.rint(prob * 255), 0, 255).astype(np.uint8))
            image = pixels if pixels is not None else self.dataset.read_image(index)
            write_circle_overlay_png(files["overlay"], image, detections,
                                     self.dataset.truths[index], radius_px=self.radius_px,
                                     title=[name, *([self.model_label] if self.model_label else []),
                                            f"{len(detections)} detections, numbered as the rows of "
                                            f"detections/{files['detections'].name}"],
                                     fields={"hpf": name, "model": self.model_label})
        return detections

    def completed(self, engine: Any = None) -> None:
        """Write ``hpf_counts.csv`` in datalist order; release the output folder."""
        self._completed = True
        self._claim()  # a run whose engine never started
        try:
            extra_columns, extra_values = csv_header_and_row(self.weights)
            with atomic_path(self.output_dir / "hpf_counts.csv") as tmp, open(tmp, "w", newline="",
                                                                             encoding="utf-8") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(["name", "n_detections", "max_score", *extra_columns])
                for name in self.dataset.names:
                    if (d := self.detections.get(name)) is not None:
                        writer.writerow([name, len(d), f"{(float(d[:, 2].max()) if len(d) else 0.0):.6f}",
                                         *extra_values])
        finally:
            self._lock.release()

    def ensure_completed(self, engine: Any = None) -> None:
        """End a run: complete it when its engine never started (no usable HPF), then raise
        :class:`~pathbundles.errors.SlidesFailedError` naming every HPF that failed."""
        if not self._completed:
            self.completed(engine)
        self.warn_at_end()
        if self.failed:
            raise SlidesFailedError.listing(self.failed, written=len(self.dataset.names) - len(self.failed),
                                            unit="HPF")

    def annotated(self) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
        """(names, blobs, truths) of the processed HPFs that have ground truth, in datalist order."""
        rows = [(name, self.blobs[name], truth) for name, truth in zip(self.dataset.names, self.dataset.truths)
                if truth is not None and name in self.blobs]
        return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]

    def report(self) -> dict:
        """Where the outputs went, as printed by the bundle (and returned)."""
        return {"output_dir": str(self.output_dir.resolve()),
                **({"weights": self.weights_record()} if self.weights_record() else {}),
                "hpf_counts": str((self.output_dir / "hpf_counts.csv").resolve()),
                "hpfs": {name: {"n_detections": int(len(d)), **{k: str(v.resolve()) for k, v in
                                                                 self.outputs(name).items()}}
                         for name, d in self.detections.items()}}


class MitosisMetricsReport:
    """Ignite handler: after the writer, pooled precision, recall and F1 at the bundle's thresholds, the
    precision-recall curve over the blob score (area threshold kept), ``metrics.json``, ``pr.png`` and ``curves.json``.

    The scalars ``f1``, ``precision``, ``recall`` and ``average_precision`` also go into ``engine.state.metrics``
    (MLflow picks them up when tracking is on). Only HPFs with ground truth count.

    Args:
        writer: the run's :class:`HPFDetectionWriter`.
        output_dir: folder for the report.
        radius_px: matching radius, px (30 px = 7.5 um at 0.25 um/px).
        matching: matching of the reported ``f1``/``precision``/``recall``: ``"optimal"`` or ``"greedy"`` (the
            challenge scorers' and the SegMitos authors' rule, for comparison with published F-scores);
            ``metrics.json`` gives the counts of both under ``details.counts_by_matching``.
    """

    def __init__(self, writer: HPFDetectionWriter, output_dir: str | os.PathLike, radius_px: float = 30.0,
                 matching: str = "optimal") -> None:
        self.writer, self.output_dir, self.radius_px = writer, Path(output_dir), radius_px
        self.matching = check_matching(matching)
        self.report: dict | None = None

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Any = None) -> dict:
        from pathbundles.metrics import plots
        from pathbundles.metrics.mitosis import MATCHINGS, precision_recall_curve
        from pathbundles.tracking import write_curves

        names, blobs, truths = self.writer.annotated()
        if not names:
            raise ValueError("no HPF of this run has ground truth (datalist key 'centroids'): nothing to evaluate")
        area_kept = [filter_blobs(b, -np.inf, self.writer.min_area_um2) for b in blobs]
        at_threshold = [(t, filter_blobs(b, self.writer.min_mean_score, self.writer.min_area_um2)[:, :2], None)
                        for t, b in zip(truths, blobs)]
        by_matching = {m: mitosis_f1(at_threshold, radius_px=self.radius_px, matching=m) for m in MATCHINGS}
        counts = by_matching[self.matching]
        curve = precision_recall_curve([(t, d[:, :2], d[:, 2]) for t, d in zip(truths, area_kept)],
                                       radius_px=self.radius_px)
        precision, recall = curve.precision, curve.recall
        scalars = {"f1": counts.as_dict()["f1"], "precision": counts.precision, "recall": counts.recall,
                   "average_precision": average_precision(precision, recall)}
        per_image = {name: mitosis_f1([(t, filter_blobs(b, self.writer.min_mean_score,
                                                         self.writer.min_area_um2)[:, :2], None)],
                                      radius_px=self.radius_px, matching=self.matching).as_dict()
                     for name, t, b in zip(names, truths, blobs)}
        self.report = {"metrics": scalars,
                       "details": {"counts": counts.as_dict(), "matching": self.matching,
                                   "counts_by_matching": {m: c.as_dict() for m, c in by_matching.items()},
                                   "radius_px": self.radius_px, "n_hpfs": len(names),
                                   "thresholds": {"min_mean_score": self.writer.min_mean_score,
                                                  "min_area_um2": self.writer.min_area_um2},
                                   "per_hpf": per_image,
                                   "pr_curve": {"score_threshold": curve.thresholds.tolist(),
                                                "precision": precision.tolist(), "recall": recall.tolist()}},
                       "plots": ["pr.png"], **({"weights": self.writer.weights_record()}
                                                if self.writer.weights_record() else {})}
        plots.plot_precision_recall(precision, recall, self.output_dir / "pr.png",
                                    point=(counts.precision, counts.recall))
        with atomic_path(self.output_dir / "metrics.json") as tmp:
            tmp.write_text(json.dumps(self.report, indent=2) + "\n", encoding="utf-8")
        write_curves(self.output_dir, precision=precision, recall=recall)
        if engine is not None:
            engine.state.metrics.update(scalars)
        return self.report


def average_precision(precision: np.ndarray, recall: np.ndarray) -> float:
    """Area under the precision-recall curve as sum of (R_i - R_{i-1}) * P_i, points in decreasing threshold order
    (recall non-decreasing), starting from recall 0; 0 when there are no points."""
    precision, recall = np.asarray(precision, np.float64), np.asarray(recall, np.float64)
    if not len(recall):
        return 0.0
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


class TunedMitosisF1(Metric):
    """Ignite metric for validation during training: the best pooled F1 over the (s1, a1) grid of
    :func:`tune_blob_thresholds`, on whole validation HPFs (a threshold-free measure of the map's quality).

    ``output`` = (predictions (C, H, W) per HPF, ground truth (M, 2) per HPF), e.g.
    ``from_engine(['pred', 'label'])``.

    Args:
        mpp, sigma_um: as in :func:`blob_candidates`.
        radius_px: matching radius, px.
        prob_channel: channel holding the mitosis probability.
    """

    def __init__(self, mpp: float = 0.25, sigma_um: float = 1.0, radius_px: float = 30.0, prob_channel: int = 1,
                 output_transform: Callable = lambda x: x) -> None:
        self.mpp, self.sigma_um, self.radius_px, self.prob_channel = mpp, sigma_um, radius_px, prob_channel
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self._blobs: list[np.ndarray] = []
        self._truths: list[np.ndarray] = []

    def update(self, output: Sequence[Any]) -> None:
        preds, truths = output
        for pred, truth in zip(preds, truths, strict=True):
            prob = torch.as_tensor(pred)[self.prob_channel].detach().float().cpu().numpy()
            self._blobs.append(blob_candidates(prob, self.mpp, self.sigma_um))
            self._truths.append(torch.as_tensor(truth).detach().cpu().numpy().reshape(-1, 2).astype(np.float64))

    def compute(self) -> float:
        if not self._blobs:
            raise ValueError("TunedMitosisF1 needs at least one validation HPF")
        f1 = tune_blob_thresholds(self._blobs, self._truths, self.radius_px)["f1"]
        return math.nan if f1 is None else float(f1)


class ThresholdTuner:
    """Ignite handler for the bundle's tune step: choose (s1, a1) on the run's (validation) HPFs and store them.

    After the writer, grid-searches :func:`tune_blob_thresholds`, writes the grid to ``output_dir/tuning.json``,
    and, when ``config_file`` is given, stores ``min_mean_score``, ``min_area_um2`` and ``thresholds_tuned_on``
    (which HPFs, the F1 reached) in it (:func:`store_thresholds`: a new override file, or one holding both keys);
    not when validation HPFs failed (the writer's ``ensure_completed`` then fails the run naming them). The file
    is checked when the tuner is made (:func:`check_thresholds_target`), so a file it cannot write fails the run
    before the tuning, not after.

    Args:
        writer: the run's :class:`HPFDetectionWriter` (its blobs; its own thresholds are ignored).
        output_dir: folder for ``tuning.json``.
        config_file: the file to store the thresholds in (the bundle's tune.json: ``eval/tune/thresholds.json``, an
            override config to list after ``inference.json``), or None.
        radius_px: matching radius, px.
        score_grid, area_grid_um2: candidate thresholds (defaults of :func:`tune_blob_thresholds`).
    """

    def __init__(self, writer: HPFDetectionWriter, output_dir: str | os.PathLike,
                 config_file: str | os.PathLike | None = None, radius_px: float = 30.0,
                 score_grid: Sequence[float] | None = None, area_grid_um2: Sequence[float] | None = None) -> None:
        self.writer, self.output_dir, self.config_file = writer, Path(output_dir), config_file
        self.radius_px, self.score_grid, self.area_grid_um2 = radius_px, score_grid, area_grid_um2
        self.result: dict | None = None
        if config_file is not None:
            check_thresholds_target(config_file)

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Any = None) -> dict:
        names, blobs, truths = self.writer.annotated()
        if not names:
            raise ValueError("no HPF of this run has ground truth (datalist key 'centroids'): nothing to tune on")
        self.result = tune_blob_thresholds(blobs, truths, self.radius_px, self.score_grid, self.area_grid_um2)
        best = {k: v for k, v in self.result.items() if k != "grid"}
        with atomic_path(self.output_dir / "tuning.json") as tmp:
            tmp.write_text(json.dumps({"best": best, "hpfs": names, "radius_px": self.radius_px,
                                       "grid": self.result["grid"]}, indent=2) + "\n", encoding="utf-8")
        failed = getattr(self.writer, "failed", {})
        if self.config_file is not None and failed:
            # Thresholds tuned without some validation HPFs are not stored; the run then fails naming them.
            logger.error("thresholds not stored in %s: %d validation HPF(s) failed", self.config_file, len(failed))
        elif self.config_file is not None:
            store_thresholds(self.config_file, best["min_mean_score"], best["min_area_um2"],
                             {"hpfs": len(names), "f1": best["f1"], "radius_px": self.radius_px,
                              "sigma_um": self.writer.sigma_um})
            self.result["stored_in"] = str(Path(self.config_file).resolve())
        if engine is not None:
            engine.state.metrics.update({"tuned_f1": math.nan if best["f1"] is None else best["f1"]})
        return best


def _thresholds_config(path: Path) -> dict:
    """The JSON object of an existing file that holds ``min_mean_score`` and ``min_area_um2``."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(path, f"cannot read the bundle config ({err})") from None
    missing = [k for k in ("min_mean_score", "min_area_um2") if not isinstance(config, dict) or k not in config]
    if missing:
        raise InputError(path, f"the config has no {', '.join(missing)} key: not the segmitos inference config "
                               "nor a thresholds file a tune run wrote? (store_in a new file instead)")
    return config


def check_thresholds_target(config_file: str | os.PathLike) -> Path:
    """Refuse a file :func:`store_thresholds` could not write, before a tuning run rather than after it: an
    existing file must be a JSON object holding both keys; a new one needs a writable folder (created if missing).

    Raises:
        InputError: naming the file and why.
    """
    path = Path(config_file)
    if path.exists():
        _thresholds_config(path)
        if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK):
            raise InputError(path, "cannot store the tuned thresholds: the file or its folder is not writable")
        return path
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(path, f"cannot store the tuned thresholds: {folder} is not a writable folder")
    return path


def store_thresholds(config_file: str | os.PathLike, min_mean_score: float, min_area_um2: float,
                     provenance: dict | None = None) -> None:
    """Set ``min_mean_score``, ``min_area_um2`` (and ``thresholds_tuned_on``) in a JSON bundle config, atomically;
    a file that does not exist is created holding these keys alone (an override config: list it after
    ``inference.json``).

    The file is rewritten as ``json.dumps(indent=4)``, the format the bundle's configs are kept in, so only the
    changed values differ.

    Raises:
        InputError: the file exists and is not a JSON object holding both keys.
    """
    path = Path(config_file)
    config = _thresholds_config(path) if path.exists() else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    config["min_mean_score"], config["min_area_um2"] = float(min_mean_score), float(min_area_um2)
    if provenance is not None:
        config["thresholds_tuned_on"] = provenance
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
