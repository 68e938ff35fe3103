"""A real PACS for the tests: Debian's Orthanc (1.10) with its DICOMweb plugin, started on a free port with its
storage in a temporary folder and stopped by its PID; and :func:`dicomize`, Orthanc's WSI dicomizer on a TIFF.

Import the fixture where it is used (``from orthanc_fixtures import orthanc_url  # noqa: F401``). Without
``/usr/sbin/Orthanc`` or the plugin the tests skip with the reason, except in CI (``CI`` set), where they fail:
``scripts/setup.sh`` installs Orthanc as root, and CI must run these tests.

Orthanc 1.10 has no option for the address it listens on (``HttpPort`` is a number; the socket is bound on every
interface). ``RemoteAccessAllowed: false`` makes it answer every client that is not on the loopback interface with
HTTP 401, and the DICOM (DIMSE) server is off; tests/test_dicomweb.py checks both.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlflow_fixtures import free_port

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
DICOMIZER = Path("/usr/bin/OrthancWSIDicomizer")
#: DICOMweb root of the server (the plugin's ``DicomWeb.Root``).
DICOMWEB_ROOT = "/dicom-web/"


def require(*programs: Path) -> None:
    """Skip the test when a program is missing, or fail in CI (``CI`` set), where setup installs them."""
    missing = [str(p) for p in programs if not p.exists()]
    if not missing:
        return
    reason = (f"{', '.join(missing)} not installed (Debian packages orthanc, orthanc-dicomweb, orthanc-wsi; "
              "scripts/setup.sh installs them as root)")
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the DICOMweb tests: {reason}")
    pytest.skip(reason)


def orthanc_config(root: Path, http_port: int) -> dict:
    """The server's configuration: HTTP on ``http_port`` for local clients only, no authentication (nothing but
    this machine's loopback clients get in), no DICOM (DIMSE) server, storage and index under ``root``, the DICOMweb
    plugin under :data:`DICOMWEB_ROOT`."""
    return {"Name": "pathbundles-tests", "HttpPort": http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomServerEnabled": False, "DicomPort": free_port(),
            "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "storage"),
            "TemporaryDirectory": str(root / "tmp"), "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": DICOMWEB_ROOT},
            "OrthancExplorerEnabled": False, "WebDavEnabled": False, "ExecuteLuaEnabled": False}


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def orthanc_server(root: Path, startup_s: float = 60.0) -> Iterator[str]:
    """Run Orthanc with :func:`orthanc_config` under ``root`` until the generator is closed; yields the DICOMweb base
    URL (``http://127.0.0.1:<port>/dicom-web``) once ``/system`` answers. Stopped by its PID: terminate, wait,
    kill."""
    require(ORTHANC, DICOMWEB_PLUGIN)
    root.mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(exist_ok=True)
    port = free_port()
    config = root / "orthanc.json"
    config.write_text(json.dumps(orthanc_config(root, port), indent=2), encoding="utf-8")
    log = open(root / "orthanc.log", "wb")  # noqa: SIM115 - closed when the server stops
    server = subprocess.Popen([str(ORTHANC), str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=root)
    try:
        deadline = time.monotonic() + startup_s
        while not _answers(f"http://127.0.0.1:{port}/system"):
            if server.poll() is not None:
                raise RuntimeError(f"Orthanc exited with status {server.returncode}; its log:\n"
                                   f"{(root / 'orthanc.log').read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not answer on port {port} within {startup_s} s")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}{DICOMWEB_ROOT.rstrip('/')}"
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=20)
        log.close()


@pytest.fixture(scope="module")
def orthanc_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The DICOMweb base URL of a real Orthanc (empty storage) for the module's tests."""
    yield from orthanc_server(tmp_path_factory.mktemp("orthanc"))


def dicomize(tiff_path: str | os.PathLike, dest_dir: str | os.PathLike, mpp: float | None = None,
             tile_px: int = 256, compression: str = "jpeg", dataset: dict | None = None) -> list[Path]:
    """Convert a pyramidal TIFF into a DICOM VL Whole Slide Microscopy series with Orthanc's
    ``OrthancWSIDicomizer`` (one instance per level, tiled, TILED_FULL); returns the ``.dcm`` files, sorted.

    The dicomizer writes no ImageType unless the dataset gives one (OpenSlide and wsidicom then refuse the series;
    :mod:`pathbundles.dicom_wsi` reads it), and states its pixel spacing as the imaged volume's size over the pixel
    matrix's: ``mpp`` sets that size. (OrthancWSIDicomizer 1.1 divides ``--imaged-width`` by the rows and
    ``--imaged-height`` by the columns, PixelSpacing being (row, column) spacing: they are given crosswise, so that
    the pixels of a slide that is not square come out square.)

    Args:
        tiff_path: a pyramidal TIFF (each level a tiled page; tiles are copied, not re-encoded, where they fit).
        dest_dir: the folder for the instances (made; must hold no ``.dcm`` yet).
        mpp: level-0 um/px; default: the slide's own (:func:`pathbundles.wsi.slide_info`).
        tile_px: frame width and height.
        compression: "jpeg", "jpeg2000" or "none".
        dataset: attributes of the series (``--dataset``) over the defaults: ContainerIdentifier, SeriesDescription
            and PatientID = the TIFF's stem.
    """
    from pathbundles.wsi import slide_info

    require(DICOMIZER)
    tiff = Path(tiff_path)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    if list(dest.glob("*.dcm")):
        raise FileExistsError(f"{dest} already holds .dcm files")
    info = slide_info(tiff)
    if mpp is None:
        mpp = float(info["mpp"][0])
    width_px, height_px = info["levels"][0]["width"], info["levels"][0]["height"]
    attributes = {"ContainerIdentifier": tiff.stem, "SeriesDescription": tiff.stem, "PatientID": tiff.stem,
                  **(dataset or {})}
    dataset_file = dest / ".dicomizer-dataset.json"
    dataset_file.write_text(json.dumps(attributes), encoding="utf-8")
    try:
        subprocess.run([str(DICOMIZER), "--dataset", str(dataset_file), "--folder", str(dest),
                        "--folder-pattern", "level-%06d.dcm", "--tile-width", str(tile_px), "--tile-height",
                        str(tile_px), "--compression", compression, "--max-size", "0",
                        "--imaged-width", repr(height_px * mpp / 1000), "--imaged-height", repr(width_px * mpp / 1000),
                        str(tiff)], check=True, capture_output=True, timeout=300)
    finally:
        dataset_file.unlink(missing_ok=True)
    return sorted(dest.glob("*.dcm"))
