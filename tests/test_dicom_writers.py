"""DICOM results (pathbundles.dicom_writers): annotations, segmentations and the SR of a slide, read back with
highdicom and validated with dciodvfy, on a synthetic VL WSI source (0.2527 um/px, origin and orientation as
scanners write them) and on the real Camelyon DICOM instances in ../shared/data."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")

from dicom_helpers import DCIODVFY, assert_valid_dicom  # noqa: E402
from pydicom import dcmread  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from pathbundles import dicom_writers as dw  # noqa: E402
from pathbundles.errors import InputError, SlideError  # noqa: E402
from pathbundles.writers import write_detections_geojson, write_pyramid_tiff  # noqa: E402

MPP = 0.2527  # um/px of the synthetic slide's level 0
WIDTH, HEIGHT = 5000, 3000  # level-0 px
ORIGIN_MM = (20.0, 40.0)  # slide coordinates of the centre of level-0 pixel (0, 0)
INFO = {"bundle": "scannet", "name": "ScanNet metastasis detection", "version": "0.4.0",
        "weights_sha256": "2c33853e20a39b73f64511ad3314a3dfb6af506bfdda2c1b1ce4168d46ad2e7f", "demo_weights": True}
DMMN_INFO = {"bundle": "dmmn", "name": "DMMN multi-class breast tissue segmentation", "version": "0.5.0",
             "weights_sha256": "0fbdabfe2037788db91dabc6f8662db0c7ac6af8b34ddb01cf9e6942b0a6d67b",
             "demo_weights": False}
REAL_DICOM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom_camelyon_thumbnails"


def synthetic_source(width: int = WIDTH, height: int = HEIGHT, mpp: float = MPP) -> Dataset:
    """Metadata of a level-0 VL Whole Slide Microscopy instance, as a scanner writes it (no pixels)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = dw.VL_WSI_SOP_CLASS
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        setattr(ds, keyword, generate_uid())
    ds.PositionReferenceIndicator = "SLIDE_CORNER"
    ds.Modality, ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "SM", "P1", "Test^Slide", "", ""
    ds.AccessionNumber, ds.StudyID, ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = "A1", "S1", "20260101", \
        "120000", ""
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.ContainerIdentifier, ds.IssuerOfTheContainerIdentifierSequence, ds.ContainerTypeCodeSequence = "SLIDE-1", [], []
    specimen = Dataset()
    specimen.SpecimenIdentifier, specimen.SpecimenUID = "SPEC-1", generate_uid()
    specimen.IssuerOfTheSpecimenIdentifierSequence, specimen.SpecimenPreparationSequence = [], []
    ds.SpecimenDescriptionSequence = [specimen]
    ds.Rows = ds.Columns = 256
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = width, height
    ds.NumberOfFrames = -(-width // 256) * -(-height // 256)
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = ORIGIN_MM
    ds.TotalPixelMatrixOriginSequence = [origin]
    # Rows run along -X, columns along -Y: the orientation of most scanners' DICOM (the real files here too).
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    measures = Dataset()
    measures.PixelSpacing, measures.SliceThickness = [mpp / 1000, mpp / 1000], 0.004
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    return ds


@pytest.fixture
def source() -> Dataset:
    return synthetic_source()


@pytest.fixture(scope="module")
def real_dicom() -> Path:
    if not REAL_DICOM.is_dir():
        pytest.skip(f"real DICOM WSI test data not found at {REAL_DICOM} (only present beside the project checkout)")
    return REAL_DICOM


@pytest.fixture(scope="module")
def real_source(real_dicom) -> Dataset:
    return pydicom.dcmread(real_dicom / "multi_frame_jpeg2000_camelyon_challenge_image.dcm", stop_before_pixels=True)


def saved(dataset: Dataset, path: Path) -> Path:
    dataset.save_as(path, enforce_file_format=True)
    return path


def assert_valid(path: Path) -> None:
    """dciodvfy reports no error for ``path`` (:func:`dicom_helpers.assert_valid_dicom`); skipped without it."""
    if DCIODVFY is None:
        pytest.skip("dciodvfy (Debian dicom3tools) is not installed")
    assert_valid_dicom(path)


def assert_shares_source(ds: Dataset, source: Dataset) -> None:
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert ds.PatientID == source.PatientID
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID and ds.SOPInstanceUID != source.SOPInstanceUID
    assert ds.Manufacturer == "pathbundles"


# ---- annotations -------------------------------------------------------------------------------------------------


def test_detections_round_trip_as_points_with_probabilities(source, tmp_path):
    detections = np.array([[0.9, 100.25, 200.5], [0.123456789, 4999.0, 2999.75], [1.0, 0.0, 0.0]])
    path = saved(dw.annotations_from_detections([source], detections, INFO), tmp_path / "ann.dcm")
    ann = hd.ann.annread(path)
    assert_shares_source(ann, source)
    assert ann.AnnotationCoordinateType == "2D" and ann.PixelOriginInterpretation == "VOLUME"
    assert ann.ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert list(ann.SoftwareVersions)[0] == "scannet 0.4.0" and ann.ManufacturerModelName == INFO["name"]
    assert ann.SeriesDescription == "scannet 0.4.0 detections DEMO WEIGHTS" and ann.SeriesNumber == 9011
    (group,) = ann.get_annotation_groups()
    assert group.annotated_property_type.value == "14799000"  # SCT Neoplasm, Secondary
    points = np.vstack(group.get_graphic_data("2D"))
    assert points.dtype == np.float64
    np.testing.assert_array_equal(points, detections[:, 1:])  # level-0 px, pixel i spanning [i, i + 1)
    # In um through the source's pixel spacing: 100.25 px * 0.2527 um/px = 25.333175 um.
    spacing_um = np.array(source.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing,
                          np.float64)[::-1] * 1000
    np.testing.assert_allclose(points[0] * spacing_um, [25.333175, 50.66635], rtol=1e-12)
    names, values, units = group.get_measurements()
    assert names[0].value == "122157" and units[0].value == "1"
    np.testing.assert_array_equal(values[:, 0], detections[:, 0].astype(np.float32))  # OF: float32 by the standard
    # The convention, explicit: image coordinate (c, r) = (0, 0) is the corner of pixel (0, 0) and the source's
    # origin the centre of that pixel, so (100.25, 200.5) lies 99.75 columns (-Y) and 200 rows (-X) of 0.2527 um
    # from the origin (20, 40) mm: X = 20 - 200 * 0.0002527, Y = 40 - 99.75 * 0.0002527.
    to_slide = hd.spatial.ImageToReferenceTransformer.for_image(source, for_total_pixel_matrix=True)
    np.testing.assert_allclose(to_slide(points[:1])[0], [19.94946, 39.974793175, 0.0], atol=1e-9)
    assert_valid(path)


def test_region_outlines_as_polygons_with_holes_in_their_own_group(source, tmp_path):
    square = np.array([[10.0, 10.0], [110.0, 10.0], [110.0, 110.0], [10.0, 110.0], [10.0, 10.0]])  # closed ring
    hole = np.array([[40.5, 40.5], [60.5, 40.5], [60.5, 60.5]])
    ann = dw.annotations_from_detections([source], np.zeros((0, 3)), DMMN_INFO, regions={"carcinoma": [square]},
                                         region_holes={"carcinoma": [hole]})
    path = saved(ann, tmp_path / "regions.dcm")
    regions, holes = hd.ann.annread(path).get_annotation_groups()
    assert regions.GraphicType == "POLYGON" and regions.label == "carcinoma regions"
    assert regions.annotated_property_type.value == "1187425009"  # SCT Carcinoma
    np.testing.assert_array_equal(regions.get_graphic_data("2D")[0], square[:-1])  # open: first point not repeated
    np.testing.assert_array_equal(holes.get_graphic_data("2D")[0], hole)
    assert "DEMO" not in ann.SeriesDescription
    assert_valid(path)


def test_detections_outside_the_slide_or_bad_sources_are_refused(source):
    with pytest.raises(InputError, match="no detections and no regions to annotate"):
        dw.annotations_from_detections([source], np.zeros((0, 3)), INFO)
    with pytest.raises(InputError, match=r"detection 1 at level-0 \(5000.5, 3\) px lies outside .* 5000 x 3000"):
        dw.annotations_from_detections([source], [[0.5, 1, 1], [0.5, 5000.5, 3]], INFO)
    no_spacing = synthetic_source()
    del no_spacing.SharedFunctionalGroupsSequence
    with pytest.raises(SlideError, match="has no Pixel Spacing"):
        dw.annotations_from_detections([no_spacing], [[0.5, 1, 1]], INFO)
    bad_uid = synthetic_source()
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        bad_uid.StudyInstanceUID = "1.2.3/../x"
    with pytest.raises(SlideError, match="StudyInstanceUID '1.2.3/../x' is not a valid DICOM UID"):
        dw.annotations_from_detections([bad_uid], [[0.5, 1, 1]], INFO)


# ---- segmentations -----------------------------------------------------------------------------------------------


def test_probability_map_as_fractional_segmentation_placed_at_its_own_resolution(source, tmp_path):
    # A 16 um/px map of the 5000 x 3000 px slide at 0.2527 um/px: ceil(1263.5 / 16) x ceil(758.1 / 16) = 79 x 48.
    prob = np.zeros((48, 79), np.uint8)
    prob[10:20, 30:40], prob[0, 0], prob[47, 78] = 200, 1, 255
    (seg,) = dw.segmentation_from_probability_map([source], [(prob, (16.0, 16.0))], INFO)
    path = saved(seg, tmp_path / "prob.dcm")
    seg = hd.seg.segread(path)
    assert_shares_source(seg, source)
    assert seg.SegmentationType == "FRACTIONAL" and seg.MaximumFractionalValue == 255
    assert (seg.TotalPixelMatrixRows, seg.TotalPixelMatrixColumns) == (48, 79)
    stored = seg.get_total_pixel_matrix(rescale_fractional=False)[..., 0]
    np.testing.assert_array_equal(stored, prob)
    assert stored[15, 35] == 200 and stored[0, 0] == 1 and stored[47, 78] == 255 and stored[25, 50] == 0
    assert seg.get_total_pixel_matrix()[15, 35, 0] == pytest.approx(200 / 255)
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == [0.016, 0.016]
    # Map pixel (0, 0) covers level-0 [0, 63.316) px: its centre lies 8 um - 0.12635 um (half a level-0 pixel)
    # from the origin's pixel centre, along -X and -Y.
    origin = seg.TotalPixelMatrixOriginSequence[0]
    assert float(origin.XOffsetInSlideCoordinateSystem) == pytest.approx(20.0 - 0.00787365, abs=1e-8)
    assert float(origin.YOffsetInSlideCoordinateSystem) == pytest.approx(40.0 - 0.00787365, abs=1e-8)
    # Map pixel (r, c) = (15, 35) lands on the source's level-0 pixels [35 * s, 36 * s) x [15 * s, 16 * s),
    # s = 16 / 0.2527: its centre at (35.5 * s, 15.5 * s) = (2247.72, 981.40) px.
    seg_to_slide = hd.spatial.PixelToReferenceTransformer.for_image(seg, for_total_pixel_matrix=True)
    slide_to_source = hd.spatial.ReferenceToImageTransformer.for_image(source, for_total_pixel_matrix=True)
    centre = slide_to_source(seg_to_slide(np.array([[35, 15]])))[0]
    np.testing.assert_allclose(centre[:2], [35.5 * 16 / MPP, 15.5 * 16 / MPP], atol=1e-6)
    assert_valid(path)


def test_label_map_as_binary_segmentation_pyramid_one_segment_per_class(source, tmp_path):
    # 0.5 um/px label map: ceil(5000 * 0.2527 / 0.5) x ceil(3000 * 0.2527 / 0.5) = 2527 x 1517.
    labels = np.zeros((1517, 2527), np.uint8)
    labels[:100, :200] = 1
    labels[800:810, 2000:2010] = 3
    labels[1516, 2526] = 2
    classes = {1: "carcinoma", 2: "benign epithelium", 3: "stroma"}
    levels = [(labels, (0.5, 0.5)), (labels[::2, ::2], (1.0, 1.0))]  # nearest, as write_pyramid_tiff's levels
    segs = dw.segmentation_from_label_map([source], levels, classes, DMMN_INFO)
    paths = [saved(s, tmp_path / f"labels_{k}.dcm") for k, s in enumerate(segs)]
    fine, coarse = (hd.seg.segread(p) for p in paths)
    assert fine.PyramidUID == coarse.PyramidUID and fine.SeriesInstanceUID == coarse.SeriesInstanceUID
    assert (fine.InstanceNumber, coarse.InstanceNumber) == (1, 2) and fine.SeriesNumber == 9042
    assert fine.SegmentationType == "BINARY"
    assert [d.segmented_property_type.value for d in fine.SegmentSequence] == ["1187425009", "benignepithelium",
                                                                               "21793004"]
    assert [d.SegmentLabel for d in fine.SegmentSequence] == ["carcinoma", "benign epithelium", "stroma"]
    combined = fine.get_total_pixel_matrix(combine_segments=True)
    np.testing.assert_array_equal(combined, labels)
    assert combined[50, 150] == 1 and combined[805, 2005] == 3 and combined[1516, 2526] == 2 and combined[900, 5] == 0
    np.testing.assert_array_equal(coarse.get_total_pixel_matrix(combine_segments=True), labels[::2, ::2])
    spacing = [float(v) for v in coarse.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    assert spacing == [0.001, 0.001]
    for path in paths:
        assert_valid(path)


def test_label_values_that_are_not_1_to_c_become_segments_1_to_c(source, tmp_path):
    labels = np.zeros((759, 1264), np.uint8)  # 1 um/px
    labels[10:20, 30:40], labels[700:750, 1000:1200] = 5, 2
    (seg,) = dw.segmentation_from_label_map([source], [(labels, (1.0, 1.0))], {2: "carcinoma", 5: "necrosis"}, INFO)
    seg = hd.seg.segread(saved(seg, tmp_path / "labels.dcm"))
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["carcinoma", "necrosis"]
    combined = seg.get_total_pixel_matrix(combine_segments=True)  # segment numbers
    assert combined[15, 35] == 2 and combined[725, 1100] == 1 and combined[400, 400] == 0
    np.testing.assert_array_equal(combined, np.select([labels == 2, labels == 5], [1, 2], 0))


def test_map_of_another_resolution_is_refused(source):
    with pytest.raises(InputError, match=r"covers 1600 x 800 um, the slide 1263.5 x 758.1 um"):
        dw.segmentation_from_probability_map([source], [(np.zeros((50, 100), np.uint8), (16.0, 16.0))], INFO)


# ---- structured report -------------------------------------------------------------------------------------------


def measurements(sr: hd.sr.Comprehensive3DSR) -> dict[str, list[tuple[str, float, str]]]:
    """{tracking identifier: [(concept meaning, value, unit code), ...]} of an SR's TID 1501 groups."""
    return {g.tracking_identifier: [(m.name.meaning, m.value, m.unit.value) for m in g.get_measurements()]
            for g in sr.content.get_image_measurement_groups()}


def test_score_report_round_trip(source, tmp_path):
    sr = dw.score_report([source], INFO, name="slide1", score=0.97, n_detections=2,
                         areas_mm2={"carcinoma": 0.17284}, run_metrics={"froc": 0.5, "auc": 0.875})
    path = saved(sr, tmp_path / "report.dcm")
    sr = hd.sr.srread(path)
    assert_shares_source(sr, source)
    assert sr.SeriesDescription == "scannet 0.4.0 slide report DEMO WEIGHTS"
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert measurements(sr) == {
        "slide1 slide result": [("Probability of cancer", 0.97, "1"),
                                ("Number of metastatic tumour detections", 2.0, "1")],
        "slide1 carcinoma area": [("Area", 0.17284, "mm2")],
        "run metrics": [("froc", 0.5, "1"), ("auc", 0.875, "1")]}
    assert_valid(path)


# ---- real DICOM source -------------------------------------------------------------------------------------------


def test_real_dicom_source(real_source, tmp_path):
    """The real Camelyon instance (1696 x 812 px at 28.969 x 28.968 um/px, no Total Pixel Matrix Origin Sequence: the
    segmentation is placed from origin (0, 0) with a warning)."""
    mpp_x, mpp_y = dw.level0_mpp(real_source)
    assert (mpp_x, mpp_y) == (28.969, 28.968)  # Pixel Spacing [0.028968, 0.028969] mm: rows, then columns
    detections = np.array([[0.75, 848.5, 406.25]])
    ann = hd.ann.annread(saved(dw.annotations_from_detections([real_source], detections, INFO), tmp_path / "a.dcm"))
    np.testing.assert_array_equal(ann.get_annotation_groups()[0].get_graphic_data("2D")[0], detections[:, 1:])
    assert ann.StudyInstanceUID == real_source.StudyInstanceUID
    assert ann.FrameOfReferenceUID == real_source.FrameOfReferenceUID
    # A 2x map (57.936 um/px): 848 x 406 px.
    prob = np.zeros((406, 848), np.uint8)
    prob[100:110, 200:220] = 128
    (seg,) = dw.segmentation_from_probability_map([real_source], [(prob, (2 * mpp_x, 2 * mpp_y))], INFO)
    seg_path = saved(seg, tmp_path / "p.dcm")
    np.testing.assert_array_equal(hd.seg.segread(seg_path).get_total_pixel_matrix(rescale_fractional=False)[..., 0],
                                  prob)
    report_path = saved(dw.score_report([real_source], INFO, name="camelyon", score=0.5), tmp_path / "r.dcm")
    for path in (tmp_path / "a.dcm", seg_path, report_path):
        assert_valid(path)


def test_real_source_with_an_overlong_uid_is_refused(real_dicom):
    """One of the real instances has a 66-character Frame of Reference UID (UI allows 64): results that copied it
    would be invalid, so the export names the instance and the UID instead."""
    source = pydicom.dcmread(real_dicom / "multiframe_camelyon_challenge_image.dcm", stop_before_pixels=True)
    with pytest.warns(UserWarning, match="exceeds the maximum length of 64"), \
            pytest.raises(SlideError, match=r"412405: FrameOfReferenceUID '1\.3\.6\.1.*634\.1' is not a valid DICOM UID"):
        dw.annotations_from_detections([source], [[0.5, 1, 1]], INFO)


# ---- export of a run's output folder -----------------------------------------------------------------------------


def write_scannet_outputs(folder: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The files a scannet run writes for slide ``name`` (detections GeoJSON, map TIFF, slide_scores.csv), through
    the project's writers."""
    detections = np.array([[0.875, 1234.5, 567.25], [0.5, 10.0, 20.0]])
    write_detections_geojson(folder / "detections" / f"{name}.geojson", detections, mpp=MPP,
                             id_scope=f"{name}/detections", properties={"demo_weights": True})
    prob = np.zeros((48, 79), np.uint8)
    prob[5:9, 20:24] = 223
    write_pyramid_tiff(folder / "maps" / f"{name}.tif", prob, mpp=16.0, compression="deflate", store_rgb=True,
                       description={"content": "tumour probability map: value / 255 = probability (R = G = B)"})
    with open(folder / "slide_scores.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "score", "n_detections", "demo_weights"])
        writer.writerow([name, "0.874510", 2, "true"])
    return detections, prob


def test_export_scannet_run(source, tmp_path):
    detections, prob = write_scannet_outputs(tmp_path, "slide_a")
    (tmp_path / "metrics.json").write_text(json.dumps({"froc": 0.25, "name": "x", "curve": [1, 2]}))
    paths = dw.export_slide_results(tmp_path, "slide_a", [source], INFO)
    folder = tmp_path / "dicom" / "slide_a"
    assert paths == [folder / "annotations.dcm", folder / "probability_0.dcm", folder / "report.dcm"]
    assert sorted(p.name for p in folder.iterdir()) == ["annotations.dcm", "probability_0.dcm", "report.dcm"]
    group = hd.ann.annread(paths[0]).get_annotation_groups()[0]
    np.testing.assert_array_equal(np.vstack(group.get_graphic_data("2D")), detections[:, 1:])
    np.testing.assert_array_equal(group.get_measurements()[1][:, 0], detections[:, 0].astype(np.float32))
    # The GeoJSON's classification colour (200, 0, 0) as the group's recommended display colour.
    assert list(group.RecommendedDisplayCIELabValue) == list(hd.color.CIELabColor.from_rgb(200, 0, 0).value)
    np.testing.assert_array_equal(hd.seg.segread(paths[1]).get_total_pixel_matrix(rescale_fractional=False)[..., 0],
                                  prob)
    assert measurements(hd.sr.srread(paths[2])) == {
        "slide_a slide result": [("Probability of cancer", 0.87451, "1"),
                                 ("Number of metastatic tumour detections", 2.0, "1")],
        "run metrics": [("froc", 0.25, "1")]}
    for path in paths:
        assert_valid(path)


def test_export_dmmn_run(source, tmp_path):
    from pathbundles.slide_segmentation import _write_regions_geojson

    name = "slide_b"
    labels = np.full((1517, 2527), 3, np.uint8)
    labels[100:300, 400:700] = 1
    labels[0:50, 0:50] = 6
    classes = {1: "carcinoma", 2: "benign epithelium", 3: "stroma", 4: "necrosis", 5: "adipose", 6: "background"}
    write_pyramid_tiff(tmp_path / "labels" / f"{name}.tif", labels, mpp=0.5, compression="deflate", resample="nearest",
                       description={"classes": {str(k): v for k, v in classes.items()},
                                    "colours": {"1": [255, 0, 0], "3": [0, 255, 0]}})
    exterior = np.array([[800.0, 200.0], [1400.0, 200.0], [1400.0, 600.0], [800.0, 600.0]])
    hole = np.array([[1000.0, 300.0], [1100.0, 300.0], [1100.0, 400.0]])
    _write_regions_geojson(tmp_path / "regions" / f"{name}.geojson", {"carcinoma": [(exterior, [hole], 60000)]},
                           {"carcinoma": (255, 0, 0)}, 16.0, f"{name}/regions")
    areas = {"carcinoma": 0.015, "stroma": 0.9}
    (tmp_path / "areas").mkdir()
    (tmp_path / "areas" / f"{name}.json").write_text(json.dumps(
        {"classes": {k: {"id": i, "area_mm2": v} for i, (k, v) in enumerate(areas.items(), start=1)}}))
    paths = dw.export_slide_results(tmp_path, name, [source], DMMN_INFO)
    n_levels = 4  # 2527 x 1517 halved down to a smaller side <= 256 px: 1517, 759, 380, 190
    assert [p.name for p in paths] == ["annotations.dcm", *(f"labels_{k}.dcm" for k in range(n_levels)),
                                       "report.dcm"]
    regions, holes = hd.ann.annread(paths[0]).get_annotation_groups()
    np.testing.assert_array_equal(regions.get_graphic_data("2D")[0], exterior)
    np.testing.assert_array_equal(holes.get_graphic_data("2D")[0], hole)
    segs = [hd.seg.segread(p) for p in paths[1:-1]]
    assert len(segs[0].SegmentSequence) == 6 and len({s.PyramidUID for s in segs}) == 1
    carcinoma, stroma = segs[0].SegmentSequence[0], segs[0].SegmentSequence[2]
    assert list(carcinoma.RecommendedDisplayCIELabValue) == list(hd.color.CIELabColor.from_rgb(255, 0, 0).value)
    assert list(stroma.RecommendedDisplayCIELabValue) == list(hd.color.CIELabColor.from_rgb(0, 255, 0).value)
    assert "RecommendedDisplayCIELabValue" not in segs[0].SegmentSequence[1]
    assert list(regions.RecommendedDisplayCIELabValue) == list(hd.color.CIELabColor.from_rgb(255, 0, 0).value)
    np.testing.assert_array_equal(segs[0].get_total_pixel_matrix(combine_segments=True), labels)
    assert segs[3].get_total_pixel_matrix(combine_segments=True)[100 // 8 + 1, 500 // 8] == 1
    assert [float(v) for v in segs[3].SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing] == \
        [0.004, 0.004]
    assert measurements(hd.sr.srread(paths[-1])) == {"slide_b carcinoma area": [("Area", 0.015, "mm2")],
                                                     "slide_b stroma area": [("Area", 0.9, "mm2")]}
    for path in paths:
        assert_valid(path)


def test_export_segmitos_box_and_a_concatenation_source(tmp_path):
    """SegMitos' detections of a slide box (GeoJSON in level-0 px of the slide, counts in hpf_counts.csv); the
    source is one instance of a Concatenation, so the annotations reference the Concatenation Source."""
    source = synthetic_source()
    source.ConcatenationUID, source.SOPInstanceUIDOfConcatenationSource = generate_uid(), generate_uid()
    source.InConcatenationNumber, source.ConcatenationFrameOffsetNumber = 1, 0
    name = "slide_d_x1024_y512"
    detections = np.array([[0.8125, 1100.5, 600.5], [0.625, 1300.0, 700.0]])
    write_detections_geojson(tmp_path / "detections" / f"{name}.geojson", detections, mpp=MPP, class_name="Mitosis")
    (tmp_path / "hpf_counts.csv").write_text(f"name,n_detections,max_score\n{name},2,0.8125\n")
    info = {"bundle": "segmitos", "name": "SegMitos mitosis detection", "version": "0.4.0"}
    annotations, report = dw.export_slide_results(tmp_path, name, [source], info)
    ann = hd.ann.annread(annotations)
    assert ann.ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUIDOfConcatenationSource
    (group,) = ann.get_annotation_groups()
    assert group.label == "mitotic figure" and group.annotated_property_type.value == "4421005"  # SCT Cell
    np.testing.assert_array_equal(np.vstack(group.get_graphic_data("2D")), detections[:, 1:])
    assert ann.DeviceSerialNumber == "weights-unknown" and ann.SeriesNumber == 9031
    assert measurements(hd.sr.srread(report)) == {
        f"{name} slide result": [("Probability", 0.8125, "1"), ("Number of mitotic figure detections", 2.0, "1")]}
    for path in (annotations, report):
        assert_valid(path)


def test_export_leaves_out_map_levels_over_the_pixel_budget(source, tmp_path, caplog):
    labels = np.zeros((1517, 2527), np.uint8)
    labels[:8, :8] = 1
    write_pyramid_tiff(tmp_path / "labels" / "e.tif", labels, mpp=0.5, resample="nearest",
                       description={"classes": {"1": "carcinoma"}})
    assert len(dw.export_slide_results(tmp_path, "e", [source], DMMN_INFO)) == 4
    paths = dw.export_slide_results(tmp_path, "e", [source], DMMN_INFO, max_map_pixels=1000 * 1000)
    assert [p.name for p in paths] == ["labels_0.dcm", "labels_1.dcm", "labels_2.dcm"]
    assert sorted(p.name for p in paths[0].parent.iterdir()) == [p.name for p in paths]  # the earlier 4th: gone
    assert "level 0 (2527 x 1517 px) is over 1000000 pixels" in caplog.text
    seg = hd.seg.segread(paths[0])
    assert (seg.TotalPixelMatrixColumns, seg.TotalPixelMatrixRows) == (1264, 759)
    assert seg.get_total_pixel_matrix(combine_segments=True)[3, 3] == 1


def test_export_errors_name_the_slide_and_file(source, tmp_path):
    with pytest.raises(InputError, match="slide nothing: no results to export"):
        dw.export_slide_results(tmp_path, "nothing", [source], INFO)
    write_scannet_outputs(tmp_path, "slide_c")
    geojson = tmp_path / "detections" / "slide_c.geojson"
    doc = json.loads(geojson.read_text())
    doc["properties"]["mpp"] = 0.5
    geojson.write_text(json.dumps(doc))
    with pytest.raises(InputError, match=r"slide_c.geojson: slide slide_c: the run read the slide at level-0 0.5 "
                                         r"um/px, the DICOM source has 0.2527 um/px"):
        dw.export_slide_results(tmp_path, "slide_c", [source], INFO)
    geojson.write_text("{not json")
    with pytest.raises(InputError, match="slide_c.geojson, line 1: slide slide_c: invalid JSON"):
        dw.export_slide_results(tmp_path, "slide_c", [source], INFO)
    # A slide without detections (no tissue) and score 0: the report only.
    write_detections_geojson(tmp_path / "detections" / "empty.geojson", np.zeros((0, 3)), mpp=MPP)
    (tmp_path / "slide_scores.csv").write_text("name,score,n_detections\nempty,0.000000,0\n")
    (report,) = dw.export_slide_results(tmp_path, "empty", [source], INFO)
    assert report.name == "report.dcm"
    shutil.rmtree(tmp_path / "dicom")
    with pytest.raises(InputError, match="outputs are named by one plain file name"):
        dw.export_slide_results(tmp_path, "../escape", [source], INFO)
    assert not (tmp_path / "dicom").exists()  # nothing half-written


def test_source_as_orthanc_s_dicomizer_writes_it(source, tmp_path, caplog):
    """OrthancWSIDicomizer writes no Frame of Reference UID and no specimen description: every result of the series
    gets the same frame of reference, derived from the SeriesInstanceUID, with a warning naming the instance, and a
    specimen description naming the container (Type 1 in the Specimen module); the source is left as it was."""
    del source.FrameOfReferenceUID
    del source.SpecimenDescriptionSequence
    write_scannet_outputs(tmp_path, "slide_a")
    with caplog.at_level("WARNING", logger="pathbundles.dicom_writers"):
        paths = dw.export_slide_results(tmp_path, "slide_a", [source], INFO)
    assert "FrameOfReferenceUID" not in source
    assert f"DICOM source image {source.SOPInstanceUID} states no Frame of Reference UID" in caplog.text
    uids = {str(dcmread(p, stop_before_pixels=True).FrameOfReferenceUID) for p in paths}
    again = dw._source_with_frame_of_reference(source).FrameOfReferenceUID
    assert uids == {again} and again.startswith("1.2.826.0.1.3680043.8.498.")  # pydicom's root, deterministic
    specimens = {(str(d.SpecimenIdentifier), str(d.SpecimenUID)) for p in paths
                 for d in dcmread(p, stop_before_pixels=True).get("SpecimenDescriptionSequence", [])}
    assert len(specimens) == 1 and next(iter(specimens))[0] == source.ContainerIdentifier
    for path in paths:
        assert_valid(path)
