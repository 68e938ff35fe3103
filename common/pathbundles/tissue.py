"""Tissue masks at about 8 um/px and tile listing over them, on a "mask with an mpp over a level-0 frame" grid.

As in ScanNet's pre-processing (multi-level mapping), Otsu thresholding runs on a low-resolution view of the slide
and its result is mapped back to level 0 by the mask's downsample; nothing full-resolution is read.

A :class:`LevelMask` pixel (r, c) covers the level-0 square ``[c*d, (c+1)*d) x [r*d, (r+1)*d)`` with
``d = mpp / level0_mpp`` (the same convention as :func:`pathbundles.annotations.rasterize`), so tissue masks, user
masks and rasterised annotations share one grid, one tile listing and one lookup.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
from PIL import Image, PngImagePlugin
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import disk

from pathbundles.annotations import EXCLUSION_GROUPS, Annotation, rasterize
from pathbundles.atomic import atomic_path
from pathbundles.errors import InputError

# PNG text key under which save_png stores the mask's geometry, so load_mask needs no mpp for its own masks.
_PNG_KEY = "pathbundles.level_mask"
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class SlideLike(Protocol):
    """What this module uses of :class:`pathbundles.wsi.Slide`."""

    level_dimensions: Sequence[tuple[int, int]]
    mpp: tuple[float, float]

    def read_thumbnail(self, mpp: float) -> tuple[np.ndarray, float]: ...


def _mean_mpp(mpp: float | Sequence[float]) -> float:
    """One um/px value from a number or (mpp_x, mpp_y); slides are square-pixelled to well under 1 %."""
    return float(np.mean(mpp))


@dataclass(eq=False)  # a generated __eq__ would compare numpy arrays with ==, which has no truth value
class LevelMask:
    """A 2-D mask at ``mpp`` um/px covering a slide's level-0 frame, anchored at level-0 (0, 0).

    Args:
        mask: (H, W) array; nonzero = foreground (tissue, or an annotation label).
        mpp: um per mask pixel.
        level0_mpp: um per level-0 pixel.
        level0_size: the slide's level-0 (width, height) in pixels. The mask may be a pixel larger or smaller than
            ``level0_size / downsample`` (rounding, padded levels); positions outside it read as 0.
    """

    mask: np.ndarray
    mpp: float
    level0_mpp: float
    level0_size: tuple[int, int]

    def __post_init__(self) -> None:
        self.mask = np.asarray(self.mask)
        if self.mask.ndim != 2:
            raise ValueError(f"mask must be 2-D (H, W), got shape {self.mask.shape}")
        self.mpp, self.level0_mpp = float(self.mpp), float(self.level0_mpp)
        if not (self.mpp > 0 and self.level0_mpp > 0):
            raise ValueError(f"mpp and level0_mpp must be positive um/px, got {self.mpp} and {self.level0_mpp}")
        self.level0_size = (int(self.level0_size[0]), int(self.level0_size[1]))

    @property
    def downsample(self) -> float:
        """Level-0 pixels per mask pixel."""
        return self.mpp / self.level0_mpp

    @classmethod
    def from_annotations(cls, annotations: Iterable[Annotation], level0_size: tuple[int, int], level0_mpp: float,
                         mpp: float, *, label_of: Mapping[str, int] | Callable[[Annotation], int] | None = None,
                         exclude_groups: Sequence[str] = EXCLUSION_GROUPS) -> LevelMask:
        """Rasterise annotations over the whole slide frame (see :func:`pathbundles.annotations.rasterize`).

        Args:
            annotations: annotations in level-0 pixels (x, y).
            level0_size: the slide's level-0 (width, height) in pixels.
            level0_mpp: um per level-0 pixel.
            mpp: um per mask pixel (e.g. 0.243 * 32 for a Camelyon16 level-5 mask).
            label_of, exclude_groups: as for ``rasterize``.
        """
        downsample = mpp / level0_mpp
        shape_hw = (math.ceil(level0_size[1] / downsample), math.ceil(level0_size[0] / downsample))
        labels = rasterize(annotations, shape_hw, downsample, label_of=label_of, exclude_groups=exclude_groups)
        return cls(labels, mpp, level0_mpp, level0_size)

    @classmethod
    def load_mask(cls, path: str | os.PathLike, level0_size: tuple[int, int], level0_mpp: float,
                  mpp: float | None = None) -> LevelMask:
        """Load a user-supplied mask image (PNG, TIFF, anything PIL reads) covering a slide's level-0 frame.

        Args:
            path: single-channel image (an RGB image whose three channels are equal is also accepted).
            level0_size: the slide's level-0 (width, height) in pixels.
            level0_mpp: um per level-0 pixel.
            mpp: um per mask pixel. When None, a PNG written by :meth:`save_png` gives its own; otherwise it is
                inferred from the size, which must then have the slide's aspect ratio (to 1 % plus a pixel of
                rounding). Pass it for padded or cropped masks.

        Raises:
            InputError: unreadable file, colour image, a mask made for a slide of another size, or a size whose
                aspect ratio does not fit the slide, naming the file.
        """
        array, stored = read_mask_image(path), _stored_geometry(path)
        w0, h0 = int(level0_size[0]), int(level0_size[1])
        height, width = array.shape
        if stored is not None and mpp is None:
            if tuple(stored.get("level0_size", ())) != (w0, h0):
                raise InputError(path, f"mask was made for a slide of level-0 size {stored.get('level0_size')}, "
                                       f"this slide is {w0} x {h0} (w x h)")
            mpp = float(stored["mpp"])
        if mpp is None:
            downsample = (w0 / width + h0 / height) / 2
            for mask_px, slide_px, axis in ((width, w0, "width"), (height, h0, "height")):
                if abs(slide_px / downsample - mask_px) > 1 + 0.01 * mask_px:
                    raise InputError(path, f"mask size {width} x {height} (w x h) does not fit the slide's level-0 "
                                           f"size {w0} x {h0}: aspect ratio {width / height:.4f} vs "
                                           f"{w0 / h0:.4f} ({axis} off); a mask image must cover the whole slide "
                                           "at one scale (pad or crop it to the slide's aspect ratio; the masks "
                                           "of pathbundles tissue record their own geometry)")
            mpp = downsample * level0_mpp
        return cls(array, mpp, level0_mpp, (w0, h0))

    @classmethod
    def from_image(cls, path: str | os.PathLike, slide: SlideLike, mpp: float | None = None) -> LevelMask:
        """:meth:`load_mask` with the level-0 size and mpp taken from an open slide."""
        return cls.load_mask(path, slide.level_dimensions[0], _mean_mpp(slide.mpp), mpp)

    def save_png(self, path: str | os.PathLike) -> None:
        """Write the mask as an 8-bit PNG (boolean masks as 0/255), atomically, with its geometry in a text chunk.

        Raises:
            ValueError: a label mask with values outside 0..255.
        """
        if self.mask.dtype == bool:
            pixels = self.mask.astype(np.uint8) * 255
        elif self.mask.size and (self.mask.min() < 0 or self.mask.max() > 255):
            raise ValueError(f"{path}: mask values {self.mask.min()}..{self.mask.max()} do not fit an 8-bit PNG")
        else:
            pixels = self.mask.astype(np.uint8)
        info = PngImagePlugin.PngInfo()
        info.add_text(_PNG_KEY, json.dumps({"mpp": self.mpp, "level0_mpp": self.level0_mpp,
                                            "level0_size": list(self.level0_size)}))
        with atomic_path(path) as tmp:
            Image.fromarray(pixels).save(tmp, format="PNG", pnginfo=info)

    def at_level0(self, x: float | np.ndarray, y: float | np.ndarray) -> Any:
        """Mask value(s) at level-0 position(s) (x, y); 0 (False) outside the mask.

        Args:
            x, y: level-0 pixel coordinates, scalars or arrays of the same shape.

        Returns:
            A scalar for scalar input, else an array of the broadcast shape, of the mask's dtype.
        """
        c = np.floor(np.asarray(x, dtype=np.float64) / self.downsample).astype(np.int64)
        r = np.floor(np.asarray(y, dtype=np.float64) / self.downsample).astype(np.int64)
        height, width = self.mask.shape
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        out = np.zeros(np.broadcast(r, c).shape, dtype=self.mask.dtype)
        out[inside] = self.mask[np.broadcast_to(r, out.shape)[inside], np.broadcast_to(c, out.shape)[inside]]
        return out[()] if out.ndim == 0 else out

    def tile_origins(self, tile_px: int, stride_px: int, tile_mpp: float,
                     min_tissue_fraction: float = 0.0) -> np.ndarray:
        """Level-0 origins of the grid tiles whose footprint on the mask holds foreground.

        The grid is anchored at level-0 (0, 0): tile (i, j) starts at ``(j * s, i * s)`` with
        ``s = stride_px * tile_mpp / level0_mpp`` level-0 pixels, for every start inside the level-0 frame (tiles at
        the right and bottom edges may reach past it). A tile's footprint is every mask pixel its level-0 square
        overlaps with positive area (pixels beyond the mask count as background), so the default keeps any tile
        that touches foreground.

        Args:
            tile_px: tile side in pixels at ``tile_mpp``.
            stride_px: grid step in pixels at ``tile_mpp``.
            tile_mpp: um/px at which tiles are read.
            min_tissue_fraction: keep tiles whose foreground fraction of the footprint is above this (0..1).

        Returns:
            float64 (N, 2) level-0 (x, y) origins ``(j * s, i * s)``, exact (not rounded: at 0.2265 um/px a tile of
            256 px at 0.5 um/px is 565.12 level-0 px), row by row (y, then x, ascending); (0, 2) when no tile
            qualifies.
        """
        if not (tile_px > 0 and stride_px > 0 and tile_mpp > 0):
            raise ValueError(f"tile_px, stride_px and tile_mpp must be positive, got {tile_px}, {stride_px}, "
                             f"{tile_mpp}")
        scale = tile_mpp / self.level0_mpp
        tile0, stride0 = tile_px * scale, stride_px * scale
        starts_x = np.arange(math.ceil(self.level0_size[0] / stride0)) * stride0
        starts_y = np.arange(math.ceil(self.level0_size[1] / stride0)) * stride0
        cols, col_area = self._footprints(starts_x, tile0, self.mask.shape[1])
        rows, row_area = self._footprints(starts_y, tile0, self.mask.shape[0])
        foreground = self.mask != 0
        keep = np.zeros((len(starts_y), len(starts_x)), dtype=bool)
        # One row band at a time: a running sum over columns per band costs O(W) memory, not an (H, W) integral image.
        for i, (r0, r1) in enumerate(rows):
            if r1 <= r0:
                continue
            band = np.concatenate([[0], np.cumsum(foreground[r0:r1].sum(axis=0))])
            counts = band[cols[:, 1]] - band[cols[:, 0]]
            keep[i] = counts / (row_area[i] * col_area) > min_tissue_fraction
        iy, ix = np.nonzero(keep)
        return np.stack([starts_x[ix], starts_y[iy]], axis=1).astype(np.float64).reshape(-1, 2)

    def _footprints(self, starts: np.ndarray, tile0: float, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Mask index spans [lo, hi) overlapped by level-0 intervals [start, start + tile0), clipped to the mask,
        and the unclipped span lengths (the footprint area along this axis)."""
        # The epsilon keeps a tile that ends exactly on a mask pixel edge from claiming the next pixel by rounding.
        lo = np.floor(starts / self.downsample + 1e-9).astype(np.int64)
        hi = np.ceil((starts + tile0) / self.downsample - 1e-9).astype(np.int64)
        return np.stack([np.clip(lo, 0, size), np.clip(hi, 0, size)], axis=1), np.maximum(hi - lo, 1)


@dataclass(eq=False)
class TissueMask(LevelMask):
    """A boolean :class:`LevelMask`: True = tissue. Any nonzero value of a loaded or given mask is tissue."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.mask = self.mask != 0


def tissue_mask(slide: SlideLike, mpp: float = 8.0, *, min_object_um2: float = 20_000.0,
                min_hole_um2: float = 20_000.0, closing_um: float = 16.0, method: Literal["otsu", "otsu_grey"] = "otsu",
                min_contrast: float = 12.0, pen_margin: float = 15.0) -> TissueMask:
    """Otsu tissue mask of a slide from its thumbnail at about ``mpp`` um/px.

    The thresholded channel is, for ``method="otsu"``, the chroma max(RGB) - min(RGB): tissue is coloured, while
    white background, grey glass, black padding and black marker ink all have low chroma (HSV saturation would
    amplify the noise of dark pixels). ``"otsu_grey"`` thresholds darkness 255 - grey instead, for faint stains;
    near-black pixels (every channel < 50) count as background there.
    The channel is smoothed (Gaussian, 1 px), thresholded at max(Otsu, background + ``min_contrast``) where the
    background is the channel's 1st percentile, so a blank or near-constant slide gives no tissue instead of
    thresholded noise. Pixels where green is not the weakest channel by more than ``pen_margin`` are dropped:
    haematoxylin and eosin both absorb green most, green and blue pen ink do not. Then a closing with a disk of
    radius ``closing_um``, filling of holes smaller than ``min_hole_um2`` and removal of objects smaller than
    ``min_object_um2`` (8-connected).

    Args:
        slide: an open :class:`pathbundles.wsi.Slide` (or anything with ``level_dimensions``, ``mpp`` and
            ``read_thumbnail``).
        mpp: wanted mask resolution in um/px; the mask gets the thumbnail's actual mpp.
        min_object_um2: smallest tissue piece kept, in um^2 (20 000 um^2 ~ a 160 um disc).
        min_hole_um2: holes smaller than this (um^2) are filled.
        closing_um: radius of the closing disk in um; 0 disables it.
        method: "otsu" (chroma) or "otsu_grey" (darkness).
        min_contrast: the threshold is at least this far above the background level (channel units, 0..255).
        pen_margin: green above min(red, blue) by more than this (0..255) marks pen ink, not tissue.

    Returns:
        TissueMask over the slide's level-0 frame; all False when the slide shows no tissue.
    """
    if method not in ("otsu", "otsu_grey"):
        raise ValueError(f"method must be 'otsu' or 'otsu_grey', not {method!r}")
    rgb, actual_mpp = slide.read_thumbnail(mpp)
    actual_mpp = _mean_mpp(actual_mpp)
    result = TissueMask(np.zeros(rgb.shape[:2], dtype=bool), actual_mpp, _mean_mpp(slide.mpp),
                        slide.level_dimensions[0])
    # uint8 arithmetic throughout: a Camelyon16 slide at 8 um/px is over 20 million thumbnail pixels.
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    if method == "otsu":
        channel = np.maximum(np.maximum(red, green), blue) - np.minimum(np.minimum(red, green), blue)
    else:
        channel = 255 - (0.299 * red + 0.587 * green + 0.114 * blue).astype(np.uint8)
        # Black padding and black ink are the darkest thing on a slide; without this they would take Otsu's split.
        channel[np.maximum(np.maximum(red, green), blue) < 50] = 0
    channel = ndimage.gaussian_filter(channel, sigma=1.0, mode="nearest")
    # Histogram statistics need no more than a few million samples; a regular subsample keeps them deterministic.
    step = max(1, math.isqrt(channel.size // 4_000_000))
    hist = np.bincount(channel[::step, ::step].ravel(), minlength=256)
    floor = int(np.searchsorted(np.cumsum(hist), 0.01 * hist.sum())) + min_contrast
    if channel.max() <= floor:
        return result
    threshold = max(float(threshold_otsu(hist=(hist, np.arange(256)))), floor)
    pen = green.astype(np.int16) - np.minimum(red, blue) > pen_margin
    tissue = (channel > threshold) & ~pen
    if not tissue.any():
        return result

    # Morphology on the tissue's bounding box only (most of a slide is background), with a margin for the closing.
    radius = max(0, round(closing_um / actual_mpp))
    rows, cols = np.nonzero(tissue.any(axis=1))[0], np.nonzero(tissue.any(axis=0))[0]
    r0, r1 = max(0, rows[0] - radius - 1), min(tissue.shape[0], rows[-1] + radius + 2)
    c0, c1 = max(0, cols[0] - radius - 1), min(tissue.shape[1], cols[-1] + radius + 2)
    crop = tissue[r0:r1, c0:c1]
    if radius >= 1:
        # Edge padding lets tissue that touches the image border close like tissue inside the image.
        padded = np.pad(crop, radius + 1, mode="edge")
        crop = ndimage.binary_closing(padded, structure=disk(radius))[radius + 1:-radius - 1, radius + 1:-radius - 1]
    pixel_um2 = actual_mpp ** 2
    crop = _drop_small_objects(_fill_small_holes(crop, min_hole_um2 / pixel_um2), min_object_um2 / pixel_um2)
    result.mask[r0:r1, c0:c1] = crop
    return result


_EIGHT = np.ones((3, 3), dtype=bool)


def _drop_small_objects(mask: np.ndarray, min_px: float) -> np.ndarray:
    labels, n = ndimage.label(mask, structure=_EIGHT)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


def _fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Fill background components smaller than ``max_px`` that do not touch the border (a hole is enclosed)."""
    # Background is 4-connected where tissue is 8-connected, so a diagonal tissue gap does not open a hole.
    labels, n = ndimage.label(~mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    fill = sizes < max_px
    fill[0] = False
    fill[np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))] = False
    return mask | fill[labels]


def read_mask_image(path: str | os.PathLike, allow_colour: bool = False) -> np.ndarray:
    """Read a mask or label map (PNG or anything PIL reads; TIFF, first page, via tifffile) as a 2-D array.

    The one reader of mask images for tissue masks, FROC ground truth and segmentation label maps. Grey stored as
    RGB(A) reads as its first channel; an alpha channel is ignored.

    Args:
        path: the image file.
        allow_colour: read a colour image as "any colour channel > 0" (a coloured tumour mask still reads as
            tumour) instead of refusing it.

    Raises:
        InputError: naming the file, when it is not a readable image, is colour (unless allowed) or is not 2-D.
    """
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic in _TIFF_MAGIC:
            import tifffile  # PIL does not decode tiled or JPEG-compressed TIFFs reliably

            array = tifffile.imread(path, key=0)
        else:
            with Image.open(path) as image:
                array = np.asarray(image)
    except Exception as err:  # PIL and tifffile raise many types for a file that is not an image
        raise InputError(path, f"not a readable image ({type(err).__name__}: {err})") from None
    if array.ndim == 3 and array.shape[-1] in (2, 3, 4):
        colour = array[..., : 3 if array.shape[-1] >= 3 else 1]
        if (colour == colour[..., :1]).all():
            array = colour[..., 0]
        elif allow_colour:
            array = (colour > 0).any(axis=-1).astype(np.uint8)
        else:
            raise InputError(path, f"mask must be single-channel (or grey RGB), got a colour image {array.shape}")
    if array.ndim != 2:
        raise InputError(path, f"expected a 2-D mask or label image, got an array of shape {array.shape}")
    return array


def _stored_geometry(path: str | os.PathLike) -> dict[str, Any] | None:
    """The geometry :meth:`LevelMask.save_png` stored in a PNG's text chunk, or None."""
    try:
        with Image.open(path) as image:
            text = image.info.get(_PNG_KEY)
    except OSError:
        return None
    return json.loads(text) if text else None
