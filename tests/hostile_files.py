"""Hostile and implausible slide files for the tests: TIFFs whose header claims more than the file holds, sparse
TIFFs of empty tiles, Aperio-style TIFFs stating a chosen mpp and objective power. Imported by the tests."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import tifffile


def patch_tag(source: Path, target: Path, tag: str, values: list[int]) -> Path:
    """Copy a TIFF with the values of an integer tag of its first page overwritten in place."""
    data = bytearray(source.read_bytes())
    with tifffile.TiffFile(source) as tif:
        entry = tif.pages.first.tags[tag]
        fmt = {3: "H", 4: "I", 16: "Q"}[int(entry.dtype)]
        for k, value in enumerate(values):
            struct.pack_into("<" + fmt, data, entry.valueoffset + k * struct.calcsize(fmt), value)
    target.write_bytes(bytes(data))
    return target


def million_px_square(folder: Path) -> Path:
    """``hostile.tif``: a 512 x 512 deflate TIFF (0.25 um/px, four 256 px tiles) whose header claims 10^6 x 10^6 px."""
    small = folder / "small.tif"
    tifffile.imwrite(small, np.full((512, 512, 3), 200, np.uint8), tile=(256, 256), compression="zlib",
                     photometric="rgb", resolution=(4e4, 4e4), resolutionunit="CENTIMETER")
    hostile = patch_tag(small, folder / "hostile.tif", "ImageWidth", [10**6])
    return patch_tag(hostile, hostile, "ImageLength", [10**6])


def sparse_tiff(path: Path, width: int, height: int, tile: int = 512, mpp: float = 0.243) -> Path:
    """A tiled JPEG TIFF claiming (width, height) px whose first tile is stored and every other tile is empty
    (byte count 0, background), as sparse scanners write them: a file of about 8 bytes per tile."""
    n_tiles = -(-width // tile) * -(-height // tile)

    def tiles():
        yield np.full((tile, tile, 3), 200, np.uint8)
        yield from (None for _ in range(n_tiles - 1))

    tifffile.imwrite(path, tiles(), shape=(height, width, 3), dtype="uint8", tile=(tile, tile), compression="jpeg",
                     photometric="rgb", resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    return path


def aperio_like(path: Path, mpp: float, app_mag: int) -> Path:
    """A 1024 px tiled JPEG TIFF with an Aperio description stating ``mpp`` (um/px) and objective power
    ``app_mag``, which both the tifffile backend and OpenSlide read as an SVS."""
    description = (f"Aperio Image Library v12.0.15\n1024x1024 [0,0 1024x1024] (256x256) JPEG/RGB Q=70|"
                   f"AppMag = {app_mag}|MPP = {mpp}")
    level0 = np.random.default_rng(5).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    tifffile.imwrite(path, level0, tile=(256, 256), compression="jpeg", photometric="rgb", description=description,
                     metadata=None)
    return path
