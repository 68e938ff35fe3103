"""What a built application does, apart from the MONAI Deploy SDK: its settings, its slide list, its DICOM results,
its summary.

Settings come from the ``pathbundles`` section of the application's ``app.yaml`` (``$HOLOSCAN_CONFIG_PATH`` when
set: inside a MAP that is the packaged ``app.yaml``, or the file given to ``monai-deploy run --config``), then from
``--override KEY=VALUE`` options on the command line, which win. Overrides are bundle config ids set for the run, as
``python -m monai.bundle run --KEY VALUE`` sets them.

DICOM in, DICOM out (the MONAI Deploy SDK's conventions): the input may be a folder of DICOM instances, one ``.dcm``
file, a DICOMweb series URL (``-i http://host/dicom-web/studies/<UID>/series/<UID>``; the SDK's own ``-i`` takes only
existing paths, so :func:`split_dicom_args` takes a URL out first) or a text file of such URLs. Every slide whose
input was DICOM gets its results as DICOM objects too (:func:`export_dicom_results`, under ``OUTPUT/dicom/``), and
with a STOW-RS destination (``dicom.stow_url`` in ``app.yaml``, or ``--stow_url URL``) they are stored there
(:func:`store_dicom_results`); a failure of either is listed in ``summary.json`` and fails the run.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pathbundles
from pathbundles.errors import PathBundlesError

#: The application's settings file (read by the SDK's packager as the MAP configuration too).
APP_CONFIG = "app.yaml"
#: Provenance of a built application (what it was built from, by which versions), copied into every summary.
BUILD_RECORD = "build.json"
#: The run's summary, written into the output folder beside the bundle's outputs.
SUMMARY = "summary.json"
#: Section of ``app.yaml`` read by the application (the SDK reads ``application`` and ``resources``).
SECTION = "pathbundles"
#: Optional section of ``app.yaml`` for DICOM results: ``stow_url``, the DICOMweb base URL they are stored to (STOW-RS;
#: empty or absent: not stored).
DICOM_SECTION = "dicom"


class DeployError(PathBundlesError):
    """A bundle cannot be built into an application, or a built application is not runnable as configured."""


@dataclass
class AppSettings:
    """What a built application runs.

    Args:
        bundle: the embedded bundle folder (absolute).
        kind: what its inputs are, as :func:`pathbundles.bundle.datalist` lists them: "metastasis" (slides),
            "mitosis" (HPF images) or "multiclass" (slides).
        config_files: config names in the bundle's ``configs/``, merged in order.
        overrides: config ids set for every run (``app.yaml``, then ``--override``).
        build: the application's build record (``build.json``), ``{}`` when absent.
        stow_url: the DICOMweb base URL the DICOM results are stored to (``dicom.stow_url`` of ``app.yaml``, then
            ``--stow_url``); ``None``: kept in the output folder only.
    """

    bundle: Path
    kind: str
    config_files: list[str]
    overrides: dict[str, Any] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)
    stow_url: str | None = None


def parse_value(text: str) -> Any:
    """A command-line value as ``python -m monai.bundle run`` reads it: a Python literal (``8``, ``0.5``,
    ``False``, ``[1, 2]``, ``{'a': 1}``), else JSON (``true``, ``null``), else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def split_override_args(argv: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Take ``--override KEY=VALUE`` (repeatable) out of ``argv``; returns the overrides and the other arguments
    (``argv[0]`` kept), which go to the SDK's own parser (``-i``, ``-o``, ``-l``, ...)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    known, rest = parser.parse_known_args(list(argv[1:]))
    overrides = {}
    for item in known.override:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DeployError(f"--override {item!r}: expected KEY=VALUE, e.g. --override num_workers=0")
        overrides[key.strip()] = parse_value(value)
    return overrides, [*argv[:1], *rest]


def split_dicom_args(argv: Sequence[str]) -> tuple[str | None, str | None, list[str]]:
    """Take ``--stow_url URL`` and an input (``-i``/``--input``) that is a DICOMweb URL out of ``argv``; returns
    (stow URL or None, input URL or None, the other arguments). The SDK's parser accepts only an existing path as
    input; a URL input is handed to the slide list instead. URLs are checked (:func:`pathbundles.dicomweb.validate_url`:
    http(s), no credentials); ``--stow_url ""`` turns storing off for the run."""
    from pathbundles.dicomweb import is_dicomweb_url, validate_url

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--stow_url", default=None)
    parser.add_argument("-i", "--input", default=None)
    known, rest = parser.parse_known_args(list(argv[1:]))
    if known.input is not None and not is_dicomweb_url(known.input):
        rest = ["--input", known.input, *rest]
    input_url = validate_url(known.input) if known.input is not None and is_dicomweb_url(known.input) else None
    stow_url = None if known.stow_url is None else validate_url(known.stow_url) if known.stow_url.strip() else ""
    return stow_url, input_url, [*argv[:1], *rest]


def load_settings(app_dir: str | os.PathLike, overrides: Mapping[str, Any] | None = None,
                  stow_url: str | None = None) -> AppSettings:
    """The settings of the application in ``app_dir``: its ``app.yaml`` (or ``$HOLOSCAN_CONFIG_PATH``) with
    ``overrides`` applied over the file's own, and ``stow_url`` (``--stow_url``; ``""``: off) over its
    ``dicom.stow_url``; the bundle path is relative to ``app_dir``."""
    import yaml

    from pathbundles.dicomweb import DicomWebError, validate_url

    app_dir = Path(app_dir).resolve()
    config_path = Path(os.environ.get("HOLOSCAN_CONFIG_PATH") or app_dir / APP_CONFIG)
    try:
        doc = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise DeployError(f"{config_path}: cannot read the application settings: {err}") from err
    section = doc.get(SECTION)
    if not isinstance(section, dict) or not {"bundle", "kind"} <= set(section):
        raise DeployError(f"{config_path}: no '{SECTION}' section with 'bundle' and 'kind' (a file written by "
                          "python -m pathbundles deploy build has one)")
    bundle = (app_dir / section["bundle"]).resolve()
    if not (bundle / "configs" / "metadata.json").is_file():
        raise DeployError(f"{config_path}: {SECTION}.bundle = {section['bundle']!r} is not a bundle folder "
                          f"(no {bundle / 'configs' / 'metadata.json'})")
    dicom = doc.get(DICOM_SECTION) or {}
    if not isinstance(dicom, dict) or not set(dicom) <= {"stow_url"}:
        raise DeployError(f"{config_path}: '{DICOM_SECTION}' must be a mapping with at most 'stow_url' (a DICOMweb "
                          f"URL, or empty), got {dicom!r}")
    if stow_url is None:
        try:
            stow_url = validate_url(dicom["stow_url"]) if str(dicom.get("stow_url") or "").strip() else None
        except DicomWebError as err:
            raise DeployError(f"{config_path}: {DICOM_SECTION}.stow_url: {err}") from None
    record = app_dir / BUILD_RECORD
    return AppSettings(bundle=bundle, kind=str(section["kind"]),
                       config_files=list(section.get("config_files") or ["inference.json"]),
                       overrides={**(section.get("overrides") or {}), **dict(overrides or {})},
                       build=json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {},
                       stow_url=stow_url or None)


def slide_list(source: str | os.PathLike, kind: str) -> list[dict]:
    """The datalist of an application's input, for a bundle whose inputs are of ``kind``: as the bundle's
    ``--data_source`` lists it (:func:`pathbundles.bundle.datalist`), with every listed image checked to exist
    before the application starts.

    Args:
        source: a folder (every slide in it, or every HPF image for ``kind="mitosis"``, sorted by name; or the DICOM
            instances of one or more series); a datalist ``.json``; one slide or image file (a ``.dcm`` file: its
            series); a DICOMweb series URL (a string, kept as it is: a path would fold its ``//``); or a text
            manifest: one path or DICOMweb series URL a line (paths relative to the manifest's folder), blank lines
            and ``#`` comments skipped.
        kind: "metastasis", "mitosis" or "multiclass".

    Returns:
        Items with an absolute ``image`` path or a URL (and a ``name``, or from a datalist its other keys).
    """
    from pathbundles.bundle import datalist
    from pathbundles.dicomweb import is_dicomweb_url, validate_url

    # checked here too: HOLOSCAN_INPUT_PATH reaches the application without split_dicom_args
    return datalist(validate_url(source) if is_dicomweb_url(source) else Path(source), kind=kind, existing=True)


def is_dicom_input(image: str | os.PathLike) -> bool:
    """Whether a datalist item's image is DICOM (:func:`pathbundles.dicom_wsi.is_dicom_source`: a DICOMweb URL, a
    ``.dcm`` file or a file with the DICOM prefix, a folder of DICOM files), or any folder (the other inputs of a
    bundle are single files: a folder that is no series fails its DICOM export by name)."""
    from pathbundles.dicom_wsi import is_dicom_source

    return is_dicom_source(image) or Path(image).is_dir()


def export_dicom_results(records: Sequence[dict], datalist: Sequence[dict], output_dir: str | os.PathLike,
                         bundle: Mapping[str, Any]) -> dict[str, dict]:
    """Write the DICOM results of every slide whose input was DICOM (:func:`is_dicom_input`) into
    ``OUTPUT/dicom/<slide>/``, from the bundle's own outputs of that slide
    (:func:`pathbundles.dicom_writers.export_slide_results`, referencing the slide's source instances).

    Args:
        records: the bundle writer's records of the slides that were written.
        datalist: the items that were run (their images: which slides are DICOM, and where to read their source
            instances).
        output_dir: the run's output folder.
        bundle: :func:`pathbundles.bundle_runner.bundle_info` of the run.

    Returns:
        {slide name: {"files": [paths]}} or {slide name: {"failed": why}} (a slide that fails does not stop the
        others); slides not from DICOM are not listed.
    """
    from pathbundles.outputs import slide_name

    images = dict(map(slide_name, datalist))
    results: dict[str, dict] = {}
    for record in records:
        image = images.get(record["name"])
        if image is None or not is_dicom_input(image):
            continue
        try:
            from pathbundles.dicom_writers import export_slide_results
            from pathbundles.wsi import open_slide

            with open_slide(image) as slide:
                files = export_slide_results(output_dir, record["name"], slide.source_datasets(), dict(bundle))
            results[record["name"]] = {"files": [str(f) for f in files]}
        except Exception as err:  # noqa: BLE001 - one slide's failure is reported, the others go on
            results[record["name"]] = {"failed": f"DICOM export: {err.__class__.__name__}: {err}"}
    return results


def store_dicom_results(results: Mapping[str, dict], stow_url: str) -> dict[str, dict]:
    """Store each slide's DICOM results (:func:`export_dicom_results`) to ``stow_url`` (STOW-RS, one request per
    slide); returns ``results`` with, per slide, ``stored`` (the SOP Instance UIDs) or ``failed`` (why: the URL and
    HTTP status). A slide whose export failed is left as it is."""
    from pathbundles.dicomweb import store_instances

    out = {}
    for name, result in results.items():
        if "failed" in result:
            out[name] = dict(result)
            continue
        try:
            answer = store_instances(stow_url, result["files"])
            out[name] = {**result, "stored": [s["sop_instance_uid"] for s in answer["stored"]]}
        except Exception as err:  # noqa: BLE001 - one slide's failure is reported, never dropped, the others go on
            why = str(err) if isinstance(err, PathBundlesError) else f"{err.__class__.__name__}: {err}"
            out[name] = {**result, "failed": f"STOW-RS: {why}"}
    return out


def summarize(records: Sequence[dict], bundle: Mapping[str, Any], output_dir: str | os.PathLike,
              datalist: Sequence[dict] = (), settings: AppSettings | None = None,
              failed: Mapping[str, str] | None = None, dicom: Mapping[str, dict] | None = None) -> dict:
    """The run's summary: the bundle (name, version, weights and config hashes, whether the weights are demo weights
    and their warning (``demo_weights``, ``weights_warning``), configs, overrides), the
    application's build record, the pathbundles code that ran, and per slide its name, input image, score,
    detection count, the writer's other values and its output files relative to ``output_dir``.

    Args:
        records: the bundle writer's records (:func:`pathbundles.bundle_runner.run_inference`).
        bundle: :func:`pathbundles.bundle_runner.bundle_info` of the run.
        output_dir: the run's output folder.
        datalist: the items that were run (to name each slide's input image).
        settings: the application's settings (configs, overrides, build record).
        failed: {slide name: why} of the slides that failed: listed with ``failed`` (why) and no outputs, after
            the others; ``n_failed`` counts them.
        dicom: the DICOM results of the slides from DICOM (:func:`export_dicom_results`, then
            :func:`store_dicom_results`): each such slide gets ``dicom``: ``{"files"}`` (relative to
            ``output_dir``), with ``stored`` (SOP Instance UIDs) and ``stow_url`` when stored, or ``failed``;
            ``n_dicom_failed`` counts the failures.
    """
    from pathbundles.outputs import slide_name

    root = Path(output_dir).resolve()
    images = dict(map(slide_name, datalist))

    def relative(path: str) -> str:
        resolved = Path(path).resolve()
        return resolved.relative_to(root).as_posix() if resolved.is_relative_to(root) else str(resolved)

    dicom = dict(dicom or {})

    def dicom_entry(name: str) -> dict:
        if name not in dicom:
            return {}
        entry = {k: v for k, v in dicom[name].items() if k != "files"}
        if "stored" in entry and settings is not None:
            entry["stow_url"] = settings.stow_url
        return {"dicom": {"files": [relative(p) for p in dicom[name].get("files", [])], **entry}}

    slides = [{"slide": r["name"], "image": images.get(r["name"]), "score": r["score"],
               "n_detections": r["n_detections"],
               **{k: v for k, v in r.items() if k not in ("name", "score", "n_detections", "outputs")},
               "outputs": {kind: relative(p) for kind, p in r["outputs"].items()},
               **dicom_entry(r["name"])} for r in records]
    slides += [{"slide": name, "image": images.get(name), "failed": why} for name, why in (failed or {}).items()]
    return {"bundle": {"name": bundle.get("name"), "version": bundle.get("version"),
                       "weights_sha256": bundle.get("weights_sha256"),
                       "demo_weights": bundle.get("demo_weights"), "weights_warning": bundle.get("weights_warning"),
                       "config_sha256": bundle.get("config_sha256"),
                       "config_files": list(settings.config_files) if settings else None,
                       "overrides": dict(settings.overrides) if settings else None},
            "application": dict(settings.build) if settings else {},
            "pathbundles": {"version": pathbundles.__version__, "path": str(Path(pathbundles.__file__).parent)},
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "n_slides": len(slides), "n_failed": len(failed or {}),
            "n_dicom_failed": sum("failed" in d for d in dicom.values()), "slides": slides}


def write_summary(summary: Mapping[str, Any], output_dir: str | os.PathLike) -> Path:
    """Write ``summary.json`` into ``output_dir`` atomically; returns its path."""
    from pathbundles.atomic import atomic_path

    final = Path(output_dir) / SUMMARY
    with atomic_path(final) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return final
