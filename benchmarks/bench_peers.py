"""Bundles' shipped networks through TIAToolbox's engines and through this project's pipelines, side by side.

Issue #22 ("performance against real peers"). ``--bundles`` (default ``scannet,dmmn``) picks what runs; each bundle
has its own section in the results file (``bundles.<name>``, with its own date, command, machine and load), and the
sections of bundles not run are kept as they are (``--fresh`` drops them).

ScanNet. One network (``bundles/scannet/models/model.pt``, loaded as
bench_scannet.py's ``_load_net`` does), one slide and one set of positions go through two pipelines, each in its own
fresh subprocess with 2 torch threads (see benchmarks/README.md for the numbers and the machine):

(a) TIAToolbox 2.1.3, ``PatchPredictor`` in WSI mode (``patch_mode=False``): every 244 px patch at the scan
    resolution 1.0 um/px, stride 32 px there (``IOPatchPredictorConfig``, input resolution in mpp units), read by
    TIAToolbox's own WSIReader, in batches of ``--patch-batch``, output written by the engine (zarr). TIAToolbox does
    not install next to the project's torch 2.13 and MONAI 1.6, so it runs in its own virtual environment
    (``--peers-python``). The network crosses over as TorchScript (``torch.jit.trace`` of the eval-mode network,
    checked against it before use), loaded there with ``torch.jit.load`` inside a ``ModelABC``: ``preproc`` is the
    bundle's ``ScaleIntensityRange`` 0..255 -> -1..1 (same float32 operations), ``infer_batch`` the network plus the
    softmax over the two classes (the bundle's ``ScanNetInferer``: channel 1 is the tumour probability).
(b) Ours, what bench_scannet.py calls ours: ``SlideROIDataset`` over tissue ROIs + ``predict_maps`` +
    ``ScanNetInferer(lp=24, alpha=1)`` (dense FCN scanning, one 980 px ROI per forward pass), run by
    bench_scannet.py's own worker, unchanged.

Positions: the stride-32 grid at the scan resolution anchored at the slide's origin is the same in both (our map
index k is the patch whose corner is at scan pixel 32 k, and TIAToolbox's WSI grid starts at 0 with the stride),
and a position is kept when its patch centre lies on tissue in our Otsu tissue mask (8 um/px), as bench_scannet.py
keeps them for the MONAI model-zoo pipeline. TIAToolbox keeps a patch when its footprint touches the mask anywhere,
a superset, so the worker passes our mask to the engine (its own filter runs, as a user would run it) and a
``PatchPredictor`` subclass whose ``get_dataloader`` cuts the ``WSIPatchDataset``'s coordinates down to exactly our
positions. Ours evaluates whole ROIs (all of their positions, tissue or not); probabilities are compared at every
position TIAToolbox evaluates that lies inside one of our ROIs (normally all of them).

Agreement is split into its causes at 16 probe positions (the 8 largest differences and 8 spread ones): the
pixels TIAToolbox reads there (its reader, in a small extra subprocess) against the pixels our reader gives, and
both through the eager network here, so resampling, the torch runtime (TorchScript in TIAToolbox's torch versus
eager here) and FCN scanning are told apart. A short calibration times the same network as a patch classifier
(16 patches) in both environments, so a runtime difference between the two torch builds shows.

Slides: phantoms from ``make_phantom(kind="metastasis", n=1, seed=11, size_px=(S, S), mpp=0.5)`` for every
``--sizes`` S (level-0 px; 8192 = 4096 px at the scan resolution), and the real ``--svs`` slide (CMU-1-Small-Region,
skipped with the reason when absent). When ``--peers-python`` is missing or its worker fails, TIAToolbox is recorded
as skipped with the reason and ours still runs.

DMMN (``bench_dmmn_one``). The shipped ``bundles/dmmn/models/model.pt`` (DMMN-M3, copied first by bench_dmmn.py's
``snapshot_weights``) on bench_dmmn.py's multi-class phantom (``make_slide``: 0.5 um/px level 0, 2x JPEG levels;
``--dmmn-sizes``, default 4096, 8192 and 16384), every tile of the stride-256 grid, in three fresh processes, each run
under bench_dmmn.py's ``measure_child`` wrapper (wall time of the process, peak RSS of its largest process):

(a) Ours: the bundle's own inference (``monai.bundle.run`` of ``configs/inference.json``, what ``python -m
    monai.bundle run`` calls, as bench_dmmn.py runs it: views read by the "levels" path, padding 0, BatchNorm
    folded, channels_last), batch 2 and 2 DataLoader workers (the bundle's CPU defaults). Forward hooks count the
    network's seconds and copy each tile's softmax out (the bundle writes labels only).
(b) TIAToolbox 2.1.3 ``SemanticSegmentor`` in WSI mode. Its WSI dataset reads ONE resolution, the first of
    ``input_resolutions`` (``SemanticSegmentor.get_dataloader`` builds a ``WSIPatchDataset`` with
    ``ioconfig.input_resolutions[0]``; the worker checks this with a three-resolution ``IOSegmentorConfig`` and
    records the item shape), so DMMN's three concentric views cannot be read at 0.5, 1.0 and 2.0 um/px by the
    engine. What it can do: read the 5x footprint, 1024 px at 0.5 um/px (``patch_input_shape`` 1024,
    ``patch_output_shape`` 256, stride 256: its input box is the output box grown by 384 px on every side, the
    concentric geometry exactly), and derive the 10x and 5x views in the model's ``preproc`` by area averaging
    (the bundle's "tile" read path, same PIL call). Pixels outside the slide are 255 there (hard-coded in
    ``WSIPatchDataset``), 0 in the bundle. TorchScript network, batch 2, 2 workers, ``auto_get_mask=False``,
    probabilities written to zarr.
(c) MONAI: core MONAI has no multi-resolution engine, so ``peers_dmmn.py`` wires the three views from MONAI's
    parts (one ``PatchWSIDataset`` per pyramid level with the bundle's per-view transforms, ``ZipDataset``,
    ``DataLoader``, the prepared network, argmax into an in-memory label canvas; its docstring says why the corners
    are given in level-0 pixels). ``--skip-monai`` leaves it out.

All outputs lie on the same 0.5 um/px grid (tile (r, c) covers level-0 pixels [256 r, 256 r + 256) x [256 c,
256 c + 256) in both), so labels (argmax) and probabilities are compared pixel by pixel without resampling, over
interior tiles (5x footprint inside the slide) and border tiles apart. At probe tiles (the largest differences and
spread ones) the causes are split: our "levels" versus "tile" views, padding 0 versus 255, TIAToolbox's pixels
against ours, its TorchScript result against the eager network, folding, and the residual.

MONAI's own pipeline (``monai_modelzoo``, ScanNet phantoms): bench_scannet.py's model-zoo worker, the
pathology_tumor_detection bundle's wiring (``MaskedPatchWSIDataset`` + ``DataLoader`` + the same eager network as a
patch classifier on every 244 px patch of our positions, 488 px level-0 reads averaged 2 x 2 to 1.0 um/px), in its
own fresh process; its map is compared with ours at the positions both evaluate. It needs a 0.5 um/px level 0
(its grid steps are 64 level-0 px), so the SVS is skipped with that reason. ``--skip-monai`` leaves it out.

SegMitos (``run_segmitos``, ``--bundles segmitos``). The shipped ``bundles/segmitos/models/model.pt`` over
``--segmitos-hpfs`` phantom HPFs (``make_phantom(kind="mitosis", seed=10, size_px=--segmitos-side, mpp=0.25)``,
PNG files with ground-truth centroids), each pipeline in a fresh process under bench_dmmn.py's ``measure_child``:

(a) ``ours``: the bundle's own inference (``monai.bundle.run`` of configs/inference.json, ``--data_source`` a
    datalist file of the HPFs): each HPF in one pass (``whole_max_px`` 2560 on a CPU), BatchNorm folded,
    channels_last, outputs as always (detection CSV, GeoJSON, ASAP XML, map and overlay PNGs, counts, report).
    ``bundle_ours_worker`` copies each HPF's stitched mitosis map out of ``SegMitosInferer`` for the comparison.
(b) ``ours_no_images``: the same with ``write_images`` false (no map or overlay PNGs; detections and the report
    are still written); ``ours_tiled``: with ``whole_max_px`` 0, every HPF in the bundle's 1024 px tiles with
    256 px context.
(c) ``monai_sliding_window``: MONAI's pipeline as model-zoo segmentation bundles wire it: ``LoadImaged``
    (PILReader) + ``ScaleIntensityRanged`` in a ``Dataset`` / ``DataLoader``, ``SlidingWindowInferer(roi_size
    1024, sw_batch_size --segmitos-batch, overlap 0.25, mode "constant")`` (MONAI's defaults) with the bundle's
    prepared network and a softmax; it writes nothing.
(d) ``tiatoolbox_tiles``: TIAToolbox's ``SemanticSegmentor`` over the PNGs (VirtualWSIReader, baseline
    resolution), ``patch_input_shape`` 1024 and ``patch_output_shape`` / stride 512: the bundle's tiles; the
    model (TorchScript of the plain network) keeps the centre 512 px of its 1024 px output.
(e) ``tiatoolbox_one_tile``: the same with one tile per HPF (input = the HPF plus 256 px round it, output = the
    HPF), the closest TIAToolbox comes to the bundle's one pass.

Every map is compared with (a) pixel by pixel, over all pixels and over those at least 256 px from every edge
(where no padding reaches a pixel's receptive field: TIAToolbox pads 255 beyond the HPF, the bundle's tiles are
clamped inside it); every map goes through the bundle's post-processing at its thresholds
(``pathbundles.hpf.detect_mitoses``) and is scored against the ground truth (``mitosis_counts``, 30 px radius).

Spatial LSTM (``--bundles spatial_lstm``, ``--spatial-lstm-sizes``, default 4096,8192,16384): in
``peers_spatial_lstm.py`` (its docstring says what each pipeline does): the bundle's own inference (and with
``--tissue_grids_only False``), TIAToolbox's ``PatchPredictor`` computing the lattice's CNN features followed by the
TorchScript LSTM head, and MONAI's ``MaskedPatchWSIDataset`` with the network's forward per grid, on the ScanNet
phantoms.

Run (2 cores: scannet about 10 min, most of it the 8192 px phantom's TIAToolbox and MONAI runs; dmmn about 25 min,
half of it the 16384 px phantom's TIAToolbox run; spatial_lstm about 18 min):
    ulimit -s 32768; PYTHONPATH=common MPLBACKEND=Agg .venv/bin/python benchmarks/bench_peers.py
TIAToolbox's interpreter (default ``../peers-venv/bin/python`` beside the repository, or ``--peers-python``):
    python3 -m venv ../peers-venv && ../peers-venv/bin/pip install tiatoolbox==2.1.3
Smoke run (2048 px phantom only, about 2 min; dmmn on a 1024 px phantom, about 3 min under load):
    ... .venv/bin/python benchmarks/bench_peers.py --quick --out /tmp/peers_quick.json
DMMN alone, keeping the ScanNet section of results/peers.json (about 12 min on the 4096 px phantom under load):
    ... .venv/bin/python benchmarks/bench_peers.py --bundles dmmn
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "common"))

from machine import machine_info, snapshot_file, vm_status_kib  # noqa: E402  (benchmarks/machine.py, stdlib only: both venvs)

# This module is also run by TIAToolbox's interpreter (--worker tiatoolbox...), which has no MONAI and no
# pathbundles dependencies: everything from the project (bench_scannet, pathbundles) is imported inside the
# functions that run in the project's environment, and the TIAToolbox workers get every number through their cfg.

SHIPPED_MODEL = REPO / "bundles" / "scannet" / "models" / "model.pt"
DEFAULT_SVS = REPO.parent / "shared" / "data" / "CMU-1-Small-Region.svs"
DEFAULT_PEERS_PYTHON = Path(os.environ.get("PATHBUNDLES_PEERS_PYTHON",
                                           REPO.parent / "peers-venv" / "bin" / "python"))
PROBES_LARGEST, PROBES_SPREAD, CALIBRATION_PATCHES = 8, 8, 16


# ---- TIAToolbox side (TIAToolbox's interpreter) ----------------------------------------------------------------


def tiatoolbox_model(torchscript: str, class_names: list[str], views: Any = None, per_pixel: bool = False,
                     crop_px: int = 0, normalise: Any = None, features: bool = False):
    """A TorchScript network as a TIAToolbox ``ModelABC``: uint8 RGB input (H, W, 3), class probabilities out.

    ``preproc``: ``views`` of the input if given (DMMN's three views of one tile, :func:`dmmn_views_from_tile`),
    then the bundle's ScaleIntensityRange(0, 255, -1, 1) with MONAI's float32 operations. ``infer_batch``: the network
    and the softmax over the classes, (N, C) for a patch classifier (ScanNet's 1 x 1 output) or NHWC with
    ``per_pixel`` (a segmentor), less ``crop_px`` on every side (an FCN whose output is as large as its input tile,
    SegMitos: TIAToolbox places each output at ``patch_output_shape``, the centre of the input tile); it adds up the
    seconds spent in the network's forward passes (``seconds``, ``calls``, ``first_start``, ``last_end``).
    ``normalise`` replaces the ScaleIntensityRange step (a function of the uint8 image); with ``features`` the
    network's output (N, D) is returned as it is (a feature extractor, Spatial LSTM's CNN)."""
    import torch
    from tiatoolbox.models.models_abc import ModelABC

    class TimedTorchScript(ModelABC):
        def __init__(self, path: str) -> None:
            super().__init__()
            self.net = torch.jit.load(path, map_location="cpu").eval()
            self.class_dict = dict(enumerate(class_names))
            self.seconds, self.calls, self.first_start, self.last_end = 0.0, 0, None, None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        @staticmethod
        def preproc(image: np.ndarray) -> np.ndarray:
            image = views(image) if views is not None else image
            if normalise is not None:
                return normalise(image)
            return (image.astype(np.float32) - 0.0) / 255.0 * 2.0 + -1.0

        @staticmethod
        def postproc(image: np.ndarray) -> np.ndarray:
            return np.argmax(image, axis=-1)

        @staticmethod
        def infer_batch(model: torch.nn.Module, batch_data: torch.Tensor, *, device: str = "cpu") -> np.ndarray:
            x = batch_data.to(device=device, dtype=torch.float32).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
            model.eval()
            with torch.inference_mode():
                start = time.perf_counter()
                model.first_start = model.first_start or start
                logits = model(x)
                model.last_end = time.perf_counter()
                model.seconds += model.last_end - start
                model.calls += 1
                if features:
                    return logits.float().cpu().numpy()
                prob = torch.softmax(logits.float(), 1)
                if crop_px:
                    prob = prob[:, :, crop_px:-crop_px, crop_px:-crop_px]
                return (prob.permute(0, 2, 3, 1) if per_pixel else prob[:, :, 0, 0]).cpu().numpy()

    return TimedTorchScript(torchscript)


SCANNET_CLASSES = ["normal", "tumour"]


def positions_patch_predictor(base: type, wanted: np.ndarray, stride: int, patch: int, info: dict) -> type:
    """A subclass of TIAToolbox's ``PatchPredictor`` (``base``) whose WSI dataset evaluates exactly the grid
    positions of the boolean map ``wanted`` (row r, column c: the patch whose corner is at (c, r) * ``stride`` at the
    requested resolution): TIAToolbox builds its coordinates first (with its own mask filter, patches whose footprint
    touches the mask, when a mask is given), then they are cut down to ours; ``info`` gets the counts and seconds."""

    class PositionsPatchPredictor(base):
        def get_dataloader(self, *args, **kwargs):
            t0 = time.perf_counter()
            loader = super().get_dataloader(*args, **kwargs)
            coords = np.asarray(loader.dataset.inputs)  # (N, 4) x0, y0, x1, y1 at the requested resolution
            rc = coords[:, [1, 0]] // stride
            ok = ((coords[:, :2] % stride == 0).all(1) & (rc < wanted.shape).all(1)
                  & (coords[:, 2:] - coords[:, :2] == patch).all(1))
            keep = np.zeros(len(coords), bool)
            keep[ok] = wanted[rc[ok, 0], rc[ok, 1]]
            loader.dataset.inputs = coords[keep]
            info.update({"mask_rule_positions": int(len(coords)), "positions_kept": int(keep.sum()),
                         "dataset_s": time.perf_counter() - t0})
            return loader

    return PositionsPatchPredictor


def run_patch_predictor_at(model: Any, wanted: np.ndarray, cfg: dict, info: dict, masks: Any = None,
                           **run_kwargs: Any) -> tuple[Any, np.ndarray, np.ndarray]:
    """TIAToolbox's PatchPredictor in WSI mode over ``cfg["slide"]`` at exactly the grid positions of ``wanted``
    (``positions_patch_predictor``): ``cfg["patch_px"]`` patches at stride ``cfg["stride_px"]`` at
    ``cfg["scan_mpp"]`` um/px, batch ``cfg["patch_batch"]``, ``cfg["num_workers"]`` workers, output written to zarr
    under ``cfg["save_dir"]``. Returns the engine, the model's outputs (N, C) and their coordinates (N, 4)."""
    import zarr
    from tiatoolbox.models.engine.io_config import IOPatchPredictorConfig
    from tiatoolbox.models.engine.patch_predictor import PatchPredictor

    stride, patch = cfg["stride_px"], cfg["patch_px"]
    engine = positions_patch_predictor(PatchPredictor, wanted, stride, patch, info)(
        model=model, batch_size=cfg["patch_batch"], num_workers=cfg["num_workers"], device="cpu", verbose=False)
    ioconfig = IOPatchPredictorConfig(input_resolutions=[{"units": "mpp", "resolution": cfg["scan_mpp"]}],
                                      patch_input_shape=(patch, patch), stride_shape=(stride, stride))
    out = engine.run(images=[Path(cfg["slide"])], masks=masks, patch_mode=False, ioconfig=ioconfig,
                     save_dir=Path(cfg["save_dir"]), overwrite=True, output_type="zarr", return_probabilities=True,
                     **run_kwargs)
    store = zarr.open(str(next(iter(out.values()))), mode="r")
    return engine, np.asarray(store["probabilities"]), np.asarray(store["coordinates"])


def tiatoolbox_worker(cfg: dict) -> dict[str, Any]:
    """Run TIAToolbox's PatchPredictor over the slide at exactly the positions in ``cfg["positions"]`` (a boolean
    map, our grid) in this fresh process; returns timings, counts and VmHWM and saves the probability map."""
    import torch

    torch.set_num_threads(cfg["threads"])
    start = time.perf_counter()
    import tiatoolbox.models.engine.patch_predictor  # noqa: F401  (the import's seconds, counted apart)

    import_s = time.perf_counter() - start
    model = tiatoolbox_model(cfg["torchscript"], SCANNET_CLASSES)
    wanted = np.load(cfg["positions"])
    stride = cfg["stride_px"]
    dataset_info: dict[str, Any] = {}
    hwm_before = vm_status_kib("VmHWM")
    start = time.perf_counter()
    engine, prob, coords = run_patch_predictor_at(model, wanted, cfg, dataset_info, masks=[np.load(cfg["mask"])])
    total = time.perf_counter() - start
    hwm = vm_status_kib("VmHWM")
    prob_map = np.full(wanted.shape, np.nan, np.float32)
    prob_map[coords[:, 1] // stride, coords[:, 0] // stride] = prob[:, 1]
    np.save(cfg["map_out"], prob_map)
    return {"mode": "tiatoolbox", "import_s": import_s, "total_s": total, "setup_s": dataset_info["dataset_s"],
            "network_forward_s": model.seconds, "network_calls": model.calls,
            "data_s": total - model.seconds, "positions_evaluated": int(len(prob)),
            "vmhwm_before_pipeline_mib": hwm_before / 1024, "vmhwm_mib": hwm / 1024,
            "num_workers": cfg["num_workers"], "threads": torch.get_num_threads(), "batch_size": cfg["patch_batch"],
            "reader": type(engine.dataloader.dataset.reader).__name__ if engine.dataloader.dataset.reader else None,
            "output": "zarr (probabilities, predictions, coordinates)", **dataset_info,
            "environment": machine_info(("tiatoolbox", "torch", "torchvision", "numpy", "zarr", "dask",
                                         "openslide-python", "tifffile", "opencv-python"))}


def tiatoolbox_probe_worker(cfg: dict) -> dict[str, Any]:
    """Read the probe patches as TIAToolbox's WSIPatchDataset reads them (same call), and time the TorchScript
    network as a patch classifier on the calibration batch, in TIAToolbox's environment."""
    import torch
    from tiatoolbox.wsicore.wsireader import WSIReader

    torch.set_num_threads(cfg["threads"])
    stride, patch = cfg["stride_px"], cfg["patch_px"]
    reader = WSIReader.open(cfg["slide"])
    bounds = [[c * stride, r * stride, c * stride + patch, r * stride + patch] for r, c in cfg["probes_rc"]]
    patches = [reader.read_bounds(b, resolution=cfg["scan_mpp"], units="mpp", pad_constant_values=255,
                                  coord_space="resolution") for b in bounds]
    # The level-0 rectangle TIAToolbox reads for each patch (it then resizes that to the patch size).
    level0 = [np.asarray(reader.bounds_at_resolution_to_baseline(b, cfg["scan_mpp"], "mpp"), np.float64).tolist()
              for b in bounds]
    np.save(cfg["patches_out"], np.stack(patches).astype(np.uint8) if patches else np.zeros((0, patch, patch, 3)))
    model = tiatoolbox_model(cfg["torchscript"], SCANNET_CLASSES)
    batch = torch.from_numpy(model.preproc(np.load(cfg["calibration_patches"])))
    times = []
    for _ in range(1 + cfg["calibration_repeats"]):
        t0 = time.perf_counter()
        model.infer_batch(model, batch, device="cpu")
        times.append(time.perf_counter() - t0)
    return {**calibration_entry(times[1:], len(batch),
                                f"TorchScript in TIAToolbox's infer_batch, torch {torch.__version__}"),
            "probe_level0_bounds": level0}


def run_semantic_segmentor(model: Any, images: list[Path], ioconfig: Any, cfg: dict) -> tuple[dict, Any, dict]:
    """TIAToolbox's SemanticSegmentor in WSI mode over ``images`` (no mask, ``auto_get_mask=False``, probabilities
    written to zarr under ``cfg["save_dir"]``), batch ``cfg["batch"]`` and ``cfg["num_workers"]`` workers, timed:
    the engine's output (image -> zarr path), its last dataset, and the result's timing and memory fields."""
    import torch
    from tiatoolbox.models.engine.semantic_segmentor import SemanticSegmentor

    hwm_before = vm_status_kib("VmHWM")
    start = time.perf_counter()
    engine = SemanticSegmentor(model=model, batch_size=cfg["batch"], num_workers=cfg["num_workers"], device="cpu",
                               verbose=False)
    out = engine.run(images=images, masks=None, patch_mode=False, ioconfig=ioconfig, save_dir=Path(cfg["save_dir"]),
                     overwrite=True, output_type="zarr", return_probabilities=True, auto_get_mask=False)
    total = time.perf_counter() - start
    hwm = vm_status_kib("VmHWM")
    dataset = engine.dataloader.dataset
    return out, dataset, {
        "mode": "tiatoolbox", "total_s": total, "network_forward_s": model.seconds, "network_calls": model.calls,
        "first_forward_after_s": model.first_start - start, "after_last_forward_s": start + total - model.last_end,
        "vmhwm_before_pipeline_mib": hwm_before / 1024, "vmhwm_mib": hwm / 1024,
        "num_workers": cfg["num_workers"], "batch_size": cfg["batch"], "threads": torch.get_num_threads(),
        "input_bounds_first": np.asarray(dataset.inputs[0]).tolist(),
        "output_bounds_first": np.asarray(dataset.outputs[0]).tolist(),
        "reader": type(dataset.reader).__name__ if getattr(dataset, "reader", None) is not None else None,
        "output": "zarr (probabilities, predictions, coordinates)"}


# ---- DMMN, TIAToolbox side (TIAToolbox's interpreter) -----------------------------------------------------------

# The dmmn bundle's geometry (bundles/dmmn/configs/inference.json; checked against bench_dmmn.py's constants in the
# project's environment): 256 px views at 0.5, 1.0 and 2.0 um/px around one centre, targets on the stride-256 grid.
DMMN_MPPS, DMMN_PATCH_PX, DMMN_CLASSES = (0.5, 1.0, 2.0), 256, 6
DMMN_TILE_PX = round(DMMN_PATCH_PX * DMMN_MPPS[-1] / DMMN_MPPS[0])  # 1024 px at 0.5 um/px: the 5x footprint


def dmmn_views_from_tile(tile: np.ndarray) -> np.ndarray:
    """The three concentric 256 px views (9 channels, 20x first, uint8 HWC) of one 1024 px tile at 0.5 um/px, area
    averaged exactly as the bundle's "tile" read path (``pathbundles.multimag.read_concentric``: PIL BOX over the
    centre span of each view). Plain numpy + PIL, so TIAToolbox's ``preproc`` and the probes here share it."""
    from PIL import Image

    views = []
    for mpp in DMMN_MPPS:
        span = DMMN_PATCH_PX * mpp / DMMN_MPPS[0]
        lo = (tile.shape[0] - span) / 2
        views.append(np.asarray(Image.fromarray(np.ascontiguousarray(tile[..., :3])).resize(
            (DMMN_PATCH_PX, DMMN_PATCH_PX), Image.Resampling.BOX, box=(lo, lo, lo + span, lo + span))))
    return np.concatenate(views, axis=-1)


def dmmn_tiatoolbox_worker(cfg: dict) -> dict[str, Any]:
    """TIAToolbox's SemanticSegmentor over the whole slide (every tile of the stride-256 grid, no mask) with the
    TorchScript DMMN, in this fresh process; writes its result JSON and the probability map (.npy, after timing)."""
    import torch

    torch.set_num_threads(cfg["threads"])
    start = time.perf_counter()
    import zarr
    from tiatoolbox.models.engine.io_config import IOSegmentorConfig
    from tiatoolbox.models.engine.semantic_segmentor import SemanticSegmentor

    import_s = time.perf_counter() - start
    model = tiatoolbox_model(cfg["torchscript"], [f"class {k + 1}" for k in range(DMMN_CLASSES)],
                             views=dmmn_views_from_tile, per_pixel=True)
    res = {"units": "mpp", "resolution": DMMN_MPPS[0]}
    ioconfig = IOSegmentorConfig(input_resolutions=[res], output_resolutions=[res],
                                 patch_input_shape=(DMMN_TILE_PX, DMMN_TILE_PX),
                                 patch_output_shape=(DMMN_PATCH_PX, DMMN_PATCH_PX),
                                 stride_shape=(DMMN_PATCH_PX, DMMN_PATCH_PX), save_resolution=res)
    out, dataset, result = run_semantic_segmentor(model, [Path(cfg["slide"])], ioconfig, cfg)
    result.update({"import_s": import_s, "tiles": int(len(dataset.inputs)),
                   "environment": machine_info(("tiatoolbox", "torch", "numpy", "zarr", "dask", "tifffile",
                                                "imagecodecs", "pillow", "opencv-python"))})
    # After timing: the probability map for the comparison, and what the engine does with three input resolutions.
    store = zarr.open(str(next(iter(out.values()))), mode="r")
    result["zarr_arrays"] = {k: list(store[k].shape) for k in store.array_keys()}
    np.save(cfg["prob_out"], np.asarray(store["probabilities"], np.float32))
    three = IOSegmentorConfig(input_resolutions=[{"units": "mpp", "resolution": m} for m in DMMN_MPPS],
                              output_resolutions=[res], patch_input_shape=(DMMN_PATCH_PX, DMMN_PATCH_PX),
                              patch_output_shape=(DMMN_PATCH_PX, DMMN_PATCH_PX),
                              stride_shape=(DMMN_PATCH_PX, DMMN_PATCH_PX), save_resolution=res)
    probe = SemanticSegmentor(model=model, batch_size=1, num_workers=0, device="cpu", verbose=False)
    loader = probe.get_dataloader(Path(cfg["slide"]), masks=None, ioconfig=three, patch_mode=False,
                                  auto_get_mask=False)
    loader.dataset.preproc_func = None
    item = loader.dataset[0]
    result["three_resolution_ioconfig"] = {
        "input_resolutions_mpp": list(DMMN_MPPS), "dataset_resolution_read": [loader.dataset.resolution,
                                                                              loader.dataset.units],
        "item_image_shape": list(np.asarray(item["image"]).shape),
        "note": "WSIPatchDataset is built with input_resolutions[0] only: one patch per item, at 0.5 um/px"}
    Path(cfg["result_out"]).write_text(json.dumps(result))
    return result


def dmmn_tiatoolbox_probe_worker(cfg: dict) -> dict[str, Any]:
    """The 1024 px input tiles TIAToolbox reads at the probe tiles (the same ``read_bounds`` call as its
    WSIPatchDataset, padding 255)."""
    from tiatoolbox.wsicore.wsireader import WSIReader

    reader = WSIReader.open(cfg["slide"])
    margin = (DMMN_TILE_PX - DMMN_PATCH_PX) // 2
    tiles = [reader.read_bounds([c * DMMN_PATCH_PX - margin, r * DMMN_PATCH_PX - margin,
                                 c * DMMN_PATCH_PX - margin + DMMN_TILE_PX, r * DMMN_PATCH_PX - margin + DMMN_TILE_PX],
                                resolution=DMMN_MPPS[0], units="mpp", pad_constant_values=255,
                                coord_space="resolution")[..., :3] for r, c in cfg["probes_rc"]]
    np.save(cfg["tiles_out"], np.stack(tiles).astype(np.uint8))
    return {"reader": type(reader).__name__, "tiles": len(tiles)}


# ---- SegMitos, TIAToolbox side (TIAToolbox's interpreter) -------------------------------------------------------

SEGMITOS_CLASSES = ["background", "mitosis"]


def segmitos_tiatoolbox_worker(cfg: dict) -> dict[str, Any]:
    """TIAToolbox's SemanticSegmentor over the HPF images (PNG, read by its VirtualWSIReader at baseline
    resolution) with the TorchScript SegMitos FCN, ``tile_px`` input tiles whose centre ``tile_px - 2 overlap_px``
    is kept (``patch_output_shape``, stride the same), in this fresh process; writes its result JSON and, after
    timing, each HPF's mitosis probability (channel 1) as .npy."""
    import torch

    torch.set_num_threads(cfg["threads"])
    start = time.perf_counter()
    import tiatoolbox.models.engine.semantic_segmentor  # noqa: F401  (imported here, so import_s counts it)
    import zarr
    from tiatoolbox.models.engine.io_config import IOSegmentorConfig

    import_s = time.perf_counter() - start
    tile, overlap = cfg["tile_px"], cfg["overlap_px"]
    core = tile - 2 * overlap
    model = tiatoolbox_model(cfg["torchscript"], SEGMITOS_CLASSES, per_pixel=True, crop_px=overlap)
    res = {"units": "baseline", "resolution": 1.0}
    ioconfig = IOSegmentorConfig(input_resolutions=[res], output_resolutions=[res], patch_input_shape=(tile, tile),
                                 patch_output_shape=(core, core), stride_shape=(core, core), save_resolution=res)
    out, dataset, result = run_semantic_segmentor(model, [Path(f) for f in cfg["images"]], ioconfig, cfg)
    result.update({"import_s": import_s, "tiles_last_image": int(len(dataset.inputs)), "tile_px": tile,
                   "overlap_px": overlap,
                   "environment": machine_info(("tiatoolbox", "torch", "numpy", "zarr", "dask", "pillow",
                                                "opencv-python"))})
    by_stem = {Path(str(k)).stem: v for k, v in out.items()}
    shapes = []
    for i, image in enumerate(cfg["images"]):
        store = zarr.open(str(by_stem[Path(image).stem]), mode="r")
        prob = np.asarray(store["probabilities"], np.float32)
        shapes.append(list(prob.shape))
        np.save(cfg["prob_out"].format(i), prob[..., 1])
    result["probabilities_shapes"] = shapes
    Path(cfg["result_out"]).write_text(json.dumps(result))
    return result


def calibration_entry(times: list[float], n_patches: int, runtime: str) -> dict[str, Any]:
    """Seconds per patch of a calibration (median and best of the repeats, after one warm-up)."""
    return {"calibration_s_per_patch": statistics.median(times) / n_patches,
            "calibration_best_s_per_patch": min(times) / n_patches, "calibration_times_s": times,
            "patches": n_patches, "runtime": runtime}


# ---- project side (the project's interpreter) ------------------------------------------------------------------


def snapshot_weights(folder: Path) -> tuple[str, str]:
    """Copy the shipped weights (training may rewrite them while the benchmark runs); (path, label with sha256)."""
    if not SHIPPED_MODEL.exists():
        raise SystemExit(f"{SHIPPED_MODEL} is missing: this benchmark compares the shipped network")
    weights = folder / "model.pt"
    return str(weights), snapshot_file(SHIPPED_MODEL, weights)


def export_traced(net: Any, shape: tuple[int, ...], path: Path, trace_px: int | None = None) -> dict[str, Any]:
    """Trace an eval-mode eager network (BatchNorm not folded, NCHW) to TorchScript at ``path``: traced on the first
    item of a random batch of ``shape`` in [-1, 1] (its top-left ``trace_px`` square when given), checked against
    the eager network on the whole batch."""
    import torch

    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    example = x[:1] if trace_px is None else x[:1, :, :trace_px, :trace_px]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in torch 2.13, and still what crosses versions
        traced = torch.jit.trace(net, example)
        diff = float((traced(x) - net(x)).abs().max())
        traced.save(str(path))
    return {"method": "torch.jit.trace of the eval-mode network (BatchNorm not folded, contiguous NCHW)",
            "max_abs_logit_diff_vs_eager": diff, "traced_input": list(example.shape), "checked_input": list(x.shape)}


def export_torchscript(weights: str, path: Path) -> dict[str, Any]:
    """ScanNet's network (as ``_load_net`` loads it) traced on one patch and checked on larger inputs."""
    from bench_scannet import _load_net
    from pathbundles.scannet import PATCH_PX

    return export_traced(_load_net(weights), (4, 3, PATCH_PX + 64, PATCH_PX + 64), path, trace_px=PATCH_PX)


def tissue_positions(slide_path: Path, backend: str, lp: int) -> dict[str, Any]:
    """Our grid positions on tissue: patch centre on the Otsu tissue mask at 8 um/px (bench_scannet.py's rule),
    the map shape of our pipeline, and the mask itself (for TIAToolbox's own mask filter)."""
    from bench_scannet import SCAN_MPP, TISSUE_MPP
    from pathbundles.scannet import ScanGeometry
    from pathbundles.tissue import tissue_mask
    from pathbundles.wsi import open_slide

    geometry = ScanGeometry(lp=lp, alpha=1)
    with open_slide(slide_path, backend=backend) as slide:
        mask = tissue_mask(slide, mpp=TISSUE_MPP)
        (w0, h0), mpp0 = slide.dimensions, float(slide.mpp[0])
        levels = slide.info()["levels"]
    scale = SCAN_MPP / mpp0  # level-0 px per scan px
    map_shape = geometry.grid().map_shape((w0 / scale, h0 / scale))
    ky, kx = np.meshgrid(np.arange(map_shape[0]), np.arange(map_shape[1]), indexing="ij")
    keep = mask.at_level0(geometry.map_to_image(kx) * scale, geometry.map_to_image(ky) * scale).astype(bool)
    return {"keep": keep, "mask": (np.asarray(mask.mask) != 0).astype(np.uint8), "mask_mpp": mask.mpp,
            "map_shape": list(map_shape), "level0_size": [w0, h0], "level0_mpp": mpp0, "levels": levels}


def run_subprocess(python: str, script: Path, mode: str, cfg: dict, folder: Path) -> tuple[dict | None, str, float]:
    """Run ``script --worker mode cfg.json`` with ``python`` in a fresh process; (result or None, error, wall s)."""
    cfg_path = folder / f"cfg_{mode}.json"
    cfg_path.write_text(json.dumps(cfg))
    arg = json.dumps(cfg) if script.name == "bench_scannet.py" else str(cfg_path)
    t0 = time.perf_counter()
    proc = subprocess.run([python, str(script), "--worker", mode, arg], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO / "common")}, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode:
        return None, f"{mode} worker exited with {proc.returncode}: {proc.stderr.strip()[-3000:]}", wall
    return json.loads(proc.stdout.strip().splitlines()[-1]), "", wall


def calibration_patches(n: int) -> np.ndarray:
    """Fixed uint8 RGB patches (n, 244, 244, 3) for the patch-classifier calibration in both environments."""
    from pathbundles.scannet import PATCH_PX

    return np.random.default_rng(0).integers(0, 256, (n, PATCH_PX, PATCH_PX, 3), dtype=np.uint8)


def classify(net, patches: np.ndarray) -> np.ndarray:
    """Tumour probabilities of uint8 (N, H, W, 3) patches through the eager network, bundle preprocessing."""
    import torch
    from monai.transforms import ScaleIntensityRange

    if not len(patches):
        return np.zeros(0, np.float32)
    x = ScaleIntensityRange(0.0, 255.0, -1.0, 1.0)(torch.from_numpy(patches.transpose(0, 3, 1, 2).astype(np.float32)))
    with torch.no_grad():
        return torch.softmax(net(torch.as_tensor(x)).float(), 1)[:, 1, 0, 0].numpy()


def calibrate_here(weights: str, torchscript: Path, patches: np.ndarray, repeats: int) -> dict[str, Any]:
    """Seconds per patch of the network as a patch classifier here: eager (as ours runs it) and TorchScript."""
    import torch
    from bench_scannet import _load_net

    nets = {"eager": _load_net(weights), "torchscript": torch.jit.load(str(torchscript)).eval()}
    times: dict[str, list[float]] = {label: [] for label in nets}
    for _ in range(1 + repeats):  # interleaved, so load changes on the shared machine hit both alike
        for label, net in nets.items():
            t0 = time.perf_counter()
            classify(net, patches)
            times[label].append(time.perf_counter() - t0)
    return {label: calibration_entry(t[1:], len(patches), f"{label}, torch {torch.__version__}")
            for label, t in times.items()}


def monai_modelzoo(entry: dict[str, Any], slide: Path, folder: Path, keep: np.ndarray, covered: np.ndarray,
                   args: argparse.Namespace, weights: str) -> None:
    """MONAI's own pathology pipeline on the slide (``entry["monai"]``): bench_scannet.py's model-zoo worker, the
    pathology_tumor_detection bundle's wiring (``MaskedPatchWSIDataset`` + ``DataLoader`` + the same eager network
    as a patch classifier on every 244 px patch at stride 32, 1.0 um/px as 2 x 2 area means of a 488 px level-0
    read), at exactly our positions; its map against ours at the positions both evaluate."""
    from bench_scannet import LEVEL0_MPP

    mpp0 = entry["slide"]["level0_mpp"]
    if args.skip_monai or abs(mpp0 - LEVEL0_MPP) > 1e-9:
        entry["monai"] = {"skipped": "--skip-monai" if args.skip_monai else
                          f"bench_scannet.py's model-zoo worker lays its grid in 64 px steps of a {LEVEL0_MPP} um/px "
                          f"level 0 (2 x 2 averaging to 1.0 um/px); this slide's level 0 is {mpp0} um/px"}
        return
    cfg = {"slide": str(slide), "weights": weights, "threads": args.threads, "backend": "tifffile", "lp": args.lp,
           "scannet_batch": 1, "patch_batch": args.patch_batch, "num_workers": args.num_workers,
           "map_shape": [max(n, -(-int(size * mpp0) // 32)) for n, size in
                         zip(keep.shape, entry["slide"]["level0_size"][::-1])],  # its grid: every 64 level-0 px
           "map_out": str(folder / "map_monai.npy")}
    zoo, error, wall = run_subprocess(sys.executable, REPO / "benchmarks" / "bench_scannet.py", "modelzoo", cfg,
                                      folder)
    if zoo is None:
        entry["monai"] = {"skipped": error}
        print(f"  MONAI failed: {error[-500:]}", flush=True)
        return
    zoo_map, ours_map = np.load(cfg["map_out"]), np.load(folder / "map_ours.npy")
    beyond = ~np.isnan(zoo_map)
    beyond[:keep.shape[0], :keep.shape[1]] = False
    outside = int(beyond.sum())
    zoo_map = zoo_map[:keep.shape[0], :keep.shape[1]]
    evaluated = ~np.isnan(zoo_map)
    common = evaluated & covered
    zoo.update({"subprocess_wall_s": wall, "positions_equal_ours": bool((evaluated == keep).all()) and not outside,
                "positions_beyond_our_map": outside,
                "prob_max_abs_diff_vs_ours": float(np.abs(zoo_map[common] - ours_map[common]).max()),
                "prob_mean_abs_diff_vs_ours": float(np.abs(zoo_map[common] - ours_map[common]).mean()),
                "pipeline": f"MONAI model-zoo style: MaskedPatchWSIDataset (our tissue positions) + DataLoader + "
                            f"the eager network as a patch classifier, batch {args.patch_batch}, "
                            f"TiledTiffWSIReader, 488 px level-0 reads averaged 2 x 2"})
    entry["monai"] = zoo
    ours = entry["ours"]
    entry["ratios_monai_over_ours"] = {"pipeline_s": zoo["total_s"] / ours["total_s"],
                                       "subprocess_wall_s": wall / ours["subprocess_wall_s"],
                                       "network_s": zoo["network_forward_s"] / ours["network_forward_s"],
                                       "peak_rss": zoo["vmhwm_mib"] / ours["vmhwm_mib"]}
    print(f"  MONAI       {zoo['total_s']:8.1f} s (network {zoo['network_forward_s']:.1f} s), "
          f"{zoo['positions_evaluated']} positions, VmHWM {zoo['vmhwm_mib']:.0f} MiB, max |dp| "
          f"{zoo['prob_max_abs_diff_vs_ours']:.3f}", flush=True)


def bench_one(name: str, slide: Path, backend: str, generator: str | None, args: argparse.Namespace,
              weights: str, torchscript: Path, work: Path) -> dict[str, Any]:
    """Both pipelines on one slide, then agreement and its causes."""
    from bench_scannet import SCAN_MPP, _load_net
    from pathbundles.scannet import INNER_STRIDE_PX, PATCH_PX
    from pathbundles.wsi import open_slide

    load_start = list(os.getloadavg())
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pos = tissue_positions(slide, backend, args.lp)
    keep, lp = pos["keep"], args.lp
    np.save(folder / "positions.npy", keep)
    np.save(folder / "mask.npy", pos["mask"])
    entry: dict[str, Any] = {
        "name": name, "slide": {"file": str(slide), "generator": generator, "level0_size": pos["level0_size"],
                                "level0_mpp": pos["level0_mpp"], "levels": pos["levels"]},
        "backend_ours": backend, "map_shape": pos["map_shape"], "grid_positions": int(keep.size),
        "tissue_positions": int(keep.sum()), "tissue_fraction": float(keep.mean()),
        "positions_rule": "stride-32 grid at the scan resolution, patch centre on the tissue mask (8 um/px Otsu, "
                          "pathbundles.tissue.tissue_mask)", "positions_s": time.perf_counter() - t0,
        "load_average_at_start": load_start}
    print(f"{name}: map {pos['map_shape']}, {int(keep.sum())} of {keep.size} positions on tissue "
          f"({100 * keep.mean():.1f} %)", flush=True)

    cfg = {"slide": str(slide), "weights": weights, "threads": args.threads, "backend": backend, "lp": lp,
           "scannet_batch": 1, "num_workers": args.num_workers, "map_out": str(folder / "map_ours.npy")}
    ours, error, wall = run_subprocess(sys.executable, REPO / "benchmarks" / "bench_scannet.py", "scannet", cfg, folder)
    if ours is None:
        raise RuntimeError(error)
    ours["subprocess_wall_s"] = wall
    rois = np.asarray(ours.pop("rois_rc"), np.int64).reshape(-1, 2)
    covered = np.zeros(keep.shape, bool)
    for r, c in rois:
        covered[r * lp:(r + 1) * lp, c * lp:(c + 1) * lp] = True
    ours["positions_evaluated_inside_map"] = int(covered.sum())
    ours["pipeline"] = f"SlideROIDataset + predict_maps + ScanNetInferer(lp={lp}, alpha=1), eager network"
    entry["ours"] = ours
    print(f"  ours        {ours['total_s']:8.1f} s (network {ours['network_forward_s']:.1f} s), "
          f"{ours['positions_evaluated']} positions, VmHWM {ours['vmhwm_mib']:.0f} MiB", flush=True)
    monai_modelzoo(entry, slide, folder, keep, covered, args, weights)

    peers = Path(args.peers_python)
    if not peers.exists():
        entry["tiatoolbox"] = {"skipped": f"{peers} does not exist (TIAToolbox's own virtual environment)"}
        return entry
    cfg = {"slide": str(slide), "torchscript": str(torchscript), "threads": args.threads,
           "patch_batch": args.patch_batch, "num_workers": args.num_workers, "scan_mpp": SCAN_MPP,
           "patch_px": PATCH_PX, "stride_px": INNER_STRIDE_PX, "positions": str(folder / "positions.npy"),
           "mask": str(folder / "mask.npy"), "save_dir": str(folder / "tiatoolbox_out"),
           "map_out": str(folder / "map_tiatoolbox.npy")}
    script = Path(__file__).resolve()
    tia, error, wall = run_subprocess(str(peers), script, "tiatoolbox", cfg, folder)
    if tia is None:
        entry["tiatoolbox"] = {"skipped": error}
        print(f"  TIAToolbox failed: {error[-500:]}", flush=True)
        return entry
    tia["subprocess_wall_s"] = wall
    tia["pipeline"] = (f"PatchPredictor(patch_mode=False), IOPatchPredictorConfig(mpp {SCAN_MPP}, patch "
                       f"{PATCH_PX}, stride {INNER_STRIDE_PX}), TorchScript network, batch {args.patch_batch}")
    entry["tiatoolbox"] = tia
    print(f"  TIAToolbox  {tia['total_s']:8.1f} s (network {tia['network_forward_s']:.1f} s), "
          f"{tia['positions_evaluated']} positions, VmHWM {tia['vmhwm_mib']:.0f} MiB", flush=True)

    ours_map, tia_map = np.load(folder / "map_ours.npy"), np.load(folder / "map_tiatoolbox.npy")
    evaluated = ~np.isnan(tia_map)
    common = evaluated & covered
    diff = np.abs(ours_map[common] - tia_map[common])
    entry["ratios_tiatoolbox_over_ours"] = {
        "pipeline_s": tia["total_s"] / ours["total_s"],
        "subprocess_wall_s": tia["subprocess_wall_s"] / ours["subprocess_wall_s"],
        "network_s": tia["network_forward_s"] / ours["network_forward_s"],
        "peak_rss": tia["vmhwm_mib"] / ours["vmhwm_mib"],
        "network_s_per_position": (tia["network_forward_s"] / tia["positions_evaluated"])
        / (ours["network_forward_s"] / ours["positions_evaluated"])}

    # Causes of the differences, at probe positions: the pixels TIAToolbox reads versus ours, through one network.
    rr, cc = np.nonzero(common)
    order = np.argsort(-diff, kind="stable")
    picks = np.unique(np.concatenate([order[:PROBES_LARGEST],
                                      np.linspace(0, len(rr) - 1, PROBES_SPREAD).astype(int)])) if len(rr) else []
    probes = [[int(rr[i]), int(cc[i])] for i in picks]
    np.save(folder / "calibration.npy", calibration_patches(CALIBRATION_PATCHES))
    probe_cfg = {**cfg, "probes_rc": probes, "patches_out": str(folder / "probe_patches.npy"),
                 "calibration_patches": str(folder / "calibration.npy"), "calibration_repeats": args.repeats}
    probe, error, _ = run_subprocess(str(peers), script, "tiatoolbox-probe", probe_cfg, folder)
    agreement: dict[str, Any] = {
        "positions_tiatoolbox": int(evaluated.sum()), "positions_requested": int(keep.sum()),
        "positions_identical": bool(np.array_equal(evaluated, keep)),
        "positions_common": int(common.sum()),
        "positions_tiatoolbox_outside_our_rois": int((evaluated & ~covered).sum()),
        "prob_max_abs_diff": float(diff.max()) if diff.size else None,
        "prob_mean_abs_diff": float(diff.mean()) if diff.size else None,
        "prob_p99_abs_diff": float(np.quantile(diff, 0.99)) if diff.size else None,
        "positions_diff_over_0.01": int((diff > 0.01).sum()),
        "decision_disagreements_at_0.5": int(((ours_map[common] > 0.5) != (tia_map[common] > 0.5)).sum()),
        "prob_range_ours": [float(ours_map[common].min()), float(ours_map[common].max())] if diff.size else None}
    if probe is None:
        agreement["probe_error"] = error
    else:
        level0_bounds = np.asarray(probe.pop("probe_level0_bounds"), np.float64).reshape(-1, 4)
        entry["tiatoolbox"]["calibration"] = probe
        tia_px = np.load(folder / "probe_patches.npy")
        to_level0 = SCAN_MPP / pos["level0_mpp"]
        with open_slide(slide, backend=backend) as s:
            ours_px = np.stack([s.read_region((c * INNER_STRIDE_PX * to_level0, r * INNER_STRIDE_PX * to_level0),
                                              (PATCH_PX, PATCH_PX), SCAN_MPP) for r, c in probes])
        net = _load_net(weights)
        p_ours_px, p_tia_px = classify(net, ours_px), classify(net, tia_px)
        pr, pc = np.asarray(probes).T
        pixel = np.abs(ours_px.astype(np.int16) - tia_px.astype(np.int16))
        # Ours reads the exact level-0 square [32 k, 32 k + 244] * scan_mpp / level0_mpp (fractional on a 0.499 um/px
        # scan); TIAToolbox's rectangle, and so its patch, may sit and scale a little differently.
        exact = np.asarray([[c, r, c, r] for r, c in probes], np.float64) * INNER_STRIDE_PX * to_level0
        exact[:, 2:] += PATCH_PX * to_level0
        agreement["probes"] = {
            "positions": len(probes), "rule": f"the {PROBES_LARGEST} largest differences and {PROBES_SPREAD} spread "
                                              "positions",
            "prob_abs_diff_at_probes_max": float(np.abs(ours_map[pr, pc] - tia_map[pr, pc]).max()),
            "input_pixel_max_abs_diff": int(pixel.max()), "input_pixel_mean_abs_diff": float(pixel.mean()),
            "input_pixels_differing_fraction": float((pixel > 0).mean()),
            "tiatoolbox_level0_bounds_offset_px_max": float(np.abs(level0_bounds - exact).max()),
            "tiatoolbox_level0_bounds_first_probe": level0_bounds[0].tolist(),
            "exact_level0_bounds_first_probe": exact[0].tolist(),
            "resampling_prob_max_abs_diff": float(np.abs(p_ours_px - p_tia_px).max()),
            "runtime_prob_max_abs_diff": float(np.abs(p_tia_px - tia_map[pr, pc]).max()),
            "fcn_vs_patch_prob_max_abs_diff": float(np.abs(p_ours_px - ours_map[pr, pc]).max()),
            "note": "resampling: our pixels versus TIAToolbox's pixels through the same eager network; runtime: "
                    "TIAToolbox's pixels through the eager network here versus TIAToolbox's TorchScript result; "
                    "fcn_vs_patch: our pixels as one patch versus our ROI map"}
    entry["agreement"] = agreement
    entry["load_average_at_end"] = list(os.getloadavg())
    return entry


def run_worker(python: str, mode: str, cfg: dict, cfg_path: Path, timeout_s: float) -> dict[str, Any] | str:
    """Write ``cfg`` to ``cfg_path`` and run this script's ``--worker mode`` with ``python`` in a fresh process under
    bench_dmmn.py's ``measure_child``: the worker's result (its ``cfg["result_out"]``) with the subprocess's wall
    seconds and the peak RSS of its largest process, or the reason it failed (a string)."""
    from bench_dmmn import measure_child

    cfg_path.write_text(json.dumps(cfg))
    child = measure_child([python, str(Path(__file__).resolve()), "--worker", mode, str(cfg_path)], timeout_s)
    if child.get("returncode") != 0:
        return f"{mode} worker failed: {child}"
    result = json.loads(Path(cfg["result_out"]).read_text())
    result.update({"subprocess_wall_s": child["wall_s"], "peak_rss_largest_process_mib": child["peak_rss_mib"]})
    return result


def read_captured(path: str, shapes: list[list[int]]) -> list[np.ndarray]:
    """The float32 arrays a worker appended to ``path`` one after the other, cut by their ``shapes``."""
    flat = np.fromfile(path, np.float32)
    out, at = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        out.append(flat[at:at + size].reshape(shape))
        at += size
    if at != flat.size:
        raise RuntimeError(f"{path}: {flat.size} values, the shapes account for {at}")
    return out


# ---- DMMN, project side ----------------------------------------------------------------------------------------

DMMN_CONFIG = REPO / "bundles" / "dmmn" / "configs" / "inference.json"


def bundle_ours_worker(cfg: dict) -> dict[str, Any]:
    """Ours: a bundle's own inference (``monai.bundle.run`` of its configs/inference.json with ``cfg["run_kwargs"]``,
    what ``python -m monai.bundle run`` calls; bench_dmmn.py's command) in this fresh process. Forward hooks,
    attached to the network right after the bundle's ``PrepareNetworkForInference`` handler has prepared it, add
    up the seconds in the network. For the comparison (the bundles write labels or detections, not probabilities)
    the worker appends float32 probabilities, in dataset order, to ``cfg["prob_out"]``: with ``capture``
    "network" (DMMN) the softmax of every forward pass (all channels, per tile), with "inferer" (SegMitos) channel
    ``capture_channel`` of what the inferer class ``cfg["inferer"]`` returns for each item (the stitched map of a
    whole HPF), with "writer" (Spatial LSTM) the whole map canvas of each slide as ``SlideMapWriter`` gets it
    before it writes anything (stitched float32, every ROI; its ROIs go to ``rois_rc``); the copy's seconds are
    counted apart (``capture_s``); with "none" (bench_scaling.py) nothing is copied and ``prob_out`` is not needed.
    ``cfg["timed_modules"]`` names the submodules whose calls are timed (default the network itself; Spatial LSTM's
    inferer calls ``cnn``, ``lstm`` and ``classifier``, never ``forward``)."""
    import importlib

    import torch

    torch.set_num_threads(cfg["threads"])
    start = time.perf_counter()
    import monai.bundle
    from pathbundles.inference_network import PrepareNetworkForInference

    import_s = time.perf_counter() - start
    stats: dict[str, Any] = {"seconds": 0.0, "calls": 0, "items": 0, "capture_s": 0.0, "first": None, "last": None,
                             "shapes": []}
    mode = cfg.get("capture", "network")
    if mode not in ("network", "inferer", "writer", "none"):
        raise ValueError(f"capture {mode!r}: expected network, inferer, writer or none")
    capture = open(cfg["prob_out"], "wb") if mode != "none" else None  # noqa: SIM115  (closed after the run)
    by_network = mode == "network"
    rois: list[list[list[int]]] = []

    def keep(prob: Any) -> None:
        t0 = time.perf_counter()
        if hasattr(prob, "detach"):
            prob = prob.detach().float().cpu().numpy()
        prob = np.ascontiguousarray(prob, np.float32)
        capture.write(prob.tobytes())
        stats["items"] += len(prob)
        stats["shapes"].append(list(prob.shape[1:]))
        stats["capture_s"] += time.perf_counter() - t0

    original = PrepareNetworkForInference.__call__

    def prepare_then_time(self: Any, engine: Any) -> None:
        original(self, engine)
        net = getattr(engine.network, "module", engine.network)

        def before(module: Any, args: Any) -> None:
            stats["t"] = time.perf_counter()
            stats["first"] = stats["first"] or stats["t"]

        def after(module: Any, args: Any, output: Any) -> None:
            stats["last"] = time.perf_counter()
            stats["seconds"] += stats["last"] - stats["t"]
            stats["calls"] += 1
            if by_network:
                keep(torch.softmax(output.detach().float(), 1))

        for name in cfg.get("timed_modules", [""]):
            timed = net.get_submodule(name)
            timed.register_forward_pre_hook(before)
            timed.register_forward_hook(after)
        stats["network"] = {"class": type(net).__name__, "channels_last": bool(
            next(net.parameters()).is_contiguous(memory_format=torch.channels_last)),
            "batchnorms_left": sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())}

    PrepareNetworkForInference.__call__ = prepare_then_time
    if mode == "writer":
        from pathbundles.slide_inference import SlideMapWriter

        write_slide = SlideMapWriter._write_slide

        def keep_then_write(self: Any, plan: Any, canvas: Any) -> None:
            keep(np.asarray(canvas[:], np.float32)[None])
            rois.append(np.asarray(plan.rois_rc).tolist())
            write_slide(self, plan, canvas)

        SlideMapWriter._write_slide = keep_then_write
    elif mode == "inferer":
        module, _, name = cfg["inferer"].rpartition(".")
        inferer_class = getattr(importlib.import_module(module), name)
        infer = inferer_class.__call__

        def infer_then_keep(self: Any, inputs: Any, network: Any, *args: Any, **kwargs: Any) -> Any:
            out = infer(self, inputs, network, *args, **kwargs)
            keep(out[:, cfg["capture_channel"]])
            return out

        inferer_class.__call__ = infer_then_keep
    hwm_before = vm_status_kib("VmHWM")
    start = time.perf_counter()
    monai.bundle.run(config_file=cfg["config"], **cfg["run_kwargs"])
    total = time.perf_counter() - start
    hwm = vm_status_kib("VmHWM")
    if capture is not None:
        capture.close()
    result = {"mode": "ours", "import_s": import_s, "total_s": total, "network_forward_s": stats["seconds"],
              "network_calls": stats["calls"], "captured_items": stats["items"], "captured_shapes": stats["shapes"],
              "capture_s": stats["capture_s"], "first_forward_after_s": stats["first"] - start,
              "after_last_forward_s": start + total - stats["last"],
              "vmhwm_before_pipeline_mib": hwm_before / 1024, "vmhwm_mib": hwm / 1024,
              "threads": torch.get_num_threads(), "run_kwargs": cfg["run_kwargs"], "network": stats.get("network")}
    if by_network:
        result["tiles"] = stats["items"]
        del result["captured_shapes"]
    if rois:
        result["rois_rc"] = rois
    Path(cfg["result_out"]).write_text(json.dumps(result))
    return result


def bundle_networks(config: Path, weights: str, plain: bool = False) -> dict[str, Any]:
    """A bundle's network_def (``config``: its inference.json) with the weights: eager as loaded, and prepared as
    the bundle runs it (``plain``: as it runs with ``--fold_batchnorm false --channels_last false``)."""
    import copy

    import torch
    from monai.bundle import ConfigParser
    from pathbundles.inference_network import prepare_for_inference

    parser = ConfigParser()
    parser.read_config(str(config))
    parser["bundle_root"] = str(config.parents[1])
    net = parser.get_parsed_content("network_def")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    net.load_state_dict(state.get("model", state) if isinstance(state.get("model"), dict) else state)
    net.eval()
    prepared = prepare_for_inference(copy.deepcopy(net), fold=parser["fold_batchnorm"] and not plain,
                                     channels_last=parser["channels_last"] and not plain)
    return {"eager": net, "prepared": prepared}


def dmmn_probs(net: Any, views: np.ndarray) -> np.ndarray:
    """Softmax (N, 6, 256, 256) of uint8 stacked views (N, 256, 256, 9), the bundle's preprocessing."""
    import torch
    from monai.transforms import ScaleIntensityRange

    x = ScaleIntensityRange(0.0, 255.0, -1.0, 1.0)(torch.from_numpy(views.transpose(0, 3, 1, 2).astype(np.float32)))
    out = []
    with torch.no_grad():
        for i in range(len(x)):
            out.append(torch.softmax(net(torch.as_tensor(x[i:i + 1])).float(), 1).numpy())
    return np.concatenate(out)


def dmmn_tile_row(tiles: np.ndarray, row: int, cols: int) -> np.ndarray:
    """Row ``row`` of a grid of (N, 6, 256, 256) tiles stored row-major, as a (256, cols * 256, 6) canvas strip."""
    return np.concatenate(list(np.asarray(tiles[row * cols:(row + 1) * cols]).transpose(0, 2, 3, 1)), axis=1)


def dmmn_compare(ours_prob: np.ndarray, peer_prob: np.ndarray, ours_labels: np.ndarray, grid: tuple[int, int],
                 interior: np.ndarray, peer_tiles: bool = False) -> tuple[dict[str, Any], np.ndarray]:
    """Labels and probabilities of ours and a peer over the whole 0.5 um/px grid, tile row by tile row; the
    per-tile max abs probability difference (for the probes). ``peer_prob`` is an (H, W, 6) canvas (TIAToolbox's)
    or, with ``peer_tiles``, (N, 6, 256, 256) tiles in ours' row-major order (MONAI's)."""
    p = DMMN_PATCH_PX
    acc = {part: {"pixels": 0, "same": 0, "diff_sum": 0.0, "diff_max": 0.0, "over_0.01": 0}
           for part in ("all", "interior", "border")}
    confusion = np.zeros((DMMN_CLASSES + 1, DMMN_CLASSES + 1), np.int64)  # ours label (0..6) x peer class+1
    bundle_vs_capture = 0
    tile_max = np.zeros(grid, np.float64)
    for r in range(grid[0]):
        ours = dmmn_tile_row(ours_prob, r, grid[1])  # (256, cols * 256, 6)
        peer = dmmn_tile_row(peer_prob, r, grid[1]) if peer_tiles else peer_prob[r * p:(r + 1) * p]
        h = min(p, peer.shape[0], ours_labels.shape[0] - r * p)
        w = min(ours.shape[1], peer.shape[1], ours_labels.shape[1])
        ours, peer = ours[:h, :w], np.asarray(peer[:h, :w])
        lab_ours, lab_peer = ours_labels[r * p:r * p + h, :w].astype(np.int64), peer.argmax(-1) + 1
        bundle_vs_capture += int((ours.argmax(-1) + 1 != lab_ours).sum())
        confusion += np.bincount((lab_ours * (DMMN_CLASSES + 1) + lab_peer).ravel(),
                                 minlength=confusion.size).reshape(confusion.shape)
        diff = np.abs(ours - peer).max(-1)
        for c in range(grid[1]):
            d, same = diff[:, c * p:(c + 1) * p], lab_ours[:, c * p:(c + 1) * p] == lab_peer[:, c * p:(c + 1) * p]
            if not d.size:
                continue
            tile_max[r, c] = float(d.max())
            for part in ("all", "interior" if interior[r, c] else "border"):
                a = acc[part]
                a["pixels"] += d.size
                a["same"] += int(same.sum())
                a["diff_sum"] += float(d.sum())
                a["diff_max"] = max(a["diff_max"], float(d.max()))
                a["over_0.01"] += int((d > 0.01).sum())
    out: dict[str, Any] = {}
    for part, a in acc.items():
        n = max(a["pixels"], 1)
        out[part] = {"pixels": a["pixels"], "tiles": int(interior.size if part == "all" else
                                                         interior.sum() if part == "interior" else (~interior).sum()),
                     "same_label_fraction": a["same"] / n, "prob_max_abs_diff": a["diff_max"],
                     "prob_mean_abs_diff": a["diff_sum"] / n, "pixels_prob_diff_over_0.01": a["over_0.01"]}
    per_class = {}
    for k in range(1, DMMN_CLASSES + 1):
        n = int(confusion[k].sum())
        per_class[str(k)] = {"pixels_ours": n, "same_in_peer": float(confusion[k, k] / n) if n else None}
    out["per_class_ours"] = per_class
    out["confusion_ours_rows_peer_cols"] = confusion[1:, 1:].tolist()
    out["bundle_labels_differing_from_captured_argmax"] = bundle_vs_capture
    return out, tile_max


def bench_dmmn_one(size: int, args: argparse.Namespace, cache: Path, work: Path) -> dict[str, Any]:
    """Both pipelines on one DMMN phantom slide, then agreement and its causes at probe tiles."""
    import tifffile
    from bench_dmmn import MPPS, PATCH_PX, make_slide
    from pathbundles.multimag import read_concentric
    from pathbundles.tissue import tissue_mask
    from pathbundles.wsi import open_slide

    assert tuple(MPPS) == DMMN_MPPS and PATCH_PX == DMMN_PATCH_PX, "bench_dmmn.py's geometry changed"
    load_start = list(os.getloadavg())
    name = f"phantom_mc_{size}"
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"dmmn: multi-class phantom {size} px ...", flush=True)
    slide = make_slide(cache, size)
    with open_slide(slide, backend="tifffile") as s:
        (w0, h0), mpp0, levels = s.dimensions, float(s.mpp[0]), s.info()["levels"]
        mask = tissue_mask(s, mpp=8.0)
    assert abs(mpp0 - DMMN_MPPS[0]) < 1e-6, "the comparison assumes a 0.5 um/px level 0"
    grid = (-(-h0 // DMMN_PATCH_PX), -(-w0 // DMMN_PATCH_PX))
    rr, cc = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    margin = (DMMN_TILE_PX - DMMN_PATCH_PX) // 2  # 384 px: how far the 5x view reaches beyond the target
    x0, y0 = cc * DMMN_PATCH_PX - margin, rr * DMMN_PATCH_PX - margin  # the 5x footprint's corner
    interior = (x0 >= 0) & (y0 >= 0) & (x0 + DMMN_TILE_PX <= w0) & (y0 + DMMN_TILE_PX <= h0)
    tissue_tiles = len(mask.tile_origins(DMMN_PATCH_PX, DMMN_PATCH_PX, DMMN_MPPS[0]))
    entry: dict[str, Any] = {
        "name": name, "slide": {"file": slide.name, "generator": f"bench_dmmn.make_slide (pathbundles.phantom."
                                f"make_multiclass_dataset(n=1, size_px={size}, seed=5, mpp=0.5))",
                                "level0_size": [w0, h0], "level0_mpp": mpp0, "levels": levels},
        "tiles": int(grid[0] * grid[1]), "grid": list(grid), "interior_tiles": int(interior.sum()),
        "tissue_fraction": float(np.mean(np.asarray(mask.mask) != 0)),
        "tiles_touching_tissue": tissue_tiles, "tiles_touching_tissue_fraction": tissue_tiles / (grid[0] * grid[1]),
        "tissue_rule": "Otsu tissue mask at 8 um/px (pathbundles.tissue.tissue_mask); both pipelines segment every "
                       "tile of the grid (the bundle's use_tissue false; TIAToolbox auto_get_mask=False, no mask)",
        "prepared_s": time.perf_counter() - t0, "load_average_at_start": load_start}
    print(f"  {w0} x {h0} px, {entry['tiles']} tiles ({entry['interior_tiles']} interior), tissue "
          f"{100 * entry['tissue_fraction']:.1f} % of the slide", flush=True)

    from bench_dmmn import snapshot_weights as dmmn_snapshot
    weights, entry["weights"] = dmmn_snapshot(folder)
    nets = bundle_networks(DMMN_CONFIG, str(weights), plain=args.dmmn_plain_network)
    torchscript = folder / "dmmn_torchscript.pt"
    entry["torchscript"] = export_traced(nets["eager"], (2, 3 * 3, DMMN_PATCH_PX, DMMN_PATCH_PX), torchscript)
    script = Path(__file__).resolve()

    source = folder / "slides"
    source.mkdir(exist_ok=True)
    if not (source / slide.name).exists():
        try:
            os.link(slide, source / slide.name)
        except OSError:
            shutil.copyfile(slide, source / slide.name)
    cfg = {"config": str(DMMN_CONFIG), "threads": args.threads, "prob_out": str(folder / "prob_ours.f32"),
           "result_out": str(folder / "result_ours.json"),
           "run_kwargs": {"data_source": str(source), "output_dir": str(folder / "out_ours"),
                          "ckpt_path": str(weights), "batch_size": args.dmmn_batch,
                          "num_workers": args.dmmn_num_workers,
                          **({"fold_batchnorm": False, "channels_last": False} if args.dmmn_plain_network else {})}}
    print("  ours (the bundle's inference, fresh process) ...", flush=True)
    ours = run_worker(sys.executable, "bundle-ours", cfg, folder / "cfg_dmmn_ours.json", args.dmmn_timeout)
    if isinstance(ours, str):
        raise RuntimeError(ours)
    ours.update({"num_workers": args.dmmn_num_workers, "batch_size": args.dmmn_batch,
                 "pipeline": "python -m monai.bundle run --config_file bundles/dmmn/configs/inference.json (in "
                             "process: monai.bundle.run), defaults (read_path levels, pad 0, BatchNorm "
                             + ("NOT folded, NCHW: --fold_batchnorm false --channels_last false" if
                                args.dmmn_plain_network else "folded, channels_last")
                             + f") and batch_size {args.dmmn_batch}, num_workers {args.dmmn_num_workers}"})
    # The pipeline's seconds without the benchmark's copy of every tile's softmax (the bundle writes labels only);
    # the ratios use it, as the peers' figures leave their own comparison copies out.
    ours["pipeline_s"] = ours["total_s"] - ours["capture_s"]
    entry["ours"] = ours
    print(f"  ours        {ours['total_s']:8.1f} s (network {ours['network_forward_s']:.1f} s), {ours['tiles']} "
          f"tiles, VmHWM {ours['vmhwm_mib']:.0f} MiB, largest process {ours['peak_rss_largest_process_mib']:.0f} "
          f"MiB", flush=True)

    ours_prob = np.memmap(cfg["prob_out"], np.float32, "r").reshape(-1, DMMN_CLASSES, DMMN_PATCH_PX, DMMN_PATCH_PX)
    labels_tif = next((folder / "out_ours" / "labels").glob("*.tif"))
    ours_labels = tifffile.imread(labels_tif, level=0)
    if len(ours_prob) != grid[0] * grid[1]:
        raise RuntimeError(f"captured {len(ours_prob)} tiles, expected {grid[0] * grid[1]}")
    if args.skip_monai:
        entry["monai"] = {"skipped": "--skip-monai"}
    else:
        mcfg = {"config": str(DMMN_CONFIG), "slide": str(slide), "weights": str(weights), "threads": args.threads,
                "batch": args.dmmn_batch, "num_workers": args.dmmn_num_workers,
                "prob_out": str(folder / "prob_monai.f32"), "result_out": str(folder / "result_monai.json")}
        print("  MONAI PatchWSIDataset x 3 + ZipDataset (fresh process) ...", flush=True)
        zoo = run_worker(sys.executable, "dmmn-monai", mcfg, folder / "cfg_dmmn_monai.json", args.dmmn_timeout)
        if isinstance(zoo, str):
            entry["monai"] = {"skipped": zoo}
            print(f"  MONAI failed: {zoo[-800:]}", flush=True)
        else:
            zoo["pipeline"] = (f"one PatchWSIDataset per view (patch_level {zoo['levels']}, {DMMN_PATCH_PX} px, "
                               f"corners at the target tile centres in level-0 px, center_location False) + "
                               f"the bundle's per-view transforms + ZipDataset + DataLoader (batch {args.dmmn_batch}, "
                               f"{args.dmmn_num_workers} workers) + the prepared network (folded, channels_last), "
                               f"argmax into a uint8 label canvas in memory; writes no file")
            monai_prob = np.memmap(mcfg["prob_out"], np.float32, "r").reshape(ours_prob.shape)
            zoo["agreement"], _ = dmmn_compare(ours_prob, monai_prob, ours_labels, grid, interior, peer_tiles=True)
            del monai_prob
            os.remove(mcfg["prob_out"])
            entry["monai"] = zoo
            entry["ratios_monai_over_ours"] = {
                "pipeline_s": zoo["total_s"] / ours["pipeline_s"],
                "subprocess_wall_s": zoo["subprocess_wall_s"] / ours["subprocess_wall_s"],
                "network_s": zoo["network_forward_s"] / ours["network_forward_s"],
                "peak_rss_largest_process": zoo["peak_rss_largest_process_mib"] / ours["peak_rss_largest_process_mib"]}
            print(f"  MONAI       {zoo['total_s']:8.1f} s (network {zoo['network_forward_s']:.1f} s), {zoo['tiles']} "
                  f"tiles, largest process {zoo['peak_rss_largest_process_mib']:.0f} MiB, same label "
                  f"{zoo['agreement']['all']['same_label_fraction']:.5f} (interior "
                  f"{zoo['agreement']['interior']['same_label_fraction']:.5f})", flush=True)

    peers = Path(args.peers_python)
    if not peers.exists():
        entry["tiatoolbox"] = {"skipped": f"{peers} does not exist (TIAToolbox's own virtual environment)"}
        return entry
    tcfg = {"slide": str(slide), "torchscript": str(torchscript), "threads": args.threads,
            "batch": args.dmmn_batch, "num_workers": args.dmmn_num_workers, "save_dir": str(folder / "out_tia"),
            "prob_out": str(folder / "prob_tia.npy"), "result_out": str(folder / "result_tia.json")}
    print("  TIAToolbox SemanticSegmentor (fresh process) ...", flush=True)
    tia = run_worker(str(peers), "dmmn-tiatoolbox", tcfg, folder / "cfg_dmmn_tia.json", args.dmmn_timeout)
    if isinstance(tia, str):
        entry["tiatoolbox"] = {"skipped": tia}
        print(f"  TIAToolbox failed: {tia}", flush=True)
        return entry
    tia.update({"pipeline": f"SemanticSegmentor(patch_mode=False, auto_get_mask=False), IOSegmentorConfig(input and "
                            f"output 0.5 mpp, patch_input_shape {DMMN_TILE_PX}, patch_output_shape {DMMN_PATCH_PX}, "
                            f"stride {DMMN_PATCH_PX}), views derived in the model's preproc, TorchScript network, "
                            f"batch {args.dmmn_batch}, num_workers {args.dmmn_num_workers}, return_probabilities"})
    entry["tiatoolbox"] = tia
    print(f"  TIAToolbox  {tia['total_s']:8.1f} s (network {tia['network_forward_s']:.1f} s), {tia['tiles']} "
          f"tiles, VmHWM {tia['vmhwm_mib']:.0f} MiB, largest process {tia['peak_rss_largest_process_mib']:.0f} "
          f"MiB", flush=True)
    entry["ratios_tiatoolbox_over_ours"] = {
        "pipeline_s": tia["total_s"] / ours["pipeline_s"],
        "subprocess_wall_s": tia["subprocess_wall_s"] / ours["subprocess_wall_s"],
        "network_s": tia["network_forward_s"] / ours["network_forward_s"],
        "peak_rss_largest_process": tia["peak_rss_largest_process_mib"] / ours["peak_rss_largest_process_mib"],
        "vmhwm_main_process": tia["vmhwm_mib"] / ours["vmhwm_mib"]}

    # Agreement over the whole grid at 0.5 um/px (both outputs are on it: tile (r, c) covers pixels
    # [256 r, 256 r + 256) x [256 c, 256 c + 256) of level 0 in both, no resampling of either map).
    tia_prob = np.load(tcfg["prob_out"], mmap_mode="r")
    agreement, tile_max = dmmn_compare(ours_prob, tia_prob, ours_labels, grid, interior)
    agreement.update({
        "compared_at": "0.5 um/px (level 0 of this phantom, the 20x target grid of both pipelines): ours' label map "
                       "(level 0 of labels/<slide>.tif) and captured softmax, TIAToolbox's zarr probabilities and "
                       "their argmax; no resampling, the two grids coincide (both anchored at (0, 0), stride 256)",
        "shapes": {"ours_labels": list(ours_labels.shape), "tiatoolbox_probabilities": list(tia_prob.shape)},
        "border_rule": f"a border tile's 5x footprint ({DMMN_TILE_PX} px at 0.5 um/px round the target) reaches "
                       "beyond the slide, where ours pads 0 (the bundle's pad_value) and TIAToolbox 255"})
    entry["agreement"] = agreement

    # Causes, at probe tiles: the pixels each pipeline feeds and the network each runs.
    flat = np.argsort(-tile_max, axis=None, kind="stable")
    inner, outer = flat[interior.ravel()[flat]], flat[~interior.ravel()[flat]]
    spread = np.linspace(0, grid[0] * grid[1] - 1, args.dmmn_probes_spread).astype(int)
    picks = np.unique(np.concatenate([inner[:args.dmmn_probes_largest], outer[:args.dmmn_probes_largest // 2],
                                      spread]))
    probes = [[int(i // grid[1]), int(i % grid[1])] for i in picks]
    pcfg = {"slide": str(slide), "probes_rc": probes, "tiles_out": str(folder / "probe_tiles.npy")}
    probe, error, _ = run_subprocess(str(peers), script, "dmmn-tiatoolbox-probe", pcfg, folder)
    causes: dict[str, Any] = {"tiles": probes, "interior": [bool(interior[r, c]) for r, c in probes]}
    if probe is None:
        causes["error"] = error
    else:
        tia_tiles = np.load(pcfg["tiles_out"])
        views_tia = np.stack([dmmn_views_from_tile(t) for t in tia_tiles])
        views = {}
        with open_slide(slide, backend="tifffile") as s:
            for key, path, pad in (("levels_pad0", "levels", 0), ("tile_pad0", "tile", 0), ("tile_pad255", "tile",
                                                                                               255)):
                views[key] = np.stack([np.concatenate(read_concentric(
                    s, ((c + 0.5) * DMMN_PATCH_PX, (r + 0.5) * DMMN_PATCH_PX), DMMN_MPPS, DMMN_PATCH_PX, path, pad),
                    axis=-1) for r, c in probes])
        prep, eager = nets["prepared"], nets["eager"]
        p = {k: dmmn_probs(prep, v) for k, v in views.items()}
        p_tia_eager, p_tia_prep = dmmn_probs(eager, views_tia), dmmn_probs(prep, views_tia)
        idx = [r * grid[1] + c for r, c in probes]
        captured = np.asarray(ours_prob[idx])
        tia_at = np.stack([np.asarray(tia_prob[r * DMMN_PATCH_PX:(r + 1) * DMMN_PATCH_PX,
                                               c * DMMN_PATCH_PX:(c + 1) * DMMN_PATCH_PX]).transpose(2, 0, 1)
                           for r, c in probes])
        pix = np.abs(views_tia.astype(np.int16) - views["tile_pad255"].astype(np.int16))
        lv = np.abs(views["levels_pad0"].astype(np.int16) - views["tile_pad0"].astype(np.int16))
        inside = np.asarray(causes["interior"])

        def mx(a: np.ndarray, b: np.ndarray, sel: np.ndarray | None = None) -> float | None:
            d = np.abs(a - b) if sel is None else np.abs(a[sel] - b[sel])
            return float(d.max()) if d.size else None

        def same(a: np.ndarray, b: np.ndarray) -> float:
            return float(np.mean(a.argmax(1) == b.argmax(1)))

        causes.update({
            "ours_reconstructed_vs_captured_max": mx(p["levels_pad0"], captured),
            "tiatoolbox_pixels_vs_our_tile_read_pad255_max_grey": int(pix.max()),
            "read_path_levels_vs_tile_view_mean_abs_grey_per_view": [float(lv[..., 3 * k:3 * k + 3].mean())
                                                                     for k in range(3)],
            "read_path_prob_max_abs_diff": mx(p["levels_pad0"], p["tile_pad0"]),
            "read_path_prob_max_abs_diff_interior": mx(p["levels_pad0"], p["tile_pad0"], inside),
            "padding_prob_max_abs_diff_border": mx(p["tile_pad0"], p["tile_pad255"], ~inside),
            "padding_prob_max_abs_diff_interior": mx(p["tile_pad0"], p["tile_pad255"], inside),
            "runtime_prob_max_abs_diff": mx(p_tia_eager, tia_at),
            "folding_channels_last_prob_max_abs_diff": mx(p_tia_prep, p_tia_eager),
            "read_path_same_label_fraction": same(p["levels_pad0"], p["tile_pad0"]),
            "padding_same_label_fraction_border": same(p["tile_pad0"][~inside], p["tile_pad255"][~inside])
            if (~inside).any() else None,
            "residual_prob_max_abs_diff": mx(p["tile_pad255"], tia_at),
            "residual_same_label_fraction": same(p["tile_pad255"], tia_at),
            "probes_total_prob_max_abs_diff": mx(captured, tia_at),
            "probes_total_same_label_fraction": same(captured, tia_at),
            "probes_total_prob_max_abs_diff_interior": mx(captured, tia_at, inside),
            "note": "read path: ours' 'levels' views (stored 1.0 / 2.0 um/px JPEG levels) versus the 'tile' views "
                    "(area means of level 0, what TIAToolbox's single 0.5 um/px read allows) through the prepared "
                    "network; padding: pad 0 versus 255 with the 'tile' views; runtime: TIAToolbox's pixels through "
                    "the eager network here versus its TorchScript result; folding: the bundle's folded "
                    "channels_last network versus the eager one on the same pixels; residual: ours' network on "
                    "our 'tile' views padded 255 versus TIAToolbox's result (all but the two input choices)"})
    agreement["probes"] = causes
    entry["load_average_at_end"] = list(os.getloadavg())
    return entry


# ---- SegMitos, project side -----------------------------------------------------------------------------------

SEGMITOS_CONFIG = REPO / "bundles" / "segmitos" / "configs" / "inference.json"


def segmitos_hpfs(cache: Path, n: int, side: int) -> tuple[list[dict[str, Any]], str]:
    """``n`` phantom HPFs of ``side`` px at 0.25 um/px (bench_segmitos.py's seed) and their datalist items."""
    from bench_segmitos import MPP, PHANTOM_SEED
    from pathbundles.phantom import make_phantom

    folder = cache / f"phantom_mitosis_{side}_n{n}_seed{PHANTOM_SEED}"
    if not (folder / "dataset.json").exists():
        print(f"segmitos: generating {n} phantom HPFs of {side} px ...", flush=True)
        make_phantom(folder, kind="mitosis", n=n, seed=PHANTOM_SEED, size_px=side, mpp=MPP)
    items = json.loads((folder / "dataset.json").read_text())["items"]
    datalist = [{"image": str(folder / it["image"]), "centroids": str(folder / it["centroids"]), "mpp": MPP}
                for it in items]
    return datalist, (f"pathbundles.phantom.make_phantom(kind='mitosis', n={n}, seed={PHANTOM_SEED}, "
                      f"size_px={side}, mpp={MPP})")


def segmitos_compare(a: np.ndarray, b: np.ndarray, margin_px: int) -> dict[str, Any]:
    """Max and mean |a - b| of two (H, W) mitosis maps over all pixels and over those >= ``margin_px`` from every
    edge (where no pipeline's padding reaches a pixel's receptive field)."""
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    inner = d[margin_px:-margin_px, margin_px:-margin_px]
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "interior_max_abs": float(inner.max()),
            "interior_mean_abs": float(inner.mean()), "interior_margin_px": margin_px}


def segmitos_monai_worker(cfg: dict) -> dict[str, Any]:
    """MONAI's own pipeline, as model-zoo segmentation bundles wire it, in this fresh process: ``LoadImaged``
    (PILReader) + ``EnsureChannelFirstd`` + the bundle's ``ScaleIntensityRanged`` in a ``Dataset`` and
    ``DataLoader``, then ``SlidingWindowInferer(roi_size = the bundle's tile, sw_batch_size, overlap, mode)`` over
    each HPF with the bundle's prepared network (BatchNorm folded, channels_last) and a softmax; appends each HPF's
    mitosis probability (float32) to ``cfg["prob_out"]``."""
    import torch

    torch.set_num_threads(cfg["threads"])
    start = time.perf_counter()
    from monai.data import DataLoader, Dataset
    from monai.inferers import SlidingWindowInferer
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, ScaleIntensityRanged

    import_s = time.perf_counter() - start
    net = bundle_networks(SEGMITOS_CONFIG, cfg["weights"])["prepared"]
    stats = {"seconds": 0.0, "calls": 0}

    def before(module: Any, args: Any) -> None:
        stats["t"] = time.perf_counter()

    def after(module: Any, args: Any, output: Any) -> None:
        stats["seconds"] += time.perf_counter() - stats["t"]
        stats["calls"] += 1

    net.register_forward_pre_hook(before)
    net.register_forward_hook(after)
    transform = Compose([LoadImaged("image", reader="PILReader", reverse_indexing=False, image_only=True),
                         EnsureChannelFirstd("image"),
                         ScaleIntensityRanged("image", a_min=0.0, a_max=255.0, b_min=-1.0, b_max=1.0)])
    inferer = SlidingWindowInferer(roi_size=(cfg["tile_px"], cfg["tile_px"]), sw_batch_size=cfg["batch"],
                                   overlap=cfg["overlap"], mode=cfg["mode"])
    hwm_before = vm_status_kib("VmHWM")
    start = time.perf_counter()
    loader = DataLoader(Dataset([{"image": f} for f in cfg["images"]], transform=transform), batch_size=1,
                        num_workers=cfg["num_workers"])
    shapes = []
    with open(cfg["prob_out"], "wb") as capture, torch.no_grad():
        for batch in loader:
            x = torch.as_tensor(batch["image"]).float()
            prob = torch.softmax(inferer(x, net).float(), 1)[:, 1].contiguous().numpy()
            capture.write(prob.tobytes())
            shapes.append(list(prob.shape[1:]))
    total = time.perf_counter() - start
    result = {"mode": "monai", "import_s": import_s, "total_s": total, "network_forward_s": stats["seconds"],
              "network_calls": stats["calls"], "captured_shapes": shapes,
              "vmhwm_before_pipeline_mib": hwm_before / 1024,
              "vmhwm_mib": vm_status_kib("VmHWM") / 1024, "threads": torch.get_num_threads(),
              "inferer": {"roi_size": cfg["tile_px"], "sw_batch_size": cfg["batch"], "overlap": cfg["overlap"],
                          "mode": cfg["mode"]}}
    Path(cfg["result_out"]).write_text(json.dumps(result))
    return result


def run_segmitos(args: argparse.Namespace, work: Path, cache: Path, section: dict[str, Any], write: Any) -> None:
    """SegMitos: the shipped network over phantom HPFs through the bundle (one pass per HPF, and tiled) and
    through TIAToolbox's SemanticSegmentor (the bundle's tiles, and one tile per HPF)."""
    from bench_segmitos import MPP
    from bench_segmitos import snapshot_weights as segmitos_snapshot
    from monai.bundle import ConfigParser

    from pathbundles.annotations import read_points_csv
    from pathbundles.hpf import detect_mitoses
    from pathbundles.metrics.mitosis import DetectionCounts, match_points, mitosis_counts

    parser = ConfigParser()
    parser.read_config(str(SEGMITOS_CONFIG))
    bundle = {k: parser[k] for k in ("tile_px", "overlap_px", "mpp", "sigma_um", "min_mean_score", "min_area_um2",
                                     "radius_px", "num_workers")}
    assert bundle["mpp"] == MPP, "bench_segmitos.py's phantom resolution is not the bundle's"
    n, side = (1, 1200) if args.quick else (args.segmitos_hpfs, args.segmitos_side)
    tile, overlap = bundle["tile_px"], bundle["overlap_px"]
    one_tile = side + 2 * overlap  # TIAToolbox's one tile per HPF: the HPF plus the bundle's context on each side
    section["settings"] = {"threads": args.threads, "hpfs": n, "hpf_px": side, "mpp": MPP, "bundle": bundle,
                           "tiatoolbox_batch": args.segmitos_batch, "num_workers": bundle["num_workers"],
                           "ours_network": "the bundle's default: BatchNorm folded, channels_last",
                           "tiatoolbox_network": "TorchScript trace of the plain network (BatchNorm not folded, "
                                                 "NCHW)"}
    datalist, generator = segmitos_hpfs(cache, n, side)
    truths = [read_points_csv(it["centroids"], "xy")[0] for it in datalist]
    # The bundle reads the HPFs as users give them, a datalist file (--data_source): file paths never pass through
    # the config parser, which would evaluate a value starting with "$".
    datalist_file = work / "hpfs.json"
    datalist_file.write_text(json.dumps(datalist))
    weights, weights_label = segmitos_snapshot(work)
    if weights is None:
        raise RuntimeError("bundles/segmitos/models/model.pt is missing: the comparison runs the shipped weights")
    nets = bundle_networks(SEGMITOS_CONFIG, weights)
    entry: dict[str, Any] = {"name": f"phantom_hpf_{side}_x{n}", "hpfs": {"generator": generator, "n": n,
                                                                          "size_px": [side, side], "mpp": MPP,
                                                                          "mitoses": int(sum(map(len, truths)))},
                             "weights": weights_label, "load_average_at_start": list(os.getloadavg()), "runs": {}}
    section["slides"] = [entry]
    runs = entry["runs"]
    timeout = args.dmmn_timeout

    def ours(key: str, overrides: dict[str, Any], what: str) -> None:
        cfg = {"config": str(SEGMITOS_CONFIG), "threads": args.threads, "capture": "inferer",
               "inferer": "pathbundles.segmitos.SegMitosInferer", "capture_channel": 1,
               "prob_out": str(work / f"prob_{key}.f32"), "result_out": str(work / f"result_{key}.json"),
               "run_kwargs": {"data_source": str(datalist_file), "output_dir": str(work / f"out_{key}"),
                              "ckpt_path": weights, **overrides}}
        print(f"  {key}: {what} (fresh process) ...", flush=True)
        result = run_worker(sys.executable, "bundle-ours", cfg, work / f"cfg_{key}.json", timeout)
        if isinstance(result, str):
            raise RuntimeError(result)
        result.update({"pipeline": what, "_maps": read_captured(cfg["prob_out"], result["captured_shapes"])})
        runs[key] = result

    def tiatoolbox(key: str, tile_px: int, what: str) -> None:
        peers = Path(args.peers_python)
        if not peers.exists():
            runs[key] = {"skipped": f"{peers} does not exist (TIAToolbox's own virtual environment)"}
            return
        torchscript = work / f"segmitos_torchscript_{tile_px}.pt"
        exported = export_traced(nets["eager"], (2, 3, tile_px, tile_px), torchscript)
        cfg = {"images": [it["image"] for it in datalist], "torchscript": str(torchscript), "threads": args.threads,
               "batch": args.segmitos_batch, "num_workers": bundle["num_workers"], "tile_px": tile_px,
               "overlap_px": overlap, "save_dir": str(work / f"out_{key}"),
               "prob_out": str(work / f"prob_{key}_{{}}.npy"), "result_out": str(work / f"result_{key}.json")}
        print(f"  {key}: {what} (fresh process) ...", flush=True)
        result = run_worker(str(peers), "segmitos-tiatoolbox", cfg, work / f"cfg_{key}.json", timeout)
        if isinstance(result, str):
            runs[key] = {"skipped": result}
            print(f"  {key} failed: {result}", flush=True)
            return
        result.update({"pipeline": what, "torchscript": exported,
                       "_maps": [np.load(cfg["prob_out"].format(i))[:side, :side] for i in range(n)]})
        runs[key] = result

    ours("ours", {}, f"python -m monai.bundle run --config_file bundles/segmitos/configs/inference.json, defaults: "
                     f"each HPF in one pass (whole_max_px {parser.get_parsed_content('whole_max_px')} on a CPU), "
                     f"BatchNorm folded, "
                     f"channels_last, num_workers {bundle['num_workers']}, writes detections, maps and overlays")
    ours("ours_no_images", {"write_images": False}, "the same with --write_images false: detections (CSV, "
                                                    "GeoJSON, ASAP XML), counts and report, no map or overlay PNGs")
    ours("ours_tiled", {"whole_max_px": 0}, f"the same with --whole_max_px 0: every HPF in the bundle's "
                                            f"{tile}px tiles with {overlap} px context")
    cfg = {"images": [it["image"] for it in datalist], "weights": weights, "threads": args.threads,
           "tile_px": tile, "batch": args.segmitos_batch, "overlap": args.segmitos_monai_overlap,
           "mode": args.segmitos_monai_mode, "num_workers": bundle["num_workers"],
           "prob_out": str(work / "prob_monai.f32"), "result_out": str(work / "result_monai.json")}
    what = (f"MONAI model-zoo style: LoadImaged(PILReader) + ScaleIntensityRanged in a Dataset/DataLoader, "
            f"SlidingWindowInferer(roi_size {tile}, sw_batch_size {args.segmitos_batch}, overlap "
            f"{args.segmitos_monai_overlap}, mode {args.segmitos_monai_mode!r}) with the bundle's prepared network, "
            f"softmax, num_workers {bundle['num_workers']}")
    print(f"  monai_sliding_window: {what} (fresh process) ...", flush=True)
    result = run_worker(sys.executable, "segmitos-monai", cfg, work / "cfg_monai.json", timeout)
    if isinstance(result, str):
        raise RuntimeError(result)
    result.update({"pipeline": what, "_maps": read_captured(cfg["prob_out"], result["captured_shapes"])})
    runs["monai_sliding_window"] = result
    tiatoolbox("tiatoolbox_tiles", tile, f"SemanticSegmentor(patch_mode=False, auto_get_mask=False), "
                                         f"IOSegmentorConfig(baseline resolution, patch_input_shape {tile}, "
                                         f"patch_output_shape and stride {tile - 2 * overlap}): the bundle's tiles, "
                                         f"TorchScript network, batch {args.segmitos_batch}, num_workers "
                                         f"{bundle['num_workers']}, return_probabilities")
    tiatoolbox("tiatoolbox_one_tile", one_tile, f"the same with patch_input_shape {one_tile} and patch_output_shape "
                                                f"and stride {side}: one tile per HPF (the HPF with {overlap} px of "
                                                f"padding round it), the closest to the bundle's one pass")

    # Agreement and detections (the bundle's post-processing at its thresholds on every pipeline's maps).
    ref = runs["ours"]["_maps"]
    for key, run in runs.items():
        if "skipped" in run:
            continue
        maps = run.pop("_maps")
        if len(maps) != n or any(m.shape != (side, side) for m in maps):
            raise RuntimeError(f"{key}: {len(maps)} maps of shapes {[m.shape for m in maps]}, expected {n} x "
                               f"{side} px")
        per = [segmitos_compare(m, r, overlap) for m, r in zip(maps, ref)]
        run["vs_ours_prob"] = {k: max(p[k] for p in per) for k in ("max_abs", "interior_max_abs")}
        run["vs_ours_prob"]["mean_abs"] = float(np.mean([p["mean_abs"] for p in per]))
        dets = [detect_mitoses(m, MPP, bundle["sigma_um"], bundle["min_mean_score"], bundle["min_area_um2"])
                for m in maps]
        pooled = sum((mitosis_counts(t, d[:, :2], radius_px=bundle["radius_px"]) for t, d in zip(truths, dets)),
                     DetectionCounts())
        run["detections"] = {"n": int(sum(map(len, dets))), "tp": pooled.tp, "fp": pooled.fp, "fn": pooled.fn,
                             "f1": None if math.isnan(pooled.f1) else pooled.f1,
                             "positions_xy": [d[:, :2].round(2).tolist() for d in dets]}
        run["_dets"] = dets
    ref_dets = runs["ours"]["_dets"]
    for key, run in runs.items():
        if "skipped" in run:
            continue
        dets = run.pop("_dets")
        if key != "ours":  # detections paired one to one with ours within 1 px
            run["detections"]["same_as_ours_within_1px"] = sum(
                len(match_points(mine[:, :2], theirs[:, :2], 1.0)) for mine, theirs in zip(ref_dets, dets))
    base = runs["ours"]
    entry["ratios_over_ours"] = {key: {"pipeline_s": run["total_s"] / base["total_s"],
                                       "subprocess_wall_s": run["subprocess_wall_s"] / base["subprocess_wall_s"],
                                       "network_s": run["network_forward_s"] / base["network_forward_s"],
                                       "peak_rss_largest_process": run["peak_rss_largest_process_mib"]
                                       / base["peak_rss_largest_process_mib"]}
                                 for key, run in runs.items() if "skipped" not in run and key != "ours"}
    entry["load_average_at_end"] = list(os.getloadavg())
    write()


def print_segmitos_table(section: dict[str, Any]) -> None:
    print(f"\n{'segmitos HPFs':22s} {'pipeline':20s} {'wall s':>8s} {'net s':>8s} {'peak MiB':>9s} {'max|dp|':>9s} "
          f"{'interior':>9s} {'F1':>6s} {'ratio':>7s}")
    for e in section["slides"]:
        for key, run in e["runs"].items():
            if "skipped" in run:
                print(f"{e['name']:22s} {key:20s} skipped: {run['skipped'][:200]}")
                continue
            v, d = run["vs_ours_prob"], run["detections"]
            ratio = e["ratios_over_ours"].get(key, {}).get("pipeline_s", 1.0)
            f1 = f"{d['f1']:.3f}" if d["f1"] is not None else "-"
            print(f"{e['name']:22s} {key:20s} {run['total_s']:8.1f} {run['network_forward_s']:8.1f} "
                  f"{run['peak_rss_largest_process_mib']:9.0f} {v['max_abs']:9.2e} {v['interior_max_abs']:9.2e} "
                  f"{f1:>6s} {ratio:7.2f}")


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{'slide':22s} {'pipeline':11s} {'wall s':>8s} {'net s':>8s} {'VmHWM MiB':>10s} {'positions':>10s} "
          f"{'max|dp|':>9s} {'ratio':>7s}")
    for e in report["slides"]:
        if "skipped" in e:
            print(f"{e['name']:22s} skipped: {e['skipped']}")
            continue
        tia, ratios = e.get("tiatoolbox", {}), e.get("ratios_tiatoolbox_over_ours", {})
        a = e.get("agreement", {})
        o = e["ours"]
        print(f"{e['name']:22s} {'ours':11s} {o['total_s']:8.1f} {o['network_forward_s']:8.1f} {o['vmhwm_mib']:10.0f} "
              f"{o['positions_evaluated']:10d} {'':>9s} {'1.0':>7s}")
        zoo = e.get("monai", {})
        if "skipped" in zoo:
            print(f"{'':22s} MONAI skipped: {zoo['skipped'][:200]}")
        elif zoo:
            print(f"{'':22s} {'MONAI':11s} {zoo['total_s']:8.1f} {zoo['network_forward_s']:8.1f} "
                  f"{zoo['vmhwm_mib']:10.0f} {zoo['positions_evaluated']:10d} "
                  f"{zoo['prob_max_abs_diff_vs_ours']:9.1e} {e['ratios_monai_over_ours']['pipeline_s']:7.1f}")
        if "skipped" in tia:
            print(f"{'':22s} TIAToolbox skipped: {tia['skipped'][:200]}")
            continue
        dp = a.get("prob_max_abs_diff")
        print(f"{'':22s} {'TIAToolbox':11s} {tia['total_s']:8.1f} {tia['network_forward_s']:8.1f} "
              f"{tia['vmhwm_mib']:10.0f} {tia['positions_evaluated']:10d} "
              f"{(f'{dp:.1e}' if dp is not None else '-'):>9s} {ratios['pipeline_s']:7.1f}")


# ---- main ------------------------------------------------------------------------------------------------------


def print_dmmn_table(section: dict[str, Any]) -> None:
    print(f"\n{'dmmn slide':22s} {'pipeline':11s} {'wall s':>8s} {'net s':>8s} {'peak MiB':>9s} {'VmHWM':>7s} "
          f"{'same lbl':>9s} {'max|dp|':>9s} {'ratio':>7s}")
    for e in section["slides"]:
        o, tia, a = e["ours"], e.get("tiatoolbox", {}), e.get("agreement", {})
        print(f"{e['name']:22s} {'ours':11s} {o['total_s']:8.1f} {o['network_forward_s']:8.1f} "
              f"{o['peak_rss_largest_process_mib']:9.0f} {o['vmhwm_mib']:7.0f} {'':>9s} {'':>9s} {'1.0':>7s}")
        zoo = e.get("monai", {"skipped": "not run"})
        if "skipped" in zoo:
            print(f"{'':22s} MONAI skipped: {zoo['skipped'][:200]}")
        else:
            za = zoo["agreement"]
            print(f"{'':22s} {'MONAI':11s} {zoo['total_s']:8.1f} {zoo['network_forward_s']:8.1f} "
                  f"{zoo['peak_rss_largest_process_mib']:9.0f} {zoo['vmhwm_mib']:7.0f} "
                  f"{za['all']['same_label_fraction']:9.5f} {za['all']['prob_max_abs_diff']:9.2e} "
                  f"{e['ratios_monai_over_ours']['pipeline_s']:7.2f}   (interior: same label "
                  f"{za['interior']['same_label_fraction']:.5f}, max |dp| {za['interior']['prob_max_abs_diff']:.2e})")
        if "skipped" in tia:
            print(f"{'':22s} TIAToolbox skipped: {tia['skipped'][:200]}")
            continue
        print(f"{'':22s} {'TIAToolbox':11s} {tia['total_s']:8.1f} {tia['network_forward_s']:8.1f} "
              f"{tia['peak_rss_largest_process_mib']:9.0f} {tia['vmhwm_mib']:7.0f} "
              f"{a['all']['same_label_fraction']:9.5f} {a['all']['prob_max_abs_diff']:9.2e} "
              f"{e['ratios_tiatoolbox_over_ours']['pipeline_s']:7.2f}")
        for part in ("interior", "border"):
            print(f"{'':22s}   {part:9s} tiles {a[part]['tiles']:5d}: same label {a[part]['same_label_fraction']:.5f}, "
                  f"max |dp| {a[part]['prob_max_abs_diff']:.2e}, mean {a[part]['prob_mean_abs_diff']:.2e}")
        pr = a.get("probes", {})
        if "error" not in pr:
            print(f"{'':22s}   probes: read path {pr.get('read_path_prob_max_abs_diff')}, padding (border) "
                  f"{pr.get('padding_prob_max_abs_diff_border')}, runtime {pr.get('runtime_prob_max_abs_diff')}, "
                  f"folding {pr.get('folding_channels_last_prob_max_abs_diff')}")


def load_sections(path: Path) -> dict[str, Any]:
    """The per-bundle sections of an existing results file (the first format, one ScanNet report, is scannet's)."""
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    if "bundles" in old:
        return old["bundles"]
    return {"scannet": old} if old.get("benchmark") == "bench_peers" else {}


def run_scannet(args: argparse.Namespace, work: Path, cache: Path, section: dict[str, Any], write: Any) -> None:
    """ScanNet: the shipped network over phantoms and the SVS through PatchPredictor and through ours."""
    from bench_scannet import LEVEL0_MPP, SLIDE_SEED
    from pathbundles.phantom import make_phantom

    sizes = [int(s) for s in (("2048" if args.quick else "4096,8192") if args.sizes is None else args.sizes).split(",")
             if s]
    section["settings"] = {"threads": args.threads, "lp": args.lp, "alpha": 1, "ours_batch_rois": 1,
                           "tiatoolbox_patch_batch": args.patch_batch, "num_workers": args.num_workers,
                           "scan_mpp": 1.0, "stride_px": 32, "patch_px": 244, "tissue_mpp": 8.0}
    section["slides"] = []
    weights, section["weights"] = snapshot_weights(work)
    torchscript = work / "scannet_torchscript.pt"
    section["torchscript"] = export_torchscript(weights, torchscript)
    section["calibration_project_env"] = calibrate_here(weights, torchscript, calibration_patches(CALIBRATION_PATCHES),
                                                        args.repeats)
    for size in sizes:
        folder = cache / f"phantom_metastasis_{size}_seed{SLIDE_SEED}"
        path = folder / "phantom_tumor_000.tif"
        if not path.exists():
            t0 = time.perf_counter()
            print(f"generating the {size} px phantom ...", flush=True)
            make_phantom(folder, kind="metastasis", n=1, seed=SLIDE_SEED, size_px=(size, size), mpp=LEVEL0_MPP)
            print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
        generator = (f"pathbundles.phantom.make_phantom(kind='metastasis', n=1, seed={SLIDE_SEED}, "
                     f"size_px=({size}, {size}), mpp={LEVEL0_MPP})")
        section["slides"].append(bench_one(f"phantom_{size}", path, "tifffile", generator, args, weights,
                                           torchscript, work))
        write()
    skipped = ("--quick" if args.quick else "--skip-svs" if args.skip_svs
               else None if args.svs.exists() else f"{args.svs} does not exist")
    if skipped:
        section["slides"].append({"name": args.svs.name, "skipped": skipped})
    else:
        section["slides"].append(bench_one(args.svs.name, args.svs, "openslide", None, args, weights, torchscript,
                                           work))


def run_dmmn(args: argparse.Namespace, work: Path, cache: Path, section: dict[str, Any], write: Any) -> None:
    """DMMN: the shipped network over multi-class phantoms through SemanticSegmentor and through the bundle."""
    sizes = [int(s) for s in (("1024" if args.quick else "4096,8192,16384") if args.dmmn_sizes is None
                              else args.dmmn_sizes).split(",") if s]
    section["settings"] = {"threads": args.threads, "batch_size": args.dmmn_batch,
                           "ours_network": "plain (BatchNorm not folded, NCHW)" if args.dmmn_plain_network else
                           "the bundle's default: BatchNorm folded, channels_last",
                           "tiatoolbox_network": "TorchScript trace of the plain network (BatchNorm not folded, NCHW)",
                           "num_workers": args.dmmn_num_workers, "mpps": list(DMMN_MPPS), "patch_px": DMMN_PATCH_PX,
                           "stride_px": DMMN_PATCH_PX, "tiatoolbox_input_px": DMMN_TILE_PX, "sizes": sizes}
    section["slides"] = []
    for size in sizes:
        section["slides"].append(bench_dmmn_one(size, args, cache, work))
        write()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundles", default="scannet,dmmn", help="bundles to run, comma separated (scannet, dmmn, "
                                                                  "segmitos, spatial_lstm; default scannet,dmmn); "
                                                                  "the sections of the others in --out are kept")
    parser.add_argument("--fresh", action="store_true", help="drop the other bundles' sections of --out")
    parser.add_argument("--quick", action="store_true", help="smoke run: one 2048 px phantom, no SVS (scannet), "
                                                             "one 1024 px phantom (dmmn)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "peers.json")
    parser.add_argument("--sizes", default=None, help="scannet: phantom level-0 sizes in px at 0.5 um/px, comma "
                                                      "separated (default 4096,8192; --quick 2048)")
    parser.add_argument("--svs", type=Path, default=DEFAULT_SVS, help="a real slide (default CMU-1-Small-Region)")
    parser.add_argument("--skip-svs", action="store_true", help="leave the real slide out")
    parser.add_argument("--skip-monai", action="store_true",
                        help="scannet, dmmn, spatial_lstm: leave MONAI's pipeline out")
    parser.add_argument("--peers-python", default=str(DEFAULT_PEERS_PYTHON),
                        help="the interpreter of TIAToolbox's virtual environment")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every pipeline (default 2)")
    parser.add_argument("--lp", type=int, default=24, help="ScanNet output tile per ROI, ours (default 24, the "
                                                           "bundle's CPU value)")
    parser.add_argument("--patch-batch", type=int, default=64, help="patches per forward pass, TIAToolbox (scannet)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers of both pipelines (scannet)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the patch-classifier calibration")
    parser.add_argument("--dmmn-sizes", default=None, help="dmmn: multi-class phantom sides in px at 0.5 um/px, comma "
                                                           "separated (default 4096,8192,16384; --quick 1024)")
    parser.add_argument("--dmmn-batch", type=int, default=2, help="dmmn: tiles per forward pass of both pipelines "
                                                                  "(default 2, the bundle's CPU value)")
    parser.add_argument("--dmmn-num-workers", type=int, default=2, help="dmmn: DataLoader workers of both pipelines "
                                                                        "(default 2, the bundle's)")
    parser.add_argument("--dmmn-plain-network", action="store_true",
                        help="dmmn: run ours with --fold_batchnorm false --channels_last false, the same plain "
                             "network as TIAToolbox's TorchScript (default: the bundle's folded channels_last one)")
    parser.add_argument("--dmmn-timeout", type=float, default=3600.0, help="dmmn: seconds per pipeline run")
    parser.add_argument("--dmmn-probes-largest", type=int, default=6, help="dmmn: interior probe tiles with the "
                                                                           "largest differences (and half as many "
                                                                           "border ones)")
    parser.add_argument("--dmmn-probes-spread", type=int, default=6, help="dmmn: probe tiles spread over the grid")
    parser.add_argument("--segmitos-hpfs", type=int, default=4, help="segmitos: phantom HPFs (default 4)")
    parser.add_argument("--segmitos-side", type=int, default=2084, help="segmitos: HPF side in px at 0.25 um/px "
                                                                        "(default 2084, TUPAC16's HPF)")
    parser.add_argument("--segmitos-batch", type=int, default=2, help="segmitos: tiles per forward pass, "
                                                                      "TIAToolbox (the bundle runs one HPF at a time)")
    parser.add_argument("--segmitos-monai-overlap", type=float, default=0.25,
                        help="segmitos: SlidingWindowInferer overlap of MONAI's pipeline (default 0.25, MONAI's)")
    parser.add_argument("--segmitos-monai-mode", default="constant",
                        help="segmitos: SlidingWindowInferer blend mode (default 'constant', MONAI's)")
    parser.add_argument("--spatial-lstm-sizes", default=None,
                        help="spatial_lstm: metastasis phantom level-0 sizes in px at 0.5 um/px, comma separated "
                             "(default 4096,8192,16384; --quick 2048)")
    parser.add_argument("--spatial-lstm-grid-batch", type=int, default=8,
                        help="spatial_lstm: grids per forward pass of MONAI's pipeline (default 8: 72 patches, the "
                             "bundle's CPU patch_batch is 64)")
    parser.add_argument("--spatial-lstm-skip-every-grid", action="store_true",
                        help="spatial_lstm: leave out the bundle's run with --tissue_grids_only False")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where phantoms are generated (default: a "
                                                                     "temporary folder)")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "CFG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        mode, cfg_path = args.worker
        worker = {"tiatoolbox": tiatoolbox_worker, "tiatoolbox-probe": tiatoolbox_probe_worker,
                  "dmmn-tiatoolbox": dmmn_tiatoolbox_worker, "dmmn-tiatoolbox-probe": dmmn_tiatoolbox_probe_worker,
                  "segmitos-tiatoolbox": segmitos_tiatoolbox_worker, "segmitos-monai": segmitos_monai_worker,
                  "bundle-ours": bundle_ours_worker}.get(mode)
        if worker is None and mode == "dmmn-monai":
            import peers_dmmn

            worker = peers_dmmn.monai_worker
        elif worker is None:
            import peers_spatial_lstm

            worker = {"spatial-lstm-tiatoolbox": peers_spatial_lstm.tiatoolbox_worker,
                      "spatial-lstm-monai": peers_spatial_lstm.monai_worker}[mode]
        print(json.dumps(worker(json.loads(Path(cfg_path).read_text()))))
        return

    import torch

    from pathbundles.atomic import atomic_path

    torch.set_num_threads(args.threads)
    bundles = [b for b in args.bundles.split(",") if b]
    unknown = set(bundles) - {"scannet", "dmmn", "segmitos", "spatial_lstm"}
    if unknown:
        parser.error(f"unknown bundles {sorted(unknown)}: expected scannet, dmmn, segmitos, spatial_lstm")
    import peers_spatial_lstm
    sections = {} if args.fresh else {k: v for k, v in load_sections(args.out).items() if k not in bundles}
    report: dict[str, Any] = {"benchmark": "bench_peers", "bundles": sections,
                              "note": "one section per bundle, each with its own date, command, machine and load"}
    started = time.perf_counter()

    def write() -> None:
        report["updated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        with atomic_path(args.out) as tmp_out:
            tmp_out.write_text(json.dumps(report, indent=2) + "\n")

    runners = {"scannet": run_scannet, "dmmn": run_dmmn, "segmitos": run_segmitos,
               "spatial_lstm": peers_spatial_lstm.run_spatial_lstm}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cache = args.cache_dir or work
        cache.mkdir(parents=True, exist_ok=True)
        for bundle in bundles:
            t0 = time.perf_counter()
            section: dict[str, Any] = {
                "benchmark": "bench_peers", "bundle": bundle, "quick": args.quick, "complete": False,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": sys.argv[1:] if argv is None else argv, "load_average_at_start": list(os.getloadavg()),
                "machine": machine_info(("torch", "monai", "numpy", "openslide-python", "tifffile", "pillow"))}
            report["bundles"][bundle] = section
            (work / bundle).mkdir(exist_ok=True)
            runners[bundle](args, work / bundle, cache, section, write)
            section["complete"] = True
            section["load_average_at_end"] = list(os.getloadavg())
            section["benchmark_wall_s"] = time.perf_counter() - t0
            write()
    tables = {"scannet": print_table, "dmmn": print_dmmn_table, "segmitos": print_segmitos_table,
              "spatial_lstm": peers_spatial_lstm.print_table}
    for bundle in bundles:
        tables[bundle](report["bundles"][bundle])
    print(f"\n{time.perf_counter() - started:.0f} s; wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
