"""DICOM whole-slide images (VL Whole Slide Microscopy): a `Slide` backend over wsidicom, local or over DICOMweb.

A DICOM slide is one series of instances (one or more per pyramid level; associated label, overview and thumbnail
images beside them). `DicomSlide` opens

- a folder holding one series' instances (``.dcm`` files, or files without a suffix that are DICOM);
- one instance file: its series is the instances in the same folder that share its SeriesInstanceUID (as OpenSlide
  4 does);
- a DICOMweb series, ``http(s)://HOST[:PORT]/PATH/studies/<StudyInstanceUID>/series/<SeriesInstanceUID>``
  (`pathbundles.dicomweb.parse_series_url`), read lazily frame by frame over WADO-RS: opening fetches the instances'
  metadata and, where the server lists no transfer syntaxes (Orthanc 1.10), wsidicom's probe of each instance's
  first frame; each read fetches the frames it touches, through wsidicom's in-memory LRU frame caches of `FRAME_CACHE_BYTES`.

Why wsidicom (Apache-2.0, pinned < 0.34 with TIAToolbox): it reads folders, concatenations, TILED_SPARSE tiling,
JPEG / JPEG 2000 / JPEG-LS frames and has a DICOMweb source over dicomweb-client, the standard DICOMweb client;
OpenSlide 4 opens only a file of a series and nothing over the network. wsidicom's `WsiDicom` pyramid assumes
power-of-2 levels and refuses others, so the levels here are the series' VOLUME instances grouped by size and read
one by one (`wsidicom.instance.WsiInstance`): the geometry is what the instances state, any downsample works.

Series written without ImageType (OrthancWSIDicomizer) are patched on read: a VL WSI instance whose ImageType is
missing or names no known flavour is taken as a VOLUME (pyramid) instance, and a warning says so; a "level" whose
aspect ratio is not level 0's is then left out. Instances without pixel spacing are refused (SlideError) unless a
level-0 mpp is given.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from pathbundles.dicomweb import (DicomWebError, DicomWebSeries, check_uid, client, instance_metadata, is_dicomweb_url,
                                  parse_series_url, redact)
from pathbundles.errors import InputError, SlideError
from pathbundles.wsi import MPP_HINT, Slide, _similar_ratio

logger = logging.getLogger(__name__)

#: SOP Class UID of VL Whole Slide Microscopy Image Storage.
VL_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
#: Bytes of decoded (and, separately, of encoded) frames wsidicom keeps per slide: 64 MiB holds ~340 decoded 256 px
#: RGB frames, more than a 2048 px read touches, so neighbouring reads over DICOMweb fetch each frame once.
FRAME_CACHE_BYTES = 64 << 20
#: Image flavours (ImageType value 3) of VL WSI instances; others are patched to VOLUME (see the module text).
_FLAVOURS = ("VOLUME", "LABEL", "OVERVIEW", "THUMBNAIL")
#: What an inferred ImageType becomes.
_PATCHED_IMAGE_TYPE = ["DERIVED", "PRIMARY", "VOLUME", "NONE"]
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_warned_patched: set[str] = set()
#: Tags read from each file's header to list a folder's series (no pixel data is read).
_HEADER_TAGS = ["SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "ContainerIdentifier"]


# ---- sources -----------------------------------------------------------------------------------------------------


def dicomweb_series(url: str, error: type[InputError] = InputError) -> DicomWebSeries:
    """`pathbundles.dicomweb.parse_series_url` of a datalist image or slide source, its refusal raised as ``error``
    (InputError; SlideError for a slide) naming ``url`` (credentials left out)."""
    try:
        return parse_series_url(url)
    except DicomWebError as err:
        raise error(redact(str(url)), err.problem) from None


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a regular file holding DICOM (the ``DICM`` prefix at byte 128); False when unreadable."""
    try:
        path = Path(path)
        if not path.is_file():
            return False
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _is_instance_file(path: Path) -> bool:
    """Whether a folder entry is taken as a series' instance: not hidden, ``.dcm`` or no suffix, DICOM."""
    return not path.name.startswith(".") and path.suffix.lower() in (".dcm", "") and is_dicom_file(path)


def dicom_files_in(folder: Path) -> list[Path]:
    """The DICOM files directly in ``folder`` (``.dcm`` or no suffix, not hidden), sorted by name: the instances a
    series folder is read from. (Files to send to a server: `pathbundles.dicomweb.dicom_files_under`.)"""
    try:
        entries = sorted(folder.iterdir())
    except OSError as err:
        raise InputError(folder, f"cannot list the folder: {err}") from err
    return [p for p in entries if _is_instance_file(p)]


def read_dicom(path: str | os.PathLike, header_only: bool = False, tags: list[str] | None = None) -> Any:
    """The pydicom Dataset of the DICOM file ``path``: without pixel data when ``header_only``, only ``tags``
    (keywords) when given.

    Raises:
        InputError: naming ``path`` when it is not a readable DICOM file.
    """
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=header_only, specific_tags=tags)
    except Exception as err:  # noqa: BLE001 - pydicom raises many kinds on a damaged file
        raise InputError(path, f"cannot read the DICOM file: {err}") from err


def is_dicom_source(image: Any) -> bool:
    """Whether a datalist ``image`` is a DICOM slide: a DICOMweb URL (``http(s)://``, checked when opened), a DICOM
    file (``.dcm`` or the DICOM prefix), or a folder holding DICOM files."""
    if not isinstance(image, (str, os.PathLike)):
        return False
    if is_dicomweb_url(image):
        return True
    path = Path(image)
    if path.is_dir():
        try:
            return any(map(_is_instance_file, path.iterdir()))
        except OSError:
            return False
    return path.suffix.lower() == ".dcm" or (not path.suffix and is_dicom_file(path))


def _headers(path: Path) -> Any:
    """The header tags `_HEADER_TAGS` of a DICOM file (pydicom, no pixel data), or None when it is no DICOM."""
    try:
        return read_dicom(path, header_only=True, tags=_HEADER_TAGS)
    except InputError:  # not DICOM, truncated, unreadable: not part of a series here
        return None


def dicom_series(files: Iterable[str | os.PathLike]) -> dict[str, list[Path]]:
    """{SeriesInstanceUID: its files} of the VL Whole Slide Microscopy instances among ``files`` (other DICOM
    objects, such as annotations or segmentations beside a slide, and non-DICOM files are left out), in the order
    of first appearance. A file holding an instance listed already (the same SOPInstanceUID: another encoding of
    it) is left out too."""
    series: dict[str, list[Path]] = {}
    seen: set[str] = set()
    for path in map(Path, files):
        header = _headers(path)
        if header is None or str(header.get("SOPClassUID", "")) != VL_WSI_SOP_CLASS:
            continue
        instance = str(header.get("SOPInstanceUID", ""))
        if instance in seen:
            logger.info("%s: left out, its instance %s is in another file of the folder", path, instance)
            continue
        seen.add(instance)
        series.setdefault(str(header.get("SeriesInstanceUID", "")), []).append(path)
    return series


def sanitise_name(text: str) -> str:
    """A name from DICOM data as one plain file name (`pathbundles.outputs.check_name`): characters other than
    ``A-Za-z0-9._-`` become ``_``, leading dots go, at most 200 characters; '' when nothing is left."""
    return _NAME_UNSAFE.sub("_", str(text)).lstrip(".")[:200]


def _series_name_of(dataset: Any) -> str:
    """A series' output name: its ContainerIdentifier (the slide's label), else its SeriesInstanceUID, sanitised.
    Not the SeriesDescription: scanners give every slide of a protocol the same one ("WSI", a stain), and two
    slides of one name stop a run."""
    from pydicom.multival import MultiValue

    for keyword in ("ContainerIdentifier", "SeriesInstanceUID"):
        value = dataset.get(keyword) or ""
        # A backslash in a text value splits it into several values: join them back.
        name = sanitise_name("_".join(map(str, value)) if isinstance(value, (list, MultiValue)) else str(value))
        if name.strip("_-"):
            return name
    return "dicom_series"


@functools.lru_cache(maxsize=1024)
def series_name(source: str) -> str:
    """The output name of the DICOM slide ``source`` (folder, file or DICOMweb URL) without opening its pixels:
    `_series_name_of` its first VL WSI instance's header (over DICOMweb: one instance's metadata).

    Raises:
        InputError: naming ``source`` when it holds no VL WSI instance or the server cannot be asked.
    """
    if is_dicomweb_url(source):
        ref = dicomweb_series(source)
        try:
            return _series_name_of(instance_metadata(*ref, sop_class_uid=VL_WSI_SOP_CLASS))
        except DicomWebError as err:
            raise InputError(redact(source), "cannot read the series from the DICOMweb server (VL Whole Slide "
                                             f"Microscopy instances): {err.problem}") from None
    files = _series_files(Path(source))
    header = _headers(files[0])
    return _series_name_of(header)


def _series_files(path: Path) -> list[Path]:
    """The files of the one series ``path`` names: a folder's (it must hold exactly one VL WSI series), or a file's
    series in its folder. InputError naming ``path`` otherwise."""
    if path.is_dir():
        series = dicom_series(dicom_files_in(path))
        if not series:
            raise InputError(path, "holds no DICOM VL Whole Slide Microscopy instances (.dcm files)")
        if len(series) > 1:
            raise InputError(path, f"holds {len(series)} DICOM series ({', '.join(list(series)[:4])}): give one of a "
                                   "series' .dcm files, or a folder per series")
        return next(iter(series.values()))
    header = _headers(path)
    if header is None:
        raise InputError(path, "not a DICOM file")
    if str(header.get("SOPClassUID", "")) != VL_WSI_SOP_CLASS:
        raise InputError(path, f"not a VL Whole Slide Microscopy image (SOP Class {header.get('SOPClassUID')})")
    siblings = [p for p in dicom_files_in(path.parent) if p != path]
    return dicom_series([path, *siblings])[str(header.get("SeriesInstanceUID", ""))]


# ---- reading -------------------------------------------------------------------------------------------------------


def _patch_image_type(dataset: Any, patched: list[str]) -> Any:
    """Give a VL WSI instance without a usable ImageType (OrthancWSIDicomizer writes none) the VOLUME flavour,
    noting its SOPInstanceUID in ``patched``."""
    if str(getattr(dataset, "SOPClassUID", "")) != VL_WSI_SOP_CLASS:
        return dataset
    image_type = list(dataset.get("ImageType") or [])
    if len(image_type) < 3 or str(image_type[2]).upper() not in _FLAVOURS:
        dataset.ImageType = _PATCHED_IMAGE_TYPE
        patched.append(str(getattr(dataset, "SOPInstanceUID", "?")))
    return dataset


def _web_client(ref: DicomWebSeries, patched: list[str]) -> Any:
    """A wsidicom DICOMweb client (dicomweb-client underneath) for ``ref``'s server whose instance metadata is
    patched by `_patch_image_type`."""
    from wsidicom import WsiDicomWebClient

    class PatchingClient(WsiDicomWebClient):
        """Checks every UID the server's answers give before it becomes part of a request URL."""

        def get_instance(self, study_uid: Any, series_uid: Any, instance_uid: Any) -> Any:
            _check_uids(study_uid, series_uid, instance_uid)
            return _patch_image_type(super().get_instance(study_uid, series_uid, instance_uid), patched)

        def get_frames(self, study_uid: Any, series_uid: Any, instance_uid: Any, *args: Any, **kwargs: Any) -> Any:
            _check_uids(study_uid, series_uid, instance_uid)
            return super().get_frames(study_uid, series_uid, instance_uid, *args, **kwargs)

    def _check_uids(study_uid: Any, series_uid: Any, instance_uid: Any) -> None:
        for uid, what in ((study_uid, "StudyInstanceUID"), (series_uid, "SeriesInstanceUID"),
                          (instance_uid, "SOPInstanceUID")):
            check_uid(uid, what, ref.url)

    return PatchingClient(client(ref.base_url))


def _file_source(files: list[Path], patched: list[str]) -> Any:
    """A wsidicom file source over ``files`` whose datasets are patched by `_patch_image_type` as they are read."""
    from wsidicom.file import WsiDicomFileSource
    from wsidicom.file.io import WsiDicomIO

    class PatchingIO(WsiDicomIO):
        def read_dataset(self, force: bool = False) -> Any:
            return _patch_image_type(super().read_dataset(force), patched)

    streams = []
    try:
        for path in files:
            streams.append(PatchingIO(open(path, "rb"), filepath=path, owned=True))
        return WsiDicomFileSource(streams)
    except Exception:
        for stream in streams:
            stream.close()
        raise


class DicomSlide(Slide):
    """DICOM VL Whole Slide Microscopy series, local or over DICOMweb (see the module text).

    Args:
        path: a folder of one series' instances, one instance file (its series is the instances in its folder
            sharing its SeriesInstanceUID), or a DICOMweb series URL (`pathbundles.dicomweb.parse_series_url`).
        mpp: level-0 um/px overriding the instances' pixel spacing.
        max_level0_px: as for `Slide`.

    Attributes:
        series_name: the series' output name (ContainerIdentifier, else SeriesInstanceUID,
            sanitised to one plain file name).
    """

    backend = "dicom"

    @classmethod
    def _checked_path(cls, source: str) -> Path | str:
        if is_dicomweb_url(source):
            dicomweb_series(source, SlideError)
            return source
        path = Path(source)
        if not path.exists():
            raise SlideError(path, "file or folder does not exist")
        if not (path.is_dir() or path.is_file()):
            raise SlideError(path, "not a regular file or folder")
        return path

    def _open(self) -> None:
        self._patched: list[str] = []
        self._files: list[Path] = []
        if isinstance(self.path, str):
            from wsidicom.web import WsiDicomWebSource

            ref = dicomweb_series(self.path, SlideError)
            try:
                self._source = WsiDicomWebSource(_web_client(ref, self._patched), ref.study_uid, [ref.series_uid])
            except Exception as err:
                raise SlideError(self.source, f"cannot open the series on the DICOMweb server: "
                                              f"{type(err).__name__}: {err}") from err
        else:
            try:
                self._files = _series_files(self.path)
            except InputError as err:
                raise SlideError(self.path, err.problem) from None
            self._source = _file_source(self._files, self._patched)
        self._source.resize_cache(FRAME_CACHE_BYTES)
        if self._patched and self.source not in _warned_patched:  # once per process: workers reopen slides
            _warned_patched.add(self.source)
            logger.warning("%s: %d DICOM instance(s) state no usable ImageType (as OrthancWSIDicomizer writes): read "
                           "as VOLUME (pyramid level) instances", self.source, len(self._patched))
        by_size: dict[tuple[int, int], Any] = {}
        for instance in self._source.level_instances:
            by_size.setdefault((instance.size.width, instance.size.height), instance)
        if not by_size:
            raise SlideError(self.source, "the series holds no VOLUME (pyramid) instances")
        sizes = sorted(by_size, key=lambda wh: wh[0] * wh[1], reverse=True)
        (w0, h0), kept = sizes[0], [sizes[0]]
        for w, h in sizes[1:]:
            if _similar_ratio(w0 / w, h0 / h):
                kept.append((w, h))
            else:
                logger.warning("%s: VOLUME instance of %d x %d px left out: its aspect ratio is not level 0's "
                               "(%d x %d px)", self.source, w, h, w0, h0)
        self._levels = [by_size[wh] for wh in kept]
        if self._mpp_override is None and any(level.pixel_spacing is None for level in self._levels):
            raise SlideError(self.source, "the DICOM instances state no pixel spacing (PixelSpacing in the Pixel "
                                          f"Measures functional group), so the slide's resolution is unknown; "
                                          f"{MPP_HINT}")

    def _geometry(self) -> tuple[list[tuple[int, int]], str, list[str]]:
        associated = [name for name, instances in (("label", self._source.label_instances),
                                                   ("overview", self._source.overview_instances),
                                                   ("thumbnail", self._source.thumbnail_instances)) if list(instances)]
        dims = [(level.size.width, level.size.height) for level in self._levels]
        return dims, "dicom", associated

    def _read_level(self, level: int, level_xy: tuple[int, int], size_px: tuple[int, int]) -> np.ndarray:
        from wsidicom.geometry import Point, Region, Size

        instance = self._levels[level]
        region = Region(Point(*level_xy), Size(*size_px))
        image = instance.get_region(region, instance.default_z, instance.default_path)
        if image.mode not in ("L", "RGB", "RGBA"):
            image = image.convert("RGB")
        return np.asarray(image)

    def _file_mpp(self) -> tuple[float, float] | None:
        spacing = self._levels[0].pixel_spacing  # mm per px, (column spacing, row spacing)
        return None if spacing is None else (spacing.width * 1000.0, spacing.height * 1000.0)

    def _objective_power(self) -> float | None:
        for path in self._levels[0].dataset.get("OpticalPathSequence") or []:
            try:
                power = float(path.get("ObjectiveLensPower") or 0)
            except (TypeError, ValueError):
                continue
            if power > 0:
                return power
        return None

    def _tile_sizes(self) -> dict[int, tuple[int, int]]:
        return {i: (level.tile_size.width, level.tile_size.height) for i, level in enumerate(self._levels)}

    def _stored_bytes(self) -> int | None:
        """The series' files' bytes together; None over DICOMweb."""
        return sum(p.stat().st_size for p in self._files) if self._files else None

    def _close(self) -> None:
        if hasattr(self, "_source"):
            self._source.close()

    @property
    def series_name(self) -> str:
        return _series_name_of(self._levels[0].dataset)

    def source_datasets(self) -> list[Any]:
        """Metadata (pydicom Datasets, no pixel data) of the level-0 VOLUME instance(s), every concatenation part,
        optical path and focal plane: what highdicom takes as ``source_images``. Copies: changing them changes
        nothing here."""
        import pydicom

        w0, h0 = self.level_dimensions[0]
        datasets = []
        for instance in self._source.level_instances:
            if (instance.size.width, instance.size.height) == (w0, h0):
                for dataset in instance.datasets:
                    plain = pydicom.Dataset(copy.deepcopy(dataset))
                    plain.file_meta = copy.deepcopy(getattr(dataset, "file_meta", pydicom.dataset.FileMetaDataset()))
                    datasets.append(plain)
        return datasets
