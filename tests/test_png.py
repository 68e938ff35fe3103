"""pathbundles.png: the fast PNG writer of overlays and HPF maps, read back by Pillow and by OpenCV (libpng)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pathbundles.png import write_png

SHAPES = [(1, 1), (2, 3, 1), (5, 7, 2), (300, 200, 3), (513, 100, 4), (257, 33, 3), (1000, 999)]


def _encoded(image: np.ndarray, text: dict | None = None) -> bytes:
    buffer = io.BytesIO()
    write_png(buffer, image, text)
    return buffer.getvalue()


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk, checking each CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length:at + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        at += 12 + length
    return chunks


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_pillow_decodes_the_same_pixels(shape: tuple[int, ...]) -> None:
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    with Image.open(io.BytesIO(_encoded(image))) as decoded:
        assert decoded.mode == {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[shape[2] if len(shape) == 3 else 1]
        assert np.array_equal(np.asarray(decoded).reshape(image.shape), image)


@pytest.mark.parametrize("shape", [s for s in SHAPES if len(s) == 2 or s[2] in (1, 3, 4)],
                         ids=lambda s: "x".join(map(str, s)))
def test_opencv_decodes_the_same_pixels(shape: tuple[int, ...]) -> None:
    cv2 = pytest.importorskip("cv2")
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    decoded = cv2.imdecode(np.frombuffer(_encoded(image), np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded is not None
    if decoded.ndim == 3:  # BGR(A) to RGB(A)
        decoded = decoded[..., [2, 1, 0, 3][:decoded.shape[2]]]
    assert np.array_equal(decoded.reshape(image.shape), image)


def test_chunks_are_well_formed_and_text_comes_before_the_pixels(tmp_path) -> None:
    image = np.arange(600 * 5 * 3, dtype=np.uint32).astype(np.uint8).reshape(600, 5, 3)
    path = tmp_path / "a.png"
    write_png(path, image, {"pathbundles-overlay": '{"hpf": "Größe ✓"}', "Comment": "x"})
    chunks = _chunks(path.read_bytes())
    kinds = [kind for kind, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and kinds[1:3] == [b"iTXt", b"iTXt"]
    assert set(kinds[3:-1]) == {b"IDAT"}
    width, height, depth, colour, *_ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (width, height, depth, colour) == (5, 600, 8, 2)
    # The pixel data: every row filtered "Up" (type 2), the row above the first being zeros.
    raw = np.frombuffer(zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT")), np.uint8)
    rows = raw.reshape(600, 1 + 15)
    assert (rows[:, 0] == 2).all()
    assert np.array_equal(np.cumsum(rows[:, 1:], axis=0, dtype=np.uint8), image.reshape(600, 15))
    with Image.open(path) as decoded:  # read from the chunk before the pixels, without decoding them
        assert decoded.info["pathbundles-overlay"] == '{"hpf": "Größe ✓"}' and decoded.info["Comment"] == "x"


@pytest.mark.parametrize(("image", "text", "message"), [
    (np.zeros((4, 4), np.float32), None, "uint8"),
    (np.zeros((4, 4, 5), np.uint8), None, "shape"),
    (np.zeros((0, 4, 3), np.uint8), None, "shape"),
    (np.zeros((4,), np.uint8), None, "shape"),
    (np.zeros((4, 4), np.uint8), {"": "v"}, "keyword"),
    (np.zeros((4, 4), np.uint8), {"a" * 80: "v"}, "keyword"),
    (np.zeros((4, 4), np.uint8), {" lead": "v"}, "keyword"),
    (np.zeros((4, 4), np.uint8), {"tab\there": "v"}, "keyword"),
    (np.zeros((4, 4), np.uint8), {"grüß ✓": "v"}, "keyword"),
])
def test_refuses_what_png_cannot_hold(image: np.ndarray, text: dict | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _encoded(image, text)
