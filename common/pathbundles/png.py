"""A fast PNG writer for large 8-bit images (overlays of whole HPFs and slide thumbnails).

Pillow's encoder tries several PNG filters on every row and keeps the best one, then deflates. This writer filters
every row with PNG's "Up" filter (one vectorised subtraction) and deflates at level 1 with zlib's run-length strategy:
on a segmitos HPF overlay (2264 x 2197 px) 0.13 s against Pillow's 0.31 s at level 1 for 1.11x the bytes, on an
overlay of real H&E (CMU-1-Small-Region.svs, 2472 x 3130 px) 0.11 s against 0.33 s for 1.01x the bytes
(``benchmarks/bench_png.py``, medians of 7, 2026-12-07, 2-core AMD EPYC VM at load 1.3-1.5). The decoded pixels are
the same; any PNG reader opens the file (IHDR, iTXt, IDAT, IEND).
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Mapping
from typing import BinaryIO

import numpy as np

__all__ = ["write_png"]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: PNG colour types by channel count: grey, grey + alpha, RGB, RGBA
_COLOUR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}
_UP_FILTER = 2
#: rows deflated at a time: bounds the filtered copy to a few MiB whatever the image size
_ROWS_PER_BLOCK = 256


def _chunk(out: BinaryIO, kind: bytes, data: bytes) -> None:
    out.write(struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind))))


def _keyword(key: str) -> bytes:
    """A PNG text keyword: 1-79 Latin-1 printable characters, no leading, trailing or double spaces."""
    try:
        raw = key.encode("latin-1")
    except UnicodeEncodeError:
        raw = b""
    if not 1 <= len(raw) <= 79 or any(c < 32 or 126 < c < 161 for c in raw) or raw != raw.strip() or b"  " in raw:
        raise ValueError(f"PNG text keyword {key!r}: expected 1-79 printable Latin-1 characters")
    return raw


def write_png(out: str | os.PathLike | BinaryIO, image: np.ndarray, text: Mapping[str, str] | None = None,
              level: int = 1) -> None:
    """Write an 8-bit (H, W), (H, W, 1), (H, W, 2), (H, W, 3) or (H, W, 4) image as PNG to a path or binary file.

    Args:
        out: file path, or a binary file object open for writing.
        image: uint8 pixels: grey, grey + alpha, RGB or RGBA by the channel count.
        text: key -> value, each as an uncompressed UTF-8 ``iTXt`` chunk before the pixel data, where
            ``PIL.Image.open(...).info`` reads it without decoding the pixels.
        level: zlib level, 0-9 (1: fastest that compresses).

    Raises:
        ValueError: an image that is not uint8, is empty or has another shape; a text key PNG does not allow.
    """
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {pixels.dtype}")
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[2] not in _COLOUR_TYPE or 0 in pixels.shape[:2]:
        raise ValueError(f"expected an (H, W) or (H, W, 1-4) image with H, W > 0, got shape {np.shape(image)}")
    if not 0 <= level <= 9:
        raise ValueError(f"zlib level {level}: expected 0-9")
    height, width, channels = pixels.shape
    chunks = [(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, _COLOUR_TYPE[channels], 0, 0, 0))]
    for key, value in (text or {}).items():
        # iTXt: keyword, NUL, compression flag 0 and method 0, empty language tag and translated keyword (NULs).
        chunks.append((b"iTXt", _keyword(key) + b"\x00\x00\x00\x00\x00" + str(value).encode("utf-8")))
    if isinstance(out, (str, os.PathLike)):
        with open(out, "wb") as f:
            _write(f, pixels, chunks, level)
    else:
        _write(out, pixels, chunks, level)


def _write(out: BinaryIO, pixels: np.ndarray, chunks: list[tuple[bytes, bytes]], level: int) -> None:
    height, width, channels = pixels.shape
    rows = np.ascontiguousarray(pixels).reshape(height, width * channels)
    out.write(_SIGNATURE)
    for kind, data in chunks:
        _chunk(out, kind, data)
    deflate = zlib.compressobj(level, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    block = np.empty((min(_ROWS_PER_BLOCK, height), 1 + rows.shape[1]), np.uint8)
    block[:, 0] = _UP_FILTER
    for start in range(0, height, _ROWS_PER_BLOCK):
        stop = min(start + _ROWS_PER_BLOCK, height)
        filtered = block[: stop - start]
        # Up: each byte minus the byte above it, modulo 256 (the row above the image's first row is zeros).
        np.subtract(rows[start + 1:stop], rows[start:stop - 1], out=filtered[1:, 1:])
        filtered[0, 1:] = rows[start] - rows[start - 1] if start else rows[0]
        if compressed := deflate.compress(filtered):
            _chunk(out, b"IDAT", compressed)
    _chunk(out, b"IDAT", deflate.flush())
    _chunk(out, b"IEND", b"")
