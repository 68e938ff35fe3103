"""Run a bundle's own inference workflow from Python and collect what it wrote.

The bundle stays the single source of truth: :func:`run_inference` loads its ``configs/inference.json`` (plus any
overlays) through MONAI's ``ConfigWorkflow`` (workflow type "infer"), replaces only the datalist and the output
folder, runs it, and returns one record per slide from the bundle's writer. MONAI Deploy operators and cohort
inference drive bundles through this module.

Data is never config: MONAI's parser evaluates strings starting with ``$`` as Python, resolves ``@`` references
and ``%`` macros, and instantiates dicts with ``_target_``, anywhere in the config. So the datalist is not put into
the config; the config's ``datalist`` becomes a call of :func:`held_datalist` with a random key, which returns the
items as they are.

Writer protocol: the config item ``writer`` (``SlideMapWriter``, ``HPFDetectionWriter``, ``SlideLabelWriter``) has
``results() -> [{"name", "score", "n_detections", "outputs": {kind: path}, ...}]``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (weights, configs, datalists)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


#: The overlay that runs a bundle from an exported model (:mod:`pathbundles.exported`).
EXPORTED_CONFIG = "exported.json"


def config_paths(bundle: str | os.PathLike, config_files: Sequence[str] = ("inference.json",)) -> list[Path]:
    """Absolute paths of ``config_files`` (names in the bundle's ``configs/`` folder, or paths)."""
    root = Path(bundle).resolve()
    paths = [Path(c) if Path(c).is_absolute() else root / "configs" / c for c in config_files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{root}: no such bundle config(s): {', '.join(missing)}")
    return paths


def bundle_info(bundle: str | os.PathLike, config_files: Sequence[str] = ("inference.json",),
                overrides: Mapping[str, Any] | None = None) -> dict:
    """Name, version, weights hash and config hash of a bundle as a run of ``config_files`` uses it.

    ``config_sha256`` hashes the config files' bytes and the overrides, so a changed threshold or network key makes
    a different configuration; ``weights_sha256`` hashes ``ckpt_path`` (the override, else ``models/model.pt``; with
    ``exported.json`` among the configs, ``exported_model``, else ``models/model.ts``), and ``demo_weights`` and
    ``weights_warning`` say whether those are the bundle's demo weights (:mod:`pathbundles.weights`).
    """
    from pathbundles.weights import identify, identify_exported

    root = Path(bundle).resolve()
    meta_file = root / "configs" / "metadata.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{root}: not a bundle (no configs/metadata.json)")
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    digest = hashlib.sha256()
    for path in config_paths(root, config_files):
        digest.update(path.read_bytes())
    digest.update(json.dumps(dict(overrides or {}), sort_keys=True, default=str).encode())
    overrides = dict(overrides or {})
    if any(Path(c).name == EXPORTED_CONFIG for c in config_files):
        weights = identify_exported(overrides.get("exported_model") or root / "models" / "model.ts", meta_file)
    else:
        weights = identify(overrides.get("ckpt_path") or root / "models" / "model.pt", meta_file)
    return {"bundle": root.name, "bundle_root": str(root), "name": meta.get("name", root.name),
            "version": meta.get("version"), "weights": weights.path, **weights.record(),
            "config_sha256": digest.hexdigest()}


def config_error_cause(err: BaseException) -> BaseException:
    """The error behind MONAI's ``Failed to evaluate ConfigExpression`` wrappers (a writer's report of the slides
    that failed, a bad input's ``InputError``), or ``err`` itself when it is not such a wrapper."""
    while (isinstance(err, RuntimeError) and str(err).startswith("Failed to evaluate")
           and err.__cause__ is not None):
        err = err.__cause__
    return err


@contextlib.contextmanager
def config_errors_unwrapped() -> Iterator[None]:
    """Raise the error behind MONAI's ``Failed to evaluate ConfigExpression`` wrapper (:func:`config_error_cause`)
    instead of the wrapper, so that a bad input's message (which names its file) is what the user reads."""
    try:
        yield
    except RuntimeError as err:
        cause = config_error_cause(err)
        if cause is err:
            raise
        raise cause from cause.__cause__


#: The datalists of the runs in progress, by key (see :func:`held_datalist`).
_HELD: dict[str, list[dict]] = {}


def held_datalist(key: str) -> list[dict]:
    """The datalist :func:`run_inference` holds under ``key``: what a run's config item ``datalist`` evaluates to,
    so that no datalist value ever passes through MONAI's config parser."""
    return [dict(item) for item in _HELD[key]]


def run_inference(bundle: str | os.PathLike, datalist: Sequence[dict], output_dir: str | os.PathLike,
                  config_files: Sequence[str] = ("inference.json",), overrides: Mapping[str, Any] | None = None,
                  handlers: Sequence[Any] = (), failures: dict[str, str] | None = None) -> list[dict]:
    """Run the bundle's inference workflow on ``datalist``, writing into ``output_dir``.

    Args:
        bundle: the bundle folder (``bundles/<name>``, or an exported copy).
        datalist: items with ``image`` (absolute paths), as ``pathbundles.bundle.datalist`` returns them.
        output_dir: the run's output folder (the config's ``output_dir``).
        config_files: config names in ``configs/`` (or paths), merged in order.
        overrides: further config ids to set (``ckpt_path``, ``num_workers``, ...).
        handlers: extra ignite handlers (with ``attach(engine)``) attached to the bundle's ``evaluator``.
        failures: where given, the slides that failed are put in it ({name: why}) and the records of the others
            returned, instead of raising :class:`~pathbundles.errors.SlidesFailedError` (a caller that reports
            every slide, failed or not: the deploy application's summary).

    When the datalist gives the evaluator no batch at all (a slide without tissue, or one that cannot be opened),
    MONAI's ``Workflow.run`` returns without firing any event; the writer is then completed here (its
    ``ensure_completed``, which the bundles' own ``run`` lists also call), so it still writes the all-zero outputs
    or reports the failed slide.

    Returns:
        The writer's per-slide records (see the module docstring); output paths as strings.
    """
    from monai.bundle import ConfigWorkflow

    root = Path(bundle).resolve()
    logging_file = root / "configs" / "logging.conf"
    key = uuid.uuid4().hex
    _HELD[key] = [dict(item) for item in datalist]
    try:
        workflow = ConfigWorkflow(
            config_file=[str(p) for p in config_paths(root, config_files)],
            meta_file=str(root / "configs" / "metadata.json"),
            logging_file=str(logging_file) if logging_file.is_file() else None, workflow_type="infer",
            **{"bundle_root": str(root), "output_dir": str(Path(output_dir).resolve()), **dict(overrides or {}),
               "datalist": f"$pathbundles.bundle_runner.held_datalist('{key}')"})
        workflow.initialize()
        return _run(workflow, handlers, failures)
    finally:
        del _HELD[key]


def _run(workflow: Any, handlers: Sequence[Any], failures: dict[str, str] | None = None) -> list[dict]:
    """Run an initialised inference workflow with ``handlers`` on its evaluator; the writer's records (the failed
    slides into ``failures`` where given, see :func:`run_inference`)."""
    from pathbundles.errors import SlidesFailedError

    try:
        evaluator = workflow.parser.get_parsed_content("evaluator")
        for handler in handlers:
            handler.attach(evaluator)
        writer = workflow.parser.get_parsed_content("writer")
        try:
            with config_errors_unwrapped():
                workflow.run()
            writer.ensure_completed()
        except SlidesFailedError:
            if failures is None:
                raise
            failures.update(writer.failed)
    finally:
        workflow.finalize()
    return [{**record, "outputs": {k: str(v) for k, v in record["outputs"].items()}} for record in writer.results()]
