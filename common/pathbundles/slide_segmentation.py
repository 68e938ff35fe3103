"""Whole-slide multi-class segmentation outputs and their evaluation (DMMN, Ho et al., 004_01b453305fb6e6d6.txt).

:class:`SlideLabelWriter` stitches the 256 x 256 label tiles of a
:class:`pathbundles.multimag.MultiMagnificationDataset` inference run into one label map per slide on disk and
writes, per slide, the map as a pyramidal TIFF, a coloured overlay with a legend (the paper's colours, Figs. 6-8),
per-class areas and, optionally, carcinoma outlines as QuPath GeoJSON. :class:`SegmentationMetricsReport` compares
the written maps with the datalist's ground truth and writes IoU, recall and precision in the layout of the paper's
Table I.

Label map geometry: the map is at the finest network resolution ``map_mpp = dataset.mpps[0]`` (20x, 0.5 um/px),
anchored at level-0 (0, 0). Map pixel (r, c) covers level-0 ``[c * s, (c + 1) * s) x [r * s, (r + 1) * s)`` with
``s = map_mpp / level0_mpp``; the map has ``ceil(level0_size * level0_mpp / map_mpp)`` pixels per axis. A tile
centred on level-0 ``location`` fills the map from pixel ``round(location / s - tile_px / 2)``. Label 0 = not
predicted (no tile there, e.g. glass outside the tissue mask); 1..C = the classes.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pathbundles.atomic import atomic_path
from pathbundles.checks import flag
from pathbundles.errors import InputError
from pathbundles.metrics.segmentation import SegmentationScores, confusion_matrix
from pathbundles.outputs import output_file, work_area
from pathbundles.slide_inference import StreamedSlideWriter
from pathbundles.weights import WeightsIdentity, csv_header_and_row
from pathbundles.writers import write_label_overlay_png

logger = logging.getLogger(__name__)

__all__ = ["DMMN_PALETTE", "SegmentationMetricsReport", "SlideLabelWriter", "canonical_class_name", "class_colours",
           "report_label_outputs", "trace_regions", "write_table_i"]

#: Class colours of the paper's figures (Sec. III: "carcinoma in red, benign epithelial in blue, background in
#: yellow, stroma in green, necrotic in gray, and adipose in orange"), keyed by canonical class name.
DMMN_PALETTE: dict[str, tuple[int, int, int]] = {
    "carcinoma": (255, 0, 0),
    "benign epithelium": (0, 0, 255),
    "background": (255, 255, 0),
    "stroma": (0, 255, 0),
    "necrosis": (128, 128, 128),
    "adipose": (255, 165, 0),
}
# The paper's adjectives and common synonyms -> the canonical names above (those of pathbundles.phantom).
_CLASS_ALIASES = {"benign epithelial": "benign epithelium", "necrotic": "necrosis", "fat": "adipose"}
# Colours for classes outside the paper's six, in id order: distinct from the six and from each other.
_EXTRA_COLOURS = ((128, 0, 128), (0, 255, 255), (255, 0, 255), (139, 69, 19), (0, 128, 128), (255, 192, 203))
# Pixels per band when a label map is scanned or compared: bounds memory (a few tens of MB) whatever the slide size.
_BAND_PIXELS = 1 << 24


def canonical_class_name(name: str) -> str:
    """Lower-case, single-spaced class name with the paper's adjectives mapped to nouns ("Necrotic" -> "necrosis")."""
    key = " ".join(str(name).lower().split())
    return _CLASS_ALIASES.get(key, key)


def _slug(name: str) -> str:
    """A class name as a metric/column name part ("benign epithelium" -> "benign_epithelium")."""
    return re.sub(r"[^0-9a-z]+", "_", canonical_class_name(name)).strip("_")


def _check_classes(classes: Mapping[Any, str]) -> dict[int, str]:
    """{id: name} with int ids 1..C (JSON configs give string keys)."""
    out = {int(k): str(v) for k, v in classes.items()}
    if sorted(out) != list(range(1, len(out) + 1)) or len(out) > 255:
        raise ValueError(f"classes {classes}: expected ids 1..C (C <= 255), one name each; 0 means 'not predicted'")
    if len({canonical_class_name(v) for v in out.values()}) != len(out):
        raise ValueError(f"classes {classes}: two ids share one class name")
    return dict(sorted(out.items()))


def class_colours(classes: Mapping[Any, str]) -> dict[int, tuple[int, int, int]]:
    """{id: (r, g, b)} for {id: name}: the paper's colour for each of its six classes (:data:`DMMN_PALETTE`, names
    compared by :func:`canonical_class_name`), distinct extra colours for any other class, in id order."""
    extra = iter(_EXTRA_COLOURS)
    colours = {}
    for class_id, name in _check_classes(classes).items():
        colour = DMMN_PALETTE.get(canonical_class_name(name))
        colours[class_id] = colour if colour is not None else next(extra, (0, 0, 0))
    return colours


def _centre_indices(n_out: int, step: float, n_in: int) -> np.ndarray:
    """Source index of each of ``n_out`` output pixels ``step`` source pixels wide (nearest: the pixel under the
    output pixel's centre), clipped to the source."""
    return np.minimum(np.floor((np.arange(n_out) + 0.5) * step).astype(np.int64), n_in - 1)


class _NearestCopy:
    """A nearest-neighbour resampled copy of a label map, filled band by band as the map is scanned."""

    def __init__(self, rows: np.ndarray, cols: np.ndarray) -> None:
        self.rows, self.cols = rows, cols
        self.array = np.zeros((len(rows), len(cols)), np.uint8)

    def take(self, band: np.ndarray, y0: int) -> None:
        lo, hi = np.searchsorted(self.rows, [y0, y0 + len(band)])
        if hi > lo:
            self.array[lo:hi] = band[self.rows[lo:hi] - y0][:, self.cols]


def trace_regions(mask: np.ndarray, level0_px: float, min_pixels: float = 1,
                  extent_px: tuple[float, float] | None = None) -> list[tuple[np.ndarray, list, int]]:
    """Outlines of the 4-connected foreground components of a mask, in level-0 pixels.

    Outlines follow pixel edges (marching squares at level 0.5), simplified by Douglas-Peucker to within half a
    pixel: staircases become straight lines and a component's bounding box is that of its pixels to half a pixel,
    but the outline's area differs from the pixel count by up to half a pixel per boundary pixel, which is why the
    pixel count is returned as the area.

    Args:
        mask: (H, W) bool; pixel (r, c) covers level-0 ``[c * level0_px, (c + 1) * level0_px)`` horizontally.
        level0_px: level-0 pixels per mask pixel.
        min_pixels: components (and holes) of fewer pixels are dropped (holes are filled).
        extent_px: the slide's level-0 (width, height): vertices beyond it are moved onto its edge (a mask's last
            pixel covers up to one mask pixel past the slide, where there is no glass; DICOM annotations refuse
            points outside the slide).

    Returns:
        One ``(exterior, holes, n_pixels)`` per component, largest first: (N, 2) float64 level-0 (x, y) rings, not
        closed, and the component's pixel count.
    """
    from scipy import ndimage
    from skimage.measure import approximate_polygon, find_contours

    labelled, n = ndimage.label(mask)  # 4-connected, as find_contours' default "low" connectivity sees foreground
    if n == 0:
        return []
    sizes = np.bincount(labelled.ravel(), minlength=n + 1)
    regions = []
    for k, (rows, cols) in enumerate(ndimage.find_objects(labelled), start=1):
        if sizes[k] < min_pixels:
            continue
        crop = np.pad(labelled[rows, cols] == k, 1).astype(np.uint8)
        rings = []
        for contour in find_contours(crop, 0.5):
            ring = approximate_polygon(contour, tolerance=0.5)[:-1]  # closed by find_contours: drop the repeat
            r, c = ring[:, 0], ring[:, 1]
            area = 0.5 * abs(np.dot(c, np.roll(r, -1)) - np.dot(r, np.roll(c, -1)))
            # Crop index -> mask index (the 1-pixel pad) -> level-0, pixel i spanning [i, i + 1) * level0_px.
            xy = np.stack([c - 1 + cols.start + 0.5, r - 1 + rows.start + 0.5], axis=1) * level0_px
            if extent_px is not None:
                xy = np.clip(xy, 0.0, np.asarray(extent_px, np.float64))
            rings.append((area, xy))
        rings.sort(key=lambda item: -item[0])
        exterior = rings[0][1]
        holes = [xy for area, xy in rings[1:] if area >= min_pixels and len(xy) >= 3]
        regions.append((int(sizes[k]), exterior, holes))
    regions.sort(key=lambda item: -item[0])
    return [(exterior, holes, n_pixels) for n_pixels, exterior, holes in regions]


def _write_regions_geojson(path: Path, regions: Mapping[str, list], colours: Mapping[str, Sequence[int]],
                           um2_per_px: float, id_scope: str, properties: Mapping[str, Any] | None = None) -> None:
    """QuPath GeoJSON: a Polygon annotation per region (:func:`trace_regions`) with its class name and colour, its
    area in um^2 (``um2_per_px`` per pixel of the traced mask) and a stable ``id``
    (:func:`pathbundles.annotations.feature_id` of ``id_scope`` and the feature's index); ``properties`` are added
    to the collection's own (the run's weights)."""
    from pathbundles.annotations import feature_id

    features = []
    for class_name, outlines in regions.items():
        for k, (exterior, holes, n_pixels) in enumerate(outlines, start=1):
            rings = [np.vstack([ring, ring[:1]]) for ring in (exterior, *holes)]
            features.append({
                "type": "Feature", "id": feature_id(id_scope, len(features)),
                "geometry": {"type": "Polygon", "coordinates": [np.round(r, 3).tolist() for r in rings]},
                "properties": {"objectType": "annotation", "name": f"{class_name} {k}", "isLocked": False,
                               "classification": {"name": class_name, "color": [int(c) for c in colours[class_name]]},
                               "measurements": {"area_um2": round(float(n_pixels * um2_per_px), 3)}},
            })
    doc = {"type": "FeatureCollection", "features": features,
           "properties": {"coordinates": "level-0 pixels (x, y)", **dict(properties or {})}}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc), encoding="utf-8")


def _write_regions_asap_xml(path: Path, regions: Mapping[str, list], colours: Mapping[str, Sequence[int]]) -> None:
    """ASAP XML of the same regions as :func:`_write_regions_geojson`: region k of a class is a Polygon named
    ``"<class> <k>"`` in the class's group and colour; ASAP has no holes, so each hole j is a Polygon named
    ``"<class> <k> hole <j>"`` in the Camelyon16 exclusion group "_2" (what ASAP users and
    :func:`pathbundles.annotations.rasterize` take as "not inside the polygon around it")."""
    from pathbundles.annotations import EXCLUSION_GROUPS, Annotation, write_asap_xml

    polygons = []
    for class_name, outlines in regions.items():
        for k, (exterior, holes, _) in enumerate(outlines, start=1):
            polygons.append(Annotation(name=f"{class_name} {k}", group=class_name, kind="polygon", label=class_name,
                                       xy=np.round(exterior, 3)))
            polygons += [Annotation(name=f"{class_name} {k} hole {j}", group=EXCLUSION_GROUPS[0], kind="polygon",
                                    label="Exclusion", xy=np.round(hole, 3)) for j, hole in enumerate(holes, start=1)]
    write_asap_xml(path, polygons, colours=colours)


class SlideLabelWriter(StreamedSlideWriter):
    """Ignite handler: stitch DMMN label tiles into per-slide label maps on disk and write each slide's outputs.

    Every iteration, each output's ``pred_key`` entry, (C, H, W) logits or probabilities of one tile (channel k =
    class k + 1, :mod:`pathbundles.dmmn`), becomes ``argmax + 1`` labels pasted at the tile's place (see the module
    docstring for the geometry; tiles reaching past the map are clipped). When a slide's last tile is in, a writer
    thread writes, under ``output_dir``:

    - ``labels/<name>.tif``: uint8 labels (0 = not predicted) at ``map_mpp``, tiled pyramidal OME-TIFF (deflate,
      nearest-neighbour levels, mpp tags, the class colours as its TIFF palette, class names and colours in its
      fields, :func:`pathbundles.writers.read_pyramid_fields`), streamed from the disk canvas;
    - ``labels_rgb/<name>.tif`` (when ``rgb_labels``): the same map as RGB class colours, for readers that cannot
      read a palette image (TIAToolbox's ``WSIReader.open``);
    - ``overlays/<name>.png``: for review, the slide thumbnail (its long side ``overlay_long_side_px``) with the label
      colours (:func:`class_colours`; unpredicted pixels left as scanned), a legend of the class colours and names
      to its right, and the slide name, model and version and the predicted area in a title strip
      (:func:`pathbundles.writers.write_label_overlay_png`);
    - ``areas/<name>.json``: pixels and mm^2 per class, the unpredicted area and the map mpp;
    - ``regions/<name>.geojson`` (when ``polygon_classes``): outlines of the connected regions of those classes as
      QuPath annotations with their class colours and stable ids, traced at ``polygon_mpp``;
    - ``regions/<name>.xml`` (when ``polygon_classes``): the same outlines as ASAP XML polygons, holes as
      exclusion ("_2") polygons;

    and at the end of the epoch ``areas.csv`` (mm^2 per class and unpredicted, one row per slide). A slide without
    tiles gets an all-zero map. A slide whose tile has a non-empty ``error`` entry, or whose writing fails, is
    logged, gets no output at all, and the run raises after the other slides are written.

    Args:
        dataset: the :class:`~pathbundles.multimag.MultiMagnificationDataset` (mode "infer") being run.
        output_dir: folder for all outputs (the stitching canvases live in its work area,
            :func:`pathbundles.outputs.work_area`).
        classes: {id: name} of the network's classes, ids 1..C.
        pred_key: key of the prediction in each ``engine.state.output`` item.
        overlay_long_side_px: pixels along the overlay thumbnail's long side (at most the slide's level 0).
        model_label: the model and version printed on overlays (:func:`pathbundles.bundle.model_label`).
        polygon_classes: class names to outline in GeoJSON; () for none.
        polygon_mpp: resolution at which outlines are traced (um/px); coarser gives fewer vertices.
        min_polygon_area_um2: regions (and holes in them) smaller than this are not outlined (um^2).
        alpha: opacity of the label colours in the overlay, 0..1.
        rgb_labels: also write ``labels_rgb/<name>.tif``.
        weights: the run's weights, recorded in ``areas.csv`` (columns after the areas), ``areas/<name>.json``, the
            label maps' fields and the regions' GeoJSON properties
            (:class:`~pathbundles.slide_inference.StreamedSlideWriter`).
    """

    def __init__(self, dataset: Any, output_dir: str | os.PathLike, classes: Mapping[Any, str], pred_key: str = "pred",
                 overlay_long_side_px: int = 2000, model_label: str = "",
                 polygon_classes: Sequence[str] = ("carcinoma",), polygon_mpp: float = 4.0,
                 min_polygon_area_um2: float = 1000.0, alpha: float = 0.5, rgb_labels: bool = True,
                 weights: WeightsIdentity | None = None) -> None:
        super().__init__(dataset, output_dir, "DMMN tiles", "tile", weights)
        self.rgb_labels = flag(rgb_labels, "rgb_labels")
        self.classes = _check_classes(classes)
        self.pred_key, self.alpha = pred_key, float(alpha)
        self.overlay_long_side_px, self.model_label = int(overlay_long_side_px), str(model_label)
        self.map_mpp = float(dataset.mpps[0])
        by_name = {canonical_class_name(v): k for k, v in self.classes.items()}
        unknown = [c for c in polygon_classes if canonical_class_name(c) not in by_name]
        if unknown:
            raise ValueError(f"polygon_classes {unknown} are not among the classes {list(self.classes.values())}")
        self.polygon_ids = [by_name[canonical_class_name(c)] for c in polygon_classes]
        self.polygon_mpp, self.min_polygon_area_um2 = float(polygon_mpp), float(min_polygon_area_um2)
        if self.polygon_ids and not self.polygon_mpp >= self.map_mpp:
            raise ValueError(f"polygon_mpp {polygon_mpp}: expected >= the label map's {self.map_mpp} um/px")
        self.colours = class_colours(self.classes)
        # Items (tiles and any deformed copies) per slide: a slide is complete when this many have come back.
        self._expected = np.bincount(np.asarray(dataset.tiles)[np.asarray(dataset.item_tile), 0].astype(np.int64),
                                     minlength=len(dataset.slides))
        self._done = np.zeros(len(dataset.slides), np.int64)
        self._finished: set[int] = set()
        self._canvas: dict[int, Any] = {}
        # Slides the dataset could not open fail by name at the end, with the others written.
        self._errors: dict[int, str] = {s: e.error for s, e in enumerate(dataset.slides) if getattr(e, "error", "")}
        #: {slide name: {class name: mm^2, ..., "unpredicted": mm^2}} of the slides written.
        self.areas: dict[str, dict[str, float]] = {}
        #: {slide name: number of outlined regions} of the slides written.
        self.n_regions: dict[str, int] = {}

    def map_shape(self, s: int) -> tuple[int, int]:
        """(H, W) of slide ``s``'s label map."""
        entry = self.dataset.slides[s]
        scale = entry.level0_mpp / self.map_mpp
        # The tolerance keeps an mpp read from rational TIFF tags (0.50000001) from adding a row of nothing.
        return (max(1, math.ceil(entry.level0_size[1] * scale - 1e-6)),
                max(1, math.ceil(entry.level0_size[0] * scale - 1e-6)))

    def _canvas_for(self, s: int) -> Any:
        if s not in self._canvas:
            from pathbundles.writers import DiskCanvas

            self._canvas[s] = DiskCanvas(self.map_shape(s), np.uint8, fill=0, dir=work_area(self.output_dir))
            entry = self.dataset.slides[s]
            self._prefetch_overview(entry.name, entry.path, self.dataset.handles.backend, entry.mpp_override,
                                    self.overlay_long_side_px)
        return self._canvas[s]

    def iteration_completed(self, engine: Any) -> None:
        batch, output = engine.state.batch, engine.state.output
        self._advance(len(batch))
        for item, out in zip(batch, output, strict=True):
            s = int(item["slide_index"])
            if s not in self._errors and item.get("error"):
                self._errors[s] = str(item["error"])
                logger.error("slide %s failed: %s", self.dataset.slides[s].name, self._errors[s])
            if s not in self._errors:
                self._paste(s, out[self.pred_key], item["location"])
            self._done[s] += 1
            if self._done[s] == self._expected[s]:
                self._finish(s)

    def _paste(self, s: int, pred: Any, location: Any) -> None:
        pred = torch.as_tensor(pred)
        if pred.ndim != 3 or pred.shape[0] != len(self.classes):
            raise ValueError(f"prediction of shape {tuple(pred.shape)}: expected ({len(self.classes)}, H, W) class "
                             f"scores, one channel per class of {list(self.classes.values())}")
        labels = (pred.argmax(0) + 1).to(torch.uint8).cpu().numpy()
        entry = self.dataset.slides[s]
        step0 = self.map_mpp / entry.level0_mpp
        x, y = (float(v) for v in np.asarray(torch.as_tensor(location).cpu(), np.float64).reshape(2))
        r0 = int(np.rint(y / step0 - labels.shape[0] / 2))
        c0 = int(np.rint(x / step0 - labels.shape[1] / 2))
        h, w = self.map_shape(s)
        rr0, cc0 = max(r0, 0), max(c0, 0)
        rr1, cc1 = min(r0 + labels.shape[0], h), min(c0 + labels.shape[1], w)
        if rr0 < rr1 and cc0 < cc1:
            self._canvas_for(s)[rr0:rr1, cc0:cc1] = labels[rr0 - r0:rr1 - r0, cc0 - c0:cc1 - c0]

    def _finish_remaining(self) -> None:
        """Finish the slides not finished yet (no tiles, or tiles missing)."""
        for s in range(len(self.dataset.slides)):
            if s not in self._finished:
                self._finish(s)

    def _write_run_files(self) -> None:
        """``areas.csv``: mm^2 per class and unpredicted, one row per slide in datalist order."""
        names = [e.name for e in self.dataset.slides]
        self.areas = {n: self.areas[n] for n in names if n in self.areas}  # datalist order, not finishing order
        columns = [*self.classes.values(), "unpredicted"]
        extra_columns, extra_values = csv_header_and_row(self.weights)
        with atomic_path(self.output_dir / "areas.csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["name", *(f"{_slug(c)}_mm2" for c in columns), *extra_columns])
            for name, areas in self.areas.items():
                writer.writerow([name, *(f"{areas[c]:.6f}" for c in columns), *extra_values])

    def results(self) -> list[dict]:
        """One record per slide written by the run: ``name``, ``score`` (the carcinoma share of the predicted
        area, 0 when the classes have no carcinoma), ``n_detections`` (carcinoma regions traced), ``areas_mm2`` and
        ``outputs`` (the writer protocol of :mod:`pathbundles.bundle_runner`)."""
        records = []
        for name, areas in self.areas.items():
            predicted = sum(v for k, v in areas.items() if k != "unpredicted")
            records.append({"name": name, "score": areas.get("carcinoma", 0.0) / predicted if predicted else 0.0,
                            "n_detections": int(self.n_regions.get(name, 0)), "areas_mm2": dict(areas),
                            "outputs": {k: v for k, v in self.outputs(name).items() if v.exists()}})
        return records

    def outputs(self, name: str) -> dict[str, Path]:
        """The files written for slide ``name``."""
        files = {"labels": output_file(self.output_dir, "labels", name, ".tif"),
                 "overlay": output_file(self.output_dir, "overlays", name, ".png"),
                 "areas": output_file(self.output_dir, "areas", name, ".json")}
        if self.rgb_labels:
            files["labels_rgb"] = output_file(self.output_dir, "labels_rgb", name, ".tif")
        if self.polygon_ids:
            files["regions"] = output_file(self.output_dir, "regions", name, ".geojson")
            files["asap_xml"] = output_file(self.output_dir, "regions", name, ".xml")
        return files

    def _finish(self, s: int) -> None:
        """Hand a complete slide to the writer thread, so the network goes on with the next slide meanwhile."""
        self._finished.add(s)
        if s not in self._errors:
            self._canvas_for(s)  # a slide without tiles gets an all-zero canvas
        canvas = self._canvas.pop(s, None)  # closed by the writer thread, also for a failed slide
        self._submit(self.dataset.slides[s].name, self._errors.get(s), canvas, lambda c: self._write_slide(s, c))

    def _write_slide(self, s: int, canvas: Any) -> None:
        from pathbundles.writers import write_pyramid_tiff

        entry = self.dataset.slides[s]
        files = self.outputs(entry.name)
        height, width = canvas.shape
        # The thumbnail first (read while the network ran): a slide that cannot be read fails before anything is
        # written.
        thumb = self._overview(entry.name, entry.path, self.dataset.handles.backend, entry.mpp_override,
                               self.overlay_long_side_px)
        w0, h0 = entry.level0_size
        thumb_map = _NearestCopy(_centre_indices(thumb.shape[0], h0 * entry.level0_mpp / thumb.shape[0] / self.map_mpp,
                                                 height),
                                 _centre_indices(thumb.shape[1], w0 * entry.level0_mpp / thumb.shape[1] / self.map_mpp,
                                                 width))
        copies = [thumb_map]
        if self.polygon_ids:
            step = self.polygon_mpp / self.map_mpp
            polygon_map = _NearestCopy(_centre_indices(math.ceil(height / step), step, height),
                                       _centre_indices(math.ceil(width / step), step, width))
            copies.append(polygon_map)
        # One pass over the canvas in bands: per-class counts and the small copies for the overlay and outlines.
        counts = np.zeros(256, np.int64)
        band_rows = max(1, _BAND_PIXELS // width)
        for y0 in range(0, height, band_rows):
            band = canvas[y0:y0 + band_rows]
            counts += np.bincount(band.ravel(), minlength=256)
            for copy in copies:
                copy.take(band, y0)

        # The label values with the class colours as the TIFF palette (viewers show colours, tifffile reads labels),
        # then the same colours as RGB for readers that need samples (TIAToolbox); names and colours in the fields.
        fields = {"classes": {str(k): v for k, v in self.classes.items()},
                  "colours": {str(k): list(c) for k, c in self.colours.items()},
                  "read_path": entry.read_path, **self.weights_record()}
        write_pyramid_tiff(files["labels"], canvas, mpp=self.map_mpp, compression="deflate", resample="nearest",
                           colormap=self.colours, description={"content": "class labels, 0 = not predicted (black); "
                                                                          "the palette holds the class colours",
                                                               **fields})
        if self.rgb_labels:
            write_pyramid_tiff(files["labels_rgb"], canvas, mpp=self.map_mpp, compression="deflate",
                               resample="nearest", colormap=self.colours, store_rgb=True,
                               description={"content": "class colours of labels/<name>.tif, not predicted = black",
                                            **fields})
        mm2_per_px = (self.map_mpp * 1e-3) ** 2
        step_x, step_y = w0 / thumb.shape[1], h0 / thumb.shape[0]
        write_label_overlay_png(files["overlay"], thumb, thumb_map.array, self.colours, alpha=self.alpha,
                                legend=[(name, self.colours[k]) for k, name in self.classes.items()],
                                title=[entry.name, *([self.model_label] if self.model_label else []),
                                       f"predicted {counts[1:].sum() * mm2_per_px:.2f} mm^2 of "
                                       f"{counts.sum() * mm2_per_px:.2f} mm^2; areas in areas/{files['areas'].name}"],
                                fields={"slide": entry.name, "model": self.model_label,
                                        "level0_px_per_overlay_px": [step_x, step_y],
                                        "overlay_um_per_px": [step_x * entry.level0_mpp, step_y * entry.level0_mpp]})

        n_regions = 0
        if self.polygon_ids:
            step0 = self.polygon_mpp / entry.level0_mpp
            min_pixels = self.min_polygon_area_um2 / self.polygon_mpp ** 2
            regions = {self.classes[k]: trace_regions(polygon_map.array == k, step0, min_pixels, extent_px=(w0, h0))
                       for k in self.polygon_ids}
            n_regions = sum(len(v) for v in regions.values())
            colours = {self.classes[k]: self.colours[k] for k in self.polygon_ids}
            _write_regions_geojson(files["regions"], regions, colours, self.polygon_mpp ** 2, f"{entry.name}/regions",
                                   self.weights_record())
            _write_regions_asap_xml(files["asap_xml"], regions, colours)

        predicted = int(counts[1:].sum())
        per_class = {name: {"id": k, "pixels": int(counts[k]), "area_mm2": float(counts[k] * mm2_per_px),
                            "fraction_of_predicted": float(counts[k] / predicted) if predicted else None}
                     for k, name in self.classes.items()}
        doc = {"slide": entry.name, "map_mpp": self.map_mpp, "map_shape_hw": [height, width],
               "pixel_area_mm2": mm2_per_px, "classes": per_class,
               "unpredicted": {"pixels": int(counts[0]), "area_mm2": float(counts[0] * mm2_per_px)},
               "predicted_area_mm2": float(predicted * mm2_per_px), "n_regions": n_regions, **self.weights_record()}
        with atomic_path(files["areas"]) as tmp:
            tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        self.areas[entry.name] = {**{n: v["area_mm2"] for n, v in per_class.items()},
                                  "unpredicted": doc["unpredicted"]["area_mm2"]}
        self.n_regions[entry.name] = n_regions


def report_label_outputs(writer: SlideLabelWriter) -> dict:
    """Print (and return) where a :class:`SlideLabelWriter` put each slide's outputs, with its areas (mm^2)."""
    report = {"output_dir": str(writer.output_dir.resolve()),
              **({"weights": writer.weights_record()} if writer.weights_record() else {}),
              "areas": str((writer.output_dir / "areas.csv").resolve()),
              "slides": {name: {"areas_mm2": areas, "n_regions": writer.n_regions.get(name, 0),
                                **{k: str(v.resolve()) for k, v in writer.outputs(name).items()}}
                         for name, areas in writer.areas.items()}}
    print(json.dumps(report, indent=2))
    return report


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------


class _LabelTiffRows:
    """Row bands of level 0 of a tiled uint8 label TIFF, decoding only the tile rows asked for (the last one
    cached, so consecutive bands that share a tile row decode it once)."""

    def __init__(self, path: str | os.PathLike) -> None:
        import tifffile

        self.path = Path(path)
        self._tif = tifffile.TiffFile(self.path)
        page = self._page = self._tif.pages.first
        if not page.is_tiled or page.dtype != np.uint8 or page.samplesperpixel != 1:
            self._tif.close()
            raise InputError(path, f"expected a tiled single-channel uint8 label TIFF, got tiled={page.is_tiled}, "
                                   f"{page.samplesperpixel} x {page.dtype}")
        self.shape = (page.imagelength, page.imagewidth)
        self._cached: tuple[int, np.ndarray] | None = None

    def _tile_row(self, ty: int) -> np.ndarray:
        if self._cached is not None and self._cached[0] == ty:
            return self._cached[1]
        page, (h, w) = self._page, self.shape
        th, tw = page.tilelength, page.tilewidth
        across = -(-w // tw)
        row = np.zeros((th, across * tw), np.uint8)
        fh = self._tif.filehandle
        for tx in range(across):
            index = ty * across + tx
            offset, count = page.dataoffsets[index], page.databytecounts[index]
            if count:
                fh.seek(offset)
                decoded, _, _ = page.decode(fh.read(count), index)
                row[:, tx * tw:(tx + 1) * tw] = np.asarray(decoded).reshape(th, tw)
        self._cached = (ty, row[:min(th, h - ty * th), :w])
        return self._cached[1]

    def __getitem__(self, rows: slice) -> np.ndarray:
        y0, y1, _ = rows.indices(self.shape[0])
        th = self._page.tilelength
        parts = [self._tile_row(ty)[max(y0 - ty * th, 0):y1 - ty * th] for ty in range(y0 // th, -(-y1 // th))]
        return np.concatenate(parts) if parts else np.zeros((0, self.shape[1]), np.uint8)

    def close(self) -> None:
        self._tif.close()


class _Truth:
    """Ground truth of one slide: ``labels`` (row bands ``labels[y0:y1]`` in the model's ids, and ``shape``), its
    downsample (level-0 px per truth px), and where it came from."""

    def __init__(self, labels: Any, downsample: float, key: str, path: str) -> None:
        self.labels, self.shape, self.downsample, self.key, self.path = labels, labels.shape, downsample, key, path


class _PolygonRows:
    """Row bands of polygon annotations rasterised over the whole slide, made only when asked for."""

    def __init__(self, annotations: list, shape: tuple[int, int], downsample: float, label_of: Any) -> None:
        self.annotations, self.shape, self.downsample, self.label_of = annotations, shape, downsample, label_of

    def __getitem__(self, rows: slice) -> np.ndarray:
        from pathbundles.annotations import rasterize

        y0, y1, _ = rows.indices(self.shape[0])
        return rasterize(self.annotations, (y1 - y0, self.shape[1]), self.downsample, label_of=self.label_of,
                         origin_xy=(0.0, y0 * self.downsample))


def _truth_of(item: dict, keys: Sequence[str], classes: Mapping[int, str], level0_size: tuple[int, int],
              level0_mpp: float, truth_mpp: float) -> _Truth | None:
    """The first of ``keys`` the item has, as a :class:`_Truth`; label ids mapped to ``classes`` by name."""
    from pathbundles.annotations import read_annotations
    from pathbundles.tissue import LevelMask

    by_name = {canonical_class_name(v): k for k, v in classes.items()}
    item_classes = {int(k): str(v) for k, v in (item.get("classes") or {}).items()}
    for key in keys:
        path = item.get(key)
        if not path:
            continue
        if key == "annotation":
            annotations = read_annotations(path)
            for a in annotations:
                if a.kind == "polygon" and not a.is_exclusion \
                        and canonical_class_name(a.label or a.group) not in by_name:
                    raise InputError(path, f"annotation {a.name!r} has class {a.label or a.group!r}, which is not one "
                                           f"of the model's classes {list(classes.values())}")

            downsample = truth_mpp / level0_mpp
            shape = (math.ceil(level0_size[1] / downsample), math.ceil(level0_size[0] / downsample))
            rows = _PolygonRows(annotations, shape, downsample,
                                lambda a: by_name[canonical_class_name(a.label or a.group)])
            return _Truth(rows, downsample, key, str(path))
        mask = LevelMask.load_mask(path, level0_size, level0_mpp)
        lut = np.zeros(256, np.uint8)
        if item_classes:
            for truth_id, name in item_classes.items():
                class_id = by_name.get(canonical_class_name(name))
                if class_id is None:
                    raise InputError(path, f"class {name!r} (label {truth_id}) of the datalist item is not one of the "
                                           f"model's classes {list(classes.values())}")
                lut[truth_id] = class_id
        else:
            lut[1:len(classes) + 1] = np.arange(1, len(classes) + 1)
        values = np.unique(mask.mask)
        unknown = [int(v) for v in values if v != 0 and (v > 255 or lut[int(v)] == 0)]
        if unknown:
            raise InputError(path, f"label values {unknown} have no class (classes: "
                                   f"{item_classes or dict(classes)}); expected 0 = unannotated or a class id")
        return _Truth(lut[mask.mask.astype(np.int64)], mask.downsample, key, str(path))
    return None


def _slide_confusion(pred: Any, pred_level0_px: float, truth: _Truth, num_classes: int) -> np.ndarray:
    """Confusion matrix (C + 1, C + 1) [truth, prediction] of one slide, the prediction sampled (nearest) at the
    centre of every truth pixel, band by band; truth pixels whose centre lies outside the prediction map count as
    not predicted (0).

    Args:
        pred: the label map, sliceable by row bands (``pred[y0:y1]``), with ``shape``.
        pred_level0_px: level-0 pixels per prediction pixel.
        truth: the ground truth and its downsample.
        num_classes: C.
    """
    height, width = truth.shape
    ratio = truth.downsample / pred_level0_px  # prediction pixels per truth pixel
    pred_rows = np.floor((np.arange(height) + 0.5) * ratio).astype(np.int64)
    pred_cols = np.floor((np.arange(width) + 0.5) * ratio).astype(np.int64)
    col_inside = pred_cols < pred.shape[1]
    band = max(1, int(_BAND_PIXELS / max(1, pred.shape[1]) / max(1.0, ratio)))
    total = np.zeros((num_classes + 1, num_classes + 1), np.int64)
    for y0 in range(0, height, band):
        y1 = min(height, y0 + band)
        rows = pred_rows[y0:y1]
        sampled = np.zeros((y1 - y0, width), np.uint8)
        inside = rows < pred.shape[0]
        if inside.any():
            lo, hi = int(rows[inside].min()), int(rows[inside].max()) + 1
            sampled[np.ix_(inside, col_inside)] = pred[lo:hi][np.ix_(rows[inside] - lo, pred_cols[col_inside])]
        total += confusion_matrix(truth.labels[y0:y1], sampled, num_classes)
    return total


def _fmt3(value: float) -> str:
    return "" if np.isnan(value) else f"{value:.3f}"


def write_table_i(output_dir: str | os.PathLike, scores: Mapping[str, SegmentationScores],
                  classes: Mapping[Any, str], class_order: Sequence[str] | None = None,
                  caption: str = "Intersection-Over-Union (IOU), Recall, and Precision") -> tuple[Path, Path]:
    """Write ``table_i.md`` and ``table_i.csv`` in the layout of the paper's Table I.

    Rows: for each class in ``class_order``, IOU, Recall and Precision; then "Mean" (the mean of the defined values
    of the classes shown). One column per model, values with three decimals; a value that is undefined (a class
    absent from truth and prediction) is empty in the CSV and "n/a" in Markdown. Several models give the paper's
    full comparison (DSMN-S2, DMMN-MS, DMMN-M2S, DMMN-M3).

    Args:
        output_dir: folder for the two files.
        scores: {model name: scores over the test set}.
        classes: {id: name}, ids as in the scores (class i + 1 at index i).
        class_order: class names in row order; default: id order.
        caption: the Markdown table's caption.
    """
    classes = _check_classes(classes)
    by_name = {canonical_class_name(v): k for k, v in classes.items()}
    order = list(class_order) if class_order is not None else list(classes.values())
    missing = [c for c in order if canonical_class_name(c) not in by_name]
    if missing:
        raise ValueError(f"class_order {missing} are not among the classes {list(classes.values())}")
    index = [by_name[canonical_class_name(c)] - 1 for c in order]
    metrics = (("IOU", "iou"), ("Recall", "recall"), ("Precision", "precision"))
    rows: list[tuple[str, str, list[float]]] = []
    for i in index:
        for label, attr in metrics:
            rows.append((classes[i + 1].title(), label, [float(getattr(s, attr)[i]) for s in scores.values()]))
    for label, attr in metrics:
        means = []
        for s in scores.values():
            values = np.asarray(getattr(s, attr))[index]
            values = values[~np.isnan(values)]
            means.append(float(values.mean()) if values.size else float("nan"))
        rows.append(("Mean", label, means))
    directory = Path(output_dir)
    csv_path, md_path = directory / "table_i.csv", directory / "table_i.md"
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "metric", *scores])
        for class_name, label, values in rows:
            writer.writerow([class_name, label, *(_fmt3(v) for v in values)])
    lines = [f"**TABLE I** {caption}", "", "| Class | Metric | " + " | ".join(scores) + " |",
             "|---|---|" + "---:|" * len(scores)]
    previous = None
    for class_name, label, values in rows:
        shown = class_name if class_name != previous else ""  # the paper names a class once, on its IOU row
        previous = class_name
        lines.append(f"| {shown} | {label} | " + " | ".join(_fmt3(v) or "n/a" for v in values) + " |")
    with atomic_path(md_path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return md_path, csv_path


class _SegmentationResult:
    """What :func:`pathbundles.metrics.handlers.write_report` needs of a reported metric: details and the plot."""

    plot_kind = "confusion"

    def __init__(self, scores: SegmentationScores, classes: Mapping[int, str], slides: Mapping[str, dict]) -> None:
        self.scores, self.classes, self.slides = scores, classes, slides

    def details(self) -> dict:
        def by_name(values: np.ndarray) -> dict:
            return {self.classes[i + 1]: (None if np.isnan(v) else float(v)) for i, v in enumerate(values)}

        mean = self.scores.mean_iou
        return {"classes": {str(k): v for k, v in self.classes.items()}, "iou": by_name(self.scores.iou),
                "recall": by_name(self.scores.recall), "precision": by_name(self.scores.precision),
                "mean_iou": None if np.isnan(mean) else mean, "annotated_pixels": int(self.scores.confusion.sum()),
                "confusion": self.scores.confusion.tolist(), "truth": self.slides}

    def plot(self, path: Path) -> Path:
        from pathbundles.metrics.plots import plot_confusion_matrix

        return plot_confusion_matrix(self.scores.confusion, path, ["not predicted", *self.classes.values()])


class SegmentationMetricsReport:
    """Ignite handler: after the :class:`SlideLabelWriter` has finished every slide (EPOCH_COMPLETED), compare each
    written label map with the slide's ground truth and report IoU, recall and precision over annotated pixels.

    Ground truth is the first of ``truth_keys`` the datalist item has: "labels" / "partial_labels" (a label image
    over the whole slide at any downsample, inferred from its size; its ids are the item's ``classes`` {id: name}
    when given, else the model's) or "annotation" (polygons rasterised at ``truth_mpp``, class = the annotation's
    classification name). Class names are matched by :func:`canonical_class_name`. The prediction is sampled at
    the centre of every truth pixel (nearest); pixels the writer did not predict (0) count as misses where the
    truth is annotated (:mod:`pathbundles.metrics.segmentation`). Confusion matrices are summed over slides.

    Writes into ``output_dir``: ``metrics.json`` (:func:`~pathbundles.metrics.handlers.write_report`: scalars and
    per-class details), ``confusion.png`` (with ``plot``), ``confusion.csv`` (pixel counts [truth, prediction]),
    ``table_i.md`` / ``table_i.csv`` (:func:`write_table_i`, one column named ``model_name``) and
    ``slide_metrics.csv`` (per slide: truth used, annotated pixels, IoU per class, mean IoU). The scalars
    ``mean_iou``, ``mean_recall``, ``mean_precision`` and ``iou_<class>`` (e.g. ``iou_benign_epithelium``) go into
    ``engine.state.metrics``, where MONAI's MLflow handler logs them.

    Args:
        writer: the run's :class:`SlideLabelWriter`.
        datalist: the items the run segmented (``image`` or ``name`` identify the slide).
        output_dir: folder for the report.
        truth_keys: datalist keys tried in order.
        truth_mpp: resolution at which polygon annotations are rasterised (um/px).
        class_order: class names in Table I row order; default: the writer's id order.
        model_name: the Table I column name (e.g. "DMMN-M3").
        plot: draw ``confusion.png``.
    """

    def __init__(self, writer: SlideLabelWriter, datalist: Sequence[dict], output_dir: str | os.PathLike,
                 truth_keys: Sequence[str] = ("labels", "partial_labels", "annotation"), truth_mpp: float = 2.0,
                 class_order: Sequence[str] | None = None, model_name: str = "DMMN-M3", plot: bool = True) -> None:
        self.writer, self.datalist, self.output_dir = writer, list(datalist), Path(output_dir)
        self.truth_keys, self.truth_mpp, self.plot = tuple(truth_keys), float(truth_mpp), flag(plot, "plot")
        self.class_order, self.model_name = class_order, model_name
        self.scores: SegmentationScores | None = None
        self.slide_scores: dict[str, SegmentationScores] = {}
        self.report: dict | None = None

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Any = None) -> dict:
        from pathbundles.metrics.handlers import write_report
        from pathbundles.outputs import slide_name

        classes = self.writer.classes
        num_classes = len(classes)
        items = {slide_name(item)[0]: item for item in self.datalist}
        total = np.zeros((num_classes + 1, num_classes + 1), np.int64)
        truth_used: dict[str, dict] = {}
        self.slide_scores = {}
        for entry in self.writer.dataset.slides:
            if entry.name not in self.writer.areas:
                continue  # failed slides are reported by the writer
            item = items.get(entry.name, {})
            truth = _truth_of(item, self.truth_keys, classes, entry.level0_size, entry.level0_mpp, self.truth_mpp)
            if truth is None:
                logger.warning("slide %s has none of %s: not evaluated", entry.name, self.truth_keys)
                continue
            pred = _LabelTiffRows(self.writer.outputs(entry.name)["labels"])
            try:
                confusion = _slide_confusion(pred, self.writer.map_mpp / entry.level0_mpp, truth, num_classes)
            finally:
                pred.close()
            total += confusion
            self.slide_scores[entry.name] = SegmentationScores(confusion)
            truth_used[entry.name] = {"key": truth.key, "path": truth.path}
        self.scores = SegmentationScores(total)
        scalars = {"mean_iou": self.scores.mean_iou}
        for attr in ("recall", "precision"):
            values = getattr(self.scores, attr)
            scalars[f"mean_{attr}"] = float(np.nanmean(values)) if (~np.isnan(values)).any() else float("nan")
        scalars.update({f"iou_{_slug(name)}": float(v)
                        for name, v in zip(classes.values(), self.scores.iou, strict=True)})
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.report = write_report(self.output_dir, scalars,
                                   {"segmentation": _SegmentationResult(self.scores, classes, truth_used)}, self.plot,
                                   weights=self.writer.weights_record())
        self._write_confusion(classes)
        self._write_slide_metrics(classes, truth_used)
        write_table_i(self.output_dir, {self.model_name: self.scores}, classes, self.class_order)
        if engine is not None:
            engine.state.metrics.update(scalars)
        logger.info("mean IoU %.4f over %d slide(s) -> %s", scalars["mean_iou"], len(self.slide_scores),
                    self.output_dir / "metrics.json")
        return self.report

    def _write_confusion(self, classes: Mapping[int, str]) -> None:
        with atomic_path(self.output_dir / "confusion.csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["truth \\ prediction", "not predicted", *classes.values()])
            for k, name in classes.items():
                writer.writerow([name, *self.scores.confusion[k].tolist()])

    def _write_slide_metrics(self, classes: Mapping[int, str], truth_used: Mapping[str, dict]) -> None:
        with atomic_path(self.output_dir / "slide_metrics.csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["name", "truth", "annotated_pixels", *(f"iou_{_slug(c)}" for c in classes.values()),
                             "mean_iou"])
            for name, scores in self.slide_scores.items():
                writer.writerow([name, truth_used[name]["key"], int(scores.confusion.sum()),
                                 *(_fmt3(v) for v in scores.iou), _fmt3(scores.mean_iou)])
