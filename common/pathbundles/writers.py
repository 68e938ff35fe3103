"""Result writers: streaming pyramidal TIFF, disk-backed stitching canvas, overlay PNGs, detection CSV/GeoJSON.

Every file is written through :func:`pathbundles.atomic.atomic_path`, so an exception part-way leaves neither the
final file nor a temporary one.

Pyramidal TIFF layout (what :func:`write_pyramid_tiff` produces): one file that OpenSlide 4, Bio-Formats 7
(QuPath, Fiji, ``showinf``), tiffslide, TIAToolbox 2.1, MONAI and tifffile all open with every level and the
right physical size. The readers disagree on where reduced levels live: OpenSlide's generic-TIFF driver (and MONAI,
and a non-OME TIFF in Bio-Formats) only sees top-level pages, while Bio-Formats' OME-TIFF reader, tifffile/tiffslide
on an OME-TIFF and TIAToolbox only see the SubIFDs of level 0. So every reduced level is stored twice:

- page 0: level 0, tiled, with an OME-XML ``ImageDescription`` (``PhysicalSizeX/Y`` = level-0 um/px, the default
  OME unit; no non-ASCII characters, which make Bio-Formats fall back to its plain TIFF reader) whose Image
  ``Description`` holds the JSON fields below, and a ``SubIFDs`` tag pointing at the reduced levels
  (``NewSubfileType = 1``): the OME-TIFF pyramid of Bio-Formats, tifffile, tiffslide and TIAToolbox;
- then the same reduced levels again as top-level tiled pages (``NewSubfileType = 1``, the JSON as their
  ``ImageDescription``): the pyramid of OpenSlide and MONAI. The OME-XML references only IFD 0, so OME readers
  ignore these copies. The copies cost 1/3 more bytes for 2-fold steps (1/15 for 4-fold); pointing the SubIFDs at
  the top-level pages instead would save that, but makes one IFD both a child and a link of the main chain, which
  TIFF's SubIFD note does not provide for and which TIFF copying tools duplicate or break;
- ``XResolution``/``YResolution`` in pixels per centimetre (``ResolutionUnit = 3``) on every page, i.e.
  ``10_000 / mpp`` at that level: OpenSlide's ``openslide.mpp-x/y`` and tiffslide's ``tiffslide.mpp-x/y``;
- JSON fields ``{"pathbundles": "pyramid", "mpp": <level-0 um/px>, "level": k, "level_mpp": [x, y],
  "downsample": [x, y], ...caller's fields}``: :func:`read_pyramid_fields` reads them back,
  :func:`read_pyramid_mpp` the level-0 mpp (also of files written before the OME layout, whose page 0 held the
  JSON itself).

Samples: OpenSlide reads uint8 RGB, uint8 grey (as R = G = B) and palette pages (as their colours), JPEG or
deflate; it cannot read float32 pages and keeps only the high byte of uint16. TIAToolbox's ``WSIReader.open``
reads only pages with samples (RGB): a single-channel page fails with ``Unsupported axes 'YX'``. So maps meant for
viewers are uint8 (probability * 255, say so in ``description``) stored with ``store_rgb=True`` (R = G = B); label
maps carry their class colours as a TIFF palette (``colormap``: tifffile still reads the label values, OpenSlide
and Bio-Formats show the colours) and, for TIAToolbox, an RGB copy. float32 maps are for tifffile.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import weakref
import xml.etree.ElementTree as ElementTree
from xml.sax.saxutils import escape
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import imagecodecs
import numpy as np
import tifffile
from numpy.typing import ArrayLike, DTypeLike
from PIL import Image, ImageDraw, ImageFont

from pathbundles.annotations import Annotation, feature_id, write_asap_xml
from pathbundles.atomic import atomic_path
from pathbundles.outputs import CANVAS_PREFIX, levels_dir_prefix
from pathbundles.png import write_png
from pathbundles.errors import InputError
from pathbundles.progress import progress

__all__ = [
    "BandSource",
    "colormap_lut",
    "DiskCanvas",
    "legend_panel",
    "write_annotated_png",
    "MARKER_COLOUR",
    "overlay_font_px",
    "read_overlay_layout",
    "read_detections_csv",
    "read_detections_geojson",
    "read_pyramid_fields",
    "read_pyramid_mpp",
    "write_detections_asap_xml",
    "write_detections_csv",
    "write_detections_geojson",
    "write_label_overlay_png",
    "write_overlay_png",
    "write_pyramid_tiff",
]

_COMPRESSIONS = ("deflate", "zlib", "jpeg", "none")
# Column chunk (in output elements) for downsampling: bounds the temporaries to a few MB whatever the slide width.
_CHUNK_ELEMS = 1 << 20
# Raw bytes above which the file is written as BigTIFF; well under 4 GiB so that compressed data that grew
# (incompressible tiles) and the IFDs still fit in 32-bit offsets otherwise.
_BIGTIFF_BYTES = 2**31
# tifffile keeps this many bytes of tiles in flight when it compresses (JPEG) on several threads.
_ENCODE_BUFFER_BYTES = 16 << 20
# Deflate tiles are encoded here, with zlib-ng where imagecodecs has it: several times faster than the libdeflate
# encoder tifffile picks, and the same zlib stream (TIFF compression 8) for every reader.
_zlib_encode = imagecodecs.zlibng_encode if imagecodecs.ZLIBNG.available else imagecodecs.zlib_encode


class BandSource(Protocol):
    """What :func:`write_pyramid_tiff` reads: ``shape`` (H, W) or (H, W, C), ``dtype``, and full-width row bands
    ``source[y0:y1]`` returning an array of shape (y1 - y0, W[, C])."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def __getitem__(self, rows: slice) -> ArrayLike: ...


# ---------------------------------------------------------------------------------------------------------------
# Pyramidal TIFF
# ---------------------------------------------------------------------------------------------------------------


def write_pyramid_tiff(path: str | os.PathLike, source: BandSource, *, mpp: float, tile_px: int = 256,
                       compression: str = "deflate", quality: int = 90, deflate_level: int = 6,
                       min_level_px: int = 256, downsample_step: int = 2, resample: str = "area",
                       level_rounding: str = "ceil",
                       colormap: Mapping[int, Sequence[int]] | None = None, store_rgb: bool = False,
                       description: Mapping[str, Any] | str | None = None,
                       tmp_dir: str | os.PathLike | None = None) -> Path:
    """Stream ``source`` into a tiled pyramidal OME-TIFF (layout in the module docstring) without holding any
    level in memory.

    Level 0 is read in bands of ``tile_px`` rows. Each band is downsampled and appended to a raw temporary file,
    which is then streamed as the next level in the same way, until the smaller side is ``<= min_level_px``; the
    reduced levels are then streamed once more from their raw files as the top-level copies OpenSlide reads.
    Memory stays at a few bands of the widest level whatever the image height.

    Args:
        path: output ``.tif``/``.tiff``.
        source: (H, W) or (H, W, C) with C in {1, 3}, any dtype but bool; see :class:`BandSource`.
            ``np.ndarray``, ``np.memmap`` and :class:`DiskCanvas` qualify, as does a lazy renderer.
        mpp: level-0 resolution in um/px (both axes).
        tile_px: tile side in pixels, a multiple of 16 (TIFF rule) and of ``downsample_step``.
        compression: ``"deflate"`` (alias ``"zlib"``, lossless: label and probability maps), ``"jpeg"``
            (uint8 with 1 or 3 channels only: RGB slides) or ``"none"``.
        quality: JPEG quality, 1..100.
        deflate_level: zlib level, 1 (fast) .. 9 (small).
        min_level_px: stop adding levels once the smaller side of the last level is at most this (pixels).
        downsample_step: linear factor between consecutive levels (2 or 4 usual).
        resample: ``"area"`` (block mean over the pixels inside the image, rounded for integers) or
            ``"nearest"`` (top-left pixel of each block: use it for label maps, where a mean is meaningless).
        level_rounding: ``"ceil"`` (a level's sides are the previous ones ceil-divided by the step, partial blocks
            at the right and bottom averaged over their pixels) or ``"floor"`` (partial blocks dropped, as Aperio
            SVS levels are). Either way level pixel j holds level-0 block ``[j * d, (j + 1) * d)``, d the level's
            whole downsample, which is how :class:`pathbundles.wsi.Slide` places it; readers that take the ratio
            of the sizes place a level's last pixels up to d - 1 level-0 px off.
        colormap: ``{value: (r, g, b)}`` (0..255) of a uint8 single-channel source (a label map): stored as the
            TIFF palette (``PhotometricInterpretation = 3``, values without a colour are black), so viewers show
            the colours while tifffile reads the values. With ``store_rgb`` the colours are stored instead.
        store_rgb: store a uint8 single-channel source as RGB, for readers that need samples (TIAToolbox): the
            value in all three channels, or its ``colormap`` colour.
        description: extra JSON fields (e.g. ``{"scale": "probability * 255"}``); a plain string is stored as
            ``{"note": description}``.
        tmp_dir: folder for the raw temporaries of the reduced levels (default: the output folder, so that
            they never land on a RAM-backed /tmp). Removed on success and on failure; a killed run's are removed by
            the next run of the folder (:func:`pathbundles.outputs.remove_stale_work_files`).

    Returns:
        The final path.
    """
    final = Path(path)
    shape = tuple(int(n) for n in source.shape)
    dtype = np.dtype(source.dtype)
    _check_pyramid_args(shape, dtype, mpp, tile_px, compression, quality, deflate_level, min_level_px,
                        downsample_step, resample, level_rounding)
    lut = _colour_lut(colormap, shape, dtype, store_rgb)
    if colormap is not None and not store_rgb and compression == "jpeg":
        raise ValueError("compression 'jpeg' cannot store a palette (colormap): use 'deflate'")
    if store_rgb and (len(shape) == 2 or shape[2] == 1):
        source, shape = _LookupBands(source, lut), (*shape[:2], 3)
    samples = 1 if len(shape) == 2 else shape[2]
    level_hw = _level_sizes(shape[:2], downsample_step, min_level_px, level_rounding)
    # Reduced levels are stored twice (SubIFDs and top-level pages).
    raw_bytes = (sum(h * w for h, w in level_hw) * 2 - level_hw[0][0] * level_hw[0][1]) * samples * dtype.itemsize
    downsample = _area_downsample if resample == "area" else _nearest_downsample
    extra = {"note": description} if isinstance(description, str) else dict(description or {})
    palette = colormap is not None and samples == 1

    page_args: dict[str, Any] = {
        "dtype": dtype, "tile": (tile_px, tile_px),
        "photometric": "rgb" if samples == 3 else "palette" if palette else "minisblack",
        "resolutionunit": "CENTIMETER", "software": "pathbundles", "metadata": None,
        "buffersize": _ENCODE_BUFFER_BYTES,
    }
    if palette:
        page_args["colormap"] = lut.T.astype(np.uint16) * 257  # TIFF palettes are 16-bit per channel
    if compression == "jpeg":
        page_args.update(compression="jpeg", compressionargs={"level": quality})
    elif compression in ("deflate", "zlib"):
        page_args.update(compression="zlib")

    def level_fields(level: int) -> dict[str, Any]:
        scale = float(downsample_step ** level)
        # The caller's fields first, so that none of them can shadow the mpp a reader relies on.
        return {**extra, "pathbundles": "pyramid", "mpp": float(mpp), "level": level,
                "level_mpp": [float(mpp) * scale] * 2, "downsample": [scale, scale]}

    def write_level(tif: tifffile.TiffWriter, level: int, level_source: BandSource, sink: Any, bar: Any,
                    **tags: Any) -> None:
        h, w = level_hw[level]
        level_shape = (h, w) if samples == 1 else (h, w, samples)
        # Rows and columns of this level that make up the next one (all of them, or whole blocks only).
        next_h, next_w = level_hw[level + 1] if sink is not None else (0, 0)
        keep_h, keep_w = (next_h * downsample_step, next_w * downsample_step) if level_rounding == "floor" \
            else (h, w)

        def on_band(band: np.ndarray, y0: int) -> None:
            if sink is not None and y0 < keep_h:
                # Written band by band: the next level never exists in memory as a whole.
                np.ascontiguousarray(downsample(band[:keep_h - y0, :keep_w], downsample_step)).tofile(sink)

        tiles = _iter_tiles(level_source, level_shape, dtype, tile_px, on_band, bar.update)
        if compression in ("deflate", "zlib"):
            tiles = _deflate_tiles(tiles, tile_px, deflate_level)
        else:
            # Copies, so that a band is freed while tifffile still buffers its tiles for the encoder threads (it
            # would make them contiguous anyway); edge tiles are zero-padded by tifffile.
            tiles = (np.ascontiguousarray(tile) for tile in tiles)
        # A level pixel is a step ** level block of level 0 whatever the rounding of its size: that is its mpp.
        level_mpp = float(mpp) * downsample_step ** level
        tif.write(tiles, shape=level_shape, resolution=(10_000 / level_mpp, 10_000 / level_mpp), **tags,
                  **page_args)

    def raw_level(level_dir: str, level: int) -> _RawBands:
        h, w = level_hw[level]
        return _RawBands(Path(level_dir) / f"level{level}.raw", (h, w) + ((samples,) if samples > 1 else ()), dtype)

    n_tiles = sum(math.ceil(h / tile_px) * math.ceil(w / tile_px) * (2 if k else 1)
                  for k, (h, w) in enumerate(level_hw))
    tmp_parent = Path(tmp_dir) if tmp_dir is not None else final.parent
    tmp_parent.mkdir(parents=True, exist_ok=True)
    with (atomic_path(final) as tmp,
          tempfile.TemporaryDirectory(prefix=levels_dir_prefix(final), dir=tmp_parent) as level_dir,
          progress(total=n_tiles, desc=final.name) as bar,
          tifffile.TiffWriter(tmp, bigtiff=raw_bytes > _BIGTIFF_BYTES, byteorder="<") as tif):
        n_levels = len(level_hw)
        level_source: BandSource = source
        # Level 0 and, in its SubIFDs, the reduced levels, each made from the previous one's raw file.
        for level in range(n_levels):
            next_raw = Path(level_dir) / f"level{level + 1}.raw" if level + 1 < n_levels else None
            with open(next_raw, "wb") if next_raw is not None else contextlib.nullcontext() as sink:
                if level == 0:
                    tags = {"subfiletype": 0, "subifds": n_levels - 1 or None,
                            "description": _ome_xml(shape, dtype, mpp, level_fields(0))}
                else:
                    tags = {"subfiletype": 1, "description": json.dumps(level_fields(level))}
                write_level(tif, level, level_source, sink, bar, **tags)
            if next_raw is not None:
                level_source = raw_level(level_dir, level + 1)
        # The same reduced levels as top-level pages, for OpenSlide.
        for level in range(1, n_levels):
            write_level(tif, level, raw_level(level_dir, level), None, bar, subfiletype=1,
                        description=json.dumps(level_fields(level)))
    return final


def read_pyramid_fields(path: str | os.PathLike, level: int = 0) -> dict[str, Any]:
    """The JSON fields :func:`write_pyramid_tiff` stored for ``level`` (``mpp``, ``level_mpp``, ``downsample``
    and the caller's ``description`` fields), read with tifffile: level 0 from the OME-XML Image ``Description``
    (or, in files written before the OME layout, the page's own description), level k from the k-th top-level
    page.

    Raises:
        InputError: the file has no such level or no pathbundles fields there.
    """
    with tifffile.TiffFile(path) as tif:
        if level >= len(tif.pages):
            raise InputError(path, f"no level {level}: the file has {len(tif.pages)} top-level pages")
        text = tif.pages[level].description
    fields = None
    with contextlib.suppress(ValueError, TypeError):
        fields = json.loads(text)
    if fields is None and level == 0:
        with contextlib.suppress(ElementTree.ParseError, TypeError, ValueError):
            node = ElementTree.fromstring(text).find(f"{{{_OME_NS}}}Image/{{{_OME_NS}}}Description")
            fields = json.loads(node.text) if node is not None and node.text else None
    if not isinstance(fields, dict) or fields.get("pathbundles") != "pyramid":
        raise InputError(path, f"level {level} holds no pathbundles pyramid fields (not written by "
                               "pathbundles.writers.write_pyramid_tiff)")
    return fields


def read_pyramid_mpp(path: str | os.PathLike) -> float:
    """Level-0 resolution (um/px) of a TIFF written by :func:`write_pyramid_tiff` (or any TIFF with an OME-XML
    ``PhysicalSizeX``, or resolution tags in cm or inch), read with tifffile; the pathbundles JSON fields win over
    OME-XML, which wins over the tags.

    Raises:
        InputError: the file states no usable resolution.
    """
    with contextlib.suppress(InputError):
        return float(read_pyramid_fields(path)["mpp"])
    from pathbundles.wsi import ome_mpp

    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        ome = ome_mpp(page.description or "")
        if ome is not None:
            return ome[0]
        tags = page.tags
        unit_um = {2: 25_400.0, 3: 10_000.0}.get(int(tags.valueof("ResolutionUnit", 2)))
        xres = tags.valueof("XResolution")
        if unit_um is None or xres is None or xres[0] == 0:
            raise InputError(path, "no mpp: neither pathbundles JSON fields, an OME-XML PhysicalSizeX nor "
                                   "XResolution in cm/inch")
        return unit_um * xres[1] / xres[0]


_OME_NS = "http://www.openmicroscopy.org/Schemas/OME/2016-06"
_OME_TYPES = {"u1": "uint8", "u2": "uint16", "u4": "uint32", "i1": "int8", "i2": "int16", "i4": "int32",
              "f4": "float", "f8": "double"}


def _ome_xml(shape: tuple[int, ...], dtype: np.dtype, mpp: float, fields: Mapping[str, Any]) -> str:
    """OME-XML for page 0 of :func:`write_pyramid_tiff`: one Image of IFD 0 (its SubIFDs are the pyramid), the
    physical pixel size in um (the OME default unit, left implicit: Bio-Formats rejects the XML when the unit is
    spelled with a character reference) and the JSON ``fields`` as the Image's Description. ASCII only."""
    samples = 1 if len(shape) == 2 else shape[2]
    return ('<?xml version="1.0" encoding="UTF-8"?>'
            f'<OME xmlns="{_OME_NS}" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
            f'xsi:schemaLocation="{_OME_NS} {_OME_NS}/ome.xsd" Creator="pathbundles">'
            f'<Image ID="Image:0"><Description>{escape(json.dumps(fields))}</Description>'
            f'<Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="{_OME_TYPES[dtype.str[1:]]}" '
            f'SizeX="{shape[1]}" SizeY="{shape[0]}" SizeC="{samples}" SizeZ="1" SizeT="1" '
            f'PhysicalSizeX="{float(mpp)!r}" PhysicalSizeY="{float(mpp)!r}">'
            f'<Channel ID="Channel:0:0" SamplesPerPixel="{samples}"><LightPath/></Channel>'
            '<TiffData IFD="0" PlaneCount="1"/></Pixels></Image></OME>')


def _colour_lut(colormap: Mapping[int, Sequence[int]] | None, shape: tuple[int, ...], dtype: np.dtype,
                store_rgb: bool) -> np.ndarray:
    """(256, 3) uint8 colour of every value: ``colormap``'s (black where it has none), else grey (R = G = B)."""
    single = len(shape) == 2 or shape[2] == 1
    if (colormap is not None or store_rgb) and not (single and dtype == np.uint8):
        raise ValueError(f"colormap/store_rgb need a uint8 single-channel source, got {shape} {dtype}")
    if colormap is None:
        return np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    lut = np.zeros((256, 3), np.uint8)
    for value, colour in colormap.items():
        rgb = [int(c) for c in colour]
        if not 0 <= int(value) <= 255 or len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
            raise ValueError(f"colormap entry {value}: {colour}: expected a value 0..255 and (r, g, b) in 0..255")
        lut[int(value)] = rgb
    return lut


class _LookupBands:
    """Row bands of a uint8 single-channel source as RGB through a (256, 3) lookup table."""

    def __init__(self, source: BandSource, lut: np.ndarray) -> None:
        self.source, self.lut = source, lut
        self.shape, self.dtype = (*tuple(source.shape)[:2], 3), np.dtype(np.uint8)

    def __getitem__(self, rows: slice) -> np.ndarray:
        band = np.asarray(self.source[rows])
        return self.lut[band[..., 0] if band.ndim == 3 else band]


def _check_pyramid_args(shape: tuple[int, ...], dtype: np.dtype, mpp: float, tile_px: int, compression: str,
                        quality: int, deflate_level: int, min_level_px: int, downsample_step: int,
                        resample: str, level_rounding: str) -> None:
    """Raise ValueError naming the first argument of :func:`write_pyramid_tiff` that cannot work."""
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3)) or min(shape[:2]) < 1:
        raise ValueError(f"source shape {shape}: expected (H, W) or (H, W, C) with C in (1, 3), H, W >= 1")
    if dtype == np.bool_ or dtype.str[1:] not in _OME_TYPES:
        raise ValueError(f"source dtype {dtype}: expected one of OME-TIFF's {sorted(set(_OME_TYPES.values()))} "
                         "(bool: use uint8 0/255)")
    if not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp {mpp}: expected a positive number of um/px")
    if tile_px < 16 or tile_px % 16:
        raise ValueError(f"tile_px {tile_px}: TIFF tiles must be a positive multiple of 16")
    if compression not in _COMPRESSIONS:
        raise ValueError(f"compression {compression!r}: expected one of {_COMPRESSIONS}")
    if compression == "jpeg" and (dtype != np.uint8):
        raise ValueError(f"compression 'jpeg' needs uint8 data, got {dtype}: use 'deflate' for maps")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality {quality}: expected 1..100")
    if not 1 <= deflate_level <= 9:
        raise ValueError(f"deflate_level {deflate_level}: expected 1..9")
    if min_level_px < 1:
        raise ValueError(f"min_level_px {min_level_px}: expected >= 1")
    if not isinstance(downsample_step, (int, np.integer)) or downsample_step < 2 or tile_px % downsample_step:
        raise ValueError(f"downsample_step {downsample_step}: expected a whole number >= 2 dividing tile_px {tile_px}")
    if resample not in ("area", "nearest"):
        raise ValueError(f"resample {resample!r}: expected 'area' or 'nearest'")
    if level_rounding not in ("ceil", "floor"):
        raise ValueError(f"level_rounding {level_rounding!r}: expected 'ceil' or 'floor'")


def _level_sizes(hw: tuple[int, int], step: int, min_level_px: int, rounding: str = "ceil") -> list[tuple[int, int]]:
    """(H, W) of every level: ceil- or floor-divide by ``step`` until the smaller side is <= ``min_level_px``."""
    sizes = [hw]
    while min(sizes[-1]) > min_level_px and (rounding == "ceil" or min(sizes[-1]) >= step):
        h, w = sizes[-1]
        sizes.append((-(-h // step), -(-w // step)) if rounding == "ceil" else (h // step, w // step))
    return sizes


def _iter_tiles(source: BandSource, shape: tuple[int, ...], dtype: np.dtype, tile_px: int,
                on_band: Callable[[np.ndarray, int], None], on_tile: Callable[[], Any]) -> Iterator[np.ndarray]:
    """Yield row-major tiles of ``source`` as views of one band at a time (edge tiles uncut)."""
    h, w = shape[:2]
    for y0 in range(0, h, tile_px):
        y1 = min(h, y0 + tile_px)
        band = np.asarray(source[y0:y1])
        if band.ndim == 3 and len(shape) == 2 and band.shape[2] == 1:
            band = band[..., 0]
        if band.shape != (y1 - y0, *shape[1:]) or band.dtype != dtype:
            raise ValueError(f"source[{y0}:{y1}] gave {band.shape} {band.dtype}, "
                             f"expected {(y1 - y0, *shape[1:])} {dtype}")
        on_band(band, y0)
        for x0 in range(0, w, tile_px):
            yield band[:, x0:x0 + tile_px]
            on_tile()
        del band


def _deflate_tiles(tiles: Iterator[np.ndarray], tile_px: int, level: int) -> Iterator[bytes]:
    """zlib-encode tiles, zero-padding edge tiles to ``tile_px`` (tifffile writes encoded bytes as given)."""
    for tile in tiles:
        if tile.shape[:2] != (tile_px, tile_px):
            full = np.zeros((tile_px, tile_px, *tile.shape[2:]), tile.dtype)
            full[:tile.shape[0], :tile.shape[1]] = tile
            tile = full
        # TIFF data are little-endian here (TiffWriter byteorder "<"), whatever the source's byte order.
        yield _zlib_encode(np.ascontiguousarray(tile, tile.dtype.newbyteorder("<")), level=level)


class _RawBands:
    """Row bands of a C-order raw file, read with plain file reads (no mmap, so nothing stays resident)."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.shape, self.dtype = path, shape, dtype
        self._row_items = int(np.prod(shape[1:]))

    def __getitem__(self, rows: slice) -> np.ndarray:
        y0, y1, _ = rows.indices(self.shape[0])
        count = (y1 - y0) * self._row_items
        band = np.fromfile(self.path, self.dtype, count=count, offset=y0 * self._row_items * self.dtype.itemsize)
        return band.reshape((y1 - y0, *self.shape[1:]))


def _area_downsample(band: np.ndarray, step: int) -> np.ndarray:
    """Block mean over ``step`` x ``step`` blocks; partial blocks at the bottom/right average their pixels only.

    Strided in-place adds over column chunks: several times faster than a reshape-and-sum reduction, with
    temporaries of a few MB whatever the band width. Integers are rounded half up.
    """
    h, w = band.shape[:2]
    rest = band.shape[2:]
    oh, ow = -(-h // step), -(-w // step)
    is_int = band.dtype.kind in "ui"
    acc_dtype = np.uint16 if band.dtype == np.uint8 else (np.int64 if is_int else np.float64)
    out = np.empty((oh, ow, *rest), band.dtype)
    chunk_ow = max(1, _CHUNK_ELEMS // max(1, oh * int(np.prod(rest))))
    for ox0 in range(0, ow, chunk_ow):
        ox1 = min(ow, ox0 + chunk_ow)
        part = band[:, ox0 * step:ox1 * step]
        padded_hw = (oh * step, (ox1 - ox0) * step)
        partial = part.shape[:2] != padded_hw
        if partial:
            # Zero padding adds nothing to the sums; the counts below leave it out of the mean.
            full = np.zeros((*padded_hw, *rest), band.dtype)
            full[:part.shape[0], :part.shape[1]] = part
            part = full
        rows = part[0::step].astype(acc_dtype)
        for i in range(1, step):
            rows += part[i::step]
        sums = rows[:, 0::step].copy()
        for i in range(1, step):
            sums += rows[:, i::step]
        if not partial:
            counts: Any = step * step  # a scalar divisor: the common case, and much faster than an array
        else:
            row_n = np.minimum(step, h - np.arange(oh) * step)
            col_n = np.minimum(step, w - np.arange(ox0, ox1) * step)
            counts = np.multiply.outer(row_n, col_n).astype(acc_dtype).reshape((oh, ox1 - ox0) + (1,) * len(rest))
        if is_int:
            sums += counts // 2
            sums //= counts
        else:
            sums /= counts
        out[:, ox0:ox1] = sums
    return out


def _nearest_downsample(band: np.ndarray, step: int) -> np.ndarray:
    """Top-left pixel of every ``step`` x ``step`` block (label maps)."""
    return band[::step, ::step]


# ---------------------------------------------------------------------------------------------------------------
# Disk-backed canvas
# ---------------------------------------------------------------------------------------------------------------


class DiskCanvas:
    """A numpy memmap in a temporary file for stitching tiles into a slide-sized array.

    ``canvas[y0:y1, x0:x1] = tile`` writes, ``canvas[y0:y1]`` reads (a copy, valid after :meth:`close`), so a
    canvas is a ``source`` for :func:`write_pyramid_tiff`. With ``weighted=True`` tiles are instead added with
    :meth:`accumulate` and reads return the weighted mean (``fill`` where nothing was added): overlapping
    predictions (strides smaller than the tile, test-time augmentation) average instead of overwriting.

    Args:
        shape: (H, W) or (H, W, C) in canvas pixels (e.g. probability-map pixels, not level-0 pixels).
        dtype: dtype of what reads return.
        fill: initial value everywhere.
        dir: folder of the temporary file(s) (default: the system temp folder). Writers use their output folder's
            work area (:func:`pathbundles.outputs.work_area`): disk-backed, and where the next run of the folder
            finds the files of a killed run.
        weighted: keep float sums and a float32 weight plane for :meth:`accumulate`.

    The files are removed by :meth:`close`, on leaving a ``with`` block, or when the canvas is garbage-collected.
    Pages written through the memmap count towards the process RSS until the kernel writes them back; they are
    file-backed and reclaimable, not anonymous memory.
    """

    def __init__(self, shape: Sequence[int], dtype: DTypeLike, fill: float = 0, dir: str | os.PathLike | None = None,
                 weighted: bool = False) -> None:
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        if self.ndim not in (2, 3) or min(self.shape) < 1:
            raise ValueError(f"canvas shape {self.shape}: expected (H, W) or (H, W, C), all >= 1")
        self.fill = fill
        self.weighted = weighted
        self._paths: list[str] = []
        self._maps: list[np.memmap] = []
        self._finalizer = weakref.finalize(self, _release, self._maps, self._paths)
        if weighted:
            sum_dtype = np.float64 if self.dtype == np.float64 else np.float32
            self._data = self._new_map(self.shape, sum_dtype, 0, dir)
            self._weight = self._new_map(self.shape[:2], np.float32, 0, dir)
        else:
            self._data = self._new_map(self.shape, self.dtype, fill, dir)

    def _new_map(self, shape: tuple[int, ...], dtype: DTypeLike, fill: float,
                 dir: str | os.PathLike | None) -> np.memmap:
        fd, name = tempfile.mkstemp(prefix=CANVAS_PREFIX, suffix=".raw", dir=dir)
        self._paths.append(name)
        dtype = np.dtype(dtype)
        row = np.full(shape[1:], fill, dtype)
        with os.fdopen(fd, "wb") as f:
            if fill == 0:
                f.truncate(int(np.prod(shape)) * dtype.itemsize)  # sparse file: zeros cost no disk or time
            else:
                # Filled by plain writes, not through the map, so the fill never becomes resident memory.
                block = np.broadcast_to(row, (max(1, (8 << 20) // max(1, row.nbytes)), *row.shape)).copy()
                for y0 in range(0, shape[0], block.shape[0]):
                    block[:min(block.shape[0], shape[0] - y0)].tofile(f)
        mapped = np.memmap(name, dtype, "r+", shape=shape)
        self._maps.append(mapped)
        return mapped

    def __getitem__(self, key: Any) -> np.ndarray:
        self._check_open()
        if not self.weighted:
            return np.array(self._data[key])
        sums = np.asarray(self._data[key], np.float64)
        weight = np.asarray(self._weight[key if not isinstance(key, tuple) else key[:2]], np.float64)
        if sums.ndim > weight.ndim:
            weight = weight[..., None]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(weight > 0, sums / weight, self.fill)
        return (np.rint(mean) if self.dtype.kind in "ui" else mean).astype(self.dtype)

    def __setitem__(self, key: Any, value: ArrayLike) -> None:
        self._check_open()
        if self.weighted:
            raise TypeError("a weighted DiskCanvas takes tiles through accumulate(), not item assignment")
        self._data[key] = value

    def accumulate(self, top_left_rc: tuple[int, int], tile: ArrayLike, weight: float | ArrayLike = 1.0) -> None:
        """Add ``weight * tile`` at ``top_left_rc`` (canvas row, col); parts outside the canvas are dropped.

        Args:
            top_left_rc: (row, col) of the tile's first pixel in canvas pixels; may be negative.
            tile: (h, w) or (h, w, C) values.
            weight: scalar or (h, w) weights (e.g. a window that favours tile centres).
        """
        self._check_open()
        if not self.weighted:
            raise TypeError("accumulate() needs DiskCanvas(..., weighted=True)")
        tile = np.asarray(tile, np.float64)
        w_plane = np.broadcast_to(np.asarray(weight, np.float64), tile.shape[:2])
        r0, c0 = top_left_rc
        r1, c1 = r0 + tile.shape[0], c0 + tile.shape[1]
        cr0, cc0 = max(r0, 0), max(c0, 0)
        cr1, cc1 = min(r1, self.shape[0]), min(c1, self.shape[1])
        if cr0 >= cr1 or cc0 >= cc1:
            return
        inner = (slice(cr0 - r0, cr1 - r0), slice(cc0 - c0, cc1 - c0))
        w_in = w_plane[inner]
        t_in = tile[inner] * (w_in[..., None] if tile.ndim == 3 else w_in)
        self._data[cr0:cr1, cc0:cc1] += t_in.astype(self._data.dtype)
        self._weight[cr0:cr1, cc0:cc1] += w_in.astype(np.float32)

    def flush(self) -> None:
        """Write dirty pages to the file (lets the kernel drop them from memory)."""
        self._check_open()
        for mapped in self._maps:
            mapped.flush()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Unmap and delete the temporary file(s); reads and writes raise afterwards."""
        self._finalizer()

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("DiskCanvas is closed")

    def __enter__(self) -> DiskCanvas:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else self._paths[0]
        return f"DiskCanvas(shape={self.shape}, dtype={self.dtype}, weighted={self.weighted}, {state})"


def _release(maps: list[np.memmap], paths: list[str]) -> None:
    """Close the memmaps and remove their files (module-level so the finalizer keeps no canvas alive)."""
    for mapped in maps:
        mapped._mmap.close()  # type: ignore[attr-defined]
    maps.clear()
    for name in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(name)


# ---------------------------------------------------------------------------------------------------------------
# Overlay PNGs
# ---------------------------------------------------------------------------------------------------------------

# Piecewise-linear colormaps as (position, value) anchors per channel (matplotlib's segment data for jet/hot).
_COLORMAPS: dict[str, tuple[Sequence[tuple[float, float]], ...]] = {
    "jet": (((0, 0), (0.35, 0), (0.66, 1), (0.89, 1), (1, 0.5)),
            ((0, 0), (0.125, 0), (0.375, 1), (0.64, 1), (0.91, 0), (1, 0)),
            ((0, 0.5), (0.11, 1), (0.34, 1), (0.65, 0), (1, 0))),
    "hot": (((0, 0.0416), (0.365079, 1), (1, 1)),
            ((0, 0), (0.365079, 0), (0.746032, 1), (1, 1)),
            ((0, 0), (0.746032, 0), (1, 1))),
    "gray": (((0, 0), (1, 1)),) * 3,
}

#: Ring colour of detection markers on probability overlays: magenta is in no jet colour nor H&E stain.
MARKER_COLOUR = (255, 0, 255)
#: PNG text key of the overlay's layout (:func:`read_overlay_layout`).
OVERLAY_LAYOUT_KEY = "pathbundles-overlay"
_PAPER, _INK = (255, 255, 255), (0, 0, 0)


def colormap_lut(cmap: str | ArrayLike) -> np.ndarray:
    """A (256, 3) uint8 lookup table from a name in ("jet", "hot", "gray") or from a (256, 3) array."""
    if isinstance(cmap, str):
        if cmap not in _COLORMAPS:
            raise ValueError(f"cmap {cmap!r}: expected one of {sorted(_COLORMAPS)} or a (256, 3) uint8 array")
        x = np.linspace(0, 1, 256)
        channels = [np.interp(x, *zip(*anchors)) for anchors in _COLORMAPS[cmap]]
        return np.rint(np.stack(channels, axis=1) * 255).astype(np.uint8)
    lut = np.asarray(cmap)
    if lut.shape != (256, 3):
        raise ValueError(f"cmap array of shape {lut.shape}: expected (256, 3)")
    return lut.astype(np.uint8)


def overlay_font_px(long_side_px: int) -> int:
    """Text height for an overlay whose slide image has this long side: ~1/90 of it, at least 12 px (22 px on a
    2000 px overlay), so that labels stay legible at the size the image is shown."""
    return max(12, round(long_side_px / 90))


def write_overlay_png(path: str | os.PathLike, rgb_thumbnail: ArrayLike, prob_map: ArrayLike, *,
                      alpha: float = 0.5, threshold: float | None = None, cmap: str | ArrayLike = "jet",
                      value_range: tuple[float, float] | None = None, resample: str = "bilinear",
                      mask: ArrayLike | None = None, detections_px: ArrayLike | None = None,
                      title: Sequence[str] = (), colour_bar: str | None = None,
                      fields: Mapping[str, Any] | None = None) -> Path:
    """Colour a probability map over a slide thumbnail and write an RGB PNG.

    Without ``detections_px``, ``title`` and ``colour_bar`` the PNG is the thumbnail's size. With them it is laid
    out for review (:func:`read_overlay_layout` gives where each part lies): a title strip on top, the coloured
    thumbnail below it with detections marked by a ring (:data:`MARKER_COLOUR`) and numbered 1..N in the order
    given (the detection CSV's rows), and a colour bar (0..1, labelled with ``colour_bar``) in a margin to its
    right, never over the slide.

    Args:
        path: output ``.png``.
        rgb_thumbnail: (h, w, 3) uint8 (an alpha channel is dropped).
        prob_map: (H, W) map covering the same slide area at any resolution; resized to (h, w).
        alpha: opacity of the colour, 0..1.
        threshold: colour only where the probability (in 0..1 after scaling) is >= threshold, so glass and
            negligible probabilities show the thumbnail as it is; None: everywhere.
        cmap: colormap name ("jet", "hot", "gray") or a (256, 3) uint8 lookup table.
        value_range: map values shown as 0 and 1; default (0, 1) for floats, (0, dtype max) for integers
            (so a uint8 map stored as probability * 255 reads right).
        resample: "bilinear" (smooth) or "nearest" (keeps the map's pixels visible).
        mask: (h, w) bool, colour only where True (tissue); None: everywhere.
        detections_px: (N, 2) x, y of detections in thumbnail px (pixel k spans [k, k + 1)).
        title: lines of the title strip (slide name, model and version, score).
        colour_bar: the colour bar's label (e.g. "tumour probability"); None: no colour bar.
        fields: extra entries for the layout record (e.g. the overlay's um/px).
    """
    rgb = _as_rgb(rgb_thumbnail)
    prob = np.asarray(prob_map)
    if prob.ndim != 2:
        raise ValueError(f"prob_map shape {prob.shape}: expected (H, W)")
    if value_range is None:
        value_range = (0.0, float(np.iinfo(prob.dtype).max)) if prob.dtype.kind in "ui" else (0.0, 1.0)
    lo, hi = value_range
    scaled = np.clip((prob.astype(np.float32) - lo) / (hi - lo), 0, 1)
    scaled = _resize(scaled, rgb.shape[:2], resample)
    lut = colormap_lut(cmap)
    colour = lut[np.rint(scaled * 255).astype(np.uint8)]
    weight = np.full(scaled.shape, alpha, np.float32)
    if threshold is not None:
        weight[scaled < threshold] = 0
    if mask is not None:
        tissue = np.asarray(mask, bool)
        if tissue.shape != scaled.shape:
            raise ValueError(f"mask shape {tissue.shape}: expected the thumbnail's {scaled.shape}")
        weight[~tissue] = 0
    blended = _blend(rgb, colour, weight)
    font_px = overlay_font_px(max(rgb.shape[:2]))
    panel = None if colour_bar is None else _colour_bar_panel(lut, colour_bar, threshold, font_px)
    xy = np.zeros((0, 2)) if detections_px is None else np.asarray(detections_px, np.float64).reshape(-1, 2)
    markers = [(x, y, MARKER_COLOUR, str(k + 1)) for k, (x, y) in enumerate(xy)]
    return write_annotated_png(path, blended, title=title, panel=panel, markers=markers, fields=fields)


def write_label_overlay_png(path: str | os.PathLike, rgb: ArrayLike, label_map: ArrayLike,
                            palette: Mapping[int, Sequence[int]], *, alpha: float = 0.5,
                            legend: Sequence[tuple[str, Sequence[int]]] | None = None, title: Sequence[str] = (),
                            fields: Mapping[str, Any] | None = None) -> Path:
    """Colour a multi-class label map over a thumbnail (nearest-neighbour resize) and write an RGB PNG.

    Without ``legend`` and ``title`` the PNG is the thumbnail's size; with them, a title strip on top and the
    legend (a swatch and name per class) in a margin to the right (:func:`read_overlay_layout`).

    Args:
        path: output ``.png``.
        rgb: (h, w, 3) uint8 thumbnail (an alpha channel is dropped).
        label_map: (H, W) integer labels covering the same slide area at any resolution.
        palette: label -> (r, g, b) 0..255. Labels absent from it (e.g. background 0) are left uncoloured.
        alpha: opacity of the colour, 0..1.
        legend: (name, colour) rows of the legend; None: no legend.
        title: lines of the title strip.
        fields: extra entries for the layout record.
    """
    base = _as_rgb(rgb)
    labels = np.asarray(label_map)
    if labels.ndim != 2 or labels.dtype.kind not in "ui":
        raise ValueError(f"label_map {labels.shape} {labels.dtype}: expected (H, W) integers")
    labels = _resize(labels, base.shape[:2], "nearest")
    colour = np.zeros(base.shape, np.uint8)
    weight = np.zeros(labels.shape, np.float32)
    for label, rgb_value in palette.items():
        hit = labels == label
        colour[hit] = rgb_value
        weight[hit] = alpha
    panel = None if legend is None else legend_panel(legend, overlay_font_px(max(base.shape[:2])))
    return write_annotated_png(path, _blend(base, colour, weight), title=title, panel=panel, markers=(),
                             fields=fields)


def legend_panel(entries: Sequence[tuple[str, Sequence[int]]], font_px: int = 12) -> np.ndarray:
    """A white legend box, one row per (name, colour): a colour swatch with a black border, then the name, at
    ``font_px`` text height.

    Returns:
        (h, w, 3) uint8 RGB.
    """
    font = _font(font_px)
    pad, swatch = max(4, font_px // 2), font_px
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [probe.textbbox((0, 0), name, font=font) for name, _ in entries]
    row_px = max([swatch, *(b[3] - b[1] for b in boxes)]) + pad
    width = 3 * pad + swatch + max((b[2] - b[0] for b in boxes), default=0)
    height = pad + row_px * len(entries)
    image = Image.new("RGB", (width, height), _PAPER)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, width - 1, height - 1), outline=_INK)
    for k, ((name, colour), box) in enumerate(zip(entries, boxes, strict=True)):
        top = pad + k * row_px
        draw.rectangle((pad, top, pad + swatch - 1, top + swatch - 1), fill=tuple(int(c) for c in colour),
                       outline=_INK)
        draw.text((2 * pad + swatch - box[0], top + (swatch - (box[3] - box[1])) // 2 - box[1]), name, fill=_INK,
                  font=font)
    return np.asarray(image)


def read_overlay_layout(path: str | os.PathLike) -> dict[str, Any]:
    """Where the parts of an overlay PNG lie, from its text chunk: ``slide_box_px`` [x, y, w, h] (the slide
    thumbnail), ``title_box_px`` and ``panel_box_px`` (colour bar or legend; [0, 0, 0, 0] when absent),
    ``colour_bar_box_px`` (the bar itself, value 1 at its top row and 0 at its bottom row), ``markers`` (the
    numbered detections' [x, y] in PNG px) and the writer's ``fields``.

    Raises:
        InputError: the PNG has no layout record (not written by this module).
    """
    with Image.open(path) as image:
        # The writer puts the chunk before the pixel data, where opening the file reads it (``info``); ``text``
        # decodes every pixel first to find chunks after them (a 2084 px HPF overlay: 0.26 s against 0.2 ms).
        text = image.info.get(OVERLAY_LAYOUT_KEY)
        if text is None:
            text = getattr(image, "text", {}).get(OVERLAY_LAYOUT_KEY)
    if text is None:
        raise InputError(path, f"no {OVERLAY_LAYOUT_KEY!r} text chunk: not an overlay written by pathbundles")
    return json.loads(text)


def _font(font_px: int) -> Any:
    # PIL >= 10.1 scales its bundled font when FreeType is there; otherwise the fixed bitmap font.
    try:
        return ImageFont.load_default(size=font_px)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _colour_bar_panel(lut: np.ndarray, label: str, threshold: float | None,
                      font_px: int) -> tuple[np.ndarray, list[int]]:
    """A white panel with a vertical colour bar (1 at the top), ticks 0, 0.5, 1, the label above it and, with a
    threshold, a tick at it and a note that values below it are not coloured. Returns the panel and the bar's box
    [x, y, w, h] in it."""
    font = _font(font_px)
    pad, bar_w, bar_h = font_px, font_px, 12 * font_px
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = [label] + ([f"< {threshold:g}: not coloured"] if threshold else [])
    text_w = max(probe.textbbox((0, 0), line, font=font)[2] for line in lines)
    tick_w = probe.textbbox((0, 0), "0.5", font=font)[2]
    width = max(text_w, bar_w + pad // 2 + font_px // 2 + tick_w) + 2 * pad
    bar_x, bar_y = pad, 2 * pad + font_px
    height = bar_y + bar_h + 2 * pad + (font_px + pad // 2) * (len(lines) - 1) + font_px // 2
    image = Image.new("RGB", (width, height), _PAPER)
    draw = ImageDraw.Draw(image)
    draw.text((pad, pad), label, fill=_INK, font=font)
    values = 1.0 - np.arange(bar_h) / (bar_h - 1)
    bar = np.repeat(lut[np.rint(values * 255).astype(np.intp)][:, None], bar_w, axis=1)
    image.paste(Image.fromarray(bar), (bar_x, bar_y))
    draw.rectangle((bar_x - 1, bar_y - 1, bar_x + bar_w, bar_y + bar_h), outline=_INK)
    ticks = [0.0, 0.5, 1.0] + ([float(threshold)] if threshold else [])
    for value in ticks:
        y = bar_y + round((1.0 - value) * (bar_h - 1))
        draw.line((bar_x + bar_w, y, bar_x + bar_w + font_px // 2, y), fill=_INK, width=max(1, font_px // 10))
        if value in (0.0, 0.5, 1.0):
            draw.text((bar_x + bar_w + font_px // 2 + pad // 2, y), f"{value:g}", fill=_INK, font=font, anchor="lm")
    for k, line in enumerate(lines[1:]):
        draw.text((pad, bar_y + bar_h + pad + k * (font_px + pad // 2)), line, fill=_INK, font=font)
    return np.asarray(image), [bar_x, bar_y, bar_w, bar_h]


def write_annotated_png(path: str | os.PathLike, slide: np.ndarray, *, title: Sequence[str] = (),
                        panel: np.ndarray | tuple[np.ndarray, list[int]] | None = None,
                        markers: Sequence[tuple[float, float, Sequence[int], str | None]] = (),
                        fields: Mapping[str, Any] | None = None, ring_px: float | None = None,
                        ring_width_px: int | None = None) -> Path:
    """Lay out and write an overlay: ``title`` lines on top, ``slide`` (its px (0, 0) at the strip's foot) with
    ``markers`` (x, y in slide px, ring colour, label or None), ``panel`` (an image, or an image and a colour bar
    box [x, y, w, h] in it) to the right, all on white; the layout as a PNG text chunk (:func:`read_overlay_layout`).
    With no title, panel nor markers the PNG is ``slide`` itself.

    Args:
        ring_px, ring_width_px: marker ring radius and line width, px; default from the text height.
    """
    h, w = slide.shape[:2]
    font_px = overlay_font_px(max(h, w))
    font, pad = _font(font_px), font_px // 2
    bar_box = None
    if isinstance(panel, tuple):
        panel, bar_box = panel
    title_h = (len(title) * (font_px + pad) + pad) if title else 0
    panel_h, panel_w = panel.shape[:2] if panel is not None else (0, 0)
    panel_x = w + pad if panel is not None else w
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_w = max((probe.textbbox((0, 0), line, font=font)[2] + 2 * pad for line in title), default=0)
    canvas = Image.new("RGB", (max(panel_x + panel_w + (pad if panel is not None else 0), title_w),
                               title_h + max(h, panel_h)), _PAPER)
    canvas.paste(Image.fromarray(slide), (0, title_h))
    if panel is not None:
        canvas.paste(Image.fromarray(panel), (panel_x, title_h))
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(title):
        draw.text((pad, pad + k * (font_px + pad)), line, fill=_INK, font=font)
    radius = ring_px if ring_px is not None else float(font_px)
    ring_w = ring_width_px if ring_width_px is not None else max(2, font_px // 7)
    placed = []
    for x, y, colour, label in markers:
        cx, cy = float(x), float(y) + title_h
        placed.append([cx, cy])
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), outline=tuple(colour), width=ring_w)
        if label:
            # Black digits with a white outline read on any background.
            draw.text((cx + radius + 2, cy - radius - 2), label, fill=_INK, font=font, anchor="lb",
                      stroke_width=max(1, font_px // 8), stroke_fill=_PAPER)
    layout = {"slide_box_px": [0, title_h, w, h], "title_box_px": [0, 0, canvas.width, title_h],
              "panel_box_px": [panel_x, title_h, panel_w, panel_h] if panel is not None else [0, 0, 0, 0],
              "colour_bar_box_px": ([panel_x + bar_box[0], title_h + bar_box[1], *bar_box[2:]] if bar_box
                                    else [0, 0, 0, 0]),
              "markers": placed, "fields": dict(fields or {})}
    with atomic_path(path) as tmp:
        # pathbundles.png, not Pillow's encoder: a 2084 px HPF overlay encodes 2.4x faster for 1.11x the bytes, real
        # H&E 3.1x faster for 1.01x (slide and HPF pixels compress little at any level); the same decoded pixels.
        write_png(tmp, np.asarray(canvas), {OVERLAY_LAYOUT_KEY: json.dumps(layout)})
    return Path(path)


def _as_rgb(image: ArrayLike) -> np.ndarray:
    rgb = np.asarray(image)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4) or rgb.dtype != np.uint8:
        raise ValueError(f"thumbnail {rgb.shape} {rgb.dtype}: expected (h, w, 3) uint8 RGB")
    return rgb[..., :3]


def _resize(image: np.ndarray, hw: tuple[int, int], resample: str) -> np.ndarray:
    """Resize a 2-D array to ``hw``: nearest by index (any dtype) or bilinear (float32, PIL antialiases)."""
    if image.shape == hw:
        return image
    if resample == "nearest":
        rows = np.minimum((np.arange(hw[0]) + 0.5) * image.shape[0] / hw[0], image.shape[0] - 1).astype(np.intp)
        cols = np.minimum((np.arange(hw[1]) + 0.5) * image.shape[1] / hw[1], image.shape[1] - 1).astype(np.intp)
        return image[rows[:, None], cols[None, :]]
    if resample == "bilinear":
        resized = Image.fromarray(image.astype(np.float32)).resize((hw[1], hw[0]), Image.BILINEAR)
        return np.asarray(resized)
    raise ValueError(f"resample {resample!r}: expected 'bilinear' or 'nearest'")


def _blend(rgb: np.ndarray, colour: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``rgb`` where ``weight`` is 0 (exactly: glass stays the thumbnail), ``colour`` blended in by ``weight``."""
    blended = rgb * (1 - weight[..., None]) + colour * weight[..., None]
    return np.rint(blended).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Detections: (N, 3) float arrays of [probability, x, y], x and y in level-0 pixels
# ---------------------------------------------------------------------------------------------------------------


def _as_detections(detections: ArrayLike) -> np.ndarray:
    """``detections`` as an (N, 3) float64 array [probability, x, y], probabilities in [0, 1]; N = 0 allowed."""
    from pathbundles.checks import out_of_unit_range

    array = np.asarray(detections, np.float64)
    if array.size == 0:
        return array.reshape(0, 3)
    if array.ndim != 2 or array.shape[1] != 3 or not np.isfinite(array).all():
        raise ValueError(f"detections of shape {array.shape}: expected finite (N, 3) rows [probability, x, y]")
    bad = out_of_unit_range(array[:, 0])
    if len(bad):
        raise ValueError(f"detection {int(bad[0])} has probability {float(array[bad[0], 0])!r}, outside [0, 1]")
    return array


def write_detections_csv(path: str | os.PathLike, detections: ArrayLike) -> Path:
    """Write detections in the Camelyon16 format: no header, one ``probability,x,y`` row per detection, the
    probability to 10 significant digits and x, y as whole numbers.

    x, y are the level-0 pixel (column, row) holding the detection: ``floor`` of its position, pixel i spanning
    ``[i, i + 1)``. The organisers' ``readCSVContent`` parses x and y with ``int()`` and fails on ``1462.925852``;
    and their hit test ``mask[int(y / d), int(x / d)]`` (:mod:`pathbundles.metrics.froc`: ``floor``) gives the same
    mask pixel for the whole number as for the position whenever the mask downsample d is a whole number (32 for
    Camelyon16's level 5), so the FROC is unchanged. The sub-pixel positions are in the GeoJSON
    (:func:`write_detections_geojson`).

    Args:
        path: output ``.csv``.
        detections: (N, 3) array-like of [probability, x, y], x and y in level-0 pixels.
    """
    rows = _as_detections(detections)
    pixels = np.floor(rows[:, 1:]).astype(np.int64)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="ascii", newline="\n") as f:
        for p, (x, y) in zip(rows[:, 0], pixels):
            f.write(f"{p:.10g},{x},{y}\n")
    return Path(path)


def read_detections_csv(path: str | os.PathLike) -> np.ndarray:
    """Read a Camelyon16 detection CSV (no header, ``probability,x,y`` per line, probability in [0, 1]; blank lines
    skipped).

    Returns:
        (N, 3) float64 [probability, x, y], x and y in level-0 pixels.

    Raises:
        InputError: naming the file and 1-based line of the first row that is not three finite numbers.
    """
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.split(",")
            try:
                values = [float(v) for v in fields]
            except ValueError:
                values = []
            if len(values) != 3 or not all(map(math.isfinite, values)):
                raise InputError(path, f"expected three numbers 'probability,x,y', got {line.rstrip()!r}",
                                 line=line_no)
            if not 0.0 <= values[0] <= 1.0:
                raise InputError(path, f"probability {values[0]:g} in {line.rstrip()!r} is outside [0, 1]; rows are "
                                       "'probability,x,y' (Camelyon16 order)", line=line_no)
            rows.append(values)
    return np.array(rows, np.float64).reshape(-1, 3)


def write_detections_geojson(path: str | os.PathLike, detections: ArrayLike, mpp: float | None = None, *,
                             object_type: str = "detection", class_name: str = "Tumor",
                             color: Sequence[int] = (200, 0, 0), id_scope: str | None = None,
                             properties: Mapping[str, Any] | None = None) -> Path:
    """Write detections as a GeoJSON FeatureCollection of Points that QuPath imports.

    Feature k: ``id`` :func:`pathbundles.annotations.feature_id` of (``id_scope``, k), the same in every run;
    ``Point [x, y]`` in level-0 pixels (sub-pixel, as detected); properties ``{"name": "<class_name> <k + 1>",
    "score": p, "objectType": object_type, "classification": {"name": class_name, "color": color},
    "measurements": {"score": p}}``.

    Args:
        path: output ``.geojson``/``.json``.
        detections: (N, 3) array-like of [probability, x, y], x and y in level-0 pixels.
        mpp: level-0 um/px of the slide, recorded in the collection's ``properties`` when given.
        object_type: QuPath object type, ``"detection"`` or ``"annotation"``.
        class_name: QuPath classification name.
        color: classification colour (r, g, b) 0..255.
        id_scope: what the ids are made from with the feature index, e.g. ``"<slide name>/detections"``; default:
            ``"<file stem>/detections"`` (our outputs are named by their slide).
        properties: further fields of the collection's ``properties`` (the run's weights:
            :meth:`pathbundles.weights.WeightsIdentity.record`).
    """
    if object_type not in ("detection", "annotation"):
        raise ValueError(f"object_type {object_type!r}: expected 'detection' or 'annotation'")
    scope = f"{Path(path).stem}/detections" if id_scope is None else id_scope
    classification = {"name": class_name, "color": [int(c) for c in color]}
    features = [
        {"type": "Feature", "id": feature_id(scope, k),
         "geometry": {"type": "Point", "coordinates": [float(x), float(y)]},
         "properties": {"name": f"{class_name} {k + 1}", "score": float(p), "objectType": object_type,
                        "classification": classification, "measurements": {"score": float(p)}}}
        for k, (p, x, y) in enumerate(_as_detections(detections))
    ]
    collection: dict[str, Any] = {"type": "FeatureCollection", "features": features}
    collection["properties"] = {"coordinates": "level-0 pixels (x, y)",
                                **({"mpp": float(mpp)} if mpp is not None else {}), **dict(properties or {})}
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(collection, f)
    return Path(path)


def write_detections_asap_xml(path: str | os.PathLike, detections: ArrayLike, *, class_name: str = "Tumor",
                              color: Sequence[int] = (200, 0, 0)) -> Path:
    """Write detections as ASAP XML (the Camelyon16 viewer's format): one "Dot" annotation per detection.

    Detection k is named ``"<class_name> <k + 1> score=<p>"`` (ASAP shows names; it has no other field for a
    score), in group ``class_name`` shown in ``color``; its position is the level-0 (x, y), sub-pixel.
    :func:`pathbundles.annotations.read_annotations` reads the file back.

    Args:
        path: output ``.xml``.
        detections: (N, 3) array-like of [probability, x, y], x and y in level-0 pixels.
        class_name: the ASAP group of the detections.
        color: the group's colour (r, g, b) 0..255.
    """
    dots = [Annotation(name=f"{class_name} {k + 1} score={p:.6g}", group=class_name, kind="point", label=class_name,
                       xy=[[x, y]])
            for k, (p, x, y) in enumerate(_as_detections(detections))]
    write_asap_xml(path, dots, colours={class_name: color})
    return Path(path)


def read_detections_geojson(path: str | os.PathLike) -> np.ndarray:
    """Read Point features with a ``score`` property (as :func:`write_detections_geojson` writes them).

    Returns:
        (N, 3) float64 [score, x, y], x and y in the file's coordinates (level-0 pixels for our files).

    Raises:
        InputError: naming the file, and the line for invalid JSON or the feature index for a bad feature.
    """
    try:
        with open(path, encoding="utf-8") as f:
            collection = json.load(f)
    except json.JSONDecodeError as err:
        raise InputError(path, f"invalid JSON: {err.msg}", line=err.lineno) from err
    if not isinstance(collection, dict) or collection.get("type") != "FeatureCollection":
        raise InputError(path, "expected a GeoJSON FeatureCollection")
    rows = []
    for i, feature in enumerate(collection.get("features", [])):
        try:
            geometry, props = feature["geometry"], feature["properties"]
            if geometry["type"] != "Point":
                raise ValueError(f"geometry {geometry['type']!r} is not a Point")
            x, y = (float(v) for v in geometry["coordinates"][:2])
            rows.append((float(props["score"]), x, y))
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(path, f"feature {i}: expected a Point with a numeric 'score' property ({err})") from err
    return np.array(rows, np.float64).reshape(-1, 3)
