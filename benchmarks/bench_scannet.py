"""ScanNet FCN dense scanning versus patch-by-patch classification, on CPU, side by side in one run.

Three measurements (see benchmarks/README.md for the numbers and the machine):

1. One ROI, random input: ``dense_scan`` (the FCN over the whole ROI, alpha**2 offset ROIs) versus the same network,
   same weights, fed every 244 px patch of the same region at the same stride ``32 / alpha`` in batches. The logits
   must agree (max abs difference reported); seconds per ROI of each and their ratio. Done for the demo network
   (width 0.125, batch norm) at lp 16 (724 px ROI), alpha 1 and 2, and for the paper's full-width network
   (width 1.0, no batch norm) at a smaller ROI (lp 6, 404 px; alpha 1 and 2), where patch-wise scanning is slow.
   No extrapolation to the paper's 2868 px ROI is made: only measured sizes are reported. ``--paper-roi`` adds the
   paper's own comparison (Table 4: full width at lp 83, a 2868 px ROI, alpha 1; 0.018 against 0.975 min on a GPU,
   54x): 172 TFLOP patch by patch against 4.9 for the FCN, counted by ``conv_macs``, so on this 2-core CPU, at
   the 110-160 GFLOP/s its plain paper-width network reaches (bench_inference_network.py), 18-26 minutes per
   repeat (an estimate; not run here). ``--device cuda`` runs this part on the GPU
   (``benchmarks/gpu.sh``), float32 with torch's defaults (cuDNN convolutions may use TF32; the JSON records it).
2. A whole phantom metastasis slide (make_phantom, 4096 x 4096 px at 0.5 um/px, seed 11) scanned at 1.0 um/px by
   (a) our pipeline: ``SlideROIDataset`` over tissue ROIs + ``predict_maps`` with ``ScanNetInferer(lp=24, alpha=1)``
   and (b) MONAI model-zoo style: ``MaskedPatchWSIDataset`` (locations from our tissue mask on the same stride-32
   grid) + ``DataLoader`` + the same network as a patch classifier on every 244 px tissue patch, read with
   ``pathbundles.wsi.TiledTiffWSIReader`` (tifffile backend for both pipelines by default). Each pipeline runs in
   its own fresh subprocess; peak memory is its VmHWM from /proc/self/status. Probabilities are compared at every
   position the patch pipeline evaluates.
3. Achieved FLOP/s of the network (convolution FLOPs counted analytically from the layer shapes, 2 per MAC)
   as a fraction of the machine's measured float32 matmul peak (2048 x 2048 torch.matmul, median of repeats).

Run (2 cores, 10-15 min): cd /work/main && .venv/bin/python benchmarks/bench_scannet.py
Smoke run (1-2 min):   .venv/bin/python benchmarks/bench_scannet.py --quick --out /tmp/scannet_quick.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
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
from pathbundles.scannet import PATCH_PX, ScanGeometry, ScanNet, dense_scan  # noqa: E402

SHIPPED_MODEL = REPO / "bundles" / "scannet" / "models" / "model.pt"
DEMO = {"width": 0.125, "batch_norm": True}  # bundles/scannet/configs/inference.json
PAPER = {"width": 1.0, "batch_norm": False}  # Table 1: VGG16 widths, no batch norm
SLIDE_SEED, SLIDE_PX, LEVEL0_MPP, SCAN_MPP, TISSUE_MPP = 11, 4096, 0.5, 1.0, 8.0


# ---- machine ---------------------------------------------------------------------------------------------------


def torch_info() -> dict[str, Any]:
    """The machine plus the torch settings the timings depend on."""
    return {**machine_info(("torch", "monai", "numpy")), "torch_num_threads": torch.get_num_threads(),
            "mkldnn": torch.backends.mkldnn.is_available()}






# ---- FLOPs -----------------------------------------------------------------------------------------------------


def conv_macs(net: ScanNet, in_px: int) -> int:
    """Multiply-accumulates of every convolution for one square input of ``in_px`` (no padding, stride 1;
    2x2/2 max-pools halve the size). BatchNorm, ReLU and pooling are not counted (< 1 % of the work)."""
    size, macs = in_px, 0
    for module in list(net.features) + list(net.classifier):
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            size = size - kh + 1
            macs += module.in_channels // module.groups * module.out_channels * kh * kw * size * size
        elif isinstance(module, nn.MaxPool2d):
            size = (size - 2) // 2 + 1
    return macs




# ---- 1. one ROI: FCN versus patch by patch ---------------------------------------------------------------------


def make_net(spec: dict, seed: int = 0) -> ScanNet:
    torch.manual_seed(seed)
    net = ScanNet(num_classes=2, **spec).eval()
    # ScanNet starts conv8 near zero (logits ~0.05, probabilities ~0.5); a fan-in scaled conv8 gives logits of
    # order 1, so probability agreement is checked over a real range rather than around 0.5.
    nn.init.kaiming_normal_(net.classifier[-1].weight, mode="fan_in", nonlinearity="linear")
    if spec.get("batch_norm"):
        # Non-trivial eval-mode batch-norm statistics, so the affine map is exercised by the equivalence check.
        gen = torch.Generator().manual_seed(seed + 1)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return net


def patchwise_scan(net: nn.Module, region: torch.Tensor, geometry: ScanGeometry, batch: int) -> torch.Tensor:
    """Every 244 px patch of ``region`` (1, 3, read_px, read_px) at stride Sd through ``net`` in batches:
    logits (1, C, alpha * Lp, alpha * Lp), laid out like ``dense_scan``."""
    sd = geometry.dense_stride_px
    windows = region[0].unfold(1, PATCH_PX, sd).unfold(2, PATCH_PX, sd)  # (3, nh, nw, 244, 244), a view
    nh, nw = windows.shape[1:3]
    windows = windows.permute(1, 2, 0, 3, 4).reshape(nh * nw, 3, PATCH_PX, PATCH_PX)  # copies: patch extraction
    out = torch.cat([net(windows[i:i + batch]) for i in range(0, len(windows), batch)])  # (n, C, 1, 1)
    return out.reshape(nh, nw, -1).permute(2, 0, 1).unsqueeze(0)


def bench_roi(label: str, spec: dict, lp: int, alpha: int, repeats_fcn: int, repeats_patch: int,
              batch: int, peak_gflops: float, device: str = "cpu") -> dict[str, Any]:
    geometry = ScanGeometry(lp=lp, alpha=alpha)
    net = make_net(spec).to(device)
    gen = torch.Generator().manual_seed(1234)
    region = (torch.rand(1, 3, geometry.read_px, geometry.read_px, generator=gen) * 2 - 1).to(device)
    with torch.no_grad():
        t_fcn, fcn_times, fcn_out = median_time(lambda: dense_scan(net, region, geometry), repeats_fcn, device)
        net(region[:, :, :PATCH_PX, :PATCH_PX].expand(batch, -1, -1, -1).contiguous())  # warm-up: one batch
        t_patch, patch_times, patch_out = median_time(lambda: patchwise_scan(net, region, geometry, batch),
                                                      repeats_patch, device, warmup=0)
    diff = float((fcn_out - patch_out).abs().max())
    scale = float(fcn_out.abs().max())
    n_patches = (alpha * lp) ** 2
    fcn_macs = alpha ** 2 * conv_macs(net, geometry.roi_px)
    patch_macs = n_patches * conv_macs(net, PATCH_PX)
    entry = {
        "label": label, "device": device, "width": spec["width"], "batch_norm": spec["batch_norm"], "lp": lp,
        "alpha": alpha,
        "roi_px": geometry.roi_px, "read_px": geometry.read_px, "stride_px": geometry.dense_stride_px,
        "predictions_per_roi": n_patches, "patch_batch": batch,
        "fcn_s_per_roi": t_fcn, "fcn_times_s": fcn_times, "patchwise_s_per_roi": t_patch,
        "patchwise_times_s": patch_times, "speedup_fcn_vs_patchwise": t_patch / t_fcn,
        "logits_max_abs_diff": diff, "logits_max_abs": scale, "logits_shape": list(fcn_out.shape),
        "fcn_conv_macs": fcn_macs, "fcn_conv_flops": 2 * fcn_macs,
        "patchwise_conv_macs": patch_macs, "patchwise_conv_flops": 2 * patch_macs,
        "flop_ratio_patchwise_vs_fcn": patch_macs / fcn_macs,
        "fcn_achieved_gflops": 2 * fcn_macs / t_fcn / 1e9,
        "patchwise_achieved_gflops": 2 * patch_macs / t_patch / 1e9,
    }
    entry["fcn_fraction_of_matmul_peak"] = entry["fcn_achieved_gflops"] / peak_gflops
    entry["patchwise_fraction_of_matmul_peak"] = entry["patchwise_achieved_gflops"] / peak_gflops
    print(f"  {label:28s} lp={lp:2d} a={alpha} roi={geometry.roi_px}px  FCN {t_fcn:8.3f} s  patch-wise "
          f"{t_patch:8.3f} s  x{t_patch / t_fcn:6.1f}  max|diff| {diff:.2e} (max|logit| {scale:.2e})", flush=True)
    return entry


# ---- 2. whole slide, each pipeline in its own process ----------------------------------------------------------


def _preprocessing(resize_to: int | None = None):
    from monai.transforms import CastToTyped, Compose, Resized, ScaleIntensityRanged

    steps = [CastToTyped(keys="image", dtype=torch.float32)]
    if resize_to is not None:  # 2x2 area average: level 0 (0.5 um/px) -> 1.0 um/px
        steps.append(Resized(keys="image", spatial_size=(resize_to, resize_to), mode="area"))
    steps.append(ScaleIntensityRanged(keys="image", a_min=0.0, a_max=255.0, b_min=-1.0, b_max=1.0))
    return Compose(steps)


def _load_net(weights: str) -> nn.Module:
    net = ScanNet(num_classes=2, **DEMO)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    net.load_state_dict(state)
    return net.eval()


class TimedNet(nn.Module):
    """Wraps a network and adds up the seconds spent in its forward passes (the rest is reading, transforms and
    collation)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.seconds, self.calls = net, 0.0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.net(x)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def worker(mode: str, cfg: dict) -> dict[str, Any]:
    """Run one whole-slide pipeline in this (fresh) process; returns timings, counts and VmHWM."""
    torch.set_num_threads(cfg["threads"])
    from pathbundles import wsi
    from pathbundles.scannet import ScanNetInferer
    from pathbundles.slide_inference import SlideROIDataset, predict_maps

    net = TimedNet(_load_net(cfg["weights"])).eval()
    hwm_before = vm_status_kib("VmHWM")
    start = time.perf_counter()
    if mode == "scannet":
        inferer = ScanNetInferer(lp=cfg["lp"], alpha=1)
        dataset = SlideROIDataset([cfg["slide"]], inferer.geometry.grid(), SCAN_MPP, backend=cfg["backend"],
                                  tissue_mpp=TISSUE_MPP, transform=_preprocessing())
        setup = time.perf_counter() - start
        plan, prob = next(predict_maps(dataset, net, inferer, batch_size=cfg["scannet_batch"],
                                       num_workers=cfg["num_workers"]))
        total = time.perf_counter() - start
        extra = {"n_rois": plan.n_rois, "rois_rc": plan.rois_rc.tolist(), "lp": cfg["lp"],
                 "roi_read_px": inferer.geometry.read_px, "positions_evaluated": plan.n_rois * cfg["lp"] ** 2,
                 "batch_size": cfg["scannet_batch"]}
    else:
        from monai.data import DataLoader, MaskedPatchWSIDataset
        from monai.utils import ProbMapKeys, WSIPatchKeys

        from pathbundles.tissue import tissue_mask

        step0 = round(32 * SCAN_MPP / LEVEL0_MPP)  # stride 32 at 1.0 um/px = 64 level-0 px
        size0 = round(PATCH_PX * SCAN_MPP / LEVEL0_MPP)  # 244 px at 1.0 um/px = 488 level-0 px

        class TissueMaskedPatchWSIDataset(MaskedPatchWSIDataset):
            """MaskedPatchWSIDataset with patch locations from pathbundles' tissue mask (8 um/px): a patch on the
            stride-32 scan grid (origin 64 k level-0 px) is kept when its centre is tissue. MONAI's own mask
            handling (HSV Otsu at ``mask_level``, patches centred on mask pixels) would put the grid 106 scan px
            off ours and leave no position in common to compare."""

            def _evaluate_patch_locations(self, sample):
                with wsi.open_slide(sample["image"], backend="tifffile") as slide:
                    mask = tissue_mask(slide, mpp=TISSUE_MPP)
                    w0, h0 = slide.dimensions
                ky, kx = np.meshgrid(np.arange(math.ceil(h0 / step0)), np.arange(math.ceil(w0 / step0)),
                                     indexing="ij")
                centre = lambda k: k * step0 + size0 / 2  # noqa: E731
                keep = mask.at_level0(centre(kx), centre(ky)).astype(bool)
                grid_rc = np.stack([ky[keep], kx[keep]], 1)
                sample.update({WSIPatchKeys.SIZE.value: (size0, size0), WSIPatchKeys.LEVEL.value: 0,
                               ProbMapKeys.NAME.value: os.path.basename(sample["image"]),
                               ProbMapKeys.COUNT.value: len(grid_rc),
                               ProbMapKeys.SIZE.value: (math.ceil(h0 / step0), math.ceil(w0 / step0))})
                return [{**sample, WSIPatchKeys.LOCATION.value: rc * step0, ProbMapKeys.LOCATION.value: rc}
                        for rc in grid_rc]

        reader = wsi.TiledTiffWSIReader if cfg["backend"] == "tifffile" else "OpenSlide"
        dataset = TissueMaskedPatchWSIDataset([{"image": cfg["slide"]}], patch_size=size0, patch_level=0,
                                              transform=_preprocessing(PATCH_PX), reader=reader)
        loader = DataLoader(dataset, batch_size=cfg["patch_batch"], num_workers=cfg["num_workers"], shuffle=False)
        setup = time.perf_counter() - start
        rc = np.array([s[ProbMapKeys.LOCATION.value] for s in dataset.data]).reshape(-1, 2)
        prob = np.full(cfg["map_shape"], np.nan, np.float32)
        done = 0
        with torch.no_grad():
            for batch in loader:
                p = torch.softmax(net(batch["image"].as_tensor()).float(), 1)[:, 1, 0, 0].numpy()
                prob[rc[done:done + len(p), 0], rc[done:done + len(p), 1]] = p
                done += len(p)
        total = time.perf_counter() - start
        extra = {"n_patches": done, "positions_evaluated": done, "patch_read_level0_px": size0,
                 "reader": f"{reader.__module__}.{reader.__name__}" if not isinstance(reader, str) else reader,
                 "batch_size": cfg["patch_batch"]}
    np.save(cfg["map_out"], prob)
    return {"mode": mode, "setup_s": setup, "inference_s": total - setup, "total_s": total,
            "network_forward_s": net.seconds, "network_calls": net.calls,
            "data_s": total - setup - net.seconds,
            "vmhwm_before_pipeline_mib": hwm_before / 1024, "vmhwm_mib": vm_status_kib("VmHWM") / 1024,
            "num_workers": cfg["num_workers"], "threads": torch.get_num_threads(), **extra}


def bench_slide(cache: Path, weights: str, weights_label: str, args: argparse.Namespace, size_px: int,
                lp: int) -> dict[str, Any]:
    from pathbundles.phantom import make_phantom
    from pathbundles.wsi import open_slide

    folder = cache / f"phantom_metastasis_{size_px}_seed{SLIDE_SEED}"
    slide = folder / "phantom_tumor_000.tif"
    start = time.perf_counter()
    if not slide.exists():
        make_phantom(folder, kind="metastasis", n=1, seed=SLIDE_SEED, size_px=(size_px, size_px), mpp=LEVEL0_MPP)
    made = time.perf_counter() - start
    with open_slide(slide, backend="tifffile") as s:
        levels = s.info()["levels"]
        w0, h0 = s.dimensions
        # Input pixels of the two pipelines at one patch of the slide centre: ours (PIL BOX to uint8) versus the
        # patch pipeline's float 2x2 area average of level 0.
        c0 = (w0 // 2 // 64) * 64
        ours = s.read_region((c0, c0), (PATCH_PX, PATCH_PX), SCAN_MPP).astype(np.float32)
        level0 = torch.from_numpy(s.read_level_region(0, (c0, c0), (2 * PATCH_PX, 2 * PATCH_PX)).astype(np.float32))
        zoo = torch.nn.functional.avg_pool2d(level0.permute(2, 0, 1)[None], 2)[0].permute(1, 2, 0).numpy()
        pixel_diff = np.abs(ours - zoo)
    map_shape = [math.ceil(h0 * LEVEL0_MPP / SCAN_MPP / 32), math.ceil(w0 * LEVEL0_MPP / SCAN_MPP / 32)]
    results = {}
    for mode in ("scannet", "modelzoo"):
        cfg = {"slide": str(slide), "weights": weights, "threads": args.threads, "backend": args.backend,
               "lp": lp, "scannet_batch": 1, "patch_batch": args.patch_batch, "num_workers": args.num_workers,
               "map_shape": map_shape, "map_out": str(cache / f"map_{mode}.npy")}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", mode, json.dumps(cfg)],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "common")})
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise RuntimeError(f"{mode} worker failed:\n{proc.stderr[-4000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["subprocess_wall_s"] = wall
        res["map"] = np.load(cfg["map_out"])
        results[mode] = res
        print(f"  {mode:9s} total {res['total_s']:7.1f} s (setup {res['setup_s']:.1f} s), "
              f"{res['positions_evaluated']} positions, VmHWM {res['vmhwm_mib']:.0f} MiB", flush=True)
    scan, zoo = results["scannet"], results["modelzoo"]
    evaluated = ~np.isnan(zoo["map"])
    rr, cc = np.nonzero(evaluated)
    rois = {tuple(rc) for rc in scan.pop("rois_rc")}
    covered = np.array([(r // lp, c // lp) in rois for r, c in zip(rr, cc)], bool)
    diff = np.abs(scan["map"][evaluated] - zoo["map"][evaluated])
    # Positions of the ScanNet ROIs inside the map (ROI tiles at the right and bottom edges are clipped).
    in_map = sum(min(lp, map_shape[0] - r * lp) * min(lp, map_shape[1] - c * lp) for r, c in rois)
    scan["positions_evaluated_inside_map"] = int(in_map)
    for res in results.values():
        res.pop("map")
    scan_prob = np.load(cache / "map_scannet.npy")
    # Same pixels, same network: read the 244 px patch at a few positions with our reader (the pixels the ROI
    # pipeline saw) and classify it alone; this isolates the scanning from the resampling difference above.
    order = np.argsort(-diff, kind="stable")
    picks = np.unique(np.concatenate([order[:8], np.linspace(0, len(rr) - 1, 8).astype(int)])) if len(rr) else []
    net = _load_net(weights)
    from monai.transforms import ScaleIntensityRange

    with open_slide(slide, backend="tifffile") as s, torch.no_grad():
        patches = [s.read_region((int(cc[i]) * 64, int(rr[i]) * 64), (PATCH_PX, PATCH_PX), SCAN_MPP) for i in picks]
        x = ScaleIntensityRange(0.0, 255.0, -1.0, 1.0)(
            torch.from_numpy(np.stack(patches).transpose(0, 3, 1, 2).astype(np.float32)))
        single = torch.softmax(net(torch.as_tensor(x)), 1)[:, 1, 0, 0].numpy() if len(picks) else np.zeros(0)
    same_pixel = np.abs(single - scan_prob[rr[picks], cc[picks]]) if len(picks) else np.zeros(0)
    return {
        "slide": {"generator": "pathbundles.phantom.make_phantom(kind='metastasis', n=1, "
                               f"seed={SLIDE_SEED}, size_px=({size_px}, {size_px}), mpp={LEVEL0_MPP})",
                  "file": slide.name, "level0_size": [w0, h0], "levels": levels, "generated_s": made},
        "scan_mpp": SCAN_MPP, "stride_px": 32, "map_shape": map_shape, "backend": args.backend,
        "weights": weights_label,
        "scannet": scan, "modelzoo": zoo,
        "speedup_scannet_vs_modelzoo_total": zoo["total_s"] / scan["total_s"],
        "speedup_scannet_vs_modelzoo_inference": zoo["inference_s"] / scan["inference_s"],
        "agreement": {"positions_compared": int(evaluated.sum()),
                      "positions_inside_scannet_rois": int(covered.sum()),
                      "prob_max_abs_diff": float(diff.max()) if diff.size else None,
                      "prob_mean_abs_diff": float(diff.mean()) if diff.size else None,
                      "prob_range_scannet": [float(scan_prob.min()), float(scan_prob.max())],
                      "input_pixel_max_abs_diff": float(pixel_diff.max()),
                      "input_pixel_mean_abs_diff": float(pixel_diff.mean()),
                      "same_pixels_positions_checked": int(len(same_pixel)),
                      "same_pixels_prob_max_abs_diff": float(same_pixel.max()) if same_pixel.size else None,
                      "same_pixels_note": "at the 8 positions of largest difference and 8 spread ones, the patch "
                                          "read with our reader (as the ROI pipeline reads it) and classified "
                                          "alone, versus the ScanNet map",
                      "note": "the patch pipeline resamples level 0 to 1.0 um/px with a float 2x2 area average "
                              "(MONAI Resized mode='area'), ours with PIL BOX rounded to uint8, so input pixels "
                              "differ by up to a grey level (input_pixel_*, one patch); probability differences "
                              "come from that, not from the scanning"},
    }


def analytic_ratios() -> list[dict[str, Any]]:
    """Convolution FLOPs of patch-wise over FCN scanning per ROI, counted (not timed) for a few ROI sizes,
    including the paper's Lp = 83 (2868 px). A count, not a measurement: no time is extrapolated from it."""
    rows = []
    for spec in (DEMO, PAPER):
        net = make_net(spec)
        for lp, alpha in ((6, 1), (16, 1), (24, 1), (83, 1), (83, 2)):
            geometry = ScanGeometry(lp=lp, alpha=alpha)
            fcn = alpha ** 2 * conv_macs(net, geometry.roi_px)
            patch = (alpha * lp) ** 2 * conv_macs(net, PATCH_PX)
            rows.append({"width": spec["width"], "lp": lp, "alpha": alpha, "roi_px": geometry.roi_px,
                         "fcn_conv_gflops": 2 * fcn / 1e9, "patchwise_conv_gflops": 2 * patch / 1e9,
                         "ratio": patch / fcn})
    return rows


def print_table(report: dict[str, Any]) -> None:
    peak = report["matmul_peak"]["gflops_median"]
    print(f"\nmatmul peak {peak:.1f} GFLOP/s; load average start {report['load_average_at_start'][0]:.2f}")
    print(f"{'network':18s} {'lp':>3s} {'a':>2s} {'ROI px':>6s} {'FCN s':>8s} {'patch s':>8s} {'speedup':>8s} "
          f"{'FLOP ratio':>10s} {'FCN GF/s':>9s} {'% peak':>7s} {'max|dlogit|':>11s}")
    for e in report["roi"]:
        print(f"{e['label'] + ' w' + str(e['width']):18s} {e['lp']:3d} {e['alpha']:2d} {e['roi_px']:6d} "
              f"{e['fcn_s_per_roi']:8.3f} {e['patchwise_s_per_roi']:8.3f} {e['speedup_fcn_vs_patchwise']:8.1f} "
              f"{e['flop_ratio_patchwise_vs_fcn']:10.1f} {e['fcn_achieved_gflops']:9.1f} "
              f"{100 * e['fcn_fraction_of_matmul_peak']:6.1f}% {e['logits_max_abs_diff']:11.1e}")
    if "slide" in report:
        s = report["slide"]
        print(f"{'whole slide':18s} {'total s':>8s} {'net s':>8s} {'data s':>8s} {'positions':>9s} "
              f"{'VmHWM MiB':>10s}")
        for key in ("scannet", "modelzoo"):
            r = s[key]
            print(f"{key:18s} {r['total_s']:8.1f} {r['network_forward_s']:8.1f} {r['data_s']:8.1f} "
                  f"{r['positions_evaluated']:9d} {r['vmhwm_mib']:10.0f}")
        a = s["agreement"]
        print(f"speedup x{s['speedup_scannet_vs_modelzoo_total']:.1f}; probabilities max |diff| "
              f"{a['prob_max_abs_diff']:.1e} over {a['positions_compared']} positions "
              f"({a['positions_inside_scannet_rois']} inside ScanNet ROIs)")


# ---- main ------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run with tiny sizes (1-2 min)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scannet.json")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--backend", choices=("tifffile", "openslide"), default="tifffile",
                        help="slide reader for both whole-slide pipelines (model zoo: TiledTiffWSIReader or "
                             "MONAI's OpenSlide WSIReader)")
    parser.add_argument("--patch-batch", type=int, default=64, help="patches per forward pass, patch-wise runs")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers of the whole-slide runs")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the phantom slide is generated "
                                                                     "(default: a temporary folder)")
    parser.add_argument("--skip-slide", action="store_true", help="skip the whole-slide comparison")
    parser.add_argument("--skip-roi", action="store_true",
                        help="skip the ROI and FLOP parts; their sections (with their own date and load) are "
                             "carried over from an existing --out file")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the ROI part runs (the whole-slide part is CPU only; gpu.sh skips it)")
    parser.add_argument("--paper-roi", action="store_true",
                        help="add the paper's Table 4 ROI: full width, lp 83 (2868 px), alpha 1 "
                             "(172 TFLOP patch by patch)")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    if args.worker:
        print(json.dumps(worker(args.worker[0], json.loads(args.worker[1]))))
        return

    torch.set_num_threads(args.threads)
    load_start = list(os.getloadavg())
    started = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "bench_scannet", "quick": args.quick,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": load_start, "machine": torch_info(),
        "go_signal_present_at_start": Path("/tmp/bench_go").exists(),
    }
    if args.quick:
        roi_runs = [("demo", DEMO, 2, 1, 2, 1), ("demo", DEMO, 2, 2, 2, 1), ("paper full width", PAPER, 2, 1, 1, 1)]
        matmul_n, matmul_repeats, slide_px, slide_lp = 1024, 5, 2048, 8
    else:
        roi_runs = [("demo", DEMO, 16, 1, 5, 3), ("demo", DEMO, 16, 2, 5, 3),
                    ("paper full width", PAPER, 6, 1, 3, 2), ("paper full width", PAPER, 6, 2, 3, 2)]
        matmul_n, matmul_repeats, slide_px, slide_lp = 2048, 10, SLIDE_PX, 24
    if args.paper_roi:
        roi_runs.append(("paper full width, Table 4 ROI", PAPER, 83, 1, 3, 1))
    if args.device == "cuda":
        matmul_n = 4096
        report["cuda"] = {"device": torch.cuda.get_device_name(0), "cuda": torch.version.cuda,
                          "cudnn": torch.backends.cudnn.version(),
                          "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                          "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}

    if args.skip_roi:
        previous = json.loads(args.out.read_text())
        for key in ("matmul_peak", "roi", "analytic_conv_flop_ratio_patchwise_vs_fcn"):
            report[key] = previous[key]
        report["roi_part_run"] = previous.get("roi_part_run") or {
            "date": previous["date"], "load_average_at_start": previous["load_average_at_start"],
            "load_average_at_end": previous.get("load_average_at_end"),
            "seconds": previous.get("benchmark_wall_s"), "note": "times of the whole earlier run"}
        report["roi_part_carried_over"] = True
    else:
        print(f"matmul peak ({matmul_n}^3 float32, {args.device}, {args.threads} threads) ...", flush=True)
        peak = matmul_peak(matmul_n, matmul_repeats, args.device)
        report["matmul_peak"] = peak
        print(f"  {peak['gflops_median']:.1f} GFLOP/s (median), {peak['gflops_best']:.1f} best", flush=True)

        print("one ROI, FCN dense scan vs patch by patch (random input, same weights):", flush=True)
        report["roi"] = [bench_roi(label, spec, lp, alpha, rf, rp, args.patch_batch if spec is DEMO else 16,
                                   peak["gflops_median"], args.device)
                         for label, spec, lp, alpha, rf, rp in roi_runs]
        report["roi_part_run"] = {"date": report["date"], "load_average_at_start": load_start,
                                  "load_average_at_end": list(os.getloadavg()),
                                  "seconds": time.perf_counter() - started}

    if not args.skip_slide:
        slide_load_start = list(os.getloadavg())
        print(f"whole slide ({slide_px} px phantom, {args.backend} reader, one fresh process per pipeline):",
              flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            cache = args.cache_dir or Path(tmp)
            cache.mkdir(parents=True, exist_ok=True)
            if SHIPPED_MODEL.exists():
                weights = str(Path(tmp) / "model.pt")
                label = snapshot_file(SHIPPED_MODEL, Path(weights))
            else:
                weights = str(Path(tmp) / "random_demo_scannet.pt")
                label = "random demo-width ScanNet (make_net seed 0; no bundles/scannet/models/model.pt yet)"
                torch.save(make_net(DEMO).state_dict(), weights)
            report["slide"] = bench_slide(cache, weights, label, args, slide_px, slide_lp)
        s = report["slide"]
        s["load_average_at_start"], s["load_average_at_end"] = slide_load_start, list(os.getloadavg())
        print(f"  ScanNet x{s['speedup_scannet_vs_modelzoo_total']:.1f} faster end to end "
              f"(x{s['speedup_scannet_vs_modelzoo_inference']:.1f} inference only); probabilities max |diff| "
              f"{s['agreement']['prob_max_abs_diff']:.2e} at {s['agreement']['positions_compared']} positions",
              flush=True)

    report["analytic_conv_flop_ratio_patchwise_vs_fcn"] = analytic_ratios()
    report["load_average_at_end"] = list(os.getloadavg())
    report["benchmark_wall_s"] = time.perf_counter() - started
    with atomic_path(args.out) as tmp_out:
        tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"load average start {load_start} end {report['load_average_at_end']}; "
          f"{report['benchmark_wall_s']:.0f} s; wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
