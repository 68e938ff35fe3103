"""MLflow model registry workflow for bundles: register, review, promote, export.

``python -m pathbundles registry <verb>`` (:class:`Registry`):

- ``register --bundle bundles/<name> [--run_id ID]``: log the bundle folder as a pyfunc model (:class:`BundleModel`,
  predict = the bundle's inference on slide paths) and register it as a new version of ``pathbundles-<name>``,
  linked to its training run and, by the weights hash, its latest evaluation run.
- ``review --name M --candidate V``: candidate's evaluation metrics against the ``champion`` version's (table
  printed and logged with overlaid FROC/ROC curves in a review run); a candidate without evaluation metrics fails.
- ``promote --name M --candidate V [--gate "froc>=0.85,froc>=champion-0.01"] [--policy FILE]``: move the
  ``champion`` alias when every gate passes, recording who, why and the gate results as version tags; refuse with
  the failed gates otherwise. The candidate needs an evaluation run, and the gates at least one absolute threshold;
  without ``--gate`` they come from ``--policy`` (``{model name: [gates]}``), else from the bundle's
  ``metadata.json`` field ``promotion_gates`` (recorded on the version at registration: the paper's metric).
- ``export --name M --alias champion --out DIR``: write the bundle back, byte-identical, as a folder that
  ``python -m monai.bundle run`` runs unchanged.

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
from pathbundles.weights import NOT_MEASURED, RECORD_FIELDS, identify
from pathbundles.tracking import (CURVES_FILE, EVALUATION_DIR, TAG_BUNDLE, TAG_BUNDLE_VERSION, TAG_GIT_COMMIT,
                                  TAG_WEIGHTS_SHA, TAG_WORKFLOW, default_artifact_location, default_tracking_uri,
                                  project_git_commit, read_metadata, sha256_file)

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


class RegistryError(Exception):
    """A registry request that cannot be done; the message names the model, version or value at fault."""


class PromotionRefused(RegistryError):
    """A promotion whose gates did not all pass; ``results`` holds every gate's outcome."""

    def __init__(self, message: str, results: list[dict]) -> None:
        super().__init__(message)
        self.results = results


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
    docs = bundle_root / "docs" / "README.md"
    description = docs.read_text(encoding="utf-8") if docs.is_file() else str(metadata.get("description", ""))
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
    for run_id in (version.run_id, (version.tags or {}).get("pathbundles.eval_run_id")):
        if run_id:
            metrics.update(client.get_run(run_id).data.metrics)
    return metrics


def evaluated_metrics(client: Any, name: str, version: Any) -> dict[str, float]:
    """:func:`version_metrics` of a version that has an evaluation run with metrics; RegistryError otherwise (a
    review or promotion on training metrics alone, or on none, would compare nothing)."""
    eval_run_id = (version.tags or {}).get("pathbundles.eval_run_id")
    if not eval_run_id:
        raise RegistryError(f"model '{name}' v{version.version} has no evaluation run: run the bundle's evaluate.json "
                            "with --tracking mlflow/tracking.json on these weights, then register again (or pass "
                            "--eval_run_id to register)")
    if not client.get_run(eval_run_id).data.metrics:
        raise RegistryError(f"model '{name}' v{version.version}: its evaluation run {eval_run_id} logged no metrics")
    return version_metrics(client, version)


def _curves(client: Any, version: Any) -> dict:
    import mlflow

    run_id = (version.tags or {}).get("pathbundles.eval_run_id") or version.run_id
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{EVALUATION_DIR}/{CURVES_FILE}",
                                                       dst_path=tmp, tracking_uri=client.tracking_uri)
            return json.loads(Path(path).read_text(encoding="utf-8"))
    except Exception:  # no curves logged for this version: the review shows the table only
        return {}


def _overlay_plots(curves: dict[str, dict], folder: Path) -> list[Path]:
    """FROC, ROC and precision-recall curves of each version (label -> curves.json content) overlaid, one PNG per
    curve kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for kind, (x, y, xlabel, ylabel) in {"froc": ("fp_per_slide", "sensitivity", "mean false positives per slide",
                                                  "sensitivity"),
                                         "roc": ("fpr", "tpr", "false positive rate", "true positive rate"),
                                         "pr": ("recall", "precision", "recall", "precision")}.items():
        present = {label: c[kind] for label, c in curves.items() if kind in c}
        if len(present) < 2:
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
        ax.set_title(f"{kind.upper()}: candidate vs champion")
        path = folder / f"{kind}_overlay.png"
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written


def review(name: str, candidate: str | int, alias: str = CHAMPION, tracking_uri: str | None = None) -> dict:
    """Compare a candidate version's metrics with the version holding ``alias``; print and log the comparison.

    The table (markdown and JSON) and the overlaid FROC/ROC curves are logged in a new ``review`` run of the
    candidate's experiment, whose id is stored on the candidate version as ``pathbundles.review_run_id``.

    Returns:
        ``{"name", "candidate", "champion" (version or None), "rows": [{"metric", "champion", "candidate",
        "delta"}], "review_run_id", "table"}``.

    Raises:
        RegistryError: the candidate has no evaluation run, or its evaluation logged no metrics.
    """
    client = _client(tracking_uri)
    cand = _version(client, name, candidate)
    champ = _alias_version(client, name, alias)
    cand_metrics = evaluated_metrics(client, name, cand)
    champ_metrics = version_metrics(client, champ) if champ is not None else {}
    rows = []
    for metric in sorted(set(cand_metrics) | set(champ_metrics)):
        a, b = champ_metrics.get(metric), cand_metrics.get(metric)
        rows.append({"metric": metric, "champion": a, "candidate": b,
                     "delta": None if a is None or b is None else b - a})
    champ_label = f"v{champ.version} ({alias})" if champ is not None else f"no {alias}"

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    lines = [f"# Review of {name} v{cand.version} against {champ_label}", "",
             f"| metric | {champ_label} | v{cand.version} (candidate) | delta |", "|---|---:|---:|---:|"]
    lines += [f"| {r['metric']} | {cell(r['champion'])} | {cell(r['candidate'])} | "
              f"{'-' if r['delta'] is None else format(r['delta'], '+.4f')} |" for r in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    experiment_id = client.get_run(cand.run_id).info.experiment_id
    run = client.create_run(experiment_id, run_name=f"review-{name}-v{cand.version}",
                            tags={TAG_WORKFLOW: "review", "pathbundles.model": name,
                                  "pathbundles.candidate_version": str(cand.version),
                                  "pathbundles.champion_version": str(champ.version) if champ else "none"})
    result = {"name": name, "candidate": str(cand.version), "champion": str(champ.version) if champ else None,
              "rows": rows, "review_run_id": run.info.run_id, "table": table}
    with tempfile.TemporaryDirectory(prefix="pathbundles-review-") as tmp:
        folder = Path(tmp)
        (folder / "review.md").write_text(table, encoding="utf-8")
        (folder / "review.json").write_text(json.dumps({k: v for k, v in result.items() if k != "table"},
                                                       indent=2), encoding="utf-8")
        curves = {f"v{cand.version} (candidate)": _curves(client, cand)}
        if champ is not None:
            curves[champ_label] = _curves(client, champ)
        plots = _overlay_plots(curves, folder)
        for path in [folder / "review.md", folder / "review.json", *plots]:
            client.log_artifact(run.info.run_id, str(path), "review")
    client.set_terminated(run.info.run_id)
    client.set_model_version_tag(name, str(cand.version), "pathbundles.review_run_id", run.info.run_id)
    result["plots"] = [f"review/{p.name}" for p in plots]
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
            policy: str | os.PathLike | None = None) -> dict:
    """Give ``alias`` to the candidate version when every gate passes; refuse (:class:`PromotionRefused`) otherwise.

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

    The candidate version gets tags ``promoted_by``, ``promotion_reason``, ``promotion_gates`` (JSON results),
    ``promoted_at`` and ``previous_champion``; a refusal records ``refused_gates`` and ``refused_at``.
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
    champ_metrics = version_metrics(client, champ) if champ is not None and champ.version != cand.version else None
    results = evaluate_gates(gates, cand_metrics, champ_metrics)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    failed = [r for r in results if not r["passed"]]
    if failed:
        client.set_model_version_tag(name, str(cand.version), "refused_gates", json.dumps(results))
        client.set_model_version_tag(name, str(cand.version), "refused_at", stamp)
        reasons = "; ".join(f"{r['gate']}: " + (r["note"] or f"{r['metric']} = {r['value']:.4f}, needs "
                                                  f"{r['op']} {r['threshold']:.4f}") for r in failed)
        raise PromotionRefused(f"refused to promote {name} v{cand.version} to '{alias}': {reasons}", results)
    user = who or getpass.getuser()
    for key, value in {"promoted_by": user, "promotion_reason": why, "promotion_gates": json.dumps(results),
                       "promoted_at": stamp, "previous_champion": str(champ.version) if champ else "none"}.items():
        client.set_model_version_tag(name, str(cand.version), key, str(value))
    client.set_registered_model_alias(name, alias, str(cand.version))
    return {"name": name, "version": str(cand.version), "alias": alias, "promoted_by": user,
            "previous": str(champ.version) if champ else None, "gates": results}


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
    """``python -m pathbundles registry <verb>``: each verb prints its result as JSON.

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

    def review(self, name: str, candidate: str, alias: str = CHAMPION) -> None:
        """Compare version CANDIDATE of NAME with the champion; the table is printed and logged."""
        self._print(review, name, candidate, alias=alias, tracking_uri=self.tracking_uri, show=False)

    def promote(self, name: str, candidate: str, gate: Any = (), who: str | None = None, why: str = "",
                alias: str = CHAMPION, policy: str | None = None) -> None:
        """Give CANDIDATE the champion alias if every gate passes: --gate "froc>=0.85,froc>=champion-0.01" (at least
        one absolute); without --gate, the gates of --policy FILE or of the bundle's metadata.json."""
        gates = [g for g in gate.split(",") if g.strip()] if isinstance(gate, str) else list(gate)
        self._print(promote, name, candidate, gate=gates, who=who, why=why, alias=alias,
                    tracking_uri=self.tracking_uri, policy=policy)

    def export(self, name: str, out: str, alias: str = CHAMPION, version: str | None = None) -> None:
        """Write the bundle of NAME@ALIAS (or --version) to OUT, runnable by python -m monai.bundle run."""
        self._print(export, name, out, alias=alias, version=version, tracking_uri=self.tracking_uri)

    @staticmethod
    def _print(function: Any, *args: Any, show: bool = True, **kwargs: Any) -> None:
        try:
            result = function(*args, **kwargs)
        except RegistryError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        if show or not isinstance(result, dict):
            print(json.dumps(result, indent=2, default=str))
        else:
            print(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=2, default=str))
