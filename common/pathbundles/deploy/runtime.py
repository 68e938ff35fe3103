"""What a built application does, apart from the MONAI Deploy SDK: its settings, its slide list, its summary.

Settings come from the ``pathbundles`` section of the application's ``app.yaml`` (``$HOLOSCAN_CONFIG_PATH`` when
set: inside a MAP that is the packaged ``app.yaml``, or the file given to ``monai-deploy run --config``), then from
``--override KEY=VALUE`` options on the command line, which win. Overrides are bundle config ids set for the run, as
``python -m monai.bundle run --KEY VALUE`` sets them.
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
    """

    bundle: Path
    kind: str
    config_files: list[str]
    overrides: dict[str, Any] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)


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


def load_settings(app_dir: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> AppSettings:
    """The settings of the application in ``app_dir``: its ``app.yaml`` (or ``$HOLOSCAN_CONFIG_PATH``) with
    ``overrides`` applied over the file's own; the bundle path is relative to ``app_dir``."""
    import yaml

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
    record = app_dir / BUILD_RECORD
    return AppSettings(bundle=bundle, kind=str(section["kind"]),
                       config_files=list(section.get("config_files") or ["inference.json"]),
                       overrides={**(section.get("overrides") or {}), **dict(overrides or {})},
                       build=json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {})


def slide_list(source: str | os.PathLike, kind: str) -> list[dict]:
    """The datalist of an application's input, for a bundle whose inputs are of ``kind``: as the bundle's
    ``--data_source`` lists it (:func:`pathbundles.bundle.datalist`), with every listed image checked to exist
    before the application starts.

    Args:
        source: a folder (every slide in it, or every HPF image for ``kind="mitosis"``, sorted by name); a datalist
            ``.json``; one slide or image file; or a text manifest: one path a line (relative to the manifest's
            folder), blank lines and ``#`` comments skipped.
        kind: "metastasis", "mitosis" or "multiclass".

    Returns:
        Items with an absolute ``image`` path (and, from a datalist, its other keys).
    """
    from pathbundles.bundle import datalist

    return datalist(source, kind=kind, existing=True)


def summarize(records: Sequence[dict], bundle: Mapping[str, Any], output_dir: str | os.PathLike,
              datalist: Sequence[dict] = (), settings: AppSettings | None = None,
              failed: Mapping[str, str] | None = None) -> dict:
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
    """
    from pathbundles.outputs import slide_name

    root = Path(output_dir).resolve()
    images = dict(map(slide_name, datalist))

    def relative(path: str) -> str:
        resolved = Path(path).resolve()
        return resolved.relative_to(root).as_posix() if resolved.is_relative_to(root) else str(resolved)

    slides = [{"slide": r["name"], "image": images.get(r["name"]), "score": r["score"],
               "n_detections": r["n_detections"],
               **{k: v for k, v in r.items() if k not in ("name", "score", "n_detections", "outputs")},
               "outputs": {kind: relative(p) for kind, p in r["outputs"].items()}} for r in records]
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
            "n_slides": len(slides), "n_failed": len(failed or {}), "slides": slides}


def write_summary(summary: Mapping[str, Any], output_dir: str | os.PathLike) -> Path:
    """Write ``summary.json`` into ``output_dir`` atomically; returns its path."""
    from pathbundles.atomic import atomic_path

    final = Path(output_dir) / SUMMARY
    with atomic_path(final) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return final
