"""A bundle run's results as DICOM objects that a DICOM viewer overlays on the source slide (issue #20).

:func:`export_slide_results` reads what a finished run wrote for one slide in its output folder and writes, under
``<output_dir>/dicom/<name>/``, with highdicom (the ``[deploy]`` extra):

- ``annotations.dcm``: Microscopy Bulk Simple Annotations (:func:`annotations_from_detections`): the detections
  (``detections/<name>.geojson``: scannet, spatial_lstm, segmitos) as POINTs with their probability as a
  per-annotation measurement, and region outlines (``regions/<name>.geojson``: dmmn's carcinoma) as POLYGONs;
- ``labels_<k>.dcm``: the label map (``labels/<name>.tif``: dmmn) as a BINARY Segmentation, one segment per class
  (:func:`segmentation_from_label_map`), one instance per level of the TIFF's pyramid;
- ``probability_<k>.dcm``: the probability map (``maps/<name>.tif``: scannet, spatial_lstm) as a FRACTIONAL
  Segmentation (PROBABILITY, 255 = 1; :func:`segmentation_from_probability_map`), one instance per level;
- ``report.dcm``: a Comprehensive 3D SR holding a TID 1500 Measurement Report (:func:`score_report`): the slide's
  score and counts (``slide_scores.csv`` / ``hpf_counts.csv``), per-class areas (``areas/<name>.json``) and the run's
  scalar metrics (``metrics.json``) when present.

Every object has the source's Study Instance UID (and patient, specimen, accession), references the source
image(s), and, except the 2D annotations whose IOD leaves it out, the source's Frame of Reference UID; new UIDs are
generated (:func:`highdicom.UID`). Manufacturer ``pathbundles``, Manufacturer's Model Name the bundle's name,
Software Versions the bundle's name and version and pathbundles' version, Device Serial Number the start of the
weights' SHA-256; series descriptions name the bundle, its version and say when the run used demo weights.
Groups and segments carry the run's own colours (GeoJSON classifications, the label TIFF's palette) as recommended
display colours. A re-export replaces the slide's objects and removes those an earlier export wrote that this one
did not (a pyramid with more levels).

Coordinates. The run's files give positions in level-0 pixels of the slide with pixel ``i`` spanning
``[i, i + 1)`` (the GeoJSON positions; the Camelyon16 CSV holds ``floor`` of them). DICOM's 2D image coordinates
(Annotation Coordinate Type ``2D``, Pixel Origin Interpretation ``VOLUME``: PS3.3 C.37.1.2, "units of pixels, as
defined in Section C.10.4"; C.10.5.1.2 Graphic Data) put the top left hand corner of the top left pixel of the
Total Pixel Matrix at (0.0, 0.0) and the bottom right corner of that pixel at (1.0, 1.0): the same convention, so
GeoJSON (x, y) go into the annotations unchanged (x = column, y = row), as float64. Maps: the TIFF's pixel (r, c)
at ``level_mpp`` covers level-0 ``[c * s, (c + 1) * s)`` (``s = level_mpp / level-0 mpp``) from the slide's
origin (:mod:`pathbundles.slide_inference`, :mod:`pathbundles.slide_segmentation`). A Segmentation's plane position
is the slide-coordinate position of the *centre* of its top left pixel (Image Position (Slide); highdicom's
:class:`~highdicom.spatial.PixelToReferenceTransformer`), so each level is placed at the source's image coordinate
``(s / 2, s / 2)`` mapped through the source's own origin, orientation and pixel spacing
(:class:`~highdicom.spatial.ImageToReferenceTransformer`), with its own pixel spacing ``level_mpp / 1000`` mm: the
map lies where the bundle's TIFF lies on the slide, at its own resolution, not level 0's.
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

from pathbundles.atomic import atomic_path
from pathbundles.dicom_wsi import VL_WSI_SOP_CLASS
from pathbundles.dicomweb import is_uid
from pathbundles.errors import InputError, SlideError
from pathbundles.outputs import DICOM_SUBFOLDER, inside, output_file

logger = logging.getLogger(__name__)

__all__ = [
    "annotations_from_detections",
    "class_concepts",
    "detection_concepts",
    "DICOM_SUBFOLDER",
    "export_slide_results",
    "level0_mpp",
    "MAX_MAP_PIXELS",
    "score_report",
    "segmentation_from_label_map",
    "segmentation_from_probability_map",
]

MANUFACTURER = "pathbundles"
SEGMENTATION_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
#: Largest map level (pixels) put into a segmentation by :func:`export_slide_results`: 16384 x 16384, e.g. a
#: Camelyon16 slide's label map at 2 um/px; finer levels are left out (DMMN writes 0.5 um/px maps).
MAX_MAP_PIXELS = 1 << 28
#: Private coding scheme of concepts that neither SNOMED CT nor DICOM (in pydicom 3.0's dictionary) has.
LOCAL_SCHEME = "99PATHBUNDLES"
# Series numbers: 9000 + 10 * bundle + object kind, so the series of different bundles on one study do not collide.
_BUNDLE_SERIES = {"scannet": 1, "spatial_lstm": 2, "segmitos": 3, "dmmn": 4}
_KIND_SERIES = {"annotations": 1, "labels": 2, "probability": 3, "report": 4}
# Patient and study attributes (Type 2) that highdicom copies from the source without checking they are there.
_TYPE2_COPIED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                 "StudyDate", "StudyTime", "ReferringPhysicianName")
_PRINTABLE = re.compile(r"[^\x20-\x7e]")


# ---- codes -------------------------------------------------------------------------------------------------------


def _codes() -> Any:
    from pydicom.sr.codedict import codes

    return codes


def _local(value: str, meaning: str) -> Any:
    from pydicom.sr.coding import Code

    return Code(value, LOCAL_SCHEME, meaning)


def detection_concepts(bundle_name: str) -> tuple[Any, Any, str]:
    """(category, type, label) of what a bundle detects.

    scannet, spatial_lstm (Camelyon16 lymph-node metastases): SCT 49755003 "Morphologically Abnormal Structure"
    (CID 7150) / SCT 14799000 "Neoplasm, Secondary" (CID 7151/7159; metastatic tumour). segmitos: SCT 85756007
    "Tissue" / SCT 4421005 "Cell" (CID 8135 Microscopy Annotation Property Types), labelled "mitotic figure": pydicom
    3.0's SNOMED dictionary has no mitotic-figure concept, and codes are not invented here.
    """
    codes = _codes()
    if bundle_name == "segmitos":
        return codes.SCT.Tissue, codes.SCT.Cell, "mitotic figure"
    return codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.NeoplasmSecondary, "metastatic tumour"


def class_concepts(class_name: str) -> tuple[Any, Any]:
    """(category, type) of a tissue class name (DMMN's classes; any other name gets a local code).

    carcinoma: SCT 49755003 / SCT 1187425009 "Carcinoma"; stroma: SCT 85756007 "Tissue" / SCT 21793004 "Connective
    tissue"; necrosis: SCT 49755003 / SCT 6574001 "Necrosis"; adipose: SCT 85756007 / SCT 55603005 "Fat" (adipose
    tissue); background: SCT 260787004 "Physical object" / DCM 125040 "Background"; "benign epithelium" and others:
    SCT 85756007 / a :data:`LOCAL_SCHEME` code (pydicom 3.0 knows no SNOMED concept for breast epithelium).
    """
    codes = _codes()
    known = {"carcinoma": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Carcinoma),
             "stroma": (codes.SCT.Tissue, codes.SCT.ConnectiveTissue),
             "necrosis": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Necrosis),
             "adipose": (codes.SCT.Tissue, codes.SCT.AdiposeTissue),
             "background": (codes.SCT.PhysicalObject, codes.DCM.Background)}
    key = class_name.strip().lower()
    if key in known:
        return known[key]
    slug = re.sub(r"[^a-z0-9]+", "", key)[:16] or "class"  # a Code Value (SH) has at most 16 characters
    return codes.SCT.Tissue, _local(slug, _text(class_name, 64))


# ---- the source --------------------------------------------------------------------------------------------------


def _text(value: Any, limit: int) -> str:
    """``value`` as printable ASCII of at most ``limit`` characters (LO/SH/ST values from run files)."""
    return _PRINTABLE.sub("?", str(value))[:limit]


def _check_uid(ds: Any, keyword: str, where: str) -> str:
    uid = str(ds.get(keyword, "") or "")
    if not is_uid(uid):
        raise SlideError(where, f"{keyword} {uid[:80]!r} is not a valid DICOM UID")
    return uid


def _source_label(ds: Any) -> str:
    return f"DICOM source image {_text(ds.get('SOPInstanceUID', '?'), 64)}"


def _check_sources(source_images: Sequence[Any]) -> list[Any]:
    """The source images, validated: VL Whole Slide Microscopy Images of one study, series and frame of reference,
    each with valid UIDs, a total pixel matrix and a pixel spacing; the one with the largest total pixel matrix
    first (level 0). SlideError naming the instance otherwise."""
    images = list(source_images)
    if not images:
        raise SlideError("DICOM source images", "none given: the results reference their source image")
    images = [_source_with_frame_of_reference(ds) for ds in images]
    for ds in images:
        where = _source_label(ds)
        if str(ds.get("SOPClassUID", "")) != VL_WSI_SOP_CLASS:
            raise SlideError(where, f"SOP Class {ds.get('SOPClassUID')!r} is not VL Whole Slide Microscopy Image "
                                    f"({VL_WSI_SOP_CLASS})")
        for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
            _check_uid(ds, keyword, where)
        if "TotalPixelMatrixColumns" not in ds or "TotalPixelMatrixRows" not in ds:
            raise SlideError(where, "has no Total Pixel Matrix Columns/Rows")
        level0_mpp(ds)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        if len({str(ds.get(keyword)) for ds in images}) > 1:
            raise SlideError(_source_label(images[0]), f"the source images differ in {keyword}: give the level-0 "
                                                       "instances of one series")
    return sorted(images, key=lambda ds: -int(ds.TotalPixelMatrixColumns) * int(ds.TotalPixelMatrixRows))


def _source_with_frame_of_reference(ds: Any) -> Any:
    """``ds``, or a copy with a Frame of Reference UID when it has none (OrthancWSIDicomizer writes none, though the
    VL WSI IOD requires one): derived from its SeriesInstanceUID, so every result of the series, in every run, names
    the same one. Logged as a warning naming the instance."""
    import copy

    from pydicom.uid import generate_uid

    if str(ds.get("FrameOfReferenceUID", "") or ""):
        return ds
    series = _check_uid(ds, "SeriesInstanceUID", _source_label(ds))
    patched = copy.deepcopy(ds)  # a shallow copy of a pydicom Dataset shares its elements
    patched.FrameOfReferenceUID = generate_uid(entropy_srcs=["pathbundles frame of reference", series])
    logger.warning("%s states no Frame of Reference UID (the VL WSI IOD requires one): the results use %s, derived "
                   "from its series", _source_label(ds), patched.FrameOfReferenceUID)
    return patched


def level0_mpp(source: Any) -> tuple[float, float]:
    """(x, y) um per pixel of a VL WSI instance: its Shared Functional Groups' Pixel Measures' Pixel Spacing (mm,
    [between rows, between columns]); SlideError when it has none."""
    try:
        spacing = source.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        row_mm, col_mm = (float(v) for v in spacing)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        raise SlideError(_source_label(source), "has no Pixel Spacing in its Shared Functional Groups' Pixel "
                                                "Measures: the results cannot be placed on it") from None
    if not (math.isfinite(row_mm) and math.isfinite(col_mm) and row_mm > 0 and col_mm > 0):
        raise SlideError(_source_label(source), f"Pixel Spacing {[row_mm, col_mm]} mm is not positive")
    return col_mm * 1000.0, row_mm * 1000.0


def _reference_image(source: Any) -> Any:
    """The image the results reference and copy patient, study and specimen from: a copy of ``source`` naming the
    Concatenation Source when ``source`` is one instance of a Concatenation (PS3.3 C.37.1.2: references are to
    the source), with the Type 2 patient and study attributes that highdicom copies set empty where the source
    lacks them (real files do)."""
    copy = source.copy()
    concatenation_source = source.get("SOPInstanceUIDOfConcatenationSource")
    if concatenation_source:
        copy.SOPInstanceUID = _check_uid(source, "SOPInstanceUIDOfConcatenationSource", _source_label(source))
    for keyword in _TYPE2_COPIED:
        if keyword not in copy:
            setattr(copy, keyword, "")
    return copy


def _placed_source(source: Any) -> Any:
    """``source`` with a Total Pixel Matrix Origin Sequence: a copy with the origin (0, 0) mm and a warning when it
    has none (Type 1, but real files lack it: then the slide's frame of reference is undefined and (0, 0) is the
    only choice that lays the results over the pixels)."""
    if "TotalPixelMatrixOriginSequence" in source and "ImageOrientationSlide" in source:
        return source
    from pydicom.dataset import Dataset

    logger.warning("%s has no Total Pixel Matrix Origin Sequence or Image Orientation (Slide): segmentations are "
                   "placed with the origin at (0, 0) mm and the orientation [0, -1, 0, -1, 0, 0]",
                   _source_label(source))
    copy = source.copy()
    if "TotalPixelMatrixOriginSequence" not in copy:
        origin = Dataset()
        origin.XOffsetInSlideCoordinateSystem = 0.0
        origin.YOffsetInSlideCoordinateSystem = 0.0
        copy.TotalPixelMatrixOriginSequence = [origin]
    if "ImageOrientationSlide" not in copy:
        copy.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    return copy


# ---- equipment, series ---------------------------------------------------------------------------------------------


def _bundle_key(bundle_info: Mapping[str, Any]) -> str:
    return str(bundle_info.get("bundle") or bundle_info.get("name") or "bundle")


def _equipment(bundle_info: Mapping[str, Any]) -> dict[str, Any]:
    """General Equipment of every object: pathbundles, the bundle's name and version, the weights' hash."""
    import pathbundles

    name = _text(bundle_info.get("name") or _bundle_key(bundle_info), 64)
    version = _text(bundle_info.get("version") or "unknown", 40)
    sha = re.sub(r"[^0-9a-f]", "", str(bundle_info.get("weights_sha256") or "").lower())[:16]
    return {"manufacturer": MANUFACTURER, "manufacturer_model_name": name,
            # A list: pydicom warns when highdicom assigns its documented tuple to the LO element.
            "software_versions": [_text(f"{_bundle_key(bundle_info)} {version}", 64),
                                  f"pathbundles {pathbundles.__version__}"],
            "device_serial_number": f"weights-{sha}" if sha else "weights-unknown"}


def _is_demo(bundle_info: Mapping[str, Any]) -> bool:
    demo = bundle_info.get("demo_weights")
    return demo is True or str(demo).strip().lower() in ("true", "1", "yes")


def _series(bundle_info: Mapping[str, Any], kind: str, what: str) -> dict[str, Any]:
    """Series number, description and a new series UID of one kind of object of a bundle."""
    from highdicom import UID

    key = _bundle_key(bundle_info)
    demo = " DEMO WEIGHTS" if _is_demo(bundle_info) else ""
    description = f"{key} {bundle_info.get('version') or ''} {what}".replace("  ", " ")
    return {"series_instance_uid": UID(),
            "series_number": 9000 + 10 * _BUNDLE_SERIES.get(key, 9) + _KIND_SERIES[kind],
            "series_description": _text(description, 64 - len(demo)) + demo}


def _algorithm(bundle_info: Mapping[str, Any]) -> Any:
    import highdicom as hd

    return hd.AlgorithmIdentificationSequence(name=_text(_bundle_key(bundle_info), 64),
                                              family=_codes().DCM.ArtificialIntelligence,
                                              version=_text(bundle_info.get("version") or "unknown", 64),
                                              source=MANUFACTURER)


# ---- annotations ---------------------------------------------------------------------------------------------------


def annotations_from_detections(source_images: Sequence[Any], detections: Any, bundle_info: Mapping[str, Any], *,
                                regions: Mapping[str, Sequence[Any]] | None = None,
                                region_holes: Mapping[str, Sequence[Any]] | None = None,
                                colours: Mapping[str, Sequence[int]] | None = None) -> Any:
    """Microscopy Bulk Simple Annotations of a slide's detections and region outlines.

    Args:
        source_images: the slide's level-0 VL WSI instance(s) (pydicom Datasets, metadata only); the largest is
            referenced.
        detections: (N, 3) [probability, x, y], x and y in level-0 px with pixel ``i`` spanning ``[i, i + 1)``
            (the run's GeoJSON): group 1, POINTs at (x, y) in the Total Pixel Matrix (2D, VOLUME), the probability
            as the measurement DCM 122157 "Probability" (UCUM "1"); N = 0: no such group.
        bundle_info: :func:`pathbundles.bundle_runner.bundle_info` of the run (``bundle``, ``name``, ``version``,
            ``weights_sha256``, ``demo_weights``).
        regions: {class name: [(M, 2) level-0 px outline, ...]}: one POLYGON group per class
            (:func:`class_concepts`), outlines open (first point not repeated).
        region_holes: {class name: [(M, 2) ...]}: the holes of those regions, one further POLYGON group per class
            ("<class> holes"; the annotation IOD has no polygons with holes).
        colours: {"detections" or class name: (r, g, b) 0..255}: the groups' recommended display colours (the
            run's GeoJSON classification colours).

    Returns:
        a :class:`highdicom.ann.MicroscopyBulkSimpleAnnotations`.

    Raises:
        InputError: nothing to annotate (no detections, no regions: the IOD has no empty annotation group), or a
            position outside the source's total pixel matrix.
    """
    import highdicom as hd

    images = _check_sources(source_images)
    source = _reference_image(images[0])
    rows = np.asarray(detections, np.float64).reshape(-1, 3)
    if not np.isfinite(rows).all():
        raise InputError(_source_label(source), "detections hold a value that is not finite")
    _check_inside(rows[:, 1:], source, "detection")
    algorithm = _algorithm(bundle_info)
    category, prop_type, label = detection_concepts(_bundle_key(bundle_info))
    groups = []
    if len(rows):
        measurements = hd.ann.Measurements(name=_codes().DCM.Probability, values=rows[:, 0].copy(),
                                           unit=_codes().UCUM.NoUnits)
        groups.append(hd.ann.AnnotationGroup(
            number=1, uid=hd.UID(), label=_text(label, 64), annotated_property_category=category,
            annotated_property_type=prop_type, graphic_type=hd.ann.GraphicTypeValues.POINT,
            graphic_data=[xy.reshape(1, 2) for xy in rows[:, 1:]], algorithm_type="AUTOMATIC",
            algorithm_identification=algorithm, measurements=[measurements],
            display_color=_display_colour((colours or {}).get("detections")),
            description=_text(f"{label}: {len(rows)} detections, measurement = probability", 64)))
    for holes, source_map in ((False, regions or {}), (True, region_holes or {})):
        for class_name, outlines in source_map.items():
            polygons = [_open_ring(xy, source) for xy in outlines]
            if not polygons:
                continue
            category, prop_type = class_concepts(class_name)
            name = f"{class_name} holes" if holes else f"{class_name} regions"
            groups.append(hd.ann.AnnotationGroup(
                number=len(groups) + 1, uid=hd.UID(), label=_text(name, 64), annotated_property_category=category,
                annotated_property_type=prop_type, graphic_type=hd.ann.GraphicTypeValues.POLYGON,
                graphic_data=polygons, algorithm_type="AUTOMATIC", algorithm_identification=algorithm,
                display_color=_display_colour((colours or {}).get(class_name)),
                description=_text(f"{name}: {len(polygons)} outlines" + (" (areas excluded from the regions)"
                                                                           if holes else ""), 64)))
    if not groups:
        raise InputError(_source_label(source), "no detections and no regions to annotate")
    what = "detections" if len(rows) else "regions"
    series = _series(bundle_info, "annotations", what)
    ann = hd.ann.MicroscopyBulkSimpleAnnotations(
        source_images=[source], annotation_coordinate_type="2D", annotation_groups=groups,
        series_instance_uid=series["series_instance_uid"], series_number=series["series_number"],
        sop_instance_uid=hd.UID(), instance_number=1, content_label=what.upper(),
        content_description=series["series_description"], **_equipment(bundle_info))
    ann.SeriesDescription = series["series_description"]
    # The 2D annotation IOD does not require the Frame of Reference module.
    return _complete(_with_frame_of_reference(ann, source))


def _with_frame_of_reference(dataset: Any, source: Any) -> Any:
    """``dataset`` with the source's Frame of Reference (UID, position reference indicator): added to the objects
    whose IOD leaves it optional, so that every result of a slide names the slide's frame of reference."""
    dataset.FrameOfReferenceUID = source.FrameOfReferenceUID
    dataset.PositionReferenceIndicator = source.get("PositionReferenceIndicator", "") or "SLIDE_CORNER"
    return dataset


def _display_colour(rgb: Sequence[int] | None) -> Any:
    """A recommended display colour (CIELab) of an (r, g, b) 0..255 colour; None for None."""
    if rgb is None:
        return None
    import highdicom as hd

    values = [int(v) for v in rgb]
    if len(values) != 3 or not all(0 <= v <= 255 for v in values):
        raise InputError("display colour", f"{list(rgb)!r}: expected (r, g, b) in 0..255")
    return hd.color.CIELabColor.from_rgb(*values)


def _check_inside(xy: np.ndarray, source: Any, what: str) -> None:
    """InputError unless every (x, y) lies in the source's Total Pixel Matrix ([0, columns] x [0, rows])."""
    width, height = int(source.TotalPixelMatrixColumns), int(source.TotalPixelMatrixRows)
    outside = np.flatnonzero((xy[:, 0] < 0) | (xy[:, 0] > width) | (xy[:, 1] < 0) | (xy[:, 1] > height))
    if len(outside):
        x, y = xy[outside[0]]
        raise InputError(_source_label(source), f"{what} {int(outside[0])} at level-0 ({x:g}, {y:g}) px lies outside "
                                                f"its total pixel matrix {width} x {height}: the results belong to "
                                                "another slide (or to an HPF image, not a slide box)")


def _open_ring(xy: Any, source: Any) -> np.ndarray:
    ring = np.asarray(xy, np.float64).reshape(-1, 2)
    if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
        ring = ring[:-1]
    if len(ring) < 3 or not np.isfinite(ring).all():
        raise InputError(_source_label(source), f"a region outline of {len(ring)} finite points: expected 3 or more")
    _check_inside(ring, source, "region vertex")
    return ring


# ---- segmentations -------------------------------------------------------------------------------------------------


def _plane_geometry(placed: Any, level_mpp_xy: Sequence[float]) -> tuple[Any, Any]:
    """(pixel measures, plane position) of a map level whose pixel (r, c) covers level-0 ``[c * s, (c + 1) * s)``
    x ``[r * s, (r + 1) * s)`` from the origin of the source ``placed`` (:func:`_placed_source`; see the module's
    docstring)."""
    import highdicom as hd

    mpp_x, mpp_y = level0_mpp(placed)
    step_x, step_y = float(level_mpp_xy[0]) / mpp_x, float(level_mpp_xy[1]) / mpp_y
    to_slide = hd.spatial.ImageToReferenceTransformer.for_image(placed, for_total_pixel_matrix=True)
    centre = to_slide(np.array([[step_x / 2.0, step_y / 2.0]]))[0]
    measures = hd.PixelMeasuresSequence(pixel_spacing=(level_mpp_xy[1] / 1000.0, level_mpp_xy[0] / 1000.0),
                                        slice_thickness=_slice_thickness_mm(placed))
    position = hd.PlanePositionSequence(coordinate_system="SLIDE", image_position=[float(v) for v in centre],
                                        pixel_matrix_position=(1, 1))
    return measures, position


def _slice_thickness_mm(source: Any) -> float:
    try:
        return float(source.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness)
    except (AttributeError, IndexError, TypeError, ValueError):
        return float(source.get("ImagedVolumeDepth", 0.0) or 0.0) / 1000.0 or 0.001


def _check_map_extent(shape_hw: Sequence[int], level_mpp_xy: Sequence[float], source: Any, what: str) -> None:
    """InputError unless a map of ``shape_hw`` at ``level_mpp_xy`` covers the source's total pixel matrix as the
    writers make it: ``ceil(level-0 size * level-0 mpp / level mpp)`` pixels per axis (one pixel of slack)."""
    mpp_x, mpp_y = level0_mpp(source)
    expected = (int(source.TotalPixelMatrixRows) * mpp_y / level_mpp_xy[1],
                int(source.TotalPixelMatrixColumns) * mpp_x / level_mpp_xy[0])
    if any(abs(n - e) > 1.0 for n, e in zip(shape_hw, expected)):
        raise InputError(_source_label(source),
                         f"{what} of {shape_hw[0]} x {shape_hw[1]} px at {level_mpp_xy[0]:g} um/px covers "
                         f"{shape_hw[1] * level_mpp_xy[0]:g} x {shape_hw[0] * level_mpp_xy[1]:g} um, the slide "
                         f"{int(source.TotalPixelMatrixColumns) * mpp_x:g} x "
                         f"{int(source.TotalPixelMatrixRows) * mpp_y:g} um: the map belongs to another slide or "
                         "resolution")


def _segmentation_levels(source_images: Sequence[Any], levels: Sequence[tuple[np.ndarray, Sequence[float]]],
                         bundle_info: Mapping[str, Any], kind: str, what: str, segmentation_type: str,
                         segment_descriptions: Sequence[Any]) -> list[Any]:
    """One Segmentation per (array, (x, y) um/px) level, finest first, tiled like the source, in one series and
    one pyramid (same Pyramid UID) when there are several levels."""
    import highdicom as hd

    images = _check_sources(source_images)
    source = _reference_image(images[0])
    placed = _placed_source(source)
    series = _series(bundle_info, kind, what)
    pyramid_uid = hd.UID() if len(levels) > 1 else None
    segs = []
    for k, (array, level_mpp_xy) in enumerate(levels):
        _check_map_extent(array.shape[1:3], level_mpp_xy, source, f"{what} level {k}")
        measures, position = _plane_geometry(placed, level_mpp_xy)
        seg = hd.seg.Segmentation(
            source_images=[placed], pixel_array=array, segmentation_type=segmentation_type,
            segment_descriptions=segment_descriptions, series_instance_uid=series["series_instance_uid"],
            series_number=series["series_number"], sop_instance_uid=hd.UID(), instance_number=k + 1,
            max_fractional_value=255, content_label=kind.upper(), content_description=series["series_description"],
            pixel_measures=measures, plane_positions=[position], tile_pixel_array=True, omit_empty_frames=True,
            pyramid_uid=pyramid_uid, pyramid_label=_text(what, 64) if pyramid_uid else None,
            series_description=series["series_description"], **_equipment(bundle_info))
        segs.append(_complete(seg))
    return segs


def segmentation_from_label_map(source_images: Sequence[Any], levels: Sequence[tuple[np.ndarray, Sequence[float]]],
                                classes: Mapping[int, str], bundle_info: Mapping[str, Any],
                                colours: Mapping[int, Sequence[int]] | None = None) -> list[Any]:
    """A label map (0 = not predicted, k = ``classes[k]``) as BINARY Segmentations, one segment per class.

    Args:
        source_images: the slide's level-0 VL WSI instance(s), metadata only.
        levels: [(uint8 (H, W) labels, (x, y) um/px), ...] finest first: the label TIFF's pyramid (its levels are
            nearest-neighbour copies, :func:`pathbundles.writers.write_pyramid_tiff`); one instance each.
        classes: {label value: class name}; segment k is label ``k`` (coded by :func:`class_concepts`).
        bundle_info: as for :func:`annotations_from_detections`.
        colours: {label value: (r, g, b) 0..255}: the segments' recommended display colours (the TIFF's palette).

    BINARY rather than LABELMAP: the Label Map Segmentation SOP class (2024) is not yet read by most viewers or
    by Debian's dciodvfy; empty frames are left out, so a class costs only the tiles where it occurs.
    """
    import highdicom as hd

    values = sorted(int(k) for k in classes)
    if not values or values[0] < 1 or values[-1] > 255:
        raise InputError("label map", f"class values {values}: expected 1..255 (0 = not predicted)")
    descriptions = []
    for number, value in enumerate(values, start=1):
        category, prop_type = class_concepts(classes[value])
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=_text(classes[value], 64), segmented_property_category=category,
            segmented_property_type=prop_type, algorithm_type="AUTOMATIC",
            algorithm_identification=_algorithm(bundle_info), tracking_uid=hd.UID(),
            tracking_id=_text(f"{classes[value]} (label {value})", 64),
            display_color=_display_colour((colours or {}).get(value))))
    # Segment numbers 1.. in the order of the class values, as one integer array (highdicom splits it into the
    # segments tile by tile): a per-class stack of booleans would take as many bytes per class.
    to_segment = np.zeros(256, np.uint8)
    to_segment[values] = np.arange(1, len(values) + 1)
    arrays = []
    for labels, mpp_xy in levels:
        labels = np.asarray(labels)
        if labels.dtype != np.uint8:
            raise InputError("label map", f"dtype {labels.dtype}: expected uint8 labels")
        identity = values == list(range(1, len(values) + 1)) and int(labels.max(initial=0)) <= len(values)
        arrays.append(((labels if identity else to_segment[labels])[np.newaxis], mpp_xy))
    return _segmentation_levels(source_images, arrays, bundle_info, "labels", "tissue classes", "BINARY",
                                descriptions)


def segmentation_from_probability_map(source_images: Sequence[Any],
                                      levels: Sequence[tuple[np.ndarray, Sequence[float]]],
                                      bundle_info: Mapping[str, Any]) -> list[Any]:
    """A probability map as FRACTIONAL (PROBABILITY) Segmentations with one segment, stored value / 255 =
    probability: the map TIFF's uint8 values are stored as they are.

    Args:
        source_images: the slide's level-0 VL WSI instance(s), metadata only.
        levels: [(uint8 (H, W) value = probability * 255, (x, y) um/px), ...] finest first.
        bundle_info: as for :func:`annotations_from_detections`.
    """
    import highdicom as hd

    category, prop_type, label = detection_concepts(_bundle_key(bundle_info))
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=_text(f"{label} probability", 64), segmented_property_category=category,
        segmented_property_type=prop_type, algorithm_type="AUTOMATIC",
        algorithm_identification=_algorithm(bundle_info), tracking_uid=hd.UID(), tracking_id="probability map")
    arrays = []
    for values, mpp_xy in levels:
        values = np.asarray(values)
        if values.dtype != np.uint8:
            raise InputError("probability map", f"dtype {values.dtype}: expected uint8 (probability * 255)")
        # highdicom multiplies fractions by 255 and rounds: value / 255 comes back as the value exactly.
        arrays.append(((values.astype(np.float32) / np.float32(255.0))[np.newaxis], mpp_xy))  # v / 255 * 255 = v
    return _segmentation_levels(source_images, arrays, bundle_info, "probability", f"{label} probability",
                                "FRACTIONAL", [description])


# ---- structured report ---------------------------------------------------------------------------------------------


def _metric_code(metric: str) -> str:
    """The local code value (at most 16 characters) of a run metric, made from its name (``froc``, ``auc``), so
    that one code means one metric in every report; a name that does not fit gets a hash of it."""
    import hashlib

    plain = re.sub(r"[^A-Za-z0-9_.-]", "", str(metric))
    if plain and len(plain) <= 16:
        return plain
    return plain[:9] + "-" + hashlib.sha256(str(metric).encode("utf-8")).hexdigest()[:6]


def score_report(source_images: Sequence[Any], bundle_info: Mapping[str, Any], *, name: str,
                 score: float | None = None, n_detections: int | None = None,
                 areas_mm2: Mapping[str, float] | None = None, run_metrics: Mapping[str, float] | None = None) -> Any:
    """A Comprehensive 3D SR with a TID 1500 Measurement Report of one slide's results.

    Measurement groups (TID 1501, each with the algorithm's name and version, the source image as its source):

    - "slide result": ``score`` as DCM 111047 "Probability of cancer" for the metastasis bundles, DCM 122157
      "Probability" (the highest mitosis probability) for segmitos; ``n_detections`` as a local
      "Number of detections" (UCUM "1"); finding type the bundle's concept (:func:`detection_concepts`);
    - one per class of ``areas_mm2``: SCT 42798000 "Area" in UCUM mm2, finding type the class (:func:`class_concepts`);
    - "run metrics": each scalar of ``run_metrics`` (the run's ``metrics.json``) under a local code named by it.

    Args:
        source_images: the slide's level-0 VL WSI instance(s), metadata only (all are recorded as evidence).
        bundle_info: as for :func:`annotations_from_detections`.
        name: the slide's output name (the tracking identifier).
    """
    import highdicom as hd

    codes = _codes()
    images = _check_sources(source_images)
    source = _reference_image(images[0])
    key = _bundle_key(bundle_info)
    algorithm = hd.sr.AlgorithmIdentification(name=_text(key, 64),
                                              version=_text(bundle_info.get("version") or "unknown", 64))
    category, prop_type, label = detection_concepts(key)
    source_item = hd.sr.SourceImageForMeasurementGroup.from_source_image(source)

    def group(tracking: str, measurements: list, finding_type: Any) -> Any:
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=_text(tracking, 64)),
            algorithm_id=algorithm, finding_type=finding_type, measurements=measurements,
            source_images=[source_item])

    groups = []
    slide_measurements = []
    if score is not None:
        score_code = codes.DCM.Probability if key == "segmitos" else codes.DCM.ProbabilityOfCancer
        slide_measurements.append(hd.sr.Measurement(name=score_code, value=_finite(score, "score"),
                                                    unit=codes.UCUM.NoUnits, algorithm_id=algorithm))
    if n_detections is not None:
        slide_measurements.append(hd.sr.Measurement(name=_local("n-detections", f"Number of {label} detections"),
                                                    value=float(n_detections), unit=codes.UCUM.NoUnits,
                                                    algorithm_id=algorithm))
    if slide_measurements:
        groups.append(group(f"{name} slide result", slide_measurements, prop_type))
    for class_name, area in (areas_mm2 or {}).items():
        groups.append(group(f"{name} {class_name} area", [hd.sr.Measurement(
            name=codes.SCT.Area, value=_finite(area, f"{class_name} area"), unit=codes.UCUM.SquareMillimeter,
            algorithm_id=algorithm)], class_concepts(class_name)[1]))
    metrics = [hd.sr.Measurement(name=_local(_metric_code(metric), _text(metric, 64)),
                                 value=_finite(value, metric), unit=codes.UCUM.NoUnits, algorithm_id=algorithm)
               for metric, value in (run_metrics or {}).items()]
    if metrics:
        groups.append(group("run metrics", metrics, prop_type))
    if not groups:
        raise InputError(name, "no score, count, area or metric to report")
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=_text(key, 64), manufacturer_name=MANUFACTURER,
            model_name=_text(bundle_info.get("name") or key, 64)))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_local("wsi-ai-analysis", "Whole slide image analysis by an AI model"),
        imaging_measurements=groups)
    series = _series(bundle_info, "report", "slide report")
    equipment = _equipment(bundle_info)
    sr = hd.sr.Comprehensive3DSR(
        evidence=images, content=report[0], series_instance_uid=series["series_instance_uid"],
        series_number=series["series_number"], sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, series_description=series["series_description"])
    sr.ManufacturerModelName = equipment["manufacturer_model_name"]
    sr.SoftwareVersions = equipment["software_versions"]
    sr.DeviceSerialNumber = equipment["device_serial_number"]
    # Only required with 3D coordinates.
    return _complete(_with_frame_of_reference(sr, source))


def _finite(value: Any, what: str) -> float:
    v = float(value)
    if not math.isfinite(v):
        raise InputError(what, f"value {value!r} is not a finite number")
    return v


# ---- export of a run's files ---------------------------------------------------------------------------------------


def _read_levels(path: Path, name: str, max_pixels: int) -> list[tuple[np.ndarray, tuple[float, float]]]:
    """[(level array, (x, y) um/px), ...] of a map TIFF written by :func:`pathbundles.writers.write_pyramid_tiff`
    (top-level pages; the first sample of R = G = B pages), leaving out, with a warning, the finer levels of more
    than ``max_pixels`` pixels: highdicom builds a segmentation from the whole array in memory."""
    import tifffile

    from pathbundles.writers import read_pyramid_fields

    levels = []
    try:
        with tifffile.TiffFile(path) as tif:
            for k, page in enumerate(tif.pages):
                height, width = page.shape[:2]
                if height * width > max_pixels:
                    logger.warning("%s: slide %s: level %d (%d x %d px) is over %d pixels and left out of the DICOM "
                                   "segmentation", path, name, k, width, height, max_pixels)
                    continue
                fields = read_pyramid_fields(path, k)
                array = page.asarray()
                array = array[..., 0] if array.ndim == 3 else array
                mpp_xy = tuple(float(v) for v in fields.get("level_mpp") or [fields["mpp"]] * 2)
                levels.append((array, mpp_xy))
    except (OSError, ValueError, KeyError, TypeError, tifffile.TiffFileError) as err:
        raise InputError(path, f"slide {name}: cannot read the map: {err}") from err
    if not levels:
        raise InputError(path, f"slide {name}: every level of the map is over {max_pixels} pixels")
    return levels


def _read_json(path: Path, name: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(path, f"slide {name}: invalid JSON: {err.msg}", line=err.lineno) from err


def _geojson(path: Path, name: str) -> dict:
    doc = _read_json(path, name)
    if not isinstance(doc, dict) or doc.get("type") != "FeatureCollection":
        raise InputError(path, f"slide {name}: expected a GeoJSON FeatureCollection")
    return doc


def _regions(path: Path, name: str) -> tuple[dict[str, list], dict[str, list]]:
    """({class: [exterior ring, ...]}, {class: [hole ring, ...]}) of a regions GeoJSON (dmmn)."""
    exteriors: dict[str, list] = {}
    holes: dict[str, list] = {}
    for i, feature in enumerate(_geojson(path, name).get("features", [])):
        try:
            geometry = feature["geometry"]
            if geometry["type"] != "Polygon":
                raise ValueError(f"geometry {geometry['type']!r} is not a Polygon")
            class_name = str(feature["properties"]["classification"]["name"])
            rings = [np.asarray(r, np.float64).reshape(-1, 2) for r in geometry["coordinates"]]
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(path, f"slide {name}: feature {i}: expected a classified Polygon ({err})") from err
        exteriors.setdefault(class_name, []).append(rings[0])
        holes.setdefault(class_name, []).extend(rings[1:])
    return exteriors, {k: v for k, v in holes.items() if v}


def _table_row(path: Path, name: str) -> dict[str, str] | None:
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row.get("name") == name:
                return row
    return None


def _slide_score(folder: Path, name: str) -> tuple[float | None, int | None]:
    """(score, number of detections) of slide ``name`` in the run's table: ``slide_scores.csv`` (scannet,
    spatial_lstm: ``score``, ``n_detections``) or ``hpf_counts.csv`` (segmitos: ``max_score``, ``n_detections``);
    (None, None) when neither has the slide."""
    for table, score_key in (("slide_scores.csv", "score"), ("hpf_counts.csv", "max_score")):
        row = _table_row(folder / table, name)
        if row is not None:
            n = _number(row, "n_detections", folder / table, name)
            return _number(row, score_key, folder / table, name), None if n is None else int(n)
    return None, None


def _classification_colours(doc: Mapping[str, Any], path: Path, name: str, key: str | None = None) -> dict:
    """{class name (or ``key``): (r, g, b)} of a GeoJSON's features' QuPath classifications."""
    colours = {}
    for feature in doc.get("features", []):
        classification = (feature.get("properties") or {}).get("classification") or {}
        if "color" in classification:
            colour = classification["color"]
            if not (isinstance(colour, list) and len(colour) == 3 and all(isinstance(c, int) and 0 <= c <= 255
                                                                            for c in colour)):
                raise InputError(path, f"slide {name}: classification colour {colour!r}: expected [r, g, b] 0..255")
            colours.setdefault(key or str(classification.get("name")), colour)
    return colours


def _number(row: Mapping[str, str], key: str, path: Path, name: str) -> float | None:
    if row.get(key) in (None, ""):
        return None
    try:
        return _finite(row[key], key)
    except (ValueError, InputError):
        raise InputError(path, f"slide {name}: {key} {row[key]!r} is not a finite number") from None


def _run_metrics(path: Path) -> dict[str, float]:
    """The top-level finite numbers of a run's ``metrics.json`` (booleans and nested values left out)."""
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(path, f"invalid JSON: {err.msg}", line=err.lineno) from err
    if not isinstance(doc, dict):
        return {}
    return {str(k): float(v) for k, v in doc.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _check_mpp(doc: Mapping[str, Any], source: Any, path: Path, name: str) -> None:
    """InputError when the run's recorded level-0 mpp (GeoJSON ``properties.mpp``) differs from the source's by
    more than 1 %: the positions are in another slide's (or level's) pixels."""
    recorded = (doc.get("properties") or {}).get("mpp")
    if recorded is None:
        return
    mpp_x, _ = level0_mpp(source)
    if not (isinstance(recorded, (int, float)) and abs(float(recorded) / mpp_x - 1.0) <= 0.01):
        raise InputError(path, f"slide {name}: the run read the slide at level-0 {recorded!r} um/px, the DICOM source "
                               f"has {mpp_x:g} um/px: the results are not of this source")


def _complete(dataset: Any) -> Any:
    """Type 2 attributes a valid object needs that highdicom fills only from the source, empty when the source
    lacks them (real files do): the Specimen module's issuers, container type and preparation sequences, and
    General Image's Patient Orientation of image objects (Type 2C: no Image Orientation (Patient) on a slide).
    A container without a specimen description (OrthancWSIDicomizer's series) gets one (Type 1 in the Specimen
    module): the container's identifier, and a specimen UID derived from the study and that identifier, so that
    every result of the slide names the same specimen."""
    from pydicom import Dataset
    from pydicom.uid import generate_uid

    if "ContainerIdentifier" in dataset:
        for keyword in ("IssuerOfTheContainerIdentifierSequence", "ContainerTypeCodeSequence"):
            if keyword not in dataset:
                setattr(dataset, keyword, [])
        if not dataset.get("SpecimenDescriptionSequence"):
            specimen = Dataset()
            specimen.SpecimenIdentifier = str(dataset.ContainerIdentifier)
            specimen.SpecimenUID = generate_uid(entropy_srcs=["pathbundles specimen", str(dataset.StudyInstanceUID),
                                                              str(dataset.ContainerIdentifier)])
            dataset.SpecimenDescriptionSequence = [specimen]
    for specimen in dataset.get("SpecimenDescriptionSequence", []):
        for keyword in ("IssuerOfTheSpecimenIdentifierSequence", "SpecimenPreparationSequence"):
            if keyword not in specimen:
                setattr(specimen, keyword, [])
    if str(dataset.get("SOPClassUID", "")) == SEGMENTATION_SOP_CLASS and "PatientOrientation" not in dataset:
        dataset.PatientOrientation = ""
    return dataset


_OBJECT_FILE = re.compile(r"^(annotations|report|(labels|probability)_[0-9]+)\.dcm$")


def _remove_stale(folder: Path, written: Sequence[Path]) -> None:
    """Remove the objects an earlier export of the slide wrote into ``folder`` that this one did not (a pyramid
    with more levels, a map the run no longer has): a folder sent to a PACS holds one export. Only this module's
    file names are touched."""
    keep = {p.name for p in written}
    for path in folder.iterdir():
        if _OBJECT_FILE.match(path.name) and path.name not in keep and path.is_file() and not path.is_symlink():
            path.unlink()
            logger.info("%s: removed, left by an earlier export", path)


def _write(dataset: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)
    return path


def export_slide_results(output_dir: str | os.PathLike, name: str, source_images: Sequence[Any],
                         bundle_info: Mapping[str, Any], max_map_pixels: int = MAX_MAP_PIXELS) -> list[Path]:
    """Write the DICOM objects of slide ``name``'s results in a finished run's ``output_dir`` into
    ``output_dir/dicom/<name>/`` (see the module's docstring for which file becomes which object).

    Args:
        output_dir: the run's output folder.
        name: the slide's output name (:func:`pathbundles.outputs.slide_name`).
        source_images: the slide's level-0 VL WSI instance(s) (pydicom Datasets, metadata only), e.g. a DICOM
            slide's ``source_datasets()``.
        bundle_info: :func:`pathbundles.bundle_runner.bundle_info` of the bundle that made the run.
        max_map_pixels: map levels with more pixels are left out of the segmentation pyramids (with a warning):
            highdicom holds a level in memory, several times over while it encodes.

    Returns:
        The paths written, annotations, segmentations, report in that order.

    Raises:
        InputError: naming the file and slide when the run has no results for ``name``, or one is malformed or does
            not fit the source (positions outside its total pixel matrix, another resolution).
        SlideError: the source images are not VL WSI instances of one series with valid UIDs and pixel spacing.
    """
    folder = Path(output_dir)
    images = _check_sources(source_images)
    files = {"detections": output_file(folder, "detections", name, ".geojson"),
             "regions": output_file(folder, "regions", name, ".geojson"),
             "labels": output_file(folder, "labels", name, ".tif"),
             "map": output_file(folder, "maps", name, ".tif"),
             "areas": output_file(folder, "areas", name, ".json")}
    target = inside(folder, DICOM_SUBFOLDER, name)
    objects: list[tuple[Any, str]] = []
    detections, regions, holes, colours = np.zeros((0, 3)), {}, {}, {}
    if files["detections"].is_file():
        from pathbundles.writers import read_detections_geojson

        doc = _geojson(files["detections"], name)
        _check_mpp(doc, images[0], files["detections"], name)
        detections = read_detections_geojson(files["detections"])
        colours.update(_classification_colours(doc, files["detections"], name, key="detections"))
    if files["regions"].is_file():
        regions, holes = _regions(files["regions"], name)
        colours.update(_classification_colours(_geojson(files["regions"], name), files["regions"], name))
    if len(detections) or regions:  # a slide without detections (no tissue) has no annotations to show
        objects.append((annotations_from_detections(images, detections, bundle_info, regions=regions,
                                                    region_holes=holes, colours=colours), "annotations.dcm"))
    if files["labels"].is_file():
        from pathbundles.writers import read_pyramid_fields

        fields = read_pyramid_fields(files["labels"])
        try:
            classes = {int(k): str(v) for k, v in (fields.get("classes") or {}).items()}
            class_colours = {int(k): [int(c) for c in v] for k, v in (fields.get("colours") or {}).items()}
        except (AttributeError, TypeError, ValueError) as err:
            raise InputError(files["labels"], f"slide {name}: malformed classes or colours ({err})") from err
        if not classes:
            raise InputError(files["labels"], f"slide {name}: the label map names no classes")
        segs = segmentation_from_label_map(images, _read_levels(files["labels"], name, max_map_pixels), classes,
                                           bundle_info, colours=class_colours)
        objects += [(seg, f"labels_{k}.dcm") for k, seg in enumerate(segs)]
    if files["map"].is_file():
        segs = segmentation_from_probability_map(images, _read_levels(files["map"], name, max_map_pixels), bundle_info)
        objects += [(seg, f"probability_{k}.dcm") for k, seg in enumerate(segs)]
    score, n_detections = _slide_score(folder, name)
    areas = None
    if files["areas"].is_file():
        doc = _read_json(files["areas"], name)
        try:
            areas = {str(k): float(v["area_mm2"]) for k, v in doc["classes"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise InputError(files["areas"], f"slide {name}: expected classes with area_mm2 ({err})") from err
    if score is not None or n_detections is not None or areas:
        objects.append((score_report(images, bundle_info, name=name, score=score, n_detections=n_detections,
                                     areas_mm2=areas, run_metrics=_run_metrics(folder / "metrics.json")),
                        "report.dcm"))
    if not objects:
        raise InputError(folder, f"slide {name}: no results to export (none of detections/{name}.geojson, "
                                 f"regions/{name}.geojson, labels/{name}.tif, maps/{name}.tif, a slide_scores.csv or "
                                 f"hpf_counts.csv row, areas/{name}.json)")
    written = [_write(dataset, inside(target, file_name)) for dataset, file_name in objects]
    _remove_stale(target, written)
    logger.info("slide %s: wrote %d DICOM object(s) into %s", name, len(written), target)
    return written
