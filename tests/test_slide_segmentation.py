"""DMMN whole-slide outputs: label map placement, areas, overlay, carcinoma outlines, failure isolation, and the
evaluation against ground truth (IoU / recall / precision, Table I), all on hand-made slides with known labels."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from pathbundles.annotations import Annotation, rasterize, read_annotations, write_geojson
from pathbundles.multimag import MultiMagnificationDataset
from pathbundles import slide_segmentation
from pathbundles.phantom import MULTICLASS_CLASSES
from pathbundles.slide_segmentation import (DMMN_PALETTE, SegmentationMetricsReport, SlideLabelWriter,
                                            canonical_class_name, class_colours, trace_regions)
from pathbundles.writers import (legend_panel, overlay_font_px, read_overlay_layout, read_pyramid_fields,
                                 write_pyramid_tiff)

C = len(MULTICLASS_CLASSES)  # 1 carcinoma, 2 benign epithelium, 3 stroma, 4 necrosis, 5 adipose, 6 background
PX_MM2 = 0.5e-3 ** 2  # one map pixel at 0.5 um/px, in mm^2


def _slide(folder: Path, name: str, size_wh: tuple[int, int], mpp: float = 0.5, grey: int = 200) -> str:
    """A uniform grey pyramidal RGB TIFF with mpp tags."""
    path = folder / f"{name}.tif"
    write_pyramid_tiff(path, np.full((size_wh[1], size_wh[0], 3), grey, np.uint8), mpp=mpp)
    return str(path)


def _dataset(paths: list[str]) -> MultiMagnificationDataset:
    return MultiMagnificationDataset([{"image": p} for p in paths], mode="infer", use_tissue=False)


def _logits(labels: np.ndarray) -> torch.Tensor:
    """(C, H, W) logits whose argmax + 1 is ``labels`` (1..C)."""
    return torch.nn.functional.one_hot(torch.as_tensor(labels, dtype=torch.long) - 1, C).permute(2, 0, 1).float()


def _engine(items: list[dict], preds: list[torch.Tensor]) -> SimpleNamespace:
    return SimpleNamespace(state=SimpleNamespace(batch=items, output=[{"pred": p} for p in preds], metrics={}))


def _run(writer: SlideLabelWriter, dataset: MultiMagnificationDataset, label_of_tile, skip=(), errors=None) -> None:
    """Drive the writer as an ignite engine would: one iteration per tile, then the epoch end.

    ``label_of_tile(slide, x0, y0)`` gives the tile's (256, 256) labels; tiles (slide, x0, y0) in ``skip`` never
    come back; ``errors`` {slide: message} marks that slide's items as failed reads.
    """
    writer.started()
    for s, x0, y0, _ in dataset.tiles.tolist():
        s = int(s)
        if (s, x0, y0) in skip:
            continue
        step0 = dataset.mpps[0] / dataset.slides[s].level0_mpp
        item = {"slide_index": s, "location": torch.tensor([x0 + 128 * step0, y0 + 128 * step0], dtype=torch.float64),
                "error": (errors or {}).get(s, "")}
        writer.iteration_completed(_engine([item], [_logits(label_of_tile(s, x0, y0))]))
    writer.completed()  # the engine's end of epoch
    writer.ensure_completed()  # the config's run list, which names the failed slides


def _tile_labels(s: int, x0: int, y0: int) -> np.ndarray:
    """The 600 x 500 test slide's tiles (0.5 um/px, 3 x 2 tiles): a 128 x 128 carcinoma square in stroma, benign,
    adipose / background, necrosis with an 8 x 8 carcinoma speck; tile (512, 256) is never predicted."""
    tile = np.full((256, 256), {(0, 0): 3, (256, 0): 2, (512, 0): 5, (0, 256): 6, (256, 256): 4}[(x0, y0)], np.uint8)
    if (x0, y0) == (0, 0):
        tile[64:192, 32:160] = 1
    if (x0, y0) == (256, 256):
        tile[100:108, 100:108] = 1
    return tile


def _expected_map() -> np.ndarray:
    expected = np.zeros((500, 600), np.uint8)
    for x0 in (0, 256, 512):
        for y0 in (0, 256):
            if (x0, y0) != (512, 256):
                expected[y0:y0 + 256, x0:x0 + 256] = _tile_labels(0, x0, y0)[:500 - y0, :600 - x0]
    return expected


@pytest.fixture()
def written(tmp_path, monkeypatch):
    monkeypatch.setattr(slide_segmentation, "_BAND_PIXELS", 600 * 7)  # bands of 7 rows: the scan is band by band
    dataset = _dataset([_slide(tmp_path, "s0", (600, 500))])
    writer = SlideLabelWriter(dataset, tmp_path / "out", MULTICLASS_CLASSES, overlay_long_side_px=150, polygon_mpp=4.0,
                              min_polygon_area_um2=1000.0)
    _run(writer, dataset, _tile_labels, skip={(0, 512, 256)})
    return writer, dataset


def test_palette_follows_the_paper_and_names_are_matched_loosely():
    colours = class_colours({1: "Carcinoma", 2: "Benign Epithelial", 3: "background", 4: "stroma", 5: "Necrotic",
                             6: "adipose", 7: "lymphocytes"})
    assert colours[1] == (255, 0, 0) and colours[2] == (0, 0, 255) and colours[3] == (255, 255, 0)
    assert colours[4] == (0, 255, 0) and colours[5] == (128, 128, 128) and colours[6] == (255, 165, 0)
    assert colours[7] not in DMMN_PALETTE.values()
    with pytest.raises(ValueError, match=r"ids 1\.\.C"):
        class_colours({0: "carcinoma"})


def test_label_tiff_holds_every_tile_at_its_grid_place(written):
    writer, _ = written
    files = writer.outputs("s0")
    with tifffile.TiffFile(files["labels"]) as tif:
        level0, level1 = tif.pages[0].asarray(), tif.pages[1].asarray()
        palette = tif.pages[0].colormap
        assert tif.pages[0].photometric == tifffile.PHOTOMETRIC.PALETTE
    description = read_pyramid_fields(files["labels"])
    expected = _expected_map()
    np.testing.assert_array_equal(level0, expected)
    np.testing.assert_array_equal(level1, expected[::2, ::2])  # nearest, never a mean of labels
    assert description["mpp"] == 0.5 and description["classes"]["1"] == "carcinoma"
    assert description["colours"]["1"] == [255, 0, 0]
    # How the views were read is recorded with the map ("auto" chose one per slide; "levels" or "tile").
    assert description["read_path"] == {e.name: e.read_path for e in writer.dataset.slides}["s0"]
    assert description["read_path"] in ("levels", "tile")
    # The palette holds the paper's colours (16-bit TIFF palette entries), not predicted = black.
    for k, colour in writer.colours.items():
        assert (palette[:, k] // 257).tolist() == list(colour)
    assert palette[:, 0].tolist() == [0, 0, 0]
    # The RGB copy is the same map in the class colours.
    lut = np.zeros((256, 3), np.uint8)
    for k, colour in writer.colours.items():
        lut[k] = colour
    np.testing.assert_array_equal(tifffile.imread(files["labels_rgb"], level=0), lut[expected])
    assert read_pyramid_fields(files["labels_rgb"])["classes"] == description["classes"]


def test_tiles_land_on_the_20x_grid_of_a_40x_slide(tmp_path):
    # 1000 x 900 level-0 px at 0.25 um/px: a 500 x 450 map at 0.5 um/px, tiles every 512 level-0 px.
    dataset = _dataset([_slide(tmp_path, "s40", (1000, 900), mpp=0.25)])
    assert sorted(map(tuple, dataset.tiles[:, 1:3].tolist())) == [(0, 0), (0, 512), (512, 0), (512, 512)]
    writer = SlideLabelWriter(dataset, tmp_path / "out", MULTICLASS_CLASSES, polygon_classes=())
    _run(writer, dataset, lambda s, x0, y0: np.full((256, 256), 1 + x0 // 512 + 2 * (y0 // 512), np.uint8))
    level0 = tifffile.imread(writer.outputs("s40")["labels"], key=0)
    expected = np.zeros((450, 500), np.uint8)
    expected[:256, :256], expected[:256, 256:], expected[256:, :256], expected[256:, 256:] = 1, 2, 3, 4
    np.testing.assert_array_equal(level0, expected)
    assert set(writer.outputs("s40")) == {"labels", "labels_rgb", "overlay", "areas"}


def test_areas_are_counted_per_class_in_mm2(written):
    writer, _ = written
    doc = json.loads(writer.outputs("s0")["areas"].read_text())
    # Pixels: carcinoma 128*128 + 8*8, benign a full tile, stroma the rest of tile (0, 0), necrosis 256*244 - 64,
    # adipose 88*256, background 256*244; the missing tile (512, 256) leaves 88*244 unpredicted.
    pixels = {"carcinoma": 16448, "benign epithelium": 65536, "stroma": 49152, "necrosis": 62400,
              "adipose": 22528, "background": 62464}
    assert {k: v["pixels"] for k, v in doc["classes"].items()} == pixels
    assert doc["classes"]["carcinoma"]["area_mm2"] == pytest.approx(0.004112)
    assert doc["classes"]["necrosis"]["area_mm2"] == pytest.approx(0.0156)
    assert doc["unpredicted"] == {"pixels": 21472, "area_mm2": pytest.approx(0.005368)}
    assert doc["predicted_area_mm2"] == pytest.approx((300000 - 21472) * PX_MM2)
    assert doc["map_mpp"] == 0.5 and doc["pixel_area_mm2"] == pytest.approx(PX_MM2)
    assert writer.areas["s0"]["adipose"] == pytest.approx(0.005632)
    with open(writer.output_dir / "areas.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["s0"]
    assert float(rows[0]["benign_epithelium_mm2"]) == pytest.approx(0.016384)
    assert float(rows[0]["unpredicted_mm2"]) == pytest.approx(0.005368)


def test_overlay_is_the_thumbnail_in_class_colours_with_a_legend(written):
    writer, _ = written
    path = writer.outputs("s0")["overlay"]
    overlay, layout = np.asarray(Image.open(path)), read_overlay_layout(path)
    colours = class_colours(MULTICLASS_CLASSES)
    legend = legend_panel([(name, colours[k]) for k, name in MULTICLASS_CLASSES.items()], overlay_font_px(150))
    x0, y0, w, h = layout["slide_box_px"]
    assert (w, h) == (150, 125)  # 600 x 500 px at 0.5 um/px, long side overlay_long_side_px = 150
    assert layout["fields"]["level0_px_per_overlay_px"] == [4.0, 4.0] and layout["fields"]["slide"] == "s0"
    slide = overlay[y0:y0 + h, x0:x0 + w]
    # Thumbnail pixel (30, 20) is map pixel (122, 82): carcinoma, grey 200 blended half with red.
    assert slide[30, 20].tolist() == [228, 100, 100]
    assert slide[10, 100].tolist() == [100, 100, 228]  # benign epithelium: blue
    assert slide[100, 140].tolist() == [200, 200, 200]  # the unpredicted tile is left as it is
    # The legend at its readable size beside the slide, never over it; the slide name in the title strip.
    px, py, pw, ph = layout["panel_box_px"]
    assert px >= x0 + w and (ph, pw) == legend.shape[:2]
    np.testing.assert_array_equal(overlay[py:py + ph, px:px + pw], legend)
    strip = overlay[:y0]
    assert y0 > 0 and (strip != 255).any(axis=-1).sum() > 50


def test_carcinoma_outline_bounds_the_square_and_drops_specks(written):
    writer, _ = written
    path = writer.outputs("s0")["regions"]
    regions = read_annotations(path)
    # The 64 x 64 um square is one region; the 4 x 4 um speck (16 um^2) is below 1000 um^2.
    assert len(regions) == 1 and writer.n_regions["s0"] == 1
    region = regions[0]
    assert region.label == "carcinoma"
    np.testing.assert_allclose(region.xy.min(0), [32, 64], atol=8)  # one pixel at 4 um/px = 8 level-0 px
    np.testing.assert_allclose(region.xy.max(0), [160, 192], atol=8)
    feature = json.loads(path.read_text())["features"][0]
    assert feature["properties"]["classification"] == {"name": "carcinoma", "color": [255, 0, 0]}
    assert feature["properties"]["measurements"]["area_um2"] == 64 * 64  # 16 x 16 pixels of 4 x 4 um


def _ring_tile(s: int, x0: int, y0: int) -> np.ndarray:
    """Stroma with a carcinoma square ring (a hole of stroma inside) and a necrosis square, in tile (0, 0)."""
    tile = np.full((256, 256), 3, np.uint8)
    if (x0, y0) == (0, 0):
        tile[32:224, 16:208] = 1
        tile[96:160, 80:144] = 3  # a 32 x 32 um hole
        tile[8:24, 224:252] = 4
    return tile


def test_region_ids_are_stable_and_the_asap_xml_holds_the_geojson_regions(tmp_path):
    """regions/<name>.xml: each region a polygon in its class's group and colour, each hole an exclusion ("_2")
    polygon; read back, the vertices are the GeoJSON's (level-0 px) and rasterise to the same mask. Feature ids
    are the same in two runs, distinct, and every class has its colour."""
    slide = _slide(tmp_path, "s1", (300, 300))
    features = []
    for run in ("a", "b"):
        dataset = _dataset([slide])
        writer = SlideLabelWriter(dataset, tmp_path / run, MULTICLASS_CLASSES, polygon_mpp=2.0,
                                  min_polygon_area_um2=50.0, polygon_classes=("carcinoma", "necrosis"))
        _run(writer, dataset, _ring_tile)
        files = writer.outputs("s1")
        features.append(json.loads(files["regions"].read_text())["features"])
    assert [f["id"] for f in features[0]] == [f["id"] for f in features[1]]
    assert len({f["id"] for f in features[0]}) == len(features[0]) == 2
    assert {f["properties"]["classification"]["name"]: tuple(f["properties"]["classification"]["color"])
            for f in features[0]} == {"carcinoma": (255, 0, 0), "necrosis": (128, 128, 128)}

    geojson, xml = read_annotations(files["regions"]), read_annotations(files["asap_xml"])
    assert [(a.name, a.group, a.label) for a in xml] == [("carcinoma 1", "carcinoma", "carcinoma"),
                                                       ("carcinoma 1 hole 1", "_2", "Exclusion"),
                                                       ("necrosis 1", "necrosis", "necrosis")]
    (carcinoma, necrosis) = geojson
    np.testing.assert_array_equal(xml[0].xy, carcinoma.xy)
    np.testing.assert_array_equal(xml[1].xy, carcinoma.holes[0])
    np.testing.assert_array_equal(xml[2].xy, necrosis.xy)
    # Level-0 px (0.5 um/px slide, 2 um/px outlines): the square spans x 16..208, y 32..224 map px = level-0 px.
    np.testing.assert_allclose(xml[0].xy.min(0), [16, 32], atol=4)
    np.testing.assert_allclose(xml[0].xy.max(0), [208, 224], atol=4)
    np.testing.assert_allclose([xml[1].xy.min(0), xml[1].xy.max(0)], [[80, 96], [144, 160]], atol=4)
    label_of = {"carcinoma": 1, "necrosis": 4}
    from_xml, from_geojson = rasterize(xml, (300, 300), label_of=label_of), rasterize(geojson, (300, 300),
                                                                                      label_of=label_of)
    np.testing.assert_array_equal(from_xml, from_geojson)
    assert (from_xml == 1).sum() == pytest.approx(192 * 192 - 64 * 64, rel=0.03)
    text = files["asap_xml"].read_text()
    assert 'PartOfGroup="carcinoma" Color="#FF0000"' in text and 'PartOfGroup="necrosis" Color="#808080"' in text


def test_trace_regions_keeps_holes_and_orders_by_size():
    mask = np.zeros((20, 20), bool)
    mask[2:12, 2:12] = True
    mask[5:8, 5:8] = False  # a 9-pixel hole
    mask[15:17, 15:17] = True  # a 4-pixel island
    regions = trace_regions(mask, level0_px=2.0, min_pixels=4)
    assert len(regions) == 2
    (exterior, holes, n_pixels), (small, _, n_small) = regions
    assert (n_pixels, n_small) == (100 - 9, 4)
    np.testing.assert_allclose(exterior.min(0), [4, 4], atol=1)
    np.testing.assert_allclose(exterior.max(0), [24, 24], atol=1)
    assert len(holes) == 1
    np.testing.assert_allclose(holes[0].min(0), [10, 10], atol=1)
    np.testing.assert_allclose(small.max(0), [34, 34], atol=1)
    assert len(trace_regions(mask, 2.0, min_pixels=10)) == 1
    # A 30 px slide mapped by 16 px mask pixels: the 2 x 2 mask's last pixels cover 30..32 px, past the slide.
    edge = np.ones((2, 2), bool)
    assert trace_regions(edge, 16.0)[0][0].max(0).tolist() == [32.0, 32.0]
    (clipped, _, _), = trace_regions(edge, 16.0, extent_px=(30.0, 31.0))
    assert clipped.min(0).tolist() == [0.0, 0.0] and clipped.max(0).tolist() == [30.0, 31.0]


def test_a_failed_slide_leaves_no_files_and_the_others_are_written(tmp_path):
    dataset = _dataset([_slide(tmp_path, "good", (300, 300)), _slide(tmp_path, "bad", (300, 300))])
    writer = SlideLabelWriter(dataset, tmp_path / "out", MULTICLASS_CLASSES)
    with pytest.raises(RuntimeError, match=r"1 slide.*bad: read failed"):
        _run(writer, dataset, lambda s, x0, y0: np.full((256, 256), 2, np.uint8), errors={1: "read failed"})
    assert all(p.is_file() for p in writer.outputs("good").values())
    assert not any(p.exists() for p in writer.outputs("bad").values())
    assert list(writer.areas) == ["good"]
    leftovers = [p.name for p in (tmp_path / "out").rglob("*") if p.name.startswith(".")]
    assert leftovers == []  # no canvas, no partial file


def test_a_failure_while_writing_removes_what_was_already_written(tmp_path, monkeypatch):
    def broken_overlay(*args, **kwargs):
        raise OSError("disk full")

    dataset = _dataset([_slide(tmp_path, "s", (300, 300))])
    writer = SlideLabelWriter(dataset, tmp_path / "out", MULTICLASS_CLASSES)
    monkeypatch.setattr(slide_segmentation, "write_label_overlay_png", broken_overlay)
    with pytest.raises(RuntimeError, match="s: disk full"):
        _run(writer, dataset, lambda s, x0, y0: np.full((256, 256), 1, np.uint8))
    files = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == ["areas.csv"]  # the label TIFF written before the overlay is gone


def test_overview_is_read_on_the_writer_thread_while_the_tiles_come_in(tmp_path, monkeypatch):
    """Each slide's overview is read once, on the writer thread, as soon as its first tile is in (not after its last,
    when the network has nothing left to hide it behind); a failed read fails that slide alone."""
    import threading

    from pathbundles import slide_inference

    reads: list[tuple[str, str, int]] = []
    tiles_in: dict = {"n": 0}
    read = slide_inference._read_overview

    def recording(path, backend, mpp, long_side_px):
        reads.append((Path(path).stem, threading.current_thread().name, tiles_in["n"]))
        if Path(path).stem == "bad":
            raise OSError("overview unreadable")
        return read(path, backend, mpp, long_side_px)

    monkeypatch.setattr(slide_inference, "_read_overview", recording)
    dataset = _dataset([_slide(tmp_path, "good", (600, 500)), _slide(tmp_path, "bad", (300, 300))])
    writer = SlideLabelWriter(dataset, tmp_path / "out", MULTICLASS_CLASSES, overlay_long_side_px=150)
    paste = writer.iteration_completed

    def counting(engine):
        paste(engine)
        if tiles_in["n"] == 0:
            tiles_in["reading after the first tile"] = set(writer._overviews)
        tiles_in["n"] += 1

    writer.iteration_completed = counting
    with pytest.raises(RuntimeError, match=r"1 slide.*bad: overview unreadable"):
        _run(writer, dataset, lambda s, x0, y0: np.full((256, 256), 2, np.uint8))
    assert [r[0] for r in reads] == ["good", "bad"]
    assert all(r[1].startswith("slide-writer") for r in reads)
    assert tiles_in["reading after the first tile"] == {"good"}
    n_good = int((dataset.tiles[:, 0] == 0).sum())
    assert n_good == 6 and reads[0][2] < n_good  # before the good slide's last tile was in
    assert max(read_overlay_layout(writer.outputs("good")["overlay"])["slide_box_px"][2:]) == 150
    assert not any(p.exists() for p in writer.outputs("bad").values())
    assert writer._overviews == {}


def test_a_slide_without_tiles_gets_an_all_zero_map(tmp_path):
    dataset = MultiMagnificationDataset([{"image": _slide(tmp_path, "blank", (300, 200), grey=245)}], mode="infer")
    assert len(dataset.tiles) == 0  # no tissue on a blank slide
    writer = SlideLabelWriter(dataset, tmp_path / "out", MULTICLASS_CLASSES)
    writer.completed()
    assert not tifffile.imread(writer.outputs("blank")["labels"], key=0).any()
    doc = json.loads(writer.outputs("blank")["areas"].read_text())
    assert doc["unpredicted"]["pixels"] == 300 * 200 and doc["predicted_area_mm2"] == 0
    assert json.loads(writer.outputs("blank")["regions"].read_text())["features"] == []


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------


def _truth_at_4(classes_of_item: dict[int, str]) -> np.ndarray:
    """Truth over the 600 x 500 slide at downsample 4 (150 x 125), labels in the item's ids: rows 0-24 unannotated;
    carcinoma in columns 0-79, benign epithelium 80-127, nothing 128-139, stroma 140-149."""
    ids = {canonical_class_name(v): k for k, v in classes_of_item.items()}
    truth = np.zeros((125, 150), np.uint8)
    truth[25:, :80], truth[25:, 80:128], truth[25:, 140:] = ids["carcinoma"], ids["benign epithelium"], ids["stroma"]
    return truth


@pytest.mark.parametrize("truth_kind", ["labels", "annotation"])
def test_metrics_report_gives_hand_computed_iou_and_table_i(tmp_path, monkeypatch, truth_kind):
    monkeypatch.setattr(slide_segmentation, "_BAND_PIXELS", 600 * 7)  # truth bands of 2 rows, 7-row map bands
    # Prediction: carcinoma left of x = 256, benign epithelium 256-511, stroma from 512; tile (512, 256) missing.
    path = _slide(tmp_path, "s0", (600, 500))
    dataset = _dataset([path])
    writer = SlideLabelWriter(dataset, tmp_path / "out", MULTICLASS_CLASSES, polygon_classes=())
    _run(writer, dataset, lambda s, x0, y0: np.full((256, 256), 1 + x0 // 256, np.uint8), skip={(0, 512, 256)})
    if truth_kind == "labels":
        # Ids of the truth image differ from the model's; the item's classes map them by name.
        item_classes = {1: "stroma", 2: "Carcinoma", 3: "benign epithelial"}
        Image.fromarray(_truth_at_4(item_classes)).save(tmp_path / "truth.png")
        item = {"image": path, "labels": str(tmp_path / "truth.png"), "classes": item_classes}
    else:
        def box(label, x0, x1):
            return Annotation(name=label, group=label, kind="polygon", label=label,
                              xy=[(x0, 100), (x1, 100), (x1, 500), (x0, 500)])

        write_geojson(tmp_path / "truth.geojson", [box("carcinoma", 0, 320), box("benign epithelium", 320, 512),
                                                   box("stroma", 560, 600)])
        item = {"image": path, "annotation": str(tmp_path / "truth.geojson")}
    report_dir = tmp_path / "eval"
    report = SegmentationMetricsReport(writer, [item], report_dir, truth_mpp=2.0, model_name="DMMN-M3",
                                       class_order=["carcinoma", "benign epithelium", "stroma", "necrosis",
                                                    "adipose", "background"], plot=False)
    engine = SimpleNamespace(state=SimpleNamespace(metrics={}))
    report(engine)

    # 100 annotated rows. Carcinoma: 64 columns right, 16 predicted benign. Benign: 48 right. Stroma: 10 columns,
    # right in the 39 rows above y = 256 and unpredicted (a miss) in the 61 rows of the missing tile.
    confusion = report.scores.confusion
    assert confusion[1].tolist() == [0, 6400, 1600, 0, 0, 0, 0]
    assert confusion[2].tolist() == [0, 0, 4800, 0, 0, 0, 0]
    assert confusion[3].tolist() == [610, 0, 0, 390, 0, 0, 0]
    iou = {"carcinoma": 0.8, "benign_epithelium": 0.75, "stroma": 0.39}
    metrics = engine.state.metrics
    assert {k: metrics[f"iou_{k}"] for k in iou} == pytest.approx(iou)
    assert np.isnan(metrics["iou_necrosis"])
    assert metrics["mean_iou"] == pytest.approx((0.8 + 0.75 + 0.39) / 3)
    assert metrics["mean_recall"] == pytest.approx((0.8 + 1 + 0.39) / 3)
    assert metrics["mean_precision"] == pytest.approx((1 + 0.75 + 1) / 3)

    doc = json.loads((report_dir / "metrics.json").read_text())
    assert doc["metrics"]["iou_necrosis"] is None
    assert doc["details"]["segmentation"]["recall"]["stroma"] == pytest.approx(0.39)
    assert (report_dir / "table_i.md").read_text() == (
        "**TABLE I** Intersection-Over-Union (IOU), Recall, and Precision\n\n"
        "| Class | Metric | DMMN-M3 |\n|---|---|---:|\n"
        "| Carcinoma | IOU | 0.800 |\n|  | Recall | 0.800 |\n|  | Precision | 1.000 |\n"
        "| Benign Epithelium | IOU | 0.750 |\n|  | Recall | 1.000 |\n|  | Precision | 0.750 |\n"
        "| Stroma | IOU | 0.390 |\n|  | Recall | 0.390 |\n|  | Precision | 1.000 |\n"
        "| Necrosis | IOU | n/a |\n|  | Recall | n/a |\n|  | Precision | n/a |\n"
        "| Adipose | IOU | n/a |\n|  | Recall | n/a |\n|  | Precision | n/a |\n"
        "| Background | IOU | n/a |\n|  | Recall | n/a |\n|  | Precision | n/a |\n"
        "| Mean | IOU | 0.647 |\n|  | Recall | 0.730 |\n|  | Precision | 0.917 |\n")
    with open(report_dir / "table_i.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["class", "metric", "DMMN-M3"]
    assert rows[1] == ["Carcinoma", "IOU", "0.800"] and rows[10] == ["Necrosis", "IOU", ""]
    assert rows[-3:] == [["Mean", "IOU", "0.647"], ["Mean", "Recall", "0.730"], ["Mean", "Precision", "0.917"]]
    with open(report_dir / "confusion.csv", newline="") as f:
        assert list(csv.reader(f))[3] == ["stroma", "610", "0", "0", "390", "0", "0", "0"]
    with open(report_dir / "slide_metrics.csv", newline="") as f:
        slide = next(csv.DictReader(f))
    assert slide["name"] == "s0" and slide["truth"] == truth_kind and slide["annotated_pixels"] == "13800"
    assert slide["iou_stroma"] == "0.390" and slide["mean_iou"] == "0.647"
