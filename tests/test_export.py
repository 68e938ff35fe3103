"""Every bundle's network exports three ways from the commands its docs/README.md gives (TorchScript by
``ckpt_export`` in script and trace mode, ONNX by ``onnx_export --args_file configs/onnx_export.json``) with the
eager network's outputs, at two input sizes (two batch sizes where the network's input size is fixed), and each
bundle runs from an exported file (``configs/exported.json``) writing what the eager run writes.

The shipped weights are exported; the bundle runs use one tiny phantom slide or HPF per bundle.
"""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import bundle_helpers
from bundle_helpers import REPO, merged

BUNDLES = ("scannet", "spatial_lstm", "segmitos", "dmmn")
MODES = ("script", "trace", "onnx")
#: Per bundle: the trace shape of the docs' command (= the input_shape of configs/onnx_export.json) and a second
#: shape the exports must also take: other H, W (the FCNs, DMMN) or another batch (the spatial LSTM's fixed crops).
SHAPES = {
    "scannet": ((1, 3, 308, 308), (2, 3, 404, 372)),
    "spatial_lstm": ((1, 9, 3, 224, 224), (3, 9, 3, 224, 224)),
    "segmitos": ((1, 3, 500, 500), (2, 3, 333, 411)),
    "dmmn": ((1, 9, 256, 256), (2, 9, 512, 384)),
}
#: Per bundle: the phantom data set ``run`` reads and the overrides that keep the run small.
RUNS = {
    "scannet": ("metastasis", ["--lp", "8"]),
    "spatial_lstm": ("metastasis", ["--tile_px", "8", "--tta", "False"]),
    "segmitos": ("mitosis", []),
    "dmmn": ("multiclass", []),
}
SUFFIX = {"script": ".ts", "trace": ".trace.ts", "onnx": ".onnx"}


def run_bundle(*args: str) -> subprocess.CompletedProcess:
    """``python -m monai.bundle ARGS`` with one thread (a loaded 2-core machine; the timeout guards hangs only)."""
    return bundle_helpers.run_bundle(*args, timeout=900, OMP_NUM_THREADS="1")


def configs(bundle: str) -> Path:
    return REPO / "bundles" / bundle / "configs"


def export_command(bundle: str, mode: str, filepath: Path) -> list[str]:
    """The export command of the bundle's docs/README.md ("Export") for ``mode``."""
    c = configs(bundle)
    common = ["network_def", "--filepath", str(filepath), "--ckpt_file", str(c.parent / "models" / "model.pt"),
              "--meta_file", str(c / "metadata.json"), "--config_file", str(c / "inference.json")]
    if mode == "script":
        return ["ckpt_export", *common]
    if mode == "trace":
        return ["ckpt_export", *common, "--use_trace", "True", "--input_shape", str(list(SHAPES[bundle][0]))]
    return ["onnx_export", *common, "--args_file", str(c / "onnx_export.json")]


def eager_network(bundle: str) -> torch.nn.Module:
    """The bundle's network as inference.json builds it, with the shipped weights, in eval mode."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(configs(bundle) / "inference.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(configs(bundle).parent / "models" / "model.pt", map_location="cpu"))
    return net.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(bundle, mode)``: the file the documented command writes (each exported once per module)."""
    root = tmp_path_factory.mktemp("exported")
    done: dict[tuple[str, str], Path] = {}

    def export(bundle: str, mode: str) -> Path:
        if (bundle, mode) not in done:
            if mode == "onnx":
                pytest.importorskip("onnxscript", reason="onnx_export needs the export extra (onnx, onnxscript)")
            path = root / f"{bundle}{SUFFIX[mode]}"
            result = run_bundle(*export_command(bundle, mode, path))
            assert result.returncode == 0, result.stderr[-3000:]
            assert path.is_file()
            done[(bundle, mode)] = path
        return done[(bundle, mode)]

    return export


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bundle", BUNDLES)
def test_export_gives_the_eager_outputs_at_two_sizes(exported, bundle: str, mode: str) -> None:
    from pathbundles.exported import load_exported

    if mode == "onnx":
        pytest.importorskip("onnxruntime", reason="ONNX Runtime comes with the export extra")
    path = exported(bundle, mode)
    net, model = eager_network(bundle), load_exported(path)
    generator = torch.Generator().manual_seed(0)
    for shape in SHAPES[bundle]:
        x = torch.randn(*shape, generator=generator)
        with torch.no_grad():
            ref, out = net(x), model(x)
        assert out.shape == ref.shape and out.dtype == torch.float32
        # Float tolerance relative to the logit scale (the exporters reorder sums: ~1e-6 of it seen).
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    if mode == "onnx":
        import onnx

        graph = onnx.load(str(path)).graph
        dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
        dynamic = json.loads((configs(bundle) / "onnx_export.json").read_text())["converter_kwargs"]["dynamic_axes"]
        assert [i for i, d in enumerate(dims) if isinstance(d, str)] == dynamic["image"]
        assert [d for d in dims if isinstance(d, int)] == [s for i, s in enumerate(SHAPES[bundle][0])
                                                          if i not in dynamic["image"]]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> dict[str, Path]:
    """``dataset.json`` of one tiny phantom per kind: a 2048 px slide at 0.5 um/px, a 400 px HPF, a 1024 px
    multi-class slide."""
    from pathbundles.phantom import make_multiclass_dataset, make_phantom

    root = tmp_path_factory.mktemp("export-data")
    make_multiclass_dataset(root / "multiclass", n=1, seed=7, size_px=1024)
    return {"metastasis": make_phantom(root / "metastasis", kind="metastasis", n=1, seed=7, size_px=(2048, 2048)),
            "mitosis": make_phantom(root / "mitosis", kind="mitosis", n=1, seed=3, size_px=400),
            "multiclass": root / "multiclass" / "dataset.json"}


@pytest.fixture(scope="module")
def eager_runs(phantoms, tmp_path_factory):
    """``eager_runs(bundle)``: the output folder of the bundle's eager inference run (each run once per module)."""
    root = tmp_path_factory.mktemp("eager-runs")
    done: dict[str, Path] = {}

    def eager(bundle: str) -> Path:
        if bundle not in done:
            done[bundle] = run_inference(bundle, phantoms, root / bundle)
        return done[bundle]

    return eager


def run_inference(bundle: str, phantoms: dict[str, Path], out: Path, exported_model: Path | None = None) -> Path:
    """Run the bundle's inference (from ``exported_model`` by configs/exported.json when given) into ``out``."""
    kind, overrides = RUNS[bundle]
    config = str(configs(bundle) / "inference.json") if exported_model is None else \
        merged(configs(bundle), "inference.json", "exported.json")
    extra = [] if exported_model is None else ["--exported_model", str(exported_model)]
    result = run_bundle("run", "--config_file", config, "--data_source", str(phantoms[kind]), "--output_dir",
                        str(out), "--num_workers", "0", *overrides, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def same_numbers(a: object, b: object) -> bool:
    """JSON-like values equal, numbers to float tolerance (probabilities computed by another runtime)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_numbers(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_numbers(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)
    return a == b


def text_with_numbers(path: Path) -> list[object]:
    """A text file (ASAP XML) as its text between numbers and the numbers as floats, for :func:`same_numbers`: the
    default run rewrites the network for inference (BatchNorm folded, channels_last), so a score written with six
    digits may differ in the last one from the plain exported graph's."""
    parts = re.split(r"(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)", path.read_text(encoding="utf-8"))
    return [float(part) if k % 2 else part for k, part in enumerate(parts)]


def csv_cells(path: Path) -> list[list[object]]:
    def cell(text: str) -> object:
        try:
            return float(text)
        except ValueError:
            return text

    with open(path, newline="") as f:
        return [[cell(c) for c in row] for row in csv.reader(f)]


def image_arrays(path: Path) -> list[np.ndarray]:
    if path.suffix in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return [page.asarray() for page in tif.pages]
    from PIL import Image

    with Image.open(path) as im:
        return [np.asarray(im)]


def without_weights(value: object) -> object:
    """A table (rows of cells, header first) or JSON value without the run's weights record
    (:data:`pathbundles.weights.RECORD_FIELDS`): an exported model is another file than the checkpoint."""
    from pathbundles.weights import RECORD_FIELDS

    if isinstance(value, dict):
        return {k: without_weights(v) for k, v in value.items() if k not in RECORD_FIELDS}
    if isinstance(value, list) and value and isinstance(value[0], list) and any(c in RECORD_FIELDS for c in value[0]):
        keep = [i for i, c in enumerate(value[0]) if c not in RECORD_FIELDS]
        return [[row[i] for i in keep] for row in value]
    if isinstance(value, list):
        return [without_weights(v) for v in value]
    return value


def assert_same_outputs(eager: Path, other: Path) -> None:
    """The same files; tables, GeoJSON/JSON and ASAP XML to float tolerance, but for the weights they record
    (checked by the callers); maps, label maps and overlays equal at all but 0.1 % of their pixels (a probability
    within float error of a quantisation step or a class tie)."""
    # report.html is a view of the other files that also holds its date and folder: both runs write it.
    files = sorted(p.relative_to(eager) for p in eager.rglob("*") if p.is_file() and p.name != "report.html")
    assert files == sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file() and p.name != "report.html")
    assert (eager / "report.html").is_file() and (other / "report.html").is_file()
    assert files
    for rel in files:
        a, b = eager / rel, other / rel
        if rel.suffix in (".tif", ".tiff", ".png"):
            pages_a, pages_b = image_arrays(a), image_arrays(b)
            assert len(pages_a) == len(pages_b), rel
            for x, y in zip(pages_a, pages_b):
                assert x.shape == y.shape and x.dtype == y.dtype, rel
                assert np.mean(x != y) <= 1e-3, rel
        elif rel.suffix == ".csv":
            assert same_numbers(without_weights(csv_cells(a)), without_weights(csv_cells(b))), rel
        elif rel.suffix == ".xml":
            assert same_numbers(text_with_numbers(a), text_with_numbers(b)), rel
        elif rel.suffix in (".json", ".geojson"):
            assert same_numbers(without_weights(json.loads(a.read_text())),
                                without_weights(json.loads(b.read_text()))), rel
        else:
            assert a.read_bytes() == b.read_bytes(), rel


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["script", "onnx"])
@pytest.mark.parametrize("bundle", BUNDLES)
def test_bundle_runs_from_the_exported_model(exported, eager_runs, phantoms, tmp_path: Path, bundle: str,
                                             mode: str) -> None:
    if mode == "onnx":
        pytest.importorskip("onnxruntime", reason="ONNX Runtime comes with the export extra")
    eager = eager_runs(bundle)
    model = exported(bundle, mode)
    out = run_inference(bundle, phantoms, tmp_path / "out", exported_model=model)
    assert_same_outputs(eager, out)
    # The run's table names the exported file; a TorchScript export of the demo weights is demo weights, an ONNX
    # one cannot be compared ("unknown", with a warning that says so).
    from pathbundles.bundle_runner import sha256_file
    from pathbundles.weights import DEMO_WARNING

    (table,) = [p for p in out.glob("*.csv")]
    rows = list(csv.DictReader(open(table, newline="")))
    assert rows and {(r["weights_sha256"], r["demo_weights"]) for r in rows} == {
        (sha256_file(model), "true" if mode == "script" else "unknown")}
    assert all(DEMO_WARNING in r["weights_warning"] for r in rows)
    # Not vacuous: the eager run wrote a map or label image with more than one value.
    images = [p for p in eager.rglob("*") if p.suffix in (".tif", ".png") and p.parent.name in ("maps", "labels")]
    assert images and any(len(np.unique(image_arrays(p)[0])) > 1 for p in images)


@pytest.mark.slow
def test_a_missing_exported_model_ends_the_run_in_one_line(phantoms, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.onnx"
    result = run_bundle("run", "--config_file", merged(configs("segmitos"), "inference.json", "exported.json"),
                        "--data_source", str(phantoms["mitosis"]), "--output_dir", str(tmp_path / "out"),
                        "--exported_model", str(missing))
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"pathbundles: error: {missing}: exported ONNX model does not exist" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------- in-process, tiny networks


@pytest.mark.parametrize("variant", ["S2", "MS", "M2S", "M3"])
def test_every_dmmn_variant_scripts_and_traces(variant: str) -> None:
    from pathbundles.dmmn import DMMN

    torch.manual_seed(0)
    net = DMMN(variant, num_classes=6, width=1 / 16, batch_norm=True).eval()
    x = torch.randn(2, 9, 64, 64, generator=torch.Generator().manual_seed(1))  # any multiple of 16 px
    scripted = torch.jit.script(net)
    with torch.no_grad():
        ref = net(x)
        for exported in (scripted, torch.jit.trace(net, x[:1])):
            torch.testing.assert_close(exported(x), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
        # The three-view call scripts too.
        torch.testing.assert_close(scripted(x[:, :3], x[:, 3:6], x[:, 6:]), ref)


def test_traced_spatial_lstm_gives_the_eager_lattice_map(tmp_path: Path) -> None:
    """A traced export has forward only: lattice_map runs it grid by grid and gets the eager (lattice) map."""
    from pathbundles.exported import TorchScriptNetwork
    from pathbundles.spatial_lstm import LatticeGeometry, SpatialLSTMNet, lattice_map

    torch.manual_seed(0)
    geometry = LatticeGeometry(tile_px=2, grid_size=3, patch_px=32, crop_px=24, stride_px=16)
    net = SpatialLSTMNet(crop_px=24, hidden_size=8, widen_factor=1 / 32, feature_norm=True).eval()
    generator = torch.Generator().manual_seed(2)
    region = torch.randn(2, 3, geometry.read_px, geometry.read_px, generator=generator)
    path = tmp_path / "traced.ts"
    torch.jit.trace(net, torch.randn(1, 9, 3, 24, 24, generator=generator)).save(str(path))
    model = TorchScriptNetwork(path).eval()
    assert not hasattr(model, "patch_features")
    with torch.no_grad():
        eager_map = lattice_map(net, region, geometry)
        torch.testing.assert_close(lattice_map(model, region, geometry), eager_map, rtol=0, atol=1e-5)
        torch.testing.assert_close(lattice_map(model, region, geometry, tta=True),
                                   lattice_map(net, region, geometry, tta=True), rtol=0, atol=1e-5)
    assert eager_map.shape == (2, 2, 2) and float(eager_map.std()) > 0


def test_unreadable_exported_models_are_named(tmp_path: Path) -> None:
    from pathbundles.errors import InputError
    from pathbundles.exported import ExportedWeights, load_exported

    with pytest.raises(InputError, match="exported TorchScript model does not exist"):
        load_exported(tmp_path / "model.ts")
    garbage = tmp_path / "garbage.ts"
    garbage.write_bytes(b"not a model")
    with pytest.raises(InputError, match=f"{garbage}: not a readable TorchScript model"):
        load_exported(garbage)
    pytest.importorskip("onnxruntime", reason="ONNX Runtime comes with the export extra")
    bad_onnx = tmp_path / "garbage.onnx"
    bad_onnx.write_bytes(b"not a model")
    with pytest.raises(InputError, match=f"{bad_onnx}: not a model ONNX Runtime can run"):
        load_exported(bad_onnx)
    assert ExportedWeights(bad_onnx).path == bad_onnx
