"""The DICOMweb client (:mod:`pathbundles.dicomweb`) and ``python -m pathbundles dicom`` against a real Orthanc
(tests/orthanc_fixtures.py) with the real DICOM WSI instances of ../shared/data, and against a hostile server."""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from orthanc_fixtures import orthanc_url  # noqa: F401 - the fixture

from mlflow_fixtures import free_port
from pathbundles.dicomweb import (DicomWebError, check_uid, fetch_series, find_series, parse_series_url, redact,
                                  series_url, store_instances, validate_url)
from pathbundles.errors import InputError

#: The real instances in ../shared/data: two series (JPEG 2000 and JPEG); the third file is the JPEG one again
#: under another encoding, with the same SOPInstanceUID.
THUMBNAILS = "dicom_camelyon_thumbnails"
JPEG2000 = "multi_frame_jpeg2000_camelyon_challenge_image.dcm"
JPEG = "multiframe_camelyon_challenge_image.dcm"
JPEG_AGAIN = "multi_frame_jpeg_camelyon_challenge_image.dcm"


@pytest.fixture
def thumbnails(shared_data: Path) -> dict[str, Path]:
    """{file name: path} of the real DICOM WSI instances."""
    return {name: shared_data / THUMBNAILS / name for name in (JPEG2000, JPEG, JPEG_AGAIN)}


def pathbundles(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pathbundles", *args], capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------------------------------------ URLs and UIDs

def test_urls_and_uids_are_checked_before_use() -> None:
    assert validate_url(" http://127.0.0.1:8042/dicom-web/ ") == "http://127.0.0.1:8042/dicom-web"
    with pytest.raises(DicomWebError, match="credentials") as caught:
        validate_url("https://alice:s3cret@pacs.example.org/dicom-web")
    assert "s3cret" not in str(caught.value) and "***@pacs.example.org" in str(caught.value)
    for url, problem in (("file:///etc/passwd", "must start with http:// or https://, not file://"),
                         ("/srv/dicom", "not a path"), ("http:///dicom-web", "no host"),
                         ("http://host:port/x", "not a URL"), ("http://h/dicom-web?x=1", "no query")):
        with pytest.raises(DicomWebError, match=problem):
            validate_url(url)
    assert redact("http://bob:pw@h:1/p") == "http://***@h:1/p" and redact("http://h/p") == "http://h/p"

    study, series = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
    url = series_url("http://h:8042/dicom-web/", study, series)
    assert url == f"http://h:8042/dicom-web/studies/{study}/series/{series}"
    assert parse_series_url(url) == ("http://h:8042/dicom-web", study, series)
    for hostile in ("../../etc", "1.2/../3", "1.2.3 ", "", "1." + "2" * 64, "1..2", "ab.1"):
        with pytest.raises(DicomWebError, match="is not a DICOM UID"):
            check_uid(hostile)
    with pytest.raises(DicomWebError, match="is not a DICOM UID"):
        parse_series_url(f"http://h/dicom-web/studies/{study}/series/..")
    with pytest.raises(DicomWebError, match="not a DICOMweb series URL"):
        parse_series_url("http://h/dicom-web/studies/1.2")


# ------------------------------------------------------------------------------------------------ a real Orthanc

def test_store_find_and_fetch_real_slides(orthanc_url: str, thumbnails: dict[str, Path],  # noqa: F811
                                          tmp_path: Path) -> None:
    two_series = [thumbnails[JPEG2000], thumbnails[JPEG]]
    # A file that is not DICOM, or two files of one instance, are refused before anything is sent.
    text = tmp_path / "notes.dcm"
    text.write_text("not DICOM")
    with pytest.raises(InputError, match=r"notes.dcm: not a DICOM file"):
        store_instances(orthanc_url, [*two_series, text])
    with pytest.raises(InputError, match=r"multi_frame_jpeg_camelyon_challenge_image.dcm: SOPInstanceUID .* is also "
                                         r"that of .*multiframe_camelyon_challenge_image.dcm"):
        store_instances(orthanc_url, [thumbnails[JPEG], thumbnails[JPEG_AGAIN]])
    assert find_series(orthanc_url) == []

    stored = store_instances(orthanc_url, two_series)
    sources = {p: pydicom.dcmread(p) for p in two_series}
    assert stored["n_stored"] == 2
    assert [(s["file"], s["sop_instance_uid"], s["series_instance_uid"]) for s in stored["stored"]] == [
        (str(p), ds.SOPInstanceUID, ds.SeriesInstanceUID) for p, ds in sources.items()]
    assert {s["sop_class_uid"] for s in stored["stored"]} == {"1.2.840.10008.5.1.4.1.1.77.1.6"}

    found = find_series(orthanc_url, modality="SM")
    assert sorted((s["StudyInstanceUID"], s["SeriesInstanceUID"]) for s in found) == sorted(
        (ds.StudyInstanceUID, ds.SeriesInstanceUID) for ds in sources.values())
    assert {s["NumberOfSeriesRelatedInstances"] for s in found} == {1}
    assert find_series(orthanc_url, modality="SEG") == []
    source = sources[thumbnails[JPEG2000]]
    (only,) = find_series(orthanc_url, study=source.StudyInstanceUID)
    assert only["SeriesInstanceUID"] == source.SeriesInstanceUID and only["Modality"] == "SM"
    assert only["url"] == series_url(orthanc_url, source.StudyInstanceUID, source.SeriesInstanceUID)
    assert only["SeriesDescription"] == source.SeriesDescription and only["PatientID"] == source.PatientID

    for path, ds in sources.items():
        dest = tmp_path / "fetched"
        files = fetch_series(orthanc_url, ds.StudyInstanceUID, ds.SeriesInstanceUID, dest)
        assert files == [dest / f"{ds.SOPInstanceUID}.dcm"]
        fetched = pydicom.dcmread(files[0])
        # As stored: the same transfer syntax (JPEG 2000, JPEG baseline) and the same compressed frames, byte for byte.
        assert fetched.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        assert fetched.PixelData == ds.PixelData and fetched.NumberOfFrames == ds.NumberOfFrames
        assert (fetched.TotalPixelMatrixColumns, fetched.TotalPixelMatrixRows) == (ds.TotalPixelMatrixColumns,
                                                                                   ds.TotalPixelMatrixRows)
        before = files[0].read_bytes()
        assert fetch_series(orthanc_url, ds.StudyInstanceUID, ds.SeriesInstanceUID, dest) == files  # kept as is
        assert files[0].read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "fetched").iterdir()) == sorted(
        f"{ds.SOPInstanceUID}.dcm" for ds in sources.values())  # no temporary file left

    # A different file under an instance's name is not replaced.
    clash = tmp_path / "clash"
    clash.mkdir()
    (clash / f"{source.SOPInstanceUID}.dcm").write_bytes(b"mine")
    with pytest.raises(DicomWebError, match="exists with other content; not replaced"):
        fetch_series(orthanc_url, source.StudyInstanceUID, source.SeriesInstanceUID, clash)
    assert (clash / f"{source.SOPInstanceUID}.dcm").read_bytes() == b"mine"

    # Errors name the URL and the HTTP status.
    with pytest.raises(DicomWebError, match=r"/series/1\.2\.3: WADO-RS \(retrieve series\) failed with HTTP 404"):
        fetch_series(orthanc_url, source.StudyInstanceUID, "1.2.3", tmp_path / "none")


def test_cli_send_find_fetch(orthanc_url: str, thumbnails: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    folder = tmp_path / "to-send"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(thumbnails[JPEG2000].read_bytes())
    (folder / "readme.txt").write_text("not sent: a folder gives its .dcm files")
    run = pathbundles("dicom", "send", orthanc_url, str(folder), str(thumbnails[JPEG]))
    assert run.returncode == 0, run.stderr
    sent = json.loads(run.stdout)
    assert sent["n_stored"] == 2
    assert [s["file"] for s in sent["stored"]] == [str(folder / "a.dcm"), str(thumbnails[JPEG])]

    run = pathbundles("dicom", "find", orthanc_url, "--modality", "SM")
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    source = pydicom.dcmread(thumbnails[JPEG2000], stop_before_pixels=True)
    (series,) = [s for s in found["series"] if s["SeriesInstanceUID"] == source.SeriesInstanceUID]
    run = pathbundles("dicom", "find", orthanc_url, "--study", source.StudyInstanceUID)
    assert [s["SeriesInstanceUID"] for s in json.loads(run.stdout)["series"]] == [source.SeriesInstanceUID]

    run = pathbundles("dicom", "fetch", orthanc_url, series["StudyInstanceUID"], series["SeriesInstanceUID"],
                      str(tmp_path / "got"))
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    assert got["files"] == [str(tmp_path / "got" / f"{source.SOPInstanceUID}.dcm")]
    assert got["series_url"] == series["url"]
    assert pydicom.dcmread(got["files"][0]).PixelData == pydicom.dcmread(thumbnails[JPEG2000]).PixelData

    # Bad input: a clear message on stderr, exit status 2, no traceback.
    run = pathbundles("dicom", "send", orthanc_url, str(tmp_path / "got" / ".." / "nothing"))
    assert run.returncode == 2 and "nothing: no such file or folder" in run.stderr and "Traceback" not in run.stderr
    run = pathbundles("dicom", "find", "file:///etc")
    assert run.returncode == 2 and "must start with http:// or https://" in run.stderr


def _other_address() -> str | None:
    """This machine's address on its default route (no packet is sent), or None where it has none but loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only the route is looked up
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_orthanc_serves_this_machine_only(orthanc_url: str) -> None:  # noqa: F811
    """Orthanc 1.10 listens on every interface (no bind-address option); with RemoteAccessAllowed false it answers
    a client that is not on the loopback interface with 401 and serves nothing, and its DICOM server is off."""
    port = int(orthanc_url.split(":")[2].split("/")[0])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/system", timeout=5) as response:
        system = json.load(response)
    assert system["HttpPort"] == port
    with pytest.raises(ConnectionRefusedError):  # no DICOM (DIMSE) listener on the configured DICOM port
        socket.create_connection(("127.0.0.1", system["DicomPort"]), timeout=5).close()
    address = _other_address()
    if address is None:
        pytest.skip("this machine has no address but loopback: remote access cannot be tried")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://{address}:{port}/dicom-web/studies", timeout=5)
    assert refused.value.code == 401


def test_a_stopped_server_is_named(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    with pytest.raises(DicomWebError, match=rf"^{url}: QIDO-RS \(search for series\) failed: cannot connect"):
        find_series(url)
    with pytest.raises(DicomWebError, match=rf"^{url}/studies/1\.2/series/1\.3: WADO-RS .* cannot connect"):
        fetch_series(url, "1.2", "1.3", tmp_path)


# ------------------------------------------------------------------------------------------------ a hostile server

def _instance(sop_uid: str, study: str = "1.2.3", series: str = "1.2.4") -> bytes:
    """A small DICOM Part 10 file with the given UIDs, valid or not."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = "1.2.5"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "OT"
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


@contextlib.contextmanager
def _serving(handler: type) -> Iterator[str]:
    """A local HTTP server of ``handler`` on 127.0.0.1 and a free port, in a thread; yields its DICOMweb base URL and
    stops it (its request threads are daemons: a handler still dripping does not hold the test up)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def hostile_server() -> Iterator[tuple[str, list[bytes]]]:
    """A DICOMweb server that answers every WADO-RS request with the instances put in the yielded list."""
    instances: list[bytes] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            boundary = "hostile-boundary"
            body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n"
                            for part in instances) + b"--" + boundary.encode() + b"--\r\n"
            self.send_response(200)
            self.send_header("Content-Type", f'multipart/related; type="application/dicom"; boundary={boundary}')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    with _serving(Handler) as url:
        yield url, instances


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # pydicom's, while the test writes a hostile UID
@pytest.mark.parametrize("sop_uid", ["../../etc", "../../../tmp/x", "/etc/passwd", "1.2.3/../../4"])
def test_a_server_s_uid_never_becomes_a_path(hostile_server: tuple[str, list[bytes]], tmp_path: Path,
                                            sop_uid: str) -> None:
    url, instances = hostile_server
    instances.append(_instance(sop_uid))
    dest = tmp_path / "a" / "b" / "dest"
    with pytest.raises(DicomWebError, match="SOPInstanceUID .* is not a DICOM UID"):
        fetch_series(url, "1.2.3", "1.2.4", dest)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # nothing written anywhere


def test_a_server_s_instance_of_another_series_is_refused(hostile_server: tuple[str, list[bytes]],
                                                          tmp_path: Path) -> None:
    url, instances = hostile_server
    instances.append(_instance("1.2.9", series="1.2.99"))
    with pytest.raises(DicomWebError, match="instance 1.2.9 of SeriesInstanceUID '1.2.99', not of the series"):
        fetch_series(url, "1.2.3", "1.2.4", tmp_path)
    assert list(tmp_path.iterdir()) == []
    instances[:] = [_instance("1.2.10")]
    assert fetch_series(url, "1.2.3", "1.2.4", tmp_path) == [tmp_path / "1.2.10.dcm"]
    assert pydicom.dcmread(tmp_path / "1.2.10.dcm").SOPInstanceUID == "1.2.10"


def test_dicomized_phantom_goes_through_orthanc(orthanc_url: str, tmp_path: Path) -> None:  # noqa: F811
    """tests/orthanc_fixtures.dicomize: Orthanc's dicomizer on a phantom TIFF gives one tiled instance per level at
    the phantom's pixel spacing, named by its container identifier, without ImageType; stored and fetched, its
    frames are the TIFF's tiles."""
    import numpy as np
    import tifffile

    from orthanc_fixtures import dicomize
    from pathbundles.phantom import make_phantom

    make_phantom(tmp_path / "ph", kind="metastasis", n=1, seed=7, size_px=(1024, 1024), mpp=0.5)
    tiff = tmp_path / "ph" / "phantom_tumor_000.tif"
    files = dicomize(tiff, tmp_path / "dicom")
    assert [f.name for f in files] == ["level-000000.dcm", "level-000001.dcm"]  # the TIFF's two levels
    level0 = pydicom.dcmread(files[0])
    assert "ImageType" not in level0 and level0.ContainerIdentifier == "phantom_tumor_000"
    spacing_mm = level0.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) * 1000 for v in spacing_mm] == pytest.approx([0.5, 0.5], rel=1e-6)
    assert (level0.TotalPixelMatrixColumns, level0.Columns, level0.NumberOfFrames) == (1024, 256, 16)

    stored = store_instances(orthanc_url, [tmp_path / "dicom"])
    assert stored["n_stored"] == 2 and len({s["series_instance_uid"] for s in stored["stored"]}) == 1
    fetched = fetch_series(orthanc_url, stored["stored"][0]["study_instance_uid"],
                           stored["stored"][0]["series_instance_uid"], tmp_path / "fetched")
    frames = next(pydicom.dcmread(f) for f in fetched if pydicom.dcmread(f).TotalPixelMatrixColumns == 1024)
    tile = tifffile.imread(tiff, level=0)[256:512, 256:512]  # frame 5: row 1, column 1 of the 4 x 4 tiles
    # The same JPEG tile (copied, not re-encoded); pydicom's and tifffile's JPEG decoders round a few values apart.
    np.testing.assert_allclose(frames.pixel_array[5], tile, atol=1, rtol=0)


@pytest.mark.slow
def test_cli_export_writes_and_stores_the_dicom_results_of_a_bundle_run(orthanc_url: str,  # noqa: F811
                                                                         tmp_path: Path) -> None:
    """``dicom export`` after ``python -m monai.bundle run`` on a DICOM folder: the run's results as DICOM in
    OUT/dicom/<slide>/, stored to the PACS, equal to the run's files; a run of no DICOM slide fails naming it."""
    from bundle_helpers import REPO, run_bundle
    from dicom_helpers import assert_dicom_results_equal_file_outputs
    from orthanc_fixtures import dicomize
    from pathbundles.phantom import make_phantom

    make_phantom(tmp_path / "tiff", kind="metastasis", n=1, seed=7, size_px=(2048, 2048))
    tiff = sorted((tmp_path / "tiff").glob("*.tif"))[0]
    files = dicomize(tiff, tmp_path / "series")
    out = tmp_path / "out"
    bundle = REPO / "bundles" / "scannet"
    done = run_bundle("run", "--config_file", str(bundle / "configs" / "inference.json"), "--data_source",
                      str(tmp_path / "series"), "--output_dir", str(out), "--lp", "8", "--num_workers", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    run = pathbundles("dicom", "export", str(out), str(tmp_path / "series"), str(bundle), "--stow_url", orthanc_url)
    assert run.returncode == 0, run.stderr
    (name, result), = json.loads(run.stdout)["slides"].items()
    assert name == tiff.stem and len(result["stored"]) == len(result["files"]) == 3  # annotations, map, report
    assert all(Path(f).parent == out / "dicom" / name for f in result["files"])
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    for series in find_series(orthanc_url, study=source.StudyInstanceUID):
        if series["Modality"] != "SM":
            fetch_series(orthanc_url, source.StudyInstanceUID, series["SeriesInstanceUID"], tmp_path / "back")
    assert sorted(p.stem for p in (tmp_path / "back").glob("*.dcm")) == sorted(result["stored"])
    assert_dicom_results_equal_file_outputs(tmp_path / "back", out, name, source.SeriesInstanceUID)

    run = pathbundles("dicom", "export", str(out), str(tiff), str(bundle))
    assert run.returncode == 2 and f"{tiff}: no DICOM slide among the run's inputs" in run.stderr


@pytest.fixture
def misbehaving_server() -> Iterator[tuple[str, dict]]:
    """A server whose answers misbehave as ``mode["mode"]`` says: "busy" (always HTTP 503), "drip" (a byte every
    0.3 s, forever), "endless" (bytes as fast as it can, forever). Yields its DICOMweb URL and the mode dict."""
    import time

    mode = {"mode": "busy", "requests": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            mode["requests"] += 1
            if mode["mode"] == "busy":
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.end_headers()
            try:
                for _ in range(100_000):
                    if mode["mode"] == "drip":
                        self.wfile.write(b" ")
                        self.wfile.flush()
                        time.sleep(0.3)
                    else:
                        self.wfile.write(b" " * (1 << 16))
            except OSError:  # the client cut it off
                pass

        def log_message(self, *args: object) -> None:
            pass

    with _serving(Handler) as url:
        yield url, mode


def test_a_busy_slow_or_endless_server_fails_by_name(misbehaving_server: tuple[str, dict], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTP 503 to the last attempt is a DicomWebError naming the URL and the status (it escaped as dicomweb-client's
    RetryError and crashed the deploy app's summary); a server that drips or never ends is cut off by the response
    deadline and size limit instead of hanging the run or filling memory."""
    import time

    from pathbundles import dicomweb
    from pathbundles.deploy.runtime import store_dicom_results

    url, mode = misbehaving_server
    with pytest.raises(DicomWebError, match=rf"^{url}: QIDO-RS .* failed with HTTP 503 Service Unavailable after 3 "
                                            "attempts"):
        find_series(url)
    assert mode["requests"] == 3
    sent = tmp_path / "a.dcm"
    sent.write_bytes(_instance("1.2.5"))
    (result,) = store_dicom_results({"s": {"files": [str(sent)]}}, url).values()  # POST: 501 from http.server
    assert result["failed"].startswith(f"STOW-RS: {url}: STOW-RS") and result["files"] == [str(sent)]

    monkeypatch.setattr(dicomweb, "RETRY_ATTEMPTS", 1)
    web = dicomweb.client(url, deadline_s=1.0, max_bytes=1 << 20)
    for kind, expected in (("drip", "took over 1 s; cut off"), ("endless", f"is over {1 << 20} bytes; cut off")):
        mode["mode"] = kind
        start = time.monotonic()
        with pytest.raises(DicomWebError, match=rf"{url}/studies: the server's answer {expected}"):
            web._session.get(f"{url}/studies")
        assert time.monotonic() - start < 30


def test_a_server_s_instance_uid_never_reaches_a_frame_url() -> None:
    """wsidicom takes instance UIDs from the server's QIDO answer; the slide's client checks them before they become
    part of a metadata or frame URL (here no request is made: the UID is refused first)."""
    from pathbundles.dicom_wsi import _web_client
    from pathbundles.dicomweb import parse_series_url

    web = _web_client(parse_series_url("http://127.0.0.1:9/dicom-web/studies/1.2/series/1.3"), [])
    for call in (lambda: web.get_instance("1.2", "1.3", "../../x"),
                 lambda: web.get_frames("1.2", "1.3", "1.4/../../5", [1], "1.2.840.10008.1.2.4.50")):
        with pytest.raises(DicomWebError, match="SOPInstanceUID .* is not a DICOM UID"):
            call()
