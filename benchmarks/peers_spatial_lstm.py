"""Spatial LSTM's shipped network through TIAToolbox, through MONAI's pipeline and through the bundle (issue #22).

``bench_peers.py --bundles spatial_lstm`` runs it (``--spatial-lstm-sizes``); the numbers are in benchmarks/README.md.
Neither toolkit has an engine for a grid of patches read by an LSTM, so each peer runs the network the way its users
would wire it:

(a) Ours: the bundle's own inference (``monai.bundle.run`` of bundles/spatial_lstm/configs/inference.json, what
    ``python -m monai.bundle run`` calls) with its CPU defaults (no TTA, ``tile_px`` 32, ``patch_batch`` 64, batch 1,
    2 DataLoader workers, BatchNorm folded, channels_last), writing all its outputs. Each lattice patch (256 px at
    stride 64 at 1.0 um/px, the network sees the 224 px centre) goes through the CNN once per ROI, then the LSTM
    reads each 3 x 3 grid of features; since 0.10.0 (``tissue_grids_only``) only the grids centred on tissue and
    the lattice patches they read, each once per slide (the ROIs' shared margins are cached). Forward hooks time
    ``cnn``, ``lstm`` and ``classifier``; ``SlideMapWriter``'s canvas (the stitched map before the tissue mask) is
    copied out for the comparison. ``ours_every_grid``: the
    same with ``--tissue_grids_only False`` (every grid of every ROI, as before 0.10.0;
    ``--spatial-lstm-skip-every-grid`` leaves it out).
(b) TIAToolbox 2.1.3 (its own virtual environment): ``PatchPredictor`` in WSI mode computes the CNN features of the
    lattice patches (``IOPatchPredictorConfig``: 256 px at 1.0 um/px, stride 64, the grid TIAToolbox lays from the
    slide's origin is our lattice), the model's ``preproc`` takes the 224 px centre and the bundle's (x - 128) / 128,
    ``infer_batch`` returns the features; only the lattice patches that some wanted grid needs are evaluated
    (``positions_patch_predictor``). Then, in the same process, the LSTM and classifier (TorchScript) read the 3 x 3
    grids of those features. Both networks cross over as TorchScript traces of the folded network (NCHW), checked
    against the eager one.
(c) MONAI's own pipeline as the model zoo wires a patch model: ``MaskedPatchWSIDataset`` at our positions (each
    item one grid: 1536 level-0 px at 0.5 um/px, area-averaged to 768 px at 1.0 um/px by ``Resized``), the bundle's
    ``NormalizeIntensityd``, the bundle's ``GridToPatchesd`` (9 centre crops), ``DataLoader`` (2 workers) and the
    network's forward (the bundle's prepared network: BatchNorm folded, channels_last), so each patch goes through
    the CNN once per grid it belongs to (up to 9 times): the paper's own inference.

Positions: map pixel (r, c) is the grid whose top-left patch window starts at scan pixel (64 c, 64 r) (its centre
at 64 k + 384 px); wanted are those whose centre lies on the bundle's Otsu tissue mask (8 um/px), the rule its
writer applies (``tissue_only``). Ours evaluates whole ROIs (32 x 32 map pixels each), the peers exactly the wanted
positions. Probabilities are compared at the wanted positions, interior ones (the grid's 768 px footprint inside the
slide: padding differs, 255 in TIAToolbox, the reader's fill in ours) apart.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SPATIAL_LSTM_CONFIG = REPO / "bundles" / "spatial_lstm" / "configs" / "inference.json"
SPATIAL_LSTM_MODEL = REPO / "bundles" / "spatial_lstm" / "models" / "model.pt"
HEAD_BATCH = 1024  # grids per call of the LSTM head in TIAToolbox's process


# ---- TIAToolbox side (TIAToolbox's interpreter: numpy, torch and tiatoolbox only) ----------------------------------


def grid_indices(positions: np.ndarray, grid_size: int, grid_step: int) -> tuple[np.ndarray, np.ndarray]:
    """Lattice rows and columns (P, G*G) of the patches of each grid (P, 2) (map row, column), raster order: patch
    (u, v) of the grid at map pixel (r, c) is lattice patch (r + u * grid_step, c + v * grid_step). The numpy twin
    of ``pathbundles.spatial_lstm._grid_cells``: TIAToolbox's environment has no MONAI, so it cannot import it."""
    offsets, shape = np.arange(grid_size) * grid_step, (len(positions), grid_size, grid_size)
    rows = np.broadcast_to(positions[:, 0, None, None] + offsets[None, :, None], shape)
    cols = np.broadcast_to(positions[:, 1, None, None] + offsets[None, None, :], shape)
    cells = (len(positions), grid_size * grid_size)
    return rows.reshape(cells), cols.reshape(cells)


def lattice_needed(wanted: np.ndarray, grid_size: int, grid_step: int) -> np.ndarray:
    """The lattice patches (boolean, map shape + (G - 1) * grid_step) that the grids at ``wanted`` read."""
    extra = (grid_size - 1) * grid_step
    needed = np.zeros((wanted.shape[0] + extra, wanted.shape[1] + extra), bool)
    rows, cols = grid_indices(np.argwhere(wanted), grid_size, grid_step)
    needed[rows.ravel(), cols.ravel()] = True
    return needed


def tiatoolbox_worker(cfg: dict) -> dict[str, Any]:
    """TIAToolbox's PatchPredictor computes the CNN features of the needed lattice patches, then the TorchScript
    LSTM head reads each wanted grid of them; saves the probability map, writes timings and VmHWM."""
    import torch

    torch.set_num_threads(cfg["threads"])
    start = time.perf_counter()
    import tiatoolbox.models.engine.patch_predictor  # noqa: F401  (the import's seconds, counted apart)
    from bench_peers import run_patch_predictor_at, tiatoolbox_model
    from machine import machine_info, vm_status_kib

    import_s = time.perf_counter() - start
    o, crop = cfg["crop_offset_px"], cfg["crop_px"]

    def normalise(image: np.ndarray) -> np.ndarray:  # the 224 px centre, then NormalizeIntensityd(128, 128)
        return (image[o:o + crop, o:o + crop].astype(np.float32) - 128.0) / 128.0

    model = tiatoolbox_model(cfg["cnn_torchscript"], [f"feature{i}" for i in range(cfg["feature_size"])],
                             normalise=normalise, features=True)
    head = torch.jit.load(cfg["head_torchscript"], map_location="cpu").eval()
    needed, wanted = np.load(cfg["lattice"]), np.load(cfg["positions"])
    stride = cfg["stride_px"]
    info: dict[str, Any] = {}
    hwm_before = vm_status_kib("VmHWM")
    start = time.perf_counter()
    engine, features, coords = run_patch_predictor_at(model, needed, cfg, info, auto_get_mask=False)
    features_s = time.perf_counter() - start
    features = features.astype(np.float32, copy=False)
    lattice = np.zeros((*needed.shape, features.shape[1]), np.float32)
    have = np.zeros(needed.shape, bool)
    lattice[coords[:, 1] // stride, coords[:, 0] // stride] = features
    have[coords[:, 1] // stride, coords[:, 0] // stride] = True
    positions = np.argwhere(wanted)
    rows, cols = grid_indices(positions, cfg["grid_size"], cfg["grid_step"])
    complete = have[rows, cols].all(1)
    prob_map = np.full(wanted.shape, np.nan, np.float32)
    t0, head_calls = time.perf_counter(), 0
    with torch.inference_mode():
        for part in np.array_split(np.flatnonzero(complete), max(1, -(-int(complete.sum()) // HEAD_BATCH))):
            if len(part):
                grids = torch.from_numpy(lattice[rows[part], cols[part]])  # (n, G*G, D)
                prob_map[positions[part, 0], positions[part, 1]] = head(grids).numpy()
                head_calls += 1
    head_s = time.perf_counter() - t0
    total = time.perf_counter() - start
    hwm = vm_status_kib("VmHWM")
    np.save(cfg["map_out"], prob_map)
    result = {"mode": "tiatoolbox", "import_s": import_s, "total_s": total, "features_s": features_s,
              "lstm_head_s": head_s, "lstm_head_calls": head_calls, "cnn_forward_s": model.seconds,
              "network_forward_s": model.seconds + head_s, "network_calls": model.calls + head_calls,
              "lattice_patches_evaluated": int(len(features)), "lattice_patches_needed": int(needed.sum()),
              "positions_evaluated": int(complete.sum()), "positions_wanted": int(len(positions)),
              "vmhwm_before_pipeline_mib": hwm_before / 1024, "vmhwm_mib": hwm / 1024,
              "num_workers": cfg["num_workers"], "threads": torch.get_num_threads(), "patch_batch": cfg["patch_batch"],
              "reader": type(engine.dataloader.dataset.reader).__name__ if engine.dataloader.dataset.reader else None,
              "output": "zarr (features as 'probabilities', coordinates), then the map in memory", **info,
              "environment": machine_info(("tiatoolbox", "torch", "numpy", "zarr", "openslide-python", "tifffile"))}
    Path(cfg["result_out"]).write_text(json.dumps(result))
    return result


# ---- project side (the project's interpreter) ----------------------------------------------------------------------


def monai_worker(cfg: dict) -> dict[str, Any]:
    """MONAI's pipeline (c) in this fresh process: MaskedPatchWSIDataset of whole grids at the wanted positions,
    the network's forward per grid; saves the probability map, writes timings and VmHWM."""
    import torch

    torch.set_num_threads(cfg["threads"])
    start = time.perf_counter()
    from monai.data import DataLoader, MaskedPatchWSIDataset
    from monai.transforms import CastToTyped, Compose, NormalizeIntensityd, Resized
    from monai.utils import ProbMapKeys, WSIPatchKeys

    from bench_peers import bundle_networks
    from machine import vm_status_kib
    from pathbundles import wsi
    from pathbundles.spatial_lstm import GridToPatchesd

    import_s = time.perf_counter() - start
    net = bundle_networks(Path(cfg["config"]), cfg["weights"])["prepared"]
    wanted = np.load(cfg["positions"])
    step0, read0, read_px = cfg["step_level0_px"], cfg["read_level0_px"], cfg["read_px"]
    centre = cfg["grid_size"] ** 2 // 2

    class PositionsMaskedPatchWSIDataset(MaskedPatchWSIDataset):
        """MaskedPatchWSIDataset at the wanted grid positions (MONAI's own mask rule, patches centred on the pixels
        of a mask at ``mask_level``, lays its grid elsewhere)."""

        def _evaluate_patch_locations(self, sample):
            rc = np.argwhere(wanted)
            sample.update({WSIPatchKeys.SIZE.value: (read0, read0), WSIPatchKeys.LEVEL.value: 0,
                           ProbMapKeys.NAME.value: os.path.basename(sample["image"]),
                           ProbMapKeys.COUNT.value: len(rc), ProbMapKeys.SIZE.value: wanted.shape})
            return [{**sample, WSIPatchKeys.LOCATION.value: p * step0, ProbMapKeys.LOCATION.value: p} for p in rc]

    transform = Compose([CastToTyped(keys="image", dtype=torch.float32),
                         Resized(keys="image", spatial_size=(read_px, read_px), mode="area"),
                         NormalizeIntensityd(keys="image", subtrahend=128.0, divisor=128.0),
                         GridToPatchesd(keys="image", grid_size=cfg["grid_size"], crop_px=cfg["crop_px"],
                                        label_key=None)])
    hwm_before = vm_status_kib("VmHWM")
    start = time.perf_counter()
    dataset = PositionsMaskedPatchWSIDataset([{"image": cfg["slide"]}], patch_size=read0, patch_level=0,
                                             transform=transform, reader=wsi.TiledTiffWSIReader)
    loader = DataLoader(dataset, batch_size=cfg["grid_batch"], num_workers=cfg["num_workers"], shuffle=False)
    setup = time.perf_counter() - start
    rc = np.array([s[ProbMapKeys.LOCATION.value] for s in dataset.data]).reshape(-1, 2)
    prob = np.full(wanted.shape, np.nan, np.float32)
    done, seconds, calls = 0, 0.0, 0
    with torch.inference_mode():
        for batch in loader:
            t0 = time.perf_counter()
            logits = net(torch.as_tensor(batch["image"]))
            seconds += time.perf_counter() - t0
            calls += 1
            p = torch.sigmoid(logits[:, centre].float()).numpy()
            prob[rc[done:done + len(p), 0], rc[done:done + len(p), 1]] = p
            done += len(p)
    total = time.perf_counter() - start
    np.save(cfg["map_out"], prob)
    result = {"mode": "monai", "import_s": import_s, "setup_s": setup, "total_s": total,
              "network_forward_s": seconds, "network_calls": calls, "positions_evaluated": done,
              "cnn_patches": done * cfg["grid_size"] ** 2, "data_s": total - setup - seconds,
              "vmhwm_before_pipeline_mib": hwm_before / 1024, "vmhwm_mib": vm_status_kib("VmHWM") / 1024,
              "num_workers": cfg["num_workers"], "threads": torch.get_num_threads(), "grid_batch": cfg["grid_batch"],
              "read_level0_px": read0, "reader": "pathbundles.wsi.TiledTiffWSIReader (MONAI's WSIReader interface)"}
    Path(cfg["result_out"]).write_text(json.dumps(result))
    return result


def centre_probability_head(net: Any) -> Any:
    """The LSTM and classifier of a SpatialLSTMNet as a module: (N, G*G, D) grid features -> the centre patch's
    tumour probability (N,)."""
    import torch

    class CentreProbability(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            logits = self.net.grid_logits(features)
            return torch.sigmoid(logits[:, net.grid_size * net.grid_size // 2].float())

    return CentreProbability().eval()


def export_networks(net: Any, folder: Path, crop_px: int) -> dict[str, Any]:
    """TorchScript of the folded network's CNN (patches -> features) and of its head (grid features -> centre
    probability), each checked against the eager module."""
    import warnings

    import torch

    from bench_peers import export_traced

    cnn = export_traced(net.cnn, (4, 3, crop_px, crop_px), folder / "cnn_torchscript.pt")
    cnn["method"] = "torch.jit.trace of the CNN (patches -> features) of the eval-mode network, BatchNorm folded, NCHW"
    head = centre_probability_head(net)
    g2, d = net.grid_size ** 2, net.feature_size
    x = torch.randn(8, g2, d, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in torch 2.13, and still what crosses versions
        traced = torch.jit.trace(head, x[:2])
        diff = float((traced(x) - head(x)).abs().max())
        traced.save(str(folder / "head_torchscript.pt"))
    return {"cnn": cnn, "head": {"method": "torch.jit.trace of grid_logits + sigmoid of the centre patch",
                                 "max_abs_prob_diff_vs_eager": diff, "checked_input": list(x.shape)},
            "network": "the bundle's network_def with the shipped weights, BatchNorm folded (NCHW)"}


def wanted_positions(slide: Path, geometry: Any, scan_mpp: float, tissue_mpp: float) -> dict[str, Any]:
    """The map's wanted positions (grid centre on the Otsu tissue mask: the bundle's plan and the writer's
    ``tissue_only`` rule, ``map_on_tissue``), the interior ones (the grid's footprint inside the slide), the map shape
    and the slide's facts."""
    from pathbundles.slide_inference import map_on_tissue, plan_slides
    from pathbundles.wsi import open_slide

    grid = geometry.grid()
    plan = plan_slides([str(slide)], grid, scan_mpp, backend="tifffile", tissue_mpp=tissue_mpp)[0]
    if plan.error:
        raise RuntimeError(plan.error)
    with open_slide(slide, backend="tifffile") as s:
        levels = s.info()["levels"]
    (w0, h0), to_level0 = plan.level0_size, scan_mpp / plan.level0_mpp
    rows, cols = np.indices(plan.map_shape, dtype=np.float64)
    step0, footprint0 = geometry.stride_px * to_level0, geometry.grid_size * geometry.patch_px * to_level0
    interior = (cols * step0 + footprint0 <= w0) & (rows * step0 + footprint0 <= h0)
    return {"wanted": map_on_tissue(plan, grid, scan_mpp, rows, cols), "interior": interior,
            "map_shape": list(plan.map_shape), "level0_size": [w0, h0], "level0_mpp": plan.level0_mpp,
            "levels": levels, "to_level0": to_level0,
            "tissue_fraction": float(np.mean(np.asarray(plan.tissue.mask) != 0))}


def compare(ours: np.ndarray, other: np.ndarray, wanted: np.ndarray, interior: np.ndarray) -> dict[str, Any]:
    """Probabilities of another pipeline against ours at the wanted positions both evaluated: all of them and the
    interior ones."""
    out: dict[str, Any] = {}
    both = wanted & ~np.isnan(other) & ~np.isnan(ours)
    for label, where in (("all", both), ("interior", both & interior)):
        diff = np.abs(ours[where] - other[where])
        out[label] = {"positions": int(where.sum()),
                      "prob_max_abs_diff": float(diff.max()) if diff.size else None,
                      "prob_mean_abs_diff": float(diff.mean()) if diff.size else None,
                      "prob_p99_abs_diff": float(np.quantile(diff, 0.99)) if diff.size else None,
                      "decision_disagreements_at_0.5": int(((ours[where] > 0.5) != (other[where] > 0.5)).sum())}
    out["positions_wanted_not_evaluated"] = int((wanted & np.isnan(other)).sum())
    return out


def bench_size(size: int, args: Any, cache: Path, work: Path, feature_size: int, weights: str) -> dict[str, Any]:
    """The three pipelines on the metastasis phantom of ``size`` level-0 px (0.5 um/px), one fresh process each."""
    import json

    from bench_peers import read_captured, run_worker
    from bench_scannet import LEVEL0_MPP, SLIDE_SEED
    from monai.bundle import ConfigParser

    from pathbundles.phantom import make_phantom
    from pathbundles.spatial_lstm import LatticeGeometry

    parser = ConfigParser()
    parser.read_config(str(SPATIAL_LSTM_CONFIG))
    geometry = LatticeGeometry(tile_px=parser["tile_px"], grid_size=parser["grid_size"], patch_px=parser["patch_px"],
                               crop_px=parser["crop_px"], stride_px=parser["stride_px"])
    scan_mpp, tissue_mpp = float(parser["scan_mpp"]), float(parser["tissue_mpp"])
    folder = cache / f"phantom_metastasis_{size}_seed{SLIDE_SEED}"
    slide = folder / "phantom_tumor_000.tif"
    if not slide.exists():
        print(f"generating the {size} px phantom ...", flush=True)
        make_phantom(folder, kind="metastasis", n=1, seed=SLIDE_SEED, size_px=(size, size), mpp=LEVEL0_MPP)
    load_start = list(os.getloadavg())
    run = work / f"phantom_{size}"
    run.mkdir(parents=True, exist_ok=True)
    pos = wanted_positions(slide, geometry, scan_mpp, tissue_mpp)
    wanted, interior = pos["wanted"], pos["interior"]
    needed = lattice_needed(wanted, geometry.grid_size, geometry.grid_step)
    np.save(run / "positions.npy", wanted)
    np.save(run / "lattice.npy", needed)
    entry: dict[str, Any] = {
        "name": f"phantom_{size}",
        "slide": {"file": slide.name, "generator": f"pathbundles.phantom.make_phantom(kind='metastasis', n=1, "
                                                   f"seed={SLIDE_SEED}, size_px=({size}, {size}), mpp={LEVEL0_MPP})",
                  "level0_size": pos["level0_size"], "level0_mpp": pos["level0_mpp"], "levels": pos["levels"]},
        "map_shape": pos["map_shape"], "grid_positions": int(wanted.size), "positions_wanted": int(wanted.sum()),
        "positions_wanted_interior": int((wanted & interior).sum()), "tissue_fraction": pos["tissue_fraction"],
        "positions_fraction": float(wanted.mean()), "lattice_patches_needed": int(needed.sum()),
        "cnn_patches_per_grid_naive": geometry.grid_size ** 2, "load_average_at_start": load_start, "runs": {}}
    print(f"spatial_lstm {size} px: map {pos['map_shape']}, {int(wanted.sum())} grids on tissue "
          f"({100 * wanted.mean():.1f} %), {int(needed.sum())} lattice patches", flush=True)
    runs, timeout = entry["runs"], args.dmmn_timeout

    t = geometry.tile_px

    def ours_run(key: str, overrides: dict[str, Any], what: str) -> tuple[dict[str, Any], np.ndarray]:
        cfg = {"config": str(SPATIAL_LSTM_CONFIG), "threads": args.threads, "capture": "writer",
               "timed_modules": ["cnn", "lstm", "classifier"], "prob_out": str(run / f"prob_{key}.f32"),
               "result_out": str(run / f"result_{key}.json"),
               "run_kwargs": {"data_source": str(slide), "output_dir": str(run / f"out_{key}"), "ckpt_path": weights,
                              **overrides}}
        print(f"  {key} (fresh process) ...", flush=True)
        result = run_worker(sys.executable, "bundle-ours", cfg, run / f"cfg_{key}.json", timeout)
        if isinstance(result, str):
            raise RuntimeError(result)
        canvas = read_captured(cfg["prob_out"], result.pop("captured_shapes"))[0]
        rois = np.asarray(result.pop("rois_rc")[0], np.int64).reshape(-1, 2)
        covered = np.zeros(wanted.shape, bool)
        for r, c in rois:
            covered[r * t:(r + 1) * t, c * t:(c + 1) * t] = True
        # The default computes each lattice patch a wanted grid reads once per slide (LatticeFeatureCache shares
        # the ROIs' margins); every grid of every ROI means the whole lattice of each ROI.
        patches = int(lattice_needed(wanted & covered, geometry.grid_size, geometry.grid_step).sum()) \
            if overrides.get("tissue_grids_only", True) else len(rois) * geometry.lattice_px ** 2
        result.update({"pipeline": what, "rois": int(len(rois)), "positions_in_rois": int(covered.sum()),
                       "cnn_patches": patches, "positions_wanted_outside_rois": int((wanted & ~covered).sum())})
        print(f"    {result['subprocess_wall_s']:.1f} s wall, pipeline {result['total_s']:.1f} s (network "
              f"{result['network_forward_s']:.1f} s), {len(rois)} ROIs, {patches} CNN patches, "
              f"{result['peak_rss_largest_process_mib']:.0f} MiB", flush=True)
        return result, np.where(covered, canvas, np.nan).astype(np.float32)

    defaults = ("python -m monai.bundle run --config_file bundles/spatial_lstm/configs/inference.json (CPU defaults: "
                "no TTA, tile_px 32, patch_batch 64, batch 1, 2 workers, BatchNorm folded, channels_last), all outputs "
                "written")
    ours, ours_map = ours_run("ours", {}, defaults + "; tissue_grids_only true: the grids centred on tissue only")
    runs["ours"] = ours
    if not args.spatial_lstm_skip_every_grid:
        every, every_map = ours_run("ours_every_grid", {"tissue_grids_only": False},
                                    defaults + "; --tissue_grids_only False: every grid of every ROI (before 0.10.0)")
        every["agreement"] = compare(ours_map, every_map, wanted, interior)
        runs["ours_every_grid"] = every

    def peer_run(key: str, python: str, mode: str, cfg: dict[str, Any], what: str) -> None:
        print(f"  {key} (fresh process) ...", flush=True)
        result = run_worker(python, mode, cfg, run / f"cfg_{key}.json", timeout)
        if isinstance(result, str):
            runs[key] = {"skipped": result}
            print(f"    failed: {result[-800:]}", flush=True)
            return
        result.update({"pipeline": what, "agreement": compare(ours_map, np.load(cfg["map_out"]), wanted, interior)})
        runs[key] = result
        print(f"    {result['subprocess_wall_s']:.1f} s wall, pipeline {result['total_s']:.1f} s (network "
              f"{result['network_forward_s']:.1f} s), {result['peak_rss_largest_process_mib']:.0f} MiB, max |dp| "
              f"{result['agreement']['all']['prob_max_abs_diff']}", flush=True)

    if args.skip_monai:
        runs["monai"] = {"skipped": "--skip-monai"}
    elif abs(pos["level0_mpp"] - LEVEL0_MPP) > 1e-9:
        runs["monai"] = {"skipped": f"the MONAI worker reads {LEVEL0_MPP} um/px level 0 and averages 2 x 2"}
    else:
        cfg = {"config": str(SPATIAL_LSTM_CONFIG), "weights": weights, "threads": args.threads, "slide": str(slide),
               "positions": str(run / "positions.npy"), "grid_size": geometry.grid_size, "crop_px": geometry.crop_px,
               "step_level0_px": round(geometry.stride_px * pos["to_level0"]),
               "read_level0_px": round(geometry.grid_size * geometry.patch_px * pos["to_level0"]),
               "read_px": geometry.grid_size * geometry.patch_px, "grid_batch": args.spatial_lstm_grid_batch,
               "num_workers": parser["num_workers"], "map_out": str(run / "map_monai.npy"),
               "result_out": str(run / "result_monai.json")}
        peer_run("monai", sys.executable, "spatial-lstm-monai", cfg,
                 f"MaskedPatchWSIDataset (one grid per item, {cfg['read_level0_px']} level-0 px read, Resized area to "
                 f"{cfg['read_px']}) + NormalizeIntensityd + GridToPatchesd + DataLoader ({cfg['num_workers']} "
                 f"workers, batch {cfg['grid_batch']} grids) + the network's forward (folded, channels_last)")

    peers = Path(args.peers_python)
    if not peers.exists():
        runs["tiatoolbox"] = {"skipped": f"{peers} does not exist (TIAToolbox's own virtual environment)"}
    else:
        cfg = {"slide": str(slide), "cnn_torchscript": str(work / "cnn_torchscript.pt"),
               "head_torchscript": str(work / "head_torchscript.pt"), "feature_size": feature_size,
               "threads": args.threads, "patch_batch": parser.get_parsed_content("patch_batch"),
               "num_workers": parser["num_workers"], "scan_mpp": scan_mpp, "patch_px": geometry.patch_px,
               "crop_px": geometry.crop_px, "crop_offset_px": geometry.crop_offset_px,
               "stride_px": geometry.stride_px, "grid_size": geometry.grid_size, "grid_step": geometry.grid_step,
               "lattice": str(run / "lattice.npy"), "positions": str(run / "positions.npy"),
               "save_dir": str(run / "out_tiatoolbox"), "map_out": str(run / "map_tiatoolbox.npy"),
               "result_out": str(run / "result_tiatoolbox.json")}
        peer_run("tiatoolbox", str(peers), "spatial-lstm-tiatoolbox", cfg,
                 f"PatchPredictor(patch_mode=False), IOPatchPredictorConfig(mpp {scan_mpp}, patch {geometry.patch_px}, "
                 f"stride {geometry.stride_px}), TorchScript CNN (features, centre crop {geometry.crop_px} in "
                 f"preproc), batch {cfg['patch_batch']}, {cfg['num_workers']} workers; then the TorchScript LSTM head "
                 f"per grid")
    for peer in ("ours_every_grid", "monai", "tiatoolbox"):
        other = runs.get(peer, {"skipped": "not run"})
        if "skipped" not in other:
            entry[f"ratios_{peer}_over_ours"] = {
                "subprocess_wall_s": other["subprocess_wall_s"] / ours["subprocess_wall_s"],
                "pipeline_s": other["total_s"] / ours["total_s"],
                "network_s": other["network_forward_s"] / ours["network_forward_s"],
                "peak_rss": other["peak_rss_largest_process_mib"] / ours["peak_rss_largest_process_mib"]}
    entry["load_average_at_end"] = list(os.getloadavg())
    (run / "entry.json").write_text(json.dumps(entry, indent=1))
    return entry


def run_spatial_lstm(args: Any, work: Path, cache: Path, section: dict[str, Any], write: Any) -> None:
    """Spatial LSTM: the shipped network over metastasis phantoms through the bundle, MONAI and TIAToolbox."""
    import copy

    from bench_peers import bundle_networks
    from machine import snapshot_file

    from pathbundles.inference_network import prepare_for_inference

    sizes = [int(s) for s in (("2048" if args.quick else "4096,8192,16384") if args.spatial_lstm_sizes is None
                              else args.spatial_lstm_sizes).split(",") if s]
    if not SPATIAL_LSTM_MODEL.exists():
        raise SystemExit(f"{SPATIAL_LSTM_MODEL} is missing: this benchmark compares the shipped network")
    weights = str(work / "model.pt")
    section["weights"] = snapshot_file(SPATIAL_LSTM_MODEL, Path(weights))
    nets = bundle_networks(SPATIAL_LSTM_CONFIG, weights)
    folded = prepare_for_inference(copy.deepcopy(nets["eager"]), fold=True, channels_last=False)
    section["torchscript"] = export_networks(folded, work, nets["eager"].crop_px)
    section["settings"] = {"threads": args.threads, "sizes": sizes, "level0_mpp": 0.5,
                           "monai_grid_batch": args.spatial_lstm_grid_batch}
    section["slides"] = []
    for size in sizes:
        section["slides"].append(bench_size(size, args, cache, work, folded.feature_size, weights))
        write()


def print_table(section: dict[str, Any]) -> None:
    print("\nspatial_lstm: wall s (pipeline s, network s), peak RSS MiB, ratio over ours, max |dp| interior")
    for entry in section.get("slides", []):
        runs = entry["runs"]
        print(f"{entry['name']}: {entry['positions_wanted']} grids on tissue, {entry['lattice_patches_needed']} "
              f"lattice patches needed")
        for key in ("ours", "ours_every_grid", "monai", "tiatoolbox"):
            run = runs.get(key, {})
            if "skipped" in run or not run:
                print(f"  {key:15s} skipped: {run.get('skipped', '')[:200]}")
                continue
            ratio = entry.get(f"ratios_{key}_over_ours", {}).get("subprocess_wall_s")
            agree = run.get("agreement", {}).get("interior", {}).get("prob_max_abs_diff")
            print(f"  {key:15s} {run['subprocess_wall_s']:8.1f} ({run['total_s']:.1f}, {run['network_forward_s']:.1f})"
                  f" {run['peak_rss_largest_process_mib']:7.0f}" + (f"  {ratio:.2f}x" if ratio else "")
                  + (f"  {agree:.4f}" if agree is not None else ""))
