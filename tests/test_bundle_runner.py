"""Running a bundle's inference workflow from Python (``pathbundles.bundle_runner``): records, hashes, errors."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest

from bundle_helpers import REPO
from pathbundles.bundle_runner import bundle_info, config_paths, run_inference

SEGMITOS = REPO / "bundles" / "segmitos"


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
    for record, row in zip(records, rows):
        assert record["n_detections"] == int(row["n_detections"])
        assert record["score"] == pytest.approx(float(row["max_score"]), abs=1e-6)
        assert set(record["outputs"]) == {"detections", "map", "overlay"}
        assert all(Path(p).is_file() and Path(p).parent.parent == tmp_path / "out"
                   for p in record["outputs"].values())
