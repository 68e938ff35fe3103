"""The per-run HTML report (pathbundles.report): its content from a tiny run's files, and the page in headless
Chromium (renders, every image decodes, a screenshot is kept)."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pathbundles.report import main, write_run_report
from pathbundles.weights import DEMO_WARNING
from pathbundles.writers import (write_detections_csv, write_detections_geojson, write_overlay_png,
                                 write_pyramid_tiff)

#: A slide name that would open a script element if the report pasted names into its markup.
HOSTILE = "s<script>document.title='pwned'<script>&\"x\""
LEVEL0_MPP = 0.5
SLIDE_WH = (1024, 768)
#: score, x, y (level-0 px), not in score order: the report ranks them.
DETECTIONS = np.array([[0.61, 100.0, 200.0], [0.97, 700.0, 500.0], [0.83, 300.0, 640.0]])
DARK_XYWH = (640, 448, 128, 96)  # a dark square on the slide, level-0 px


class _Page(HTMLParser):
    """Tags, attributes and text of a page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.rows: dict[str, list[str]] = {}
        self._row: str | None = None
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag == "tr" and (attributes.get("id") or "").startswith("d-"):
            self._row = attributes["id"]
            self.rows[self._row] = []
        elif tag == "tr":
            self._row = None

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._row is not None and data.strip():
            self.rows[self._row].append(data.strip())

    def find(self, tag: str, **attrs: str) -> list[dict]:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def _slide(path: Path) -> Path:
    """A pyramidal TIFF slide: pink, with a dark square at :data:`DARK_XYWH`."""
    w, h = SLIDE_WH
    image = np.empty((h, w, 3), np.uint8)
    image[:] = (230, 180, 210)
    x, y, dw, dh = DARK_XYWH
    image[y:y + dh, x:x + dw] = (40, 20, 60)
    return write_pyramid_tiff(path, image, mpp=LEVEL0_MPP, min_level_px=128)


@pytest.fixture
def tiny_run(tmp_path: Path) -> tuple[Path, list[dict]]:
    """The files a scannet run writes for one slide named :data:`HOSTILE`, made by the project's writers."""
    slide = _slide(tmp_path / "slides" / f"{HOSTILE}.tif")
    out = tmp_path / "run"
    thumb = np.full((48, 64, 3), 200, np.uint8)  # an overlay at 16 um/px: 1024 x 768 px at 0.5 um/px
    prob = np.zeros((48, 64), np.float32)
    prob[28:34, 40:48] = 0.9
    write_overlay_png(out / "overlays" / f"{HOSTILE}.png", thumb, prob)
    write_detections_csv(out / "detections" / f"{HOSTILE}.csv", DETECTIONS)
    write_detections_geojson(out / "detections" / f"{HOSTILE}.geojson", DETECTIONS, mpp=LEVEL0_MPP)
    with open(out / "slide_scores.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["name", "score", "n_detections"], [HOSTILE, "0.970000", 3]])
    return out, [{"image": str(slide)}]


def _data_image(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


def test_report_escapes_names_and_lists_every_detection(tiny_run: tuple[Path, list[dict]]) -> None:
    out, datalist = tiny_run
    path = write_run_report(out, datalist)
    assert path == out / "report.html"
    text = path.read_text(encoding="utf-8")
    page = _Page(text)
    # The hostile name is text: the page's one script is its own, and the name reads back whole.
    assert len(page.find("script")) == 1
    assert "<script>document" not in text
    assert HOSTILE in "".join(page.text)
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", text), "the report fetches nothing"

    # One table row per CSV row, ranked by score, x / y in level-0 px and um.
    rows = [page.rows[f"d-0-{rank}"] for rank in range(1, len(page.rows) + 1)]
    csv_rows = (out / "detections" / f"{HOSTILE}.csv").read_text().splitlines()
    assert len(rows) == len(csv_rows) == 3
    order = np.argsort(-DETECTIONS[:, 0])
    for rank, (row, i) in enumerate(zip(rows, order), start=1):
        score, x, y = DETECTIONS[i]
        assert [float(v) for v in row] == pytest.approx([rank, score, x, y, x * LEVEL0_MPP, y * LEVEL0_MPP])

    # Each row links to a marker on the overlay, placed at the detection's share of the slide's width and height.
    for rank, i in enumerate(order, start=1):
        marker, = page.find("a", id=f"m-0-{rank}")
        assert marker["href"] == f"#d-0-{rank}"
        left, top = (float(v) for v in re.findall(r"[\d.]+(?=%)", marker["style"]))
        assert (left, top) == pytest.approx((100 * DETECTIONS[i, 1] / SLIDE_WH[0],
                                             100 * DETECTIONS[i, 2] / SLIDE_WH[1]), abs=1e-3)
        assert page.find("a", href=f"#m-0-{rank}")

    # The thumbnail, read from the slide: 320 px wide, dark where the slide's square is.
    thumb = _data_image(page.find("img", alt="thumbnail")[0]["src"])
    assert thumb.shape[:2] == (240, 320)
    x, y, w, h = (v * 320 / SLIDE_WH[0] for v in DARK_XYWH)
    assert thumb[int(y + h / 2), int(x + w / 2)].tolist() == pytest.approx([40, 20, 60], abs=3)
    assert thumb[10, 10].tolist() == pytest.approx([230, 180, 210], abs=3)
    overlay = _data_image(page.find("img", alt="overlay")[0]["src"])
    assert overlay.shape[:2] == (48, 64)

    # A large overlay is shrunk (JPEG); markers stay at the same share of its width and height.
    small = _Page(write_run_report(out, datalist, max_image_px=32).read_text(encoding="utf-8"))
    uri = small.find("img", alt="overlay")[0]["src"]
    assert uri.startswith("data:image/jpeg;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).size == (32, 24)
    markers = [a["style"] for a in page.find("a", **{"class": "mk"})]
    assert len(markers) == 3 and [a["style"] for a in small.find("a", **{"class": "mk"})] == markers


def test_report_shows_demo_banner_metrics_and_curves(tiny_run: tuple[Path, list[dict]], tmp_path: Path) -> None:
    out, _ = tiny_run
    # metrics.json as an evaluation with the demo weights writes it (pathbundles.weights' record).
    (out / "metrics.json").write_text(json.dumps({"metrics": {"froc<b>": 0.625, "slide_auc": 0.5},
                                                  "weights": {"weights_sha256": "ab", "demo_weights": True,
                                                              "weights_warning": DEMO_WARNING}}))
    Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(out / "froc.png")
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"name": "scannet", "version": "9.8.7"}))
    page = _Page(write_run_report(out, bundle_root=bundle).read_text(encoding="utf-8"))
    text = "".join(page.text)
    assert "scannet 9.8.7: run report" in text
    assert len(page.find("div", **{"class": "banner"})) == 1 and DEMO_WARNING in text
    assert "froc<b>" in text and "0.625" in text
    assert _data_image(page.find("img", alt="froc")[0]["src"]).shape == (30, 40, 3)
    # Without the datalist: no thumbnail and no markers, the table still lists every detection.
    assert not page.find("img", alt="thumbnail") and not page.find("a", **{"class": "mk"})
    assert len(page.rows) == 3


def test_report_of_dmmn_areas_and_segmitos_hpf(tmp_path: Path) -> None:
    dmmn = tmp_path / "dmmn"
    (dmmn / "areas").mkdir(parents=True)
    (dmmn / "areas.csv").write_text("name,carcinoma_mm2,stroma_mm2,unpredicted_mm2\nA,1.5,0.5,0.25\n")
    (dmmn / "areas" / "A.json").write_text(json.dumps({
        "classes": {"carcinoma": {"area_mm2": 1.5, "fraction_of_predicted": 0.75},
                    "stroma": {"area_mm2": 0.5, "fraction_of_predicted": 0.25}},
        "unpredicted": {"area_mm2": 0.25}, "predicted_area_mm2": 2.0}))
    text = write_run_report(dmmn).read_text(encoding="utf-8")
    assert re.search(r"<td>carcinoma</td><td>1\.5000</td><td>75\.0</td>", text)
    assert re.search(r"<td>not predicted</td><td>0\.2500</td>", text)
    assert re.search(r"<td>2\.000</td></tr>", text)  # predicted area in the slide list

    hpf = tmp_path / "segmitos"
    (hpf / "detections").mkdir(parents=True)
    (hpf / "hpf_counts.csv").write_text("name,n_detections,max_score\nH,2,0.900000\n")
    (hpf / "detections" / "H.csv").write_text("10,20,0.9\n150,60,0.8\n")  # x, y (pixel centres), score
    write_detections_geojson(hpf / "detections" / "H.geojson", np.array([[0.9, 10.5, 20.5]]), mpp=0.25)
    write_overlay_png(hpf / "overlays" / "H.png", np.zeros((100, 200, 3), np.uint8), np.zeros((100, 200)))
    page = _Page(write_run_report(hpf).read_text(encoding="utf-8"))
    assert [float(v) for v in page.rows["d-0-1"]] == pytest.approx([1, 0.9, 10.5, 20.5, 2.625, 5.125], abs=0.006)
    assert [float(v) for v in page.rows["d-0-2"]] == pytest.approx([2, 0.8, 150.5, 60.5, 37.625, 15.125], abs=0.006)
    left, top = (float(v) for v in re.findall(r"[\d.]+(?=%)", page.find("a", id="m-0-2")[0]["style"]))
    assert (left, top) == pytest.approx((100 * 150.5 / 200, 100 * 60.5 / 100))
    assert write_run_report(hpf, enabled=False) is None
    assert write_run_report(hpf, enabled="false") is None  # '--write_report false' from the command line

    # A slide box (an HPF of a slide): level-0 CSV, an overlay of the box at the HPF resolution (here half the
    # slide's), so a detection 100 px right of the box's left edge is a quarter of the way across its 400 px.
    (hpf / "hpf_counts.csv").write_text("name,n_detections,max_score\nslide_x1000_y2000,1,0.7\n")
    (hpf / "detections" / "slide_x1000_y2000.csv").write_text("x_level0_px,y_level0_px,score\n1100,2150,0.7\n")
    write_overlay_png(hpf / "overlays" / "slide_x1000_y2000.png", np.zeros((100, 200, 3), np.uint8),
                      np.zeros((100, 200)))
    item = {"image": str(tmp_path / "slide.svs"), "box": [1000, 2000, 400, 200]}
    page = _Page(write_run_report(hpf, [item]).read_text(encoding="utf-8"))
    assert [float(v) for v in page.rows["d-0-1"][:4]] == pytest.approx([1, 0.7, 1100, 2150])
    left, top = (float(v) for v in re.findall(r"[\d.]+(?=%)", page.find("a", id="m-0-1")[0]["style"]))
    assert (left, top) == pytest.approx((25.0, 75.0))


def test_report_command_rewrites_a_folder_s_report(tiny_run: tuple[Path, list[dict]]) -> None:
    out, datalist = tiny_run
    slide = Path(datalist[0]["image"])
    assert main([str(out), "--data_source", str(slide)]) == out / "report.html"
    page = _Page((out / "report.html").read_text(encoding="utf-8"))
    assert page.find("img", alt="thumbnail") and len(page.find("a", **{"class": "mk"})) == 3
    assert main([str(out)]) == out / "report.html"  # no slides given: no thumbnail, the rest as before
    page = _Page((out / "report.html").read_text(encoding="utf-8"))
    assert not page.find("img", alt="thumbnail") and len(page.rows) == 3


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no headless Chromium (Debian: apt-get install chromium; scripts/setup.sh installs it as root)")


def test_report_renders_in_headless_chromium(tiny_run: tuple[Path, list[dict]], tmp_path: Path) -> None:
    out, datalist = tiny_run
    Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(out / "roc.png")
    report = write_run_report(out, datalist)
    browser = _chromium()
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", report.resolve().as_uri()], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    check, = _Page(dom).find("p", id="image-check")
    # thumbnail, overlay and the ROC plot: all three decoded by the browser
    assert (check["data-loaded"], check["data-total"]) == ("3", "3"), check
    assert "pwned" not in re.search(r"<title>(.*?)</title>", dom, re.S).group(1)

    artifacts = Path(os.environ.get("PATHBUNDLES_TEST_ARTIFACTS", tmp_path / "artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1400,1000", report.resolve().as_uri()],
                   capture_output=True, timeout=120, check=True)
    print(f"report screenshot: {shot}")
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape == (1000, 1400, 3)
    assert image.std() > 5, "the screenshot is blank"


def test_report_markers_sit_on_the_overlays_own_rings(tiny_run: tuple[Path, list[dict]]) -> None:
    """A review overlay (title strip above the slide, colour bar beside it) rings and numbers the detections itself;
    the report's markers follow its layout record, not the slide's share of the whole PNG."""
    from pathbundles.writers import read_overlay_layout

    out, datalist = tiny_run
    thumb = np.full((48, 64, 3), 200, np.uint8)
    overlay = out / "overlays" / f"{HOSTILE}.png"
    write_overlay_png(overlay, thumb, np.zeros((48, 64), np.float32), detections_px=DETECTIONS[:, 1:] / 16,
                      title=["a slide", "a model 1.0"], colour_bar="tumour probability")
    layout = read_overlay_layout(overlay)
    with Image.open(overlay) as image:
        width, height = image.size
    assert layout["slide_box_px"][1] > 0 and width > 64  # the slide is not the whole PNG
    page = _Page(write_run_report(out, datalist).read_text(encoding="utf-8"))
    order = np.argsort(-DETECTIONS[:, 0])
    for rank, i in enumerate(order, start=1):
        marker, = page.find("a", id=f"m-0-{rank}")
        left, top = (float(v) for v in re.findall(r"[\d.]+(?=%)", marker["style"]))
        mx, my = layout["markers"][i]
        assert (left, top) == pytest.approx((100 * mx / width, 100 * my / height), abs=1e-3)
        # where the slide's share of the whole PNG would have put it: off the ring by the title strip's height
        assert abs(top - 100 * DETECTIONS[i, 2] / SLIDE_WH[1]) > 1.0
