"""Each bundle's inference network, plain against the inference-time rewrites (pathbundles.inference_network:
BatchNorm folded into the convolutions, channels_last; pathbundles.inferers.AutocastInferer: bfloat16 autocast;
optionally torch.compile), side by side in one process, as a fraction of the machine's arithmetic peak measured in
the same run, with a per-layer roofline that says which layers hold the network below it.

Per bundle and width (the demo weights' width, and the paper's: ScanNet and SegMitos VGG16 width 1.0, DMMN 1.0,
ResNet-34 widen_factor 1.0), one input of the size the bundle feeds its network (a ScanNet ROI of lp 16, a 1000 px
HPF, a DMMN batch of 16 three-view sets, 4 spatial-LSTM grids; smaller for the paper widths, stated in the JSON):

- FLOPs of one forward pass, counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add);
- median seconds of ``repeats`` passes of each variant after one warm-up pass, interleaved (plain, folded, folded +
  channels_last, the same under bfloat16 autocast, and with ``--compile`` the same through ``torch.compile``), so
  machine load hits all alike; achieved GFLOP/s;
- peaks, measured before and after (the lower taken): the float32 FMA peak and the bfloat16 dot-product peak of
  benchmarks/fma_peak.c (register-only FMA chains on every thread: the roofline's compute ceiling), the 2048 x 2048
  float32 ``torch.matmul`` rate (what the BLAS reaches), and the memory bandwidth of a 256 MiB ``torch.add``
  (the roofline's slope); each variant's fraction of the FMA peak of its precision;
- max |output difference| of each variant against the plain network, relative to the output's std;
- ``layers`` (folded + channels_last, float32): every convolution and linear layer timed alone on its own input
  (captured by forward hooks, median of ``repeats``): FLOPs, bytes moved at least once (input, output, weights),
  arithmetic intensity, GFLOP/s, fraction of the FMA peak, share of the network's time, and ``memory_bound`` where
  its intensity lies below the ridge point (FMA peak / bandwidth); the rest of the pass (pooling, ReLU,
  upsampling, the LSTM) is ``other_seconds``.

Weights: random (seed 0) with BatchNorm statistics set to non-trivial values; timing does not depend on them, and
the shipped weights' equality is tested in tests/test_inference_network.py (float32 rewrites within 1e-4 of the
logit scale, bfloat16 within the bounds stated there).

    python benchmarks/bench_inference_network.py [--threads 2] [--repeats 5] [--only scannet,dmmn] [--compile]
        [--out benchmarks/results/inference_network.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import (cpu_bf16_flags, fma_peak, machine_info, matmul_peak,  # noqa: E402  (the script's folder)
                     median_time, sync)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "common"))

from pathbundles.inference_network import prepare_for_inference  # noqa: E402


def networks() -> list[tuple[str, str, nn.Module, tuple[int, ...]]]:
    """(bundle, width label, network, input shape) for the demo width and the paper's."""
    from pathbundles.dmmn import DMMN
    from pathbundles.scannet import ScanNet
    from pathbundles.segmitos import SegMitosFCN
    from pathbundles.spatial_lstm import SpatialLSTMNet

    return [
        ("scannet", "demo 0.125", ScanNet(width=0.125, batch_norm=True), (1, 3, 724, 724)),
        ("scannet", "paper 1.0", ScanNet(width=1.0, batch_norm=True), (1, 3, 468, 468)),
        ("segmitos 32s", "demo 0.125", SegMitosFCN("32s", width=0.125, batch_norm=True), (1, 3, 1000, 1000)),
        ("segmitos 8s", "demo 0.125", SegMitosFCN("8s", width=0.125, batch_norm=True), (1, 3, 1000, 1000)),
        ("segmitos 32s", "paper 1.0", SegMitosFCN("32s", width=1.0, batch_norm=True), (1, 3, 500, 500)),
        ("dmmn", "demo", DMMN(num_classes=6, width=0.25, batch_norm=True), (16, 9, 256, 256)),
        ("dmmn", "paper 1.0", DMMN(num_classes=6, width=1.0, batch_norm=True), (2, 9, 256, 256)),
        ("spatial_lstm", "demo 0.25", SpatialLSTMNet(widen_factor=0.25, feature_norm=True), (4, 9, 3, 224, 224)),
        ("spatial_lstm", "paper 1.0", SpatialLSTMNet(widen_factor=1.0, feature_norm=True), (1, 9, 3, 224, 224)),
    ]


def _randomise_norms(network: nn.Module) -> nn.Module:
    for m in network.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return network.eval()


def flops_of(network: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        network(x)
    return int(counter.get_total_flops())


def memory_bandwidth(repeats: int = 7, mib: int = 256) -> dict[str, Any]:
    """GB/s of ``torch.add(a, b, out=c)`` over ``mib`` MiB float32 tensors (2 reads + 1 write per element)."""
    n = mib * 2 ** 20 // 4
    a, b, c = torch.rand(n), torch.rand(n), torch.empty(n)
    t, times, _ = median_time(lambda: torch.add(a, b, out=c), repeats, warmup=2)
    return {"mib": mib, "seconds_median": t, "gbytes_per_s": 3 * 4 * n / t / 1e9,
            "gbytes_per_s_best": 3 * 4 * n / min(times) / 1e9}


def measure_peaks(threads: int, device: str = "cpu") -> dict[str, Any]:
    """The CPU's FMA peaks, matmul rate and bandwidth; on a GPU only the 8192^2 float32 matmul rate (its FMA peak
    is the card's datasheet figure, not measured here)."""
    if device != "cpu":
        return {"fma": None, "float32_gflops": None, "bfloat16_gflops": None,
                "matmul": matmul_peak(8192, 7, device), "bandwidth": None}
    fma = fma_peak(threads)
    fp32 = [fma[k]["gflops"] for k in ("avx512", "avx2") if "gflops" in fma.get(k, {})]
    return {"fma": fma, "float32_gflops": max(fp32) if fp32 else None,
            "bfloat16_gflops": fma.get("bf16", {}).get("gflops"),
            "matmul": matmul_peak(2048, 7), "bandwidth": memory_bandwidth()}


def layer_flops_bytes(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Multiply-add FLOPs (x2) and the bytes a layer must move at least once: its input, output and weights."""
    weight = module.weight
    if isinstance(module, nn.Linear):
        flops = 2.0 * y.numel() * module.in_features
    else:
        flops = 2.0 * y.numel() * weight.shape[1] * weight[0, 0].numel()
    params = sum(p.numel() for p in module.parameters())
    return flops, float(x.element_size() * (x.numel() + y.numel() + params))


def layer_roofline(network: nn.Module, x: torch.Tensor, repeats: int, network_seconds: float,
                   peak_gflops: float, bandwidth_gbs: float) -> dict[str, Any]:
    """Every convolution and linear layer of ``network`` timed alone on the input it gets in a pass over ``x``."""
    captured: list[tuple[str, nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: captured.append((name, m, i[0].detach())))
             for name, m in network.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        network(x)
    for hook in hooks:
        hook.remove()
    ridge = peak_gflops / bandwidth_gbs  # FLOP per byte where the roofline turns
    layers, total = [], 0.0
    with torch.no_grad():
        for name, module, inputs in captured:
            t, _, y = median_time(lambda: module(inputs), repeats, warmup=1)
            flops, nbytes = layer_flops_bytes(module, inputs, y)
            total += t
            layers.append({"name": name, "input_shape": list(inputs.shape), "output_shape": list(y.shape),
                           "gflop": flops / 1e9, "mbytes": nbytes / 1e6, "flop_per_byte": flops / nbytes,
                           "seconds": t, "gflops": flops / t / 1e9, "fraction_of_peak": flops / t / 1e9 / peak_gflops,
                           "share_of_network_time": t / network_seconds, "memory_bound": flops / nbytes < ridge})
    below = [layer for layer in layers if layer["fraction_of_peak"] < 0.75]
    return {"ridge_flop_per_byte": ridge, "layers": layers, "layers_seconds": total,
            "other_seconds": network_seconds - total, "other_share": 1 - total / network_seconds,
            "share_in_layers_below_75pct": sum(layer["seconds"] for layer in below) / network_seconds,
            "share_in_memory_bound_layers": sum(layer["seconds"] for layer in layers if layer["memory_bound"])
            / network_seconds}


def bfloat16_autocast(network: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    from pathbundles.inferers import AutocastInferer

    inferer = AutocastInferer("bfloat16")
    return lambda x: inferer(x, network).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="", help="comma-separated bundle names to run (default all)")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile of the folded channels_last network (compile time recorded)")
    parser.add_argument("--no-layers", action="store_true", help="leave the per-layer roofline out")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: the networks on the GPU (benchmarks/gpu.sh); no FMA peak and no roofline there")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "inference_network.json"))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    device = args.device
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    report: dict[str, Any] = {
        "machine": machine_info(["torch"]), "cpu_bf16_flags": cpu_bf16_flags(), "threads": args.threads,
        "repeats": args.repeats, "load_average_at_start": list(os.getloadavg()),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": device, "entries": []}
    if device == "cuda":
        report["cuda"] = {"device": torch.cuda.get_device_name(0), "cuda": torch.version.cuda,
                          "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}
    peaks_before = measure_peaks(args.threads, device)
    print(f"peaks: float32 FMA {peaks_before['float32_gflops']} GFLOP/s, bfloat16 {peaks_before['bfloat16_gflops']}, "
          f"matmul {peaks_before['matmul']['gflops_median']:.1f}, bandwidth "
          f"{(peaks_before['bandwidth'] or {}).get('gbytes_per_s')} GB/s", flush=True)
    for bundle, width, plain, shape in networks():
        if args.only and bundle.split()[0] not in args.only.split(","):
            continue
        plain = _randomise_norms(plain).to(device)
        x = (torch.rand(shape) * 2 - 1).to(device)
        fast = prepare_for_inference(copy.deepcopy(plain), fold=True, channels_last=True)
        variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            "plain": plain,
            "folded": prepare_for_inference(copy.deepcopy(plain), fold=True, channels_last=False),
            "folded_channels_last": fast,
            "plain_bfloat16": bfloat16_autocast(plain),
            "folded_channels_last_bfloat16": bfloat16_autocast(fast)}
        compile_seconds = None
        if args.compile:
            compiled = torch.compile(copy.deepcopy(fast))
            start = time.perf_counter()
            with torch.no_grad():
                compiled(x)
            compile_seconds = time.perf_counter() - start
            variants["folded_channels_last_compiled"] = compiled
        flops = flops_of(plain, x)
        times: dict[str, list[float]] = {k: [] for k in variants}
        with torch.no_grad():
            reference = plain(x)
            diffs = {k: float((m(x) - reference).abs().max() / reference.std()) for k, m in variants.items()}
            for _ in range(args.repeats):
                for key, network in variants.items():
                    sync(device)
                    start = time.perf_counter()
                    network(x)
                    sync(device)
                    times[key].append(time.perf_counter() - start)
        median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        entry = {"bundle": bundle, "width": width, "input_shape": list(shape), "gflop_per_pass": flops / 1e9,
                 "seconds_median": median, "seconds_all": times,
                 "achieved_gflops": {k: flops / t / 1e9 for k, t in median.items()},
                 "speedup_over_plain": {k: median["plain"] / t for k, t in median.items()},
                 "max_abs_diff_over_output_std": diffs, "compile_seconds": compile_seconds}
        if not args.no_layers and device == "cpu":
            entry["roofline"] = layer_roofline(fast, x, args.repeats, median["folded_channels_last"],
                                               peaks_before["float32_gflops"],
                                               peaks_before["bandwidth"]["gbytes_per_s"])
        report["entries"].append(entry)
        print(f"{bundle:13s} {width:11s} {flops / 1e9:8.1f} GFLOP  " + "  ".join(
            f"{k} {t:7.3f} s ({flops / t / 1e9:6.1f} GF/s)" for k, t in median.items()), flush=True)
    peaks_after = measure_peaks(args.threads, device)
    report["peaks"] = {"before": peaks_before, "after": peaks_after}
    used = {key: min(v for v in (peaks_before[key], peaks_after[key]) if v is not None) if peaks_before[key] else None
            for key in ("float32_gflops", "bfloat16_gflops")}
    used["matmul_gflops"] = min(peaks_before["matmul"]["gflops_median"], peaks_after["matmul"]["gflops_median"])
    report["peaks"]["used"] = used
    for entry in report["entries"]:
        entry["fraction_of_fma_peak"] = {
            k: g / (used["bfloat16_gflops"] if k.endswith("bfloat16") and used["bfloat16_gflops"]
                    else used["float32_gflops"]) for k, g in entry["achieved_gflops"].items()} \
            if used["float32_gflops"] else None
        entry["fraction_of_matmul_rate"] = {k: g / used["matmul_gflops"] for k, g in entry["achieved_gflops"].items()}
    report["load_average_at_end"] = list(os.getloadavg())
    from pathbundles.atomic import atomic_path

    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    print(f"peaks used {used}; load average {report['load_average_at_start'][0]:.2f} -> "
          f"{report['load_average_at_end'][0]:.2f}; written to {args.out}")


if __name__ == "__main__":
    main()
