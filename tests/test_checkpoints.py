"""Checkpoints carry the settings they were trained with; the loader refuses weights trained with other settings,
missing, truncated or foreign files, naming the file; the shipped weights are described by their metadata.json."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from pathbundles.checkpoints import CheckpointLoader, TrainingSettings, read_checkpoint
from pathbundles.errors import InputError
from pathbundles.scannet import ScanNet

REPO = Path(__file__).resolve().parents[1]
SCANNET = REPO / "bundles" / "scannet"
SETTINGS = {"bundle": "scannet", "scan_mpp": 1.0, "width": 0.125, "batch_norm": True}


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
    caplog.set_level(logging.WARNING, logger="pathbundles.checkpoints")
    CheckpointLoader(ckpt, {"model": net}, expected=SETTINGS, metadata_file=meta)()
    assert not caplog.records
    net.load_state_dict(torch.load(ckpt, map_location="cpu"))  # the same weights as a plain load


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
