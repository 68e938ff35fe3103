"""DICOM whole-slide images (`pathbundles.dicom_wsi`): real DICOM WSI files, a phantom DICOMized by Orthanc's
OrthancWSIDicomizer (no ImageType, uneven downsamples), series edited with pydicom (no pixel spacing, hostile
container identifiers, a concatenation), datalists of DICOM sources, and lazy reads from a live Orthanc over
DICOMweb."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from mlflow_fixtures import free_port
from orthanc_fixtures import dicomize, orthanc_url  # noqa: F401 - the fixture
from test_level_check import LEVEL_SIZES, MPP, pyramid_levels, write_pyramid

from pathbundles import dicom_wsi
from pathbundles.bundle import _read_manifest, datalist
from pathbundles.dicom_wsi import DicomSlide, dicomweb_series, is_dicom_source
from pathbundles.dicomweb import DicomWebSeries, redact, series_url, store_instances
from pathbundles.errors import InputError, SlideError
from pathbundles.outputs import check_name, output_file, output_names, slide_name
from pathbundles.resample import resample_area
from pathbundles.wsi import open_slide

CONTAINER = "PHANTOM-7"
STUDY, SERIES = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"

#: The series of the real JPEG instances: they state no ContainerIdentifier, so their outputs go by the series UID.
NO_CONTAINER_SERIES = "1.3.6.1.4.1.11129.5.7.0.1.517182092386.24422120.1688792467737634"
#: The real DICOM WSI files: (file, level-0 size, series name).
REAL = [("multi_frame_jpeg2000_camelyon_challenge_image.dcm", (1696, 812), "GO-1692287590758-1-A-0"),
        ("multi_frame_jpeg_camelyon_challenge_image.dcm", (1152, 700), NO_CONTAINER_SERIES),
        ("multiframe_camelyon_challenge_image.dcm", (1152, 700), NO_CONTAINER_SERIES)]


# ---- DICOMweb references -------------------------------------------------------------------------------------------


def test_dicomweb_series() -> None:
    ref = dicomweb_series(f"HTTPS://PACS.example.org:8443/dicom-web/studies/{STUDY}/series/{SERIES}/")
    assert ref == DicomWebSeries("https://pacs.example.org:8443/dicom-web", STUDY, SERIES)
    assert dicomweb_series(ref.url) == ref
    assert dicomweb_series(f"http://127.0.0.1/studies/{STUDY}/series/{SERIES}").base_url == "http://127.0.0.1"


@pytest.mark.parametrize("url, problem", [
    (f"ftp://host/studies/{STUDY}/series/{SERIES}", "scheme"),
    (f"file:///studies/{STUDY}/series/{SERIES}", "scheme"),
    (f"http://user:secret@host/studies/{STUDY}/series/{SERIES}", "credentials"),
    (f"http://host/studies/{STUDY}/series/{SERIES}?x=1", "query"),
    (f"http://host:99999/studies/{STUDY}/series/{SERIES}", "port"),
    (f"http:///studies/{STUDY}/series/{SERIES}", "no host"),
    (f"http://host/studies/{STUDY}", "does not end"),
    (f"http://host/studies/{STUDY}/series/{SERIES}/instances/1.2", "does not end"),
    (f"http://host/studies/../../etc/series/{SERIES}", "does not end"),
    (f"http://host/studies/1..2/series/{SERIES}", "StudyInstanceUID"),
    (f"http://host/studies/1.02/series/{SERIES}", "StudyInstanceUID"),
    (f"http://host/studies/{STUDY}/series/1.2.3a", "SeriesInstanceUID"),
    (f"http://host/studies/{STUDY}/series/1." + "2" * 64, "SeriesInstanceUID"),
    (f"http://host/studies/{STUDY} /series/{SERIES}", "space"),
])
def test_dicomweb_series_refuses(url: str, problem: str) -> None:
    with pytest.raises(InputError, match=problem) as err:
        dicomweb_series(url)
    assert err.value.path == redact(url) and "secret" not in str(err.value)  # credentials never shown


def test_dicomweb_url_is_kept_as_given_by_the_slide() -> None:
    bad = f"http://host/studies/{STUDY}/series/x"
    with pytest.raises(SlideError) as err:
        open_slide(bad)
    assert str(err.value).startswith(bad + ":")  # not mangled by Path ('http:/host')


# ---- real DICOM WSI files ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, size, series", REAL)
def test_real_dicom_instances(shared_data: Path, name: str, size: tuple[int, int], series: str) -> None:
    path = shared_data / "dicom_camelyon_thumbnails" / name
    with open_slide(path) as slide, open_slide(path, backend="openslide") as reference:
        assert slide.backend == "dicom" and slide.level_dimensions == [size]
        assert slide.mpp == pytest.approx((28.969, 28.968), abs=1e-3)
        assert slide.series_name == series and slide_name(str(path))[0] == series
        ours = slide.read_level_region(0, (0, 0), size).astype(int)
        theirs = reference.read_level_region(0, (0, 0), size).astype(int)
        assert np.abs(ours - theirs).mean() <= 1.0  # the same JPEG / JPEG 2000 frames, decoded by other codecs
        assert ours.std() > 10  # tissue, not a blank frame
        (source,) = slide.source_datasets()
        assert "PixelData" not in source and source.SOPInstanceUID == pydicom.dcmread(
            path, stop_before_pixels=True).SOPInstanceUID


def test_real_dicom_folder(shared_data: Path) -> None:
    folder = shared_data / "dicom_camelyon_thumbnails"
    items = datalist(folder)  # two series; one instance stored twice (two encodings) counts once
    assert [item["name"] for item in items] == [NO_CONTAINER_SERIES, "GO-1692287590758-1-A-0"]
    assert all(Path(item["image"]).parent == folder for item in items)
    with pytest.raises(SlideError, match="holds 2 DICOM series"):
        open_slide(folder)


# ---- a DICOMized phantom ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom_tiff(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pyramidal JPEG TIFF of a phantom slide at 0.2527 um/px with uneven levels (downsamples 3.7, 13.7)."""
    from pathbundles.phantom import make_metastasis_dataset

    folder = tmp_path_factory.mktemp("phantom")
    make_metastasis_dataset(folder, n=1, size_px=LEVEL_SIZES[0], mpp=MPP)
    with open_slide(next(folder.glob("*.tif")), backend="tifffile") as slide:
        level0 = slide.read_level_region(0, (0, 0), slide.dimensions)
    return write_pyramid(folder / "uneven.tif", pyramid_levels(level0), compression="jpeg")


@pytest.fixture(scope="module")
def dicomized(phantom_tiff: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``phantom_tiff`` converted by OrthancWSIDicomizer (tiles copied, no ImageType, no SeriesDescription),
    container PHANTOM-7."""
    out = tmp_path_factory.mktemp("dicomized")
    files = dicomize(phantom_tiff, out, mpp=MPP, dataset={"ContainerIdentifier": CONTAINER, "SeriesDescription": ""})
    assert len(files) == len(LEVEL_SIZES)
    return out


def rewrite(source: Path, target: Path, edit: Callable[[pydicom.Dataset], None]) -> Path:
    """Copy the series in ``source`` to ``target`` (created), passing every dataset through ``edit``."""
    target.mkdir(parents=True)
    for path in sorted(source.glob("*.dcm")):
        dataset = pydicom.dcmread(path)
        edit(dataset)
        dataset.save_as(target / path.name, enforce_file_format=True)
    return target


def new_series(dataset: pydicom.Dataset, container: str | None, series_uid: str) -> None:
    dataset.SeriesInstanceUID = series_uid
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = f"{series_uid}.{dataset.InstanceNumber}"
    if container is None:
        del dataset.ContainerIdentifier
    else:
        dataset.ContainerIdentifier = container


@pytest.mark.parametrize("pick", ["folder", "file"])
def test_dicomized_phantom(dicomized: Path, phantom_tiff: Path, pick: str, caplog: pytest.LogCaptureFixture) -> None:
    source = dicomized if pick == "folder" else dicomized / "level-000001.dcm"  # any instance names the series
    dicom_wsi._warned_patched.discard(str(source))
    with caplog.at_level(logging.WARNING), open_slide(source) as slide, \
            open_slide(phantom_tiff, backend="tifffile") as tiff:
        assert isinstance(slide, DicomSlide) and slide.vendor == "dicom"
        assert slide.level_dimensions == LEVEL_SIZES
        assert slide.mpp == pytest.approx((MPP, MPP), rel=1e-6)
        assert slide.level_mpp(1) == pytest.approx((MPP * 2048 / 554, MPP * 1536 / 415), rel=1e-6)  # not 2**k
        for level, (w, h) in enumerate(LEVEL_SIZES):  # the dicomizer copies the JPEG tiles: the same pixels
            np.testing.assert_array_equal(slide.read_level_region(level, (0, 0), (w, h)),
                                          tiff.read_level_region(level, (0, 0), (w, h)))
        origin = (700.5, 300.25)
        # The same resampling; the mpp differ by float rounding (DICOM decimal vs TIFF rational): 1 grey level.
        resampled = slide.read_region(origin, (120, 90), 1.0).astype(int) - tiff.read_region(origin, (120, 90), 1.0)
        assert np.abs(resampled).max() <= 1
        assert all(slide._level_agrees(level) for level in range(slide.level_count))
        assert slide.series_name == CONTAINER and slide_name(str(source))[0] == CONTAINER
        (level0,) = slide.source_datasets()
        assert "PixelData" not in level0 and level0.TotalPixelMatrixColumns == LEVEL_SIZES[0][0]
        assert level0.SOPInstanceUID == pydicom.dcmread(dicomized / "level-000000.dcm").SOPInstanceUID
        assert slide.info()["path"] == str(source)
    with open_slide(source):  # said once per process: DataLoader workers reopen slides
        pass
    patched = [r.getMessage() for r in caplog.records if "no usable ImageType" in r.getMessage()]
    assert patched == [f"{source}: 3 DICOM instance(s) state no usable ImageType (as OrthancWSIDicomizer writes): "
                       "read as VOLUME (pyramid level) instances"]


def test_mislabelled_level_is_skipped(dicomized: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The issue's converter fault: a generated level's YCbCr JPEG frames tagged RGB decode pink. The level check
    skips that level with a warning, and a read at its resolution comes from level 0 instead."""
    def mislabel_level1(dataset: pydicom.Dataset) -> None:
        if dataset.TotalPixelMatrixColumns == LEVEL_SIZES[1][0]:
            dataset.PhotometricInterpretation = "RGB"

    folder = rewrite(dicomized, tmp_path / "pink", mislabel_level1)
    with caplog.at_level(logging.WARNING), open_slide(folder) as slide, open_slide(dicomized) as sound:
        stored = slide.read_level_region(1, (0, 0), LEVEL_SIZES[1]).astype(int)
        assert np.abs(stored - sound.read_level_region(1, (0, 0), LEVEL_SIZES[1])).mean() > 20  # decoded pink
        (mpp_x, mpp_y), wanted = slide.mpp, 1.2 * max(slide.level_mpp(1))  # level 1 would be read for it
        assert sound._level_for(wanted) == 1 and slide._level_for(wanted) == 0
        level0 = sound.read_level_region(0, (0, 0), LEVEL_SIZES[0])
        box = (800, 600, 800 + 50 * wanted / mpp_x, 600 + 40 * wanted / mpp_y)
        np.testing.assert_array_equal(slide.read_region((800, 600), (50, 40), wanted),
                                      resample_area(level0, box, (50, 40)))  # level 0, area-averaged
    (warning,) = [r.getMessage() for r in caplog.records if "is not used" in r.getMessage()]
    assert warning.startswith(f"{folder}: pyramid level 1 (554 x 415 px) is not used: its colour differs")


def test_single_file_falls_back_to_openslide(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A .dcm that wsidicom refuses goes on to OpenSlide 4, which reads single DICOM files."""
    def refuse(self: DicomSlide) -> None:
        raise RuntimeError("refused for the test")

    monkeypatch.setattr(DicomSlide, "_open", refuse)
    path = shared_data / "dicom_camelyon_thumbnails" / REAL[0][0]
    with open_slide(path) as slide:
        assert slide.backend == "openslide" and slide.dimensions == REAL[0][1]


def test_pickle_reopens_the_series(dicomized: Path) -> None:
    with open_slide(dicomized) as slide:
        again = pickle.loads(pickle.dumps(slide))
        assert again.source == str(dicomized) and again.level_dimensions == LEVEL_SIZES
        again.close()


def test_missing_pixel_spacing(dicomized: Path, tmp_path: Path) -> None:
    def drop_spacing(dataset: pydicom.Dataset) -> None:
        del dataset.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing

    folder = rewrite(dicomized, tmp_path / "no_spacing", drop_spacing)
    with pytest.raises(SlideError, match="state no pixel spacing") as err:
        open_slide(folder)
    assert err.value.path == str(folder) and "slide_mpp" in str(err.value)
    with open_slide(folder, mpp=MPP) as slide:  # the level-0 mpp given: usable
        assert slide.level_mpp(0) == (MPP, MPP)


@pytest.mark.parametrize("container, expected", [("../../x", "_.._x"), ("/etc/passwd", "_etc_passwd"),
                                                 ("..", "EMPTY"), ("a b\\c\n", "a_b_c_")])
def test_hostile_container_identifier(dicomized: Path, tmp_path: Path, container: str, expected: str) -> None:
    series_uid = "1.2.826.0.1.3680043.8.498.77"
    folder = rewrite(dicomized, tmp_path / "series", lambda ds: new_series(ds, container, series_uid))
    with open_slide(folder) as slide:
        name = slide.series_name
    assert name == (series_uid if expected == "EMPTY" else expected)  # nothing left: the series UID names it
    assert check_name(name, folder) == name and dicom_wsi.series_name(str(folder)) == name
    assert output_file(tmp_path / "out", "detections", name, ".csv").parent == tmp_path / "out" / "detections"


def test_concatenation(dicomized: Path, tmp_path: Path) -> None:
    """Level 0 split into two concatenation parts (two SOP instances, frames 1-20 and 21-48) reads as before."""
    from pydicom.encaps import encapsulate, generate_frames

    folder = shutil.copytree(dicomized, tmp_path / "concatenated")
    whole = pydicom.dcmread(folder / "level-000000.dcm")
    frames = list(generate_frames(whole.PixelData, number_of_frames=int(whole.NumberOfFrames)))
    source_uid = whole.SOPInstanceUID
    (folder / "level-000000.dcm").unlink()
    for number, (first, last) in enumerate([(0, 20), (20, len(frames))], start=1):
        part = pydicom.dcmread(dicomized / "level-000000.dcm")
        part.SOPInstanceUID = part.file_meta.MediaStorageSOPInstanceUID = f"{source_uid}.{number}"
        part.ConcatenationUID = f"{source_uid}.9"
        part.SOPInstanceUIDOfConcatenationSource = source_uid
        part.InConcatenationNumber, part.InConcatenationTotalNumber = number, 2
        part.ConcatenationFrameOffsetNumber = first
        part.NumberOfFrames = last - first
        # The dicomizer writes TILED_SPARSE: each frame's position in a Per-Frame Functional Groups item.
        part.PerFrameFunctionalGroupsSequence = whole.PerFrameFunctionalGroupsSequence[first:last]
        part.PixelData = encapsulate(frames[first:last])
        part.save_as(folder / f"part-{number}.dcm", enforce_file_format=True)
    with open_slide(folder) as parts, open_slide(dicomized) as whole_slide:
        assert parts.level_dimensions == LEVEL_SIZES and len(parts.source_datasets()) == 2
        np.testing.assert_array_equal(parts.read_level_region(0, (0, 0), LEVEL_SIZES[0]),
                                      whole_slide.read_level_region(0, (0, 0), LEVEL_SIZES[0]))


# ---- datalists -----------------------------------------------------------------------------------------------------


def test_datalists_of_dicom(dicomized: Path, tmp_path: Path) -> None:
    root = tmp_path / "cohort"
    shutil.copytree(dicomized, root / "first")
    rewrite(dicomized, root / "second", lambda ds: new_series(ds, "SECOND", "1.2.826.0.1.3680043.8.498.78"))
    (root / "notes").mkdir()  # a subfolder without DICOM is no slide
    items = datalist(root)
    assert items == [{"image": str(root / "first"), "name": CONTAINER},
                     {"image": str(root / "second"), "name": "SECOND"}]
    assert output_names(items) == [CONTAINER, "SECOND"]
    # Loose instances of two series in one folder: one item per series, named by it.
    loose = tmp_path / "loose"
    loose.mkdir()
    for series in ("first", "second"):
        for path in (root / series).glob("*.dcm"):
            shutil.copy(path, loose / f"{series}-{path.name}")
    assert [(Path(i["image"]).name, i["name"]) for i in datalist(loose)] == [
        ("first-level-000000.dcm", CONTAINER), ("second-level-000000.dcm", "SECOND")]
    # One instance, also without a suffix (PACS exports): its series, never read as a text manifest.
    single = datalist(root / "second" / "level-000002.dcm", existing=True)
    assert single == [{"image": str(root / "second" / "level-000002.dcm"), "name": "SECOND"}]
    bare = tmp_path / "IM0001"
    shutil.copy(root / "first" / "level-000000.dcm", bare)
    assert datalist(bare) == [{"image": str(bare), "name": CONTAINER}]
    # A manifest of series folders, checked to exist; a URL line stays a URL.
    manifest = tmp_path / "slides.txt"
    manifest.write_text("cohort/first\ncohort/second\n")
    assert [i["name"] for i in datalist(manifest, existing=True)] == [CONTAINER, "SECOND"]
    url = f"http://127.0.0.1:9/dicom-web/studies/{STUDY}/series/{SERIES}"
    manifest.write_text(f"cohort/first\n{url}\n")
    assert _read_manifest(manifest, "slide", "")[1][1] == {"image": url}
    # Two series with one name: the outputs would collide.
    rewrite(dicomized, root / "third", lambda ds: new_series(ds, "SECOND", "1.2.826.0.1.3680043.8.498.79"))
    with pytest.raises(InputError, match="'SECOND' is the same name"):
        output_names(datalist(root))
    # A JSON datalist's URL image is kept as it is (not joined to the datalist's folder).
    doc = tmp_path / "datalist.json"
    doc.write_text(json.dumps({"items": [{"image": url, "name": "remote"}, {"image": "cohort/first"}]}))
    items = datalist(doc, existing=True)
    assert items == [{"image": url, "name": "remote"}, {"image": str(root / "first"), "name": CONTAINER}]


def test_deploy_input_of_one_dcm(dicomized: Path) -> None:
    from pathbundles.deploy.runtime import slide_list

    assert slide_list(dicomized / "level-000000.dcm", kind="metastasis") == [
        {"image": str(dicomized / "level-000000.dcm"), "name": CONTAINER}]
    assert slide_list(dicomized, kind="metastasis") == [{"image": str(dicomized), "name": CONTAINER}]


def test_is_dicom_source(dicomized: Path, phantom_tiff: Path, tmp_path: Path) -> None:
    assert is_dicom_source(str(dicomized)) and is_dicom_source(dicomized / "level-000000.dcm")
    assert is_dicom_source(f"https://host/studies/{STUDY}/series/{SERIES}")
    assert not is_dicom_source(phantom_tiff) and not is_dicom_source(tmp_path) and not is_dicom_source(None)


def test_cli_info_on_a_series_folder(dicomized: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "common")}
    done = subprocess.run([os.sys.executable, "-m", "pathbundles", "info", str(dicomized)], env=env,
                          capture_output=True, text=True, check=True)
    info = json.loads(done.stdout)
    assert info["backend"] == "dicom" and [(lv["width"], lv["height"]) for lv in info["levels"]] == LEVEL_SIZES
    assert info["mpp"] == pytest.approx([MPP, MPP])


# ---- DICOMweb against a live Orthanc -------------------------------------------------------------------------------


def test_unreachable_dicomweb_server() -> None:
    url = f"http://127.0.0.1:{free_port()}/dicom-web/studies/{STUDY}/series/{SERIES}"  # nothing listens there
    with pytest.raises(SlideError, match="cannot open the series on the DICOMweb server: ConnectionError") as err:
        open_slide(url)
    assert err.value.path == url
    with pytest.raises(InputError, match="cannot read the series from the DICOMweb server") as err:
        datalist(url)
    assert err.value.path == url


def test_dicomweb_reads_lazily(orthanc_url: str, dicomized: Path,  # noqa: F811 - the fixture
                               monkeypatch: pytest.MonkeyPatch) -> None:
    import requests

    (first, *_) = store_instances(orthanc_url, [dicomized])["stored"]
    url = series_url(orthanc_url, first["study_instance_uid"], first["series_instance_uid"])
    frame_requests: list[str] = []
    send = requests.Session.send

    def counting_send(self: requests.Session, request: requests.PreparedRequest, **kwargs: object) -> object:
        if "/frames/" in request.url:
            frame_requests.append(request.url)
        return send(self, request, **kwargs)

    monkeypatch.setattr(requests.Session, "send", counting_send)
    with open_slide(url) as remote, open_slide(dicomized) as local:
        assert remote.backend == "dicom" and remote.path == url and remote.level_dimensions == LEVEL_SIZES
        assert remote.mpp == pytest.approx(local.mpp) and remote.series_name == CONTAINER
        # Opening fetched metadata and, where the server lists no transfer syntaxes, wsidicom's probe of the first
        # frame of each instance (of the 48 + 6 + 1 frames).
        probes = len(frame_requests)
        assert probes <= len(LEVEL_SIZES) and all(u.endswith("/frames/1") for u in frame_requests), frame_requests
        # x and y 200..399 px of level 0 lie on 256 px tiles (0..1, 0..1): 4 frames of its 48.
        region = remote.read_level_region(0, (200, 200), (200, 200))
        np.testing.assert_array_equal(region, local.read_level_region(0, (200, 200), (200, 200)))
        frames = [int(n) for u in frame_requests[probes:] for n in u.rsplit("/frames/", 1)[1].split(",")]
        assert len(frames) == len(set(frames)) == 4, frame_requests
        fetched = len(frame_requests)
        remote.read_level_region(0, (210, 220), (150, 150))  # the same frames: from the frame cache
        assert len(frame_requests) == fetched
        assert "PixelData" not in remote.source_datasets()[0]
    assert datalist(url) == [{"image": url, "name": CONTAINER}]
    assert slide_name({"image": url}) == (CONTAINER, url)
