"""Review overlays: size from overlay_long_side_px, read from the right pyramid level, detections ringed and numbered
as the CSV rows at their slide position, glass left as scanned, colour bar in the margin, title strip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pathbundles.hpf import FP_COLOUR, TP_COLOUR, write_circle_overlay_png
from pathbundles.writers import (MARKER_COLOUR, _font, colormap_lut, overlay_font_px, read_overlay_layout,
                                 write_overlay_png, write_pyramid_tiff)
from pathbundles.wsi import open_slide


def _ring_centre(image: np.ndarray, colour: tuple[int, int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """(x, y) centroid of the pixels of exactly ``colour`` inside ``box`` (x0, y0, x1, y1) of ``image``."""
    x0, y0, x1, y1 = box
    ys, xs = np.nonzero((image[y0:y1, x0:x1] == colour).all(axis=-1))
    assert len(xs) > 20, "no ring there"
    return np.array([xs.mean() + x0, ys.mean() + y0])


def _ink(image: np.ndarray) -> np.ndarray:
    return (image < 60).all(axis=-1)


def _digit_ink(text: str, font_px: int, size_hw: tuple[int, int], at_xy: tuple[float, float]) -> np.ndarray:
    """Ink of ``text`` as the overlay draws a marker's number (black, white outline), on white."""
    canvas = Image.new("RGB", (size_hw[1], size_hw[0]), (255, 255, 255))
    ImageDraw.Draw(canvas).text(at_xy, text, fill=(0, 0, 0), font=_font(font_px), anchor="lb",
                                stroke_width=max(1, font_px // 8), stroke_fill=(255, 255, 255))
    return _ink(np.asarray(canvas))


def test_overview_long_side_is_the_key_read_from_the_coarsest_sufficient_level(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A 3000 x 2000 px slide at 0.5 um/px, levels 1.0, 2.0 and 4.0 um/px: a 1000 px overview (1.5 um/px) reads
    level 1 only, never level 0 (once the levels have passed their check); an overview larger than the slide is
    level 0 as stored."""
    rows, cols = np.indices((2000, 3000))
    level0 = np.stack([cols % 256, rows % 256, (cols // 16) % 256], axis=-1).astype(np.uint8)
    write_pyramid_tiff(tmp_path / "s.tif", level0, mpp=0.5, compression="deflate", min_level_px=300)
    with open_slide(tmp_path / "s.tif", backend="tifffile") as slide:
        assert [round(slide.level_mpp(k)[0], 6) for k in range(slide.level_count)] == [0.5, 1.0, 2.0, 4.0]
        # Each level is checked once against the finer one before it is first used (it reads a window of both);
        # done here, so that what follows counts the overview's own reads.
        assert all(slide._level_agrees(k) for k in range(slide.level_count))
        read_levels: list[int] = []
        original = type(slide)._read_level
        monkeypatch.setattr(type(slide), "_read_level",
                            lambda self, level, *args: read_levels.append(level) or original(self, level, *args))
        overview, mpp = slide.read_overview(1000)
        assert overview.shape == (667, 1000, 3) and mpp == pytest.approx(1.5)
        assert set(read_levels) == {1}
        read_levels.clear()
        whole, mpp = slide.read_overview(5000)
        assert whole.shape == (2000, 3000, 3) and mpp == pytest.approx(0.5) and set(read_levels) == {0}
        np.testing.assert_array_equal(whole, level0)


def test_probability_overlay_is_laid_out_for_review(tmp_path: Path) -> None:
    """Glass and sub-floor tissue keep the thumbnail's pixels; numbers 1 and 2 sit by their rings; the colour bar's
    top, middle and bottom rows are the colour map's 1, 0.5 and 0; the title strip holds text."""
    thumb = np.full((300, 400, 3), 240, np.uint8)  # glass
    thumb[50:250, 50:300] = (190, 110, 170)  # tissue
    tissue = np.zeros((300, 400), bool)
    tissue[50:250, 50:300] = True
    prob = np.zeros((300, 400), np.float32)
    prob[100:200, 100:200] = 0.9  # a hot square on tissue
    prob[:, 320:] = 0.9  # the network's response on glass: not shown
    prob[220:240, 60:90] = 0.02  # below the floor on tissue: not shown
    detections_px = np.array([[150.0, 150.0], [250.0, 120.0]])
    out = write_overlay_png(tmp_path / "o.png", thumb, prob, threshold=0.05, mask=tissue, resample="nearest",
                            detections_px=detections_px, title=["slide_001", "Model 1.2.3 (model)", "score 0.900"],
                            colour_bar="tumour probability")
    image, layout = np.asarray(Image.open(out)), read_overlay_layout(out)
    x0, y0, w, h = layout["slide_box_px"]
    assert (x0, w, h) == (0, 400, 300) and y0 > 0
    slide = image[y0:y0 + h, x0:x0 + w]
    assert image.shape[1] > w  # the colour bar is in a margin
    # Untinted: glass (also where the map is high) and tissue below the floor, away from the markers.
    np.testing.assert_array_equal(slide[:, 320:], thumb[:, 320:])
    np.testing.assert_array_equal(slide[220:240, 60:90], thumb[220:240, 60:90])
    np.testing.assert_array_equal(slide[:40], thumb[:40])
    hot = (np.array([190, 110, 170]) + colormap_lut("jet")[round(0.9 * 255)]) / 2  # alpha 0.5
    assert np.abs(slide[180, 110].astype(int) - hot).max() <= 1
    # Rings centred on the detections (+-2 px), each with its number at its upper right.
    font_px = overlay_font_px(400)
    for k, (x, y) in enumerate(detections_px):
        r = font_px + 4
        centre = _ring_centre(image, MARKER_COLOUR, (int(x) - r, int(y) + y0 - r, int(x) + r, int(y) + y0 + r))
        np.testing.assert_allclose(centre, (x, y + y0), atol=2)
        at = (x + font_px + 2, y + y0 - font_px - 2)
        box = (slice(int(at[1]) - 2 * font_px, int(at[1]) + 4), slice(int(at[0]) - 2, int(at[0]) + 2 * font_px))
        found = _ink(image)[box]
        own, other = (_digit_ink(text, font_px, image.shape[:2], at)[box] for text in (str(k + 1), str(2 - k)))
        assert found.sum() > 10 and (found & own).sum() / (found | own).sum() > 0.9
        assert (found & other).sum() / (found | other).sum() < 0.6
    np.testing.assert_allclose(layout["markers"], detections_px + (0, y0))
    # Colour bar: value 1 at the top row, 0.5 in the middle, 0 at the bottom.
    bx, by, bw, bh = layout["colour_bar_box_px"]
    assert bx >= w and bh >= 100
    lut = colormap_lut("jet")
    assert image[by, bx + bw // 2].tolist() == lut[255].tolist()
    assert image[by + bh - 1, bx + bw // 2].tolist() == lut[0].tolist()
    assert np.abs(image[by + (bh - 1) // 2, bx + bw // 2].astype(int) - lut[128]).max() <= 6
    # The title: three lines of text in the strip above the slide.
    ink_rows = np.flatnonzero(_ink(image[:y0]).any(axis=1))
    assert len(ink_rows) >= 3 * font_px // 2 and np.diff(ink_rows).max() > 2  # separate lines


def test_map_writer_overlay_marks_detections_at_their_slide_position(tmp_path: Path) -> None:
    """Through SlideMapWriter: a 1024 px slide at 0.5 um/px, overlay_long_side_px 256 (2 um per overlay px). A
    detection at (300, 200) um is ringed at overlay px (150, 100); with the map 1 everywhere, glass outside the
    tissue mask is the thumbnail as read, tissue is coloured; the title names slide and model."""
    from pathbundles.scannet import ScanGeometry
    from pathbundles.slide_inference import SlideMapWriter, SlideROIDataset
    from pathbundles.writers import read_detections_csv

    slide_px = np.full((1024, 1024, 3), 245, np.uint8)
    slide_px[64:-64, 64:512] = (190, 100, 170)
    write_pyramid_tiff(tmp_path / "s.tif", slide_px, mpp=0.5, compression="deflate")
    mask = np.zeros((64, 64), np.uint8)
    mask[4:-4, 4:32] = 255  # tissue: level-0 x in [64, 512), y in [64, 960)
    Image.fromarray(mask).save(tmp_path / "m.png")
    item = {"image": str(tmp_path / "s.tif"), "tissue": str(tmp_path / "m.png")}
    dataset = SlideROIDataset([item], ScanGeometry(lp=8).grid(), scan_mpp=0.5, backend="tifffile",
                              tissue_mask_key="tissue")
    detections = np.array([[0.9, 600.0, 400.0], [0.7, 200.0, 800.0]])  # level-0 px: (300, 200) and (100, 400) um
    writer = SlideMapWriter(dataset, str(tmp_path / "out"), overlay_long_side_px=256, model_label="Model 9.9.9 (m)",
                            detect=lambda *args, **kwargs: detections)
    plan = dataset.plans[0]
    writer._write_slide(plan, np.ones(plan.map_shape, np.float32))
    path = writer.outputs("s")["overlay"]
    image, layout = np.asarray(Image.open(path)), read_overlay_layout(path)
    x0, y0, w, h = layout["slide_box_px"]
    assert (w, h) == (256, 256)
    assert layout["fields"]["overlay_um_per_px"] == [2.0, 2.0] and layout["fields"]["model"] == "Model 9.9.9 (m)"
    np.testing.assert_array_equal(read_detections_csv(writer.outputs("s")["detections"])[:, 1:], detections[:, 1:])
    font_px = overlay_font_px(256)
    for x_um, y_um in ((300.0, 200.0), (100.0, 400.0)):
        x, y = x_um / 2.0 + x0, y_um / 2.0 + y0
        r = font_px + 4
        centre = _ring_centre(image, MARKER_COLOUR, (int(x) - r, int(y) - r, int(x) + r, int(y) + r))
        np.testing.assert_allclose(centre, (x, y), atol=2)
    with open_slide(tmp_path / "s.tif", backend="tifffile") as slide:
        thumb, _ = slide.read_overview(256)
    overlay = image[y0:y0 + h, x0:x0 + w]
    glass = np.zeros((256, 256), bool)
    glass[:, 190:] = True  # right of the tissue mask (x >= 512 level-0 px = 128 overlay px), clear of marker 1
    np.testing.assert_array_equal(overlay[glass], thumb[glass])
    assert np.abs(overlay[150:200, 30:100].astype(int) - thumb[150:200, 30:100]).max() > 50  # tissue coloured
    assert _ink(image[:y0]).sum() > 100


def test_hpf_overlay_numbers_detections_and_has_a_title_and_legend(tmp_path: Path) -> None:
    image = np.full((300, 300, 3), 128, np.uint8)
    detections = np.array([[55.0, 52.0, 0.9], [200.0, 60.0, 0.8]])  # a hit and a false alarm
    write_circle_overlay_png(tmp_path / "o.png", image, detections, truth=np.array([[50.0, 50.0]]), radius_px=20,
                             title=["hpf_07", "SegMitos 0.3.0"])
    drawn, layout = np.asarray(Image.open(tmp_path / "o.png")), read_overlay_layout(tmp_path / "o.png")
    x0, y0, w, h = layout["slide_box_px"]
    assert (w, h) == (300, 300) and y0 > 0
    np.testing.assert_allclose(layout["markers"][:2], detections[:, :2] + (0, y0))
    assert tuple(drawn[52 + y0, 55 + 20]) == TP_COLOUR and tuple(drawn[60 + y0, 200 - 20]) == FP_COLOUR
    font_px = overlay_font_px(300)
    for k, (x, y, _) in enumerate(detections):
        at = (x + 20 + 2, y + y0 - 20 - 2)
        box = (slice(int(at[1]) - 2 * font_px, int(at[1]) + 4), slice(int(at[0]) - 2, int(at[0]) + 2 * font_px))
        found, own = _ink(drawn)[box], _digit_ink(str(k + 1), font_px, drawn.shape[:2], at)[box]
        assert found.sum() > 5 and (found & own).sum() / (found | own).sum() > 0.9
    px, py, pw, ph = layout["panel_box_px"]
    legend = drawn[py:py + ph, px:px + pw]
    assert px >= w and all((legend == c).all(axis=-1).sum() > 20 for c in (TP_COLOUR, FP_COLOUR))
    assert _ink(drawn[:y0]).sum() > 50


def test_overlay_layout_is_read_from_the_header_without_decoding_the_pixels(tmp_path: Path) -> None:
    """The layout chunk precedes the pixel data, so the report reads it without decoding the overlay: an overlay
    cut short inside its pixel data still gives its layout (decoding it would fail)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (400, 400, 3), dtype=np.uint8)  # noise: the pixel data is most of the file
    detections = np.array([[120.0, 80.0, 0.9]])
    write_circle_overlay_png(tmp_path / "o.png", image, detections, truth=None, radius_px=12, title=["hpf_01"])
    whole = read_overlay_layout(tmp_path / "o.png")
    data = (tmp_path / "o.png").read_bytes()
    first_pixels = data.index(b"IDAT")
    assert data.index(b"iTXt") < first_pixels
    (tmp_path / "cut.png").write_bytes(data[:first_pixels + 4096])
    with pytest.raises(OSError), Image.open(tmp_path / "cut.png") as cut:
        cut.load()
    layout = read_overlay_layout(tmp_path / "cut.png")
    assert layout == whole and layout["markers"][0] == [120.0, 80.0 + layout["slide_box_px"][1]]
