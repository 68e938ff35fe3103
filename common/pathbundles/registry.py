"""MLflow model registry workflow for bundles: register, review, promote, export.

``python -m pathbundles registry <verb>`` (:class:`Registry`):

- ``register --bundle bundles/<name> [--run_id ID]``: log the bundle folder as a pyfunc model (:class:`BundleModel`,
  predict = the bundle's inference on slide paths) and register it as a new version of ``pathbundles-<name>``,
  linked to its training run and, by the weights hash, its latest evaluation run; the version's description states
  that evaluation's measured metrics (or "not measured").
- ``review --name M --candidate V [--markdown FILE]``: candidate's evaluation against the ``champion`` version's:
  headline metrics first, other measured values, evaluation settings and training curves apart (no deltas); a
  warning when the two evaluations ran on different datalists; logged with the FROC/ROC curves and the candidate's
  preview overlays in a review run. A candidate without evaluation metrics fails.
- ``promote --name M --candidate V [--gate "froc>=0.85,froc>=champion-0.01"] [--policy FILE]``: move the
  ``champion`` alias when every gate passes, recording who, why and the gate results as version tags; refuse with
  the failed gates otherwise, and when the champion was evaluated on other data (unless
  ``--allow_different_data``). The candidate needs an evaluation run, and the gates at least one absolute
  threshold; without ``--gate`` they come from ``--policy`` (``{model name: [gates]}``), else from the bundle's
  ``metadata.json`` field ``promotion_gates`` (recorded on the version at registration: the paper's metric).
- ``export --name M --alias champion --out DIR``: write the bundle back, byte-identical, as a folder that
  ``python -m monai.bundle run`` runs unchanged.

Every verb prints one JSON object on stdout; a failure prints ``{"error": ...}`` (a refused promotion
``{"promoted": false, "reasons": [...]}``), repeats the message on stderr and exits with status 2.

The tracking store is ``--tracking_uri``, else as for tracked runs (:func:`pathbundles.tracking.default_tracking_uri`).
"""

from __future__ import annotations

import getpass
import json
import operator
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from pathbundles.atomic import atomic_path
from pathbundles.tracking import (CURVES_FILE, EVALUATION_DIR, PREVIEW_DIR, TAG_BUNDLE, TAG_BUNDLE_VERSION,
                                  TAG_DATALIST_SHA, TAG_GIT_COMMIT, TAG_WEIGHTS_SHA, TAG_WORKFLOW,
                                  default_artifact_location, default_tracking_uri, project_git_commit,
                                  read_metadata, sha256_file)
from pathbundles.weights import NOT_MEASURED, RECORD_FIELDS, identify

CHAMPION = "champion"
#: metadata.json field with a bundle's default promotion gates, and the version tag it is recorded in.
GATES_FIELD = "promotion_gates"
TAG_GATES = "pathbundles.promotion_gates"
#: Version tags of the weights' identity (pathbundles.weights): demo weights or not, and whether metadata.json's
#: eval_metrics were measured on these weights ("metadata.json") or not ("not measured").
TAG_DEMO_WEIGHTS, TAG_EVAL_METRICS = "pathbundles.demo_weights", "pathbundles.eval_metrics"
MODEL_ARTIFACT = "bundle"  # name of the logged model and of its bundle-folder artifact
#: Bundle content that is part of a registered model; outputs (eval/), caches and hidden files are not.
_EXCLUDED = ("eval", "__pycache__", "mlflow", ".*")
#: Packages pinned (at their installed versions) in every registered model's requirements.
_PINNED = ("mlflow", "monai", "torch", "pytorch-ignite", "numpy", "pandas", "pathbundles")
#: The bundles' headline metrics, shown first (in this order) by a review and a version description; any other
#: top-level metric of an evaluation run follows them. Dotted names (``details.*``) are the rest of metrics.json.
HEADLINE_METRICS = ("froc", "slide_auc", "f1", "mean_iou")
#: Last parts of metrics.json values that are evaluation settings, not measurements (counts ``n_*`` neither).
_SETTINGS = ("n_bootstrap", "confidence")


class RegistryError(Exception):
    """A registry request that cannot be done; the message names the model, version or value at fault."""


class PromotionRefused(RegistryError):
    """A refused promotion: ``results`` holds every gate's outcome, ``reasons`` one sentence per failed gate or
    other cause (the champion evaluated on other data)."""

    def __init__(self, message: str, results: list[dict], reasons: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.results = results
        self.reasons = list(reasons)


# ------------------------------------------------------------------------------------------------ the pyfunc model

class BundleModel(mlflow.pyfunc.PythonModel):
    """A bundle as an MLflow pyfunc model: ``predict`` runs the bundle's ``configs/inference.json`` on slides.

    The model's one artifact (``bundle``) is the whole bundle folder. Input: a DataFrame with an ``image`` column
    of slide paths (or a list of paths). Params: ``output_dir`` (default: a new temporary folder, kept). Output:
    one row per slide, as :func:`predict_bundle`.
    """

    def load_context(self, context):
        self.bundle_root = Path(context.artifacts[MODEL_ARTIFACT])

    def predict(self, context, model_input, params=None):  # untyped: MLflow validates against the signature
        return predict_bundle(self.bundle_root, _slide_paths(model_input), **(params or {}))


def _slide_paths(model_input: Any) -> list[str]:
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        column = "image" if "image" in model_input.columns else model_input.columns[0]
        return [str(p) for p in model_input[column]]
    if isinstance(model_input, dict):
        values = model_input.get("image", next(iter(model_input.values()), []))
        return [str(values)] if isinstance(values, str) else [str(p) for p in values]
    if isinstance(model_input, str):
        return [model_input]
    return [str(p) for p in model_input]


def predict_bundle(bundle_root: str | os.PathLike, slides: Sequence[str], output_dir: str = "") -> Any:
    """Run a bundle's ``configs/inference.json`` on ``slides`` in a subprocess; a DataFrame of the results.

    Args:
        bundle_root: the bundle folder.
        slides: slide file paths.
        output_dir: where the outputs go; empty for a new temporary folder (kept: the result points into it).

    Columns: ``image, name, score, n_detections, detections`` (JSON ``[[prob, x, y], ...]`` in level-0 pixels, or
    HPF pixels for an HPF bundle (level-0 pixels of the slide for a slide box), whose score is its highest detection
    score), ``detections_csv, overlay, map, output_dir`` (absolute paths; empty when the bundle wrote no such file),
    ``weights_sha256, demo_weights, weights_warning`` (the run's weights as its table gives them:
    :mod:`pathbundles.weights`; ``demo_weights`` "true" with the warning for the bundle's demo weights).
    """
    import csv

    import pandas as pd

    from pathbundles.annotations import read_points_csv
    from pathbundles.errors import InputError

    slides = [str(Path(s).resolve()) for s in slides]
    for slide in slides:
        if not Path(slide).is_file():
            raise InputError(slide, "no such slide file")
    out = Path(output_dir or tempfile.mkdtemp(prefix="pathbundles-predict-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    datalist = out / "input_datalist.json"
    with atomic_path(datalist) as tmp:
        tmp.write_text(json.dumps({"items": [{"image": s} for s in slides]}, indent=2), encoding="utf-8")
    config = Path(bundle_root) / "configs" / "inference.json"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(config),
               "--data_source", str(datalist), "--output_dir", str(out)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bundle inference failed ({done.returncode}): {' '.join(command)}\n"
                           f"{done.stderr[-4000:]}")
    by_stem = {Path(s).stem: s for s in slides}
    rows = []
    # Slide bundles write slide_scores.csv and prob,x,y detections; HPF bundles (segmitos) hpf_counts.csv with
    # max_score and x,y,score detections, reordered here so every bundle gives the same columns.
    hpf = not (out / "slide_scores.csv").is_file() and (out / "hpf_counts.csv").is_file()
    with open(out / ("hpf_counts.csv" if hpf else "slide_scores.csv"), newline="") as f:
        for record in csv.DictReader(f):
            name = record["name"]
            csv_path = out / "detections" / f"{name}.csv"
            detections = []
            if csv_path.is_file() and hpf:
                # read_points_csv skips the header a slide box's level-0 CSV has.
                xy, scores = read_points_csv(csv_path, "xy")
                detections = [[score, x, y] for (x, y), score in zip(xy.tolist(), [] if scores is None
                                                                     else scores.tolist())]
            elif csv_path.is_file():
                with open(csv_path, newline="") as g:
                    detections = [[float(v) for v in row] for row in csv.reader(g) if row]
            found = {key: out / sub / f"{name}{suffix}" for key, sub, suffix in
                     (("detections_csv", "detections", ".csv"), ("overlay", "overlays", ".png"),
                      ("map", "maps", ".png" if hpf else ".tif"))}
            score = record["max_score"] if hpf else record["score"]
            rows.append({"image": by_stem.get(name, ""), "name": name, "score": float(score),
                         "n_detections": int(record["n_detections"]), "detections": json.dumps(detections),
                         **{key: str(p) if p.is_file() else "" for key, p in found.items()},
                         "output_dir": str(out), **{c: record.get(c, "") for c in RECORD_FIELDS}})
    return pd.DataFrame(rows, columns=["image", "name", "score", "n_detections", "detections", "detections_csv",
                                       "overlay", "map", "output_dir", *RECORD_FIELDS])


def _signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    outputs = Schema([ColSpec("string", "image"), ColSpec("string", "name"), ColSpec("double", "score"),
                      ColSpec("long", "n_detections"), ColSpec("string", "detections"),
                      ColSpec("string", "detections_csv"), ColSpec("string", "overlay"), ColSpec("string", "map"),
                      ColSpec("string", "output_dir"), *(ColSpec("string", c) for c in RECORD_FIELDS)])
    return ModelSignature(inputs=Schema([ColSpec("string", "image")]), outputs=outputs,
                          params=ParamSchema([ParamSpec("output_dir", "string", "")]))


def pip_requirements(bundle_root: str | os.PathLike) -> list[str]:
    """Pinned requirements: the project's core packages and the bundle's ``required_packages_version``, at the
    installed version where installed (else as metadata.json states it). Given explicitly: MLflow's inference of
    requirements imports the model and takes seconds."""
    from importlib.metadata import PackageNotFoundError, version

    wanted = {name: None for name in _PINNED}
    wanted.update(read_metadata(bundle_root).get("required_packages_version", {}))
    pins = []
    for name, stated in wanted.items():
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            if stated:
                pins.append(f"{name}=={stated}")
    return sorted(pins, key=str.lower)


# ------------------------------------------------------------------------------------------------- registry helpers

def _client(tracking_uri: str | None, bundle_root: str | os.PathLike | None = None) -> Any:
    import mlflow

    uri = tracking_uri or default_tracking_uri(bundle_root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def default_model_name(bundle_root: str | os.PathLike) -> str:
    """``pathbundles-<bundle folder name>``."""
    return f"pathbundles-{Path(bundle_root).resolve().name}"


def _registered(client: Any, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in client.search_registered_models())
        raise RegistryError(f"no registered model '{name}' (registered models: {', '.join(known) or 'none'})") \
            from None


def _version(client: Any, name: str, version: str | int) -> Any:
    from mlflow.exceptions import MlflowException

    _registered(client, name)
    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        known = sorted((str(v.version) for v in client.search_model_versions(f"name='{name}'")), key=int)
        raise RegistryError(f"model '{name}' has no version {version} (versions: {', '.join(known) or 'none'})") \
            from None


def _alias_version(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    if alias not in (_registered(client, name).aliases or {}):
        return None
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _bundle_snapshot(bundle_root: Path, target: Path) -> dict[str, str]:
    """Copy the bundle's content (not its outputs) to ``target``; returns ``{relative path: sha256}``."""
    shutil.copytree(bundle_root, target, ignore=shutil.ignore_patterns(*_EXCLUDED))
    return {p.relative_to(target).as_posix(): sha256_file(p) for p in sorted(target.rglob("*")) if p.is_file()}


def _find_run(client: Any, experiment_name: str, workflow: str, weights_sha: str) -> str | None:
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`{TAG_WORKFLOW}` = '{workflow}' and "
                                            f"tags.`{TAG_WEIGHTS_SHA}` = '{weights_sha}' and "
                                            "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def register(bundle: str | os.PathLike, run_id: str | None = None, name: str | None = None,
             eval_run_id: str | None = None, tracking_uri: str | None = None,
             input_example_slide: str | None = None) -> dict:
    """Log the bundle folder as a pyfunc model and register it as a new version.

    Args:
        bundle: the bundle folder (``configs/inference.json`` and ``models/model.pt`` required).
        run_id: the training run to log the model into; default: the latest finished ``train`` run of the
            bundle's experiment whose weights hash equals the bundle's ``models/model.pt`` (else a new
            ``register`` run).
        name: registered model name; default ``pathbundles-<bundle folder name>``.
        eval_run_id: the evaluation run whose metrics the review uses; default: the latest finished ``evaluate``
            run with the same weights hash.
        tracking_uri: tracking and registry store.
        input_example_slide: path stored as the model's input example (not run); default a placeholder.

    Returns:
        ``{"name", "version", "model_uri", "run_id", "eval_run_id", "weights_sha256", "demo_weights",
        "bundle_version"}``. The version's tags name the weights (``pathbundles.weights_sha256``), say whether they
        are the bundle's demo weights (``pathbundles.demo_weights``: true/false) and whether metadata.json's
        eval_metrics were measured on them (``pathbundles.eval_metrics``: "metadata.json" or "not measured").
    """
    import mlflow
    import pandas as pd

    bundle_root = Path(bundle).resolve()
    for required in ("configs/inference.json", "models/model.pt"):
        if not (bundle_root / required).is_file():
            raise RegistryError(f"{bundle_root}: not a runnable bundle, {required} is missing")
    client = _client(tracking_uri, bundle_root)
    name = name or default_model_name(bundle_root)
    metadata = read_metadata(bundle_root)
    weights_sha = sha256_file(bundle_root / "models" / "model.pt")
    experiment_name = f"pathbundles-{bundle_root.name}"
    if run_id is None:
        run_id = _find_run(client, experiment_name, "train", weights_sha)
    else:
        client.get_run(run_id)  # an unknown run id fails here, naming it
    eval_run_id = eval_run_id or _find_run(client, experiment_name, "evaluate", weights_sha)
    commit = project_git_commit(bundle_root)
    description = version_description(client, bundle_root, weights_sha, eval_run_id)
    weights = identify(bundle_root / "models" / "model.pt", bundle_root / "configs" / "metadata.json")
    tags = {TAG_BUNDLE: bundle_root.name, TAG_BUNDLE_VERSION: str(metadata.get("version", "unknown")),
            TAG_WEIGHTS_SHA: weights_sha, TAG_GIT_COMMIT: commit, TAG_DEMO_WEIGHTS: str(weights.demo).lower(),
            TAG_EVAL_METRICS: NOT_MEASURED if weights.eval_metrics == NOT_MEASURED else "metadata.json"}
    if run_id is None:
        experiment = client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(
            experiment_name, artifact_location=default_artifact_location(client.tracking_uri))
        run_id = client.create_run(experiment_id, run_name=f"register-{time.strftime('%Y%m%d-%H%M%S')}",
                                   tags={**tags, TAG_WORKFLOW: "register"}).info.run_id
    with tempfile.TemporaryDirectory(prefix="pathbundles-register-") as tmp:
        snapshot = Path(tmp) / bundle_root.name
        manifest = _bundle_snapshot(bundle_root, snapshot)
        manifest_sha = sha256_file_text(json.dumps(manifest, sort_keys=True))
        example = pd.DataFrame({"image": [input_example_slide or "/path/to/slide.tif"]})
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT, python_model=BundleModel(), artifacts={MODEL_ARTIFACT: str(snapshot)},
                signature=_signature(), input_example=example, pip_requirements=pip_requirements(bundle_root),
                metadata={"bundle": bundle_root.name, "bundle_version": tags[TAG_BUNDLE_VERSION],
                          "bundle_manifest": manifest},
                tags={**tags, "pathbundles.bundle_sha256": manifest_sha})
    version_tags = {**tags, "pathbundles.bundle_sha256": manifest_sha, "pathbundles.train_run_id": run_id,
                    TAG_GATES: json.dumps(list(metadata.get(GATES_FIELD) or []))}
    if eval_run_id:
        version_tags["pathbundles.eval_run_id"] = eval_run_id
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=str(metadata.get("description", "")),
                                       tags={TAG_BUNDLE: bundle_root.name})
    created = client.create_model_version(name, info.model_uri, run_id=run_id, tags=version_tags,
                                          description=description, model_id=info.model_id)
    return {"name": name, "version": str(created.version), "model_uri": f"models:/{name}/{created.version}",
            "logged_model_uri": info.model_uri, "run_id": run_id, "eval_run_id": eval_run_id,
            "weights_sha256": weights_sha, "demo_weights": weights.demo, "bundle_version": tags[TAG_BUNDLE_VERSION]}


def sha256_file_text(text: str) -> str:
    """Hex sha256 of a string's UTF-8 bytes."""
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------------------- review

def version_metrics(client: Any, version: Any) -> dict[str, float]:
    """Metrics of a model version: its training run's, overridden by its evaluation run's."""
    metrics: dict[str, float] = {}
    for run_id in (version.run_id, _eval_run_id(version)):
        if run_id:
            metrics.update(client.get_run(run_id).data.metrics)
    return metrics


def evaluated_metrics(client: Any, name: str, version: Any) -> dict[str, float]:
    """:func:`version_metrics` of a version that has an evaluation run with metrics; RegistryError otherwise (a
    review or promotion on training metrics alone, or on none, would compare nothing)."""
    eval_run_id = _eval_run_id(version)
    if not eval_run_id:
        raise RegistryError(f"model '{name}' v{version.version} has no evaluation run: run the bundle's evaluate.json "
                            "with --tracking mlflow/tracking.json on these weights, then register again (or pass "
                            "--eval_run_id to register)")
    if not client.get_run(eval_run_id).data.metrics:
        raise RegistryError(f"model '{name}' v{version.version}: its evaluation run {eval_run_id} logged no metrics")
    return version_metrics(client, version)


def metric_kind(metric: str) -> str:
    """``"headline"`` (a top-level metric of metrics.json: froc, slide_auc, ...), ``"setting"`` (how it was
    measured or on how much: ``n_bootstrap``, ``confidence``, counts ``n_*``) or ``"detail"`` (another measured
    value, e.g. ``details.froc.sensitivity.0.25``)."""
    last = metric.rsplit(".", 1)[-1]
    if "." not in metric:
        return "headline"
    return "setting" if last in _SETTINGS or last.startswith("n_") else "detail"


def _headline_order(metrics: Any) -> list[str]:
    present = [m for m in metrics if metric_kind(m) == "headline"]
    return [m for m in HEADLINE_METRICS if m in present] + sorted(m for m in present if m not in HEADLINE_METRICS)


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Where a person opens a run: its page in the MLflow UI for a server store, else ``runs:/<id>`` (open it in
    ``mlflow server`` started on the same store, mlflow/README.md)."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"runs:/{run_id}"


def _eval_run_id(version: Any | None) -> str | None:
    return (version.tags or {}).get("pathbundles.eval_run_id") if version is not None else None


def _evaluation(client: Any, run_id: str | None) -> dict | None:
    """An evaluation run: ``{"run_id", "link", "datalist_sha256", "metrics"}``; None without one."""
    if not run_id:
        return None
    run = client.get_run(run_id)
    return {"run_id": run_id, "link": run_link(client.tracking_uri, run.info.experiment_id, run_id),
            "datalist_sha256": run.data.tags.get(TAG_DATALIST_SHA), "metrics": dict(run.data.metrics)}


def compare_evaluation_data(candidate: dict, champion: dict | None, champion_label: str) -> tuple[bool | None, str]:
    """Whether a candidate's and a champion's evaluations (:func:`_evaluation`) ran on the same datalist, by the
    datalist hash their runs are tagged with: ``(True, "")``, or ``(False | None, why)`` when they differ (False)
    or cannot be compared (None: a run without the hash, or a champion without an evaluation)."""
    if champion is None:
        return None, f"{champion_label} has no evaluation run: its metrics cannot be compared"
    ours, theirs = candidate["datalist_sha256"], champion["datalist_sha256"]
    if ours and theirs and ours == theirs:
        return True, ""
    if ours and theirs:
        return False, (f"candidate and {champion_label} were evaluated on different datalists (sha256 "
                       f"{ours[:12]} vs {theirs[:12]}): their metrics are not comparable")
    missing = [f"run {e['run_id']}" for e in (candidate, champion) if not e["datalist_sha256"]]
    return None, (f"the evaluation data cannot be compared: {' and '.join(missing)} record no datalist hash "
                  f"(tag {TAG_DATALIST_SHA})")


def version_description(client: Any, bundle_root: Path, weights_sha: str, eval_run_id: str | None) -> str:
    """A version's description: what was measured for these weights by ``eval_run_id`` (its headline metrics,
    counts and settings, datalist hash and run link), or that nothing was; never the docs' demo figures."""
    metadata = read_metadata(bundle_root)
    lines = [f"{metadata.get('name', bundle_root.name)}: bundle {bundle_root.name} "
             f"{metadata.get('version', 'unknown')}, weights sha256 {weights_sha}.", ""]
    evaluation = _evaluation(client, eval_run_id)
    if evaluation is None or not evaluation["metrics"]:
        why = (f"evaluation run {eval_run_id} logged no metrics" if evaluation is not None else
               "no finished evaluation run with these weights when it was registered")
        lines.append(f"Measured performance: not measured ({why}; run the bundle's evaluate.json with --tracking "
                     "on these weights and register again).")
    else:
        metrics = evaluation["metrics"]
        lines.append(f"Measured performance, by evaluation run {evaluation['run_id']} ({evaluation['link']}) on "
                     f"datalist sha256 {evaluation['datalist_sha256'] or 'not recorded'}:")
        lines += [f"- {m}: {metrics[m]:.4f}" for m in _headline_order(metrics)]
        settings = sorted((m.rsplit(".", 1)[-1], v) for m, v in metrics.items() if metric_kind(m) == "setting")
        if settings:
            lines.append("- measured with: " + ", ".join(f"{k} {v:g}" for k, v in dict(settings).items()))
    lines += ["", "The bundle's docs/README.md (in the model's bundle artifact) describes the method and how to run "
              "it; the performance figures there are the demo's or the paper's, not this version's."]
    return "\n".join(lines) + "\n"


def _training_curves(client: Any, version: Any) -> list[dict]:
    """The metrics of a version's training run as curves: ``{"metric", "steps", "first", "last"}``."""
    if not version.run_id:
        return []
    curves = []
    for metric in sorted(client.get_run(version.run_id).data.metrics):
        history = sorted(client.get_metric_history(version.run_id, metric), key=lambda m: (m.step, m.timestamp))
        if history:
            curves.append({"metric": metric, "steps": len(history), "first": history[0].value,
                           "last": history[-1].value})
    return curves


def _curves(client: Any, version: Any) -> dict:
    import mlflow

    run_id = _eval_run_id(version) or version.run_id
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{EVALUATION_DIR}/{CURVES_FILE}",
                                                       dst_path=tmp, tracking_uri=client.tracking_uri)
            return json.loads(Path(path).read_text(encoding="utf-8"))
    except Exception:  # no curves logged for this version: the review shows the tables only
        return {}


def _curve_plots(curves: dict[str, dict], folder: Path) -> list[Path]:
    """FROC, ROC and precision-recall curves of each version (label -> curves.json content), one PNG per curve
    kind that any version has: the candidate's alone when there is no champion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for kind, (x, y, xlabel, ylabel) in {"froc": ("fp_per_slide", "sensitivity", "mean false positives per slide",
                                                  "sensitivity"),
                                         "roc": ("fpr", "tpr", "false positive rate", "true positive rate"),
                                         "pr": ("recall", "precision", "recall", "precision")}.items():
        present = {label: c[kind] for label, c in curves.items() if kind in c}
        if not present:
            continue
        figure, ax = plt.subplots(figsize=(5, 4), dpi=100)
        for label, curve in present.items():
            ax.step(curve[x], curve[y], where="post", label=label)
        if kind == "froc":
            ax.set_xscale("symlog", linthresh=0.125)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right")
        ax.set_title(f"{kind.upper()}: " + " vs ".join(present))
        path = folder / f"{kind}_overlay.png"
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written


def _download_previews(client: Any, run_id: str, folder: Path) -> Path | None:
    """The evaluation run's ``preview/`` folder (``<role>/<slide>.png`` overlays) downloaded under ``folder``;
    None when it has none."""
    import mlflow

    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=PREVIEW_DIR,
                                                        dst_path=str(folder), tracking_uri=client.tracking_uri))
    except Exception:  # an evaluation without overlays (metrics only): nothing to preview
        return None


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _markdown(name: str, cand_label: str, champ_label: str, warnings: list[str], rows: list[dict],
              settings: list[dict], training: list[dict], evaluations: dict, files: list[str]) -> str:
    lines = [f"# Review of {name} {cand_label} against {champ_label}", ""]
    lines += [f"> **Warning:** {w}" for w in warnings] + ([""] if warnings else [])
    header = [f"| metric | {champ_label} | {cand_label} | delta |", "|---|---:|---:|---:|"]
    for title, subset in (("Headline metrics", [r for r in rows if r["headline"]]),
                          ("Other measured values", [r for r in rows if not r["headline"]])):
        if subset:
            lines += [f"## {title}", "", *header]
            lines += [f"| {r['metric']} | {_fmt(r['champion'])} | {_fmt(r['candidate'])} | "
                      f"{_fmt(r['delta'], '+.4f')} |" for r in subset] + [""]
    lines += ["## Evaluations", ""]
    for label, evaluation in evaluations.items():
        lines.append(f"- {label}: " + ("no evaluation run" if evaluation is None else
                                       f"run {evaluation['run_id']} ({evaluation['link']}), datalist sha256 "
                                       f"{evaluation['datalist_sha256'] or 'not recorded'}"))
    lines.append("")
    if settings:
        lines += ["## Evaluation settings and counts (how and on how much it was measured; not compared)", "",
                  f"| setting | {champ_label} | {cand_label} |", "|---|---:|---:|"]
        lines += [f"| {s['setting']} | {_fmt(s['champion'], 'g')} | {_fmt(s['candidate'], 'g')} |"
                  for s in settings] + [""]
    if training:
        lines += ["## Training curves of the candidate (its training run; not compared)", "",
                  "| metric | steps | first | last |", "|---|---:|---:|---:|"]
        lines += [f"| {c['metric']} | {c['steps']} | {_fmt(c['first'], '.4g')} | {_fmt(c['last'], '.4g')} |"
                  for c in training]
        lines.append("")
    if files:
        lines += ["## Plots and previews (artifacts of this review run)", ""] + [f"- `{f}`" for f in files] + [""]
    return "\n".join(lines)


def review(name: str, candidate: str | int, alias: str = CHAMPION, tracking_uri: str | None = None,
           markdown_file: str | os.PathLike | None = None) -> dict:
    """Compare a candidate version's evaluation with that of the version holding ``alias``, for a person to decide.

    The Markdown review puts the headline metrics (:data:`HEADLINE_METRICS` first) with their deltas first, then
    the other measured values; evaluation settings and counts (``n_bootstrap``, ``confidence``, ``n_slides``, ...)
    and the candidate's training curves are listed apart, without deltas. A champion evaluated on another datalist
    (or one whose datalist hash is unknown) is flagged: ``same_data`` false (or null) and a warning. The review
    (``review/review.md``, ``review/review.json``), the FROC/ROC curves (the candidate's alone when there is no
    champion) and the candidate's evaluation previews (``review/preview/<role>/<slide>.png``) are logged in a new
    ``review`` run of the candidate's experiment, whose id is stored on the candidate version as
    ``pathbundles.review_run_id``.

    Args:
        name: registered model.
        candidate: version to review; it needs an evaluation run with metrics.
        alias: the alias of the version to compare with.
        tracking_uri: tracking and registry store.
        markdown_file: also write the Markdown review to this file.

    Returns:
        ``{"name", "candidate", "champion" (version or None), "same_data", "warnings", "evaluations": {"candidate",
        "champion"}, "rows": [{"metric", "champion", "candidate", "delta", "headline"}], "settings": [{"setting",
        "champion", "candidate"}], "training": [{"metric", "steps", "first", "last"}], "review_run_id", "plots",
        "previews", "markdown"}``.

    Raises:
        RegistryError: the candidate has no evaluation run, or its evaluation logged no metrics.
    """
    client = _client(tracking_uri)
    cand = _version(client, name, candidate)
    champ = _alias_version(client, name, alias)
    evaluated_metrics(client, name, cand)
    cand_eval = _evaluation(client, _eval_run_id(cand))
    champ_eval = _evaluation(client, _eval_run_id(champ))
    cand_label = f"v{cand.version} (candidate)"
    champ_label = f"v{champ.version} ({alias})" if champ is not None else f"no {alias}"
    warnings = []
    same_data = None
    if champ is not None:
        same_data, note = compare_evaluation_data(cand_eval, champ_eval, champ_label)
        if note:
            warnings.append(note)
    cand_metrics, champ_metrics = cand_eval["metrics"], (champ_eval or {}).get("metrics", {})
    both = set(cand_metrics) | set(champ_metrics)
    order = _headline_order(both) + sorted(m for m in both if metric_kind(m) == "detail")
    rows = [{"metric": m, "champion": champ_metrics.get(m), "candidate": cand_metrics.get(m),
             "delta": None if m not in champ_metrics or m not in cand_metrics else cand_metrics[m] - champ_metrics[m],
             "headline": metric_kind(m) == "headline"} for m in order]
    settings = [{"setting": m, "champion": champ_metrics.get(m), "candidate": cand_metrics.get(m)}
                for m in sorted(both) if metric_kind(m) == "setting"]
    training = _training_curves(client, cand)
    experiment_id = client.get_run(cand.run_id).info.experiment_id
    run = client.create_run(experiment_id, run_name=f"review-{name}-v{cand.version}",
                            tags={TAG_WORKFLOW: "review", "pathbundles.model": name,
                                  "pathbundles.candidate_version": str(cand.version),
                                  "pathbundles.champion_version": str(champ.version) if champ else "none",
                                  "pathbundles.same_data": str(same_data).lower()})
    result = {"name": name, "candidate": str(cand.version), "champion": str(champ.version) if champ else None,
              "same_data": same_data, "warnings": warnings,
              "evaluations": {"candidate": cand_eval, "champion": champ_eval}, "rows": rows, "settings": settings,
              "training": training, "review_run_id": run.info.run_id}
    with tempfile.TemporaryDirectory(prefix="pathbundles-review-") as tmp:
        folder = Path(tmp)
        curves = {cand_label: _curves(client, cand)}
        if champ is not None:
            curves[champ_label] = _curves(client, champ)
        plots = _curve_plots(curves, folder)
        previews = _download_previews(client, cand_eval["run_id"], folder / "download")
        result["plots"] = [f"review/{p.name}" for p in plots]
        result["previews"] = [] if previews is None else sorted(
            f"review/{PREVIEW_DIR}/{p.relative_to(previews).as_posix()}" for p in previews.rglob("*") if p.is_file())
        markdown = _markdown(name, cand_label, champ_label, warnings, rows, settings, training,
                             {cand_label: cand_eval, champ_label: champ_eval} if champ is not None
                             else {cand_label: cand_eval}, result["plots"] + result["previews"])
        result["markdown"] = markdown
        (folder / "review.md").write_text(markdown, encoding="utf-8")
        (folder / "review.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        for path in [folder / "review.md", folder / "review.json", *plots]:
            client.log_artifact(run.info.run_id, str(path), "review")
        if previews is not None:
            client.log_artifacts(run.info.run_id, str(previews), f"review/{PREVIEW_DIR}")
    client.set_terminated(run.info.run_id)
    client.set_model_version_tag(name, str(cand.version), "pathbundles.review_run_id", run.info.run_id)
    if markdown_file is not None:
        with atomic_path(Path(markdown_file)) as tmp:
            tmp.write_text(markdown, encoding="utf-8")
    return result


# ------------------------------------------------------------------------------------------------------ promote

_GATE = re.compile(r"^\s*(?P<metric>[A-Za-z_][\w.\-/: ]*?)\s*(?P<op>>=|<=|==|>|<)\s*"
                   r"(?P<rhs>champion(?:\s*[+-]\s*[0-9.eE+-]+)?|[+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)\s*$")
_OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, ">": operator.gt, "<": operator.lt}


def parse_gate(gate: str) -> tuple[str, str, str | None, float]:
    """``"froc>=champion-0.01"`` -> ``("froc", ">=", "champion", -0.01)``; ``"slide_auc>=0.9"`` ->
    ``("slide_auc", ">=", None, 0.9)``. Raises :class:`RegistryError` naming a malformed gate."""
    match = _GATE.match(gate)
    if match is None:
        raise RegistryError(f"gate '{gate}': expected METRIC OP VALUE with OP one of >=, <=, >, <, == and VALUE a "
                            "number, 'champion' or 'champion+/-number' (e.g. froc>=champion-0.01, slide_auc>=0.9)")
    rhs = match["rhs"].replace(" ", "")
    if rhs.startswith(CHAMPION):
        offset = rhs[len(CHAMPION):]
        try:
            return match["metric"], match["op"], CHAMPION, float(offset) if offset else 0.0
        except ValueError:
            raise RegistryError(f"gate '{gate}': '{offset}' after 'champion' is not a number") from None
    try:
        return match["metric"], match["op"], None, float(rhs)
    except ValueError:
        raise RegistryError(f"gate '{gate}': '{rhs}' is not a number") from None


def evaluate_gates(gates: Sequence[str], candidate: dict[str, float], champion: dict[str, float] | None) -> list[dict]:
    """Each gate's outcome: ``{"gate", "metric", "op", "value", "threshold", "passed", "note"}``.

    A gate relative to the champion passes (noted) when there is no champion yet; a metric the candidate lacks
    fails the gate, listing the metrics it has.
    """
    results = []
    for gate in gates:
        metric, op, relative, number = parse_gate(gate)
        value = candidate.get(metric)
        entry = {"gate": gate, "metric": metric, "op": op, "value": value, "threshold": None, "passed": False, "note": ""}
        if relative == CHAMPION and champion is None:
            entry.update(passed=True, note="no champion yet: relative gate not applied")
        elif value is None:
            entry["note"] = f"candidate has no metric '{metric}' (has: {', '.join(sorted(candidate)) or 'none'})"
        elif relative == CHAMPION and metric not in champion:
            entry["note"] = f"champion has no metric '{metric}'"
        else:
            threshold = (champion[metric] if relative == CHAMPION else 0.0) + number
            entry.update(threshold=threshold, passed=bool(_OPS[op](value, threshold)))
        results.append(entry)
    return results


def policy_gates(name: str, version: Any, policy: str | os.PathLike | None = None) -> tuple[list[str], str]:
    """The default gates of a version and where they come from: the policy file's entry for ``name`` when
    ``policy`` is given (JSON ``{model name: [gates]}``), else the bundle's ``metadata.json`` ``promotion_gates``
    recorded on the version at registration."""
    if policy is not None:
        try:
            doc = json.loads(Path(policy).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise RegistryError(f"{policy}: cannot read the promotion policy ({err})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get(name, []), list):
            raise RegistryError(f"{policy}: a promotion policy is a JSON object {{model name: [gates]}}")
        return [str(g) for g in doc.get(name, [])], f"policy {policy}"
    recorded = (version.tags or {}).get(TAG_GATES)
    return (json.loads(recorded) if recorded else []), f"the bundle's metadata.json {GATES_FIELD}"


def promote(name: str, candidate: str | int, gate: str | Sequence[str] = (), who: str | None = None,
            why: str = "", alias: str = CHAMPION, tracking_uri: str | None = None,
            policy: str | os.PathLike | None = None, allow_different_data: bool = False) -> dict:
    """Give ``alias`` to the candidate version when every gate passes and its evaluation ran on the champion's
    datalist; refuse (:class:`PromotionRefused`) otherwise.

    Args:
        name: registered model.
        candidate: version to promote; it needs an evaluation run with metrics.
        gate: one gate or several (``"froc>=champion-0.01"``, ``"slide_auc>=0.9"``); none = the policy's gates.
            At least one must be absolute (a number, not ``champion``): relative gates pass while there is no
            champion, so alone they would let any first model through.
        who: recorded as ``promoted_by``; default the login name.
        why: recorded as ``promotion_reason``.
        alias: the alias to move.
        policy: JSON file ``{model name: [gates]}`` giving the gates when ``gate`` is empty; default the bundle's
            ``metadata.json`` ``promotion_gates``.
        allow_different_data: promote even when the champion's evaluation ran on another datalist (or its datalist
            hash is unknown); recorded as the tag ``promoted_on_different_data``.

    The candidate version gets tags ``promoted_by``, ``promotion_reason``, ``promotion_gates`` (JSON results),
    ``promoted_at`` and ``previous_champion``; a refusal records ``refused_gates``, ``refused_reasons`` and
    ``refused_at``.

    Returns:
        ``{"promoted": true, "name", "version", "alias", "promoted_by", "previous", "same_data", "gates"}``.
    """
    client = _client(tracking_uri)
    gates = [gate] if isinstance(gate, str) else list(gate)
    for g in gates:
        parse_gate(g)  # a syntax error is reported before anything is read or written
    cand = _version(client, name, candidate)
    source = "--gate"
    if not gates:
        gates, source = policy_gates(name, cand, policy)
        for g in gates:
            parse_gate(g)
    if not any(parse_gate(g)[2] is None for g in gates):
        raise RegistryError(f"refused to promote {name} v{cand.version}: the gates ({', '.join(gates) or 'none'}, "
                            f"from {source}) need at least one absolute threshold, e.g. --gate \"froc>=0.85\"")
    cand_metrics = evaluated_metrics(client, name, cand)
    champ = _alias_version(client, name, alias)
    other = champ is not None and champ.version != cand.version
    champ_metrics = version_metrics(client, champ) if other else None
    results = evaluate_gates(gates, cand_metrics, champ_metrics)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    reasons = [f"{r['gate']}: " + (r["note"] or f"{r['metric']} = {r['value']:.4f}, needs {r['op']} "
                                                f"{r['threshold']:.4f}") for r in results if not r["passed"]]
    same_data, data_note = (compare_evaluation_data(_evaluation(client, _eval_run_id(cand)),
                                                    _evaluation(client, _eval_run_id(champ)),
                                                    f"v{champ.version} ({alias})") if other else (None, ""))
    if data_note and not allow_different_data:
        reasons.append(f"{data_note} (--allow_different_data promotes anyway)")
    if reasons:
        for key, value in {"refused_gates": json.dumps(results), "refused_reasons": json.dumps(reasons),
                           "refused_at": stamp}.items():
            client.set_model_version_tag(name, str(cand.version), key, value)
        raise PromotionRefused(f"refused to promote {name} v{cand.version} to '{alias}': {'; '.join(reasons)}",
                               results, reasons)
    user = who or getpass.getuser()
    tags = {"promoted_by": user, "promotion_reason": why, "promotion_gates": json.dumps(results),
            "promoted_at": stamp, "previous_champion": str(champ.version) if champ else "none"}
    if data_note:
        tags["promoted_on_different_data"] = data_note
    for key, value in tags.items():
        client.set_model_version_tag(name, str(cand.version), key, str(value))
    client.set_registered_model_alias(name, alias, str(cand.version))
    return {"promoted": True, "name": name, "version": str(cand.version), "alias": alias, "promoted_by": user,
            "previous": str(champ.version) if champ else None, "same_data": same_data, "gates": results}


# ------------------------------------------------------------------------------------------------------- export

def export(name: str, out: str | os.PathLike, alias: str | None = CHAMPION, version: str | int | None = None,
           tracking_uri: str | None = None) -> dict:
    """Write a registered version's bundle folder to ``out`` (which must not exist or be empty).

    The files are checked against the sha256 manifest recorded at registration, so configs and weights are
    byte-identical to the registered bundle; the folder appears under its final name only when complete.

    Returns:
        ``{"name", "version", "out", "files"}``.
    """
    import mlflow

    client = _client(tracking_uri)
    if version is None:
        _registered(client, name)
        chosen = _alias_version(client, name, alias)
        if chosen is None:
            raise RegistryError(f"model '{name}' has no version with alias '{alias}'")
    else:
        chosen = _version(client, name, version)
    target = Path(out).resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise RegistryError(f"{target}: export target exists and is not an empty folder")
    partial = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        with tempfile.TemporaryDirectory(prefix="pathbundles-export-") as tmp:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{chosen.version}",
                                                             dst_path=tmp, tracking_uri=client.tracking_uri))
            from mlflow.models import Model

            model = Model.load(str(local / "MLmodel"))
            manifest = (model.metadata or {}).get("bundle_manifest", {})
            artifacts = model.flavors.get("python_function", {}).get("artifacts", {})
            source = local / artifacts.get(MODEL_ARTIFACT, {}).get("path", f"artifacts/{MODEL_ARTIFACT}")
            if not source.is_dir():
                raise RegistryError(f"model '{name}' v{chosen.version} holds no bundle artifact ({source.name})")
            shutil.copytree(source, partial)
        for relative, digest in manifest.items():
            path = partial / relative
            if not path.is_file() or sha256_file(path) != digest:
                raise RegistryError(f"model '{name}' v{chosen.version}: {relative} differs from the registered "
                                    "bundle (sha256 mismatch or missing)")
        if target.exists():
            target.rmdir()
        os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return {"name": name, "version": str(chosen.version), "out": str(target), "files": sorted(manifest)}


# --------------------------------------------------------------------------------------------------------- CLI

class Registry:
    """``python -m pathbundles registry <verb>``: each verb prints one JSON object on stdout (a failure:
    ``{"error": ...}``, a refused promotion ``{"promoted": false, "reasons": [...], ...}``, with the message on
    stderr and exit status 2).

    Args:
        tracking_uri: tracking and registry store (default as for tracked runs).
    """

    def __init__(self, tracking_uri: str | None = None) -> None:
        self.tracking_uri = tracking_uri

    def register(self, bundle: str, run_id: str | None = None, name: str | None = None,
                 eval_run_id: str | None = None) -> None:
        """Log BUNDLE as a pyfunc model and register it as a new version (default name pathbundles-<bundle>)."""
        self._print(register, bundle, run_id=run_id, name=name, eval_run_id=eval_run_id,
                    tracking_uri=self.tracking_uri)

    def review(self, name: str, candidate: str, alias: str = CHAMPION, markdown: str | None = None) -> None:
        """Compare version CANDIDATE of NAME with the champion; the review (its Markdown in the field "markdown",
        and in --markdown FILE) is printed as JSON and logged in a review run."""
        self._print(review, name, candidate, alias=alias, tracking_uri=self.tracking_uri, markdown_file=markdown)

    def promote(self, name: str, candidate: str, gate: Any = (), who: str | None = None, why: str = "",
                alias: str = CHAMPION, policy: str | None = None, allow_different_data: bool = False) -> None:
        """Give CANDIDATE the champion alias if every gate passes: --gate "froc>=0.85,froc>=champion-0.01" (at least
        one absolute); without --gate, the gates of --policy FILE or of the bundle's metadata.json. A champion
        evaluated on another datalist refuses it, unless --allow_different_data."""
        gates = [g for g in gate.split(",") if g.strip()] if isinstance(gate, str) else list(gate)
        self._print(promote, name, candidate, gate=gates, who=who, why=why, alias=alias,
                    tracking_uri=self.tracking_uri, policy=policy, allow_different_data=allow_different_data)

    def export(self, name: str, out: str, alias: str = CHAMPION, version: str | None = None) -> None:
        """Write the bundle of NAME@ALIAS (or --version) to OUT, runnable by python -m monai.bundle run."""
        self._print(export, name, out, alias=alias, version=version, tracking_uri=self.tracking_uri)

    @staticmethod
    def _print(function: Any, *args: Any, **kwargs: Any) -> None:
        try:
            result = function(*args, **kwargs)
        except RegistryError as err:
            failure = {"error": str(err)}
            if isinstance(err, PromotionRefused):
                failure = {"promoted": False, "name": args[0], "version": str(args[1]), "reasons": err.reasons,
                           "gates": err.results, **failure}
            print(json.dumps(failure, indent=2, default=str))
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        print(json.dumps(result, indent=2, default=str))
