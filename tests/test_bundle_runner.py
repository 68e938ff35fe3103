"""Running a bundle's inference workflow from Python (``pathbundles.bundle_runner``): records, hashes, errors."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import pytest

from bundle_helpers import REPO
from pathbundles.bundle_runner import bundle_info, config_paths, run_inference

SEGMITOS = REPO / "bundles" / "segmitos"
SCANNET = REPO / "bundles" / "scannet"


def hostile_items(tmp_path: Path) -> list[dict]:
    """Datalist items whose values are MONAI config syntax: expressions (in ``name``, ``label`` and another field)
    that would set an environment variable or write a file, a reference, a macro and a component (``_target_``)
    that would create a folder. Data, never config: each must arrive as it is and nothing may run."""
    return [{"image": str(tmp_path / "slides" / "s.tif"),
             "name": "$__import__('os').environ.setdefault('PATHBUNDLES_PWNED', 'name') and 'n'",
             "label": "$__import__('os').environ.setdefault('PATHBUNDLES_PWNED', 'label')",
             "note": f"$__import__('pathlib').Path({str(tmp_path / 'pwned')!r}).touch()",
             "site": "@output_dir", "copy": "%configs/inference.json#run",
             "extra": {"_target_": "os.makedirs", "name": str(tmp_path / "made")}}]


def assert_nothing_ran(tmp_path: Path) -> None:
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "made").exists()
    assert "PATHBUNDLES_PWNED" not in os.environ


class EchoWriter:
    """The writer of a stand-in bundle: one record per datalist item, carrying the item as the workflow got it."""

    def __init__(self, datalist: list[dict]) -> None:
        self.datalist = datalist

    def ensure_completed(self) -> None:
        pass

    def results(self) -> list[dict]:
        return [{"name": "x", "score": 0.0, "n_detections": 0, "outputs": {}, "item": item} for item in self.datalist]


def test_datalist_values_reach_the_workflow_as_data_never_as_config(tmp_path: Path) -> None:
    """run_inference (the cohort's and MONAI Deploy's way into a bundle) put the datalist into the config, so a
    '$...' string in any field was evaluated as Python."""
    configs = tmp_path / "echo" / "configs"
    configs.mkdir(parents=True)
    (configs / "metadata.json").write_text(json.dumps({"name": "echo", "version": "0.0.1"}))
    (configs / "inference.json").write_text(json.dumps({
        "imports": ["$import pathbundles"], "datalist": [], "output_dir": "unused",
        "evaluator": {"_target_": "ignite.engine.Engine", "process_function": "$lambda engine, batch: batch"},
        "writer": {"_target_": "test_bundle_runner.EchoWriter", "datalist": "@datalist"},
        "run": ["$@evaluator.run(@datalist, max_epochs=1)"]}))
    items = hostile_items(tmp_path)
    records = run_inference(tmp_path / "echo", items, tmp_path / "out")
    assert [r["item"] for r in records] == items
    assert_nothing_ran(tmp_path)


def test_bundle_info_hashes_weights_and_config(tmp_path: Path) -> None:
    info = bundle_info(SEGMITOS)
    weights = SEGMITOS / "models" / "model.pt"
    assert info["bundle"] == "segmitos" and info["version"]
    assert info["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    # Same files, same overrides: same hash; another threshold is another configuration.
    assert bundle_info(SEGMITOS)["config_sha256"] == info["config_sha256"]
    assert bundle_info(SEGMITOS, overrides={"min_mean_score": 0.9})["config_sha256"] != info["config_sha256"]
    assert bundle_info(SEGMITOS, ("inference.json", "evaluate.json"))["config_sha256"] != info["config_sha256"]
    other = tmp_path / "w.pt"
    other.write_bytes(b"not the shipped weights")
    assert bundle_info(SEGMITOS, overrides={"ckpt_path": str(other)})["weights_sha256"] == \
        hashlib.sha256(b"not the shipped weights").hexdigest()


def test_missing_configs_and_bundles_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json"):
        config_paths(SEGMITOS, ("inference.json", "nope.json"))
    with pytest.raises(FileNotFoundError, match="not a bundle"):
        bundle_info(tmp_path)


@pytest.mark.slow
def test_run_inference_returns_the_writers_records(tmp_path: Path) -> None:
    from pathbundles.bundle import demo_datalist

    items = demo_datalist("mitosis", "test", first=2)
    records = run_inference(SEGMITOS, items, tmp_path / "out", overrides={"num_workers": 0})
    rows = list(csv.DictReader(open(tmp_path / "out" / "hpf_counts.csv")))
    assert [r["name"] for r in records] == [r["name"] for r in rows] == ["phantom_hpf_000", "phantom_hpf_001"]
    # segmitos' shipped weights are demo weights: every row says so, after the table's own columns.
    from pathbundles.weights import DEMO_WARNING, RECORD_FIELDS

    demo_sha = json.loads((SEGMITOS / "configs" / "metadata.json").read_text())["trained_with"]["models/model.pt"][
        "sha256"]
    assert list(rows[0]) == ["name", "n_detections", "max_score", *RECORD_FIELDS]
    assert {(r["weights_sha256"], r["demo_weights"], r["weights_warning"]) for r in rows} == {
        (demo_sha, "true", DEMO_WARNING)}
    for record, row in zip(records, rows):
        assert record["n_detections"] == int(row["n_detections"])
        assert record["score"] == pytest.approx(float(row["max_score"]), abs=1e-6)
        assert set(record["outputs"]) == {"detections", "geojson", "asap_xml", "map", "overlay"}
        assert all(Path(p).is_file() and Path(p).parent.parent == tmp_path / "out"
                   for p in record["outputs"].values())


@pytest.mark.slow
def test_config_syntax_in_a_datalist_reaches_the_outputs_as_plain_text(tmp_path: Path) -> None:
    from pathbundles.phantom import make_phantom

    dataset = make_phantom(tmp_path / "slides", kind="metastasis", n=1, seed=7, size_px=(1024, 1024))
    (item,) = hostile_items(tmp_path)
    item["image"] = str(tmp_path / "slides" / json.loads(dataset.read_text())["items"][0]["image"])
    (record,) = run_inference(SCANNET, [item], tmp_path / "out", overrides={"lp": 8, "num_workers": 0})
    assert_nothing_ran(tmp_path)
    assert record["name"] == item["name"]
    assert Path(record["outputs"]["map"]) == tmp_path / "out" / "maps" / f"{item['name']}.tif"
    assert all(Path(p).is_file() for p in record["outputs"].values())
    rows = list(csv.DictReader(open(tmp_path / "out" / "slide_scores.csv")))
    assert [r["name"] for r in rows] == [item["name"]]
