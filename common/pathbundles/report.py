"""One self-contained HTML report per run (and per cohort): what a pathologist opens first.

:func:`write_run_report` reads what a bundle run wrote in its output folder and writes ``report.html`` beside it:

- a header: bundle name and version, date, number of slides, a banner when the run used demo weights;
- the run's metrics (``metrics.json`` scalars) and curves (``froc.png``, ``roc.png``, ``pr.png``, ``confusion.png``,
  then any other PNG in the folder) when an evaluation wrote them;
- a table of slides (``slide_scores.csv`` of scannet and spatial_lstm, ``hpf_counts.csv`` of segmitos, ``areas.csv``
  of dmmn, ``scores.csv`` and ``slides.csv`` of a cohort), each name linking to the slide's section;
- per slide: a thumbnail read through the slide layer (:func:`pathbundles.wsi.open_slide`) when the datalist is
  given, the overlay (``overlays/<name>.png``) with a marker on every detection, and the detections table (rank,
  score, x and y in level-0 px and um), each row linking to its marker and back; per-class areas (dmmn,
  ``areas/<name>.json``) and per-slide metrics (``slide_metrics.csv``).

Every image is embedded as a base64 data URI and the page fetches nothing: the file can be mailed, archived or
logged as an MLflow artifact and opens offline. Slide names, CSV cells and metric names are data, not markup: every
one goes through :func:`html.escape`; element ids are built from slide and detection indices, never from names.
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pathbundles.atomic import atomic_path
from pathbundles.errors import PathBundlesError, SlidesFailedError
from pathbundles.outputs import output_file, slide_name

logger = logging.getLogger(__name__)

REPORT_FILE = "report.html"
#: Plots an evaluation writes into the output folder, shown first in this order; other PNGs there follow.
PLOT_FILES = ("froc.png", "roc.png", "pr.png", "confusion.png")
#: Longest side of the thumbnail read from the slide, px.
THUMBNAIL_PX = 320
#: Images with a longer side are shrunk before embedding (markers are placed in fractions of the image, so they stay
#: where they were).
MAX_IMAGE_PX = 2048
#: The same for a cohort's report, which holds every slide of the cohort in one file.
COHORT_IMAGE_PX = 1024
#: Detections listed per slide (the highest scoring); the count of all of them is shown.
MAX_DETECTION_ROWS = 1000
WARNING_KEYS = ("warning", "warnings")


@dataclass
class SlideSection:
    """What the report shows of one slide (or HPF)."""

    name: str
    score: float | None = None
    n_detections: int | None = None
    status: str = "done"
    #: the datalist item's label (a cohort's slides.csv), "" when none
    label: str = ""
    error: str = ""
    overlay: Path | None = None
    thumbnail_png: bytes | None = None
    #: (N, 3) score, x, y in level-0 px of the image a viewer opens, in the CSV's order.
    detections: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    #: whether x, y are level-0 px of a slide (else px of an HPF image file)
    level0_xy: bool = True
    level0_mpp: float | None = None
    #: (x, y) of the overlay's pixel (0, 0) in level-0 px, and level-0 px per overlay px (x, y); None: no markers.
    overlay_origin_xy: tuple[float, float] = (0.0, 0.0)
    overlay_scale_xy: tuple[float, float] | None = None
    #: (N, 2) where the overlay itself rings each detection (CSV order), as fractions of its width and height, from
    #: its layout record (:func:`pathbundles.writers.read_overlay_layout`); None: placed by the slide geometry.
    overlay_markers_frac: np.ndarray | None = None
    areas: dict | None = None
    slide_metrics: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _overlay_markers(overlay: Path | None, n_detections: int) -> np.ndarray | None:
    """Where an overlay rings its detections (numbered as the CSV rows), as fractions of its width and height: the
    overlay's own layout record, so the report's markers sit on its rings whatever its title strip and colour bar
    take; None without a record or when it rings another number of detections."""
    from pathbundles.writers import read_overlay_layout

    if overlay is None or n_detections == 0:
        return None
    try:
        layout = read_overlay_layout(overlay)
        with Image.open(overlay) as image:
            width, height = image.size
        markers = np.asarray(layout.get("markers") or [], np.float64).reshape(-1, 2)
    except (PathBundlesError, OSError, ValueError):
        return None
    if len(markers) != n_detections:
        return None
    return markers / np.array([width, height], np.float64)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _float(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _png_bytes(image: Image.Image | np.ndarray) -> bytes:
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _embedded_image(path: Path, max_px: int) -> tuple[str, tuple[int, int]]:
    """(data URI, (width, height) of the file's image) of a PNG: as it is, or shrunk to ``max_px`` on its longer
    side and stored as JPEG (quality 85: a slide overlay is a photograph, a third of its PNG size or less)."""
    with Image.open(path) as image:
        size = image.size
        if max(size) <= max_px:
            return _png_uri(path.read_bytes()), size
        scale = max_px / max(size)
        small = image.convert("RGB").resize((max(1, round(size[0] * scale)), max(1, round(size[1] * scale))),
                                            Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), size


def _detections(path: Path, kind: str) -> tuple[np.ndarray, bool]:
    """(N, 3) [score, x, y] of a detections CSV and whether x, y are level-0 px of a slide (else of an HPF image).

    Camelyon16 ``prob,x,y`` (scannet, spatial_lstm), segmitos ``x,y,score`` of an HPF (pixel centres at integers:
    +0.5 gives positions in pixel-edge coordinates, as the GeoJSON has them) or ``x_level0_px,y_level0_px,score``
    of a slide box."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    level0 = kind != "hpf"
    if lines and lines[0].startswith("x_level0_px"):
        lines, level0 = lines[1:], True
    rows = np.array([[float(v) for v in line.split(",")[:3]] for line in lines], np.float64).reshape(-1, 3)
    if kind == "hpf":
        rows = rows[:, [2, 0, 1]]
        if not level0:
            rows[:, 1:] += 0.5
    return rows, level0


def _demo_banner(docs: Sequence[Any], rows: Sequence[Mapping[str, str]]) -> list[str]:
    """Warnings the run's files carry: the weights record (:data:`pathbundles.weights.RECORD_FIELDS`) of
    ``metrics.json`` (``weights``), a cohort's or deploy ``summary.json`` (``bundle``) and the score tables' columns,
    when it says demo weights, and any ``warning(s)`` field."""
    from pathbundles.weights import DEMO_WARNING

    def demo_message(record: Mapping[str, Any]) -> str | None:
        demo = record.get("demo_weights")
        if demo is True or str(demo).strip().lower() in ("true", "1", "yes"):
            return str(record.get("weights_warning") or DEMO_WARNING)
        return None

    messages: list[str] = []
    for doc in docs:
        if not isinstance(doc, Mapping):
            continue
        for record in (doc, doc.get("weights"), doc.get("bundle")):
            if isinstance(record, Mapping) and (message := demo_message(record)):
                messages.append(message)
        for key in WARNING_KEYS:
            value = doc.get(key)
            if isinstance(value, str) and value:
                messages.append(value)
            elif isinstance(value, (list, tuple)):
                messages.extend(str(v) for v in value if v)
    messages.extend(message for row in rows if (message := demo_message(row)))
    return list(dict.fromkeys(messages))


def _bundle_of(bundle_root: str | os.PathLike | None, summary: Any) -> dict:
    if isinstance(summary, Mapping) and isinstance(summary.get("bundle"), Mapping):
        return dict(summary["bundle"])
    if bundle_root is not None:
        meta = _read_json(Path(bundle_root) / "configs" / "metadata.json")
        if isinstance(meta, Mapping):
            return {"name": meta.get("name") or Path(bundle_root).name, "version": meta.get("version")}
        return {"name": Path(bundle_root).name}
    return {}


def _run_kind(output_dir: Path, bundle_name: str) -> str:
    """"detection" (slide maps and detections), "hpf" (segmitos) or "segmentation" (dmmn)."""
    if (output_dir / "areas.csv").is_file() or (output_dir / "areas").is_dir() or bundle_name == "dmmn":
        return "segmentation"
    if (output_dir / "hpf_counts.csv").is_file() or bundle_name == "segmitos":
        return "hpf"
    return "detection"


def _sections(output_dir: Path) -> tuple[list[SlideSection], list[dict[str, str]]]:
    """The slides of the run in its own order, from its run table (cohort ``slides.csv`` first), and the table's
    rows."""
    cohort_rows = _read_csv(output_dir / "slides.csv") if (output_dir / "slides.csv").is_file() else None
    for table in ("slide_scores.csv", "hpf_counts.csv", "scores.csv", "areas.csv"):
        if (output_dir / table).is_file():
            rows = _read_csv(output_dir / table)
            break
    else:
        rows = []
    by_name = {r.get("name", ""): r for r in rows}
    sections = []
    for r in cohort_rows if cohort_rows is not None else rows:
        name = r.get("name", "")
        scored = by_name.get(name, r)
        score = _float(scored.get("score", scored.get("max_score")))
        n = _float(scored.get("n_detections"))
        sections.append(SlideSection(name=name, score=score, n_detections=None if n is None else int(n),
                                     status=r.get("status", "done") or "done", error=r.get("error", "") or "",
                                     label=r.get("label", "") or scored.get("label", "") or ""))
    return sections, cohort_rows if cohort_rows is not None else rows


def _fill_section(section: SlideSection, output_dir: Path, kind: str, item: Mapping[str, Any] | None,
                  slide_metrics: Mapping[str, dict[str, str]], backend: str) -> None:
    """Read one slide's files (and its thumbnail, when ``item`` gives the slide)."""
    name = section.name
    try:
        overlay = output_file(output_dir, "overlays", name, ".png")
        detections_csv = output_file(output_dir, "detections", name, ".csv")
        geojson = output_file(output_dir, "detections", name, ".geojson")
        areas = output_file(output_dir, "areas", name, ".json")
    except PathBundlesError as err:  # a name that is not one plain file name has no files
        section.problems.append(str(err))
        return
    section.overlay = overlay if overlay.is_file() else None
    section.slide_metrics = dict(slide_metrics.get(name, {}))
    if areas.is_file():
        section.areas = _read_json(areas)
    level0 = True
    if detections_csv.is_file():
        section.detections, level0 = _detections(detections_csv, kind)
        section.level0_xy = level0
    section.overlay_markers_frac = _overlay_markers(section.overlay, len(section.detections))
    doc = _read_json(geojson)
    if isinstance(doc, Mapping):
        section.level0_mpp = _float((doc.get("properties") or {}).get("mpp"))
    if section.overlay is not None and kind == "hpf":
        box = (item or {}).get("box")
        if not level0:
            section.overlay_scale_xy = (1.0, 1.0)
        elif box is not None:
            with Image.open(section.overlay) as image:
                ow, oh = image.size
            # The overlay is the box read at the HPF resolution: its pixels span the box evenly.
            section.overlay_origin_xy = (float(box[0]), float(box[1]))
            section.overlay_scale_xy = (float(box[2]) / ow, float(box[3]) / oh)
    if item is None or kind == "hpf" or section.status not in ("done", "skipped"):
        return  # a failed slide's file is not opened again: its error is the one the run reported
    from pathbundles.wsi import item_mpp, open_slide

    try:
        # The GeoJSON's mpp is the one the run used (a --slide_mpp for a file that states none).
        with open_slide(item["image"], backend=backend, mpp=item_mpp(dict(item), section.level0_mpp)) as slide:
            (w0, h0), mpp = slide.dimensions, slide.mpp[0]
            thumb, _ = slide.read_overview(THUMBNAIL_PX)
    except (PathBundlesError, OSError, ValueError) as err:
        section.problems.append(f"thumbnail: {err}")
        return
    section.thumbnail_png = _png_bytes(np.ascontiguousarray(thumb[..., :3]))
    section.level0_mpp = section.level0_mpp or mpp
    if section.overlay is not None and kind == "detection":
        with Image.open(section.overlay) as image:
            ow, oh = image.size
        # The overlay is the slide's thumbnail (SlideMapWriter): its pixels span the level-0 image evenly.
        section.overlay_scale_xy = (w0 / ow, h0 / oh)


def _fmt(value: Any, digits: int = 4) -> str:
    """A number as a count (an int, or text without a point) or with ``digits`` significant digits (1.0 stays
    1.0); anything else as text."""
    v = _float(value)
    if v is None:
        return "" if value is None else str(value)
    if isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
        return str(int(v))
    text = f"{v:.{digits}g}"
    return text if any(c in text for c in ".en") else text + ".0"


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.2em;border-bottom:1px solid #ccc;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}.banner{background:#fff3cd;border:2px solid #d39e00;padding:.6em 1em;
font-weight:bold;margin:.8em 0}.failed{color:#b00}.meta{color:#555}.images{display:flex;gap:1em;align-items:flex-start;
flex-wrap:wrap}.ov{position:relative;display:inline-block;width:560px;max-width:100%}.ov img{display:block;width:100%}
.mk{position:absolute;width:12px;height:12px;margin:-8px 0 0 -8px;border:2px solid #00e5ff;border-radius:50%;
text-decoration:none}.mk:target,.mk.on{border-color:#ff00ff;width:20px;height:20px;margin:-12px 0 0 -12px}
tr:target,tr.on{background:#fde2ff}.ovbox{max-width:100%;min-width:0;overflow:auto}.ov img{cursor:zoom-in}
.ov.big{width:auto;max-width:none}.ov.big img{width:auto;cursor:zoom-out}
.plots{display:flex;gap:1em;align-items:flex-start}.plots img{max-width:400px}.thumb{width:240px}
.dets{max-height:600px;overflow:auto;display:inline-block}figure{margin:0}figcaption{color:#555;font-size:.9em}
"""

# On load: how many images decoded (naturalWidth > 0) of how many, written into the page for a headless check;
# clicking a row or a marker highlights the pair; clicking the overlay shows it at its full size (scrollable).
_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var out = document.getElementById('image-check');
  out.setAttribute('data-loaded', ok); out.setAttribute('data-total', imgs.length);
  out.textContent = ok + ' of ' + imgs.length + ' images loaded';
});
document.addEventListener('click', function (e) {
  if (e.target.matches('.ov img')) { e.target.parentNode.classList.toggle('big'); return; }
  var a = e.target.closest('a[data-pair]'); if (!a) return;
  document.querySelectorAll('.on').forEach(function (el) { el.classList.remove('on'); });
  a.dataset.pair.split(' ').forEach(function (id) {
    var el = document.getElementById(id); if (el) el.classList.add('on'); });
});
"""


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], escaped: bool = False) -> str:
    e = (lambda s: s) if escaped else html.escape
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _section_html(k: int, s: SlideSection, kind: str, max_image_px: int) -> str:
    e = html.escape
    parts = [f'<section id="slide-{k}"><h2>{e(s.name)}</h2>']
    facts = [f"status: {e(s.status)}"]
    if s.score is not None:
        facts.append(f"score: {_fmt(s.score)}")
    if s.n_detections is not None:
        facts.append(f"detections: {s.n_detections}")
    if s.level0_mpp:
        facts.append(f"level-0: {_fmt(s.level0_mpp)} um/px")
    parts.append(f'<p class="meta">{" &middot; ".join(facts)}</p>')
    if s.error:
        parts.append(f'<p class="failed">{e(s.error)}</p>')
    for problem in s.problems:
        parts.append(f'<p class="failed">{e(problem)}</p>')
    order = np.argsort(-s.detections[:, 0], kind="stable") if len(s.detections) else np.zeros(0, np.int64)
    shown = order[:MAX_DETECTION_ROWS]
    images = []
    if s.thumbnail_png is not None:
        images.append(f'<figure><img class="thumb" alt="thumbnail" src="{_png_uri(s.thumbnail_png)}">'
                      f'<figcaption>thumbnail</figcaption></figure>')
    if s.overlay is not None:
        uri, (ow, oh) = _embedded_image(s.overlay, max_image_px)
        markers = []
        if s.overlay_markers_frac is not None or s.overlay_scale_xy is not None:
            (x0, y0), (sx, sy) = s.overlay_origin_xy, s.overlay_scale_xy or (1.0, 1.0)
            for rank, i in enumerate(shown, start=1):
                if s.overlay_markers_frac is not None:  # on the overlay's own ring
                    left, top = 100 * s.overlay_markers_frac[i]
                else:
                    left, top = 100 * (s.detections[i, 1] - x0) / sx / ow, 100 * (s.detections[i, 2] - y0) / sy / oh
                markers.append(f'<a class="mk" id="m-{k}-{rank}" href="#d-{k}-{rank}" data-pair="d-{k}-{rank} '
                               f'm-{k}-{rank}" title="{rank}: {_fmt(s.detections[i, 0])}" '
                               f'style="left:{left:.3f}%;top:{top:.3f}%"></a>')
        images.append(f'<figure class="ovbox"><div class="ov"><img alt="overlay" title="click: full size" '
                      f'src="{uri}">{"".join(markers)}</div><figcaption>overlay ({ow} x {oh} px; click for full '
                      f'size)</figcaption></figure>')
    if len(s.detections):
        mpp = s.level0_mpp
        linked = s.overlay is not None and (s.overlay_scale_xy is not None or s.overlay_markers_frac is not None)
        rows = []
        for rank, i in enumerate(shown, start=1):
            score, x, y = s.detections[i]
            rank_cell = (f'<a href="#m-{k}-{rank}" data-pair="d-{k}-{rank} m-{k}-{rank}">{rank}</a>' if linked
                         else str(rank))
            um = [f"{x * mpp:.2f}", f"{y * mpp:.2f}"] if mpp else ["", ""]
            rows.append(f'<tr id="d-{k}-{rank}"><td>{rank_cell}</td><td>{_fmt(score)}</td><td>{x:.1f}</td>'
                        f'<td>{y:.1f}</td><td>{um[0]}</td><td>{um[1]}</td></tr>')
        note = (f"<p class='meta'>the {len(shown)} highest scoring of {len(s.detections)} detections</p>"
                if len(shown) < len(s.detections) else "")
        where = "level-0" if s.level0_xy else "image"
        images.append(f'<div class="dets">{note}<table class="detections"><tr><th>rank</th><th>score</th>'
                     f'<th>x ({where} px)</th><th>y ({where} px)</th><th>x (um)</th><th>y (um)</th></tr>'
                     f'{"".join(rows)}</table></div>')
    elif s.status == "done" and kind != "segmentation":
        images.append('<p class="meta">no detections</p>')
    if images:
        parts.append(f'<div class="images">{"".join(images)}</div>')
    if isinstance(s.areas, Mapping) and isinstance(s.areas.get("classes"), Mapping):
        rows = []
        for name, c in s.areas["classes"].items():
            fraction = _float((c or {}).get("fraction_of_predicted"))
            rows.append([str(name), f"{_float(c.get('area_mm2')) or 0.0:.4f}",
                         "" if fraction is None else f"{100 * fraction:.1f}"])
        unpredicted = s.areas.get("unpredicted") or {}
        rows.append(["not predicted", f"{_float(unpredicted.get('area_mm2')) or 0.0:.4f}", ""])
        parts.append("<h3>Areas per class</h3>" + _table(["class", "area (mm²)", "% of predicted"], rows))
    if s.slide_metrics:
        cells = [(key, value) for key, value in s.slide_metrics.items() if key != "name"]
        parts.append("<h3>Slide metrics</h3>" + _table(["metric", "value"], [[k, _fmt(v)] for k, v in cells]))
    parts.append("</section>")
    return "".join(parts)


def render_report(output_dir: str | os.PathLike, datalist: Sequence[Mapping[str, Any]] | None = None,
                  bundle_root: str | os.PathLike | None = None, backend: str = "auto",
                  max_image_px: int = MAX_IMAGE_PX, failed: Mapping[str, str] | None = None) -> str:
    """The HTML of the report of the run in ``output_dir`` (see :func:`write_run_report`); ``failed``: {name: why}
    of slides that failed in this run and so have no row in its table."""
    out = Path(output_dir)
    summary = _read_json(out / "summary.json")
    metrics = _read_json(out / "metrics.json")
    bundle = _bundle_of(bundle_root, summary)
    kind = _run_kind(out, str(bundle.get("name", "")))
    sections, rows = _sections(out)
    listed = {s.name for s in sections}
    sections += [SlideSection(name=str(name), status="failed", error=str(why))
                 for name, why in (failed or {}).items() if name not in listed]
    items: dict[str, Mapping[str, Any]] = {}
    for item in datalist or []:
        try:
            items[slide_name(item)[0]] = item
        except PathBundlesError:
            continue  # the run refused it by name already; the report has nothing of it
    slide_metrics = ({r.get("name", ""): r for r in _read_csv(out / "slide_metrics.csv")}
                     if (out / "slide_metrics.csv").is_file() else {})
    for s in sections:
        _fill_section(s, out, kind, items.get(s.name), slide_metrics, backend)
    e = html.escape
    title = " ".join(str(v) for v in (bundle.get("name"), bundle.get("version")) if v) or out.name
    cohort = isinstance(summary, Mapping)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    done = sum(s.status == "done" for s in sections)
    skipped = sum(s.status == "skipped" for s in sections)
    n_failed = len(sections) - done - skipped
    what = "HPFs" if kind == "hpf" else "slides"
    counts = f"{done} done" + (f", {skipped} skipped" if skipped else "") + (f", {n_failed} failed" if n_failed else "")
    head = [f"<h1>{e(title)}: {'cohort' if cohort else 'run'} report</h1>",
            f'<p class="meta">{e(date)} &middot; {len(sections)} {what} ({counts}) &middot; output folder '
            f'{e(str(out.resolve()))}</p>']
    for message in _demo_banner([summary, metrics], rows):
        head.append(f'<div class="banner">{e(message)}</div>')
    body = ["".join(head)]
    if isinstance(metrics, Mapping) and isinstance(metrics.get("metrics"), Mapping):
        body.append("<h2>Metrics</h2>" + _table(["metric", "value"],
                                                 [[str(k), _fmt(v)] for k, v in metrics["metrics"].items()]))
    if cohort:
        facts = [(k, summary.get(k)) for k in ("run_id", "done", "skipped", "failed", "wall_s", "slides_per_hour",
                                               "slide_auc") if summary.get(k) is not None]
        body.append("<h2>Cohort</h2>" + _table(["", "value"], [[k, _fmt(v)] for k, v in facts]))
    known = [out / name for name in PLOT_FILES]
    plots = [p for p in known if p.is_file()] + [p for p in sorted(out.glob("*.png"))
                                                 if p not in known and not p.name.startswith(".")]
    if plots:
        body.append('<h2>Curves</h2><div class="plots">' + "".join(
            f'<img alt="{e(p.stem)}" src="{_embedded_image(p, max_image_px)[0]}">' for p in plots) + "</div>")
    listing = []
    for k, s in enumerate(sections):
        cells = [f'<a href="#slide-{k}">{e(s.name)}</a>', e(s.status), "" if s.score is None else _fmt(s.score),
                 "" if s.n_detections is None else str(s.n_detections)]
        if kind == "segmentation" and isinstance(s.areas, Mapping):
            cells.append(f"{_float(s.areas.get('predicted_area_mm2')) or 0.0:.3f}")
        listing.append(cells)
    header = ["name", "status", "score", "detections" if kind != "segmentation" else "regions"]
    if kind == "segmentation":
        header.append("predicted area (mm²)")
    if any(s.label for s in sections):
        header.insert(1, "label")
        for cells, s in zip(listing, sections):
            cells.insert(1, e(s.label))
    body.append(f"<h2>{what.capitalize()}</h2>" + _table(header, listing, escaped=True))
    body.extend(_section_html(k, s, kind, max_image_px) for k, s in enumerate(sections))
    body.append('<p id="image-check" class="meta" data-loaded="" data-total=""></p>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            f"style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
            f"<title>{e(title)} report</title><style>{_STYLE}</style></head><body>"
            + "\n".join(body) + f"<script>{_SCRIPT}</script></body></html>\n")


def write_run_report(output_dir: str | os.PathLike, datalist: Sequence[Mapping[str, Any]] | None = None,
                     bundle_root: str | os.PathLike | None = None, enabled: bool = True, backend: str = "auto",
                     max_image_px: int = MAX_IMAGE_PX, writer: Any = None) -> Path | None:
    """Write ``output_dir/report.html``, one self-contained page of the run (or cohort) in ``output_dir``.

    The bundles' ``inference.json`` call it with their writer before ``writer.ensure_completed()``: a run where some
    slides failed still gets its report, those slides listed with their errors, and then ends as before.

    Args:
        output_dir: the run's output folder, as the bundle's writer (and evaluation) or a cohort left it.
        datalist: the run's items; with them each slide's thumbnail is read (through
            :func:`pathbundles.wsi.open_slide`) and detections are marked on the overlay. None: overlays only.
        bundle_root: the bundle folder, for its name and version (``configs/metadata.json``); a cohort's
            ``summary.json`` names its bundle itself.
        enabled: False writes nothing (the bundles' ``write_report`` key).
        backend: slide reader backend for the thumbnails.
        max_image_px: images with a longer side are shrunk to it before embedding.
        writer: the run's writer (:class:`pathbundles.slide_inference.StreamedSlideWriter`,
            :class:`pathbundles.hpf.HPFDetectionWriter`): completed first (``ensure_completed``, its
            :class:`~pathbundles.errors.SlidesFailedError` kept for the caller's own call), its ``failed`` slides
            shown.

    Returns:
        The report's path, or None when not ``enabled``.
    """
    from pathbundles.checks import flag

    if not flag(enabled, "write_report"):  # '--write_report false' arrives as a string
        return None
    if writer is not None:
        try:
            writer.ensure_completed()
        except SlidesFailedError:
            pass  # named in the report; the config's own ensure_completed() raises it after the report is written
    failed = dict(getattr(writer, "failed", None) or {})
    page = render_report(output_dir, datalist, bundle_root, backend, max_image_px, failed)
    path = Path(output_dir) / REPORT_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    logger.info("report: %s", path.resolve())
    return path


def main(argv: Sequence[str] | None = None) -> Path | None:
    """``python -m pathbundles.report OUTPUT_DIR``: (re)write the report of a run's output folder."""
    import argparse

    from pathbundles.bundle import datalist

    parser = argparse.ArgumentParser(prog="python -m pathbundles.report",
                                     description="Write OUTPUT_DIR/report.html from what a bundle run or a cohort "
                                                 "wrote there.")
    parser.add_argument("output_dir")
    parser.add_argument("--data_source", help="the run's --data_source (a slide, folder, datalist or manifest): "
                                              "with it the report shows thumbnails and marks detections")
    parser.add_argument("--kind", default="metastasis", choices=("metastasis", "mitosis", "multiclass"),
                        help="what --data_source holds (mitosis: HPF images)")
    parser.add_argument("--split", default="test", help="the split of a datalist with split fields")
    parser.add_argument("--bundle_root", help="the bundle folder, for its name and version")
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)
    items = datalist(args.data_source, kind=args.kind, split=args.split) if args.data_source else None
    path = write_run_report(args.output_dir, items, args.bundle_root, backend=args.backend)
    print(path)
    return path


if __name__ == "__main__":
    main()
