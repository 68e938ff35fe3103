"""MLflow tracking of bundle runs: MONAI's ``MLFlowHandler`` plus the facts a model reviewer needs.

``python -m monai.bundle run --config_file bundles/<name>/configs/train.json --tracking mlflow/tracking.json``
patches the bundle config (MONAI's ``patch_bundle_tracking``) with:

- ``tracking_run``: one :class:`BundleRun` per process, i.e. one MLflow run per ``monai.bundle run``. At start it
  tags the run (bundle name and version from metadata.json, project git commit, sha256 of each datalist and of the
  weights), logs the merged config flattened into params, and logs the merged config and metadata.json as
  artifacts. At ``finish`` it logs the evaluation outputs found in ``output_dir`` (``metrics.json`` scalars as
  metrics, ``curves.json``, ``slide_scores.csv``, the PNG plots, ``report.html``, the overlays of
  :func:`preview_overlays`: the highest-scoring tumour slide and the highest-scoring normal slide) and the final
  weights hash.
- :class:`BundleMLFlowHandler` on the trainer, validator and evaluator engines (MONAI's handler: loss and learning
  rate per iteration, engine metrics per epoch) all writing into that one run; validation metrics are stepped by
  the trainer's epoch.
- ``finalize``: ``@tracking_run.finish()``, run by ``monai.bundle run`` after ``run``; engine-free workflows such
  as an evaluation that only computes metrics are tracked through this alone. MONAI keeps a bundle's own
  ``finalize`` (``multi_gpu_train.json``) instead; a run still open when the process exits is then ended at exit
  (FINISHED, or FAILED after an uncaught exception), outputs logged.

Where runs go (first that is set): the ``tracking_uri`` config key (``--tracking_uri`` on the command line),
``$PATHBUNDLES_TRACKING_URI``, ``$MLFLOW_TRACKING_URI``, else the project's SQLite store
``sqlite:///<project>/mlflow/mlflow.db`` with artifacts under ``<project>/mlflow/artifacts``. The project is the
folder holding ``bundles/``; a bundle copied elsewhere tracks into ``<bundle>/mlflow/``.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from monai.handlers import MLFlowHandler

from pathbundles.bundle_runner import sha256_file

logger = logging.getLogger(__name__)

#: Environment variable naming the tracking store (a server URL or database URI) for every bundle run.
TRACKING_URI_ENV = "PATHBUNDLES_TRACKING_URI"
#: Tag keys every tracked run and registered model version carries.
TAG_BUNDLE = "pathbundles.bundle"
TAG_BUNDLE_NAME = "pathbundles.bundle_name"
TAG_BUNDLE_VERSION = "pathbundles.bundle_version"
TAG_WORKFLOW = "pathbundles.workflow"
TAG_GIT_COMMIT = "pathbundles.git_commit"
TAG_DATALIST_SHA = "pathbundles.datalist_sha256"
TAG_WEIGHTS_SHA = "pathbundles.weights_sha256"
#: Artifact folders of a tracked run; the registry reads ``evaluation/curves.json`` from them.
EVALUATION_DIR = "evaluation"
CONFIG_DIR = "config"
PREVIEW_DIR = "preview"
#: Evaluation outputs looked for in ``output_dir`` at the end of a run.
METRICS_FILE = "metrics.json"
CURVES_FILE = "curves.json"
SCORES_FILE = "slide_scores.csv"
REPORT_FILE = "report.html"

_MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value (longer values are cut, with a marker)
_MAX_KEY = 250  # MLflow's limit on a param / metric key
_BATCH = 100  # MLflow's limit on params per log_batch
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /:]")


def project_root(bundle_root: str | os.PathLike) -> Path:
    """The project folder of a bundle: the parent of its ``bundles/`` folder, else the bundle folder itself."""
    root = Path(bundle_root).resolve()
    return root.parent.parent if root.parent.name == "bundles" else root


def default_tracking_uri(bundle_root: str | os.PathLike | None = None) -> str:
    """``$PATHBUNDLES_TRACKING_URI``, ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<project>/mlflow/mlflow.db``."""
    for name in (TRACKING_URI_ENV, "MLFLOW_TRACKING_URI"):
        if os.environ.get(name):
            return os.environ[name]
    base = project_root(bundle_root) if bundle_root is not None else Path.cwd()
    return sqlite_uri(base / "mlflow" / "mlflow.db")


def sqlite_uri(path: str | os.PathLike) -> str:
    """``sqlite:///`` URI of a database file (its folder is created)."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path.as_posix()}"


def default_artifact_location(tracking_uri: str) -> str | None:
    """Artifact root of new experiments: ``artifacts/`` beside a SQLite database; a server decides for itself."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri[len("sqlite:///"):])
    return (db.parent / "artifacts").resolve().as_uri()


def git_commit(path: str | os.PathLike) -> str:
    """``git rev-parse HEAD`` of the repository holding ``path`` (with ``-dirty`` if it has local changes);
    ``"unknown"`` outside a git checkout or without git."""
    folder = Path(path).resolve()
    folder = folder if folder.is_dir() else folder.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                              timeout=20, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head or "unknown"


def project_git_commit(bundle_root: str | os.PathLike) -> str:
    """Git commit of the code a bundle runs with: the repository holding the bundle, else (a bundle copied out
    of the checkout, an exported bundle) the repository holding the imported ``pathbundles`` package; ``"unknown"``
    when neither is a git checkout."""
    commit = git_commit(bundle_root)
    if commit == "unknown":
        commit = git_commit(Path(__file__).resolve().parent)
    return commit


def sha256_datalist(items: Any) -> str:
    """Hex sha256 of a datalist's canonical JSON (sorted keys, no whitespace): equal lists hash equally."""
    canonical = json.dumps(items, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def flatten_config(config: Any, prefix: str = "") -> dict[str, str]:
    """A config as flat MLflow params: nested keys joined by ``.`` (list items by index), values as strings.

    Keys are cut to MLflow's 250 characters with characters it refuses replaced by ``_``; values longer than 6000
    characters are cut and end with ``...[cut]``.
    """
    flat: dict[str, str] = {}
    if not prefix and isinstance(config, (Mapping, list, tuple)) and not config:
        return flat  # nothing to log (a run without a merged config); an empty key is refused by MLflow
    if isinstance(config, Mapping) and config:
        for key, value in config.items():
            flat.update(flatten_config(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(config, (list, tuple)) and config:
        for i, value in enumerate(config):
            flat.update(flatten_config(value, f"{prefix}.{i}" if prefix else str(i)))
    else:
        text = json.dumps(config) if config is None or isinstance(config, (bool, Mapping, list, tuple)) else str(config)
        if len(text) > _MAX_PARAM_VALUE:
            text = text[: _MAX_PARAM_VALUE - 8] + "...[cut]"
        flat[_KEY_UNSAFE.sub("_", prefix)[:_MAX_KEY]] = text
    return flat


def flatten_metrics(metrics: Any, prefix: str = "") -> dict[str, float]:
    """Finite numbers of a (nested) metrics dict, keys joined by ``.``; lists, strings, nulls and booleans skipped."""
    flat: dict[str, float] = {}
    if isinstance(metrics, Mapping):
        for key, value in metrics.items():
            flat.update(flatten_metrics(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(metrics, (int, float)) and not isinstance(metrics, bool) and math.isfinite(metrics):
        flat[_KEY_UNSAFE.sub("_", prefix)[:_MAX_KEY]] = float(metrics)
    return flat


def read_metadata(bundle_root: str | os.PathLike) -> dict:
    """``configs/metadata.json`` of a bundle; ``{}`` when it has none."""
    path = Path(bundle_root) / "configs" / "metadata.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def workflow_of_command_line(argv: Iterable[str] | None = None) -> str:
    """Stem of the last ``--config_file`` on the command line (``train``, ``evaluate``, ...), else ``"run"``."""
    argv = list(sys.argv if argv is None else argv)
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith("--config_file="):
            value = arg.split("=", 1)[1]
        elif arg == "--config_file" and i + 1 < len(argv):
            value = argv[i + 1]
    if value is None:
        return "run"
    names = [part for part in re.split(r"[\[\],'\"\s]+", value) if part]
    return Path(names[-1]).stem if names else "run"


class BundleRun:
    """The MLflow run of one ``monai.bundle run`` process, shared by its handlers and its ``finalize`` step.

    Args:
        bundle_root: the running bundle's folder (``configs/metadata.json`` is read from it).
        output_dir: the bundle's output folder; ``finish`` logs the evaluation outputs found there.
        config_file: the merged config MONAI exported for the run (``save_execute_config``); when that path does
            not exist (MONAI builds it as a string expression), the newest ``config_*.json`` in ``output_dir``.
        tracking_uri: tracking store; ``None`` for :func:`default_tracking_uri`.
        experiment_name: ``None`` for ``pathbundles-<bundle folder name>``.
        run_name: ``None`` for ``<workflow>-<YYYYmmdd-HHMMSS>``.
        workflow: ``None`` for the stem of ``--config_file`` (train, evaluate, inference).
        disabled: true on non-zero ranks of a multi-GPU run: nothing is logged.
    """

    def __init__(self, bundle_root: str | os.PathLike, output_dir: str | os.PathLike | None = None,
                 config_file: str | os.PathLike | None = None, tracking_uri: str | None = None,
                 experiment_name: str | None = None, run_name: str | None = None, workflow: str | None = None,
                 disabled: bool = False) -> None:
        self.bundle_root = Path(bundle_root).resolve()
        self.output_dir = Path(output_dir).resolve() if output_dir else self.bundle_root / "eval"
        self.config_file = config_file
        self.tracking_uri = tracking_uri or default_tracking_uri(self.bundle_root)
        self.experiment_name = experiment_name or f"pathbundles-{self.bundle_root.name}"
        self.workflow = workflow or workflow_of_command_line()
        self.run_name = run_name or f"{self.workflow}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.artifact_location = default_artifact_location(self.tracking_uri)
        self.disabled = bool(disabled)
        self.train_epoch = 0
        self.slide_labels: dict[str, int] = {}
        self.run_id: str | None = None
        self.finished = False
        self._client: Any = None

    @property
    def client(self) -> Any:
        """The ``MlflowClient`` of :attr:`tracking_uri`."""
        if self._client is None:
            import mlflow

            self._client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def experiment_id(self) -> str:
        """Id of :attr:`experiment_name`, created (with the project artifact root) when missing."""
        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(self.experiment_name, artifact_location=self.artifact_location)
        except Exception:  # another process created it meanwhile
            experiment = self.client.get_experiment_by_name(self.experiment_name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def start(self) -> Any:
        """Create the run (first call) or reopen it (later calls); returns the ``mlflow.entities.Run``."""
        if self.disabled:
            return None
        if self.run_id is not None:
            run = self.client.get_run(self.run_id)
            if run.info.status != "RUNNING":
                self.client.update_run(self.run_id, status="RUNNING")
                self.finished = False
            return self.client.get_run(self.run_id)
        from mlflow.entities import Param, RunTag

        merged_path = self._merged_config_path()
        merged = json.loads(merged_path.read_text(encoding="utf-8")) if merged_path else {}
        metadata = read_metadata(self.bundle_root)
        commit = project_git_commit(self.bundle_root)
        tags = {TAG_BUNDLE: self.bundle_root.name, TAG_BUNDLE_NAME: str(metadata.get("name", self.bundle_root.name)),
                TAG_BUNDLE_VERSION: str(metadata.get("version", "unknown")), TAG_WORKFLOW: self.workflow,
                TAG_GIT_COMMIT: commit, "pathbundles.bundle_root": str(self.bundle_root),
                "pathbundles.output_dir": str(self.output_dir)}
        if commit != "unknown":
            tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
        resolved = _resolve_keys(merged, lambda key: key.endswith("datalist") or key in ("ckpt_path", "ckpt_dir"))
        datalists = {k: v for k, v in resolved.items() if k.endswith("datalist")}
        for key, items in sorted(datalists.items()):
            tags[f"{TAG_DATALIST_SHA}.{key}"] = sha256_datalist(items)
        if datalists:
            tags[TAG_DATALIST_SHA] = sha256_datalist({k: datalists[k] for k in sorted(datalists)})
        self.slide_labels = slide_labels(item for items in datalists.values() if isinstance(items, list)
                                         for item in items)
        self.weights_path = _weights_path(resolved, self.bundle_root)
        if self.weights_path.is_file():
            tags[TAG_WEIGHTS_SHA] = sha256_file(self.weights_path)
        run = self.client.create_run(self.experiment_id(), run_name=self.run_name,
                                     tags={k: v for k, v in tags.items()})
        self.run_id = run.info.run_id
        _install_exit_hooks()
        atexit.register(self._at_exit)
        # metadata.json is logged whole and as tags; the params are the run's settings
        params = [Param(k, v) for k, v in flatten_config({k: v for k, v in merged.items() if k != "_meta_"}).items()]
        for i in range(0, len(params), _BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + _BATCH])
        if merged_path is not None:
            self.client.log_artifact(self.run_id, str(merged_path), CONFIG_DIR)
        if (self.bundle_root / "configs" / "metadata.json").is_file():
            self.client.log_artifact(self.run_id, str(self.bundle_root / "configs" / "metadata.json"), CONFIG_DIR)
        self.client.log_batch(self.run_id, tags=[RunTag("pathbundles.datalist_keys", ",".join(sorted(datalists)))])
        logger.info("MLflow run %s (%s) in experiment %s at %s", self.run_id, self.run_name, self.experiment_name,
                    self.tracking_uri)
        return self.client.get_run(self.run_id)

    def _merged_config_path(self) -> Path | None:
        if self.config_file and Path(str(self.config_file)).is_file():
            return Path(str(self.config_file))
        exported = sorted(self.output_dir.glob("config_*.json"), key=lambda p: p.stat().st_mtime)
        return exported[-1] if exported else None

    def log_outputs(self) -> dict[str, float]:
        """Log ``metrics.json`` scalars, ``curves.json``, ``slide_scores.csv``, ``report.html``, PNG plots and the
        overlays of :func:`preview_overlays` (as ``preview/<role>/<slide>.png``) from ``output_dir``."""
        metrics: dict[str, float] = {}
        metrics_file = self.output_dir / METRICS_FILE
        if metrics_file.is_file():
            doc = json.loads(metrics_file.read_text(encoding="utf-8"))
            if isinstance(doc, Mapping) and isinstance(doc.get("metrics"), Mapping):
                # pathbundles.metrics.handlers.write_report: headline scalars under "metrics", the rest in
                # "details"; the headline ones become top-level names (froc, slide_auc, ...) that gates use.
                doc = {**doc["metrics"], **{k: v for k, v in doc.items() if k != "metrics"}}
            metrics = flatten_metrics(doc)
            from mlflow.entities import Metric

            stamp = int(time.time() * 1000)
            batch = [Metric(k, v, stamp, 0) for k, v in metrics.items()]
            for i in range(0, len(batch), 1000):
                self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])
            self.client.log_artifact(self.run_id, str(metrics_file), EVALUATION_DIR)
        for path in sorted(self.output_dir.glob("*.png")) + [self.output_dir / name for name in
                                                             (CURVES_FILE, SCORES_FILE, REPORT_FILE)]:
            if path.is_file() and not path.name.startswith("."):
                self.client.log_artifact(self.run_id, str(path), EVALUATION_DIR)
        for role, path in preview_overlays(self.output_dir, self.slide_labels).items():
            self.client.log_artifact(self.run_id, str(path), f"{PREVIEW_DIR}/{role}")
        return metrics

    def _at_exit(self) -> None:
        """End a run still open when the process exits: a bundle config with its own ``finalize`` (which replaces
        the tracking's, e.g. ``multi_gpu_train.json``) or a workflow stopped outside the engines. FINISHED on a
        normal exit, FAILED after an uncaught exception."""
        if self.disabled or self.run_id is None or self.finished:
            return
        try:
            self.finish(status="FAILED" if _EXIT_STATE["uncaught"] else "FINISHED")
        except Exception as err:  # the store may be gone at exit; never mask the process's own outcome
            logger.warning("tracking: could not end MLflow run %s at exit: %s", self.run_id, err)

    def finish(self, status: str = "FINISHED") -> str | None:
        """Log the outputs and the final weights hash, and end the run with ``status``; returns the run id."""
        if self.disabled:
            return None
        if self.run_id is None:
            self.start()
        if not self.finished:
            if status == "FINISHED":
                self.log_outputs()
                if self.weights_path.is_file():
                    self.client.set_tag(self.run_id, TAG_WEIGHTS_SHA, sha256_file(self.weights_path))
            self.client.set_terminated(self.run_id, status)
            self.finished = True
            print(f"MLflow run {self.run_id} ({self.workflow}) {status.lower()}: {self.tracking_uri}")
        return self.run_id


_EXIT_STATE = {"uncaught": False, "installed": False}


def _install_exit_hooks() -> None:
    """Wrap ``sys.excepthook`` (once) so that runs still open at exit know whether the process failed."""
    if _EXIT_STATE["installed"]:
        return
    previous = sys.excepthook

    def hook(kind, value, traceback):  # called before atexit handlers when the process dies of an exception
        _EXIT_STATE["uncaught"] = True
        previous(kind, value, traceback)

    sys.excepthook = hook
    _EXIT_STATE["installed"] = True


def slide_labels(items: Iterable[Any]) -> dict[str, int]:
    """``{output name: 0 or 1}`` of the datalist items that carry a slide ``label`` of 0 (normal) or 1 (tumour);
    items without one (or with a mask, a path, another value) are left out."""
    from pathbundles.outputs import slide_name

    labels = {}
    for item in items:
        label = item.get("label") if isinstance(item, Mapping) else None
        if isinstance(label, bool) or not isinstance(label, (int, float)) or label not in (0, 1):
            continue
        try:
            labels[slide_name(item)[0]] = int(label)
        except Exception:  # an item the bundle itself refuses: no preview role for it
            continue
    return labels


def preview_overlays(output_dir: str | os.PathLike, labels: Mapping[str, int] | None = None) -> dict[str, Path]:
    """The overlay PNGs a reviewer looks at first, by role, from an output folder.

    With slide labels (``labels``, or a ``label`` column of ``slide_scores.csv``): ``tumour``, the
    highest-scoring tumour slide (label 1), and ``normal``, the highest-scoring normal slide (label 0: the one
    closest to a false positive). Without labels: ``highest`` and ``lowest`` by ``slide_scores.csv`` score; without
    scores, ``first`` by name. Roles without an overlay are left out; ``{}`` when there is no overlay.
    """
    import csv

    folder = Path(output_dir) / "overlays"
    overlays = {p.stem: p for p in sorted(folder.glob("*.png")) if not p.name.startswith(".")}
    if not overlays:
        return {}
    scores: dict[str, float] = {}
    known = dict(labels or {})
    scores_file = Path(output_dir) / SCORES_FILE
    if scores_file.is_file():
        try:
            with open(scores_file, newline="") as f:
                for record in csv.DictReader(f):
                    scores[record["name"]] = float(record["score"])
                    if record.get("label") in ("0", "1"):
                        known[record["name"]] = int(record["label"])
        except (KeyError, ValueError, OSError):
            scores = {}
    ranked = sorted((name for name in overlays if name in scores), key=lambda n: -scores[n])
    if not ranked:
        return {"first": next(iter(overlays.values()))}
    chosen = {}
    if any(known.get(name) in (0, 1) for name in ranked):
        for role, label in (("tumour", 1), ("normal", 0)):
            name = next((n for n in ranked if known.get(n) == label), None)
            if name is not None:
                chosen[role] = overlays[name]
        return chosen
    chosen["highest"] = overlays[ranked[0]]
    if len(ranked) > 1:
        chosen["lowest"] = overlays[ranked[-1]]
    return chosen


def _resolve_keys(config: dict, wanted: Any) -> dict[str, Any]:
    """Top-level items of a merged config whose key passes ``wanted``, resolved by a fresh MONAI parser.

    The merged config is the one this process runs, so its expressions (bundle root from ``--config_file``, demo
    datalists) evaluate to the same values; an item that cannot be resolved is left out with a warning.
    """
    from monai.bundle import ConfigParser

    keys = [k for k in config if isinstance(k, str) and wanted(k)]
    if not keys:
        return {}
    parser = ConfigParser(config)
    resolved = {}
    for key in keys:
        try:
            resolved[key] = parser.get_parsed_content(key)
        except Exception as err:  # any config error: the tag is then missing, the run itself is unaffected
            logger.warning("tracking: cannot resolve '%s' for its hash: %s", key, err)
    return resolved


def _weights_path(resolved: Mapping[str, Any], bundle_root: Path) -> Path:
    if resolved.get("ckpt_path"):
        return Path(str(resolved["ckpt_path"]))
    if resolved.get("ckpt_dir"):
        return Path(str(resolved["ckpt_dir"])) / "model.pt"
    return bundle_root / "models" / "model.pt"


class BundleMLFlowHandler(MLFlowHandler):
    """MONAI's ``MLFlowHandler`` logging into the process's :class:`BundleRun` instead of a run it picks itself.

    MONAI's handler attaches to an existing unfinished run of the experiment (any run, when no run name is given)
    and each engine's handler may pick a different one; here every engine shares the run created by
    ``bundle_run``. An exception in the engine marks the run FAILED.

    Args:
        bundle_run: the shared run.
        step_by_trainer_epoch: log epoch metrics at the trainer's epoch (for a validator, whose own epoch is
            always 1); the trainer's handler records that epoch.
        kwargs: ``MLFlowHandler`` arguments (``iteration_log``, ``epoch_log``, ``tag_name``,
            ``output_transform``, ...); tracking URI, experiment and run name come from ``bundle_run``.
    """

    def __init__(self, bundle_run: BundleRun, step_by_trainer_epoch: bool = False, **kwargs: Any) -> None:
        self.bundle_run = bundle_run
        if step_by_trainer_epoch:
            kwargs["global_epoch_transform"] = lambda epoch: bundle_run.train_epoch or epoch
        super().__init__(tracking_uri=bundle_run.tracking_uri, experiment_name=bundle_run.experiment_name,
                         run_name=bundle_run.run_name, artifact_location=bundle_run.artifact_location, **kwargs)
        # MONAI's handler lets $MLFLOW_TRACKING_URI override its argument; the run lives in bundle_run's store
        self.client = bundle_run.client

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        if self.bundle_run.disabled:
            return
        super().attach(engine)
        if hasattr(engine, "optimizer") and not engine.has_event_handler(self._record_epoch, Events.EPOCH_STARTED):
            engine.add_event_handler(Events.EPOCH_STARTED, self._record_epoch)
        if not engine.has_event_handler(self._failed, Events.EXCEPTION_RAISED):
            engine.add_event_handler(Events.EXCEPTION_RAISED, self._failed)

    def _record_epoch(self, engine: Any) -> None:
        self.bundle_run.train_epoch = engine.state.epoch

    def _failed(self, engine: Any, error: BaseException) -> None:
        self.bundle_run.finish(status="FAILED")
        raise error

    def start(self, engine: Any) -> None:
        self.cur_run = self.bundle_run.start()
        super().start(engine)


def write_curves(output_dir: str | os.PathLike, fp_per_slide: Any = None, sensitivity: Any = None,
                 fpr: Any = None, tpr: Any = None, precision: Any = None, recall: Any = None) -> Path:
    """Write ``curves.json`` (the FROC, ROC and/or precision-recall points) into an evaluation's ``output_dir``.

    ``registry review`` overlays a candidate's and the champion's curves from this file, which the tracked run
    logs as ``evaluation/curves.json``. Format: ``{"froc": {"fp_per_slide": [...], "sensitivity": [...]},
    "roc": {"fpr": [...], "tpr": [...]}, "pr": {"recall": [...], "precision": [...]}}`` (any part may be missing).

    Args:
        output_dir: the evaluation's output folder.
        fp_per_slide, sensitivity: FROC curve (e.g. ``FROCResult.fp_per_slide`` and ``.sensitivity``).
        fpr, tpr: slide-level ROC curve (e.g. from ``pathbundles.metrics.classification.roc_curve``).
        precision, recall: detection precision-recall curve (e.g. ``PrecisionRecallCurve``).
    """
    from pathbundles.atomic import atomic_path

    curves: dict[str, dict[str, list[float]]] = {}
    if fp_per_slide is not None and sensitivity is not None:
        curves["froc"] = {"fp_per_slide": [float(v) for v in fp_per_slide],
                          "sensitivity": [float(v) for v in sensitivity]}
    if fpr is not None and tpr is not None:
        curves["roc"] = {"fpr": [float(v) for v in fpr], "tpr": [float(v) for v in tpr]}
    if precision is not None and recall is not None:
        curves["pr"] = {"recall": [float(v) for v in recall], "precision": [float(v) for v in precision]}
    path = Path(output_dir) / CURVES_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(curves) + "\n", encoding="utf-8")
    return path
