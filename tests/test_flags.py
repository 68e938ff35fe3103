"""On/off settings: ``--tta false`` reaches a component as the string 'false' (python-fire passes it so, and MONAI's
config parser keeps it), which ``bool()`` takes for True. Every bool a bundle config can set goes through
:func:`pathbundles.checks.flag`."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from pathbundles.checks import flag
from pathbundles.errors import SettingError

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "common" / "pathbundles"


@pytest.mark.parametrize("text,expected", [
    ("false", False), ("False", False), ("FALSE", False), ("no", False), ("No", False), ("0", False),
    (" false ", False), ("true", True), ("True", True), ("YES", True), ("1", True), (True, True), (False, False), (1, True), (0, False)])
def test_flag_parses_command_line_spellings(text, expected) -> None:
    assert flag(text, "tta") is expected


@pytest.mark.parametrize("value", ["maybe", "", "off", "2", 2, -1, 0.5, None, "flase"])
def test_flag_refuses_anything_else_naming_the_setting(value) -> None:
    with pytest.raises(SettingError, match=r"^tta must be true or false \(also yes/no, 1/0\), got "):
        flag(value, "tta")


def _targets() -> list[str]:
    found = set()
    for config in (ROOT / "bundles").glob("*/configs/*.json"):
        found |= set(re.findall(r'"_target_":\s*"(pathbundles\.[\w.]+)"', config.read_text()))
    return sorted(found)


def _definition(target: str) -> ast.FunctionDef:
    module, name = target.rsplit(".", 1)
    tree = ast.parse((PACKAGE.parent / (module.replace(".", "/") + ".py")).read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
        if isinstance(node, ast.ClassDef) and node.name == name:
            return next((f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"),
                        ast.parse("def __init__(self): pass").body[0])
    raise AssertionError(f"{target} not found")


def test_every_bool_a_bundle_config_can_set_is_parsed() -> None:
    targets = _targets()
    assert "pathbundles.spatial_lstm.SpatialLSTMInferer" in targets and len(targets) > 30
    unparsed = []
    for target in targets:
        function = _definition(target)
        body = ast.unparse(function)
        args = function.args.args + function.args.kwonlyargs
        for arg in args:
            if arg.annotation is not None and re.search(r"\bbool\b", ast.unparse(arg.annotation)):
                if not re.search(rf"\bflag\({arg.arg}\b", body):
                    unparsed.append(f"{target}({arg.arg})")
    assert unparsed == []


def test_components_parse_false_strings() -> None:
    import torch

    from pathbundles.checkpoints import _same
    from pathbundles.dmmn import DMMN
    from pathbundles.inferers import AutocastInferer
    from pathbundles.scannet import ScanNet
    from pathbundles.segmitos import SegMitosFCN
    from pathbundles.spatial_lstm import SpatialLSTMInferer, SpatialLSTMNet

    assert SpatialLSTMInferer(tile_px=2, tta="false").tta is False
    assert SpatialLSTMInferer(tile_px=2, tta="TRUE").tta is True
    with pytest.raises(SettingError, match="tta must be true or false.*'ture'"):
        SpatialLSTMInferer(tile_px=2, tta="ture")
    assert AutocastInferer(enabled="no").enabled is False

    def batch_norms(net: torch.nn.Module) -> int:
        return sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())

    assert batch_norms(ScanNet(width=0.0625, batch_norm="false")) == 0
    assert batch_norms(ScanNet(width=0.0625, batch_norm="true")) == 13  # one per VGG16 convolution
    assert batch_norms(SegMitosFCN(width=0.0625, batch_norm="0")) == 0
    assert batch_norms(SegMitosFCN(width=0.0625, batch_norm="yes")) == 13
    assert batch_norms(DMMN(width=0.125, batch_norm="False")) == 0
    assert batch_norms(DMMN(width=0.125, batch_norm="True")) > 0
    net = SpatialLSTMNet(widen_factor=0.125, hidden_size=8, use_lstm="false", feature_norm="true")
    assert net.lstm is None and net.classifier.in_features == 64
    net = SpatialLSTMNet(widen_factor=0.125, hidden_size=8, use_lstm="true", bidirectional="no")
    assert net.lstm is not None and not net.lstm.bidirectional and net.classifier.in_features == 8
    with pytest.raises(SettingError, match="use_lstm must be true or false"):
        SpatialLSTMNet(widen_factor=0.125, use_lstm="none")
    # The weights' recorded settings compare with a run's command-line spelling.
    assert _same(True, "true") and _same(False, "no") and not _same(True, "false") and not _same(True, "maybe")


def test_bundle_command_line_false_turns_tta_off(tmp_path: Path) -> None:
    """``python -m monai.bundle run ... --tta false`` (python-fire passes the string) and a misspelling."""
    import subprocess
    import sys

    bundle = ROOT / "bundles" / "spatial_lstm"

    def probe(value: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "monai.bundle", "run", "probe", "--config_file",
             str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle),
             "--probe", "$print('tta =', @network_inferer.tta)", "--tta", value],
            capture_output=True, text=True, timeout=300, cwd=tmp_path)

    run = probe("false")
    assert run.returncode == 0, run.stderr
    assert "tta = False" in run.stdout
    run = probe("flase")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        "pathbundles: error: tta must be true or false (also yes/no, 1/0), got 'flase'")
