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

import math
import os
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw

from pathbundles.annotations import read_points_csv, write_points_csv
from pathbundles.atomic import atomic_path
from pathbundles.errors import InputError
from pathbundles.metrics.mitosis import match_points, mitosis_f1
from pathbundles.postprocess import mitosis_blobs

#: PIL modes that convert to RGB without losing meaning: 8-bit RGB(A), grey (+alpha), palette, bilevel.
_RGB_CONVERTIBLE = {"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1"}
WHITE = 255  # pad value: blank glass, never tissue
NEGATIVE_TRIES = 32  # rejection draws for a mitosis-free crop before settling for any crop

#: overlay colours (RGB)
TP_COLOUR, FP_COLOUR, FN_COLOUR, DETECTION_COLOUR = (0, 255, 0), (255, 0, 0), (0, 0, 255), (255, 255, 0)


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


def _image_size(path: str) -> tuple[int, int]:
    """(width, height) in px from the header only."""
    try:
        with Image.open(path) as im:
            return im.size
    except OSError as err:
        raise InputError(path, f"cannot read the image ({err})") from None


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
        mpp: resolution the crops are meant for, um/px; an item with an ``mpp`` key that differs is refused
            (crops are never resampled).
        transform: dict transform applied to each unpadded item.
        fixed: draw item ``i`` from a generator seeded with ``(seed, i)`` (a fixed validation set).
        seed: seed of ``fixed`` draws.
    """

    def __init__(self, data: Sequence[dict], crop_px: int = 500, samples_per_epoch: int = 1024,
                 positive_fraction: float = 0.5, *, centroid_order: Literal["xy", "rc"], mpp: float = 0.25,
                 transform: Callable[[dict], dict] | None = None, fixed: bool = False, seed: int = 0) -> None:
        if not data:
            raise ValueError("HPFCropDataset needs at least one datalist item")
        if not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
        self.crop_px, self.length, self.positive_fraction = int(crop_px), int(samples_per_epoch), positive_fraction
        self.mpp, self.transform, self.fixed, self.seed = float(mpp), transform, fixed, seed
        self.paths: list[str] = []
        self.sizes: list[tuple[int, int]] = []
        self.centroids: list[np.ndarray] = []
        for item in data:
            if "mpp" in item and not math.isclose(float(item["mpp"]), self.mpp, rel_tol=0.01):
                raise ValueError(f"{item['image']} is at {item['mpp']} um/px, the dataset at {self.mpp} um/px")
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
    blobs = mitosis_blobs(_as_map(prob_map), mpp, mpp, sigma_um=sigma_um, min_mean_score=min_mean_score,
                          min_area_um2=min_area_um2)
    return blobs[:, [1, 2, 0]]


def tune_thresholds(prob_maps: Sequence[np.ndarray | torch.Tensor], truths: Sequence[np.ndarray], mpp: float = 0.25,
                    radius_px: float = 30.0, sigma_um: float = 1.0, score_grid: Sequence[float] | None = None,
                    area_grid_um2: Sequence[float] | None = None) -> dict:
    """Grid-search the blob thresholds (s1, a1) of :func:`detect_mitoses` for the best pooled F1.

    Run it on a VALIDATION set and apply the result unchanged to the test set; never tune on the test set (the
    F-score would be optimistic; the SegMitos authors tuned on test). Blobs are found once per map; each grid point
    only filters them, and is scored with ``metrics.mitosis.mitosis_f1`` (one-to-one matching, counts pooled over
    images). Ties go to the higher score threshold, then the higher area threshold (fewer detections).

    Args:
        prob_maps: (H, W) mitosis probability maps of the validation HPFs.
        truths: (M, 2) ground-truth (x, y) per HPF, HPF px.
        mpp: resolution of maps and HPFs, um/px.
        radius_px: matching radius, px (30 px = 7.5 um at 0.25 um/px; 20 px for MITOS 2012).
        sigma_um: Gaussian smoothing, um.
        score_grid: candidate ``min_mean_score`` values; default 0, 0.05, ..., 0.95.
        area_grid_um2: candidate ``min_area_um2`` values, um^2; default 0, 2.5, ..., 50.

    Returns:
        ``min_mean_score``, ``min_area_um2``, ``f1``, ``precision``, ``recall``, ``tp``, ``fp``, ``fn`` at the best
        point, and ``grid``: one dict per grid point with the two thresholds and the same scores.
    """
    if len(prob_maps) != len(truths):
        raise ValueError(f"{len(prob_maps)} probability maps for {len(truths)} ground truths")
    if not len(prob_maps):
        raise ValueError("tune_thresholds needs at least one validation HPF")
    scores = np.round(np.arange(20) * 0.05, 2) if score_grid is None else np.asarray(score_grid, np.float64)
    areas = np.arange(21) * 2.5 if area_grid_um2 is None else np.asarray(area_grid_um2, np.float64)
    blobs = [mitosis_blobs(_as_map(p), mpp, mpp, sigma_um=sigma_um) for p in prob_maps]
    grid = []
    for s in scores:
        for a in areas:
            images = [(truth, b[(b[:, 0] > s) & (b[:, 3] > a), 1:3], None) for truth, b in zip(truths, blobs)]
            counts = mitosis_f1(images, radius_px=radius_px)
            grid.append({"min_mean_score": float(s), "min_area_um2": float(a), **counts.as_dict()})
    best = max(grid, key=lambda g: (g["f1"], g["min_mean_score"], g["min_area_um2"]))
    return {**best, "grid": grid}


def write_detections(path: str | os.PathLike, detections: np.ndarray) -> None:
    """Write (N, 3) ``[x, y, score]`` detections as header-less ``x,y,score`` CSV rows, atomically.

    Args:
        path: output CSV.
        detections: (N, 3) x, y in HPF px and score, as from :func:`detect_mitoses`.
    """
    detections = np.asarray(detections, dtype=np.float64).reshape(-1, 3)
    write_points_csv(path, detections[:, :2], order="xy", scores=detections[:, 2])


def write_circle_overlay_png(path: str | os.PathLike, image: np.ndarray, detections: np.ndarray,
                             truth: np.ndarray | None = None, radius_px: float = 30.0, width_px: int = 3) -> None:
    """Draw detections (and ground truth) as circles on an HPF and save it as PNG, atomically.

    With ``truth``: true positives green, false positives red, missed mitoses blue, split by the one-to-one
    matching of ``metrics.mitosis.match_points``. Without it every detection is yellow.

    Args:
        path: output PNG.
        image: (H, W, 3) uint8 HPF.
        detections: (N, 2) or (N, 3) x, y (and score) in HPF px.
        truth: (M, 2) ground-truth x, y in HPF px, or None.
        radius_px: circle radius and matching radius, px (the circle shows where a match was allowed).
        width_px: line width, px.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    det_xy = np.asarray(detections, dtype=np.float64).reshape(len(detections), -1)[:, :2]
    circles: list[tuple[np.ndarray, tuple[int, int, int]]]
    if truth is None:
        circles = [(xy, DETECTION_COLOUR) for xy in det_xy]
    else:
        truth_xy = np.asarray(truth, dtype=np.float64).reshape(-1, 2)
        pairs = match_points(truth_xy, det_xy, radius_px)
        matched_det, matched_truth = set(pairs[:, 1].tolist()), set(pairs[:, 0].tolist())
        circles = ([(xy, TP_COLOUR if j in matched_det else FP_COLOUR) for j, xy in enumerate(det_xy)]
                   + [(xy, FN_COLOUR) for i, xy in enumerate(truth_xy) if i not in matched_truth])
    canvas = Image.fromarray(image.astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for (x, y), colour in circles:
        draw.ellipse((x - radius_px, y - radius_px, x + radius_px, y + radius_px), outline=colour, width=width_px)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
