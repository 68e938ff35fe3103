"""Annotation reading/writing, rasterising (pixel-centre rule, holes, exclusions, classes) and point CSVs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from pathbundles.annotations import (Annotation, feature_id, rasterize, read_annotations, read_points_csv,
                                     write_asap_xml, write_geojson, write_points_csv)
from pathbundles.errors import AnnotationError


def square(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def shoelace(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def poly(points: list[list[float]], group: str = "_0", label: str = "Tumor", name: str = "a",
         holes: tuple = ()) -> Annotation:
    return Annotation(name=name, group=group, kind="polygon", label=label, xy=np.array(points, float),
                      holes=tuple(np.array(h, float) for h in holes))


# ------------------------------------------------------------------------------------------- real Camelyon16 data


@pytest.fixture(scope="module")
def tumor_001(shared_data: Path) -> list[Annotation]:
    return read_annotations(shared_data / "camelyon16_tumor_001_annotation.json")


def test_ncrf_json_reads_both_tumour_polygons(tumor_001: list[Annotation]) -> None:
    assert [(a.name, a.group, a.label, a.kind, len(a.xy)) for a in tumor_001] == [
        ("_0", "Tumor", "Tumor", "polygon", 855), ("_1", "Tumor", "Tumor", "polygon", 1657)]
    assert not any(a.is_exclusion for a in tumor_001)
    assert tumor_001[0].xy[0].tolist() == [71924.0, 131761.0]


def test_tumor_001_rasterises_at_level5_inside_tissue_with_exact_area(tumor_001: list[Annotation],
                                                                     shared_data: Path) -> None:
    import tifffile

    image = tifffile.imread(shared_data / "camelyon16_tumor_001_level5.tif")
    assert image.shape == (7168, 3072, 3)
    start = time.perf_counter()
    masks = [rasterize([a], image.shape[:2], downsample=32) for a in tumor_001]
    assert time.perf_counter() - start < 1.0  # 855 + 1657 vertices on a 3072 x 7168 mask
    for a, mask in zip(tumor_001, masks):
        raster_area = int(mask.sum()) * 32 ** 2
        assert raster_area == pytest.approx(shoelace(a.xy), rel=0.01)  # measured: 0.05 % and 0.1 %
    union = rasterize(tumor_001, image.shape[:2], downsample=32).astype(bool)
    assert union.sum() == sum(int(m.sum()) for m in masks)  # the two lesions do not overlap
    # Tissue by a plain chroma test on the image: tumour is dense, stained tissue (measured 99.7 %); the same
    # shapes moved 600 level-5 pixels right (into glass) or 1500 down (into fat) are not.
    pixels = image.astype(np.int16)
    coloured = pixels.max(axis=-1) - pixels.min(axis=-1) > 25
    assert coloured[union].mean() > 0.95
    assert coloured[np.roll(union, 600, axis=1)].mean() < 0.05
    assert coloured[np.roll(union, 1500, axis=0)].mean() < 0.05


# ------------------------------------------------------------------------------------------- pixel-centre rule


def test_square_covers_exactly_its_pixels() -> None:
    mask = rasterize([poly(square(10, 10, 30, 30))], (50, 50))
    assert mask.dtype == np.uint8 and mask.sum() == 400
    assert mask[10:30, 10:30].all()
    # downsample 2: level-0 (10..30) = mask (5..15); origin shifts the frame.
    assert rasterize([poly(square(10, 10, 30, 30))], (50, 50), downsample=2).sum() == 100
    shifted = rasterize([poly(square(10, 10, 30, 30))], (50, 50), origin_xy=(10, 10))
    assert shifted[:20, :20].all() and shifted.sum() == 400


def test_triangle_follows_pixel_centre_rule() -> None:
    # Row r has centres x = c + 0.5 inside x + y < 10 for c <= 8 - r: 9 + 8 + ... + 1 = 45 pixels (area 50).
    # Centres on the hypotenuse (c + r = 9) lie on a right edge and are outside.
    mask = rasterize([poly([[0, 0], [10, 0], [0, 10]])], (12, 12))
    assert mask.sum() == 45
    assert mask[0, 8] == 1 and mask[0, 9] == 0 and mask[8, 0] == 1 and mask[9, 0] == 0


def test_polygons_sharing_an_edge_never_share_a_pixel() -> None:
    a = poly([[0, 0], [21, 0], [21, 21]])
    b = poly([[0, 0], [21, 21], [0, 21]])
    for downsample in (1.0, 3.0, 0.7):
        ma = rasterize([a], (40, 40), downsample).astype(bool)
        mb = rasterize([b], (40, 40), downsample).astype(bool)
        whole = rasterize([poly(square(0, 0, 21, 21))], (40, 40), downsample).astype(bool)
        assert not (ma & mb).any()
        assert np.array_equal(ma | mb, whole)


def test_polygon_clipped_at_mask_border() -> None:
    mask = rasterize([poly(square(-5, -5, 5, 5))], (20, 20))
    assert mask.sum() == 25 and mask[:5, :5].all()
    assert rasterize([poly(square(100, 100, 110, 110))], (20, 20)).sum() == 0


def test_hole_exclusion_and_points() -> None:
    ring = poly(square(0, 0, 40, 40), holes=[square(10, 10, 30, 30)])
    assert rasterize([ring], (50, 50)).sum() == 1600 - 400
    tumour, excluded = poly(square(0, 0, 40, 40)), poly(square(10, 10, 30, 30), group="_2", label="Exclusion")
    assert excluded.is_exclusion
    # Exclusions are painted after every tumour polygon, whatever the list order.
    assert rasterize([excluded, tumour], (50, 50)).sum() == 1200
    assert rasterize([excluded, tumour], (50, 50), exclude_groups=()).sum() == 1600
    dot = Annotation("p", "x", "point", "Mitosis", np.array([[5.0, 5.0]]))
    assert rasterize([dot], (50, 50)).sum() == 0


def test_multiclass_label_of() -> None:
    stroma = poly(square(0, 0, 40, 40), group="Stroma", label="Stroma")
    tumour = poly(square(10, 10, 20, 20), group="_0", label="Tumor")
    lymph = poly(square(30, 30, 50, 50), group="", label="Lymphocytes")  # QuPath style: class only
    mask = rasterize([stroma, tumour, lymph], (60, 60), label_of={"Stroma": 2, "_0": 1, "Lymphocytes": 3})
    assert np.bincount(mask.ravel(), minlength=4).tolist() == [3600 - 1600 - 300, 100, 1600 - 100 - 100, 400]
    assert mask[15, 15] == 1 and mask[35, 35] == 3  # later polygons win where they overlap
    by_callable = rasterize([stroma, tumour], (60, 60), label_of=lambda a: 7 if a.label == "Tumor" else 5)
    assert by_callable[15, 15] == 7 and by_callable[5, 5] == 5
    with pytest.raises(ValueError, match="Lymphocytes"):
        rasterize([lymph], (60, 60), label_of={"Stroma": 2})
    with pytest.raises(ValueError, match="0..255"):
        rasterize([stroma], (60, 60), label_of={"Stroma": 300})


# ------------------------------------------------------------------------------------------- formats and round trips


ASAP_XML = """<?xml version="1.0"?>
<ASAP_Annotations>
\t<Annotations>
\t\t<Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="_0" Color="#F4FA58">
\t\t\t<Coordinates>
\t\t\t\t<Coordinate Order="1" X="200" Y="100" />
\t\t\t\t<Coordinate Order="0" X="100,5" Y="100" />
\t\t\t\t<Coordinate Order="2" X="2.0e2" Y="200" />
\t\t\t\t<Coordinate Order="3" X="100,5" Y="100" />
\t\t\t</Coordinates>
\t\t</Annotation>
\t\t<Annotation Name="hole" Type="Spline" PartOfGroup="_2" Color="#64FE2E">
\t\t\t<Coordinates>
\t\t\t\t<Coordinate Order="0" X="150" Y="120" /><Coordinate Order="1" X="160" Y="120" />
\t\t\t\t<Coordinate Order="2" X="160" Y="130" />
\t\t\t</Coordinates>
\t\t</Annotation>
\t\t<Annotation Name="m" Type="Dot" PartOfGroup="Mitosis" Color="#0000FF">
\t\t\t<Coordinates><Coordinate Order="0" X="7" Y="8" /></Coordinates>
\t\t</Annotation>
\t</Annotations>
\t<AnnotationGroups><Group Name="_0" PartOfGroup="None" Color="#FF0000"><Attributes /></Group></AnnotationGroups>
</ASAP_Annotations>
"""


def test_read_asap_xml_orders_vertices_and_marks_exclusion(tmp_path: Path) -> None:
    path = tmp_path / "no_extension"  # detected from the content
    path.write_text(ASAP_XML)
    tumour, hole, dot = read_annotations(path)
    # Sorted by Order, decimal comma accepted, repeated closing vertex dropped.
    assert tumour.xy.tolist() == [[100.5, 100], [200, 100], [200, 200]]
    assert (tumour.name, tumour.group, tumour.label, tumour.is_exclusion) == ("Annotation 0", "_0", "Tumor", False)
    assert (hole.kind, hole.group, hole.label, hole.is_exclusion) == ("polygon", "_2", "Exclusion", True)
    assert (dot.kind, dot.group, dot.label, dot.xy.tolist()) == ("point", "Mitosis", "Mitosis", [[7, 8]])


def _asap_square(orders: list[int]) -> str:
    """One ASAP polygon: the 38 x 38 px square (10, 10)-(48, 48) listed with the given Order values."""
    corners = [(10, 10), (48, 10), (48, 48), (10, 48)]
    rows = "".join(f'\t\t\t\t<Coordinate Order="{o}" X="{x}" Y="{y}" />\n' for o, (x, y) in zip(orders, corners))
    return ('<?xml version="1.0"?>\n<ASAP_Annotations>\n\t<Annotations>\n'
            '\t\t<Annotation Name="square" Type="Polygon" PartOfGroup="_0">\n\t\t\t<Coordinates>\n'
            f'{rows}\t\t\t</Coordinates>\n\t\t</Annotation>\n\t</Annotations>\n</ASAP_Annotations>\n')


def test_asap_vertices_follow_order_and_duplicate_orders_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "square.xml"
    path.write_text(_asap_square([2, 3, 0, 1]))  # listed out of order: the Order values still trace the square
    (square_annotation,) = read_annotations(path)
    assert square_annotation.xy.tolist() == [[48, 48], [10, 48], [10, 10], [48, 10]]
    assert int(rasterize([square_annotation], (64, 64)).sum()) == 38 * 38
    # Order 1 twice: sorting put (48, 48) before (48, 10) and drew a bow tie of half the area (722 px).
    path.write_text(_asap_square([0, 1, 1, 2]))
    expect_error(path, "'square'", "line 4", "Order 1 is given to vertex 2 and vertex 3; each vertex needs its own "
                 "Order")


def test_self_crossing_polygons_are_refused_in_every_format(tmp_path: Path) -> None:
    bow_tie = [[10, 10], [48, 48], [48, 10], [10, 48]]
    path = tmp_path / "bow.xml"
    path.write_text(_asap_square([0, 2, 1, 3]))  # the square's corners in bow-tie order
    expect_error(path, "'square'", "line 4", "the polygon crosses itself: edge (10, 10)-(48, 48) meets edge "
                 "(48, 10)-(10, 48)")
    ncrf = tmp_path / "bow.json"
    ncrf.write_text(json.dumps({"positive": [{"name": "b", "vertices": bow_tie}]}))
    expect_error(ncrf, "positive[0] (name 'b')", "crosses itself")
    geojson = tmp_path / "hole.geojson"
    geojson.write_text(json.dumps({"type": "Feature", "properties": {"name": "h"}, "geometry": {
        "type": "Polygon", "coordinates": [square(0, 0, 100, 100), [[20, 20], [60, 60], [60, 20], [20, 60]]]}}))
    expect_error(geojson, "feature 0 (name 'h')", "hole 0 crosses itself")
    # A ring that folds back over one of its edges crosses itself too; one that touches itself at a vertex (as
    # Camelyon16 Tumor_001 does) does not, and fills as drawn.
    ncrf.write_text(json.dumps({"positive": [{"name": "fold", "vertices": [[0, 0], [40, 0], [40, 10], [30, 0],
                                                                             [20, 0], [20, -10]]}]}))
    expect_error(ncrf, "'fold'", "crosses itself")
    pinch = [[10, 10], [30, 10], [30, 30], [50, 30], [50, 50], [30, 50], [30, 30], [10, 30]]
    ncrf.write_text(json.dumps({"positive": [{"name": "eight", "vertices": pinch}]}))
    (eight,) = read_annotations(ncrf)
    assert int(rasterize([eight], (64, 64)).sum()) == 2 * 20 * 20


def test_asap_xml_round_trip_keeps_groups(tmp_path: Path) -> None:
    annotations = [
        poly([[0.1, 0.2], [1e5 + 0.25, 3.0], [7.0, 1 / 3]], group="_0", label="Tumor", name="Annotation 0"),
        poly(square(1, 1, 2, 2), group="_2", label="Exclusion", name='quote " & <tag>'),
        poly(square(5, 5, 9, 9), group="Stroma", label="Stroma", name=""),
        Annotation("dot", "Mitosis", "point", "Mitosis", np.array([[3.5, 4.5]])),
        Annotation("set", "Mitosis", "point", "Mitosis", np.array([[1.0, 2.0], [3.0, 4.0]])),
    ]
    path = tmp_path / "out.xml"
    write_asap_xml(path, annotations)
    assert read_annotations(path) == annotations
    text = path.read_text()
    for group in ("_0", "_2", "Stroma", "Mitosis"):
        assert f'<Group Name="{group}"' in text
    assert not list(tmp_path.glob(".*partial*"))  # written atomically, nothing left behind
    with pytest.raises(ValueError, match="holes"):
        write_asap_xml(tmp_path / "holes.xml", [poly(square(0, 0, 4, 4), holes=[square(1, 1, 2, 2)])])


def test_asap_xml_colours_per_group(tmp_path: Path) -> None:
    annotations = [poly(square(0, 0, 4, 4), group="carcinoma", label="carcinoma", name="c"),
                   poly(square(1, 1, 2, 2), group="_2", label="Exclusion", name="hole"),
                   Annotation("m", "Mitosis", "point", "Mitosis", np.array([[3.5, 4.5]]))]
    path = tmp_path / "c.xml"
    write_asap_xml(path, annotations, colours={"carcinoma": (255, 0, 0), "Mitosis": "#FFFF00"})
    assert read_annotations(path) == annotations
    text = path.read_text()
    for group, colour in (("carcinoma", "#FF0000"), ("_2", "#64FE2E"), ("Mitosis", "#FFFF00")):
        assert f'PartOfGroup="{group}" Color="{colour}"' in text and f'<Group Name="{group}" PartOfGroup="None" ' \
            f'Color="{colour}"' in text


def test_feature_ids_are_name_based_uuids() -> None:
    import uuid

    assert feature_id("Test_001/detections", 0) == feature_id("Test_001/detections", 0)
    ids = {feature_id(scope, k) for scope in ("Test_001/detections", "Test_002/detections") for k in range(50)}
    assert len(ids) == 100 and all(uuid.UUID(i).version == 5 for i in ids)
    # Fixed: a change of namespace or recipe would give every feature of every earlier output a new id.
    assert feature_id("Test_001/detections", 0) == "815dc920-ea80-58e8-80ea-7de5f5181fe5"


def test_geojson_round_trip_with_holes_points_and_classes(tmp_path: Path) -> None:
    annotations = [
        poly(square(0, 0, 40, 40), group="Tumor", label="Tumor", name="t", holes=[square(10, 10, 20, 20),
                                                                                  square(25, 25, 30, 30)]),
        poly([[0.5, 0.25], [9.125, 1e-3], [3.0, 1 / 7]], group="_2", label="Exclusion", name="e"),
        Annotation("n", "Other", "point", "Mitosis", np.array([[1.5, 2.5]])),
        Annotation("ns", "", "point", "", np.array([[1.0, 2.0], [3.0, 4.0]])),
    ]
    path = tmp_path / "out.geojson"
    write_geojson(path, annotations)
    assert read_annotations(path) == annotations
    assert rasterize(read_annotations(path)[:1], (50, 50)).sum() == 1600 - 100 - 25


def test_real_polygons_round_trip_through_xml_and_geojson(tumor_001: list[Annotation], tmp_path: Path) -> None:
    write_asap_xml(tmp_path / "t.xml", tumor_001)
    write_geojson(tmp_path / "t.json", tumor_001)  # .json: GeoJSON is told from NCRF JSON by content
    assert read_annotations(tmp_path / "t.xml") == tumor_001
    assert read_annotations(tmp_path / "t.json") == tumor_001


def test_qupath_geojson_variants(tmp_path: Path) -> None:
    multipolygon = {"type": "Feature", "id": "x",
                    "geometry": {"type": "MultiPolygon", "coordinates": [
                        [square(0, 0, 10, 10) + [[0, 0]], square(2, 2, 4, 4) + [[2, 2]]],
                        [square(20, 20, 30, 30) + [[20, 20]]]]},
                    "properties": {"objectType": "annotation", "name": "two parts",
                                   "classification": {"name": "Tumor", "color": [200, 0, 0]}}}
    points = {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[1, 2, 0], [3, 4, 0]]},
              "properties": {"classification": {"name": "Mitosis"}}}
    path = tmp_path / "qupath.geojson"
    path.write_text(json.dumps([multipolygon, points]))  # older QuPath: a bare list of features
    first, second, mitoses = read_annotations(path)
    assert (first.name, first.group, first.label, len(first.holes)) == ("two parts", "Tumor", "Tumor", 1)
    assert first.xy.tolist() == square(0, 0, 10, 10)  # closing vertex dropped
    assert second.name == "two parts" and not second.holes
    assert (mitoses.kind, mitoses.label, mitoses.xy.tolist()) == ("point", "Mitosis", [[1, 2], [3, 4]])
    assert rasterize([first, second], (40, 40)).sum() == 100 - 4 + 100
    path.write_text(json.dumps(points))  # a single Feature
    assert len(read_annotations(path)) == 1


# ------------------------------------------------------------------------------------------- malformed input


def expect_error(path: Path, *fragments: str) -> str:
    with pytest.raises(AnnotationError) as info:
        read_annotations(path)
    message = str(info.value)
    assert message.startswith(str(path))
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_malformed_xml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.xml"
    path.write_text(ASAP_XML.replace('<Coordinate Order="2" X="2.0e2" Y="200" />', '<Coordinate Order="2" X="1"'))
    expect_error(path, "malformed XML", "line 9")


def test_two_vertex_polygon_names_annotation_and_line(tmp_path: Path) -> None:
    path = tmp_path / "short.xml"
    path.write_text(ASAP_XML.replace('\t\t\t\t<Coordinate Order="2" X="160" Y="130" />\n', ""))
    expect_error(path, "'hole'", "line 12", "at least 3 vertices, got 2")


def test_non_numeric_coordinate_names_line(tmp_path: Path) -> None:
    path = tmp_path / "nan.xml"
    path.write_text(ASAP_XML.replace('X="200" Y="100"', 'X="2OO" Y="100"'))
    expect_error(path, "'Annotation 0'", "line 6", "non-numeric coordinate '2OO'")
    json_path = tmp_path / "nan.json"
    json_path.write_text(json.dumps({"positive": [{"name": "p", "vertices": [[1, 2], ["a", 3], [4, 5]]}]}))
    expect_error(json_path, "positive[0] (name 'p')", "non-numeric coordinate 'a'")


@pytest.mark.parametrize("content, fragments", [
    (ASAP_XML.replace('<Coordinates><Coordinate Order="0" X="7" Y="8" /></Coordinates>', ""),
     ("'m'", "no <Coordinates>", "line 18")),
    (ASAP_XML.replace('X="7" Y="8"', 'X="7"'), ("without X or Y", "line 19")),
    (ASAP_XML.replace('Type="Dot"', 'Type="Ellipse"'), ("unsupported Type 'Ellipse'",)),
    ("<Annotations></Annotations>", ("expected <ASAP_Annotations>", "line 1")),
    ('{"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0], [1, 1]]}}',
     ("feature 0", "unsupported geometry type 'LineString'")),
    ('{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": null}]}',
     ("feature 0", "no geometry")),
    ('{"rois": []}', ("unknown JSON structure",)),
    ('{"positive": [{"name": "a"}]}', ("positive[0]", "vertices")),
    ('{"positive": [\n{"name": "a",}]}', ("malformed JSON", "line 2")),
    ("", ("empty file",)),
    ("x,y\n1,2\n", ("unknown annotation format",)),
    # These two raised AttributeError and RecursionError (tracebacks) instead of naming the file.
    ('{"type": "Feature", "properties": [1], "geometry": {"type": "Point", "coordinates": [1, 2]}}',
     ("feature 0: 'properties' must be an object, got list",)),
    ("[" * 100_000 + "]" * 100_000, ("malformed JSON: nested too deeply",)),
])
def test_malformed_files(tmp_path: Path, content: str, fragments: tuple[str, ...]) -> None:
    path = tmp_path / "ann.xml"
    path.write_text(content)
    expect_error(path, *fragments)


def test_missing_file(tmp_path: Path) -> None:
    expect_error(tmp_path / "absent.xml", "cannot read")


def test_annotation_validates_programmatic_input() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        poly([[0, 0], [1, 1], [0, 0]])
    with pytest.raises(ValueError, match="NaN"):
        poly([[0, 0], [1, np.nan], [2, 2]])
    with pytest.raises(ValueError, match="holes"):
        Annotation("p", "g", "point", "", np.zeros((1, 2)), holes=(np.zeros((3, 2)),))


# ------------------------------------------------------------------------------------------- point CSVs


def test_points_csv_order_scores_and_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "mitoses.csv"
    path.write_text("10,250\n30.5,40\n\n")  # AMIDA13/TUPAC16 style: (row, col), a trailing blank line
    xy_rc, scores = read_points_csv(path, order="rc")
    xy_xy, _ = read_points_csv(path, order="xy")
    assert xy_rc.tolist() == [[250, 10], [40, 30.5]] and scores is None
    assert np.array_equal(xy_rc, xy_xy[:, ::-1])
    points = np.array([[1.25, 2.0], [1e5 / 3, 7.0]])
    confidence = np.array([0.9, 1 / 3])
    for order in ("xy", "rc"):
        write_points_csv(tmp_path / f"{order}.csv", points, order, scores=confidence)
        back, back_scores = read_points_csv(tmp_path / f"{order}.csv", order)
        assert np.array_equal(back, points) and np.array_equal(back_scores, confidence)
    assert (tmp_path / "rc.csv").read_text().splitlines()[0] == "2,1.25,0.9"
    header = ("x_level0_px", "y_level0_px", "score")
    write_points_csv(tmp_path / "h.csv", points, "xy", scores=confidence, header=header)
    assert (tmp_path / "h.csv").read_text().splitlines()[:2] == ["x_level0_px,y_level0_px,score", "1.25,2,0.9"]
    back, back_scores = read_points_csv(tmp_path / "h.csv", "xy")
    assert np.array_equal(back, points) and np.array_equal(back_scores, confidence)
    with pytest.raises(ValueError, match="header"):
        write_points_csv(tmp_path / "bad.csv", points, "xy", header=header)


def test_points_csv_header_empty_and_whitespace(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("x,y,score\n1,2,0.5\n")
    xy, scores = read_points_csv(path, "xy")
    assert xy.tolist() == [[1, 2]] and scores.tolist() == [0.5]
    path.write_text("")
    xy, scores = read_points_csv(path, "rc")
    assert xy.shape == (0, 2) and xy.dtype == np.float64 and scores is None
    path.write_text("1 2\n3\t4\n")
    assert read_points_csv(path, "xy")[0].tolist() == [[1, 2], [3, 4]]
    with pytest.raises(ValueError, match="order"):
        read_points_csv(path, "yx")  # type: ignore[arg-type]


@pytest.mark.parametrize("content, fragment", [
    ("1,2\n3,4\n5,abc\n", "line 3: non-numeric"),
    ("1,2\n3,4,0.5\n", "line 2: row '3,4,0.5' has 3 columns, expected 2"),
    ("1,2,3,4\n", "line 1: row '1,2,3,4' has 4 columns"),
    ("1,2\nnan,3\n", "line 2: non-numeric or non-finite"),
])
def test_points_csv_bad_lines(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(AnnotationError) as info:
        read_points_csv(path, "rc")
    assert str(info.value).startswith(f"{path}, {fragment}")
