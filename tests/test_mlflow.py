"""MLflow tracking and the model-registry workflow, against a real ``mlflow server`` and a plain SQLite store.

The end-to-end tests train the tiny bundle of ``mlflow_fixtures`` (two epochs on eight 4x4 patches) with
``--tracking mlflow/tracking.json``, evaluate it, register it, review and promote it (one refused gate), load the
champion as a pyfunc and predict on a phantom slide, export it and run the exported bundle.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlflow_fixtures import (copy_bundle, make_tiny_bundle, mlflow_server_url, phantom_slide,  # noqa: F401
                             run_bundle, sqlite_tracking_uri)
from pathbundles import registry
from pathbundles.tracking import flatten_config, flatten_metrics, sha256_datalist, sha256_file


def test_flatten_config_respects_mlflow_limits() -> None:
    flat = flatten_config({"a": {"b": [1, {"c": "x" * 7000}]}, "d#e": None, "f": True})
    assert flat["a.b.0"] == "1"
    assert len(flat["a.b.1.c"]) == 6000 and flat["a.b.1.c"].endswith("...[cut]")
    assert flat["d_e"] == "null" and flat["f"] == "true"


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


def _review_cycle(tracking_uri: str, tmp_path: Path, slide: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    # the pyfunc runs the bundle in a subprocess, whose configs call functions of mlflow_fixtures
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri exports it
    env = {"PATHBUNDLES_TRACKING_URI": tracking_uri}
    bundle = make_tiny_bundle(tmp_path / "tiny")
    run_bundle(bundle / "configs" / "train.json", env=env)
    run_bundle(bundle / "configs" / "evaluate.json", env=env)
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("pathbundles-tiny")
    runs = {r.data.tags["pathbundles.workflow"]: r for r in client.search_runs([experiment.experiment_id])}
    train, evaluation = runs["train"], runs["evaluate"]
    weights_sha = sha256_file(bundle / "models" / "model.pt")
    assert train.info.status == "FINISHED" and train.data.tags["pathbundles.weights_sha256"] == weights_sha
    assert train.data.tags["pathbundles.bundle_version"] == "0.0.1"
    assert train.data.tags["pathbundles.datalist_sha256.train_datalist"] == sha256_datalist(
        json.loads((bundle / "configs" / "train.json").read_text())["train_datalist"])
    assert {"train_loss", "lr_group_0", "val_auc"} <= set(train.data.metrics)
    assert [m.step for m in client.get_metric_history(train.info.run_id, "val_auc")] == [1, 2]
    assert train.data.params["learning_rate"] == "0.05"
    assert {a.path for a in client.list_artifacts(train.info.run_id, "config")} >= {"config/metadata.json"}
    assert evaluation.data.metrics["froc"] == 0.6
    assert {a.path.split("/")[-1] for a in client.list_artifacts(evaluation.info.run_id, "evaluation")} >= {
        "metrics.json", "curves.json", "froc.png", "roc.png"}

    first = registry.register(bundle, tracking_uri=tracking_uri)
    assert first["run_id"] == train.info.run_id and first["eval_run_id"] == evaluation.info.run_id
    registry.promote("pathbundles-tiny", first["version"], gate="froc>=champion-0.01", who="tester",
                     why="first model", tracking_uri=tracking_uri)

    # a second model: same weights, evaluated lower: the review shows the drop and the gate refuses it
    run_bundle(bundle / "configs" / "evaluate.json", "--froc", "0.5", env=env)
    second = registry.register(bundle, tracking_uri=tracking_uri)
    assert second["version"] == "2"
    reviewed = registry.review("pathbundles-tiny", 2, tracking_uri=tracking_uri)
    froc_row = next(r for r in reviewed["rows"] if r["metric"] == "froc")
    assert froc_row["champion"] == 0.6 and froc_row["candidate"] == 0.5
    assert set(reviewed["plots"]) == {"review/froc_overlay.png", "review/roc_overlay.png"}
    with pytest.raises(registry.PromotionRefused, match="froc = 0.5000, needs >= 0.5900"):
        registry.promote("pathbundles-tiny", 2, gate=["froc>=champion-0.01"], tracking_uri=tracking_uri)
    champion = client.get_model_version_by_alias("pathbundles-tiny", "champion")
    assert str(champion.version) == "1" and champion.tags["promoted_by"] == "tester"
    assert json.loads(champion.tags["promotion_gates"])[0]["passed"]
    with pytest.raises(registry.RegistryError, match="no version 9"):
        registry.review("pathbundles-tiny", 9, tracking_uri=tracking_uri)
    with pytest.raises(registry.RegistryError, match="no registered model 'nope'"):
        registry.promote("nope", 1, tracking_uri=tracking_uri)

    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model("models:/pathbundles-tiny@champion")
    import pandas as pd

    predicted = model.predict(pd.DataFrame({"image": [str(slide)]}), params={"output_dir": str(tmp_path / "pred")})
    assert list(predicted["name"]) == [slide.stem] and 0.0 <= predicted["score"][0] <= 1.0
    assert len(json.loads(predicted["detections"][0])) == predicted["n_detections"][0] == 1
    assert Path(predicted["detections_csv"][0]).is_file()

    exported = registry.export("pathbundles-tiny", tmp_path / "exported", alias="champion",
                               tracking_uri=tracking_uri)
    out = Path(exported["out"])
    for relative in ("configs/inference.json", "configs/train.json", "configs/metadata.json", "models/model.pt"):
        assert sha256_file(out / relative) == sha256_file(bundle / relative), relative
    assert not (out / "eval").exists()
    with pytest.raises(registry.RegistryError, match="not an empty folder"):
        registry.export("pathbundles-tiny", out, tracking_uri=tracking_uri)
    run_bundle(out / "configs" / "inference.json", "--data_source", str(slide.parent), tracking=False)
    assert (out / "eval" / "slide_scores.csv").is_file()


@pytest.mark.slow
def test_registry_cycle_against_server(mlflow_server_url: str, tmp_path: Path, phantom_slide: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _review_cycle(mlflow_server_url, tmp_path, phantom_slide, monkeypatch)


@pytest.mark.slow
def test_registry_cycle_on_sqlite(sqlite_tracking_uri: str, tmp_path: Path, phantom_slide: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _review_cycle(sqlite_tracking_uri, tmp_path, phantom_slide, monkeypatch)
