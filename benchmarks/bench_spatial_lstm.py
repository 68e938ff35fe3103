"""Spatial LSTM inference: feature lattice versus per-grid network calls, and whole-slide time beside ScanNet.

The issue asks for "feature-lattice vs naive per-grid inference on the same region (ratio, same outputs); whole-slide
time per slide on a phantom slide with and without TTA, side by side with the scannet bundle on the same slide".
Measured here, on CPU, in one run (see benchmarks/README.md for the numbers and the machine):

1. One region, lattice versus naive. A phantom metastasis slide (``make_phantom(kind="metastasis", n=1, seed=11,
   size_px=(4096, 4096))``, level 0 at 0.5 um/px: the slide bench_scannet.py scans); the region is read at the
   bundle's ``scan_mpp`` (1.0 um/px) with ``pathbundles.wsi.open_slide``, centred on the slide's first lesion
   (the macro-metastasis; clipped into the slide), and normalised with the bundle's preprocessing. The network
   is the bundle's ``network_def`` (``widen_factor`` 0.25, ``hidden_size`` 128 from its configs/inference.json)
   with the shipped ``bundles/spatial_lstm/models/model.pt`` when it loads into it (copied first; sha256 in the
   JSON), else fixed random weights (seed 0). ``lattice_map`` (each lattice patch through the CNN once, then the
   LSTM per grid) versus ``naive_grid_map`` (each grid's 9 patches through the whole network, one call per map
   row), ``tta=False``, the same region and the same ``LatticeGeometry(tile_px=--region-tile-px)`` (default 16:
   a 1728 px region, 16 x 16 map pixels). One warm-up (lattice: a full run; naive: one row-sized network call),
   then the median of 3 (lattice) and 2 (naive) timed runs. Reported: seconds of each, their ratio, the max
   absolute difference of the two probability maps, and the CNN patch counts (lattice ``(tile + 2 * 256/64)**2``
   versus naive ``9 * tile**2``; the lattice wins only above tile 4, where the counts are equal). ``--region-tta``
   adds one timed run of each with ``tta=True`` (8x the work; the ratio stays the same by construction).
2. The whole slide, each configuration in its own fresh ``subprocess.run`` process: (a) the spatial_lstm bundle's
   components (``SlideROIDataset`` over tissue ROIs + ``predict_maps`` + ``SpatialLSTMInferer`` from
   inference.json: ``tile_px`` 32, ``patch_batch`` 64 and ``batch_size`` 1 as on a CPU), with ``tta`` True (the
   bundle's default) and False; (b) the scannet bundle's components (``ScanNetInferer(lp=24, alpha=2)``, its CPU
   defaults; shipped ``bundles/scannet/models/model.pt``). Same slide, same reader (``--backend``, default
   tifffile), same scan resolution 1.0 um/px for all. Per slide: wall time inside the process (dataset planning
   with the tissue mask + reading + network), the time inside the inferer (network, TTA and stitching; the rest is
   reading, transforms and collation) and the peak resident memory (VmHWM from /proc/self/status at the end;
   VmHWM before the pipeline, the imports and the model, is reported apart).
3. Throughput: convolution FLOPs counted from the layer shapes on the meta device (2 per multiply-accumulate;
   LSTM, batch norm and pooling not counted) over the measured time, as a fraction of the float32 matmul peak
   (2048 x 2048 ``torch.matmul``, median of 10).

The JSON is rewritten (atomically) after each part, with ``"complete": false`` until the end.

Full run (2 free cores: roughly 8-15 min, most of it the whole slide with TTA; under the load of two trainings
about 25 min; see the estimate below):
    cd /work/main && .venv/bin/python benchmarks/bench_spatial_lstm.py
Smoke run (about 70 s, half of it four imports of MONAI, one per process):
    cd /work/main && .venv/bin/python benchmarks/bench_spatial_lstm.py --quick --out /tmp/spatial_lstm_quick.json

``--quick``: a 512 x 512 px slide (256 px at 1.0 um/px), patch 64 / crop 56 instead of 256 / 224 (the shipped
weights still load: the CNN is convolutional up to its global pooling; the probabilities mean nothing, the code
paths are the same), a 2 x 2 region tile, a 4 x 4 slide tile (one ROI), ScanNet lp 8, one timed repeat.

Estimate of the full run: it puts 21,456 patches of 224 px through the CNN (0.50 GFLOP of convolutions each):
the region part 7,056 (lattice 576 x (1 warm-up + 3), naive 144 warm-up + 2 x 2,304) and the whole slide one
ROI of 40 x 40 lattice patches, 1,600 without and 12,800 with TTA; plus the ScanNet slide (9 ROIs at lp 24,
alpha 2: about 15 s from bench_scannet.py's alpha-1 time), generating the 4096 px phantom and four process
starts (about 1 min together). The --quick run (2026-11-23, nice 19, while two trainings at nice 0 took 1.1 to
1.7 of the 2 cores, load average 4.9) cannot time 224 px patches; a probe with the bundle's network at 224 px
under the same load took 0.062 s per patch (8 GFLOP/s, 15 % of the 52 GFLOP/s matmul peak measured beside it),
which gives about 22 min of CNN work, 24 min in all. With both cores free the CNN should run 2 to 3 times faster
(this process had well under one core), hence 8-15 min; the printed matmul peak of a run tells how free it was.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "common"))

from machine import (machine_info, matmul_peak, median_time, snapshot_file,  # noqa: E402  (the script's folder)
                     vm_status_kib)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from pathbundles.atomic import atomic_path  # noqa: E402

BUNDLES = REPO / "bundles"
SHIPPED = {"spatial_lstm": BUNDLES / "spatial_lstm" / "models" / "model.pt",
           "scannet": BUNDLES / "scannet" / "models" / "model.pt"}
# inference.json computes these from torch.cuda.is_available(); this benchmark runs on the CPU, so it pins the
# values the configs give without a GPU ("$256 if torch.cuda.is_available() else 64", ...).
CPU_OVERRIDES = {"spatial_lstm": {"patch_batch": 64, "batch_size": 1},
                 "scannet": {"lp": 24, "batch_size": 1}}
SLIDE_SEED, SLIDE_PX, LEVEL0_MPP = 11, 4096, 0.5  # the slide of bench_scannet.py
QUICK_GEOMETRY = {"patch_px": 64, "crop_px": 56}  # --quick only: 1/16 of the CNN work per patch
N_DIHEDRAL = 8


# ---- machine ---------------------------------------------------------------------------------------------------


def torch_info() -> dict[str, Any]:
    """The machine plus the torch settings the timings depend on."""
    return {**machine_info(("torch", "monai", "numpy")), "torch_num_threads": torch.get_num_threads(),
            "mkldnn": torch.backends.mkldnn.is_available()}








# ---- the bundles' components -----------------------------------------------------------------------------------


def bundle_parser(bundle: str, overrides: dict[str, Any]) -> Any:
    """The bundle's configs/inference.json with the CPU values and ``overrides`` set (MONAI ConfigParser)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(BUNDLES / bundle)
    for key, value in {**CPU_OVERRIDES[bundle], **overrides}.items():
        parser[key] = value
    return parser


def load_weights(net: nn.Module, weights: str | None) -> bool:
    """Load a checkpoint (a state dict, or {"model": state dict}) into ``net`` if it fits; False if not."""
    if not weights:
        return False
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    try:
        net.load_state_dict(state)
    except (RuntimeError, KeyError):
        return False
    return True


def build_network(parser: Any, weights: str | None, weights_label: str | None) -> tuple[nn.Module, str]:
    """The bundle's ``network_def`` in eval mode, with the shipped weights when they load, else seeded random."""
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    loaded = load_weights(net, weights)
    label = weights_label if loaded else "random (torch.manual_seed(0) before network_def; shipped weights " + (
        "do not fit)" if weights else "absent)")
    return net.eval(), label


def snapshot_weights(bundle: str, tmp: Path) -> tuple[str | None, str | None]:
    """A copy of the shipped checkpoint (training may rewrite it during the run) and its label."""
    source = SHIPPED[bundle]
    if not source.exists():
        return None, None
    weights = tmp / f"{bundle}_model.pt"
    return str(weights), snapshot_file(source, weights)


def conv_macs(net: nn.Module, call: str, shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of every Conv2d when ``getattr(net, call)`` runs on an input of ``shape``, counted on a
    meta-device copy (nothing is computed)."""
    meta = copy.deepcopy(net).to("meta")
    total = [0]

    def hook(module, inputs, output):
        kh, kw = module.kernel_size
        total[0] += output.numel() * module.in_channels // module.groups * kh * kw

    for m in meta.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(hook)
    with torch.no_grad():
        getattr(meta, call)(torch.empty(shape, device="meta"))
    return total[0]


def lattice_patches(geometry: Any, n_rois: int = 1, tta: bool = False) -> int:
    """Patches the lattice inferer puts through the CNN."""
    return n_rois * geometry.lattice_px ** 2 * (N_DIHEDRAL if tta else 1)


# ---- the phantom slide -----------------------------------------------------------------------------------------


def prepare_slide(cache: Path, size_px: int, backend: str) -> dict[str, Any]:
    from pathbundles.phantom import make_phantom
    from pathbundles.wsi import open_slide

    folder = cache / f"phantom_metastasis_{size_px}_seed{SLIDE_SEED}"
    slide = folder / "phantom_tumor_000.tif"
    start = time.perf_counter()
    if not slide.exists():
        make_phantom(folder, kind="metastasis", n=1, seed=SLIDE_SEED, size_px=(size_px, size_px), mpp=LEVEL0_MPP)
    made = time.perf_counter() - start
    item = json.loads((folder / "dataset.json").read_text())["items"][0]
    with open_slide(slide, backend=backend) as s:
        levels = s.info()["levels"]
        w0, h0 = s.dimensions
    return {"generator": "pathbundles.phantom.make_phantom(kind='metastasis', n=1, "
                         f"seed={SLIDE_SEED}, size_px=({size_px}, {size_px}), mpp={LEVEL0_MPP})",
            "path": str(slide), "file": slide.name, "level0_size": [w0, h0], "levels": levels,
            "lesions": item.get("lesions", []), "generated_s": made}


# ---- 1. one region: lattice versus naive -----------------------------------------------------------------------


def bench_region(slide: dict[str, Any], args: argparse.Namespace, tile_px: int, overrides: dict[str, Any],
                 weights: str | None, weights_label: str | None, repeats: tuple[int, int],
                 peak_gflops: float) -> dict[str, Any]:
    from pathbundles.spatial_lstm import LatticeGeometry, lattice_map, naive_grid_map
    from pathbundles.wsi import open_slide

    parser = bundle_parser("spatial_lstm", overrides)
    net, label = build_network(parser, weights, weights_label)
    geometry = LatticeGeometry(tile_px=tile_px, grid_size=parser["grid_size"], patch_px=parser["patch_px"],
                               crop_px=parser["crop_px"], stride_px=parser["stride_px"])
    scan_mpp, patch_batch = float(parser["scan_mpp"]), int(parser["patch_batch"])
    # The region: centred on the first lesion (the macro-metastasis where one was placed), clipped into the slide.
    scale = scan_mpp / LEVEL0_MPP
    span0 = geometry.read_px * scale
    w0, h0 = slide["level0_size"]
    centre = slide["lesions"][0]["center_xy"] if slide["lesions"] else [w0 / 2, h0 / 2]
    origin = [round(min(max(c - span0 / 2, 0), max(size - span0, 0))) for c, size in zip(centre, (w0, h0))]
    start = time.perf_counter()
    with open_slide(slide["path"], backend=args.backend) as s:
        pixels = s.read_region(tuple(origin), (geometry.read_px, geometry.read_px), scan_mpp)
    read_s = time.perf_counter() - start
    image = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
    region = torch.as_tensor(parser.get_parsed_content("preprocessing")({"image": image})["image"])
    region = region.as_subclass(torch.Tensor)[None].float().contiguous()

    g, t, crop = geometry.grid_size, geometry.tile_px, geometry.crop_px
    n_lattice, n_naive = lattice_patches(geometry), g * g * t * t
    macs = conv_macs(net, "patch_features", (1, 3, crop, crop))
    entry: dict[str, Any] = {
        "weights": label, "tile_px": t, "read_px": geometry.read_px, "grid_size": g, "patch_px": geometry.patch_px,
        "crop_px": crop, "stride_px": geometry.stride_px, "lattice_px": geometry.lattice_px,
        "scan_mpp": scan_mpp, "patch_batch": patch_batch, "region_origin_level0": origin,
        "region_centre_level0": centre, "read_s": read_s, "map_pixels": t * t,
        "cnn_patches_lattice": n_lattice, "cnn_patches_naive": n_naive,
        "cnn_patch_ratio_naive_vs_lattice": n_naive / n_lattice,
        "cnn_macs_per_patch": macs, "lstm_grids_each": t * t,
        "load_average_at_start": list(os.getloadavg())}
    lat_rep, naive_rep = repeats
    with torch.no_grad():
        t_lat, lat_times, lat = median_time(lambda: lattice_map(net, region, geometry, tta=False,
                                                                patch_batch=patch_batch), lat_rep)
        # Warm-up of the naive path: one network call of the shape it makes (one map row, t grids).
        net(torch.zeros(t, g * g, 3, crop, crop))
        t_naive, naive_times, naive = median_time(lambda: naive_grid_map(net, region, geometry, tta=False),
                                                  naive_rep, warmup=0)
        diff = (lat - naive).abs()
        entry.update({
            "lattice_s": t_lat, "lattice_times_s": lat_times, "naive_s": t_naive, "naive_times_s": naive_times,
            "speedup_lattice_vs_naive": t_naive / t_lat,
            "prob_max_abs_diff": float(diff.max()), "prob_mean_abs_diff": float(diff.mean()),
            "prob_range": [float(lat.min()), float(lat.max())], "prob_mean": float(lat.mean()),
            "lattice_cnn_gflops": 2 * macs * n_lattice / t_lat / 1e9,
            "naive_cnn_gflops": 2 * macs * n_naive / t_naive / 1e9})
        entry["lattice_fraction_of_matmul_peak"] = entry["lattice_cnn_gflops"] / peak_gflops
        entry["naive_fraction_of_matmul_peak"] = entry["naive_cnn_gflops"] / peak_gflops
        print(f"  tile {t} ({geometry.read_px} px): lattice {t_lat:.2f} s ({n_lattice} patches), naive "
              f"{t_naive:.2f} s ({n_naive} patches), x{t_naive / t_lat:.2f}; max|dp| {entry['prob_max_abs_diff']:.1e}",
              flush=True)
        if args.region_tta:
            t_lt, _, lt = median_time(lambda: lattice_map(net, region, geometry, tta=True,
                                                                 patch_batch=patch_batch), 1, warmup=0)
            t_nt, _, nt = median_time(lambda: naive_grid_map(net, region, geometry, tta=True), 1, warmup=0)
            entry["tta"] = {"lattice_s": t_lt, "naive_s": t_nt, "speedup_lattice_vs_naive": t_nt / t_lt,
                            "cnn_patches_lattice": N_DIHEDRAL * n_lattice, "cnn_patches_naive": N_DIHEDRAL * n_naive,
                            "prob_max_abs_diff": float((lt - nt).abs().max()),
                            "prob_max_abs_diff_tta_vs_plain": float((lt - lat).abs().max()),
                            "repeats": 1, "warmup": "the tta=False runs"}
            print(f"  TTA: lattice {t_lt:.2f} s, naive {t_nt:.2f} s, x{t_nt / t_lt:.2f}; "
                  f"max|dp| {entry['tta']['prob_max_abs_diff']:.1e}", flush=True)
    entry["load_average_at_end"] = list(os.getloadavg())
    return entry


# ---- 2. whole slide, each configuration in its own process ------------------------------------------------------


class TimedInferer:
    """Wraps an inferer and adds up the seconds spent in it (network, TTA, stitching of the offset scans); the rest
    of a run is reading, transforms, collation and pasting tiles into the map."""

    def __init__(self, inferer: Any) -> None:
        self.inferer, self.seconds, self.calls = inferer, 0.0, 0

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        start = time.perf_counter()
        out = self.inferer(inputs, network, *args, **kwargs)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def worker(cfg: dict) -> dict[str, Any]:
    """Run one bundle's whole-slide pipeline in this (fresh) process; returns timings, counts and VmHWM."""
    torch.set_num_threads(cfg["threads"])
    from pathbundles.slide_inference import SlideROIDataset, predict_maps

    bundle = cfg["bundle"]
    parser = bundle_parser(bundle, cfg["overrides"])
    net, label = build_network(parser, cfg["weights"], cfg["weights_label"])
    inferer = parser.get_parsed_content("inferer")
    geometry = inferer.geometry
    preprocessing = parser.get_parsed_content("preprocessing")
    scan_mpp, batch_size = float(parser["scan_mpp"]), int(parser["batch_size"])
    timed = TimedInferer(inferer)
    hwm_before = vm_status_kib("VmHWM")
    start = time.perf_counter()
    dataset = SlideROIDataset([cfg["slide"]], geometry.grid(), scan_mpp, backend=cfg["backend"],
                              tissue_mpp=float(parser["tissue_mpp"]), transform=preprocessing)
    setup = time.perf_counter() - start
    plan, prob = next(predict_maps(dataset, net, timed, batch_size=batch_size, num_workers=cfg["num_workers"]))
    total = time.perf_counter() - start
    n_rois = plan.n_rois
    if bundle == "spatial_lstm":
        macs_per = conv_macs(net, "patch_features", (1, 3, geometry.crop_px, geometry.crop_px))
        passes = lattice_patches(geometry, n_rois, inferer.tta)
        extra = {"tta": inferer.tta, "tile_px": geometry.tile_px, "lattice_px": geometry.lattice_px,
                 "patch_batch": inferer.patch_batch, "cnn_patches": passes, "cnn_macs_per_patch": macs_per}
    else:
        macs_per = conv_macs(net, "forward", (geometry.alpha ** 2, 3, geometry.roi_px, geometry.roi_px))
        passes = n_rois
        extra = {"lp": geometry.lp, "alpha": geometry.alpha, "roi_px": geometry.roi_px, "cnn_macs_per_roi": macs_per}
    np.save(cfg["map_out"], prob)
    return {"bundle": bundle, "config": cfg["label"], "weights": label, "setup_s": setup,
            "inference_s": total - setup, "total_s": total, "inferer_s": timed.seconds, "inferer_calls": timed.calls,
            "data_s": total - setup - timed.seconds, "n_rois": n_rois, "read_px": geometry.grid().read_px,
            "map_shape": list(plan.map_shape), "map_step_um": geometry.grid().map_step_px * scan_mpp,
            "positions_evaluated": n_rois * geometry.tile_px ** 2, "batch_size": batch_size,
            "conv_flops": 2 * macs_per * passes, "cnn_gflops": 2 * macs_per * passes / timed.seconds / 1e9,
            "prob_max": float(prob.max()), "prob_mean": float(prob.mean()),
            "map_fraction_above_0_5": float((prob > 0.5).mean()), "scan_mpp": scan_mpp,
            "vmhwm_before_pipeline_mib": hwm_before / 1024, "vmhwm_mib": vm_status_kib("VmHWM") / 1024,
            "num_workers": cfg["num_workers"], "threads": torch.get_num_threads(), **extra}


def bench_slide(slide: dict[str, Any], args: argparse.Namespace, cache: Path, configs: list[dict[str, Any]],
                weights: dict[str, tuple[str | None, str | None]], peak_gflops: float) -> dict[str, Any]:
    runs = []
    for conf in configs:
        cfg = {"bundle": conf["bundle"], "label": conf["label"], "overrides": conf["overrides"],
               "slide": slide["path"], "backend": args.backend, "threads": args.threads,
               "num_workers": args.num_workers, "weights": weights[conf["bundle"]][0],
               "weights_label": weights[conf["bundle"]][1],
               "map_out": str(cache / f"map_{conf['label'].replace(' ', '_')}.npy")}
        print(f"  {conf['label']} (fresh process) ...", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)],
                              capture_output=True, text=True, check=False,
                              env={**os.environ, "PYTHONPATH": str(REPO / "common")})
        wall = time.perf_counter() - t0
        if proc.returncode:
            res = {"bundle": conf["bundle"], "config": conf["label"],
                   "error": f"worker exited with {proc.returncode}: {proc.stderr[-2000:]}"}
            print(f"    failed: {proc.stderr[-600:]}", flush=True)
        else:
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            res["cnn_fraction_of_matmul_peak"] = res["cnn_gflops"] / peak_gflops
            print(f"    {res['total_s']:.1f} s per slide (setup {res['setup_s']:.1f} s, inferer {res['inferer_s']:.1f}"
                  f" s), {res['n_rois']} ROIs, VmHWM {res['vmhwm_mib']:.0f} MiB", flush=True)
        res["subprocess_wall_s"] = wall
        runs.append(res)
    out: dict[str, Any] = {"runs": runs}
    by = {r["config"]: r for r in runs if "error" not in r}
    plain, tta = by.get("spatial_lstm tta=False"), by.get("spatial_lstm tta=True")
    if plain and tta:
        a, b = np.load(cache / "map_spatial_lstm_tta=False.npy"), np.load(cache / "map_spatial_lstm_tta=True.npy")
        out["tta_vs_plain"] = {"time_ratio": tta["total_s"] / plain["total_s"],
                               "inferer_time_ratio": tta["inferer_s"] / plain["inferer_s"],
                               "prob_max_abs_diff": float(np.abs(a - b).max()),
                               "prob_mean_abs_diff": float(np.abs(a - b).mean())}
    scannet = next((r for r in runs if r["bundle"] == "scannet" and "error" not in r), None)
    if scannet:
        for r in (plain, tta):
            if r:
                r["time_vs_scannet"] = r["total_s"] / scannet["total_s"]
    return out


# ---- output ----------------------------------------------------------------------------------------------------


def fmt_s(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if v < 10 else f"{v:.1f}"


def print_table(report: dict[str, Any]) -> None:
    peak = report["matmul_peak"]["gflops_median"]
    m = report["machine"]
    print(f"\n{m['cpu']}, {m['torch_num_threads']} threads; matmul peak {peak:.1f} GFLOP/s; load average start "
          f"{report['load_average_at_start'][0]:.2f}")
    r = report.get("region")
    if r:
        print(f"\nOne region ({r['read_px']} px at {r['scan_mpp']} um/px, {r['tile_px']} x {r['tile_px']} map "
              f"pixels, tta=False; {r['weights'].split(' (')[0]}), median of {len(r['lattice_times_s'])} / "
              f"{len(r['naive_times_s'])} after a warm-up:\n")
        print("| inference | CNN patches | LSTM grids | s per region | CNN GFLOP/s (% peak) | speedup | "
              "max abs diff p |")
        print("|---|---|---|---|---|---|---|")
        print(f"| naive per grid | {r['cnn_patches_naive']} | {r['lstm_grids_each']} | {fmt_s(r['naive_s'])} | "
              f"{r['naive_cnn_gflops']:.1f} ({100 * r['naive_fraction_of_matmul_peak']:.0f} %) | 1 | - |")
        print(f"| feature lattice | {r['cnn_patches_lattice']} | {r['lstm_grids_each']} | {fmt_s(r['lattice_s'])} | "
              f"{r['lattice_cnn_gflops']:.1f} ({100 * r['lattice_fraction_of_matmul_peak']:.0f} %) | "
              f"**{r['speedup_lattice_vs_naive']:.2f}x** (patch ratio {r['cnn_patch_ratio_naive_vs_lattice']:.2f}) | "
              f"{r['prob_max_abs_diff']:.1e} |")
        if "tta" in r:
            t = r["tta"]
            print(f"| naive, TTA | {t['cnn_patches_naive']} | {8 * r['lstm_grids_each']} | {fmt_s(t['naive_s'])} "
                  "| | 1 | - |")
            print(f"| lattice, TTA | {t['cnn_patches_lattice']} | {8 * r['lstm_grids_each']} | "
                  f"{fmt_s(t['lattice_s'])} | | {t['speedup_lattice_vs_naive']:.2f}x | {t['prob_max_abs_diff']:.1e} |")
        print(f"\nprobabilities in [{r['prob_range'][0]:.3f}, {r['prob_range'][1]:.3f}] (mean {r['prob_mean']:.3f})")
    s = report.get("slide")
    if s:
        sl = report["slide_file"]
        print(f"\nWhole slide ({sl['level0_size'][0]} x {sl['level0_size'][1]} px at {LEVEL0_MPP} um/px, scanned at "
              f"1.0 um/px; one fresh process per configuration):\n")
        print("| pipeline | ROIs | map (stride um) | CNN work | s per slide | inferer s | data s | setup s | "
              "CNN GFLOP/s | peak RSS MiB (before) | vs ScanNet |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for run in s["runs"]:
            if "error" in run:
                print(f"| {run['config']} | worker failed | | | | | | | | | |")
                continue
            work = (f"{run['cnn_patches']} patches" if run["bundle"] == "spatial_lstm"
                    else f"{run['n_rois']} x {run['alpha'] ** 2} ROIs of {run['roi_px']} px")
            vs = f"{run['time_vs_scannet']:.1f}x" if "time_vs_scannet" in run else "1"
            print(f"| {run['config']} | {run['n_rois']} | {run['map_shape'][0]} x {run['map_shape'][1]} "
                  f"({run['map_step_um']:g}) | {work} | **{fmt_s(run['total_s'])}** | {fmt_s(run['inferer_s'])} | "
                  f"{fmt_s(run['data_s'])} | {fmt_s(run['setup_s'])} | {run['cnn_gflops']:.1f} | "
                  f"{run['vmhwm_mib']:.0f} ({run['vmhwm_before_pipeline_mib']:.0f}) | {vs} |")
        if "tta_vs_plain" in s:
            t = s["tta_vs_plain"]
            print(f"\nTTA / no TTA: {t['time_ratio']:.2f}x the time per slide ({t['inferer_time_ratio']:.2f}x in the "
                  f"inferer); probabilities differ by {t['prob_mean_abs_diff']:.1e} on average, "
                  f"{t['prob_max_abs_diff']:.1e} at most")


def write(report: dict[str, Any], path: Path) -> None:
    with atomic_path(path) as tmp_out:
        tmp_out.write_text(json.dumps(report, indent=2) + "\n")


# ---- main ------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 512 px slide, 64/56 px patches, tiny tiles, one repeat (about a minute)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "spatial_lstm.json")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--backend", choices=("tifffile", "openslide"), default="tifffile",
                        help="slide reader of the region and of every whole-slide pipeline")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers of the whole-slide runs")
    parser.add_argument("--region-tile-px", type=int, default=None,
                        help="map pixels per side of the lattice-versus-naive region (default 16; --quick: 2)")
    parser.add_argument("--region-tta", action="store_true",
                        help="also time lattice and naive with tta=True on the region (8x the work; one run each)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the phantom slide is generated "
                                                                     "(default: a temporary folder)")
    parser.add_argument("--skip-region", action="store_true", help="skip the lattice-versus-naive region")
    parser.add_argument("--skip-slide", action="store_true", help="skip the whole-slide comparison")
    parser.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    torch.set_num_threads(args.threads)
    load_start = list(os.getloadavg())
    started = time.perf_counter()
    if args.quick:
        slide_px, region_tile, slide_tile, scannet_lp, repeats = 512, 2, 4, 8, (1, 1)
        overrides = dict(QUICK_GEOMETRY)
        matmul_n, matmul_repeats = 1024, 5
    else:
        slide_px, region_tile, slide_tile, scannet_lp, repeats = SLIDE_PX, 16, None, None, (3, 2)
        overrides = {}
        matmul_n, matmul_repeats = 2048, 10
    region_tile = args.region_tile_px or region_tile
    sl_overrides = {**overrides, **({"tile_px": slide_tile} if slide_tile else {})}
    sn_overrides = {"lp": scannet_lp} if scannet_lp else {}
    configs = [{"bundle": "spatial_lstm", "label": "spatial_lstm tta=False",
                "overrides": {**sl_overrides, "tta": False}},
               {"bundle": "spatial_lstm", "label": "spatial_lstm tta=True", "overrides": {**sl_overrides, "tta": True}},
               {"bundle": "scannet", "label": "scannet", "overrides": sn_overrides}]
    report: dict[str, Any] = {
        "benchmark": "bench_spatial_lstm", "quick": args.quick, "complete": False,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": load_start, "machine": torch_info(),
        "go_signal_present_at_start": Path("/tmp/bench_go").exists(),
        "command": sys.argv[1:] if argv is None else argv,
        "settings": {"threads": args.threads, "backend": args.backend, "num_workers": args.num_workers,
                     "region_tile_px": region_tile, "region_tta": args.region_tta, "repeats_lattice_naive": repeats,
                     "spatial_lstm_overrides": sl_overrides, "scannet_overrides": sn_overrides,
                     "cpu_values_of_config_expressions": CPU_OVERRIDES},
    }
    print(f"matmul peak ({matmul_n}^3 float32, {args.threads} threads) ...", flush=True)
    report["matmul_peak"] = peak = matmul_peak(matmul_n, matmul_repeats)
    print(f"  {peak['gflops_median']:.1f} GFLOP/s (median), {peak['gflops_best']:.1f} best", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        print(f"phantom slide {slide_px} x {slide_px} px ...", flush=True)
        slide = prepare_slide(cache, slide_px, args.backend)
        report["slide_file"] = {k: v for k, v in slide.items() if k != "path"}
        weights = {bundle: snapshot_weights(bundle, Path(tmp)) for bundle in SHIPPED}
        if not args.skip_region:
            print("one region, feature lattice vs naive per-grid inference (same network, same region):", flush=True)
            t0 = time.perf_counter()
            report["region"] = bench_region(slide, args, region_tile, overrides, *weights["spatial_lstm"], repeats,
                                            peak["gflops_median"])
            report["region"]["wall_s"] = time.perf_counter() - t0
            report["benchmark_wall_s"] = time.perf_counter() - started
            write(report, args.out)
        if not args.skip_slide:
            print(f"whole slide ({args.backend} reader, one fresh process per configuration):", flush=True)
            slide_load = list(os.getloadavg())
            report["slide"] = bench_slide(slide, args, cache, configs, weights, peak["gflops_median"])
            report["slide"]["load_average_at_start"] = slide_load
            report["slide"]["load_average_at_end"] = list(os.getloadavg())
    report["complete"] = True
    report["load_average_at_end"] = list(os.getloadavg())
    report["benchmark_wall_s"] = time.perf_counter() - started
    write(report, args.out)
    print_table(report)
    print(f"\nload average start {load_start} end {report['load_average_at_end']}; "
          f"{report['benchmark_wall_s']:.0f} s; wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
