"""Whole-slide images: one `Slide` interface over cuCIM, OpenSlide, a tile-aware tifffile reader and (in
`pathbundles.dicom_wsi`) wsidicom for DICOM series, local or over DICOMweb.

Conventions (see docs/ARCHITECTURE.md): positions are level-0 pixels as (x, y); region sizes are (width, height);
returned arrays are uint8 (H, W, 3) RGB; resolution is micrometres per pixel (mpp), never a level number. Pixels
outside the slide read as white (255) and RGBA is composited on white.

`Slide` holds all logic (level choice, reads at any mpp with anti-aliased resampling, bounds and padding,
validation, info, the level check); each backend subclass implements five small methods (`_open`, `_geometry`,
`_read_level`, `_file_mpp`, `_close`) and may override `_checked_path`, `_objective_power`, `_stored_bytes` and
`_tile_sizes`. MONAI is imported only when `TiledTiffWSIReader` is first used.

What a file claims is bounded before anything is read (`Slide._check_claims`, every backend): at most
`max_level0_px` level-0 pixels (default `MAX_LEVEL0_PX`, or `$PATHBUNDLES_MAX_LEVEL0_PX`), at most
`MAX_PX_PER_FILE_BYTE` level-0 pixels per byte of a single-file slide, every level within level 0, tiles of at
most `MAX_TILE_PX` where the backend reports them, and at its mpp no side longer than a glass slide
(`MAX_SCAN_UM`). The tifffile backend also checks each level's tile table (count, byte ranges, a least size per
compressed tile). A stated mpp that is implausible (outside 0.1-20 um/px, or far from 10 / objective power) is
logged as a warning naming the file; one that is no positive finite number states none.

Level check (every backend): a pyramid level other than 0 is used by level choice (reads at an mpp, thumbnails)
only after it agreed, once per process, with the next finer level that agreed, downsampled, on a small window
holding content (`Slide._check_level_agreement`, thresholds `LEVEL_CHECK_*`); a level that does not (a colour space
mislabelled by a converter, a shifted level) is skipped with one warning naming the slide, the level and the
difference. `Slide.read_level_region` reads the level it is given.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import importlib
import logging
import math
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pathbundles.errors import BackendRefusedError, SlideError
from pathbundles.resample import resample_area

BACKENDS = ("cucim", "openslide", "tifffile", "dicom")

#: Default limit on level-0 pixels (width x height); `$PATHBUNDLES_MAX_LEVEL0_PX` or ``max_level0_px=`` change it.
#: A Camelyon16 slide is 97792 x 221184 = 2.2e10 px; 1e11 leaves room for the largest 40x scans, while a header
#: claiming 10^6 x 10^6 px (which would make the tissue mask run for days) is refused.
MAX_LEVEL0_PX = 10**11
#: Level-0 pixels per byte of the file beyond which a single-file slide cannot be what it claims. Even a TIFF whose
#: tiles are all empty (sparse background) stores an offset and a byte count per tile: about 8 bytes per 256 x 256
#: tile, 8192 px per byte; a real slide with tissue stores far fewer pixels per byte (JPEG: below 512).
MAX_PX_PER_FILE_BYTE = 10**5
#: Most pixels one tile of a level may claim. Formats tile at 240 to 4096 px a side (NDPI: a level's width by 8
#: rows); OpenSlide allocates a whole tile (4 bytes a pixel) for each read and aborts the process when it cannot,
#: as it did on a header claiming tiles of 256 x 2^30 px.
MAX_TILE_PX = 1 << 28
#: Longest side in um a slide's level 0 may cover at its mpp (the file's or the override). Glass slides are 75 x 25
#: mm, large-format ones up to about 150 x 100 mm; an mpp that makes a slide larger is wrong, and a run would read
#: its tissue thumbnail (8 um/px) at billions of pixels a side.
MAX_SCAN_UM = 200_000.0
#: Level-0 mpp (um/px) a scanner can plausibly produce; a stated value outside is logged as suspect.
PLAUSIBLE_MPP = (0.1, 20.0)
#: How far (factor) a stated mpp may lie from 10 um / objective power (20x ~ 0.5, 40x ~ 0.25) before it is suspect;
#: 2.2 keeps the scanners that image 20x at 0.243 um/px (3DHistech) and 40x at 0.2282 um/px (Hamamatsu) quiet.
MPP_POWER_FACTOR = 2.2
#: Files whose level data lives beside them (MIRAX, Hamamatsu VMS, a DICOM series): their own size bounds nothing.
_MULTI_FILE_SUFFIXES = (".mrxs", ".vms", ".vmu", ".dcm")
#: The datalist/config keys that give a slide's level-0 mpp when its file states none or a wrong one.
MPP_HINT = ("set the slide's level-0 mpp: the bundle config key slide_mpp (--slide_mpp, also on pathbundles info and "
            "tissue) or the datalist item's 'mpp'")

#: A decimal number in an Aperio image description (``MPP = 0.2525``, ``AppMag = 40``); text such as ``MPP = -``
#: is no number and states nothing.
_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)"

logger = logging.getLogger(__name__)
_warned_mpp: set[tuple[str, tuple[float, float]]] = set()

# PIL needs a row band of source pixels per call; this bounds the memory of a whole-slide thumbnail read.
_THUMBNAIL_BAND_SOURCE_PX = 1 << 24
# OpenSlide's default tile cache is 32 MiB; the tifffile backend keeps the same budget so benchmarks compare alike.
_TILE_CACHE_BYTES = 32 << 20
#: Level check (`Slide._level_agrees`): a pyramid level other than 0 is read only after it was compared, once per
#: process, slide and level, with the next finer level that passed, on a window of at most LEVEL_CHECK_PX px a side
#: at the checked level (a few tiles: cheap even over DICOMweb), with the finer level's area about
#: LEVEL_CHECK_REFERENCE_PX px a side (the window shrinks for a level far coarser than its reference, down to
#: LEVEL_CHECK_MIN_PX; a level whose reference area would still exceed twice that, some 190 times coarser than the
#: last sound level after the levels between failed, is not used).
LEVEL_CHECK_PX = 256
LEVEL_CHECK_REFERENCE_PX = 2048
#: Smallest window (px a side) worth comparing; a level smaller than this is used unchecked.
LEVEL_CHECK_MIN_PX = 16
#: Coarsest level that is read whole (pixels) to find where the content is; above it 9 windows are tried.
LEVEL_CHECK_MAP_PX = 4 << 20
#: Shifts tried each way, in level px. Converters that round level sizes place a level's pixels up to
#: (k - 1) / k of a level px off (the reference's area average then still agrees within JPEG noise); a level
#: shifted by a whole px or more (a mis-set origin, a crop) is refused.
LEVEL_CHECK_MAX_SHIFT_PX = 2
#: How much lower (relative) the mean absolute difference at the best shift must be than in place for the level
#: to count as shifted: 25 % keeps flat content (glass, where every shift fits alike) and JPEG noise from looking
#: shifted, while a real 1 px shift of tissue roughly halves the difference.
LEVEL_CHECK_SHIFT_GAIN = 0.25
#: Largest difference (grey levels, 0-255) of a channel's mean over the window. JPEG at quality 80-95 and the
#: difference between a converter's filter and an area average move a channel's mean by under 2; YCbCr decoded as
#: RGB (the pink levels of a mislabelled pyramid) moves it by tens.
LEVEL_CHECK_COLOUR_TOLERANCE = 8.0
#: Largest mean absolute difference per pixel and channel (grey levels) at the best alignment. JPEG noise and
#: filter differences (Lanczos, bilinear, area) on tissue give 2-10; another image or scrambled tiles give 30+.
LEVEL_CHECK_PIXEL_TOLERANCE = 20.0
_LEVEL_CHECKS: dict[tuple[str, str, int], str] = {}  # (source, backend, level) -> problem, '' when it agrees
_LEVEL_CHECK_LOCK = threading.RLock()
# Relative mpp difference under which a level counts as the requested resolution in an exact read: float rounding
# only (mpp from rational TIFF tags, products of downsamples). Any real difference, even 0.01 %, is resampled.
_SAME_MPP_RTOL = 1e-6


class Slide(abc.ABC):
    """A whole-slide image opened by one backend; use `open_slide` to make one.

    Args:
        path: the slide file (for the DICOM backend also a series folder or a DICOMweb series URL).
        mpp: level-0 resolution in um/px, a number or (mpp_x, mpp_y); overrides the file's value (for files that
            store none, such as a single Camelyon16 level saved as TIFF).
        max_level0_px: most level-0 pixels (width x height) the file may claim; None = `$PATHBUNDLES_MAX_LEVEL0_PX`,
            else `MAX_LEVEL0_PX`.

    Attributes:
        source: the slide as given, as text (what messages name and pickling reopens).
        path: the slide file or folder as a Path; a DICOMweb URL stays text (`Path` would merge its '//').
        backend: "cucim", "openslide", "tifffile" or "dicom".
        vendor: the format as the backend names it ("aperio", "generic-tiff", ...).
        level_dimensions: [(width, height), ...] per level, in that level's pixels.
        level_downsamples: level-0 pixels per level pixel (never assumed 2**level): a whole k where the level's
            size is the level-0 size divided by k and rounded, either way, on both axes (scanners and converters
            decimate by whole factors, then round the size: SVS floors, others ceil), else the ratio of the sizes.
            Readers that take the ratio of the sizes (OpenSlide's "downsample", 3.9991 for a 4415 -> 1104 level)
            place the last pixels of such a level up to k - 1 level-0 pixels off.
        associated_images: names of non-pyramid images in the file (thumbnail, label, macro).
    """

    backend: str = ""
    _addressed_by_level0 = False  # True where _read_level goes through _level0_location (OpenSlide, cuCIM)

    def __init__(self, path: str | os.PathLike, mpp: float | tuple[float, float] | None = None,
                 max_level0_px: int | None = None) -> None:
        #: the slide as given (a path, or a DICOMweb URL that `Path` would mangle): messages and pickling use it
        self.source = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
        self.path = self._checked_path(self.source)
        if mpp is not None:
            try:
                mpp_xy = (float(mpp), float(mpp)) if np.isscalar(mpp) else tuple(float(v) for v in mpp)
            except (TypeError, ValueError):  # a datalist item's "mpp" may be any JSON: text, null, an object
                mpp_xy = ()
            if len(mpp_xy) != 2 or min(mpp_xy) <= 0 or not all(math.isfinite(v) for v in mpp_xy):
                raise SlideError(self.path, f"mpp override must be positive um/px, got {mpp!r}")
            mpp = mpp_xy
        self._mpp_override: tuple[float, float] | None = mpp
        self._max_level0_px = _max_level0_px(self.path, max_level0_px)
        try:
            self._open()
            dims, self.vendor, self.associated_images = self._geometry()
            if not dims:
                raise BackendRefusedError(self.path, f"the {self.backend} backend found no image levels")
            self.level_dimensions: list[tuple[int, int]] = [(int(w), int(h)) for w, h in dims]
            self._check_claims()
        except SlideError:
            self._safe_close()
            raise
        except ImportError as exc:
            raise BackendRefusedError(self.path, f"the {self.backend} backend is not installed ({exc})") from exc
        except Exception as exc:  # backends raise their own types; the caller needs the file and the cause
            self._safe_close()
            truncated = tiff_truncation(self.path)
            raise BackendRefusedError(self.path, truncated or f"not a whole-slide image the {self.backend} backend "
                                                              f"can read ({type(exc).__name__}: {exc})") from exc
        w0, h0 = self.level_dimensions[0]
        # OpenSlide's definition, the mean of the width and height ratios: how the OpenSlide and cuCIM backends
        # address a level (a level-0 position divided by it).
        self._size_ratios: list[float] = [(w0 / w + h0 / h) / 2 for w, h in self.level_dimensions]
        #: (x, y) level-0 pixels per level pixel, the level's geometry (see ``level_downsamples``).
        self._level_scales = _level_scales(self.level_dimensions)
        self.level_downsamples: list[float] = [(sx + sy) / 2 for sx, sy in self._level_scales]
        if mpp is None:
            self._warn_if_implausible_mpp()

    # ---- backend interface -------------------------------------------------------------------------------------

    @classmethod
    def _checked_path(cls, source: str) -> Path | str:
        """``source`` as the backend opens it, or SlideError naming it: one regular file for the file backends
        (`pathbundles.dicom_wsi.DicomSlide` also takes a folder or a DICOMweb URL)."""
        path = Path(source)
        if not path.is_file():
            raise SlideError(path, "file does not exist" if not path.exists() else "not a regular file")
        return path

    @abc.abstractmethod
    def _open(self) -> None:
        """Open the file; raise anything on failure (the base class turns it into a SlideError)."""

    @abc.abstractmethod
    def _geometry(self) -> tuple[list[tuple[int, int]], str, list[str]]:
        """Return ([(width, height) per level], vendor, associated image names)."""

    @abc.abstractmethod
    def _read_level(self, level: int, level_xy: tuple[int, int], size_px: tuple[int, int]) -> np.ndarray:
        """Return uint8 (h, w, 1|3|4) pixels of a region lying inside the level, position and size in level pixels."""

    def _level0_location(self, level: int, level_xy: tuple[int, int]) -> tuple[int, int]:
        """The whole level-0 position that backends addressed by level 0 (OpenSlide, cuCIM) take for level pixel
        ``level_xy``: they divide it by the level's size ratio (their downsample) to find the level pixel. Rounded
        up, so that they land on the pixel or up to 1 / ratio after it: OpenSlide then interpolates linearly between
        the stored pixels (measured), where before a pixel it does not."""
        ds = self._size_ratios[level]
        return math.ceil(level_xy[0] * ds - 1e-9), math.ceil(level_xy[1] * ds - 1e-9)

    def _level_offset(self, level: int, level_xy: tuple[int, int]) -> tuple[float, float]:
        """How far (x, y), in level pixels, the pixels ``_read_level`` returns for ``level_xy`` lie from it: 0 for
        backends that read stored pixels; a backend addressed by level 0 lands on a fractional level pixel (and
        interpolates) when the level's size ratio is not whole."""
        if not self._addressed_by_level0:
            return 0.0, 0.0
        location, ds = self._level0_location(level, level_xy), self._size_ratios[level]
        return location[0] / ds - level_xy[0], location[1] / ds - level_xy[1]

    @abc.abstractmethod
    def _file_mpp(self) -> tuple[float, float] | None:
        """Return the level-0 (mpp_x, mpp_y) in um/px the file states, or None."""

    @abc.abstractmethod
    def _close(self) -> None:
        """Release the backend's handles."""

    def _objective_power(self) -> float | None:
        """The scan's objective power (20, 40) as the file states it, or None."""
        return None

    def _tile_sizes(self) -> dict[int, tuple[int, int]]:
        """{level: (tile width, tile height) in px} of the levels whose tiles the backend reports."""
        return {}

    def _stated_mpp(self) -> tuple[float, float] | None:
        """The file's level-0 mpp (`_file_mpp`) when both values are positive and finite, else None: a resolution
        tag of 1/0 px per unit or an Aperio ``MPP = 1e999`` states nothing a run can use."""
        mpp = self._file_mpp()
        if mpp is None or not all(math.isfinite(v) and v > 0 for v in mpp):
            return None
        return mpp

    def _stored_bytes(self) -> int | None:
        """Bytes holding the slide's pixels: the file's size; None for formats whose levels live in other files."""
        if self.path.suffix.lower() in _MULTI_FILE_SUFFIXES:
            return None
        return self.path.stat().st_size

    # ---- what the file claims ----------------------------------------------------------------------------------

    def _check_claims(self) -> None:
        """Refuse geometry no real slide has, before anything is read (a hostile header would make reads run for
        days): levels within level 0, level-0 pixels within the limit and within what the file's bytes can hold,
        tiles of at most `MAX_TILE_PX`, and at its mpp no side longer than `MAX_SCAN_UM`."""
        w0, h0 = self.level_dimensions[0]
        for level, (w, h) in enumerate(self.level_dimensions):
            if w <= 0 or h <= 0 or w > w0 or h > h0:
                raise SlideError(self.path, f"level {level} claims {w} x {h} px, which is not a positive size within "
                                            f"level 0 ({w0} x {h0} px)")
        pixels = w0 * h0
        if pixels > self._max_level0_px:
            raise SlideError(self.path, f"claims {w0} x {h0} px at level 0 ({pixels:.3g} px), more than the "
                                        f"{self._max_level0_px:.3g} px a slide may have (raise the limit with "
                                        "$PATHBUNDLES_MAX_LEVEL0_PX or max_level0_px= if the slide is real)")
        stored = self._stored_bytes()
        if stored is not None and pixels > stored * MAX_PX_PER_FILE_BYTE:
            raise SlideError(self.path, f"claims {w0} x {h0} px at level 0 ({pixels:.3g} px) in a file of {stored} "
                                        f"bytes: {pixels / max(stored, 1):.3g} px per byte, where no slide format "
                                        f"stores more than {MAX_PX_PER_FILE_BYTE:.0e}; the header is corrupt")
        for level, (tile_w, tile_h) in self._tile_sizes().items():
            if tile_w * tile_h > MAX_TILE_PX:
                raise SlideError(self.path, f"level {level} claims tiles of {tile_w} x {tile_h} px, more than the "
                                            f"{MAX_TILE_PX:.3g} px a tile may have; the header is corrupt")
        mpp = self.file_mpp
        if mpp is not None and max(w0 * mpp[0], h0 * mpp[1]) > MAX_SCAN_UM:
            raise SlideError(self.path, f"{w0} x {h0} px at {mpp[0]:.4g} x {mpp[1]:.4g} um/px would be a scan of "
                                        f"{w0 * mpp[0] / 1e3:.4g} x {h0 * mpp[1] / 1e3:.4g} mm, larger than any glass "
                                        f"slide ({MAX_SCAN_UM / 1e3:g} mm a side); the mpp is wrong: {MPP_HINT}")

    def _warn_if_implausible_mpp(self) -> None:
        """Log a warning naming the file when its stated mpp is outside `PLAUSIBLE_MPP` or far from 10 / power."""
        stated = self._stated_mpp()
        if stated is None:
            return
        power = self._objective_power()
        mpp = sum(stated) / 2
        low, high = PLAUSIBLE_MPP
        if not low <= mpp <= high:
            why = f"outside the {low}-{high} um/px a scanner produces at level 0"
        elif power and not 10 / power / MPP_POWER_FACTOR <= mpp <= 10 / power * MPP_POWER_FACTOR:
            why = f"but the file also states objective power {power:g}x, which scans at about {10 / power:.3g} um/px"
        else:
            return
        key = (str(self.path), stated)
        if key not in _warned_mpp:  # once per file and process: DataLoader workers reopen slides many times
            _warned_mpp.add(key)
            logger.warning("%s: the file states a level-0 resolution of %.4g x %.4g um/px, %s; if it is wrong, %s",
                           self.path, stated[0], stated[1], why, MPP_HINT)

    # ---- geometry and resolution -------------------------------------------------------------------------------

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return self.level_dimensions[0]

    @property
    def file_mpp(self) -> tuple[float, float] | None:
        """Level-0 (mpp_x, mpp_y) in um/px: the override given to `open_slide`, else the file's value, else None."""
        return self._mpp_override or self._stated_mpp()

    @property
    def mpp(self) -> tuple[float, float]:
        """Level-0 (mpp_x, mpp_y) in um/px; raises SlideError naming the file when it is unknown."""
        mpp = self.file_mpp
        if mpp is None:
            raise SlideError(self.path, f"the slide states no resolution (mpp); {MPP_HINT}")
        return mpp

    def level_mpp(self, level: int) -> tuple[float, float]:
        """(mpp_x, mpp_y) in um/px of a pyramid level.

        Args:
            level: pyramid level index.
        """
        self._check_level(level)
        (mpp_x, mpp_y), (scale_x, scale_y) = self.mpp, self._level_scales[level]
        return mpp_x * scale_x, mpp_y * scale_y

    def info(self) -> dict[str, Any]:
        """JSON-ready summary: backend, vendor, levels (size, downsample, mpp), level-0 mpp or None, associated."""
        known = self.file_mpp is not None
        levels = [{"level": i, "width": w, "height": h, "downsample": self.level_downsamples[i],
                   "mpp": list(self.level_mpp(i)) if known else None}
                  for i, (w, h) in enumerate(self.level_dimensions)]
        return {"path": str(self.path), "backend": self.backend, "vendor": self.vendor,
                "level_count": self.level_count, "levels": levels,
                "mpp": list(self.mpp) if known else None, "associated_images": list(self.associated_images)}

    # ---- reads ---------------------------------------------------------------------------------------------------

    def read_level_region(self, level: int, level0_xy: tuple[int, int], size_px: tuple[int, int]) -> np.ndarray:
        """Read pixels of one pyramid level as they are stored.

        Args:
            level: pyramid level index.
            level0_xy: top-left corner (x, y) in level-0 pixels; the region starts at the level pixel nearest to
                level0_xy / downsample, so level pixel positions survive a round trip through level 0.
            size_px: (width, height) in pixels of `level`.

        Returns:
            uint8 array (height, width, 3), RGB; pixels outside the slide are white.
        """
        self._check_level(level)
        return self._read_stored(level, level0_xy, self._check_size(size_px))

    def read_region(self, level0_xy: tuple[float, float], size_px: tuple[int, int], mpp: float) -> np.ndarray:
        """Read a region at exactly ``mpp``.

        A pyramid level is returned as stored only when its mpp equals ``mpp`` on both axes (to float rounding,
        relative 1e-6); otherwise the covering region of the coarsest finer level is area-averaged to ``mpp``
        (each level pixel weighted by its overlap with the output pixel, :mod:`pathbundles.resample`: anti-aliased,
        and exact in position at any scale), or bilinearly upsampled when ``mpp`` is finer than level 0. So output
        pixel (i, j) always covers level-0 ``[x + j * s_x, x + (j + 1) * s_x) x [y + i * s_y, y + (i + 1) * s_y)``
        with ``s = mpp / level0_mpp``, whatever levels the file has (a 0.226 um/px scan has a 0.904 um/px level,
        not a 1.0 one). Use :meth:`read_region_near` to accept a nearby level as it is.

        Args:
            level0_xy: top-left corner (x, y) in level-0 pixels; fractional positions are honoured when resampling
                (and rounded to the nearest level pixel when a level is returned as stored).
            size_px: (width, height) of the output in pixels at ``mpp``.
            mpp: requested resolution in um/px.

        Returns:
            uint8 array (height, width, 3), RGB; pixels outside the slide are white.
        """
        mpp = self._check_mpp(mpp)
        return self._read_at_level(self._level_for(mpp), level0_xy, self._check_size(size_px), mpp)

    def read_region_near(self, level0_xy: tuple[float, float], size_px: tuple[int, int], mpp: float,
                         tolerance: float) -> tuple[np.ndarray, tuple[float, float]]:
        """Read a region at about ``mpp``, taking a pyramid level as stored when its mpp is within ``tolerance``.

        Snapping saves the resampling but changes the geometry: the caller must place the pixels with the actual
        mpp returned, never with ``mpp``.

        Args:
            level0_xy: top-left corner (x, y) in level-0 pixels.
            size_px: (width, height) of the output in pixels at the actual mpp.
            mpp: wanted resolution in um/px.
            tolerance: relative mpp difference accepted without resampling (0.1 = 10 %).

        Returns:
            (uint8 array (height, width, 3), actual (mpp_x, mpp_y) in um/px of its pixels): a level's own mpp, or
            ``(mpp, mpp)`` when no level is near enough and the region was resampled.
        """
        mpp = self._check_mpp(mpp)
        size = self._check_size(size_px)
        level = self._level_within(mpp, tolerance)
        if level is None:
            return self._read_at_level(self._level_for(mpp), level0_xy, size, mpp), (mpp, mpp)
        return self._read_stored(level, level0_xy, size), self.level_mpp(level)

    def read_thumbnail(self, mpp: float, tolerance: float = 0.1) -> tuple[np.ndarray, float]:
        """Read the whole slide at about ``mpp`` (for tissue masks and overlays, typically 8 um/px).

        Args:
            mpp: wanted resolution in um/px.
            tolerance: relative mpp difference for which a pyramid level is used as it is.

        Returns:
            (uint8 array (height, width, 3), actual mpp in um/px along x); a level taken as it is has its own mpp,
            otherwise the output size is rounded to whole pixels, so the actual mpp differs slightly from ``mpp``.
        """
        mpp = self._check_mpp(mpp)
        level = self._level_within(mpp, tolerance)
        (w0, h0), (mpp_x, mpp_y) = self.dimensions, self.mpp
        if level is not None:
            actual = self.level_mpp(level)[0]
            out_w, out_h = self.level_dimensions[level]
            source = level
        else:
            out_w, out_h = max(1, round(w0 * mpp_x / mpp)), max(1, round(h0 * mpp_y / mpp))
            actual = w0 * mpp_x / out_w
            source = self._level_for(actual)
        source_per_row = out_w * (actual / self.level_mpp(source)[0]) ** 2
        band = max(1, int(_THUMBNAIL_BAND_SOURCE_PX // source_per_row))
        # Level-0 rows per output row: the level's own along y when it is taken as stored.
        row_scale = (self.level_mpp(level)[1] if level is not None else actual) / mpp_y
        rows = []
        for top in range(0, out_h, band):
            size = (out_w, min(band, out_h - top))
            rows.append(self._read_stored(level, (0, top * row_scale), size) if level is not None else
                        self._read_at_level(source, (0, top * row_scale), size, actual))
        return np.concatenate(rows, axis=0), actual

    def read_overview(self, long_side_px: int) -> tuple[np.ndarray, float]:
        """Read the whole slide with its long side ``long_side_px`` pixels (for review overlays), at most level 0's.

        The pixels come from the coarsest pyramid level at or finer than the needed resolution, area-resampled
        (:meth:`read_thumbnail` with no tolerance), so a 100k px slide costs a read of a few thousand px a side.

        Args:
            long_side_px: pixels along the slide's longer physical side; slides smaller than this are read at
                level 0 as stored.

        Returns:
            (uint8 array (height, width, 3), its mpp in um/px along x).
        """
        if not (isinstance(long_side_px, (int, np.integer)) and long_side_px >= 1):
            raise SlideError(self.path, f"overview long side must be a positive whole number of px, "
                                        f"got {long_side_px!r}")
        (w0, h0), (mpp_x, mpp_y) = self.dimensions, self.mpp
        long_um = max(w0 * mpp_x, h0 * mpp_y)
        if long_side_px >= max(w0, h0):
            return self.read_thumbnail(min(mpp_x, mpp_y))
        return self.read_thumbnail(long_um / long_side_px, tolerance=0.0)

    # ---- lifecycle -----------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the file; further reads are invalid."""
        self._safe_close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        # Re-open by path in the receiving process: backend handles cannot be pickled (DataLoader workers).
        return type(self), (self.source, self._mpp_override, self._max_level0_px)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.path)!r}, vendor={self.vendor!r}, "
                f"level_dimensions={self.level_dimensions})")

    # ---- helpers -------------------------------------------------------------------------------------------------

    def _safe_close(self) -> None:
        try:
            self._close()
        except Exception:  # closing a half-opened handle must not hide the error that made us close it
            pass

    def _check_level(self, level: int) -> None:
        if not (isinstance(level, (int, np.integer)) and 0 <= level < len(self.level_dimensions)):
            raise SlideError(self.path, f"no pyramid level {level!r}: the slide has levels 0..{self.level_count - 1}")

    def _check_size(self, size_px: tuple[int, int]) -> tuple[int, int]:
        w, h = (int(v) for v in size_px)
        if w <= 0 or h <= 0 or (w, h) != tuple(size_px):
            raise SlideError(self.path, f"region size must be positive whole pixels (width, height), got {size_px!r}")
        return w, h

    def _check_mpp(self, mpp: float) -> float:
        if not (isinstance(mpp, (int, float, np.number)) and math.isfinite(mpp) and mpp > 0):
            raise SlideError(self.path, f"requested mpp must be positive um/px, got {mpp!r}")
        return float(mpp)

    def _level_within(self, mpp: float, tolerance: float) -> int | None:
        """The usable level (`_level_agrees`) whose mpp is nearest to ``mpp`` when both its axes are within
        ``tolerance`` (relative), else None."""
        def worst(level: int) -> float:
            return max(abs(m - mpp) for m in self.level_mpp(level)) / mpp

        near = sorted((level for level in range(self.level_count) if worst(level) <= tolerance), key=worst)
        return next((level for level in near if self._level_agrees(level)), None)

    def _level_for(self, mpp: float) -> int:
        """The level an exact read at ``mpp`` reads from: the usable level at ``mpp`` itself, else the coarsest
        usable finer one (level 0 when ``mpp`` is finer than level 0)."""
        same = self._level_within(mpp, _SAME_MPP_RTOL)
        if same is not None:
            return same
        finer = sorted((i for i in range(self.level_count) if max(self.level_mpp(i)) < mpp),
                       key=lambda i: sum(self.level_mpp(i)), reverse=True)
        return next((level for level in finer if self._level_agrees(level)), 0)

    # ---- level check -------------------------------------------------------------------------------------------

    def _level_agrees(self, level: int) -> bool:
        """Whether pyramid level ``level`` may be read for level choice: level 0 always; another level once
        `_check_level_agreement` found it to agree with the next finer level that agrees (checked once per process,
        slide and level; a disagreeing level gets one warning naming the slide, the level and the difference)."""
        if level == 0:
            return True
        key = (self.source, self.backend, level)
        with _LEVEL_CHECK_LOCK:
            verdict = _LEVEL_CHECKS.get(key)
        if verdict is None:
            reference = max(i for i in range(level) if self._level_agrees(i))
            try:
                problem = self._check_level_agreement(level, reference)
            except SlideError as err:  # a level that cannot be read is not used either
                problem = f"reading it for the check failed ({err.problem})"
            with _LEVEL_CHECK_LOCK:
                if key not in _LEVEL_CHECKS:
                    _LEVEL_CHECKS[key] = problem
                    if problem:
                        logger.warning("%s: pyramid level %d (%d x %d px) is not used: %s; reads use finer levels",
                                       self.source, level, *self.level_dimensions[level], problem)
                verdict = _LEVEL_CHECKS[key]
        return not verdict

    def _check_level_agreement(self, level: int, reference: int) -> str:
        """Compare ``level`` with the finer level ``reference`` on a window of at most `LEVEL_CHECK_PX` px a side at
        ``level``, placed on the most content (`_content_window`): the reference's pixels covering the same
        level-0 area are area-averaged to the level's pixel grid (`pathbundles.resample`), also shifted by up to
        `LEVEL_CHECK_MAX_SHIFT_PX` level px each way. Returns what disagrees ('' when the level agrees): a best
        shift of a whole level px or more that beats no shift by `LEVEL_CHECK_SHIFT_GAIN`, a channel mean beyond
        `LEVEL_CHECK_COLOUR_TOLERANCE`, or a mean absolute difference beyond `LEVEL_CHECK_PIXEL_TOLERANCE`."""
        (sx, sy), (rsx, rsy) = self._level_scales[level], self._level_scales[reference]
        ratio_x, ratio_y = sx / rsx, sy / rsy
        lw, lh = self.level_dimensions[level]
        side = max(LEVEL_CHECK_MIN_PX, min(LEVEL_CHECK_PX, int(LEVEL_CHECK_REFERENCE_PX / max(ratio_x, ratio_y))))
        w, h = min(side, lw), min(side, lh)
        if min(w, h) < LEVEL_CHECK_MIN_PX:
            return ""  # a level this small is too small to compare; it costs nothing to use
        # The reference area the window covers, with the shift search's margin, in reference pixels.
        margin = LEVEL_CHECK_MAX_SHIFT_PX + 1
        reference_side = (side + 2 * margin) * max(ratio_x, ratio_y)
        if reference_side > 2 * LEVEL_CHECK_REFERENCE_PX:
            # Only after finer levels failed: reading enough of the last sound one would take gigabytes.
            return (f"it is {max(ratio_x, ratio_y):.0f} times coarser than level {reference}, the finest level it can "
                    f"be checked against (its area would be {reference_side:.0f} px a side): not checked, not used")
        x, y = self._content_window(level, (w, h))
        pixels = self._read_level_px(level, (x, y), (w, h)).astype(np.float32)
        off_x, off_y = self._level_offset(level, (x, y))
        rx0 = math.floor((x - margin) * ratio_x)
        ry0 = math.floor((y - margin) * ratio_y)
        rx1, ry1 = math.ceil((x + w + margin) * ratio_x), math.ceil((y + h + margin) * ratio_y)
        reference_px = self._read_level_px(reference, (rx0, ry0), (rx1 - rx0, ry1 - ry0))
        reference_px = reference_px.astype(np.float32)
        roff_x, roff_y = self._level_offset(reference, (max(rx0, 0), max(ry0, 0)))
        errors = {}
        for dy in range(-LEVEL_CHECK_MAX_SHIFT_PX, LEVEL_CHECK_MAX_SHIFT_PX + 1):
            for dx in range(-LEVEL_CHECK_MAX_SHIFT_PX, LEVEL_CHECK_MAX_SHIFT_PX + 1):
                left = (x + off_x + dx) * ratio_x - rx0 - roff_x
                top = (y + off_y + dy) * ratio_y - ry0 - roff_y
                expected = resample_area(reference_px, (left, top, left + w * ratio_x, top + h * ratio_y), (w, h))
                errors[(dx, dy)] = (float(np.abs(pixels - expected).mean()), expected)
        best = min(errors, key=lambda shift: errors[shift][0])
        unshifted, shifted = errors[(0, 0)][0], errors[best][0]
        if best != (0, 0) and unshifted - shifted > LEVEL_CHECK_SHIFT_GAIN * max(shifted, 1.0):
            # Best when the reference is read ``best`` px off: the level's image lies -best px (x right, y down) off.
            return (f"it is shifted by about ({-best[0]}, {-best[1]}) level px (x, y) against level {reference} (mean "
                    f"absolute difference {shifted:.1f} grey levels so shifted, {unshifted:.1f} in place)")
        colour = pixels.reshape(-1, 3).mean(axis=0) - errors[(0, 0)][1].reshape(-1, 3).mean(axis=0)
        if np.abs(colour).max() > LEVEL_CHECK_COLOUR_TOLERANCE:
            return (f"its colour differs from level {reference} downsampled by (R, G, B) = "
                    f"({colour[0]:+.1f}, {colour[1]:+.1f}, {colour[2]:+.1f}) grey levels on average (tolerance "
                    f"{LEVEL_CHECK_COLOUR_TOLERANCE:g}): a colour space mislabelled, e.g. YCbCr stored as RGB")
        if unshifted > LEVEL_CHECK_PIXEL_TOLERANCE:
            return (f"its pixels differ from level {reference} downsampled by {unshifted:.1f} grey levels on average "
                    f"(tolerance {LEVEL_CHECK_PIXEL_TOLERANCE:g}): it does not show the same image")
        return ""

    def _content_window(self, level: int, size_px: tuple[int, int]) -> tuple[int, int]:
        """Top-left (x, y) in ``level`` pixels of the ``size_px`` window with the most content (least like glass:
        dark or coloured), found on the coarsest level when it has at most `LEVEL_CHECK_MAP_PX` pixels, else among
        a 3 x 3 grid of windows of ``level`` itself."""
        (lw, lh), (w, h) = self.level_dimensions[level], size_px
        coarsest = self.level_count - 1
        cw, ch = self.level_dimensions[coarsest]
        content = None
        if cw * ch <= LEVEL_CHECK_MAP_PX:
            with contextlib.suppress(SlideError):  # an unreadable coarsest level: try the windows instead
                content = _content_score(self._read_level_px(coarsest, (0, 0), (cw, ch)))
        if content is not None:
            # The window's size in coarsest-level pixels, and the content summed over every such window.
            kx = max(1, round(w * self._level_scales[level][0] / self._level_scales[coarsest][0]))
            ky = max(1, round(h * self._level_scales[level][1] / self._level_scales[coarsest][1]))
            kx, ky = min(kx, cw), min(ky, ch)
            sums = np.pad(content, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
            windows = sums[ky:, kx:] - sums[:-ky, kx:] - sums[ky:, :-kx] + sums[:-ky, :-kx]
            cy, cx = np.unravel_index(int(np.argmax(windows)), windows.shape)
            x = round(cx * self._level_scales[coarsest][0] / self._level_scales[level][0])
            y = round(cy * self._level_scales[coarsest][1] / self._level_scales[level][1])
        else:
            steps = (0.25, 0.5, 0.75)
            grid = [(round(fx * (lw - w)), round(fy * (lh - h))) for fy in steps for fx in steps]
            x, y = max(grid, key=lambda xy: float(_content_score(self._read_level_px(level, xy, (w, h))).sum()))
        return min(max(x, 0), lw - w), min(max(y, 0), lh - h)

    def _read_stored(self, level: int, level0_xy: tuple[float, float], size_px: tuple[int, int]) -> np.ndarray:
        """(w, h) pixels of ``level`` as stored, from the level pixel nearest to ``level0_xy``."""
        scale_x, scale_y = self._level_scales[level]
        return self._read_level_px(level, (round(level0_xy[0] / scale_x), round(level0_xy[1] / scale_y)), size_px)

    def _read_at_level(self, level: int, level0_xy: tuple[float, float], size_px: tuple[int, int],
                       mpp: float) -> np.ndarray:
        """(w, h) pixels at exactly ``mpp`` from ``level``: as stored when the level is at ``mpp`` on both axes (and
        the backend returns stored pixels there), else resampled from the level's pixels covering the region
        (sub-pixel offsets kept, so neighbouring reads tile exactly)."""
        from PIL import Image

        w, h = size_px
        level_mpp_x, level_mpp_y = self.level_mpp(level)
        scale_x, scale_y = self._level_scales[level]
        x, y = level0_xy[0] / scale_x, level0_xy[1] / scale_y
        if max(abs(level_mpp_x - mpp), abs(level_mpp_y - mpp)) <= _SAME_MPP_RTOL * mpp:
            stored_xy = (round(x), round(y))
            if self._level_offset(level, (max(stored_xy[0], 0), max(stored_xy[1], 0))) == (0.0, 0.0):
                return self._read_level_px(level, stored_xy, size_px)
        span_x, span_y = w * mpp / level_mpp_x, h * mpp / level_mpp_y  # level pixels the output covers
        # A pixel of margin each side: a backend's pixels may lie up to a pixel after where they were asked for.
        x0, y0 = math.floor(x) - 1, math.floor(y) - 1
        x1, y1 = math.ceil(x + span_x) + 1, math.ceil(y + span_y) + 1
        source = self._read_level_px(level, (x0, y0), (x1 - x0, y1 - y0))
        # Where the backend's first pixel really lies (the part of the region inside the level decides it).
        dx, dy = self._level_offset(level, (max(x0, 0), max(y0, 0)))
        box = (x - x0 - dx, y - y0 - dy, x - x0 - dx + span_x, y - y0 - dy + span_y)
        if span_x >= w and span_y >= h:
            return resample_area(source, box, (w, h))
        return np.asarray(Image.fromarray(source).resize((w, h), Image.Resampling.BILINEAR, box=box))

    def _read_level_px(self, level: int, level_xy: tuple[int, int], size_px: tuple[int, int]) -> np.ndarray:
        """Read (w, h) pixels of `level` at level position (x, y), white outside the level, always RGB."""
        (x, y), (w, h) = level_xy, size_px
        lw, lh = self.level_dimensions[level]
        cx0, cy0, cx1, cy1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if cx0 >= cx1 or cy0 >= cy1:
            return np.full((h, w, 3), 255, np.uint8)
        try:
            pixels = self._read_level(level, (cx0, cy0), (cx1 - cx0, cy1 - cy0))
        except SlideError:
            raise
        except Exception as exc:
            raise SlideError(self.path, f"cannot read level {level} region at level pixels ({cx0}, {cy0}) size "
                                        f"({cx1 - cx0}, {cy1 - cy0}): {type(exc).__name__}: {exc}") from exc
        if (cx0, cy0, cx1, cy1) == (x, y, x + w, y + h):  # nothing to pad: skip the copy into the white canvas
            return np.ascontiguousarray(_as_rgb(pixels))
        out = np.full((h, w, 3), 255, np.uint8)
        out[cy0 - y:cy1 - y, cx0 - x:cx1 - x] = _as_rgb(pixels)
        return out


def _content_score(rgb: np.ndarray) -> np.ndarray:
    """Per pixel, how unlike glass (bright and grey) it is: darkness plus saturation, in grey levels."""
    rgb = rgb.astype(np.float32)
    return (255.0 - rgb.min(axis=-1)) + (rgb.max(axis=-1) - rgb.min(axis=-1))


def _max_level0_px(path: Path, given: int | None) -> int:
    """The level-0 pixel limit: ``given``, else `$PATHBUNDLES_MAX_LEVEL0_PX`, else `MAX_LEVEL0_PX`."""
    text = os.environ.get("PATHBUNDLES_MAX_LEVEL0_PX") if given is None else given
    if text is None:
        return MAX_LEVEL0_PX
    try:
        value = int(float(text))
    except (TypeError, ValueError):
        value = 0
    if value <= 0:
        raise SlideError(path, f"the level-0 pixel limit must be a positive number of pixels, got {text!r} "
                               "(max_level0_px= or $PATHBUNDLES_MAX_LEVEL0_PX)")
    return value


def tiff_truncation(path: str | os.PathLike) -> str | None:
    """What is missing when a TIFF file is shorter than its header says, or None (not a TIFF, or not cut there).

    Reads the header's offset of the first image directory (classic TIFF and BigTIFF, either byte order) and that
    directory's entry count: a file cut before them is what readers report as "no pages" or "IndexError: 0".
    """
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            size = os.fstat(f.fileno()).st_size
            order = {b"II": "<", b"MM": ">"}.get(head[:2])
            if order is None or len(head) < 8:
                return None
            version = int.from_bytes(head[2:4], "little" if order == "<" else "big")
            byteorder = "little" if order == "<" else "big"
            if version == 42:
                offset, count_size, entry_size, next_size = int.from_bytes(head[4:8], byteorder), 2, 12, 4
            elif version == 43 and len(head) == 16:
                offset, count_size, entry_size, next_size = int.from_bytes(head[8:16], byteorder), 8, 20, 8
            else:
                return None
            if offset + count_size > size:
                return (f"file is truncated: the TIFF header puts the first image directory at byte {offset}, but "
                        f"the file has only {size} bytes")
            f.seek(offset)
            entries = int.from_bytes(f.read(count_size), byteorder)
            end = offset + count_size + entries * entry_size + next_size
            if end > size:
                return (f"file is truncated: the first image directory ({entries} entries at byte {offset}) ends at "
                        f"byte {end}, but the file has only {size} bytes")
    except OSError:
        return None
    return None


def _as_rgb(pixels: np.ndarray) -> np.ndarray:
    """Gray -> RGB by repetition; RGBA -> RGB composited on white (straight, not premultiplied, alpha)."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.shape[-1] == 1:
        return np.repeat(pixels, 3, axis=-1)
    if pixels.shape[-1] == 4 and pixels[..., 3].min() < 255:  # opaque pixels (the usual case) need no blending
        alpha = pixels[..., 3:].astype(np.uint16)
        blended = (pixels[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255
        return blended.astype(np.uint8)
    return pixels[..., :3]


# ---- tifffile backend -------------------------------------------------------------------------------------------


class TiffSlide(Slide):
    """Pure-Python tiled TIFF/SVS reader that decodes only the tiles (or strips) a region touches.

    Levels: the first page, then either its SubIFDs or later top-level pages that are tiled, smaller, of the same
    aspect ratio and marked reduced-resolution (NewSubfileType bit 0; Aperio SVS levels carry no mark, so for SVS
    any such tiled page counts). Stripped pages (the SVS thumbnail) and label/macro pages are never levels.

    OME-TIFF (QuPath and Bio-Formats exports, ``bfconvert``): the levels are those of the first image (series) as
    tifffile lists them, its SubIFDs (OME-TIFF 6) or further series levels, all of them reduced-resolution by the
    OME-TIFF specification whatever their NewSubfileType; the level-0 mpp is the OME-XML PhysicalSizeX/Y of that
    image in its units (`ome_mpp`), else the resolution tags.
    """

    backend = "tifffile"

    def _open(self) -> None:
        import tifffile

        self._tif = tifffile.TiffFile(self.path)
        self._raw = open(self.path, "rb")
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[tuple[int, int], np.ndarray | None] = collections.OrderedDict()
        self._cache_bytes = 0

    def _geometry(self) -> tuple[list[tuple[int, int]], str, list[str]]:
        tif = self._tif
        ome_levels = [level.keyframe for level in tif.series[0].levels] if tif.is_ome and tif.series else []
        self._ome = len(ome_levels) > 1
        if self._ome:
            first, candidates = ome_levels[0], ome_levels[1:]
        else:
            first = tif.pages.first
            candidates = list(first.pages) if first.subifds else list(tif.pages)[1:]
        self._levels = [first]
        for page in candidates:
            prev = self._levels[-1]
            reduced = tif.is_svs or self._ome or (page.subfiletype & 1)
            if ((page.is_tiled or self._ome) and reduced and not page.subfiletype & ~1
                    and page.samplesperpixel == first.samplesperpixel and page.dtype == first.dtype
                    and page.imagewidth < prev.imagewidth and page.imagelength < prev.imagelength
                    and _similar_ratio(first.imagewidth / page.imagewidth, first.imagelength / page.imagelength)):
                self._levels.append(page)
        file_size = os.fstat(self._raw.fileno()).st_size
        for i, page in enumerate(self._levels):
            self._check_page(i, page, file_size)
        associated = []
        if tif.is_svs:
            for index, page in enumerate(tif.pages):
                words = page.description.split("\n")[1].split() if "\n" in page.description else []
                if words and words[0] in ("label", "macro"):
                    associated.append(words[0])
                elif index == 1 and not page.is_tiled:
                    associated.append("thumbnail")
        dims = [(p.imagewidth, p.imagelength) for p in self._levels]
        vendor = "aperio" if tif.is_svs else "ome-tiff" if tif.is_ome else "generic-tiff"
        return dims, vendor, sorted(associated)

    def _check_page(self, level: int, page: Any, file_size: int) -> None:
        if page.dtype != np.uint8 or page.samplesperpixel not in (1, 3, 4):
            raise BackendRefusedError(self.path, f"level {level} has {page.samplesperpixel} samples of "
                                                 f"{page.dtype}; the tifffile backend reads 8-bit gray, RGB or RGBA")
        if page.samplesperpixel > 1 and page.planarconfig != 1:
            raise BackendRefusedError(self.path, f"level {level} stores colour planes separately, which the "
                                                 "tifffile backend does not read")
        tile_w, tile_h = _tile_wh(page)
        if tile_w <= 0 or tile_h <= 0:
            raise SlideError(self.path, f"level {level} claims tiles of {tile_w} x {tile_h} px")
        needed = -(-page.imagewidth // tile_w) * -(-page.imagelength // tile_h)
        if len(page.dataoffsets) != needed or len(page.databytecounts) != needed:
            raise SlideError(self.path, f"level {level} claims {page.imagewidth} x {page.imagelength} px, which "
                                        f"takes {needed} tiles of {tile_w} x {tile_h} px, but the file lists "
                                        f"{len(page.dataoffsets)}")
        counts = np.asarray(page.databytecounts, dtype=np.int64)
        ends = np.asarray(page.dataoffsets, dtype=np.int64) + counts
        stored = counts > 0
        if not stored.any():
            raise SlideError(self.path, f"level {level} stores no tile data (every tile's byte count is 0)")
        if int(ends[stored].max()) > file_size:
            raise SlideError(self.path, f"file is truncated: level {level} tile data ends at byte "
                                        f"{int(ends[stored].max())} but the file has {file_size} bytes")
        # Tiles are stored whole even at the image's edge; the last strip holds only the rows that are left.
        smallest_h = tile_h if page.is_tiled else page.imagelength - (needed - 1) * tile_h
        least = _least_tile_bytes(int(page.compression), tile_w, smallest_h, page.samplesperpixel)
        if int(counts[stored].min()) < least:
            index = int(np.flatnonzero(stored & (counts < least))[0])
            raise SlideError(self.path, f"level {level} tile {index} holds {int(counts[index])} bytes, fewer than "
                                        f"the {least} that any {tile_w} x {smallest_h} px tile compressed as "
                                        f"{getattr(page.compression, 'name', page.compression)} takes; the tile "
                                        "table is corrupt")

    def _file_mpp(self) -> tuple[float, float] | None:
        first = self._levels[0]
        if self._tif.is_ome:
            mpp = ome_mpp(self._tif.ome_metadata or "")
            if mpp is not None:
                return mpp
        if self._tif.is_svs:
            match = re.search(r"\|\s*MPP\s*=\s*" + _NUMBER, first.description)
            if match and float(match.group(1)) > 0:
                return float(match.group(1)), float(match.group(1))
        um_per_unit = {2: 25400.0, 3: 10000.0}.get(int(first.tags.valueof("ResolutionUnit", 2)))
        xres, yres = first.tags.valueof("XResolution"), first.tags.valueof("YResolution")
        if um_per_unit is None or not xres or not yres or not xres[0] or not yres[0]:
            return None
        # Rationals are (numerator, denominator) pixels per unit.
        return um_per_unit * xres[1] / xres[0], um_per_unit * yres[1] / yres[0]

    def _objective_power(self) -> float | None:
        match = re.search(r"\|\s*AppMag\s*=\s*" + _NUMBER, self._tif.pages.first.description or "")
        return float(match.group(1)) if match and float(match.group(1)) > 0 else None

    def _read_level(self, level: int, level_xy: tuple[int, int], size_px: tuple[int, int]) -> np.ndarray:
        page = self._levels[level]
        tile_w, tile_h = _tile_wh(page)
        across = -(-page.imagewidth // tile_w)
        (x, y), (w, h) = level_xy, size_px
        out = np.full((h, w, page.samplesperpixel), 255, np.uint8)
        for ty in range(y // tile_h, (y + h - 1) // tile_h + 1):
            for tx in range(x // tile_w, (x + w - 1) // tile_w + 1):
                tile = self._tile(level, ty * across + tx)
                if tile is None:  # an empty tile (byte count 0) is background
                    continue
                ox0, oy0 = max(x, tx * tile_w), max(y, ty * tile_h)
                ox1, oy1 = min(x + w, (tx + 1) * tile_w), min(y + h, (ty + 1) * tile_h)
                out[oy0 - y:oy1 - y, ox0 - x:ox1 - x] = tile[oy0 - ty * tile_h:oy1 - ty * tile_h,
                                                              ox0 - tx * tile_w:ox1 - tx * tile_w]
        return out

    def _tile(self, level: int, index: int) -> np.ndarray | None:
        """Decoded tile `index` of `level` as (rows, cols, samples), through a small LRU cache."""
        key = (level, index)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        tile = self._decode_tile(level, index)
        with self._lock:
            if key in self._cache:  # another thread decoded it meanwhile
                return self._cache[key]
            self._cache[key] = tile
            self._cache_bytes += 0 if tile is None else tile.nbytes
            while self._cache_bytes > _TILE_CACHE_BYTES and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= 0 if old is None else old.nbytes
        return tile

    def _decode_tile(self, level: int, index: int) -> np.ndarray | None:
        page = self._levels[level]
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        if not count:
            return None
        data = self._read_bytes(offset, count)
        if len(data) < count:
            raise SlideError(self.path, f"file is truncated: level {level} tile {index} needs bytes "
                                        f"{offset}..{offset + count}")
        # TiffPage.decode handles JPEGTables, YCbCr and predictors; it returns (depth, rows, cols, samples).
        decoded, _, _ = page.decode(data, index, jpegtables=page.jpegtables, jpegheader=page.jpegheader)
        return decoded[0]

    def _read_bytes(self, offset: int, count: int) -> bytes:
        # pread has no shared file position, so threads and forked DataLoader workers can read concurrently.
        if hasattr(os, "pread"):
            return os.pread(self._raw.fileno(), count, offset)
        with self._lock:
            self._raw.seek(offset)
            return self._raw.read(count)

    def _close(self) -> None:
        for handle in ("_tif", "_raw"):
            if hasattr(self, handle):
                getattr(self, handle).close()


#: Micrometres per unit of the OME schema's length units (UnitsLength symbols) that pixel sizes are given in.
_OME_UM_PER_UNIT = {"pm": 1e-6, "\u00c5": 1e-4, "nm": 1e-3, "\u00b5m": 1.0, "\u03bcm": 1.0, "um": 1.0, "mm": 1e3,
                    "cm": 1e4, "m": 1e6, "in": 25400.0}


def ome_mpp(ome_xml: str) -> tuple[float, float] | None:
    """Level-0 (mpp_x, mpp_y) in um/px of the first image in an OME-XML document.

    Args:
        ome_xml: the OME-XML text (an OME-TIFF's first ImageDescription).

    Returns:
        the first ``Pixels`` element's PhysicalSizeX and PhysicalSizeY converted from the units that
        PhysicalSizeXUnit / PhysicalSizeYUnit name (um when absent, as the schema says); None when the XML does not
        parse, either size is absent or not a number, or its unit is no length.
    """
    import xml.etree.ElementTree as ElementTree

    try:
        root = ElementTree.fromstring(ome_xml)
    except (ElementTree.ParseError, ValueError):
        return None
    pixels = next((el for el in root.iter() if isinstance(el.tag, str) and el.tag.rsplit("}", 1)[-1] == "Pixels"),
                  None)
    if pixels is None:
        return None
    mpp = []
    for axis in "XY":
        unit = _OME_UM_PER_UNIT.get(pixels.get(f"PhysicalSize{axis}Unit", "\u00b5m"))
        try:
            size = float(pixels.get(f"PhysicalSize{axis}", ""))
        except ValueError:
            return None
        if unit is None:
            return None
        mpp.append(size * unit)
    return mpp[0], mpp[1]


def _tile_wh(page: Any) -> tuple[int, int]:
    """(width, height) in px of a TIFF page's tiles; strips are tiles as wide as the image."""
    return (page.tilewidth, page.tilelength) if page.is_tiled else (page.imagewidth, page.rowsperstrip)


def _least_tile_bytes(compression: int, tile_w: int, tile_h: int, samples: int) -> int:
    """Fewest bytes a non-empty tile of (tile_w, tile_h) px can take: uncompressed, every byte; deflate, the raw size
    over 1032 (its largest ratio: a 258-byte match in 2 bits); JPEG, its 4 marker bytes (SOI, EOI) plus 1 bit per
    8 x 8 block of one component (each block codes a DC difference); other codecs, 1 byte."""
    if compression == 1:
        return tile_w * tile_h * samples
    if compression in (8, 32946):
        return -(-tile_w * tile_h * samples // 1032)
    if compression in (6, 7):
        blocks = math.ceil(tile_w / 8) * math.ceil(tile_h / 8)
        return 4 + math.ceil(blocks / 8)
    return 1


def _level_scales(sizes_wh: Sequence[tuple[int, int]]) -> list[tuple[float, float]]:
    """(x, y) level-0 pixels per pixel of each level: whole factors along a chain of levels each of which is the
    previous one's size divided by a whole m and rounded down or up on both sides (how pyramids are made), else,
    from the first level that is not, the ratio of its sides to level 0's."""
    (w0, h0), scales = sizes_wh[0], [(1.0, 1.0)]
    for (pw, ph), (w, h) in zip(sizes_wh[:-1], sizes_wh[1:]):
        m = round((pw / w + ph / h) / 2)
        whole = scales[-1][0] == scales[-1][1] and float(scales[-1][0]).is_integer()
        if whole and m >= 1 and w in (pw // m, -(-pw // m)) and h in (ph // m, -(-ph // m)):
            scales.append((scales[-1][0] * m, scales[-1][1] * m))
        else:
            scales.append((w0 / w, h0 / h))
    return scales


def _similar_ratio(ratio_x: float, ratio_y: float) -> bool:
    """True when two downsample ratios agree within 10 % (tile padding makes them differ slightly)."""
    return abs(ratio_x - ratio_y) <= 0.1 * max(ratio_x, ratio_y)


# ---- OpenSlide backend ------------------------------------------------------------------------------------------


class OpenSlideSlide(Slide):
    """Reader backed by openslide-python (with the openslide-bin wheel for the C library).

    At a level whose downsample is not a whole number OpenSlide places the region at a fractional level pixel and
    interpolates, so its pixels there can differ by a few grey levels from the stored ones (the tifffile backend
    returns them unchanged). OpenSlide does not read SubIFD pyramids: such files open with level 0 only.
    """

    backend = "openslide"
    _addressed_by_level0 = True

    def _open(self) -> None:
        import openslide

        self._osr = openslide.OpenSlide(str(self.path))

    def _geometry(self) -> tuple[list[tuple[int, int]], str, list[str]]:
        vendor = self._osr.properties.get("openslide.vendor") or "unknown"
        return list(self._osr.level_dimensions), vendor, sorted(self._osr.associated_images)

    def _read_level(self, level: int, level_xy: tuple[int, int], size_px: tuple[int, int]) -> np.ndarray:
        from PIL import Image

        region = self._osr.read_region(self._level0_location(level, level_xy), level, size_px)  # RGBA, straight alpha
        # Compositing in PIL (C) is several times faster than numpy for the usual fully opaque region.
        if region.getchannel("A").getextrema()[0] < 255:
            region = Image.alpha_composite(Image.new("RGBA", region.size, "white"), region)
        return np.asarray(region.convert("RGB"))

    def _tile_sizes(self) -> dict[int, tuple[int, int]]:
        props, sizes = self._osr.properties, {}
        for level in range(self._osr.level_count):
            try:
                sizes[level] = (int(props[f"openslide.level[{level}].tile-width"]),
                                int(props[f"openslide.level[{level}].tile-height"]))
            except (KeyError, ValueError):
                continue
        return sizes

    def _objective_power(self) -> float | None:
        try:
            power = float(self._osr.properties["openslide.objective-power"])
        except (KeyError, ValueError):
            return None
        return power if power > 0 else None

    def _file_mpp(self) -> tuple[float, float] | None:
        props = self._osr.properties
        try:
            mpp = float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
        except (KeyError, ValueError):
            return None
        return mpp if min(mpp) > 0 else None

    def _close(self) -> None:
        if hasattr(self, "_osr"):
            self._osr.close()


# ---- cuCIM backend ----------------------------------------------------------------------------------------------


class CuCIMSlide(Slide):
    """Reader backed by cuCIM (`cucim.CuImage`); optional, imported only when used."""

    backend = "cucim"
    _addressed_by_level0 = True

    def _open(self) -> None:
        from cucim import CuImage

        self._img = CuImage(str(self.path))

    def _geometry(self) -> tuple[list[tuple[int, int]], str, list[str]]:
        metadata = self._img.metadata
        vendor = "aperio" if "aperio" in metadata else "generic-tiff"
        return [tuple(d) for d in self._img.resolutions["level_dimensions"]], vendor, sorted(
            self._img.associated_images)

    def _read_level(self, level: int, level_xy: tuple[int, int], size_px: tuple[int, int]) -> np.ndarray:
        location = self._level0_location(level, level_xy)
        return np.asarray(self._img.read_region(location=location, size=tuple(size_px), level=level))

    def _objective_power(self) -> float | None:
        power = float(self._img.metadata.get("aperio", {}).get("AppMag") or 0)
        return power if power > 0 else None

    def _file_mpp(self) -> tuple[float, float] | None:
        metadata = self._img.metadata
        aperio_mpp = float(metadata.get("aperio", {}).get("MPP") or 0)
        if aperio_mpp > 0:
            return aperio_mpp, aperio_mpp
        cucim_md = metadata.get("cucim", {})
        spacing, units = cucim_md.get("spacing") or [], cucim_md.get("spacing_units") or []
        # cuCIM lists spacing as (y, x, ...) with per-axis units.
        if len(spacing) >= 2 and spacing[0] and spacing[1] and all(u == "micrometer" for u in units[:2]):
            return float(spacing[1]), float(spacing[0])
        return None

    def _close(self) -> None:
        if hasattr(self, "_img"):
            self._img.close()


# ---- entry points -----------------------------------------------------------------------------------------------

_BACKEND_CLASSES: dict[str, type[Slide]] = {"cucim": CuCIMSlide, "openslide": OpenSlideSlide, "tifffile": TiffSlide}
_BACKEND_MODULES = {"cucim": "cucim", "openslide": "openslide", "tifffile": "tifffile", "dicom": "wsidicom"}


def _backend_class(name: str) -> type[Slide]:
    """The `Slide` class of backend ``name``; the DICOM backend's module is imported on first use (it imports this
    one)."""
    if name == "dicom":
        from pathbundles.dicom_wsi import DicomSlide

        return DicomSlide
    return _BACKEND_CLASSES[name]


def available_backends() -> list[str]:
    """Backends whose library imports here, in `auto` preference order (cuCIM, OpenSlide, tifffile; the DICOM
    backend, wsidicom, is tried first and only for DICOM sources)."""
    found = []
    for name in BACKENDS:
        try:
            importlib.import_module(_BACKEND_MODULES[name])
        except Exception:  # a missing wheel or a broken native library both mean "not available"
            continue
        found.append(name)
    return found


def open_slide(path: str | os.PathLike, backend: str = "auto",
               mpp: float | tuple[float, float] | None = None, max_level0_px: int | None = None) -> Slide:
    """Open a whole-slide image.

    Args:
        path: slide file (SVS, tiled/pyramidal TIFF, OME-TIFF, or any format the chosen backend reads); for DICOM
            also a folder of one series' instances or a DICOMweb series URL (`pathbundles.dicom_wsi`).
        backend: "auto", "cucim", "openslide", "tifffile" or "dicom". "auto" tries the installed backends in the
            order cuCIM, OpenSlide, tifffile (tifffile first for an OME-TIFF, whose SubIFD levels and OME-XML pixel
            sizes the others do not read) and takes the first that reads the file; a backend that refuses it (a
            format or sample layout it does not read) passes it on to the next. A file that a backend reads but
            finds unsound (a header claiming more than the file holds, a truncated tile table) is refused at once.
            A DICOM source (`pathbundles.dicom_wsi.is_dicom_source`) goes to the DICOM backend, and a single DICOM
            file it refuses to OpenSlide.
        mpp: level-0 resolution in um/px (number or (mpp_x, mpp_y)) overriding the file's value.
        max_level0_px: most level-0 pixels the file may claim (default `$PATHBUNDLES_MAX_LEVEL0_PX`, else
            `MAX_LEVEL0_PX`); a file claiming more raises SlideError before anything is read.

    Returns:
        a `Slide`; use it as a context manager or call `close()`.

    Raises:
        SlideError: naming the file and, with "auto", each backend's reason when none reads it.
    """
    name = backend.lower()
    if name != "auto":
        if name not in BACKENDS:
            raise SlideError(path, f"unknown backend {backend!r}; expected 'auto' or one of {', '.join(BACKENDS)}")
        return _backend_class(name)(path, mpp=mpp, max_level0_px=max_level0_px)
    from pathbundles.dicom_wsi import is_dicom_source
    from pathbundles.dicomweb import is_dicomweb_url

    found = available_backends()
    if is_dicom_source(path):
        single_file = not is_dicomweb_url(path) and Path(path).is_file()
        found = [b for b in ("dicom", "openslide") if b in found and (b == "dicom" or single_file)]
    elif "dicom" in found:
        found.remove("dicom")
    if not found:
        raise SlideError(path, "no slide backend is installed that reads it (need cucim, openslide-python or "
                               "tifffile; wsidicom for DICOM)")
    if "tifffile" in found and is_ome_tiff(path):
        found.remove("tifffile")
        found.insert(0, "tifffile")
    refusals: dict[str, list[str]] = {}  # problem -> the backends that gave it
    for name in found:
        try:
            return _backend_class(name)(path, mpp=mpp, max_level0_px=max_level0_px)
        except SlideError as err:
            if not refusals and not isinstance(err, BackendRefusedError):
                raise  # the file itself is unusable (missing, unsound, a bad mpp): every backend would say so
            refusals.setdefault(err.problem, []).append(name)
            last = err
            if not isinstance(err, BackendRefusedError):
                break
    if len(refusals) == 1:
        raise last
    reasons = "; ".join(f"{', '.join(names)}: {problem}" for problem, names in refusals.items())
    raise SlideError(path, f"no slide backend reads it ({reasons})") from last


def is_ome_tiff(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an OME-TIFF (its first ImageDescription is OME-XML), as tifffile tells; False for any
    other file, one tifffile cannot open, or where tifffile is not installed."""
    try:
        if not Path(path).is_file():  # a FIFO would block the read; the backends say what is wrong
            return False
        with open(path, "rb") as f:
            if f.read(4) not in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
                return False
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return bool(tif.is_ome)
    except Exception:  # unreadable or not a TIFF: the backends then say why, naming the file
        return False


#: Datalist item key giving a slide's level-0 mpp (um/px, a number or [mpp_x, mpp_y]) over its file's.
ITEM_MPP_KEY = "mpp"


def item_mpp(item: Any, default: float | tuple[float, float] | None = None) -> float | tuple[float, float] | None:
    """The level-0 mpp override to open a datalist item's slide with.

    Args:
        item: a datalist item (a dict with ``image`` and optionally ``mpp``) or a bare path.
        default: the run's override (the bundles' ``slide_mpp`` key), in um/px; None keeps the file's value.

    Returns:
        the item's own ``mpp`` when it has one, else ``default``; lists become tuples. `open_slide` checks it.
    """
    value = item.get(ITEM_MPP_KEY) if isinstance(item, dict) else None
    value = default if value is None else value
    return tuple(value) if isinstance(value, list) else value


def slide_info(path: str | os.PathLike, backend: str = "auto",
               mpp: float | tuple[float, float] | None = None) -> dict[str, Any]:
    """Summarise a slide for `python -m pathbundles info SLIDE`.

    Args:
        path: slide file.
        backend: as in `open_slide`.
        mpp: optional level-0 override in um/px.

    Returns:
        dict with path, backend, vendor, level_count, levels [{level, width, height, downsample, mpp}], level-0
        mpp [x, y] in um/px or None, associated_images.
    """
    with open_slide(path, backend=backend, mpp=mpp) as slide:
        return slide.info()


# ---- MONAI adapter ----------------------------------------------------------------------------------------------


def _build_monai_reader() -> type:
    """Create `TiledTiffWSIReader` (a `monai.data.wsi_reader.BaseWSIReader`); importing MONAI takes seconds."""
    from monai.data.wsi_reader import BaseWSIReader
    from monai.utils import ensure_tuple

    class TiledTiffWSIReader(BaseWSIReader):
        """MONAI reader over `TiffSlide`: decodes only the tiles a patch touches (MONAI's tifffile backend decodes
        a whole level per patch).

        Follows MONAI's conventions: `location` is (row, col) = (y, x) in level-0 pixels, `size` is (height, width)
        at the level, mpp pairs are (mpp_y, mpp_x) in um/px.

        Args:
            slide_mpp: level-0 resolution in um/px for files that store none (number or (mpp_x, mpp_y)).
            kwargs: passed to `BaseWSIReader` (level, mpp, mpp_rtol, channel_dim, dtype, mode, ...).
        """

        supported_suffixes = ["tif", "tiff", "svs"]
        backend = "tifffile"

        def __init__(self, slide_mpp: float | tuple[float, float] | None = None, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.slide_mpp = slide_mpp

        def read(self, data: Any, **kwargs: Any) -> TiffSlide | list[TiffSlide]:
            slides = [TiffSlide(path, mpp=kwargs.get("slide_mpp", self.slide_mpp)) for path in ensure_tuple(data)]
            return slides if len(slides) > 1 else slides[0]

        def get_level_count(self, wsi: TiffSlide) -> int:
            return wsi.level_count

        def get_size(self, wsi: TiffSlide, level: int) -> tuple[int, int]:
            width, height = wsi.level_dimensions[level]
            return height, width

        def get_downsample_ratio(self, wsi: TiffSlide, level: int) -> float:
            return wsi.level_downsamples[level]

        def get_file_path(self, wsi: TiffSlide) -> str:
            return str(wsi.path.resolve())

        def get_mpp(self, wsi: TiffSlide, level: int) -> tuple[float, float]:
            mpp_x, mpp_y = wsi.level_mpp(level)
            return mpp_y, mpp_x

        def get_power(self, wsi: TiffSlide, level: int) -> float:
            raise ValueError(f"{wsi.path}: objective power is not read by this reader; use mpp or level")

        def _get_patch(self, wsi: TiffSlide, location: tuple[int, int], size: tuple[int, int], level: int,
                       dtype: Any, mode: str) -> np.ndarray:
            patch = wsi.read_level_region(level, (location[1], location[0]), (size[1], size[0]))
            if mode == "RGBA":
                patch = np.concatenate([patch, np.full(patch.shape[:2] + (1,), 255, np.uint8)], axis=-1)
            return np.moveaxis(patch.astype(dtype, copy=False), -1, self.channel_dim)

    TiledTiffWSIReader.__module__ = __name__
    return TiledTiffWSIReader


def __getattr__(name: str) -> Any:
    # Built on first access so that `import pathbundles.wsi` never imports MONAI; cached as a real module attribute
    # so pickling (DataLoader workers) finds the class by name.
    if name == "TiledTiffWSIReader":
        cls = _build_monai_reader()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
