"""Checkpoints carry the settings they were trained with; the loader refuses weights trained with other settings,
missing, truncated or foreign files, naming the file; the shipped weights are described by their metadata.json."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch

from pathbundles.checkpoints import CheckpointLoader, TrainingSettings, read_checkpoint
from pathbundles.errors import InputError
from pathbundles.scannet import ScanNet
from pathbundles.weights import DEMO_WARNING, NOT_MEASURED, WeightsIdentity, identify, identify_exported

REPO = Path(__file__).resolve().parents[1]
SCANNET = REPO / "bundles" / "scannet"
SETTINGS = {"bundle": "scannet", "scan_mpp": 1.0, "width": 0.125, "batch_norm": True}
DEMO_SHA256 = json.loads((SCANNET / "configs" / "metadata.json").read_text())["trained_with"]["models/model.pt"][
    "sha256"]


def _save_like_train_json(folder: Path, network: torch.nn.Module, settings: dict) -> Path:
    """What the bundles' train.json writes: MONAI's CheckpointSaver with the network and its TrainingSettings."""
    from ignite.engine import Engine
    from monai.handlers import CheckpointSaver

    engine = Engine(lambda engine, batch: None)
    CheckpointSaver(str(folder), {"model": network, "training": TrainingSettings(settings)}, save_final=True,
                    final_filename="model.pt").attach(engine)
    engine.run([0], max_epochs=1)
    return folder / "model.pt"


def test_train_json_checkpoints_carry_their_settings(tmp_path: Path) -> None:
    net = ScanNet(width=0.125, batch_norm=True)
    path = _save_like_train_json(tmp_path, net, {**SETTINGS, "scan_mpp": 0.5})
    checkpoint = read_checkpoint(path)
    assert set(checkpoint) == {"model", "training"}
    assert checkpoint["training"] == {**SETTINGS, "scan_mpp": 0.5}

    other = ScanNet(width=0.125, batch_norm=True)
    with pytest.raises(InputError, match=rf"^{path}: weights trained with scan_mpp = 0\.5 \(by the checkpoint\), but "
                                         r"this run has scan_mpp = 8\.0; set scan_mpp to 0\.5"):
        CheckpointLoader(path, {"model": other}, expected={**SETTINGS, "scan_mpp": 8.0})
    loader = CheckpointLoader(path, {"model": other}, expected={**SETTINGS, "scan_mpp": 0.5000001})
    loader()
    for key, value in net.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value)


def test_shipped_weights_are_checked_through_metadata(caplog) -> None:
    """bundles/*/models/*.pt predate checkpoints with settings: metadata.json describes them by sha256."""
    ckpt, meta = SCANNET / "models" / "model.pt", SCANNET / "configs" / "metadata.json"
    net = ScanNet(width=0.125, batch_norm=True)
    with pytest.raises(InputError, match=rf"^{ckpt}: weights trained with scan_mpp = 1\.0 \(by {meta}\), but this "
                                         r"run has scan_mpp = 8"):
        CheckpointLoader(ckpt, {"model": net}, expected={**SETTINGS, "scan_mpp": 8}, metadata_file=meta)
    caplog.set_level(logging.WARNING)
    loader = CheckpointLoader(ckpt, {"model": net}, expected=SETTINGS, metadata_file=meta)
    loader()
    # Nothing left unchecked; the one warning is that these are the demo weights, logged before any slide is read.
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("pathbundles.weights", f"{DEMO_WARNING} (start of the run; weights {ckpt}, sha256 {DEMO_SHA256[:12]})")]
    assert loader.weights.record() == {"weights_sha256": DEMO_SHA256, "demo_weights": True,
                                       "weights_warning": DEMO_WARNING}
    net.load_state_dict(torch.load(ckpt, map_location="cpu"))  # the same weights as a plain load


def test_demo_weights_are_told_by_their_hash_not_their_place(tmp_path: Path) -> None:
    """A copy of the demo file anywhere is demo weights (with the metadata's eval_metrics); the same file with one
    byte changed, or other weights at the bundle's models/model.pt (a retraining), is not, and has no measured
    performance."""
    meta = SCANNET / "configs" / "metadata.json"
    metadata = json.loads(meta.read_text())
    demo_bytes = (SCANNET / "models" / "model.pt").read_bytes()
    copy = tmp_path / "elsewhere" / "renamed.pt"
    copy.parent.mkdir()
    copy.write_bytes(demo_bytes)
    assert identify(copy, meta) == WeightsIdentity(str(copy), DEMO_SHA256, True, metadata["eval_metrics"])
    assert identify(copy, meta).csv_values() == [DEMO_SHA256, "true", DEMO_WARNING]

    changed = tmp_path / "changed.pt"
    changed.write_bytes(demo_bytes[:-1] + bytes([demo_bytes[-1] ^ 1]))
    digest = hashlib.sha256(changed.read_bytes()).hexdigest()
    assert identify(changed, meta) == WeightsIdentity(str(changed), digest, False, NOT_MEASURED)
    assert identify(changed, meta).record() == {"weights_sha256": digest, "demo_weights": False,
                                                "weights_warning": None}

    bundle = tmp_path / "bundle"  # a retrained bundle: the same metadata.json, other weights at models/model.pt
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "metadata.json").write_text(meta.read_text())
    retrained = bundle / "models" / "model.pt"
    _save_like_train_json(retrained.parent, ScanNet(width=0.125, batch_norm=True), SETTINGS)
    identity = identify(retrained, bundle / "configs" / "metadata.json")
    assert (identity.demo, identity.eval_metrics, identity.warning) == (False, NOT_MEASURED, None)
    assert identity.sha256 == hashlib.sha256(retrained.read_bytes()).hexdigest() != DEMO_SHA256


def test_exported_demo_weights_are_demo_weights(tmp_path: Path) -> None:
    """A TorchScript export of the demo weights is demo weights, one of other weights is not; an ONNX file cannot
    be compared and says that it may be."""
    from pathbundles.exported import ExportedWeights, load_exported

    meta = SCANNET / "configs" / "metadata.json"
    net = ScanNet(width=0.125, batch_norm=True).eval()
    torch.jit.script(net).save(str(tmp_path / "other.ts"))
    net.load_state_dict(torch.load(SCANNET / "models" / "model.pt", map_location="cpu"))
    torch.jit.script(net).save(str(tmp_path / "demo.ts"))
    demo = ExportedWeights(tmp_path / "demo.ts", load_exported(tmp_path / "demo.ts"), meta).weights
    assert (demo.demo, demo.warning, demo.sha256) == (True, DEMO_WARNING,
                                                      hashlib.sha256((tmp_path / "demo.ts").read_bytes()).hexdigest())
    assert identify_exported(tmp_path / "other.ts", meta).demo is False  # loaded here when not given
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "foreign.ts"))  # other tensor names: not comparable
    assert identify_exported(tmp_path / "foreign.ts", meta).demo is None
    (tmp_path / "model.onnx").write_bytes(b"not compared")
    onnx = identify_exported(tmp_path / "model.onnx", meta)
    assert onnx.demo is None and onnx.csv_values()[1] == "unknown"
    assert onnx.warning == f"weights {tmp_path / 'model.onnx'} could not be compared with the demo weights: they may " \
                           f"be {DEMO_WARNING}"


def test_a_checkpoint_without_settings_loads_with_a_warning(tmp_path: Path, caplog) -> None:
    net = ScanNet(width=0.125, batch_norm=True)
    plain = tmp_path / "old.pt"
    torch.save(net.state_dict(), plain)
    caplog.set_level(logging.WARNING, logger="pathbundles.checkpoints")
    CheckpointLoader(plain, {"model": net}, expected=SETTINGS,
                     metadata_file=SCANNET / "configs" / "metadata.json")()
    assert [r.getMessage() for r in caplog.records] == [
        f"{plain}: the checkpoint records no training settings and is not a checkpoint the bundle's metadata.json "
        "describes: bundle, scan_mpp, width, batch_norm not checked against this run"]


def test_missing_truncated_and_foreign_checkpoints_name_the_file(tmp_path: Path) -> None:
    net = ScanNet(width=0.125, batch_norm=True)
    with pytest.raises(InputError, match=rf"^{tmp_path / 'absent.pt'}: checkpoint does not exist$"):
        CheckpointLoader(tmp_path / "absent.pt", {"model": net})
    data = (SCANNET / "models" / "model.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=rf"^{cut}: not a readable PyTorch checkpoint \({len(data) // 2} bytes; "
                                         r"truncated, or not a checkpoint"):
        CheckpointLoader(cut, {"model": net})
    dmmn = REPO / "bundles" / "dmmn" / "models" / "model.pt"
    with pytest.raises(InputError, match=rf"^{dmmn}: does not fit this bundle's ScanNet: \d+ of the network's \d+ "
                                         r"weights are not in the file .*; is it another bundle's checkpoint\?$"):
        CheckpointLoader(dmmn, {"model": net}, expected=SETTINGS, metadata_file=SCANNET / "configs" / "metadata.json")
    wider = _save_like_train_json(tmp_path, ScanNet(width=0.25, batch_norm=True),
                                  {"bundle": "dmmn", "width": 0.25})
    with pytest.raises(InputError, match=rf"^{wider}: holds weights of the 'dmmn' bundle \(by the checkpoint\), not "
                                         r"of 'scannet'$"):
        CheckpointLoader(wider, {"model": net}, expected=SETTINGS)
    with pytest.raises(InputError, match=r"differ in shape \(e\.g\. '.*': \(16, 3, 3, 3\) in the file, \(8, 3, 3, 3\) "
                                         r"in the network: another width\?\)"):
        CheckpointLoader(wider, {"model": net})
