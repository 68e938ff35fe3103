"""Annotation files (ASAP XML, NCRF JSON, QuPath GeoJSON, point CSVs) and rasterising polygons into label masks.

Every coordinate here is a level-0 pixel position (x, y) as float64, except where an argument named ``order`` says
a CSV stores (row, col). Formats are told apart by content (``<`` for XML, JSON keys for NCRF vs GeoJSON), so a
``.json`` that is really GeoJSON, or an ``.xml`` without its extension, still reads.
"""

from __future__ import annotations

import json
import math
import os
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from xml.parsers import expat

import numpy as np

from pathbundles.atomic import atomic_path
from pathbundles.checks import choice
from pathbundles.errors import AnnotationError

#: ASAP/Camelyon16 group holding exclusion regions: non-tumour areas drawn inside a tumour polygon.
EXCLUSION_GROUPS = ("_2",)

# Class names given to the Camelyon16 groups ("_0"/"_1"/"Tumor" are tumour); the group keeps its own name.
_CAMELYON_LABELS = {"_0": "Tumor", "_1": "Tumor", "Tumor": "Tumor", "_2": "Exclusion"}
# ASAP annotation types and the kind each one becomes; a spline is kept as the polygon through its control points.
_ASAP_KINDS = {"Polygon": "polygon", "Spline": "polygon", "Rectangle": "polygon", "Dot": "point", "PointSet": "point"}
# Colours ASAP shows for the groups it writes (tumour yellow as in Camelyon16, exclusion green, others blue).
_ASAP_COLOURS = {"_0": "#F4FA58", "_1": "#F4FA58", "Tumor": "#F4FA58", "_2": "#64FE2E"}
# Namespace of the name-based UUIDs of :func:`feature_id` (fixed: the same feature gets the same id in every run).
_FEATURE_NAMESPACE = uuid.UUID("be7f3805-bb0a-4c67-bb5d-324857cfa6f1")

Kind = Literal["polygon", "point"]
PointOrder = Literal["xy", "rc"]


@dataclass(eq=False)
class Annotation:
    """One annotated region or point set.

    Args:
        name: the annotation's name in its file ("_0", "Annotation 3", a QuPath name; may be "").
        group: the ASAP ``PartOfGroup`` ("_0", "_1", "Tumor", "_2" = exclusion, ...). For GeoJSON without a
            stored group it is the classification name.
        kind: "polygon" (``xy`` is the exterior ring, not closed: the first vertex is not repeated) or
            "point" (``xy`` is one or more points).
        label: class name ("Tumor", "Exclusion", a QuPath classification; "" when the file gives none).
        xy: float64 (N, 2) level-0 pixel (x, y) positions.
        holes: interior rings of a polygon (GeoJSON holes), each float64 (M, 2) level-0 (x, y), not closed.

    Raises:
        ValueError: coordinates that are not finite (N, 2) numbers, a polygon or hole with fewer than 3 distinct
            vertices, an unknown kind, or holes on a point annotation. Readers turn this into an
            :class:`~pathbundles.errors.AnnotationError` that names the file.
    """

    name: str
    group: str
    kind: Kind
    label: str
    xy: np.ndarray
    holes: tuple[np.ndarray, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("polygon", "point"):
            raise ValueError(f"kind must be 'polygon' or 'point', not {self.kind!r}")
        self.xy = _ring(self.xy, self.kind, "vertices" if self.kind == "polygon" else "points")
        if self.holes and self.kind != "polygon":
            raise ValueError("only polygons can have holes")
        self.holes = tuple(_ring(h, "polygon", f"vertices in hole {k}") for k, h in enumerate(self.holes))

    @property
    def is_exclusion(self) -> bool:
        """True for the Camelyon16/ASAP exclusion group ("_2"): a non-tumour region inside a tumour polygon."""
        return self.group in EXCLUSION_GROUPS

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Annotation):
            return NotImplemented
        return ((self.name, self.group, self.kind, self.label) == (other.name, other.group, other.kind, other.label)
                and np.array_equal(self.xy, other.xy) and len(self.holes) == len(other.holes)
                and all(np.array_equal(a, b) for a, b in zip(self.holes, other.holes)))


def _ring(coords: Any, kind: str, what: str) -> np.ndarray:
    """Validate coordinates as float64 (N, 2); for polygons drop a repeated closing vertex and require 3 vertices."""
    try:
        xy = np.asarray(coords, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} are not numbers ({err})") from None
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"{what} must be an (N, 2) array of (x, y), got shape {xy.shape}")
    if not np.isfinite(xy).all():
        raise ValueError(f"{what} contain NaN or infinity")
    if kind == "polygon":
        if len(xy) > 1 and np.array_equal(xy[0], xy[-1]):
            xy = xy[:-1]  # GeoJSON rings and some ASAP files repeat the first vertex
        if len(xy) < 3:
            raise ValueError(f"a polygon needs at least 3 {what}, got {len(xy)}")
    elif len(xy) == 0:
        raise ValueError(f"a point annotation needs at least 1 point, got 0 {what}")
    return np.ascontiguousarray(xy)


def _make(path: str | os.PathLike, where: str, line: int | None, **fields: Any) -> Annotation:
    """Build an Annotation read from a file, turning a validation error into an AnnotationError naming the file and
    annotation; a polygon ring that crosses itself is refused (no repair: shapely is not a dependency, and guessing
    which lobe the annotator meant would change the area silently)."""
    try:
        annotation = Annotation(**fields)
    except ValueError as err:
        raise AnnotationError(path, f"{where}: {err}", line) from None
    if annotation.kind == "polygon":
        for k, ring in enumerate((annotation.xy, *annotation.holes)):
            crossing = ring_crossing(ring)
            if crossing is not None:
                (a, b), (c, d) = crossing
                which = "the polygon" if k == 0 else f"hole {k - 1}"
                raise AnnotationError(path, f"{where}: {which} crosses itself: edge ({_fmt(a[0])}, {_fmt(a[1])})-"
                                            f"({_fmt(b[0])}, {_fmt(b[1])}) meets edge ({_fmt(c[0])}, {_fmt(c[1])})-"
                                            f"({_fmt(d[0])}, {_fmt(d[1])}); redraw it as a simple polygon (or "
                                            "several)", line)
    return annotation


def ring_crossing(ring: np.ndarray, max_pairs: int = 1 << 20) -> tuple[tuple, tuple] | None:
    """Two non-adjacent edges of a closed ring that cross (one passes through the other, or they share a stretch),
    or None. Touching at a point is allowed: real Camelyon16 rings visit a vertex twice (Tumor_001 '_1' does), and
    the even-odd fill of :func:`rasterize` gives such a ring its drawn area.

    Edges are swept in order of their smallest x; only pairs whose bounding boxes overlap are tested, in blocks of
    at most ``max_pairs`` pairs, so a ring of thousands of vertices costs milliseconds. Repeated consecutive vertices
    are ignored.

    Args:
        ring: (N, 2) level-0 (x, y) vertices, not closed.

    Returns:
        ``((a, b), (c, d))``, the end points (x, y) of the two edges, or None.
    """
    ring = np.asarray(ring, dtype=np.float64)
    ring = ring[np.any(ring != np.roll(ring, 1, axis=0), axis=1)]
    n = len(ring)
    if n < 4:
        return None
    start, end = ring, np.roll(ring, -1, axis=0)
    lo, hi = np.minimum(start, end), np.maximum(start, end)
    order = np.argsort(lo[:, 0], kind="stable")
    # Sorted position p overlaps in x the later positions p + 1 .. stop[p] - 1.
    stop = np.searchsorted(lo[order, 0], hi[order, 0], side="right")
    counts = np.maximum(stop - np.arange(n) - 1, 0)
    first = 0
    while first < n:
        last = first + max(1, int(np.searchsorted(np.cumsum(counts[first:]), max_pairs, side="right")))
        block = counts[first:last]
        p = np.repeat(np.arange(first, last), block)
        q = p + 1 + np.arange(len(p)) - np.repeat(np.cumsum(block) - block, block)
        i, j = order[p], order[q]
        gap = np.abs(i - j)
        near = (lo[i, 1] <= hi[j, 1]) & (lo[j, 1] <= hi[i, 1]) & (gap != 1) & (gap != n - 1)
        i, j = i[near], j[near]
        hit = _segments_meet(start[i], end[i], start[j], end[j])
        if hit.any():
            k = int(np.flatnonzero(hit)[0])
            return ((tuple(start[i[k]]), tuple(end[i[k]])), (tuple(start[j[k]]), tuple(end[j[k]])))
        first = last
    return None


def _segments_meet(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Whether segments a-b and c-d (arrays of (x, y), one row per pair) cross: their interiors meet at one point
    on both sides, or they share a stretch of positive length. Touching at a point is not crossing."""
    def orient(p: np.ndarray, q: np.ndarray, r: np.ndarray) -> np.ndarray:
        return np.sign((q[:, 0] - p[:, 0]) * (r[:, 1] - p[:, 1]) - (q[:, 1] - p[:, 1]) * (r[:, 0] - p[:, 0]))

    o1, o2, o3, o4 = orient(a, b, c), orient(a, b, d), orient(c, d, a), orient(c, d, b)
    proper = (o1 * o2 < 0) & (o3 * o4 < 0)
    # Collinear: compare the two spans along the axis on which a-b is longer.
    axis = (np.abs(b[:, 1] - a[:, 1]) > np.abs(b[:, 0] - a[:, 0])).astype(np.int64)
    rows = np.arange(len(a))
    ab_lo, ab_hi = np.minimum(a, b)[rows, axis], np.maximum(a, b)[rows, axis]
    cd_lo, cd_hi = np.minimum(c, d)[rows, axis], np.maximum(c, d)[rows, axis]
    shared = (o1 == 0) & (o2 == 0) & (np.maximum(ab_lo, cd_lo) < np.minimum(ab_hi, cd_hi))
    return proper | shared


def _number(path: str | os.PathLike, text: Any, what: str, line: int | None) -> float:
    """Parse one coordinate; a decimal comma (ASAP files saved under some European locales) is accepted."""
    try:
        if isinstance(text, str):
            text = text.strip()
            if "," in text and "." not in text:
                text = text.replace(",", ".")
        elif isinstance(text, bool) or not isinstance(text, (int, float)):
            raise ValueError
        value = float(text)
    except (TypeError, ValueError):
        raise AnnotationError(path, f"{what}: non-numeric coordinate {text!r}", line) from None
    if not math.isfinite(value):
        raise AnnotationError(path, f"{what}: coordinate {text!r} is not finite", line)
    return value


# ---------------------------------------------------------------------------------------------------- reading


def read_annotations(path: str | os.PathLike) -> list[Annotation]:
    """Read an ASAP/Camelyon16 XML, NCRF JSON or (QuPath) GeoJSON annotation file.

    The format is found from the content. ASAP groups ``_0``, ``_1`` and ``Tumor`` get the label "Tumor" and ``_2``
    the label "Exclusion" (see :attr:`Annotation.is_exclusion`); other groups are their own label. NCRF ``positive``
    regions become group "Tumor" and ``negative`` ones group "_2". A GeoJSON MultiPolygon becomes one annotation
    per polygon (same name), a MultiPoint one point annotation with several points.

    Args:
        path: the annotation file.

    Returns:
        The annotations in file order, coordinates in level-0 pixels (x, y).

    Raises:
        AnnotationError: unreadable or malformed file, naming the file, the annotation and (XML, JSON) the line.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise AnnotationError(path, f"cannot read the file ({err.strerror or err})") from None
    head = data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if head == b"<":
        return _read_asap(path, data)
    if head in (b"{", b"["):
        try:
            doc = json.loads(data.decode("utf-8-sig"))
        except UnicodeDecodeError as err:
            raise AnnotationError(path, f"not UTF-8 text ({err.reason})") from None
        except json.JSONDecodeError as err:
            raise AnnotationError(path, f"malformed JSON: {err.msg} (column {err.colno})", err.lineno) from None
        except RecursionError:
            raise AnnotationError(path, "malformed JSON: nested too deeply") from None
        if isinstance(doc, dict) and ("positive" in doc or "negative" in doc):
            return _read_ncrf(path, doc)
        return _read_geojson(path, doc)
    if not head:
        raise AnnotationError(path, "empty file; expected ASAP XML, NCRF JSON or GeoJSON")
    raise AnnotationError(path, "unknown annotation format; expected ASAP XML, NCRF JSON or GeoJSON")


def _read_asap(path: str | os.PathLike, data: bytes) -> list[Annotation]:
    """Parse ASAP XML with expat directly: ElementTree keeps no line numbers, and error messages need them."""
    parser = expat.ParserCreate()
    annotations: list[Annotation] = []
    stack: list[str] = []
    current: dict[str, Any] = {}

    def start(tag: str, attrs: dict[str, str]) -> None:
        line = parser.CurrentLineNumber
        if not stack and tag != "ASAP_Annotations":
            raise AnnotationError(path, f"root element is <{tag}>, expected <ASAP_Annotations>", line)
        if tag == "Annotation" and stack[-1:] == ["Annotations"]:
            name = attrs.get("Name", "")
            where = f"annotation {name!r}"
            kind = _ASAP_KINDS.get(attrs.get("Type", ""))
            if kind is None:
                raise AnnotationError(path, f"{where}: unsupported Type {attrs.get('Type')!r}, expected one of "
                                            f"{sorted(_ASAP_KINDS)}", line)
            group = attrs.get("PartOfGroup", "None")
            current.update(name=name, group=group, kind=kind, line=line, where=where, coords=[], coordinates=False)
        elif tag == "Coordinates" and current:
            current["coordinates"] = True
        elif tag == "Coordinate" and current:
            where = current["where"]
            if "X" not in attrs or "Y" not in attrs:
                raise AnnotationError(path, f"{where}: <Coordinate> without X or Y", line)
            order = _number(path, attrs.get("Order", len(current["coords"])), where, line)
            current["coords"].append((order, _number(path, attrs["X"], where, line),
                                      _number(path, attrs["Y"], where, line)))
        stack.append(tag)

    def end(tag: str) -> None:
        stack.pop()
        if tag == "Annotation" and current:
            if not current["coordinates"]:
                raise AnnotationError(path, f"{current['where']}: no <Coordinates> element", current["line"])
            # ASAP numbers vertices by Order; files edited by hand do not always list them in that order. Two
            # vertices with one Order have no defined place: sorting would pick one and change the shape silently.
            seen: dict[float, int] = {}
            for k, (order, _, _) in enumerate(current["coords"]):
                if order in seen:
                    raise AnnotationError(path, f"{current['where']}: Order {_fmt(order)} is given to vertex "
                                                f"{seen[order] + 1} and vertex {k + 1}; each vertex needs its own "
                                                "Order", current["line"])
                seen[order] = k
            coords = sorted(current["coords"], key=lambda c: c[0])
            group = current["group"]
            annotations.append(_make(path, current["where"], current["line"], name=current["name"], group=group,
                                     kind=current["kind"], label=_CAMELYON_LABELS.get(group, group),
                                     xy=np.array([c[1:] for c in coords], dtype=np.float64).reshape(-1, 2)))
            current.clear()

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    try:
        parser.Parse(data, True)
    except expat.ExpatError as err:
        raise AnnotationError(path, f"malformed XML: {expat.ErrorString(err.code)} (column {err.offset})",
                              err.lineno) from None
    return annotations


def _read_ncrf(path: str | os.PathLike, doc: dict[str, Any]) -> list[Annotation]:
    annotations = []
    for key, group in (("positive", "Tumor"), ("negative", "_2")):
        regions = doc.get(key, [])
        if not isinstance(regions, list):
            raise AnnotationError(path, f"NCRF JSON: {key!r} must be a list of regions")
        for k, region in enumerate(regions):
            where = f"{key}[{k}]"
            if not isinstance(region, dict) or "vertices" not in region:
                raise AnnotationError(path, f"{where}: expected {{'name': ..., 'vertices': [[x, y], ...]}}")
            name = str(region.get("name", ""))
            where = f"{where} (name {name!r})"
            xy = _coordinate_list(path, region["vertices"], where)
            annotations.append(_make(path, where, None, name=name, group=group, kind="polygon",
                                     label=_CAMELYON_LABELS[group], xy=xy))
    return annotations


def _coordinate_list(path: str | os.PathLike, coords: Any, where: str) -> np.ndarray:
    """A JSON list of [x, y] (or [x, y, z]) positions as float64 (N, 2); anything else is an AnnotationError."""
    if not isinstance(coords, list) or not all(isinstance(c, list) and len(c) >= 2 for c in coords):
        raise AnnotationError(path, f"{where}: coordinates must be a list of [x, y] pairs")
    xy = np.empty((len(coords), 2), dtype=np.float64)
    for k, c in enumerate(coords):
        xy[k] = (_number(path, c[0], where, None), _number(path, c[1], where, None))
    return xy


def _read_geojson(path: str | os.PathLike, doc: Any) -> list[Annotation]:
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        features = doc.get("features")
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        features = [doc]
    elif isinstance(doc, list):
        features = doc  # older QuPath exports write a bare list of features
    else:
        raise AnnotationError(path, "unknown JSON structure: expected a GeoJSON FeatureCollection, Feature or list "
                                    "of Features, or NCRF JSON with 'positive'/'negative'")
    if not isinstance(features, list):
        raise AnnotationError(path, "GeoJSON 'features' must be a list")
    annotations = []
    for k, feature in enumerate(features):
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            raise AnnotationError(path, f"feature {k}: not a GeoJSON Feature")
        props = feature.get("properties") or {}
        if not isinstance(props, dict):
            raise AnnotationError(path, f"feature {k}: 'properties' must be an object, got {type(props).__name__}")
        classification = props.get("classification")
        label = str(classification.get("name", "")) if isinstance(classification, dict) else ""
        name = str(props.get("name", ""))
        group = str(props.get("group", label))
        where = f"feature {k} (name {name!r})"
        geometry = feature.get("geometry")
        if not isinstance(geometry, dict) or "coordinates" not in geometry:
            raise AnnotationError(path, f"{where}: no geometry coordinates")
        gtype, coords = geometry.get("type"), geometry["coordinates"]
        common = dict(name=name, group=group, label=label)
        if gtype in ("Polygon", "MultiPolygon"):
            polygons = [coords] if gtype == "Polygon" else coords
            if not isinstance(polygons, list):
                raise AnnotationError(path, f"{where}: MultiPolygon coordinates must be a list of polygons")
            for rings in polygons:
                if not isinstance(rings, list) or not rings:
                    raise AnnotationError(path, f"{where}: a polygon must be a list of rings [exterior, holes...]")
                exterior, *holes = (_coordinate_list(path, ring, where) for ring in rings)
                annotations.append(_make(path, where, None, kind="polygon", xy=exterior, holes=tuple(holes),
                                         **common))
        elif gtype in ("Point", "MultiPoint"):
            xy = _coordinate_list(path, [coords] if gtype == "Point" else coords, where)
            annotations.append(_make(path, where, None, kind="point", xy=xy, **common))
        else:
            raise AnnotationError(path, f"{where}: unsupported geometry type {gtype!r}, expected Polygon, "
                                        "MultiPolygon, Point or MultiPoint")
    return annotations


# ---------------------------------------------------------------------------------------------------- writing


def _fmt(value: float) -> str:
    """Shortest text that reads back as the same float64 ("71924", "12.5")."""
    return np.format_float_positional(value, trim="-")


def write_geojson(path: str | os.PathLike, annotations: Iterable[Annotation]) -> None:
    """Write annotations as a GeoJSON FeatureCollection that QuPath imports, atomically.

    Each polygon (holes included) becomes a Polygon feature, each point annotation a Point (one point) or MultiPoint;
    ``properties`` hold ``name``, ``classification.name`` (the label) and ``group``, so that
    :func:`read_annotations` gives back equal annotations.

    Args:
        path: output file (``.geojson`` or ``.json``).
        annotations: annotations in level-0 pixels (x, y).
    """
    features = []
    for a in annotations:
        if a.kind == "polygon":
            rings = [a.xy, *a.holes]
            geometry = {"type": "Polygon", "coordinates": [np.vstack([r, r[:1]]).tolist() for r in rings]}
        elif len(a.xy) == 1:
            geometry = {"type": "Point", "coordinates": a.xy[0].tolist()}
        else:
            geometry = {"type": "MultiPoint", "coordinates": a.xy.tolist()}
        properties: dict[str, Any] = {"objectType": "annotation", "name": a.name, "group": a.group}
        if a.label:
            properties["classification"] = {"name": a.label}
        features.append({"type": "Feature", "geometry": geometry, "properties": properties})
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"type": "FeatureCollection", "features": features}), encoding="utf-8")


def feature_id(scope: str, index: int) -> str:
    """A stable GeoJSON feature ``id``: the name-based UUID (version 5) of ``"<scope>/<index>"``.

    The same slide output and feature index give the same id in every run and on every machine, so two runs'
    features can be matched and a QuPath project that imported one keeps its objects' ids; QuPath reads a feature's
    ``id`` as its object UUID, hence a UUID rather than the readable text (which goes into the ``name``).

    Args:
        scope: what the features belong to, e.g. ``"<slide name>/detections"``.
        index: the feature's 0-based position in its file.
    """
    return str(uuid.uuid5(_FEATURE_NAMESPACE, f"{scope}/{int(index)}"))


def _asap_colour(colour: Sequence[int] | str) -> str:
    """``#RRGGBB`` of an (r, g, b) 0..255 colour (a ``#RRGGBB`` string is kept)."""
    if isinstance(colour, str):
        return colour
    r, g, b = (int(c) for c in colour)
    return f"#{r:02X}{g:02X}{b:02X}"


def write_asap_xml(path: str | os.PathLike, annotations: Iterable[Annotation],
                   colours: Mapping[str, Sequence[int] | str] | None = None) -> None:
    """Write annotations as ASAP XML (the Camelyon16 format), atomically, with a ``<Group>`` entry per group.

    Polygons are written as Type "Polygon", single points as "Dot", point sets as "PointSet". ASAP keeps a group per
    annotation but no separate label: reading back gives the label from the group ("_0"/"_1"/"Tumor" -> "Tumor",
    "_2" -> "Exclusion", any other group -> itself).

    Args:
        path: output ``.xml`` file.
        annotations: annotations in level-0 pixels (x, y).
        colours: {group: (r, g, b) 0..255 or "#RRGGBB"} shown by ASAP for the group and its annotations; groups
            not in it get the Camelyon16 colours (tumour yellow, exclusion "_2" green), others blue.

    Raises:
        ValueError: a polygon with holes; ASAP has no holes (write it as an exclusion polygon of group "_2" if it is
            Camelyon-style tumour, or use GeoJSON).
    """
    palette = {**_ASAP_COLOURS, **{g: _asap_colour(c) for g, c in (colours or {}).items()}}
    root = ET.Element("ASAP_Annotations")
    container = ET.SubElement(root, "Annotations")
    groups: dict[str, None] = {}
    for a in annotations:
        if a.holes:
            raise ValueError(f"{path}: annotation {a.name!r} has holes, which ASAP XML cannot store")
        asap_type = "Polygon" if a.kind == "polygon" else ("Dot" if len(a.xy) == 1 else "PointSet")
        element = ET.SubElement(container, "Annotation", Name=a.name, Type=asap_type, PartOfGroup=a.group,
                                Color=palette.get(a.group, "#0000FF"))
        coordinates = ET.SubElement(element, "Coordinates")
        for k, (x, y) in enumerate(a.xy):
            ET.SubElement(coordinates, "Coordinate", Order=str(k), X=_fmt(x), Y=_fmt(y))
        groups.setdefault(a.group)
    group_container = ET.SubElement(root, "AnnotationGroups")
    for group in groups:
        ET.SubElement(ET.SubElement(group_container, "Group", Name=group, PartOfGroup="None",
                                    Color=palette.get(group, "#0000FF")), "Attributes")
    ET.indent(root, space="\t")
    with atomic_path(path) as tmp:
        ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)


# ---------------------------------------------------------------------------------------------------- rasterising


def rasterize(annotations: Iterable[Annotation], shape_hw: tuple[int, int], downsample: float = 1.0, *,
              label_of: Mapping[str, int] | Callable[[Annotation], int] | None = None,
              exclude_groups: Sequence[str] = EXCLUSION_GROUPS,
              origin_xy: tuple[float, float] = (0, 0)) -> np.ndarray:
    """Paint polygon annotations into a uint8 label mask.

    Pixel (r, c) of the mask covers the level-0 square ``[x0 + c*d, x0 + (c+1)*d) x [y0 + r*d, y0 + (r+1)*d)`` with
    ``(x0, y0) = origin_xy`` and ``d = downsample``. A pixel is inside a polygon when its **centre** is inside; a
    centre exactly on an edge counts as inside on a left/top edge and outside on a right/bottom edge, so polygons
    that share an edge never both claim a pixel and the square (10, 10)-(30, 30) at downsample 1 covers exactly
    20 x 20 = 400 pixels. Holes (GeoJSON interior rings) are left unpainted; self-intersecting rings follow the
    even-odd rule.

    Polygons are painted in list order (a later one wins where they overlap), then the polygons whose group is in
    ``exclude_groups`` are painted 0 over everything. Point annotations are ignored.

    Args:
        annotations: annotations in level-0 pixels (x, y).
        shape_hw: mask shape (H, W) in mask pixels.
        downsample: level-0 pixels per mask pixel (e.g. 32 for Camelyon16 level 5).
        label_of: None paints every non-excluded polygon 1. A mapping looks up the annotation's group, then its
            label (so ``{"Tumor": 1, "Stroma": 2}`` works for ASAP groups and QuPath classes); a callable gets the
            annotation. Labels must be 0..255; 0 is "unannotated".
        exclude_groups: groups painted 0 last (Camelyon16 "_2": non-tumour regions inside tumour).
        origin_xy: level-0 (x, y) of the mask's top-left corner, for masks of a region rather than a whole slide.

    Returns:
        uint8 (H, W) mask.

    Raises:
        ValueError: ``label_of`` has no entry for an annotation's group or label, or a label outside 0..255.
    """
    height, width = (int(v) for v in shape_hw)
    mask = np.zeros((height, width), dtype=np.uint8)
    excluded = []
    for a in annotations:
        if a.kind != "polygon":
            continue
        if a.group in exclude_groups:
            excluded.append(a)
            continue
        _paint(mask, a, _label(a, label_of), downsample, origin_xy)
    for a in excluded:
        _paint(mask, a, 0, downsample, origin_xy)
    return mask


def _label(a: Annotation, label_of: Mapping[str, int] | Callable[[Annotation], int] | None) -> int:
    if label_of is None:
        value = 1
    elif callable(label_of):
        value = label_of(a)
    elif a.group in label_of:
        value = label_of[a.group]
    elif a.label in label_of:
        value = label_of[a.label]
    else:
        raise ValueError(f"label_of has no entry for annotation {a.name!r} (group {a.group!r}, label {a.label!r}); "
                         f"it has {sorted(label_of)}")
    if not 0 <= int(value) <= 255:
        raise ValueError(f"label {value} for annotation {a.name!r} does not fit a uint8 mask (0..255)")
    return int(value)


def _paint(mask: np.ndarray, a: Annotation, value: int, downsample: float, origin_xy: tuple[float, float]) -> None:
    """Scanline fill of one polygon (exterior and holes together, even-odd) into ``mask``, in place.

    Vertices are moved into "pixel-centre" coordinates, where pixel (r, c) has its centre at (c, r); then each edge
    crosses row r when ``y_min <= r < y_max`` (half-open, so a vertex on a row is counted once) and row r is filled
    for columns ``x_in <= c < x_out`` between successive crossings. The cost grows with the number of edge-row
    crossings, not with the polygon's area times its vertex count.
    """
    height, width = mask.shape
    rings = [(r - np.asarray(origin_xy, dtype=np.float64)) / downsample - 0.5 for r in (a.xy, *a.holes)]
    start = np.concatenate(rings)
    end = np.concatenate([np.roll(r, -1, axis=0) for r in rings])
    # Orient every edge upwards so that an edge shared by two polygons (drawn in opposite directions) gives
    # bit-identical crossings in both, and the half-open rule can hand each pixel to exactly one of them.
    down = start[:, 1] > end[:, 1]
    start[down], end[down] = end[down], start[down]
    y_lo, y_hi = start[:, 1], end[:, 1]
    row_first = np.clip(np.ceil(y_lo), 0, height).astype(np.int64)
    row_stop = np.clip(np.ceil(y_hi), 0, height).astype(np.int64)  # horizontal edges get row_stop == row_first
    counts = row_stop - row_first
    if counts.sum() == 0:
        return
    edge = np.repeat(np.arange(len(start)), counts)
    rows = np.repeat(row_first, counts) + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
    (x0, y0), (x1, y1) = start[edge].T, end[edge].T
    xs = x0 + (rows - y0) * (x1 - x0) / (y1 - y0)
    order = np.lexsort((xs, rows))
    rows, xs = rows[order], xs[order]
    # Every row has an even number of crossings (each ring is closed), so consecutive pairs are spans.
    span_rows = rows[0::2]
    c_in = np.clip(np.ceil(xs[0::2]), 0, width).astype(np.int64)
    c_out = np.clip(np.ceil(xs[1::2]), 0, width).astype(np.int64)
    keep = c_out > c_in
    span_rows, c_in, c_out = span_rows[keep], c_in[keep], c_out[keep]
    if not len(span_rows):
        return
    # Paint through a +1/-1 difference image over the bounding box: one cumulative sum instead of a Python loop.
    r0, r1 = span_rows.min(), span_rows.max() + 1
    c0, c1 = c_in.min(), c_out.max()
    diff = np.zeros((r1 - r0, c1 - c0 + 1), dtype=np.int32)
    np.add.at(diff, (span_rows - r0, c_in - c0), 1)
    np.add.at(diff, (span_rows - r0, c_out - c0), -1)
    inside = np.cumsum(diff, axis=1)[:, :-1] > 0
    mask[r0:r1, c0:c1][inside] = value


# ---------------------------------------------------------------------------------------------------- point CSVs


def read_points_csv(path: str | os.PathLike, order: PointOrder) -> tuple[np.ndarray, np.ndarray | None]:
    """Read point centroids (mitosis ground truth, detections) from a CSV with 2 or 3 columns.

    Columns are separated by commas (or, without commas, by whitespace). The third column, when present, is a score.
    A first line whose fields are all non-numeric is taken as a header; blank lines are skipped.

    Args:
        path: the CSV file.
        order: "xy" when the columns are (x, y), "rc" when they are (row, col) = (y, x), as in AMIDA13/TUPAC16
            ground truth. Required: the two look alike and a silent swap ruins every distance.

    Returns:
        ``(xy, scores)``: float64 (N, 2) level-0 (x, y) whatever the file's order, and float64 (N,) scores or None
        when the file has two columns. An empty file gives a (0, 2) array and None.

    Raises:
        AnnotationError: a non-numeric value, or a row with a different number of columns, naming file and line.
        SettingError: ``order`` is not "xy" or "rc" (a ValueError).
    """
    choice(order, ("xy", "rc"), "order")
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise AnnotationError(path, f"cannot read the CSV ({err})") from None
    rows: list[list[float]] = []
    n_columns = None
    for line_no, line in enumerate(text.splitlines(), start=1):
        fields = [f.strip() for f in (line.split(",") if "," in line else line.split())]
        if not any(fields):
            continue
        values = []
        for f in fields:
            try:
                values.append(float(f))
            except ValueError:
                values.append(None)
        if not rows and n_columns is None and all(v is None for v in values):
            n_columns = len(fields)  # a header names the columns
            continue
        if any(v is None or not math.isfinite(v) for v in values):
            raise AnnotationError(path, f"non-numeric or non-finite value in row {line.strip()!r}", line_no)
        if len(values) not in (2, 3) or (n_columns is not None and len(values) != n_columns):
            expected = n_columns if n_columns is not None else "2 or 3"
            raise AnnotationError(path, f"row {line.strip()!r} has {len(values)} columns, expected {expected}",
                                  line_no)
        n_columns = len(values)
        rows.append(values)
    if not rows:
        return np.zeros((0, 2), dtype=np.float64), None
    table = np.array(rows, dtype=np.float64)
    xy = table[:, :2] if order == "xy" else table[:, 1::-1]
    return np.ascontiguousarray(xy), (table[:, 2].copy() if n_columns == 3 else None)


def write_points_csv(path: str | os.PathLike, xy: np.ndarray, order: PointOrder,
                     scores: np.ndarray | None = None, header: Sequence[str] | None = None) -> None:
    """Write points as a CSV that :func:`read_points_csv` reads back exactly, atomically.

    Args:
        path: output CSV.
        xy: (N, 2) level-0 (x, y) positions.
        order: column order in the file, "xy" or "rc" (row, col), as for :func:`read_points_csv`.
        scores: optional (N,) third column.
        header: column names for a first line (none by default, as the challenges' CSVs); names must not be
            numbers, so that :func:`read_points_csv` takes the line as a header.
    """
    choice(order, ("xy", "rc"), "order")
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    columns = [xy if order == "xy" else xy[:, ::-1]]
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(scores) != len(xy):
            raise ValueError(f"{len(scores)} scores for {len(xy)} points")
        columns.append(scores[:, None])
    table = np.hstack(columns)
    if header is not None and len(header) != table.shape[1]:
        raise ValueError(f"header {list(header)} for {table.shape[1]} columns")
    lines = ([",".join(header)] if header is not None else []) + [",".join(_fmt(v) for v in row) for row in table]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
