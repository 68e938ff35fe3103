"""MLflow tracking and the model-registry workflow, against a real ``mlflow server`` and a plain SQLite store.

The end-to-end tests work on a copy of the real ``bundles/scannet`` bundle and a two-slide phantom metastasis
dataset (``mlflow_fixtures``): one tiny tracked training run (one epoch of 8 patches, logged to the server) shared
by both stores; in each store a tracked evaluation, register (twice), review, promote (a passing and a refused
gate), load ``models:/pathbundles-scannet@champion`` as a pyfunc, export; against the server also a prediction on
a phantom slide and a run of the exported bundle's inference.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from mlflow_fixtures import (PYTHON, mlflow_server_url, note_commit, run_bundle, scannet_dataset,  # noqa: F401
                             sqlite_tracking_uri, evaluate_config, trained_scannet, tumour_slide)
from pathbundles import registry, tracking
from pathbundles.tracking import flatten_config, flatten_metrics, sha256_datalist, sha256_file

MODEL = "pathbundles-scannet"
#: Evaluation options of the tests: no loader workers, few bootstrap samples, a sparser scan (alpha 1: a quarter
#: of the default's network passes); the bundle's default lp.
EVALUATE_ARGS = ("--num_workers", "0", "--n_bootstrap", "50", "--alpha", "1")


def test_flatten_config_respects_mlflow_limits() -> None:
    flat = flatten_config({"a": {"b": [1, {"c": "x" * 7000}]}, "d#e": None, "f": True})
    assert flat["a.b.0"] == "1"
    assert len(flat["a.b.1.c"]) == 6000 and flat["a.b.1.c"].endswith("...[cut]")
    assert flat["d_e"] == "null" and flat["f"] == "true"
    assert flatten_config({}) == {} and flatten_config({"a": {}}) == {"a": "{}"}


def test_flatten_metrics_keeps_finite_numbers() -> None:
    assert flatten_metrics({"froc": 0.5, "s": {"0.25": 0.1}, "n": None, "ok": True, "c": [1, 2],
                            "bad": float("nan")}) == {"froc": 0.5, "s.0.25": 0.1}


def test_datalist_hash_is_canonical() -> None:
    assert sha256_datalist([{"b": 1, "a": 2}]) == sha256_datalist([{"a": 2, "b": 1}])
    assert sha256_datalist([{"a": 1}]) != sha256_datalist([{"a": 2}])


@pytest.mark.parametrize("gate", ["froc>champion-", "froc=>0.5", "froc>=abc", ">=0.5"])
def test_gate_syntax_errors_name_the_gate(gate: str) -> None:
    with pytest.raises(registry.RegistryError, match="gate"):
        registry.parse_gate(gate)


def test_gates_relative_to_champion() -> None:
    results = registry.evaluate_gates(["froc>=champion-0.01", "slide_auc>=0.9"], {"froc": 0.60, "slide_auc": 0.95},
                                      {"froc": 0.605, "slide_auc": 0.99})
    assert [r["passed"] for r in results] == [True, True]
    results = registry.evaluate_gates(["froc>=champion-0.01"], {"froc": 0.5}, None)
    assert results[0]["passed"] and "no champion" in results[0]["note"]
    results = registry.evaluate_gates(["iou>=0.5"], {"froc": 0.5}, None)
    assert not results[0]["passed"] and "has: froc" in results[0]["note"]


def test_preview_is_the_top_tumour_and_top_normal_slide(tmp_path: Path) -> None:
    (tmp_path / "overlays").mkdir()
    for name in ("a", "b", "c"):
        (tmp_path / "overlays" / f"{name}.png").write_bytes(b"png")
    assert {k: p.name for k, p in tracking.preview_overlays(tmp_path).items()} == {"first": "a.png"}
    (tmp_path / "slide_scores.csv").write_text("name,score,n_detections\na,0.2,1\nb,0.9,3\nc,0.5,2\n")
    assert {k: p.name for k, p in tracking.preview_overlays(tmp_path).items()} == {"highest": "b.png",
                                                                                  "lowest": "a.png"}
    labels = tracking.slide_labels([{"image": "/x/a.tif", "label": 1}, {"image": "/x/b.tif", "label": 0},
                                    {"image": "/x/c.tif", "name": "c", "label": 1},
                                    {"image": "/x/d.tif", "label": "masks/d.png"}, "/x/e.tif"])
    assert labels == {"a": 1, "b": 0, "c": 1}
    # the highest-scoring tumour slide (c: 0.5 > a: 0.2) and the highest-scoring normal slide (b)
    assert {k: p.name for k, p in tracking.preview_overlays(tmp_path, labels).items()} == {"tumour": "c.png",
                                                                                          "normal": "b.png"}
    (tmp_path / "slide_scores.csv").write_text("name,label,score,n_detections\na,1,0.2,1\nb,1,0.9,3\nc,0,0.5,2\n")
    assert {k: p.name for k, p in tracking.preview_overlays(tmp_path).items()} == {"tumour": "b.png",
                                                                                  "normal": "c.png"}
    assert tracking.preview_overlays(tmp_path / "none") == {}


def test_git_commit_of_a_copied_bundle_is_the_code_s(tmp_path: Path) -> None:
    assert tracking.project_git_commit(tmp_path) == tracking.git_commit(Path(tracking.__file__).parent)


def test_run_left_open_is_ended_at_exit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bundle with its own ``finalize`` (multi_gpu_train.json) replaces the tracking's: the run ends at exit."""
    import mlflow

    (tmp_path / "b" / "configs").mkdir(parents=True)
    (tmp_path / "b" / "configs" / "metadata.json").write_text('{"name": "b", "version": "0.1.0"}')
    uri = tracking.sqlite_uri(tmp_path / "mlflow.db")
    statuses = []
    for uncaught in (False, True):
        monkeypatch.setitem(tracking._EXIT_STATE, "uncaught", uncaught)
        run = tracking.BundleRun(tmp_path / "b", tracking_uri=uri, workflow="train")
        run.start()
        run._at_exit()  # what atexit calls
        statuses.append(mlflow.MlflowClient(uri, registry_uri=uri).get_run(run.run_id).info.status)
        run._at_exit()  # a second call (finalize ran first) changes nothing
    assert statuses == ["FINISHED", "FAILED"]


# ---------------------------------------------------------------------------------------------------------------
# End to end on the real scannet bundle

def _artifacts(client, run_id: str, folder: str | None = None) -> set[str]:
    paths = set()
    for item in client.list_artifacts(run_id, folder):
        paths |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return paths


def _runs(client, workflow: str) -> list:
    experiment = client.get_experiment_by_name(MODEL)
    return client.search_runs([experiment.experiment_id], f"tags.`pathbundles.workflow` = '{workflow}'")


def _check_common_tags(run, bundle: Path) -> None:
    tags = run.data.tags
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert tags["pathbundles.bundle"] == "scannet"
    assert tags["pathbundles.bundle_name"] == metadata["name"]
    assert tags["pathbundles.bundle_version"] == metadata["version"]
    # the copy lives outside the checkout: the commit is the project's (the code that ran)
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", tags["pathbundles.git_commit"]), tags["pathbundles.git_commit"]
    assert tags["pathbundles.git_commit"].removesuffix("-dirty") == tags["mlflow.source.git.commit"]
    assert tags["mlflow.source.git.commit"] in note_commit()
    assert tags["pathbundles.weights_sha256"] == sha256_file(bundle / "models" / "model.pt")


def _check_train_run(client, bundle: Path, dataset: Path) -> str:
    from pathbundles.sampling import read_datalist

    (train,) = _runs(client, "train")
    assert train.info.status == "FINISHED"
    _check_common_tags(train, bundle)
    datalist_sha = sha256_datalist(read_datalist(dataset))
    assert train.data.tags["pathbundles.datalist_sha256.train_datalist"] == datalist_sha
    assert train.data.tags["pathbundles.datalist_sha256.val_datalist"] == datalist_sha
    params = train.data.params
    assert {k: params[k] for k in ("epochs", "samples_per_epoch", "batch_size", "hnm_rounds", "train_source")} == {
        "epochs": "1", "samples_per_epoch": "8", "batch_size": "4", "hnm_rounds": "0", "train_source": str(dataset)}
    assert params["learning_rate"] == str(json.loads((bundle / "configs" / "train.json").read_text())["learning_rate"])
    assert params["train.trainer._target_"] == "SupervisedTrainer"
    # 8 samples in batches of 4: two iterations of loss; one validation, stepped by the trainer's epoch
    assert [m.step for m in client.get_metric_history(train.info.run_id, "train_loss")] == [1, 2]
    assert [m.step for m in client.get_metric_history(train.info.run_id, "val_auc")] == [1]
    assert {"lr_group_0", "val_auc"} <= set(train.data.metrics)
    artifacts = _artifacts(client, train.info.run_id)
    assert "config/metadata.json" in artifacts
    (merged,) = [a for a in artifacts if re.fullmatch(r"config/config_\d{8}_\d{6}\.json", a)]
    import mlflow

    merged_config = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=train.info.run_id, artifact_path=merged, tracking_uri=client.tracking_uri)).read_text())
    assert merged_config["epochs"] == 1 and merged_config["train_source"] == str(dataset)
    return train.info.run_id


def _check_evaluate_run(client, bundle: Path, dataset: Path) -> str:
    from pathbundles.sampling import read_datalist

    (evaluation,) = _runs(client, "evaluate")
    assert evaluation.info.status == "FINISHED"
    _check_common_tags(evaluation, bundle)
    assert evaluation.data.tags["pathbundles.datalist_sha256.datalist"] == sha256_datalist(read_datalist(dataset))
    assert evaluation.data.params["n_bootstrap"] == "50" and evaluation.data.params["data_source"] == str(dataset)
    report = json.loads((bundle / "eval" / "evaluate" / "metrics.json").read_text())
    for name in ("froc", "slide_auc"):
        assert evaluation.data.metrics[name] == pytest.approx(report["metrics"][name]), name
        assert 0.0 <= evaluation.data.metrics[name] <= 1.0
    artifacts = _artifacts(client, evaluation.info.run_id)
    assert {"evaluation/metrics.json", "evaluation/curves.json", "evaluation/froc.png", "evaluation/roc.png",
            "evaluation/slide_scores.csv", "config/metadata.json"} <= artifacts
    assert any(re.fullmatch(r"config/config_\d{8}_\d{6}\.json", a) for a in artifacts)
    # the dataset's labels pick the previews: its one tumour slide and its one normal slide
    assert {a for a in artifacts if a.startswith("preview/")} == {"preview/tumour/phantom_tumor_000.png",
                                                                  "preview/normal/phantom_normal_001.png"}
    return evaluation.info.run_id


def _registry_cycle(uri: str, bundle: Path, tmp_path: Path, train_run_id: str | None, eval_run_id: str,
                    slide: Path | None) -> None:
    """Register twice, review, promote (passing gates, then a refused one), load the champion, export.

    With ``slide``: predict on it through the pyfunc, through the CLI refuse a promotion, and run the exported
    bundle's inference on it (the same score as the pyfunc's).
    """
    import mlflow
    import pandas as pd

    client = mlflow.MlflowClient(uri, registry_uri=uri)
    note_commit()
    first = registry.register(bundle, tracking_uri=uri)
    assert first["version"] == "1" and first["eval_run_id"] == eval_run_id
    if train_run_id is not None:
        assert first["run_id"] == train_run_id
    else:  # no training run in this store: the model is logged into a new register run
        assert client.get_run(first["run_id"]).data.tags["pathbundles.workflow"] == "register"
    version = client.get_model_version(MODEL, "1")
    assert version.tags["pathbundles.weights_sha256"] == sha256_file(bundle / "models" / "model.pt")
    assert version.tags["pathbundles.bundle_version"] == json.loads(
        (bundle / "configs" / "metadata.json").read_text())["version"]
    assert version.tags["pathbundles.git_commit"].removesuffix("-dirty") in note_commit()
    promoted = registry.promote(MODEL, 1, gate=["froc>=champion-0.01", "slide_auc>=0"], who="tester",
                                why="first scannet model", tracking_uri=uri)
    assert [g["passed"] for g in promoted["gates"]] == [True, True] and promoted["previous"] is None

    second = registry.register(bundle, tracking_uri=uri)
    assert second["version"] == "2" and second["eval_run_id"] == eval_run_id
    reviewed = registry.review(MODEL, 2, tracking_uri=uri)
    froc_row = next(r for r in reviewed["rows"] if r["metric"] == "froc")
    assert froc_row["champion"] == froc_row["candidate"] and froc_row["delta"] == 0.0
    assert [r["metric"] for r in reviewed["rows"][:2]] == ["froc", "slide_auc"] and reviewed["same_data"] is True
    assert {s["setting"]: s["candidate"] for s in reviewed["settings"]}["details.slide_auc.n_bootstrap"] == 50
    assert set(reviewed["plots"]) == {"review/froc_overlay.png", "review/roc_overlay.png"}
    assert set(reviewed["previews"]) == {"review/preview/tumour/phantom_tumor_000.png",
                                         "review/preview/normal/phantom_normal_001.png"}
    assert {"review/review.md", "review/review.json", *reviewed["plots"], *reviewed["previews"]} <= _artifacts(
        client, reviewed["review_run_id"])
    froc = froc_row["candidate"]
    if slide is not None:  # the CLI: a refused promotion exits with 2 and names the gate, value and threshold
        done = subprocess.run([PYTHON, "-m", "pathbundles", "registry", "--tracking_uri", uri, "promote", "--name",
                               MODEL, "--candidate", "2", "--gate", "slide_auc>=0,froc>=champion+0.01"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stdout + done.stderr
        assert f"froc>=champion+0.01: froc = {froc:.4f}, needs >= {froc + 0.01:.4f}" in done.stderr
        assert "slide_auc>=0:" not in done.stderr
        refusal = json.loads(done.stdout)
        assert refusal["promoted"] is False and refusal["reasons"] == [
            f"froc>=champion+0.01: froc = {froc:.4f}, needs >= {froc + 0.01:.4f}"]
    else:
        with pytest.raises(registry.PromotionRefused, match=re.escape(f"froc = {froc:.4f}, needs >= {froc + 0.01:.4f}")):
            registry.promote(MODEL, 2, gate=["slide_auc>=0", "froc>=champion+0.01"], tracking_uri=uri)
    refused = json.loads(client.get_model_version(MODEL, "2").tags["refused_gates"])
    assert [g["passed"] for g in refused] == [True, False]
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == "1" and champion.tags["promoted_by"] == "tester"
    assert champion.tags["promotion_reason"] == "first scannet model"

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    assert model.metadata.metadata["bundle"] == "scannet"
    predicted = None
    if slide is not None:
        predicted = model.predict(pd.DataFrame({"image": [str(slide)]}), params={"output_dir": str(tmp_path / "pred")})
        assert list(predicted["name"]) == [slide.stem] and 0.0 <= predicted["score"][0] <= 1.0
        assert len(json.loads(predicted["detections"][0])) == predicted["n_detections"][0]
        for column in ("detections_csv", "overlay", "map"):
            assert Path(predicted[column][0]).is_file(), column

    exported = registry.export(MODEL, tmp_path / "exported", alias="champion", tracking_uri=uri)
    out = Path(exported["out"])
    content = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*")
                     if p.is_file() and p.relative_to(bundle).parts[0] != "eval")
    assert sorted(exported["files"]) == content
    for relative in content:
        assert sha256_file(out / relative) == sha256_file(bundle / relative), relative
    assert not (out / "eval").exists()
    with pytest.raises(registry.RegistryError, match="not an empty folder"):
        registry.export(MODEL, out, tracking_uri=uri)
    if slide is not None:
        run_bundle(out / "configs" / "inference.json", "--data_source", str(slide.parent), tracking=False)
        import csv

        with open(out / "eval" / "slide_scores.csv", newline="") as f:
            (row,) = list(csv.DictReader(f))
        assert row["name"] == slide.stem
        assert float(row["score"]) == pytest.approx(predicted["score"][0], abs=1e-6)


@pytest.mark.slow
def test_scannet_cycle_against_server(trained_scannet: dict, tumour_slide: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri exports it
    uri, bundle, dataset = trained_scannet["tracking_uri"], trained_scannet["bundle"], trained_scannet["dataset"]
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    train_run_id = _check_train_run(client, bundle, dataset)
    note_commit()
    run_bundle(evaluate_config(bundle), "--data_source", str(dataset), *EVALUATE_ARGS, tracking_uri=uri)
    eval_run_id = _check_evaluate_run(client, bundle, dataset)
    _registry_cycle(uri, bundle, tmp_path, train_run_id, eval_run_id, tumour_slide)


@pytest.mark.slow
def test_scannet_cycle_on_sqlite(trained_scannet: dict, sqlite_tracking_uri: str, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The bundle trained (and tracked) against the server, evaluated with tracking into a plain SQLite store."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, bundle, dataset = sqlite_tracking_uri, trained_scannet["bundle"], trained_scannet["dataset"]
    note_commit()
    run_bundle(evaluate_config(bundle), "--data_source", str(dataset), *EVALUATE_ARGS,
               env={"PATHBUNDLES_TRACKING_URI": uri})  # the store named by the environment this time
    eval_run_id = _check_evaluate_run(mlflow.MlflowClient(uri, registry_uri=uri), bundle, dataset)
    _registry_cycle(uri, bundle, tmp_path, None, eval_run_id, None)


def test_registered_versions_name_their_weights_and_say_whether_they_are_demo(tmp_path: Path) -> None:
    """The shipped weights register as demo weights whose metadata.json metrics were measured on them; weights
    retrained into the same bundle version register as not demo and not measured, with their own hash."""
    import mlflow
    import torch

    from mlflow_fixtures import SCANNET, copy_bundle
    from pathbundles.scannet import ScanNet

    bundle = copy_bundle(SCANNET, tmp_path / "scannet")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    demo_sha = json.loads((SCANNET / "configs" / "metadata.json").read_text())["trained_with"]["models/model.pt"][
        "sha256"]
    first = registry.register(bundle, tracking_uri=uri)
    tags = client.get_model_version(MODEL, first["version"]).tags
    assert (first["weights_sha256"], first["demo_weights"]) == (demo_sha, True)
    assert (tags["pathbundles.weights_sha256"], tags["pathbundles.demo_weights"], tags["pathbundles.eval_metrics"]) \
        == (demo_sha, "true", "metadata.json")
    torch.manual_seed(1)
    torch.save(ScanNet(width=0.125, batch_norm=True).state_dict(), bundle / "models" / "model.pt")
    second = registry.register(bundle, tracking_uri=uri)
    tags = client.get_model_version(MODEL, second["version"]).tags
    assert second["demo_weights"] is False and second["bundle_version"] == first["bundle_version"]
    assert (tags["pathbundles.weights_sha256"], tags["pathbundles.demo_weights"], tags["pathbundles.eval_metrics"]) \
        == (sha256_file(bundle / "models" / "model.pt"), "false", "not measured")


def test_promotion_needs_an_evaluation_and_an_absolute_gate(tmp_path: Path) -> None:
    """A version without an evaluation cannot be reviewed or promoted; relative gates alone promote nothing; without
    --gate the bundle's metadata.json gates (the paper's metric) apply, or a policy file's."""
    import mlflow

    from mlflow_fixtures import SCANNET, copy_bundle

    bundle = copy_bundle(SCANNET, tmp_path / "scannet")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = registry.register(bundle, tracking_uri=uri)
    assert first["eval_run_id"] is None
    description = mlflow.MlflowClient(uri, registry_uri=uri).get_model_version(MODEL, "1").description
    assert "Measured performance: not measured" in description and "1.000" not in description
    with pytest.raises(registry.RegistryError, match=r"'pathbundles-scannet' v1 has no evaluation run: run the "
                                                      r"bundle's evaluate\.json"):
        registry.review(MODEL, 1, tracking_uri=uri)
    with pytest.raises(registry.RegistryError, match=r"need at least one absolute threshold"):
        registry.promote(MODEL, 1, gate="froc>=champion-0.01", tracking_uri=uri)  # passed with no metrics before
    with pytest.raises(registry.RegistryError, match=r"v1 has no evaluation run"):
        registry.promote(MODEL, 1, tracking_uri=uri)  # promoted unconditionally before

    client = mlflow.MlflowClient(uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("pathbundles-scannet").experiment_id
    evaluation = client.create_run(experiment, tags={tracking.TAG_WORKFLOW: "evaluate", tracking.TAG_WEIGHTS_SHA:
                                                     sha256_file(bundle / "models" / "model.pt")}).info.run_id
    client.log_metric(evaluation, "froc", 0.9)
    client.log_metric(evaluation, "slide_auc", 1.0)
    client.set_terminated(evaluation)
    second = registry.register(bundle, tracking_uri=uri)
    assert second["eval_run_id"] == evaluation
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({MODEL: ["froc>=0.95"]}))
    with pytest.raises(registry.PromotionRefused, match=r"froc>=0\.95: froc = 0\.9000, needs >= 0\.9500"):
        registry.promote(MODEL, 2, policy=policy, tracking_uri=uri)
    promoted = registry.promote(MODEL, 2, tracking_uri=uri)  # metadata.json: froc>=0.8533
    assert [(g["gate"], g["passed"]) for g in promoted["gates"]] == [("froc>=0.8533", True)]
    assert registry.review(MODEL, 2, tracking_uri=uri)["rows"]

    done = subprocess.run([PYTHON, "-m", "pathbundles", "registry", "--tracking_uri", uri, "review", "--name", MODEL,
                           "--candidate", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "v1 has no evaluation run" in done.stderr and "Traceback" not in done.stderr
    assert "v1 has no evaluation run" in json.loads(done.stdout)["error"]  # stdout is one JSON object


def _logged_run(client, experiment: str, tags: dict, metrics: dict, folder: Path,
                files: dict[str, bytes] = {}) -> str:
    """A finished run with ``tags``, ``metrics`` (a list of values is a history, steps 1, 2, ...) and ``files``
    (artifact path -> content)."""
    run_id = client.create_run(experiment, tags=tags).info.run_id
    for metric, values in metrics.items():
        for step, value in enumerate(values if isinstance(values, list) else [values], start=1):
            client.log_metric(run_id, metric, value, step=step)
    for artifact, content in files.items():
        local = folder / run_id / artifact
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(content)
        client.log_artifact(run_id, str(local), Path(artifact).parent.as_posix())
    client.set_terminated(run_id)
    return run_id


def test_review_for_a_person_and_promotion_on_other_data(tmp_path: Path) -> None:
    """The description and review state the measured metrics (headline first; settings and training curves apart,
    without deltas; the candidate's curves and previews with no champion); a champion evaluated on another
    datalist is flagged by the review and refuses the promotion unless --allow_different_data. The CLI prints
    one JSON object, a refused promotion included."""
    import mlflow

    from mlflow_fixtures import SCANNET, copy_bundle

    bundle = copy_bundle(SCANNET, tmp_path / "scannet")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    experiment = client.create_experiment(MODEL, artifact_location=tracking.default_artifact_location(uri))
    weights = {tracking.TAG_WEIGHTS_SHA: sha256_file(bundle / "models" / "model.pt")}
    train_run = _logged_run(client, experiment, {tracking.TAG_WORKFLOW: "train", **weights},
                            {"train_loss": [0.9, 0.6, 0.4]}, tmp_path)
    curves = {"froc": {"fp_per_slide": [0.0, 1.0, 8.0], "sensitivity": [0.0, 0.25, 0.5]},
              "roc": {"fpr": [0.0, 0.0, 1.0], "tpr": [0.0, 1.0, 1.0]}}
    first_eval = _logged_run(
        client, experiment, {tracking.TAG_WORKFLOW: "evaluate", tracking.TAG_DATALIST_SHA: "a" * 64, **weights},
        {"froc": 0.28, "slide_auc": 0.5, "details.froc.sensitivity.0.25": 0.1, "details.froc.n_slides": 2,
         "details.slide_auc.n_bootstrap": 50, "details.slide_auc.confidence": 0.95}, tmp_path,
        {"evaluation/curves.json": json.dumps(curves).encode(), "preview/tumour/t1.png": b"png-t",
         "preview/normal/n1.png": b"png-n"})
    assert registry.register(bundle, tracking_uri=uri)["run_id"] == train_run
    description = client.get_model_version(MODEL, "1").description
    for line in ("- froc: 0.2800\n- slide_auc: 0.5000\n", f"by evaluation run {first_eval} (runs:/{first_eval})",
                 f"datalist sha256 {'a' * 64}", "confidence 0.95, n_bootstrap 50, n_slides 2"):
        assert line in description, description
    assert "1.000" not in description  # the docs README's demo FROC and AUC

    alone = registry.review(MODEL, 1, tracking_uri=uri)  # no champion yet
    assert alone["champion"] is None and alone["same_data"] is None and alone["warnings"] == []
    assert [(r["metric"], r["candidate"], r["delta"], r["headline"]) for r in alone["rows"]] == [
        ("froc", 0.28, None, True), ("slide_auc", 0.5, None, True), ("details.froc.sensitivity.0.25", 0.1, None, False)]
    assert alone["settings"] == [{"setting": s, "champion": None, "candidate": v} for s, v in (
        ("details.froc.n_slides", 2), ("details.slide_auc.confidence", 0.95), ("details.slide_auc.n_bootstrap", 50))]
    assert alone["training"] == [{"metric": "train_loss", "steps": 3, "first": 0.9, "last": 0.4}]
    assert alone["plots"] == ["review/froc_overlay.png", "review/roc_overlay.png"]  # the candidate's own curves
    assert alone["previews"] == ["review/preview/normal/n1.png", "review/preview/tumour/t1.png"]
    assert set(alone["plots"] + alone["previews"]) <= _artifacts(client, alone["review_run_id"])
    markdown = alone["markdown"]
    assert markdown.index("## Headline metrics") < markdown.index("## Other measured values") < markdown.index(
        "## Evaluation settings") < markdown.index("## Training curves")
    assert "| froc | - | 0.2800 | - |" in markdown and "| details.slide_auc.n_bootstrap | - | 50 |" in markdown
    assert "| train_loss | 3 | 0.9 | 0.4 |" in markdown and "Warning" not in markdown
    assert registry.promote(MODEL, 1, gate="froc>=0.2", tracking_uri=uri)["promoted"] is True

    second_eval = _logged_run(
        client, experiment, {tracking.TAG_WORKFLOW: "evaluate", tracking.TAG_DATALIST_SHA: "b" * 64, **weights},
        {"froc": 0.35, "slide_auc": 0.75, "details.froc.n_slides": 3}, tmp_path)
    assert registry.register(bundle, tracking_uri=uri)["eval_run_id"] == second_eval
    cli = [PYTHON, "-m", "pathbundles", "registry", "--tracking_uri", uri]
    done = subprocess.run(cli + ["review", "--name", MODEL, "--candidate", "2", "--markdown",
                                 str(tmp_path / "review.md")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    reviewed = json.loads(done.stdout)  # the whole of stdout is one JSON object
    assert reviewed["same_data"] is False and "different datalists (sha256 bbbbbbbbbbbb vs aaaaaaaaaaaa)" in \
        reviewed["warnings"][0]
    froc = reviewed["rows"][0]
    assert froc["metric"] == "froc" and froc["delta"] == pytest.approx(0.07)
    markdown = (tmp_path / "review.md").read_text()
    assert markdown == reviewed["markdown"]
    assert markdown.index("> **Warning:** candidate and v1 (champion) were evaluated on different datalists") < \
        markdown.index("| froc | 0.2800 | 0.3500 | +0.0700 |")
    assert "| details.froc.n_slides | 2 | 3 |" in markdown  # a count: no delta

    done = subprocess.run(cli + ["promote", "--name", MODEL, "--candidate", "2", "--gate", "froc>=0.2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "error: refused to promote pathbundles-scannet v2" in done.stderr
    refusal = json.loads(done.stdout)
    assert refusal["promoted"] is False and [g["passed"] for g in refusal["gates"]] == [True]
    (reason,) = refusal["reasons"]
    assert "different datalists" in reason and "--allow_different_data" in reason
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    promoted = registry.promote(MODEL, 2, gate="froc>=0.2", allow_different_data=True, tracking_uri=uri)
    assert promoted["promoted"] is True and promoted["same_data"] is False
    assert "different datalists" in client.get_model_version(MODEL, "2").tags["promoted_on_different_data"]
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "2"
