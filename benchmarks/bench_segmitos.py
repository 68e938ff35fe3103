"""SegMitos HPF inference: the whole image in one pass versus stitched tiles, side by side in one run.

The issue asks for the seconds per 2084 x 2084 HPF of whole-image and tiled inference, against the paper's
2.9 s network + 0.13 s post-processing per 2084 x 2084 HPF and 0.92 s per 1539 x 1376 HPF (whole image, Titan X),
on CPU and on a GPU whenever one is available. Measured here (see benchmarks/README.md):

1. Per network configuration (``--variants`` x ``--widths`` x ``--precisions``; default FCN-8s at the bundle's demo
   width 0.125 and the paper's full VGG16 width 1.0, float32), in its own fresh subprocess: for every HPF size
   (default 2084 x 2084 and 1539 x 1376, cut from one phantom HPF) the network seconds per HPF of
   ``SegMitosInferer(tile_px=None)`` (the whole HPF in one pass) and of ``SegMitosInferer(tile_px=T,
   overlap_px=256)`` for each ``--tiles`` T (default 1024, the bundle's tile, and 2048), each mode after one
   warm-up run, then ``--repeats`` rounds that time every mode once in turn (interleaved, so load changes on a
   shared machine hit all modes alike); the median is reported. ``torch.no_grad``, eval mode, float32 (TF32 off)
   unless ``--precisions`` says otherwise. The network time includes the softmax and the tile stitching of the
   inferer and, on a GPU, ends with ``torch.cuda.synchronize``; copying the mitosis map to the host is timed apart.
2. Agreement: the max and mean absolute difference of the mitosis probability of every tiled mode against the
   whole-image pass, and whether post-processing finds the same blobs in both.
3. Post-processing seconds per HPF (``hpf.blob_candidates`` + ``hpf.filter_blobs`` at the bundle's thresholds, on
   the CPU as in the bundle) on the network's map and on a mitosis-like map (a soft disc at every ground-truth
   mitosis of the phantom, 0.02 elsewhere), since a random network's map is not what a trained one gives.
4. Peak memory of each mode's first run: on a GPU ``torch.cuda.max_memory_allocated`` (and ``_reserved``) after
   ``reset_peak_memory_stats``; on the CPU the process's VmHWM (/proc/self/status) after resetting it
   (``echo 5 > /proc/self/clear_refs``, Linux) and returning freed heap to the system (``malloc_trim``), with the
   resident size before the run; each configuration runs in its own fresh process, as in bench_scannet.py.
5. Convolution FLOPs of each mode (counted from the layer shapes on the meta device, 2 per multiply-accumulate,
   ConvTranspose2d included) and the achieved FLOP/s as a fraction of the device's float32 matmul peak.
   Also the seconds to read the HPF (PNG decode + scaling to [-1, 1] + copy to the device).

Weights: the shipped ``bundles/segmitos/models/model.pt`` for the configuration it fits (copied first; its sha256
goes into the JSON), else fixed random weights (seed 0) whose score layers are rescaled so that the logit
difference has a standard deviation of about 2 on a crop of the HPF (probabilities spread over (0, 1), so the
tiled-versus-whole agreement is checked over a real range). Timing does not depend on the weights.

Full CPU run (2 cores: about 5 min for width 0.125 and 1.5 to 2 h for width 1.0, estimated from the counted FLOPs
at the throughput measured by --quick and by bench_scannet.py's full-width runs):
    cd /work/main && .venv/bin/python benchmarks/bench_segmitos.py
GPU run (a few minutes, most of it process start-up):
    cd /work/main && .venv/bin/python benchmarks/bench_segmitos.py --device cuda --repeats 10 \\
        --precisions fp32,tf32,amp --out benchmarks/results/segmitos_gpu.json
Smoke run (under a minute):
    cd /work/main && .venv/bin/python benchmarks/bench_segmitos.py --quick --out /tmp/segmitos_quick.json
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "common"))

from machine import (machine_info, matmul_peak, median_time, snapshot_file, sync,  # noqa: E402  (the script's folder)
                     vm_status_kib)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from pathbundles.atomic import atomic_path  # noqa: E402

SHIPPED_MODEL = REPO / "bundles" / "segmitos" / "models" / "model.pt"
MPP, SIGMA_UM = 0.25, 1.0  # bundles/segmitos/configs/inference.json
MIN_MEAN_SCORE, MIN_AREA_UM2 = 0.0, 0.0  # the bundle's shipped (untuned) thresholds
PHANTOM_SEED, PHANTOM_N, PHANTOM_IMAGE = 10, 2, 0  # image 000 of seed 10 holds 6 mitoses (n=1 would hold none)
PAPER = {"device": "NVIDIA Titan X (Caffe, float32)",
         "hpf_2084x2084": {"network_s": 2.9, "postprocessing_s": 0.13},
         "hpf_1539x1376": {"whole_image_s": 0.92}}
PRECISIONS = ("fp32", "tf32", "amp")


# ---- machine ---------------------------------------------------------------------------------------------------


def torch_info(device: str) -> dict[str, Any]:
    """The machine plus the torch settings the timings depend on."""
    info = {**machine_info(("torch", "monai", "numpy", "scipy", "scikit-image")),
            "torch_num_threads": torch.get_num_threads(), "torch_num_interop_threads": torch.get_num_interop_threads(),
            "mkldnn": torch.backends.mkldnn.is_available(), "device": device}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                       "memory_gib": props.total_memory / 2 ** 30, "count": torch.cuda.device_count(),
                       "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                       "cudnn_benchmark": torch.backends.cudnn.benchmark}
    return info




def trim_heap() -> None:
    """Give freed heap memory back to the system (glibc), so that the resident size is what is in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident size (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def set_precision(precision: str, device: str) -> dict[str, Any]:
    """TF32 switches for ``precision`` (fp32: off, tf32: on, amp: off, autocast on top); returns the settings."""
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    settings = {"precision": precision, "tf32": tf32, "autocast_dtype": None}
    if precision == "amp":  # as MONAI's SupervisedEvaluator(amp=True): torch.autocast's default dtype
        settings["autocast_dtype"] = str(torch.get_autocast_dtype(device)).replace("torch.", "")
    return settings






def fp32_matmul_peak(n: int, repeats: int, device: str) -> dict[str, Any]:
    """float32 (TF32 off) n x n matmul: the device's practical float32 peak."""
    set_precision("fp32", device)
    return matmul_peak(n, repeats, device)


# ---- the network -----------------------------------------------------------------------------------------------


def score_layers(net: nn.Module) -> list[nn.Module]:
    return [m for m in (net.score_fr, net.score_pool4, net.score_pool3) if m is not None]


#: widths benchmarked with BatchNorm after every VGG convolution: the bundle's demo network (VGG16-BN, width 0.125)
BATCH_NORM_WIDTHS = (0.125,)


def make_net(variant: str, width: float, seed: int = 0) -> nn.Module:
    """Fixed random weights; the score layers (score_fr and the zero-initialised skip scores) fan-in scaled, so
    the skip paths of 16s / 8s contribute and the logits are of order 1 (calibrated later on the HPF). The demo
    width has BatchNorm, as the bundle's network; the paper's width 1.0 has none, as the paper's VGG16."""
    from pathbundles.segmitos import SegMitosFCN

    torch.manual_seed(seed)
    net = SegMitosFCN(variant, num_classes=2, width=width, batch_norm=any(abs(width - w) < 1e-9
                                                                         for w in BATCH_NORM_WIDTHS))
    for layer in score_layers(net):
        nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="linear")
        nn.init.zeros_(layer.bias)
    return net.eval()


def load_weights(net: nn.Module, weights: str | None) -> str | None:
    """Load the shipped checkpoint into ``net`` if it fits (same variant and width); a label, or None if not."""
    if not weights:
        return None
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    try:
        net.load_state_dict(state)
    except (RuntimeError, KeyError):
        return None
    return "shipped"


def calibrate_logits(net: nn.Module, x: torch.Tensor, target_std: float = 2.0, crop_px: int = 256) -> float:
    """Scale the score layers (the network is linear after them) so that logit1 - logit0 has std ``target_std``
    on a centred crop of ``x``; returns the factor."""
    h, w = x.shape[-2:]
    c = min(crop_px, h, w)
    y0, x0 = (h - c) // 2, (w - c) // 2
    with torch.no_grad():
        logits = net(x[..., y0:y0 + c, x0:x0 + c]).float()
        std = float((logits[:, 1] - logits[:, 0]).std())
        factor = target_std / std if std > 0 else 1.0
        for layer in score_layers(net):
            layer.weight.mul_(factor)
    return factor


def count_conv_macs(net: nn.Module, inferer: Any, shape: tuple[int, ...]) -> tuple[int, int]:
    """(multiply-accumulates of every Conv2d and ConvTranspose2d, forward passes) of ``inferer`` on an input of
    ``shape``, from the layer shapes on the meta device (nothing is computed or copied)."""
    from pathbundles.segmitos import SegMitosFCN

    with torch.device("meta"):
        meta = SegMitosFCN(net.variant, num_classes=net.num_classes, width=net.width, in_channels=net.in_channels,
                           batch_norm=net.batch_norm)
    total, calls = [0], [0]

    def conv_hook(module, inputs, output):
        kh, kw = module.kernel_size
        if isinstance(module, nn.ConvTranspose2d):  # every input element feeds Cout/groups x kh x kw outputs
            total[0] += inputs[0].numel() * module.out_channels // module.groups * kh * kw
        else:
            total[0] += output.numel() * module.in_channels // module.groups * kh * kw

    hooks = [m.register_forward_hook(conv_hook) for m in meta.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    hooks.append(meta.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)))
    with torch.no_grad():
        inferer(torch.empty(shape, device="meta"), meta)
    for h in hooks:
        h.remove()
    return total[0], calls[0]


# ---- one network configuration, in its own process -------------------------------------------------------------


def truth_like_map(shape_hw: tuple[int, int], centroids_xy: list) -> np.ndarray:
    """What a trained network gives, roughly: 0.02 background, a soft disc of radius 12 px (3 um) and peak ~0.95
    at every ground-truth mitosis."""
    from scipy import ndimage

    from pathbundles.segmitos import concentric_label

    disc = concentric_label(shape_hw, np.asarray(centroids_xy, np.float64).reshape(-1, 2), 12.0).astype(np.float32)
    return 0.02 + 0.93 * ndimage.gaussian_filter(disc, 2.0)


def worker(cfg: dict) -> dict[str, Any]:
    """Time every mode for every HPF of ``cfg`` with one network in this (fresh) process."""
    torch.set_num_threads(cfg["threads"])
    device = cfg["device"]
    from pathbundles.hpf import blob_candidates, filter_blobs, read_hpf
    from pathbundles.segmitos import SegMitosInferer

    log = lambda msg: print(f"    [{cfg['variant']} w{cfg['width']} {cfg['precision']}] {msg}",  # noqa: E731
                            file=sys.stderr, flush=True)
    settings = set_precision(cfg["precision"], device)
    autocast = (torch.autocast(device, dtype=torch.get_autocast_dtype(device)) if cfg["precision"] == "amp"
                else torch.autocast(device, enabled=False))
    net = make_net(cfg["variant"], cfg["width"])
    weights = load_weights(net, cfg.get("weights"))
    net = net.to(device).eval()
    repeats = cfg["repeats"]

    def read(path: str) -> torch.Tensor:
        image = torch.from_numpy(np.ascontiguousarray(read_hpf(path).transpose(2, 0, 1)))
        x = image[None].to(device).float() / 127.5 - 1.0  # the bundle's ScaleIntensityRanged(0..255 -> -1..1)
        sync(device)
        return x

    def postprocess(prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        blobs = blob_candidates(prob, MPP, SIGMA_UM)
        return blobs, filter_blobs(blobs, MIN_MEAN_SCORE, MIN_AREA_UM2)

    hpfs, factor = [], None
    for hpf in cfg["hpfs"]:
        log(f"HPF {hpf['width_px']} x {hpf['height_px']} px")
        entry: dict[str, Any] = {"hpf": {k: v for k, v in hpf.items() if k != "centroids_xy"},
                                 "load_average_at_start": list(os.getloadavg())}
        started = time.perf_counter()
        t_read, read_times, x = median_time(lambda p=hpf["file"]: read(p), repeats, device)
        entry["read_s"], entry["read_times_s"] = t_read, read_times
        if weights is None and not hpfs:  # calibrate once, on the first HPF
            factor = calibrate_logits(net, x)
        modes = [{"mode": "whole", "tile_px": None, "overlap_px": None, "inferer": SegMitosInferer(tile_px=None)}]
        modes += [{"mode": f"tiled {t}", "tile_px": t, "overlap_px": cfg["overlap_px"],
                   "inferer": SegMitosInferer(tile_px=t, overlap_px=cfg["overlap_px"])} for t in cfg["tiles"]]

        def run(mode: dict, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), autocast:
                out = mode["inferer"](x, net)
            sync(device)
            return out

        # Each mode's first run: warm-up, peak memory and the mitosis map kept for the comparison.
        for mode in modes:
            macs, passes = count_conv_macs(net, mode["inferer"], tuple(x.shape))
            mode.update(conv_macs=macs, conv_flops=2 * macs, forward_passes=passes)
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            else:
                trim_heap()
                rss_before, reset_ok = vm_status_kib("VmRSS"), reset_peak_rss()
            start = time.perf_counter()
            try:
                out = run(mode, x)
            except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as err:
                mode["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                log(f"{mode['mode']}: {mode['error']}")
                continue
            mode["first_s"] = time.perf_counter() - start
            if device == "cuda":
                mode["peak_memory"] = {"kind": "torch.cuda.max_memory_allocated",
                                       "allocated_before_mib": base / 2 ** 20,
                                       "max_allocated_mib": torch.cuda.max_memory_allocated() / 2 ** 20,
                                       "max_reserved_mib": torch.cuda.max_memory_reserved() / 2 ** 20}
                mode["peak_memory"]["increase_mib"] = mode["peak_memory"]["max_allocated_mib"] - base / 2 ** 20
            else:
                hwm = vm_status_kib("VmHWM")
                mode["peak_memory"] = {"kind": "VmHWM after clear_refs" if reset_ok else "VmHWM of the process so far",
                                       "rss_before_mib": rss_before / 1024, "vmhwm_mib": hwm / 1024,
                                       "increase_mib": (hwm - rss_before) / 1024 if reset_ok else None}
            start = time.perf_counter()
            mode["prob"] = out[0, 1].float().cpu().numpy()
            mode["first_to_host_s"] = time.perf_counter() - start
            del out
            log(f"{mode['mode']:12s} first run {mode['first_s']:8.3f} s, "
                f"{mode['conv_flops'] / 1e9:9.1f} GFLOP in {passes} pass(es)")

        ok = [m for m in modes if "error" not in m]
        for m in ok:
            m["times_s"], m["to_host_times_s"] = [], []
        for r in range(repeats):  # interleaved rounds
            for m in ok:
                sync(device)
                start = time.perf_counter()
                out = run(m, x)
                m["times_s"].append(time.perf_counter() - start)
                start = time.perf_counter()
                out[0, 1].float().cpu().numpy()
                m["to_host_times_s"].append(time.perf_counter() - start)
                del out
            log(f"round {r + 1}/{repeats}: " + ", ".join(f"{m['mode']} {m['times_s'][-1]:.3f} s" for m in ok))

        whole = next((m for m in ok if m["mode"] == "whole"), None)
        for m in ok:
            m["network_s"] = statistics.median(m["times_s"])
            m["to_host_s"] = statistics.median(m["to_host_times_s"])
            m["achieved_gflops"] = m["conv_flops"] / m["network_s"] / 1e9
            m["blobs"] = postprocess(m["prob"])[0]
            m["n_blobs"] = len(m["blobs"])
        if whole is not None:
            for m in ok:
                diff = np.abs(m["prob"] - whole["prob"])
                m["prob_max_abs_diff_vs_whole"], m["prob_mean_abs_diff_vs_whole"] = float(diff.max()), float(diff.mean())
                m["speedup_vs_whole"] = whole["network_s"] / m["network_s"]
                same = m["blobs"].shape == whole["blobs"].shape
                m["blobs_max_abs_diff_vs_whole"] = float(np.abs(m["blobs"] - whole["blobs"]).max()) if same and len(
                    m["blobs"]) else (0.0 if same else None)
            entry["prob_range_whole"] = [float(whole["prob"].min()), float(whole["prob"].max())]
            entry["prob_mean_whole"] = float(whole["prob"].mean())

        # Post-processing, on the CPU as in the bundle: the network's map and a mitosis-like one.
        post = {}
        maps = {}
        if ok:
            maps["network_map"] = (whole or ok[0])["prob"]
        maps["truth_like_map"] = truth_like_map((hpf["height_px"], hpf["width_px"]), hpf["centroids_xy"])
        for name, prob in maps.items():
            t, times, (blobs, detections) = median_time(lambda p=prob: postprocess(p), repeats)
            post[name] = {"seconds": t, "times_s": times, "n_blobs": len(blobs), "n_detections": len(detections)}
        post["truth_like_map"]["n_truth"] = len(hpf["centroids_xy"])
        entry["postprocessing"] = post
        for m in modes:
            m.pop("inferer"), m.pop("prob", None), m.pop("blobs", None)
        entry["modes"] = modes
        entry["load_average_at_end"] = list(os.getloadavg())
        entry["wall_s"] = time.perf_counter() - started
        hpfs.append(entry)
        del x
    return {"variant": cfg["variant"], "width": cfg["width"], "precision_settings": settings,
            "weights": cfg.get("weights_label") if weights else "random (make_net seed 0, score layers calibrated)",
            "logit_scale_factor": factor, "threads": torch.get_num_threads(), "device": device, "repeats": repeats,
            "vmhwm_process_mib": vm_status_kib("VmHWM") / 1024, "hpfs": hpfs}


# ---- inputs ----------------------------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """"2084x2084,1539x1376" -> [(2084, 2084), (1539, 1376)] as (width, height)."""
    sizes = []
    for item in text.split(","):
        w, h = (int(v) for v in item.lower().split("x"))
        sizes.append((w, h))
    return sizes


def prepare_hpfs(cache: Path, sizes: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """One phantom HPF as large as the largest size; the other sizes are centred crops of it (PNG files)."""
    from PIL import Image

    from pathbundles.phantom import make_phantom

    side = max(max(s) for s in sizes)
    folder = cache / f"phantom_mitosis_{side}_seed{PHANTOM_SEED}"
    name = f"phantom_hpf_{PHANTOM_IMAGE:03d}"
    start = time.perf_counter()
    if not (folder / "dataset.json").exists():
        make_phantom(folder, kind="mitosis", n=PHANTOM_N, seed=PHANTOM_SEED, size_px=side, mpp=MPP)
    made = time.perf_counter() - start
    source = folder / "images" / f"{name}.png"
    truth = np.loadtxt(folder / "centroids" / f"{name}.csv", delimiter=",", ndmin=2).reshape(-1, 2)
    generator = (f"pathbundles.phantom.make_phantom(kind='mitosis', n={PHANTOM_N}, seed={PHANTOM_SEED}, "
                 f"size_px={side}, mpp={MPP}), image {PHANTOM_IMAGE}")
    hpfs = []
    for w, h in sizes:
        x0, y0 = (side - w) // 2, (side - h) // 2
        if (w, h) == (side, side):
            path = source
        else:
            path = folder / f"{name}_crop_{w}x{h}.png"
            if not path.exists():
                with Image.open(source) as im, atomic_path(path) as tmp:
                    im.crop((x0, y0, x0 + w, y0 + h)).save(tmp, format="PNG")
        inside = truth[(truth[:, 0] >= x0) & (truth[:, 0] < x0 + w) & (truth[:, 1] >= y0) & (truth[:, 1] < y0 + h)]
        hpfs.append({"width_px": w, "height_px": h, "file": str(path), "source": generator,
                     "crop_origin_xy": [x0, y0], "generated_s": made,
                     "centroids_xy": (inside - [x0, y0]).tolist(), "n_mitoses": len(inside)})
    return hpfs


def snapshot_weights(tmp: Path) -> tuple[str | None, str | None]:
    """A copy of the shipped checkpoint (training may rewrite it during the run) and its label."""
    if not SHIPPED_MODEL.exists():
        return None, None
    weights = tmp / "segmitos_model.pt"
    return str(weights), snapshot_file(SHIPPED_MODEL, weights)


# ---- output ----------------------------------------------------------------------------------------------------


def fmt_s(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if v < 10 else f"{v:.1f}"


def print_table(report: dict[str, Any]) -> None:
    peak = report.get("matmul_peak", {}).get("gflops_median")
    m = report["machine"]
    where = m["gpu"]["name"] if "gpu" in m else f"{m['cpu']}, {m['torch_num_threads']} threads"
    print(f"\n{where}; matmul peak {peak:.1f} GFLOP/s; load average start "
          f"{report['load_average_at_start'][0]:.2f}; median of {report['repeats']} after one warm-up\n")
    print("| HPF px | network | precision | mode | passes | network s/HPF | vs whole | conv GFLOP | GFLOP/s "
          "(% peak) | peak memory MiB (+ over before) | max abs diff p vs whole | blobs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for cfg in report["runs"]:
        net = f"{cfg['variant']} w{cfg['width']}"
        if "error" in cfg:
            print(f"| - | {net} | {cfg.get('precision', '-')} | worker failed: {cfg['error'][:80]} "
                  "| | | | | | | | |")
            continue
        prec = cfg["precision_settings"]["precision"]
        for entry in cfg["hpfs"]:
            size = f"{entry['hpf']['width_px']}x{entry['hpf']['height_px']}"
            for mode in entry["modes"]:
                if "error" in mode:
                    print(f"| {size} | {net} | {prec} | {mode['mode']} | {mode['forward_passes']} | "
                          f"{mode['error'][:60]} | | | | | | |")
                    continue
                mem = mode["peak_memory"]
                top = mem.get("max_allocated_mib", mem.get("vmhwm_mib"))
                inc = mem.get("increase_mib")
                pct = f" ({100 * mode['achieved_gflops'] / peak:.0f} %)" if peak else ""
                print(f"| {size} | {net} | {prec} | {mode['mode']} | {mode['forward_passes']} | "
                      f"{fmt_s(mode['network_s'])} | {mode.get('speedup_vs_whole', float('nan')):.2f}x | "
                      f"{mode['conv_flops'] / 1e9:.1f} | {mode['achieved_gflops']:.1f}{pct} | "
                      f"{top:.0f}" + (f" (+{inc:.0f})" if inc is not None else "") + " | "
                      f"{mode.get('prob_max_abs_diff_vs_whole', float('nan')):.1e} | {mode['n_blobs']} |")
    print("\n| HPF px | network | precision | read s | post-processing s: network map (blobs) | "
          "mitosis-like map (blobs / truth) | whole HPF s: read + network + to host + post |")
    print("|---|---|---|---|---|---|---|")
    for cfg in report["runs"]:
        if "error" in cfg:
            continue
        for entry in cfg["hpfs"]:
            post = entry["postprocessing"]
            whole = next((m for m in entry["modes"] if m["mode"] == "whole" and "error" not in m), None)
            pn, pt = post.get("network_map"), post["truth_like_map"]
            total = (entry["read_s"] + whole["network_s"] + whole["to_host_s"] + pt["seconds"]) if whole else None
            print(f"| {entry['hpf']['width_px']}x{entry['hpf']['height_px']} | {cfg['variant']} w{cfg['width']} | "
                  f"{cfg['precision_settings']['precision']} | {fmt_s(entry['read_s'])} | "
                  + (f"{fmt_s(pn['seconds'])} ({pn['n_blobs']})" if pn else "-") + " | "
                  f"{fmt_s(pt['seconds'])} ({pt['n_blobs']} / {pt['n_truth']}) | {fmt_s(total)} |")
    print(f"\npaper ({PAPER['device']}): 2084x2084 network {PAPER['hpf_2084x2084']['network_s']} s + post-processing "
          f"{PAPER['hpf_2084x2084']['postprocessing_s']} s; 1539x1376 whole image "
          f"{PAPER['hpf_1539x1376']['whole_image_s']} s")


# ---- main ------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1024 and 896x768 px HPFs, width 0.125, tile 1024, one repeat (under a minute)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "segmitos.json")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when available, else cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--variants", default="8s", help="comma-separated FCN variants (32s, 16s, 8s; default 8s)")
    parser.add_argument("--widths", default=None,
                        help="comma-separated channel width multipliers (default 0.125,1.0: the bundle's demo "
                             "network and the paper's VGG16; --quick: 0.125)")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated HPF sizes WxH (default 2084x2084,1539x1376; --quick: 1024x1024,896x768)")
    parser.add_argument("--tiles", default=None,
                        help="comma-separated tile_px of the tiled modes (default 1024,2048; --quick: 1024)")
    parser.add_argument("--overlap-px", type=int, default=256, help="overlap_px of the tiled modes (default 256)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds after the warm-up (default 3; "
                                                                  "--quick: 1)")
    parser.add_argument("--precisions", default="fp32",
                        help=f"comma-separated, of {', '.join(PRECISIONS)} (default fp32; amp = torch.autocast "
                             "float16 on cuda / bfloat16 on cpu, as the bundle's evaluator on cuda)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the phantom HPF is generated (default: a temporary folder)")
    parser.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    widths = [float(w) for w in (args.widths or ("0.125" if args.quick else "0.125,1.0")).split(",")]
    variants = args.variants.split(",")
    sizes = parse_sizes(args.sizes or ("1024x1024,896x768" if args.quick else "2084x2084,1539x1376"))
    tiles = [int(t) for t in (args.tiles or ("1024" if args.quick else "1024,2048")).split(",")]
    precisions = args.precisions.split(",")
    repeats = args.repeats or (1 if args.quick else 3)
    for p in precisions:
        if p not in PRECISIONS:
            parser.error(f"--precisions: {p!r} is not one of {PRECISIONS}")
    for t in tiles:
        if t % 32 or args.overlap_px % 32 or t <= 2 * args.overlap_px:
            parser.error(f"tile {t} / overlap {args.overlap_px}: multiples of 32 with tile > 2 * overlap")

    torch.set_num_threads(args.threads)
    load_start = list(os.getloadavg())
    started = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "bench_segmitos", "quick": args.quick, "complete": False,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": load_start, "machine": torch_info(device),
        "go_signal_present_at_start": Path("/tmp/bench_go").exists(),
        "command": sys.argv[1:] if argv is None else argv,
        "settings": {"variants": variants, "widths": widths, "sizes_wh": sizes, "tiles": tiles,
                     "overlap_px": args.overlap_px, "repeats": repeats, "warmup": 1, "precisions": precisions,
                     "threads": args.threads, "mpp": MPP, "sigma_um": SIGMA_UM, "min_mean_score": MIN_MEAN_SCORE,
                     "min_area_um2": MIN_AREA_UM2},
        "repeats": repeats, "paper": PAPER,
    }
    n = 4096 if device == "cuda" else (1024 if args.quick else 2048)
    print(f"matmul peak ({n}^3 float32, {device}) ...", flush=True)
    report["matmul_peak"] = fp32_matmul_peak(n, 5 if args.quick else 10, device)
    print(f"  {report['matmul_peak']['gflops_median']:.1f} GFLOP/s (median)", flush=True)
    report["runs"] = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        print(f"phantom HPF, sizes {', '.join(f'{w}x{h}' for w, h in sizes)} ...", flush=True)
        hpfs = prepare_hpfs(cache, sizes)
        report["hpfs"] = [{k: v for k, v in h.items() if k != "centroids_xy"} for h in hpfs]
        weights, weights_label = snapshot_weights(Path(tmp))
        for precision in precisions:
            for variant in variants:
                for width in widths:
                    cfg = {"variant": variant, "width": width, "precision": precision, "device": device,
                           "threads": args.threads, "tiles": tiles, "overlap_px": args.overlap_px,
                           "repeats": repeats, "hpfs": hpfs, "weights": weights, "weights_label": weights_label}
                    print(f"{variant} width {width} {precision} on {device} (fresh process):", flush=True)
                    t0 = time.perf_counter()
                    # stderr passes through (progress lines); the worker's last stdout line is its result.
                    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)],
                                          stdout=subprocess.PIPE, text=True, check=False,
                                          env={**os.environ, "PYTHONPATH": str(REPO / "common")})
                    if proc.returncode:
                        res = {"variant": variant, "width": width, "precision": precision,
                               "error": f"worker exited with {proc.returncode} (see its stderr above)"}
                        print(f"  {res['error']}", flush=True)
                    else:
                        res = json.loads(proc.stdout.strip().splitlines()[-1])
                    res["subprocess_wall_s"] = time.perf_counter() - t0
                    for entry in res.get("hpfs", []):
                        for mode in entry["modes"]:
                            if "achieved_gflops" in mode:
                                mode["fraction_of_matmul_peak"] = (mode["achieved_gflops"]
                                                                   / report["matmul_peak"]["gflops_median"])
                    report["runs"].append(res)
                    report["benchmark_wall_s"] = time.perf_counter() - started
                    with atomic_path(args.out) as tmp_out:  # after every configuration: a long run keeps its part
                        tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    report["complete"] = True
    report["load_average_at_end"] = list(os.getloadavg())
    report["benchmark_wall_s"] = time.perf_counter() - started
    with atomic_path(args.out) as tmp_out:
        tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nload average start {load_start} end {report['load_average_at_end']}; "
          f"{report['benchmark_wall_s']:.0f} s; wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
