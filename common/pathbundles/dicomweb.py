"""A DICOMweb client for PACS and VNA servers: store instances (STOW-RS), find series (QIDO-RS), fetch a series'
instances (WADO-RS), over `dicomweb-client <https://github.com/ImagingDataCommons/dicomweb-client>`_.

dicomweb-client is the DICOMweb client of the DICOM standard's own tool chain (highdicom's authors; wsidicom's
DICOMweb source is built on it), so the slides this package reads from a server lazily and the results it stores
there go through one HTTP client. This module adds what a deployment needs around it: URLs checked before use (http or
https, a host, no user name or password in the URL, which would end up in logs and error messages), a timeout on
every request, errors naming the URL and the HTTP status, and file names built only from validated UIDs.

Everything a server sends is data: a UID is used in a file name only when it passes :func:`is_uid` (digit groups
without leading zeros and dots, at most 64 characters), and instances are written atomically, never over a different
file.

This module is the package's one place for DICOMweb URLs (:func:`is_dicomweb_url`, :func:`validate_url`, the strict
series URL parser :func:`parse_series_url` -> :class:`DicomWebSeries`), DICOM UIDs (:func:`is_uid`,
:func:`check_uid`) and the HTTP client (:func:`client`: :data:`TIMEOUT_S`, :data:`RETRY_ATTEMPTS`), which
:mod:`pathbundles.dicom_wsi` reads slides through too.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import socket
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

from pathbundles.errors import InputError, PathBundlesError

logger = logging.getLogger(__name__)

#: A DICOM UID (PS3.5 9.1): groups of digits without leading zeros, separated by dots, at most 64 characters. The
#: one UID check of the package (:func:`is_uid`): what makes a UID safe in a file name or URL.
UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
UID_MAX_CHARS = 64
#: Seconds to connect and seconds between bytes of a response, for every request.
TIMEOUT_S = (10.0, 120.0)
#: Seconds one response may take in all (a server sending a byte every minute never trips the read timeout); a
#: watchdog closes the connection then, and the request fails naming the URL. A frame or metadata answer takes
#: seconds; :func:`fetch_series` gives whole instances longer.
RESPONSE_DEADLINE_S = 600.0
#: Most bytes one response may hold: a frame (at most `pathbundles.wsi.MAX_TILE_PX` RGBA pixels) or the metadata of
#: a sparse level's million frames fit; a server that streams without end is cut off.
MAX_RESPONSE_BYTES = 1 << 30
#: Whole instances of a series (:func:`fetch_series`): a level-0 instance of a real slide holds gigabytes.
FETCH_DEADLINE_S = 6 * 3600.0
FETCH_MAX_BYTES = 1 << 36
#: Attempts per request, and the first wait between them (ms; doubled each time): dicomweb-client retries a
#: failed connection and HTTP 408, 429, 503 and 504 (by default 5 attempts from 2 s: 30 s before a stopped server is
#: reported).
RETRY_ATTEMPTS = 3
RETRY_WAIT_MS = 250
#: Files sent in one STOW-RS request at most: the request holds them in memory.
STOW_BATCH_BYTES = 64 * 2**20
#: Series attributes :func:`find_series` returns (QIDO-RS series and study level), by keyword.
SERIES_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
                 "NumberOfSeriesRelatedInstances", "PatientID", "StudyID", "StudyDate", "AccessionNumber")
#: The tail of a DICOMweb series URL: ``.../studies/<StudyInstanceUID>/series/<SeriesInstanceUID>``.
_SERIES_TAIL = re.compile(r"/studies/(?P<study>[^/]+)/series/(?P<series>[^/]+)/?$")
_SERIES_URL_FORM = "http(s)://HOST[:PORT]/PATH/studies/<StudyInstanceUID>/series/<SeriesInstanceUID>"


class DicomWebError(PathBundlesError):
    """A DICOMweb request failed, or a server answered something unusable; the message names the URL (without
    credentials) and the HTTP status when there was one.

    Attributes:
        url: the URL (or other source) the error is about, credentials left out; "" when not known.
        problem: what is wrong with it (the message without the URL).
    """

    def __init__(self, message: str, url: str = "", problem: str = "") -> None:
        super().__init__(message)
        self.url, self.problem = url, problem or message

    @classmethod
    def about(cls, url: str, problem: str) -> DicomWebError:
        """The error ``<url>: <problem>``, ``url`` without credentials."""
        shown = redact(url) if url else ""
        return cls(f"{shown + ': ' if shown else ''}{problem}", url=shown, problem=problem)


class DicomWebSeries(NamedTuple):
    """A DICOMweb series: its server's base URL (``http://host:8042/dicom-web``, no trailing slash), its
    StudyInstanceUID and SeriesInstanceUID (checked UIDs); what :func:`parse_series_url` returns."""

    base_url: str
    study_uid: str
    series_uid: str

    @property
    def url(self) -> str:
        """The series' URL, ``<base_url>/studies/<study_uid>/series/<series_uid>``."""
        return f"{self.base_url}/studies/{self.study_uid}/series/{self.series_uid}"


def validate_url(url: str) -> str:
    """A DICOMweb base URL checked for use: ``http`` or ``https``, a host, a port from 0 to 65535 if any, no user name
    or password, no query or fragment, no space or control character (around it, spaces are stripped); returned
    with the scheme and host in lower case and without a trailing slash (``http://127.0.0.1:8042/dicom-web``).

    Raises:
        DicomWebError: naming the URL (its credentials left out) and what is wrong.
    """
    text = str(url).strip()
    try:
        parts = urlsplit(text)
    except ValueError as err:
        raise DicomWebError.about(text, f"not a URL ({err})") from None
    if parts.scheme not in ("http", "https"):
        raise DicomWebError.about(text, "a DICOMweb URL must start with http:// or https://, not "
                                        f"{parts.scheme + '://' if parts.scheme else 'a path'} (the scheme must be "
                                        "http or https)")
    if re.search(r"[\s\x00-\x1f\x7f]", text):
        raise DicomWebError.about(text, "it contains a space or control character")
    if parts.username is not None or parts.password is not None:
        raise DicomWebError.about(text, "credentials in a URL end up in logs and error messages; give the server's "
                                        "URL without user name and password")
    if parts.query or parts.fragment or "?" in text or "#" in text:
        raise DicomWebError.about(text, "a DICOMweb URL has no query (?...) or fragment (#...)")
    try:
        port = parts.port
    except ValueError as err:
        raise DicomWebError.about(text, f"not a URL: the port is not a number from 0 to 65535 ({err})") from None
    if not parts.hostname:
        raise DicomWebError.about(text, "no host in the DICOMweb URL")
    netloc = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc += f":{port}" if port is not None else ""
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def redact(url: str) -> str:
    """``url`` with any user name and password replaced by ``***`` (for messages and logs)."""
    try:
        parts = urlsplit(str(url))
    except ValueError:
        return "<unparsable URL>"
    if "@" not in parts.netloc:
        return str(url)
    return urlunsplit((parts.scheme, "***@" + parts.netloc.rsplit("@", 1)[1], parts.path, parts.query,
                       parts.fragment))


def is_dicomweb_url(text: Any) -> bool:
    """Whether ``text`` is meant as a URL (a string starting with ``http://`` or ``https://``), never a path;
    whether it is a valid one is :func:`validate_url`'s / :func:`parse_series_url`'s to say."""
    return isinstance(text, str) and text.strip().lower().startswith(("http://", "https://"))


def is_uid(value: Any) -> bool:
    """Whether ``value`` (a string, or a pydicom UID) is a DICOM UID: :data:`UID_PATTERN`, at most
    :data:`UID_MAX_CHARS` characters."""
    text = str(value) if value is not None else ""
    return len(text) <= UID_MAX_CHARS and UID_PATTERN.match(text) is not None


def check_uid(uid: Any, what: str = "UID", source: str = "") -> str:
    """``uid`` as a string when it is a DICOM UID (:func:`is_uid`), else an error naming ``what`` and ``source``:
    the check a value from a server, a file or a URL passes before it is used in a path or URL."""
    text = str(uid) if uid is not None else ""
    if not is_uid(text):
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise DicomWebError.about(source, f"{what} {shown!r} is not a DICOM UID (digits and dots, no leading zeros, "
                                          f"at most {UID_MAX_CHARS} characters)")
    return text


def series_url(url: str, study_uid: str, series_uid: str) -> str:
    """The DICOMweb URL of a series, ``<url>/studies/<study_uid>/series/<series_uid>`` (URL and UIDs checked)."""
    base = validate_url(url)
    return DicomWebSeries(base, check_uid(study_uid, "StudyInstanceUID", base),
                          check_uid(series_uid, "SeriesInstanceUID", base)).url


def parse_series_url(url: str) -> DicomWebSeries:
    """Read a DICOMweb series URL, ``http(s)://HOST[:PORT]/PATH/studies/<StudyUID>/series/<SeriesUID>``: the one
    parser of series URLs (datalists, slides, deploy inputs). Strict, since it comes from data: everything
    :func:`validate_url` checks, a path ending in ``/studies/<uid>/series/<uid>``, and UIDs (:func:`check_uid`).

    Raises:
        DicomWebError: naming the URL (credentials left out) and what is wrong (``.problem``).
    """
    base = validate_url(url)
    match = _SERIES_TAIL.search(base)
    if match is None:
        raise DicomWebError.about(str(url).strip(), "not a DICOMweb series URL: its path does not end in "
                                                    f"/studies/<uid>/series/<uid> (expected {_SERIES_URL_FORM})")
    return DicomWebSeries(base[:match.start()], check_uid(match["study"], "StudyInstanceUID", base),
                          check_uid(match["series"], "SeriesInstanceUID", base))


def _bounded(response: Any, url: str, deadline_s: float, max_bytes: int) -> Any:
    """``response`` (requested with ``stream=True``) whose body is cut off, with a DicomWebError naming ``url``, past
    ``max_bytes`` bytes or ``deadline_s`` seconds (a watchdog closes the connection, so even a read blocked on a
    dripping server ends)."""
    import threading

    expired = threading.Event()

    def expire() -> None:
        expired.set()
        # Shut the socket down rather than close the response: close() waits for the lock the blocked read holds.
        # urllib3 detaches the socket from its connection once the headers are read; http.client's reader keeps it.
        sock = getattr(getattr(getattr(getattr(response.raw, "_fp", None), "fp", None), "raw", None), "_sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # closed already
                pass

    watchdog = threading.Timer(deadline_s, expire)
    watchdog.daemon = True
    watchdog.start()
    read = response.iter_content

    def iter_content(chunk_size: int | None = 1, decode_unicode: bool = False) -> Iterator[Any]:
        received = 0
        try:
            for chunk in read(chunk_size, decode_unicode):
                received += len(chunk)
                if received > max_bytes:
                    response.close()
                    raise DicomWebError.about(url, f"the server's answer is over {max_bytes} bytes; cut off")
                if expired.is_set():
                    break
                yield chunk
        except DicomWebError:
            raise
        except Exception:  # the watchdog closed the connection under the read
            if not expired.is_set():
                raise
        finally:
            watchdog.cancel()
        if expired.is_set():
            raise DicomWebError.about(url, f"the server's answer took over {deadline_s:g} s; cut off")

    response.iter_content = iter_content
    return response


def _session(timeout_s: float | tuple[float, float], deadline_s: float = RESPONSE_DEADLINE_S,
             max_bytes: int = MAX_RESPONSE_BYTES) -> Any:
    import requests

    class BoundedSession(requests.Session):
        """A session whose every request has a timeout (dicomweb-client passes none) and whose every response is
        bounded in time and size (:func:`_bounded`), streamed or not."""

        def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", timeout_s)
            streamed = kwargs.pop("stream", False)
            response = _bounded(super().request(method, url, *args, stream=True, **kwargs), url, deadline_s,
                                max_bytes)
            if not streamed:  # read it now, through the bounds, as requests would have
                response._content = b"".join(response.iter_content(1 << 16))
                response._content_consumed = True
            return response

    return BoundedSession()


def client(url: str, timeout_s: float | tuple[float, float] = TIMEOUT_S, deadline_s: float = RESPONSE_DEADLINE_S,
           max_bytes: int = MAX_RESPONSE_BYTES) -> Any:
    """A ``dicomweb_client.DICOMwebClient`` for the base URL ``url`` (checked by :func:`validate_url`), every
    request with ``timeout_s`` (seconds: one value, or (connect, read)), :data:`RETRY_ATTEMPTS` attempts, and every
    response cut off past ``deadline_s`` seconds or ``max_bytes`` bytes."""
    from dicomweb_client import DICOMwebClient

    web = DICOMwebClient(validate_url(url), session=_session(timeout_s, deadline_s, max_bytes))
    web.set_http_retry_params(max_attempts=RETRY_ATTEMPTS, wait_exponential_multiplier=RETRY_WAIT_MS)
    return web


def _request_error(url: str, action: str, err: Exception) -> DicomWebError:
    """The error of a failed request: the URL (without credentials), the HTTP status when there was a response."""
    import requests

    response = getattr(err, "response", None)
    if response is not None and getattr(response, "status_code", None) is not None:
        detail = response.text.strip().replace("\n", " ")[:300] if response.text else ""
        return DicomWebError.about(url, f"{action} failed with HTTP {response.status_code} {response.reason}"
                                        f"{': ' + detail if detail else ''}")
    if isinstance(err, requests.Timeout):
        return DicomWebError.about(url, f"{action} timed out ({err.__class__.__name__})")
    if isinstance(err, requests.ConnectionError):
        return DicomWebError.about(url, f"{action} failed: cannot connect to the server (is it running, and is the "
                                        "URL right?)")
    return DicomWebError.about(url, f"{action} failed: {err}")


def _calling(url: str, action: str, call: Any, *args: Any, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)``, its failures as :class:`DicomWebError` naming ``url``: a failed request, or an
    answer that is not what DICOMweb sends (dicomweb-client and pydicom raise ValueError, KeyError or pydicom's
    InvalidDicomError, which is an Exception)."""
    import requests
    from pydicom.errors import InvalidDicomError
    from retrying import RetryError

    try:
        return call(*args, **kwargs)
    except RetryError as err:  # dicomweb-client's retries ended on a retriable status (408, 429, 503, 504)
        response = getattr(err.last_attempt, "value", None)
        status = f"HTTP {response.status_code} {response.reason}" if hasattr(response, "status_code") else "an error"
        raise DicomWebError.about(url, f"{action} failed with {status} after {RETRY_ATTEMPTS} attempts") from None
    except requests.RequestException as err:
        raise _request_error(url, action, err) from None
    except (ValueError, KeyError, InvalidDicomError) as err:
        raise DicomWebError.about(url, f"{action}: the server's answer is not valid DICOMweb: {str(err)[:300]}") \
            from None


def instance_metadata(url: str, study_uid: str, series_uid: str, sop_class_uid: str | None = None,
                      timeout_s: float | tuple[float, float] = TIMEOUT_S) -> Any:
    """The metadata (a pydicom Dataset without bulk data) of one instance of a series, of SOP Class
    ``sop_class_uid`` when given: QIDO-RS for the instance, then WADO-RS for its metadata.

    Raises:
        DicomWebError: naming the series' URL: a request failed, the answer is not DICOMweb, or the series holds no
            such instance.
    """
    import pydicom

    base = validate_url(url)
    source = series_url(base, study_uid, series_uid)
    web = client(base, timeout_s)
    filters = {"SOPClassUID": check_uid(sop_class_uid, "SOPClassUID")} if sop_class_uid is not None else {}
    found = _calling(source, "QIDO-RS (search for instances)", lambda: [
        pydicom.Dataset.from_json(answer) for answer in web.search_for_instances(
            study_uid, series_uid, search_filters=filters, limit=1)])
    if not found:
        raise DicomWebError.about(source, "the server lists no instance "
                                          f"{'of SOP Class ' + sop_class_uid + ' ' if sop_class_uid else ''}in this "
                                          "series")
    instance_uid = check_uid(found[0].get("SOPInstanceUID"), "SOPInstanceUID", source)
    return _calling(source, "WADO-RS (retrieve instance metadata)", lambda: pydicom.Dataset.from_json(
        web.retrieve_instance_metadata(study_uid, series_uid, instance_uid)))


# ---------------------------------------------------------------------------------------------------- STOW-RS

def dicom_files_under(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The DICOM files of ``paths`` to send: a file is taken as given (and must be a DICOM Part 10 file), a folder
    gives its ``*.dcm`` files, recursively, sorted by path. (A series folder's own instances, for reading:
    `pathbundles.dicom_wsi.dicom_files_in`.)

    Raises:
        InputError: naming a path that does not exist, a folder without ``.dcm`` files, or a file that is not DICOM.
    """
    files: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.dcm") if p.is_file() and not p.name.startswith("."))
            if not found:
                raise InputError(path, "no .dcm files in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(path, "no such file or folder")
    from pathbundles.dicom_wsi import is_dicom_file

    for path in files:
        if not is_dicom_file(path):
            raise InputError(path, "not a DICOM file (no 'DICM' marker at byte 128 of a DICOM Part 10 file)")
    return files


def _batches(files: Sequence[Path]) -> Iterator[list[Path]]:
    batch: list[Path] = []
    size = 0
    for path in files:
        if batch and size + path.stat().st_size > STOW_BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(path)
        size += path.stat().st_size
    if batch:
        yield batch


def store_instances(url: str, files: Iterable[str | os.PathLike],
                    timeout_s: float | tuple[float, float] = TIMEOUT_S) -> dict:
    """Store DICOM files on the server at ``url`` (STOW-RS), in requests of at most :data:`STOW_BATCH_BYTES`.

    Args:
        url: the DICOMweb base URL (``http://host:8042/dicom-web``).
        files: DICOM files, or folders of ``*.dcm`` files (:func:`dicom_files_under`).
        timeout_s: seconds per request (one value, or (connect, read)).

    Returns:
        ``{"url", "n_stored", "stored": [{"file", "sop_instance_uid", "sop_class_uid", "study_instance_uid",
        "series_instance_uid"}]}``, in the order of the files.

    Raises:
        InputError: a file that is not DICOM, or two files of one SOPInstanceUID (nothing is sent then).
        DicomWebError: the request failed (URL, HTTP status), or the server refused or left out an instance (its
            file, UID and the server's failure reason); instances of earlier requests stay stored.
    """
    from pathbundles.dicom_wsi import read_dicom

    base = validate_url(url)
    paths = dicom_files_under(files)
    # Every file is read and checked before anything is sent: one bad file stores nothing.
    first_file: dict[str, Path] = {}
    for path in paths:
        uid = check_uid(read_dicom(path, header_only=True).get("SOPInstanceUID"), "SOPInstanceUID", str(path))
        if uid in first_file:
            raise InputError(path, f"SOPInstanceUID {uid} is also that of {first_file[uid]}: a server keeps one "
                             "of them; send one")
        first_file[uid] = path
    web = client(base, timeout_s)
    # dicomweb-client sends a body over its chunk size as a generator made outside its retried call: a retry after
    # HTTP 503 posts an empty body. The request is in memory anyway (a batch): never chunk it.
    web.set_chunk_size(1 << 62)
    stored = []
    for batch in _batches(paths):
        by_uid = {}
        for path in batch:
            ds = read_dicom(path)
            by_uid[str(ds.SOPInstanceUID)] = (path, ds)
        datasets = [ds for _, ds in by_uid.values()]
        logger.info("STOW-RS %d instance(s) to %s", len(batch), base)
        answer = _calling(base, "STOW-RS (store instances)", web.store_instances, datasets)
        failed = {item.get("ReferencedSOPInstanceUID"): item.get("FailureReason")
                  for item in answer.get("FailedSOPSequence", [])}
        if failed:
            listing = "; ".join(f"{by_uid.get(uid, ('?',))[0]} ({uid}): failure reason {reason}"
                                for uid, reason in failed.items())
            raise DicomWebError(f"{base}: STOW-RS refused {len(failed)} of {len(batch)} instance(s): {listing}")
        referenced = {item.get("ReferencedSOPInstanceUID") for item in answer.get("ReferencedSOPSequence", [])}
        missing = [uid for uid in by_uid if uid not in referenced]
        if missing:
            listing = "; ".join(f"{by_uid[uid][0]} ({uid})" for uid in missing)
            raise DicomWebError(f"{base}: STOW-RS answered without confirming {len(missing)} instance(s): {listing}")
        stored += [{"file": str(path), "sop_instance_uid": uid, "sop_class_uid": str(ds.SOPClassUID),
                    "study_instance_uid": str(ds.StudyInstanceUID), "series_instance_uid": str(ds.SeriesInstanceUID)}
                   for uid, (path, ds) in by_uid.items()]
    return {"url": base, "n_stored": len(stored), "stored": stored}


# ---------------------------------------------------------------------------------------------------- QIDO-RS

def _plain(value: Any) -> Any:
    """A pydicom element value as JSON-ready Python: strings, numbers, lists of them."""
    from pydicom.multival import MultiValue
    from pydicom.valuerep import PersonName

    if isinstance(value, (MultiValue, list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, PersonName):
        return str(value)
    if isinstance(value, int):  # pydicom's IS too (SeriesNumber, NumberOfSeriesRelatedInstances)
        return int(value)
    if isinstance(value, float):  # DS
        return float(value)
    return str(value)


def find_series(url: str, study: str | None = None, modality: str | None = None, limit: int | None = None,
                timeout_s: float | tuple[float, float] = TIMEOUT_S) -> list[dict]:
    """Series on the server at ``url`` (QIDO-RS), optionally of one study and one modality.

    Args:
        url: the DICOMweb base URL.
        study: a StudyInstanceUID to search in.
        modality: a Modality to match, e.g. "SM" (slides), "ANN", "SEG", "SR".
        limit: how many series at most (all by default).
        timeout_s: seconds per request.

    Returns:
        One plain dict per series, keys from :data:`SERIES_FIELDS` that the server answered, plus ``url`` (the
        series' DICOMweb URL, :func:`series_url`); a series whose UIDs are not UIDs is left out with a warning.
    """
    import pydicom

    base = validate_url(url)
    filters = {}
    if study is not None:
        filters["StudyInstanceUID"] = check_uid(study, "StudyInstanceUID", "--study")
    if modality is not None:
        if not re.fullmatch(r"[A-Z0-9_ ]{1,16}", str(modality)):
            raise DicomWebError(f"{base}: modality {modality!r} is not a DICOM code string (e.g. SM, ANN, SEG, SR)")
        filters["Modality"] = str(modality)
    web = client(base, timeout_s)
    answers = _calling(base, "QIDO-RS (search for series)", web.search_for_series, fields=list(SERIES_FIELDS),
                       search_filters=filters, limit=limit, get_remaining=limit is None)
    found = []
    for answer in answers:
        ds = pydicom.Dataset.from_json(answer)
        row = {key: _plain(ds.get(key)) for key in SERIES_FIELDS if ds.get(key) not in (None, "")}
        try:
            row["url"] = series_url(base, row.get("StudyInstanceUID"), row.get("SeriesInstanceUID"))
        except DicomWebError as err:
            logger.warning("QIDO-RS answer left out: %s", err)
            continue
        found.append(row)
    return found


# ---------------------------------------------------------------------------------------------------- WADO-RS

def _encoded(ds: Any) -> bytes:
    """A retrieved instance as a DICOM Part 10 file."""
    import pydicom

    with io.BytesIO() as buffer:
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        return buffer.getvalue()


def fetch_series(url: str, study_uid: str, series_uid: str, dest_dir: str | os.PathLike,
                 timeout_s: float | tuple[float, float] = TIMEOUT_S) -> list[Path]:
    """Retrieve every instance of a series (WADO-RS) into ``dest_dir`` as ``<SOPInstanceUID>.dcm``, one instance at
    a time (never the whole series in memory; each instance is, twice), in the transfer syntax the server stores it in (the pixel
    data as stored, not transcoded).

    Args:
        url: the DICOMweb base URL.
        study_uid: the StudyInstanceUID.
        series_uid: the SeriesInstanceUID.
        dest_dir: the folder to write into (made when missing).
        timeout_s: seconds per request.

    Returns:
        The files, in the order the server sent them. A file already there with the same bytes is kept as it is.

    Raises:
        DicomWebError: the request failed (URL, HTTP status); the server sent an instance whose SOPInstanceUID is
            not a UID (nothing is written for it), or one of another study or series; a file of that name exists
            with other content (it is not replaced).
    """
    from pathbundles.atomic import atomic_path
    from pathbundles.bundle_runner import sha256_file

    base = validate_url(url)
    source = series_url(base, study_uid, series_uid)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    web = client(base, timeout_s, deadline_s=FETCH_DEADLINE_S, max_bytes=FETCH_MAX_BYTES)
    written: list[Path] = []
    # transfer-syntax=*: as stored. Without it the server must transcode to Explicit VR Little Endian, which
    # changes the pixel data and fails where it has no decoder (Orthanc 1.10: JPEG 2000, HTTP 500).
    instances = _calling(source, "WADO-RS (retrieve series)", web.iter_series, study_uid, series_uid,
                         media_types=(("application/dicom", "*"),))
    while True:
        try:
            ds = _calling(source, "WADO-RS (retrieve series)", next, instances)
        except StopIteration:
            break
        uid = check_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID", source)
        for keyword, expected in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid)):
            if str(ds.get(keyword, "")) != expected:
                raise DicomWebError(f"{source}: the server sent instance {uid} of {keyword} "
                                    f"{str(ds.get(keyword, ''))[:80]!r}, not of the series asked for")
        target = dest / f"{uid}.dcm"
        content = _encoded(ds)
        if target.exists():
            if target.stat().st_size != len(content) or sha256_file(target) != hashlib.sha256(content).hexdigest():
                raise DicomWebError(f"{source}: {target} exists with other content; not replaced (fetch into an "
                                    "empty folder, or remove it)")
        else:
            with atomic_path(target) as tmp:
                tmp.write_bytes(content)
        written.append(target)
    if not written:
        raise DicomWebError(f"{source}: the server sent no instance of this series")
    logger.info("WADO-RS %d instance(s) of %s into %s", len(written), source, dest)
    return written


class Dicom:
    """``python -m pathbundles dicom <verb>``: send DICOM files to a PACS, find series, fetch a series (DICOMweb),
    export a bundle run's results of DICOM slides as DICOM; each verb prints one JSON object. URL is the server's
    DICOMweb base, e.g. http://127.0.0.1:8042/dicom-web."""

    def send(self, url: str, *paths: str) -> None:
        """Store DICOM files (and the *.dcm files of folders, recursively) on the server at URL (STOW-RS)."""
        if not paths:
            raise DicomWebError(f"{redact(url)}: no files or folders to send")
        _print(store_instances(url, [str(p) for p in paths]))

    def find(self, url: str, study: str | None = None, modality: str | None = None) -> None:
        """List the series on the server at URL (QIDO-RS), of one --study UID and one --modality (SM: slides; ANN,
        SEG, SR: results), each with its DICOMweb URL (what a deploy application takes as input)."""
        series = find_series(url, study=None if study is None else str(study),
                             modality=None if modality is None else str(modality))
        _print({"url": validate_url(url), "n_series": len(series), "series": series})

    def fetch(self, url: str, study: str, series: str, dest: str) -> None:
        """Retrieve every instance of the series STUDY/SERIES (UIDs) from URL into the folder DEST (WADO-RS), as
        <SOPInstanceUID>.dcm, in the transfer syntax stored."""
        files = fetch_series(url, str(study), str(series), dest)
        _print({"series_url": series_url(url, str(study), str(series)), "dest": str(Path(dest).resolve()),
                "n_files": len(files), "files": [str(f) for f in files]})

    def export(self, output_dir: str, data_source: str, bundle: str, stow_url: str | None = None) -> None:
        """Write the DICOM results of a finished bundle run (``python -m monai.bundle run``): for each DICOM slide of
        DATA_SOURCE (the run's --data_source: a DICOM folder, file, series URL, datalist or manifest) the annotations,
        segmentations and report of its outputs in OUTPUT_DIR go to OUTPUT_DIR/dicom/<slide>/, referencing the
        slide's series; BUNDLE is the bundle folder that ran. With --stow_url they are stored there (STOW-RS). Prints
        per slide the files (and stored UIDs) or why it failed; exits 2 when any failed."""
        from pathbundles.bundle_runner import bundle_info
        from pathbundles.cohort import bundle_datalist
        from pathbundles.deploy.runtime import export_dicom_results, store_dicom_results
        from pathbundles.errors import PathBundlesError, SlidesFailedError
        from pathbundles.outputs import output_names

        items = bundle_datalist(bundle, data_source)
        records = [{"name": name} for name in output_names(items)]
        results = export_dicom_results(records, items, output_dir, bundle_info(bundle))
        if not results:
            raise PathBundlesError(f"{data_source}: no DICOM slide among the run's inputs (DICOM results reference "
                                   "a DICOM source series)")
        if stow_url:
            results = store_dicom_results(results, validate_url(stow_url))
        _print({"output_dir": str(Path(output_dir).resolve()), "stow_url": validate_url(stow_url) if stow_url else None,
                "slides": results})
        failed = {name: r["failed"] for name, r in results.items() if "failed" in r}
        if failed:
            raise SlidesFailedError.listing(failed, written=len(results) - len(failed))


def _print(result: Any) -> None:
    print(json.dumps(result, indent=2, default=str))
