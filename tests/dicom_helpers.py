"""What the DICOM end-to-end tests share: checking a run's DICOM results, as retrieved from a PACS, against the run's
own file outputs. Imported by tests/test_deploy.py and tests/test_dicomweb.py."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

#: Debian dicom3tools' IOD validator, or None where it is not installed.
DCIODVFY = shutil.which("dciodvfy") or ("/usr/bin/dciodvfy" if Path("/usr/bin/dciodvfy").exists() else None)


def assert_valid_dicom(path: Path) -> None:
    """dciodvfy reports no error for ``path`` (nothing is checked where it is not installed, except under CI, where
    that fails; callers that need it skip). Its 2022 Debian build reports, for every 2D annotation object, "Only valid for AnnotationCoordinateType
    of 3D - attribute <CommonZCoordinateValue> = <>" although the attribute is absent (checked here): that one line
    is its false positive, any other error fails."""
    import pydicom

    if DCIODVFY is None:
        if os.environ.get("CI"):  # scripts/setup.sh installs dicom3tools as root: CI must validate
            pytest.fail("dciodvfy (Debian dicom3tools) is missing in CI: scripts/setup.sh installs it as root")
        return
    out = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    if ds.get("AnnotationCoordinateType") == "2D":
        assert all("CommonZCoordinateValue" not in g for g in ds.AnnotationGroupSequence)
        errors = [e for e in errors if "attribute <CommonZCoordinateValue> = <>" not in e]
    assert errors == [], f"{path.name}: {errors}"


def assert_dicom_results_equal_file_outputs(fetched: Path, out: Path, name: str, source_series: str) -> None:
    """The DICOM results retrieved from the PACS (``fetched``) hold what the run's own files of slide ``name`` say:
    annotation points equal the GeoJSON's level-0 positions and their probabilities its scores (float32, as the
    standard stores them); segmentations equal the label map (dmmn) or the probability map (8-bit values) at every
    pixel of level 0; the report's score, count and areas are the tables'; dmmn's outlines are the regions
    GeoJSON's; every object references the source series and passes dciodvfy
    (:func:`assert_valid_dicom`)."""
    import highdicom as hd
    import pydicom
    import tifffile

    from pathbundles.writers import read_detections_geojson

    objects = {}
    for path in sorted(fetched.glob("*.dcm")):
        assert_valid_dicom(path)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        objects.setdefault(str(ds.Modality), []).append(path)
        assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == source_series if "ReferencedSeriesSequence" in ds \
            else ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].SeriesInstanceUID == \
            source_series
    detections_file = out / "detections" / f"{name}.geojson"
    if detections_file.is_file():
        detections = read_detections_geojson(detections_file)
        (ann,) = objects["ANN"]
        (group, *_) = hd.ann.annread(ann).get_annotation_groups()
        points = np.vstack(group.get_graphic_data("2D")) if len(detections) else np.zeros((0, 2))
        np.testing.assert_array_equal(points, detections[:, 1:])
        if len(detections):
            np.testing.assert_array_equal(group.get_measurements()[1][:, 0], detections[:, 0].astype(np.float32))
    segs = sorted((hd.seg.segread(p) for p in objects.get("SEG", [])), key=lambda s: -int(s.TotalPixelMatrixColumns))
    labels_file, map_file = out / "labels" / f"{name}.tif", out / "maps" / f"{name}.tif"
    if labels_file.is_file():
        assert segs and segs[0].SegmentationType == "BINARY"
        np.testing.assert_array_equal(segs[0].get_total_pixel_matrix(combine_segments=True),
                                      tifffile.imread(labels_file, level=0))
    elif map_file.is_file():
        assert segs and segs[0].SegmentationType == "FRACTIONAL"
        probability = tifffile.imread(map_file, level=0)  # grey in all three samples (readers that need RGB)
        np.testing.assert_array_equal(segs[0].get_total_pixel_matrix(rescale_fractional=False)[..., 0],
                                      probability[..., 0] if probability.ndim == 3 else probability)
    (report,) = objects["SR"]
    numbers = _report_numbers(pydicom.dcmread(report))
    for table, score_key in (("slide_scores.csv", "score"), ("hpf_counts.csv", "max_score")):
        rows = {r["name"]: r for r in csv.DictReader(open(out / table, newline=""))} if (out / table).is_file() \
            else {}
        if name in rows:  # the report's score and count are the table's
            (score,) = [v for meaning, v in numbers if meaning.startswith("Probability")]
            (count,) = [v for meaning, v in numbers if meaning.startswith("Number of")]
            assert score == pytest.approx(float(rows[name][score_key]), abs=1e-6)
            assert count == int(rows[name]["n_detections"])
    areas_file = out / "areas" / f"{name}.json"
    if areas_file.is_file():  # the report's areas are the run's, in mm2
        areas = json.loads(areas_file.read_text())["classes"]
        reported = sorted(v for meaning, v in numbers if meaning == "Area")
        assert reported == pytest.approx(sorted(c["area_mm2"] for c in areas.values()), rel=1e-6)
    regions_file = out / "regions" / f"{name}.geojson"
    if regions_file.is_file():  # the outlines are the GeoJSON's polygons (open rings), class by class
        features = json.loads(regions_file.read_text())["features"]
        (ann,) = objects["ANN"]
        groups = {g.label: g for g in hd.ann.annread(ann).get_annotation_groups()}
        for class_name in {f["properties"]["classification"]["name"] for f in features}:
            exteriors = [np.asarray(f["geometry"]["coordinates"][0])[:-1] for f in features
                         if f["properties"]["classification"]["name"] == class_name]
            stored = groups[f"{class_name} regions"].get_graphic_data("2D")
            assert len(stored) == len(exteriors)
            for ring, expected in zip(stored, exteriors):
                np.testing.assert_allclose(ring, expected, rtol=0, atol=1e-9)


def _report_numbers(report: Any) -> list[tuple[str, float]]:
    """(concept name meaning, value) of every NUM item of a structured report, depth first."""
    found = []

    def walk(items: Any) -> None:
        for item in items:
            if item.get("ValueType") == "NUM" and "MeasuredValueSequence" in item:
                found.append((str(item.ConceptNameCodeSequence[0].CodeMeaning),
                              float(item.MeasuredValueSequence[0].NumericValue)))
            walk(item.get("ContentSequence", []))

    walk(report.get("ContentSequence", []))
    return found

