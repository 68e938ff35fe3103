"""Probability map -> detections: ScanNet components, spatial_lstm non-maximum suppression, SegMitos blobs.

Every function takes the map, its resolution (``map_mpp``, um per map pixel) and the slide's level-0 resolution
(``level0_mpp``), plus optionally ``origin_xy``, and returns positions in level-0 pixels of the slide.

Coordinates are continuous level-0 coordinates in which level-0 pixel ``i`` spans ``[i, i + 1)``, so a position
``x`` lies in level-0 pixel ``floor(x)`` and in pixel ``floor(x / d)`` of a mask downsampled by ``d`` (the
Camelyon16 hit test). Map pixel ``(row, col)`` has its centre at ``origin_xy + (col, row) * step_px`` with
``step_px = map_mpp / level0_mpp``. The default origin ``(step_px / 2, step_px / 2)`` describes a map whose pixel
``k`` covers level-0 pixels ``[k * step_px, (k + 1) * step_px)``; a ScanNet map (Eq. 4: map index ``k`` -> level-0
``k * Sd + Lf / 2``) has ``step_px = Sd`` and ``origin_xy = (Lf / 2, Lf / 2)`` plus the scanned region's offset.

Detections come back as float64 arrays ``(N, 3)`` of ``[score, x, y]`` (the Camelyon16 CSV column order), sorted by
score, highest first (ties keep raster order).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pathbundles.checks import probability

# 8-connectivity for 2-D labelling.
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class MapGeometry:
    """Where the pixels of a map lie on the slide.

    Args:
        step_px: level-0 pixels per map pixel (``map_mpp / level0_mpp``).
        origin_xy: level-0 (x, y) of the centre of map pixel (0, 0).
    """

    step_px: float
    origin_xy: tuple[float, float]

    @classmethod
    def from_mpp(cls, map_mpp: float, level0_mpp: float,
                 origin_xy: tuple[float, float] | None = None) -> MapGeometry:
        """Geometry of a map at ``map_mpp`` um/px on a slide at ``level0_mpp`` um/px.

        Args:
            map_mpp: micrometres per map pixel.
            level0_mpp: micrometres per level-0 pixel of the slide.
            origin_xy: level-0 (x, y) of map pixel (0, 0)'s centre; default ``(step_px / 2, step_px / 2)``.
        """
        if map_mpp <= 0 or level0_mpp <= 0:
            raise ValueError(f"map_mpp and level0_mpp must be > 0 um/px, got {map_mpp} and {level0_mpp}")
        step = map_mpp / level0_mpp
        origin = (step / 2.0, step / 2.0) if origin_xy is None else (float(origin_xy[0]), float(origin_xy[1]))
        return cls(step_px=step, origin_xy=origin)

    def to_level0(self, rc: np.ndarray) -> np.ndarray:
        """Map (row, col) positions, shape (N, 2), possibly fractional -> level-0 (x, y), shape (N, 2)."""
        rc = np.asarray(rc, dtype=np.float64).reshape(-1, 2)
        x = self.origin_xy[0] + rc[:, 1] * self.step_px
        y = self.origin_xy[1] + rc[:, 0] * self.step_px
        return np.stack([x, y], axis=1)


def _as_map(prob: np.ndarray) -> np.ndarray:
    prob = np.asarray(prob)
    if prob.ndim != 2:
        raise ValueError(f"expected a 2-D probability map (H, W), got shape {prob.shape}")
    # Keep float32/float16 maps as they are: a whole-slide map in float64 doubles the memory for nothing.
    return prob if np.issubdtype(prob.dtype, np.floating) else prob.astype(np.float32)


def _detections(scores: np.ndarray, xy: np.ndarray, *extra: np.ndarray) -> np.ndarray:
    """Stack [score, x, y, *extra] rows, highest score first (stable, so ties keep raster order)."""
    columns = [np.asarray(scores, np.float64).reshape(-1), xy[:, 0], xy[:, 1],
               *(np.asarray(e, np.float64) for e in extra)]
    table = np.stack(columns, axis=1) if len(columns[0]) else np.zeros((0, len(columns)))
    return table[np.argsort(-table[:, 0], kind="stable")]


def _disk(radius: float) -> np.ndarray:
    r = int(np.floor(radius))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (yy * yy + xx * xx) <= radius * radius


#: Probabilities within this of a component's maximum tie with it for the detection's position
#: (:func:`detections_from_components`); float32 resolves about 6e-8 near 1.
POSITION_TIE = 1e-6


def detections_from_components(prob: np.ndarray, map_mpp: float, level0_mpp: float,
                               origin_xy: tuple[float, float] | None = None, threshold: float = 0.5,
                               opening_px: int = 1) -> np.ndarray:
    """ScanNet post-processing: threshold, morphological opening, 8-connected components, one detection each.

    Each component gives one detection whose score is the component's maximum probability, placed at the first
    pixel in raster order within :data:`POSITION_TIE` of that maximum. The tolerance keeps a saturated or flat
    maximum in place across runtimes: such a maximum is a plateau whose exact float values depend on how the network
    ran (folded, channels_last, TorchScript, ONNX, bfloat16); before, ``ndimage.maximum_position`` took an undefined
    pixel of an exact tie, so one ulp could move the detection across the lesion. All labels 1..n are used (the
    background label 0 is not a component).

    Args:
        prob: (H, W) probability map.
        map_mpp: micrometres per map pixel.
        level0_mpp: micrometres per level-0 pixel of the slide.
        origin_xy: level-0 (x, y) of map pixel (0, 0)'s centre (see the module docstring for the default).
        threshold: a pixel is foreground when its probability exceeds this (> threshold; ScanNet uses 0.5); in
            [0, 1].
        opening_px: radius in map pixels of the disk used for the opening; 0 = no opening. In map pixels, not um,
            because the opening removes single-pixel noise of the map grid itself.

    Returns:
        (N, 3) float64 ``[score, x, y]`` in level-0 pixels, highest score first.
    """
    threshold = probability(threshold, "threshold")
    prob = _as_map(prob)
    geometry = MapGeometry.from_mpp(map_mpp, level0_mpp, origin_xy)
    foreground = prob > threshold
    if opening_px > 0:
        foreground = ndimage.binary_opening(foreground, structure=_disk(opening_px))
    labels, n = ndimage.label(foreground, structure=_EIGHT)
    if n == 0:
        return np.zeros((0, 3))
    index = np.arange(1, n + 1)
    scores = np.asarray(ndimage.maximum(prob, labels, index), dtype=np.float64).reshape(-1)
    top = np.concatenate([[np.inf], scores])  # per label; the background (0) ties with nothing
    # The first near-maximum pixel of each label in raster order (flatnonzero is ascending; np.unique's index is the
    # first occurrence). ndimage.maximum_position is not used: on ties it returns no defined pixel.
    candidates = np.flatnonzero((labels > 0) & (prob >= top[labels] - POSITION_TIE))
    _, first = np.unique(labels.reshape(-1)[candidates], return_index=True)
    positions = np.stack(np.divmod(candidates[first], prob.shape[1]), axis=1).astype(np.float64)
    return _detections(scores, geometry.to_level0(positions))


def non_maximum_suppression(prob: np.ndarray, map_mpp: float, level0_mpp: float, radius_um: float,
                            threshold: float = 0.5, origin_xy: tuple[float, float] | None = None) -> np.ndarray:
    """spatial_lstm / NCRF post-processing: take the maximum, emit it, zero a disk around it, repeat.

    Stops when no remaining value exceeds ``threshold``. Equivalent to the repeated-argmax loop (ties are taken in
    raster order, as ``argmax`` does) but visits the candidates once in sorted order, so it costs one sort plus one
    disk per detection instead of one full-map scan per detection.

    Args:
        prob: (H, W) probability map.
        map_mpp: micrometres per map pixel.
        level0_mpp: micrometres per level-0 pixel of the slide.
        radius_um: suppression radius in micrometres; map pixels whose centre lies within this distance (<=) of the
            emitted maximum are zeroed.
        threshold: values must exceed this (>) to be emitted; in [0, 1] (>= 0 so that zeroed pixels never qualify).
        origin_xy: level-0 (x, y) of map pixel (0, 0)'s centre.

    Returns:
        (N, 3) float64 ``[score, x, y]`` in level-0 pixels, highest score first.
    """
    threshold = probability(threshold, "threshold")
    if radius_um < 0:
        raise ValueError(f"radius_um must be >= 0, got {radius_um}")
    prob = _as_map(prob)
    geometry = MapGeometry.from_mpp(map_mpp, level0_mpp, origin_xy)
    flat = np.flatnonzero(prob > threshold)
    values = prob.reshape(-1)[flat]
    order = flat[np.argsort(-values, kind="stable")]
    disk = _disk(radius_um / map_mpp)
    r = disk.shape[0] // 2
    height, width = prob.shape
    suppressed = np.zeros(prob.shape, dtype=bool)
    kept: list[int] = []
    for index in order:
        row, col = divmod(int(index), width)
        if suppressed[row, col]:
            continue
        kept.append(int(index))
        r0, r1 = max(row - r, 0), min(row + r + 1, height)
        c0, c1 = max(col - r, 0), min(col + r + 1, width)
        suppressed[r0:r1, c0:c1] |= disk[r0 - row + r:r1 - row + r, c0 - col + r:c1 - col + r]
    kept_index = np.asarray(kept, dtype=np.int64)
    rc = np.stack(np.divmod(kept_index, width), axis=1)
    return _detections(prob.reshape(-1)[kept_index], geometry.to_level0(rc))


def _blob_statistics(values: np.ndarray, labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel count, mean value and value-weighted centroid (row, col) of labels 1..n, over the labelled pixels only:
    what ``ndimage.sum_labels``, ``ndimage.mean`` and ``ndimage.center_of_mass`` give (the same float64 sums, added
    in the same raster order), without three passes over a map that is nearly all background."""
    rows, cols = np.nonzero(labels)
    label = labels[rows, cols]
    weight = values[rows, cols].astype(np.float64)
    count = np.bincount(label, minlength=n + 1)[1:].astype(np.float64)
    total = np.bincount(label, weights=weight, minlength=n + 1)[1:]
    centroid = np.stack([np.bincount(label, weights=weight * rows, minlength=n + 1)[1:] / total,
                         np.bincount(label, weights=weight * cols, minlength=n + 1)[1:] / total], 1)
    return count, total / count, centroid


def mitosis_blobs(prob: np.ndarray, map_mpp: float, level0_mpp: float,
                  origin_xy: tuple[float, float] | None = None, sigma_um: float = 1.0,
                  min_mean_score: float = 0.0, min_area_um2: float = 0.0) -> np.ndarray:
    """SegMitos post-processing: Gaussian smoothing, one Otsu threshold, 8-connected blobs, filter by score and area.

    The Otsu threshold is computed once over the whole smoothed map (the paper's holistic binarisation, never per
    patch). Blob score, area and probability-weighted centroid are all measured on the smoothed map, the map the
    blobs were cut from. With the default minimums every blob is returned, which is what tuning ``min_mean_score``
    and ``min_area_um2`` on a validation set needs (the paper's 200-500 px at 0.25 um/px is 12.5-31 um^2).

    Args:
        prob: (H, W) probability map of an HPF or slide region.
        map_mpp: micrometres per map pixel.
        level0_mpp: micrometres per level-0 pixel of the image the positions refer to.
        origin_xy: level-0 (x, y) of map pixel (0, 0)'s centre.
        sigma_um: standard deviation of the Gaussian in micrometres (the paper gives no value; 1 um = 4 px at
            0.25 um/px).
        min_mean_score: keep blobs whose mean score is strictly greater than this (the paper's s1), in [0, 1].
        min_area_um2: keep blobs whose area in um^2 is strictly greater than this (the paper's a1).

    Returns:
        (N, 4) float64 ``[mean_score, x, y, area_um2]`` in level-0 pixels, highest score first; the first three
        columns are the usual detections.
    """
    min_mean_score = probability(min_mean_score, "min_mean_score")
    prob = _as_map(prob)
    geometry = MapGeometry.from_mpp(map_mpp, level0_mpp, origin_xy)
    smooth = ndimage.gaussian_filter(prob.astype(np.float32), sigma=sigma_um / map_mpp) if sigma_um > 0 else prob
    if smooth.size == 0 or float(smooth.max()) <= float(smooth.min()):
        return np.zeros((0, 4))  # a constant map has no foreground, and Otsu is undefined on it
    from skimage.filters import threshold_otsu

    labels, n = ndimage.label(smooth > threshold_otsu(smooth), structure=_EIGHT)
    if n == 0:
        return np.zeros((0, 4))
    area_um2, mean, centroid = _blob_statistics(smooth, labels, n)
    area_um2 = area_um2 * map_mpp ** 2
    keep = (mean > min_mean_score) & (area_um2 > min_area_um2)
    return _detections(mean[keep], geometry.to_level0(centroid[keep]), area_um2[keep])
