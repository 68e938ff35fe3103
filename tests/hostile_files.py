"""Hostile and implausible slide files for the tests: TIFFs whose header claims more than the file holds, sparse
TIFFs of empty tiles, Aperio-style TIFFs stating a chosen mpp and objective power. Imported by the tests."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import tifffile


def patch_tag(source: Path, target: Path, tag: str, values: list[int]) -> Path:
    """Copy a TIFF with the values of an integer or rational tag (numerator, denominator) of its first page
    overwritten in place."""
    data = bytearray(source.read_bytes())
    with tifffile.TiffFile(source) as tif:
        entry = tif.pages.first.tags[tag]
        fmt = {3: "H", 4: "I", 5: "I", 16: "Q"}[int(entry.dtype)]
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


def aperio_like(path: Path, mpp: float | str, app_mag: int | str) -> Path:
    """A 1024 px tiled JPEG TIFF with an Aperio description stating ``mpp`` (um/px) and objective power
    ``app_mag`` (numbers, or any text to write there), which both the tifffile backend and OpenSlide read as an
    SVS."""
    description = (f"Aperio Image Library v12.0.15\n1024x1024 [0,0 1024x1024] (256x256) JPEG/RGB Q=70|"
                   f"AppMag = {app_mag}|MPP = {mpp}")
    level0 = np.random.default_rng(5).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    tifffile.imwrite(path, level0, tile=(256, 256), compression="jpeg", photometric="rgb", description=description,
                     metadata=None)
    return path


# ---- a batch of bad inputs for the fuzz test (tests/test_fuzz_hostile.py) ---------------------------------------


def small_tiff(path: Path, mpp: float | None = 0.25, dtype: str = "uint8", samples: int = 3,
               **options: object) -> Path:
    """A 512 x 512 tiled deflate TIFF of noise (four 256 px tiles), stating ``mpp`` um/px unless None; ``options``
    go to ``tifffile.imwrite`` (``planarconfig``, ``tile``, ...)."""
    rng = np.random.default_rng(11)
    shape = (512, 512, samples) if samples > 1 else (512, 512)
    data = (rng.random(shape) * 200).astype(dtype)
    resolution = {} if mpp is None else {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    kwargs = {"tile": (256, 256), "compression": "zlib", "photometric": "rgb" if samples == 3 else "minisblack",
              **resolution, **options}
    tifffile.imwrite(path, data, **kwargs)
    return path


def _first_ifd(data: bytes) -> tuple[int, int]:
    """(offset, entry count) of the first image directory of a little-endian classic TIFF."""
    offset = struct.unpack_from("<I", data, 4)[0]
    return offset, struct.unpack_from("<H", data, offset)[0]


def bad_slide_files(folder: Path) -> dict[str, Path]:
    """Files a slide folder or datalist may hold that no run can use, by a short name saying what each is.

    Deterministic (fixed seeds, no clock): byte garbage with slide suffixes, TIFFs cut short or whose header claims
    sizes, tiles, offsets or resolutions the file cannot hold, formats the backends do not read, other file types
    under slide names, and file-system oddities (links that loop or dangle, folders, a FIFO, a device).
    """
    folder.mkdir(parents=True, exist_ok=True)
    base = small_tiff(folder / "base.tmp")
    good = base.read_bytes()
    rng = np.random.default_rng(19)
    ifd, entries = _first_ifd(good)
    svs = aperio_like(folder / "svs.tmp", 0.25, 40).read_bytes()
    files: dict[str, Path] = {}

    def put(name: str, data: bytes) -> None:
        files[Path(name).stem] = folder / name
        (folder / name).write_bytes(data)

    def tagged(name: str, tag: str, values: list[int]) -> None:
        files[Path(name).stem] = patch_tag(base, folder / name, tag, values)

    put("zero_bytes.tif", b"")
    put("random_bytes.tif", rng.bytes(4096))
    put("random_bytes_svs.svs", rng.bytes(65536))
    put("tiff_magic_then_garbage.tif", b"II*\0" + rng.bytes(2048))
    put("tiff_header_only.tif", b"II*\0\x08\0\0\0")
    put("bigtiff_garbage.tif", b"II+\0\x08\0\0\0" + rng.bytes(512))
    put("big_endian_garbage.tiff", b"MM\0*" + rng.bytes(512))
    put("cut_in_header.tif", good[:64])
    put("cut_in_tiles.tif", good[: len(good) * 2 // 3])
    put("svs_cut_before_directory.svs", svs[: len(svs) // 2])
    put("ifd_past_end.tif", good[:4] + struct.pack("<I", 2**31) + good[8:])
    put("ifd_loop.tif", bytes(_patched_bytes(good, ifd + 2 + entries * 12, struct.pack("<I", ifd))))
    put("zero_entries_ifd.tif", bytes(_patched_bytes(good, ifd, struct.pack("<H", 0))))
    files["claims_million_px"] = million_px_square(folder)
    (folder / "small.tif").unlink()
    files["claims_million_px"] = files["claims_million_px"].rename(folder / "claims_million_px.tif")
    tagged("claims_zero_width.tif", "ImageWidth", [0])
    tagged("claims_tile_zero.tif", "TileWidth", [0])
    tagged("claims_tile_huge.tif", "TileLength", [2**30])
    tagged("tiles_past_end.tif", "TileOffsets", [10**9] * 4)
    tagged("tiles_of_one_byte.tif", "TileByteCounts", [1] * 4)
    tagged("tiles_of_4gb.tif", "TileByteCounts", [2**32 - 1] * 4)
    tagged("resolution_zero.tif", "XResolution", [1, 0])  # 1/0 px per cm: 0 um/px
    tagged("resolution_huge_mpp.tif", "XResolution", [1, 10**9])  # 1e-9 px per cm: 1e13 um/px
    files["float_samples"] = small_tiff(folder / "float_samples.tif", dtype="float32")
    files["uint16_samples"] = small_tiff(folder / "uint16_samples.tif", dtype="uint16")
    files["two_samples"] = small_tiff(folder / "two_samples.tif", samples=2, photometric="minisblack",
                                      planarconfig="contig")
    files["planes_separate"] = small_tiff(folder / "planes_separate.tif", planarconfig="separate")
    put("png_named_tif.tif", _png_bytes())
    put("jpeg_named_svs.svs", _jpeg_bytes())
    put("text_named_ndpi.ndpi", b"not a slide\n" * 10)
    put("ini_named_mrxs.mrxs", b"[GENERAL]\nSLIDE_VERSION = 1.0\n")
    put("html_named_scn.scn", b"<html><body>404</body></html>")
    put("json_named_tiff.tiff", b'{"items": []}')
    put("${bundle_root}@x%y.svs", rng.bytes(1024))  # a name that reads as config syntax
    for name, mpp in (("aperio_mpp_dash", "-"), ("aperio_mpp_dot", "."), ("aperio_mpp_inf", "1e999"),
                      ("aperio_mpp_e", "e")):
        files[name] = aperio_like(folder / f"{name}.svs", mpp, 40)
    files["aperio_appmag_dot"] = aperio_like(folder / "aperio_appmag_dot.svs", 0.25, ".")
    files["no_mpp"] = small_tiff(folder / "no_mpp.tif", mpp=None)
    links = {"symlink_loop.tif": "symlink_loop.tif", "broken_link.svs": "gone.svs", "link_to_folder.tif": ".",
             "link_to_device.tif": "/dev/zero"}
    for name, target in links.items():
        (folder / name).symlink_to(target)
        files[Path(name).stem] = folder / name
    (folder / "folder_named_slide.tif").mkdir()
    (folder / "folder_named_slide.tif" / "inside.tif").write_bytes(good)
    files["folder_named_slide"] = folder / "folder_named_slide.tif"
    os.mkfifo(folder / "fifo.tif")
    files["fifo"] = folder / "fifo.tif"
    for tmp in ("base.tmp", "svs.tmp"):
        (folder / tmp).unlink()
    return files


def _patched_bytes(data: bytes, offset: int, value: bytes) -> bytearray:
    out = bytearray(data)
    out[offset:offset + len(value)] = value
    return out


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 180, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg_bytes() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 180, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


_ASAP_HEAD = '<?xml version="1.0"?>\n<ASAP_Annotations>\n<Annotations>\n'
_ASAP_TAIL = "</Annotations>\n<AnnotationGroups />\n</ASAP_Annotations>\n"


def _asap(*polygons: list[tuple[object, object, object]]) -> str:
    """ASAP XML with one polygon per list of (Order, X, Y) vertices, written as given."""
    body = "".join(
        f'<Annotation Name="a{k}" Type="Polygon" PartOfGroup="_0"><Coordinates>'
        + "".join(f'<Coordinate Order="{o}" X="{x}" Y="{y}" />' for o, x, y in vertices)
        + "</Coordinates></Annotation>\n" for k, vertices in enumerate(polygons))
    return _ASAP_HEAD + body + _ASAP_TAIL


def _feature(geometry: object, properties: object = None) -> str:
    import json

    return json.dumps({"type": "FeatureCollection",
                       "features": [{"type": "Feature", "properties": properties, "geometry": geometry}]})


def bad_annotation_files(folder: Path) -> dict[str, Path]:
    """Annotation files no reader may accept, by a short name saying what each is: ASAP XML with a repeated
    Order, a ring crossing itself, malformed or hostile XML (unclosed, another root, entity expansion, an external
    entity), vertices that are no numbers; GeoJSON and NCRF JSON garbage; files that are no text at all."""
    folder.mkdir(parents=True, exist_ok=True)
    square = [(0, 0, 0), (1, 100, 0), (2, 100, 100), (3, 0, 100)]
    lol = "".join(f'<!ENTITY l{k} "{("&l%d;" % (k - 1)) * 10 if k else "lol"}">' for k in range(10))
    texts: dict[str, str | bytes] = {
        "asap_duplicate_order.xml": _asap([(0, 0, 0), (1, 100, 0), (1, 100, 100), (2, 0, 100)]),
        "asap_bow_tie.xml": _asap([(0, 0, 0), (1, 100, 100), (2, 100, 0), (3, 0, 100)]),
        "asap_shared_stretch.xml": _asap([(0, 0, 0), (1, 100, 0), (2, 100, 10), (3, 60, 0), (4, 40, 0),
                                          (5, 40, -10)]),
        "asap_two_vertices.xml": _asap([(0, 0, 0), (1, 100, 0)]),
        "asap_text_coordinate.xml": _asap([(0, "$x", 0), *square[1:]]),
        "asap_infinite_coordinate.xml": _asap([(0, "1e999", 0), *square[1:]]),
        "asap_nan_order.xml": _asap([("nan", 0, 0), *square[1:]]),
        "asap_unclosed.xml": _asap(square)[:-40],
        "asap_other_root.xml": "<Annotations><Annotation /></Annotations>",
        "asap_unknown_type.xml": _asap(square).replace('Type="Polygon"', 'Type="Spline%"'),
        "asap_billion_laughs.xml": f'<?xml version="1.0"?><!DOCTYPE x [{lol}]>' + _asap(square).split("?>", 1)[1]
        .replace('Name="a0"', 'Name="&l9;"'),
        "asap_external_entity.xml": '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
        + _asap(square).split("?>", 1)[1].replace('Name="a0"', 'Name="&e;"'),
        "geojson_not_json.geojson": '{"type": "FeatureCollection", "features": [',
        "geojson_properties_list.geojson": _feature({"type": "Point", "coordinates": [1, 2]}, ["@x"]),
        "geojson_no_geometry.geojson": _feature(None),
        "geojson_line.geojson": _feature({"type": "LineString", "coordinates": [[0, 0], [1, 1]]}),
        "geojson_text_coordinates.geojson": _feature({"type": "Polygon", "coordinates": "%ring"}),
        "geojson_crossing_ring.geojson": _feature({"type": "Polygon", "coordinates": [
            [[0, 0], [100, 100], [100, 0], [0, 100], [0, 0]]]}),
        "geojson_nested_too_deeply.geojson": "[" * 50_000 + "]" * 50_000,
        "ncrf_text_vertices.json": '{"positive": [{"name": "$p", "vertices": [[1, "x"], [2, 3], [4, 5]]}]}',
        "ncrf_regions_object.json": '{"negative": {"@ref": 1}}',
        "empty.xml": "",
        "binary.xml": bytes(range(256)) * 4,
        "utf16.geojson": _feature({"type": "Point", "coordinates": [1, 2]}).encode("utf-16"),
    }
    files = {}
    for name, text in texts.items():
        path = folder / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        files[Path(name).stem] = path
    return files


def malformed_datalists(folder: Path, image: Path) -> dict[str, Path]:
    """Datalists a run must refuse as a whole (InputError naming the file, or the item's image for an output name
    that is not one plain file name or is taken twice), by a short name saying what each is; ``image`` is a
    readable slide the items may name."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    good = str(image)
    docs: dict[str, object] = {
        "null": None, "number": 5, "text": "abc.tif", "object_without_items": {"slides": [good]},
        "items_empty": {"items": []}, "list_empty": [], "items_object": {"items": {"image": good}},
        "item_null": {"items": [None]}, "item_number": [good, 7], "item_list": [[good]],
        "item_without_image": [{"label": 1, "name": "x"}], "image_null": [{"image": None}],
        "image_number": [{"image": 5}], "image_empty": [{"image": ""}], "image_list": [{"image": [good]}],
        "name_number": [{"image": good, "name": 3}], "name_list": [{"image": good, "name": ["$x"]}],
        "annotation_number": [{"image": good, "annotation": 5}],
        "mask_object": [{"image": good, "mask": {"_target_": "os.system", "command": "touch PWNED"}}],
        "split_some_items": [{"image": good, "split": "test"}, {"image": good, "name": "b"}],
        "split_other_only": [{"image": good, "split": "train"}],
        "name_parent": [{"image": good, "name": "../x"}], "name_absolute": [{"image": good, "name": "/tmp/x"}],
        "name_hidden": [{"image": good, "name": ".hidden"}], "name_dot_dot": [{"image": good, "name": ".."}],
        "name_newline": [{"image": good, "name": "a\nb"}], "name_nul": [{"image": good, "name": "a\x00b"}],
        "name_backslash": [{"image": good, "name": "a\\b"}], "name_too_long": [{"image": good, "name": "n" * 300}],
        "name_taken_twice": [{"image": good}, {"image": good}],
        "name_taken_twice_by_case": [{"image": good, "name": "Case"}, {"image": good, "name": "cASE"}],
        "box_text": [{"image": good, "box": "$box"}], "box_short": [{"image": good, "box": [1, 2]}],
    }
    texts: dict[str, str | bytes] = {
        "not_json": '{"items": [', "empty_file": "", "binary": bytes(range(256)),
        "utf16": json.dumps({"items": [good]}).encode("utf-16"),
        "nested_too_deeply": '{"items": ' + "[" * 50_000 + "]" * 50_000 + "}",
    }
    files = {}
    for name, doc in docs.items():
        texts[name] = json.dumps(doc)
    for name, text in texts.items():
        path = folder / f"{name}.json"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        files[name] = path
    return files
