"""ScanNet's shipped network through TIAToolbox's PatchPredictor and through this project's pipeline, side by side.

Issue #22 ("performance against real peers"). One network (``bundles/scannet/models/model.pt``, loaded as
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

Run (2 cores, about 10 min under load; the 8192 px phantom's TIAToolbox run is most of it):
    ulimit -s 32768; PYTHONPATH=common MPLBACKEND=Agg .venv/bin/python benchmarks/bench_peers.py
TIAToolbox's interpreter (default ``../peers-venv/bin/python`` beside the repository, or ``--peers-python``):
    python3 -m venv ../peers-venv && ../peers-venv/bin/pip install tiatoolbox==2.1.3
Smoke run (2048 px phantom only, about 2 min):
    ... .venv/bin/python benchmarks/bench_peers.py --quick --out /tmp/peers_quick.json
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
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

from machine import machine_info, vm_status_kib  # noqa: E402  (benchmarks/machine.py, stdlib only: both venvs)

# This module is also run by TIAToolbox's interpreter (--worker tiatoolbox...), which has no MONAI and no
# pathbundles dependencies: everything from the project (bench_scannet, pathbundles) is imported inside the
# functions that run in the project's environment, and the TIAToolbox workers get every number through their cfg.

SHIPPED_MODEL = REPO / "bundles" / "scannet" / "models" / "model.pt"
DEFAULT_SVS = REPO.parent / "shared" / "data" / "CMU-1-Small-Region.svs"
DEFAULT_PEERS_PYTHON = Path(os.environ.get("PATHBUNDLES_PEERS_PYTHON",
                                           REPO.parent / "peers-venv" / "bin" / "python"))
PROBES_LARGEST, PROBES_SPREAD, CALIBRATION_PATCHES = 8, 8, 16


# ---- TIAToolbox side (TIAToolbox's interpreter) ----------------------------------------------------------------


def tiatoolbox_model(torchscript: str):
    """The TorchScript ScanNet as a TIAToolbox ``ModelABC`` patch classifier (preproc, infer_batch, postproc)."""
    import torch
    from tiatoolbox.models.models_abc import ModelABC

    class TorchScriptPatchClassifier(ModelABC):
        """A TorchScript patch classifier: uint8 RGB patches (H, W, 3) in, tumour probabilities out.

        ``preproc`` is the bundle's ScaleIntensityRange(0, 255, -1, 1) with MONAI's float32 operations;
        ``infer_batch`` returns the softmax over the classes, (N, 2), and adds up the seconds spent in the network's
        forward passes (``seconds``, ``calls``)."""

        def __init__(self, path: str) -> None:
            super().__init__()
            self.net = torch.jit.load(path, map_location="cpu").eval()
            self.class_dict = {0: "normal", 1: "tumour"}
            self.seconds, self.calls = 0.0, 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        @staticmethod
        def preproc(image: np.ndarray) -> np.ndarray:
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
                logits = model(x)
                model.seconds += time.perf_counter() - start
                model.calls += 1
                return torch.softmax(logits.float(), 1)[:, :, 0, 0].cpu().numpy()

    return TorchScriptPatchClassifier(torchscript)


def tiatoolbox_worker(cfg: dict) -> dict[str, Any]:
    """Run TIAToolbox's PatchPredictor over the slide at exactly the positions in ``cfg["positions"]`` (a boolean
    map, our grid) in this fresh process; returns timings, counts and VmHWM and saves the probability map."""
    import torch

    torch.set_num_threads(cfg["threads"])
    start = time.perf_counter()
    import zarr
    from tiatoolbox.models.engine.io_config import IOPatchPredictorConfig
    from tiatoolbox.models.engine.patch_predictor import PatchPredictor

    import_s = time.perf_counter() - start
    model = tiatoolbox_model(cfg["torchscript"])
    wanted = np.load(cfg["positions"])
    stride, patch = cfg["stride_px"], cfg["patch_px"]
    dataset_info: dict[str, Any] = {}

    class PositionsPatchPredictor(PatchPredictor):
        """PatchPredictor whose WSI dataset evaluates exactly the grid positions of ``wanted``: TIAToolbox's own
        mask filter runs first (patches whose footprint touches the mask), then its coordinates are cut down to
        ours (patch centre on tissue)."""

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
            dataset_info.update({"mask_rule_positions": int(len(coords)), "positions_kept": int(keep.sum()),
                                 "dataset_s": time.perf_counter() - t0})
            return loader

    hwm_before = vm_status_kib("VmHWM")
    start = time.perf_counter()
    engine = PositionsPatchPredictor(model=model, batch_size=cfg["patch_batch"], num_workers=cfg["num_workers"],
                                     device="cpu", verbose=False)
    ioconfig = IOPatchPredictorConfig(input_resolutions=[{"units": "mpp", "resolution": cfg["scan_mpp"]}],
                                      patch_input_shape=(patch, patch), stride_shape=(stride, stride))
    out = engine.run(images=[Path(cfg["slide"])], masks=[np.load(cfg["mask"])], patch_mode=False,
                     ioconfig=ioconfig, save_dir=Path(cfg["save_dir"]), overwrite=True, output_type="zarr",
                     return_probabilities=True)
    total = time.perf_counter() - start
    hwm = vm_status_kib("VmHWM")
    store = zarr.open(str(next(iter(out.values()))), mode="r")
    prob, coords = np.asarray(store["probabilities"]), np.asarray(store["coordinates"])
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
    model = tiatoolbox_model(cfg["torchscript"])
    batch = torch.from_numpy(model.preproc(np.load(cfg["calibration_patches"])))
    times = []
    for _ in range(1 + cfg["calibration_repeats"]):
        t0 = time.perf_counter()
        model.infer_batch(model, batch, device="cpu")
        times.append(time.perf_counter() - t0)
    return {**calibration_entry(times[1:], len(batch),
                                f"TorchScript in TIAToolbox's infer_batch, torch {torch.__version__}"),
            "probe_level0_bounds": level0}


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
    shutil.copyfile(SHIPPED_MODEL, weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    mtime = datetime.datetime.fromtimestamp(SHIPPED_MODEL.stat().st_mtime, datetime.timezone.utc)
    return str(weights), (f"{SHIPPED_MODEL.relative_to(REPO)} (sha256 {digest}..., modified "
                          f"{mtime.isoformat(timespec='seconds')})")


def export_torchscript(weights: str, path: Path) -> dict[str, Any]:
    """Trace the eval-mode network (as ``_load_net`` loads it) to TorchScript and check it against the eager one."""
    import torch
    from bench_scannet import _load_net
    from pathbundles.scannet import PATCH_PX

    net = _load_net(weights)
    x = torch.rand(4, 3, PATCH_PX + 64, PATCH_PX + 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in torch 2.13, and still what crosses versions
        traced = torch.jit.trace(net, x[:1, :, :PATCH_PX, :PATCH_PX])
        diff = float((traced(x) - net(x)).abs().max())
        traced.save(str(path))
    return {"method": "torch.jit.trace of the eval-mode network (BatchNorm not folded, contiguous NCHW)",
            "max_abs_logit_diff_vs_eager": diff, "checked_input": list(x.shape)}


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
        if "skipped" in tia:
            print(f"{'':22s} TIAToolbox skipped: {tia['skipped'][:200]}")
            continue
        dp = a.get("prob_max_abs_diff")
        print(f"{'':22s} {'TIAToolbox':11s} {tia['total_s']:8.1f} {tia['network_forward_s']:8.1f} "
              f"{tia['vmhwm_mib']:10.0f} {tia['positions_evaluated']:10d} "
              f"{(f'{dp:.1e}' if dp is not None else '-'):>9s} {ratios['pipeline_s']:7.1f}")


# ---- main ------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: one 2048 px phantom, no SVS (2-3 min)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "peers.json")
    parser.add_argument("--sizes", default=None, help="phantom level-0 sizes in px at 0.5 um/px, comma separated "
                                                      "(default 8192; --quick 2048)")
    parser.add_argument("--svs", type=Path, default=DEFAULT_SVS, help="a real slide (default CMU-1-Small-Region)")
    parser.add_argument("--skip-svs", action="store_true", help="leave the real slide out")
    parser.add_argument("--peers-python", default=str(DEFAULT_PEERS_PYTHON),
                        help="the interpreter of TIAToolbox's virtual environment")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every pipeline (default 2)")
    parser.add_argument("--lp", type=int, default=24, help="ScanNet output tile per ROI, ours (default 24, the "
                                                           "bundle's CPU value)")
    parser.add_argument("--patch-batch", type=int, default=64, help="patches per forward pass, TIAToolbox")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers of both pipelines")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the patch-classifier calibration")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where phantoms are generated (default: a "
                                                                     "temporary folder)")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "CFG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        mode, cfg_path = args.worker
        worker = {"tiatoolbox": tiatoolbox_worker, "tiatoolbox-probe": tiatoolbox_probe_worker}[mode]
        print(json.dumps(worker(json.loads(Path(cfg_path).read_text()))))
        return

    import torch

    from bench_scannet import LEVEL0_MPP, SLIDE_SEED
    from pathbundles.atomic import atomic_path
    from pathbundles.phantom import make_phantom

    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in (("2048" if args.quick else "8192") if args.sizes is None else args.sizes).split(",") if s]
    load_start = list(os.getloadavg())
    started = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "bench_peers", "quick": args.quick, "complete": False,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv[1:] if argv is None else argv, "load_average_at_start": load_start,
        "machine": machine_info(("torch", "monai", "numpy", "openslide-python", "tifffile", "pillow")),
        "settings": {"threads": args.threads, "lp": args.lp, "alpha": 1, "ours_batch_rois": 1,
                     "tiatoolbox_patch_batch": args.patch_batch, "num_workers": args.num_workers,
                     "scan_mpp": 1.0, "stride_px": 32, "patch_px": 244, "tissue_mpp": 8.0},
        "slides": []}

    def write() -> None:
        report["benchmark_wall_s"] = time.perf_counter() - started
        with atomic_path(args.out) as tmp_out:
            tmp_out.write_text(json.dumps(report, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cache = args.cache_dir or work
        cache.mkdir(parents=True, exist_ok=True)
        weights, report["weights"] = snapshot_weights(work)
        torchscript = work / "scannet_torchscript.pt"
        report["torchscript"] = export_torchscript(weights, torchscript)
        report["calibration_project_env"] = calibrate_here(weights, torchscript,
                                                           calibration_patches(CALIBRATION_PATCHES), args.repeats)
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
            report["slides"].append(bench_one(f"phantom_{size}", path, "tifffile", generator, args, weights,
                                              torchscript, work))
            write()
        skipped = ("--quick" if args.quick else "--skip-svs" if args.skip_svs
                   else None if args.svs.exists() else f"{args.svs} does not exist")
        if skipped:
            report["slides"].append({"name": args.svs.name, "skipped": skipped})
        else:
            report["slides"].append(bench_one(args.svs.name, args.svs, "openslide", None, args, weights, torchscript,
                                              work))
    report["complete"] = True
    report["load_average_at_end"] = list(os.getloadavg())
    write()
    print_table(report)
    print(f"\nload average start {load_start} end {report['load_average_at_end']}; "
          f"{report['benchmark_wall_s']:.0f} s; wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
