"""``python -m pathbundles deploy build``: a bundle as a complete MONAI Deploy application package build context.

``build(out, bundle=...)`` (or ``model="models:/<name>@champion"``, exported from the MLflow registry) writes::

    OUT/
      __main__.py, app.py   entry points: pathbundles.deploy.app.main(OUT); `python OUT -i INPUT -o OUTPUT` runs it
      app.yaml              MAP configuration: application title and version, resources, and the pathbundles
                            section (bundle folder, input kind, configs, overrides) the application reads
      requirements.txt      pathbundles' dependencies and the SDK, pinned to the versions installed at build time
      build.json            provenance: source bundle or registered version, hashes, versions, time
      README.md             the commands: run locally, package with Docker, run the MAP
      bundle/               the bundle: configs, models, docs, LICENSE (never eval/ outputs)
      pathbundles/          the pathbundles source the application was built with

The MAP gets ``pathbundles`` as source beside ``app.py`` (first on ``sys.path`` when Python runs the folder), not
from an index: the image then runs exactly the code that was tested, and the packager's ``pip install -r
requirements.txt`` (run before the application folder is copied into the image) needs no local wheel. The SDK is
not needed to build, only to run.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pathbundles.deploy.runtime import (APP_CONFIG, BUILD_RECORD, DICOM_SECTION, SECTION, SUMMARY,
                                        DeployError)
from pathbundles.outputs import DICOM_SUBFOLDER

#: Bundle content that is not copied: outputs, tracking stores, caches, hidden files (as for a registered model,
#: ``pathbundles.registry``).
BUNDLE_EXCLUDED = ("eval", "__pycache__", "mlflow", ".*")
#: Peak resident memory (MiB) of one phantom slide or HPF through each bundle's inference on CPU, and where it was
#: measured. The application requests twice the peak, rounded up to whole GiB, at least 2 GiB; bundles not listed
#: request DEFAULT_MEMORY_GIB.
MEASURED_PEAK_MIB = {
    "scannet": (1136, "benchmarks/README.md: whole 4096 x 4096 phantom slide, lp 24, alpha 2"),
    "spatial_lstm": (1009, "benchmarks/README.md: whole 4096 x 4096 phantom slide, 8-fold TTA"),
    "segmitos": (1683, "benchmarks/results/segmitos.json: vmhwm_process_mib, 2084 px HPFs in one pass"),
    "dmmn": (1160, "bench_dmmn.py: whole 8192 x 8192 phantom slide, the highest peak RSS of three full runs "
                   "(1160, 1006 and 975 MiB; benchmarks/results/dmmn.json holds the last)"),
}
DEFAULT_MEMORY_GIB = 4
#: GPU memory requested with ``gpu=1``: the SDK's stated minimum GPU (8 GB); not measured for these bundles.
GPU_MEMORY = "8Gi"
#: Packages of the ``deploy`` extra that build MAPs but are not needed inside one.
PACKAGING_ONLY = ("holoscan-cli",)

_KIND = re.compile(r"""kind\s*=\s*['"](\w+)['"]""")
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (name, alias, version)."""
    match = _MODEL_URI.match(uri.strip())
    if match is None:
        raise DeployError(f"--model {uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    return match["name"], match["alias"], match["version"]


def input_kind(bundle: str | os.PathLike, config_files: Sequence[str] = ("inference.json",)) -> str:
    """What the bundle's inference reads, from its own ``datalist`` item (``pathbundles.bundle.datalist(...,
    kind='metastasis')``): "metastasis", "mitosis" or "multiclass"."""
    from monai.bundle import ConfigParser

    from pathbundles.bundle_runner import config_paths

    parser = ConfigParser()
    parser.read_config([str(p) for p in config_paths(bundle, config_files)])
    expression = str(parser.get("datalist", ""))
    match = _KIND.search(expression)
    if match is None:
        raise DeployError(f"{Path(bundle).resolve()}: cannot tell the input kind from its datalist item "
                          f"({expression!r}); pass --kind metastasis|mitosis|multiclass")
    return match[1]


def resources(bundle_id: str, gpu: int = 0, cpu: int = 2, memory: str | None = None) -> dict:
    """The ``resources`` of ``app.yaml``: ``cpu`` (the main process and the configs' two DataLoader workers by
    default), ``memory`` (from :data:`MEASURED_PEAK_MIB` unless given, e.g. "8Gi"), ``gpu`` 0 or 1 (the bundles
    run on CPU and use a GPU when one is there) and, with a GPU, ``gpuMemory``."""
    if gpu not in (0, 1):
        raise DeployError(f"--gpu {gpu!r}: expected 0 (CPU) or 1")
    if memory is None:
        peak = MEASURED_PEAK_MIB.get(bundle_id)
        memory = f"{max(2, math.ceil(2 * peak[0] / 1024)) if peak else DEFAULT_MEMORY_GIB}Gi"
    out = {"cpu": int(cpu), "gpu": int(gpu), "memory": str(memory)}
    if gpu:
        out["gpuMemory"] = GPU_MEMORY
    return out


def pinned_requirements() -> tuple[list[str], list[str]]:
    """``NAME==VERSION`` of pathbundles' dependencies and its ``deploy`` extra (less :data:`PACKAGING_ONLY`) at the
    installed versions (public part: ``torch==2.13.0`` for ``2.13.0+cpu``, so a GPU image gets the CUDA build);
    returns (lines, warnings about packages not installed here, given by their declared range instead)."""
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    try:
        declared = requires("pathbundles") or []
    except PackageNotFoundError:
        raise DeployError("pathbundles is not installed (pip install -e '.[deploy]'): its dependencies cannot be "
                          "pinned") from None
    lines, warnings = [], []
    for text in declared:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": "deploy"}):
            continue
        if canonicalize_name(req.name) in PACKAGING_ONLY:
            continue
        name = f"{req.name}[{','.join(sorted(req.extras))}]" if req.extras else req.name
        try:
            lines.append(f"{name}=={Version(version(req.name)).public}")
        except PackageNotFoundError:
            lines.append(f"{name}{req.specifier}")
            warnings.append(f"{req.name} is not installed here: requirements.txt gives its declared range "
                            f"({req.specifier or 'any'}), not a tested version")
    return sorted(lines, key=str.lower), warnings


def _installed(*names: str) -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _copy_bundle(source: Path, target: Path) -> None:
    if not (source / "configs" / "metadata.json").is_file():
        raise DeployError(f"{source}: not a bundle (no configs/metadata.json)")
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*BUNDLE_EXCLUDED))


def _yaml_text(doc: dict, header: str) -> str:
    import yaml

    return f"%YAML 1.2\n{header}---\n" + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=120)


def build(out: str | os.PathLike, bundle: str | os.PathLike | None = None, model: str | None = None,
          tracking_uri: str | None = None, config_files: Sequence[str] = ("inference.json",),
          kind: str | None = None, gpu: int = 0, cpu: int = 2, memory: str | None = None) -> dict:
    """Write the MAP build context of a bundle into ``out`` (see the module docstring).

    Args:
        out: the application folder; must not exist or be empty. It appears under this name only when complete.
        bundle: a bundle folder (``bundles/<name>``), copied without its outputs. Exclusive with ``model``.
        model: a registered model, ``models:/<name>@<alias>`` or ``models:/<name>/<version>``, exported from the
            MLflow registry (``pathbundles.registry.export``: files checked against the registration's hashes).
        tracking_uri: the registry's tracking store (for ``model``; default as for ``registry`` commands).
        config_files: the bundle configs the application merges (names in ``configs/``).
        kind: the input kind; default: read from the bundle's ``datalist`` item.
        gpu: 0 or 1, the GPUs the MAP requests (``resources.gpu``).
        cpu: CPU cores the MAP requests.
        memory: memory the MAP requests (e.g. "8Gi"); default from :data:`MEASURED_PEAK_MIB`.

    Returns:
        ``{"out", "bundle": {name, version, weights_sha256, config_sha256}, "source", "kind", "resources",
        "package_command", "warnings"}``.
    """
    from pathbundles import __version__
    from pathbundles.bundle_runner import bundle_info

    if (bundle is None) == (model is None):
        raise DeployError("give exactly one of --bundle bundles/<name> and --model models:/<name>@champion")
    target = Path(out).resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DeployError(f"{target}: build target exists and is not an empty folder")
    config_files = [config_files] if isinstance(config_files, str) else list(config_files)
    partial = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
    partial.mkdir(parents=True)
    try:
        if bundle is not None:
            source_bundle = Path(bundle).resolve()
            _copy_bundle(source_bundle, partial / "bundle")
            bundle_id = source_bundle.name
            source: dict[str, Any] = {"bundle": str(source_bundle)}
        else:
            from pathbundles.registry import RegistryError, export

            name, alias, version = parse_model_uri(model)
            try:
                exported = export(name, partial / "bundle", alias=alias, version=version, tracking_uri=tracking_uri)
            except RegistryError as err:
                raise DeployError(f"--model {model}: {err}") from None
            bundle_id = name.removeprefix("pathbundles-")
            source = {"model_uri": model, "registered_name": name, "registered_version": exported["version"]}
        kind = kind or input_kind(partial / "bundle", config_files)
        info = bundle_info(partial / "bundle", config_files)
        warnings = []
        if info["weights_sha256"] is None:
            warnings.append(f"the bundle has no {Path(info['weights']).relative_to(partial / 'bundle').as_posix()}: "
                            "build again once it has weights, or run the application with --override "
                            "ckpt_path=<weights> (a path it can read; inside a MAP, a mounted one)")
        requirements, missing = pinned_requirements()
        warnings += missing
        shutil.copytree(Path(__file__).resolve().parents[1], partial / "pathbundles",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        app_resources = resources(bundle_id, gpu=gpu, cpu=cpu, memory=memory)
        tag = image_tag(bundle_id, info["version"], info["weights_sha256"])
        package_command = (f"monai-deploy package {target} --config {target / APP_CONFIG} --tag {tag} "
                           "--platform x86_64 -l DEBUG")
        bundle_summary = {"name": info["name"], "version": info["version"], "weights_sha256": info["weights_sha256"],
                          "demo_weights": info["demo_weights"], "weights_warning": info["weights_warning"],
                          "config_sha256": info["config_sha256"]}
        if info["weights_warning"]:
            warnings.append(info["weights_warning"])
        record = {"built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "bundle_id": bundle_id, "source": source,
                  "bundle": bundle_summary, "kind": kind, "config_files": config_files,
                  "pathbundles": __version__, "python": sys.version.split()[0],
                  "sdk": _installed("monai-deploy-app-sdk", "holoscan-cu13", "holoscan-cli")}
        app_yaml = {"application": {"title": f"pathbundles {bundle_id}: {info['name']}",
                                    "version": str(info["version"]),
                                    "input-formats": ["file"], "output-formats": ["file"]},
                    "resources": app_resources,
                    SECTION: {"bundle": "bundle", "kind": kind, "config_files": config_files, "overrides": {}}}
        header = (f"# MONAI Deploy application of the {bundle_id} bundle, written by python -m pathbundles deploy "
                  "build.\n# application/resources: read by monai-deploy package. pathbundles: read by the "
                  "application\n# (overrides = bundle config ids set for every run; --override KEY=VALUE adds "
                  "to them).\n")
        files = {
            APP_CONFIG: _yaml_text(app_yaml, header) + _DICOM_YAML,
            BUILD_RECORD: json.dumps(record, indent=2) + "\n",
            "requirements.txt": _requirements_text(requirements, record),
            "app.py": _APP_PY.format(bundle_id=bundle_id, name=info["name"], version=info["version"]),
            "__main__.py": _MAIN_PY,
            "README.md": _readme(target, bundle_id, info, record, app_resources, tag, package_command, warnings),
        }
        for relative, text in files.items():
            (partial / relative).write_text(text, encoding="utf-8")
        if target.exists():
            target.rmdir()
        os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return {"out": str(target), "bundle": bundle_summary, "source": source, "kind": kind,
            "resources": app_resources, "package_command": package_command, "warnings": warnings}


def _requirements_text(requirements: list[str], record: dict) -> str:
    return ("# Installed into the MAP by monai-deploy package (pip install -r). Pinned to the versions this\n"
            f"# application was built and tested with ({record['built_at']}, Python {record['python']}).\n"
            "# pathbundles itself is not installed from here: its source is ./pathbundles, beside app.py. torch is\n"
            "# pinned without its local tag, so pip takes the CUDA build on a GPU image; pydicom and highdicom are\n"
            "# needed for `import monai` to work beside the SDK, whose operators import them.\n"
            + "".join(f"{line}\n" for line in requirements))


_APP_PY = '''"""MONAI Deploy application of the {bundle_id} bundle ({name} {version}), built by
`python -m pathbundles deploy build`. Runs the embedded bundle's own inference workflow; see README.md.

    ulimit -s 32768
    python <this folder> -i INPUT -o OUTPUT [--override KEY=VALUE ...]
"""

from pathlib import Path

from pathbundles.deploy.app import main as run_app

APP_DIR = Path(__file__).resolve().parent


def main() -> None:
    run_app(APP_DIR)


if __name__ == "__main__":
    main()
'''

#: The ``dicom`` section of a built ``app.yaml``, with its defaults and what they mean (yaml.safe_dump writes no
#: comments).
_DICOM_YAML = f"""# DICOM results of the slides read from DICOM (a folder of instances, a .dcm file, a DICOMweb series URL as -i):
# always written under OUTPUT/{DICOM_SUBFOLDER}/<slide>/ and listed in {SUMMARY}. stow_url: a DICOMweb base URL (e.g.
# http://pacs.example.org:8042/dicom-web) to store them to over STOW-RS; empty: not stored. A failure to store is
# listed in {SUMMARY} and fails the run. --stow_url URL sets it for one run ("" turns it off).
{DICOM_SECTION}:
  stow_url: ''
"""

_MAIN_PY = '''from app import main

main()
'''


#: Characters of the weights' sha256 in an image tag: enough to tell weights apart, short enough to read.
TAG_SHA_CHARS = 12


def image_tag(bundle_id: str, version: str, weights_sha256: str | None) -> str:
    """The MAP image tag of a build: ``pathbundles-<bundle>:<version>-<first 12 hex of the weights' sha256>``, so
    that weights retrained under the same bundle version get another tag (``-noweights`` without weights)."""
    weights = weights_sha256[:TAG_SHA_CHARS] if weights_sha256 else "noweights"
    return f"pathbundles-{bundle_id.lower()}:{version}-{weights}"


def _readme(target: Path, bundle_id: str, info: dict, record: dict, app_resources: dict, tag: str,
            package_command: str, warnings: list[str]) -> str:
    source = record["source"]
    origin = (f"the bundle folder `{source['bundle']}`" if "bundle" in source else
              f"`{source['model_uri']}` (version {source['registered_version']} of `{source['registered_name']}` in "
              "the MLflow registry, exported with its files checked against the registration's hashes)")
    image = tag.replace(":", "-x64-workstation-dgpu-linux-amd64:", 1)
    notes = "".join(f"\n- **{w}**" for w in warnings)
    return f"""# MONAI Deploy application: {bundle_id} ({info['name']} {info['version']})

Built by `python -m pathbundles deploy build` on {record['built_at']} from {origin}. The application runs the
embedded bundle's own `configs/{', '.join(record['config_files'])}` through MONAI's `ConfigWorkflow`, so its outputs
are those of `python -m monai.bundle run` on the same slides. Inputs are of kind `{record['kind']}`.
{notes}

## 1. Run locally (CPU is enough)

With pathbundles' dependencies and the `[deploy]` extra installed (`pip install -r {target / 'requirements.txt'}`,
or the project's `.venv`):

```bash
ulimit -s 32768      # Holoscan wants a 32 MB stack; with the default 8 MB it warns
python {target} -i INPUT -o OUTPUT
```

`INPUT` is a folder of slides (of HPF images for mitosis bundles), a datalist `.json`, one slide, or a text file of
slide paths (one a line, relative to the file). Instead of `-i`/`-o`, `HOLOSCAN_INPUT_PATH`/`HOLOSCAN_OUTPUT_PATH`
work too. `OUTPUT` receives the bundle's outputs and `{SUMMARY}` (per slide: score, number of detections, output
files relative to `OUTPUT`; the bundle's name, version, weights hash and whether they are demo weights
(`demo_weights`, `weights_warning`); this build's record).

DICOM in, DICOM out: `INPUT` may also be a folder of DICOM whole-slide instances (one or more series), one `.dcm`
file, a DICOMweb series URL (`-i http://HOST:8042/dicom-web/studies/<StudyUID>/series/<SeriesUID>`) or a text file
of such URLs. The results of those slides are also written as DICOM objects under `OUTPUT/{DICOM_SUBFOLDER}/<slide>/`
(listed per slide in `{SUMMARY}`); with `{DICOM_SECTION}.stow_url` in `app.yaml` (or `--stow_url URL`) they are
stored to that DICOMweb server, and a failure to store fails the run.

Bundle config ids can be set for a run with `--override KEY=VALUE` (repeatable, e.g. `--override num_workers=0
--override ckpt_path=/path/model.pt`; values are read as `python -m monai.bundle run --KEY VALUE` reads them), or for
every run in the `{SECTION}.overrides` mapping of `app.yaml`.

## 2. Package as a MAP (needs Docker with buildx, the NVIDIA container toolkit and internet access)

```bash
{package_command}
```

The image is tagged `{image}`. Resources requested (`app.yaml`): {json.dumps(app_resources)}.

## 3. Run the MAP

```bash
monai-deploy run {image} -i INPUT -o OUTPUT
```

To change overrides without rebuilding, copy `app.yaml`, edit `{SECTION}.overrides`, and add `--config my.yaml`.

## Contents

| path | what |
|---|---|
| `app.py`, `__main__.py` | entry points: `pathbundles.deploy.app.main` on this folder |
| `app.yaml` | MAP configuration (application, resources) and the application's settings (`{SECTION}`) |
| `requirements.txt` | pinned dependencies, installed into the MAP |
| `{BUILD_RECORD}` | provenance: source, bundle hashes, versions |
| `bundle/` | the bundle (configs, models, docs, LICENSE) |
| `pathbundles/` | the pathbundles source this application was built with (pathbundles {record['pathbundles']}) |
"""


class Deploy:
    """``python -m pathbundles deploy <verb>``: MONAI Deploy application packages of bundles (docs/DEPLOY.md)."""

    def build(self, out: str, bundle: str | None = None, model: str | None = None, tracking_uri: str | None = None,
              config_files: Any = "inference.json", kind: str | None = None, gpu: int = 0, cpu: int = 2,
              memory: str | None = None) -> None:
        """Write the MAP build context of BUNDLE (or of --model models:/<name>@champion) into OUT; prints JSON."""
        files = [c.strip() for c in config_files.split(",")] if isinstance(config_files, str) else list(config_files)
        result = build(out, bundle=bundle, model=model, tracking_uri=tracking_uri, config_files=files, kind=kind,
                       gpu=gpu, cpu=cpu, memory=memory)
        print(json.dumps(result, indent=2, default=str))
