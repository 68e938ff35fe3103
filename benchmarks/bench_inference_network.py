"""Each bundle's inference network, plain against the inference-time rewrites (pathbundles.inference_network:
BatchNorm folded into the convolutions, channels_last), side by side in one process, as a fraction of the machine's
float32 matmul peak measured in the same run.

Per bundle and width (the demo weights' width, and the paper's: ScanNet and SegMitos VGG16 width 1.0, DMMN 1.0,
ResNet-34 widen_factor 1.0), one input of the size the bundle feeds its network (a ScanNet ROI of lp 16, a 1000 px
HPF, a DMMN batch of 16 three-view sets, 4 spatial-LSTM grids; smaller for the paper widths, stated in the JSON):

- FLOPs of one forward pass, counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add);
- median seconds of ``repeats`` passes of each variant, interleaved (plain, folded, folded + channels_last), so
  machine load hits all alike; achieved GFLOP/s and the fraction of the matmul peak (2048 x 2048
  ``torch.matmul``, median, measured before and after, the lower taken);
- max |output difference| of each variant against the plain network, relative to the output's std.

Weights: random (seed 0) with BatchNorm statistics set to non-trivial values; timing does not depend on them, and
the shipped weights' equality is tested in tests/test_inference_network.py.

    python benchmarks/bench_inference_network.py [--threads 2] [--repeats 5] [--only scannet,dmmn]
        [--out benchmarks/results/inference_network.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, matmul_peak  # noqa: E402  (benchmarks/machine.py, the script's own folder)

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="", help="comma-separated bundle names to run (default all)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "inference_network.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    report = {"machine": machine_info(["torch"]), "threads": args.threads, "repeats": args.repeats,
              "load_average_at_start": list(os.getloadavg()), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "entries": []}
    peak_before = matmul_peak(2048, 7)
    for bundle, width, plain, shape in networks():
        if args.only and bundle.split()[0] not in args.only.split(","):
            continue
        plain = _randomise_norms(plain)
        x = torch.rand(shape) * 2 - 1
        variants = {"plain": plain,
                    "folded": prepare_for_inference(copy.deepcopy(plain), fold=True, channels_last=False),
                    "folded_channels_last": prepare_for_inference(copy.deepcopy(plain), fold=True,
                                                                  channels_last=True)}
        flops = flops_of(plain, x)
        times: dict[str, list[float]] = {k: [] for k in variants}
        with torch.no_grad():
            reference = plain(x)
            diffs = {k: float((m(x) - reference).abs().max() / reference.std()) for k, m in variants.items()}
            for _ in range(args.repeats):
                for key, network in variants.items():
                    start = time.perf_counter()
                    network(x)
                    times[key].append(time.perf_counter() - start)
        median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        entry = {"bundle": bundle, "width": width, "input_shape": list(shape), "gflop_per_pass": flops / 1e9,
                 "seconds_median": median, "seconds_all": times,
                 "achieved_gflops": {k: flops / t / 1e9 for k, t in median.items()},
                 "speedup_over_plain": {k: median["plain"] / t for k, t in median.items()},
                 "max_abs_diff_over_output_std": diffs}
        report["entries"].append(entry)
        print(f"{bundle:13s} {width:11s} {flops / 1e9:8.1f} GFLOP  " + "  ".join(
            f"{k} {t:7.3f} s ({flops / t / 1e9:6.1f} GF/s)" for k, t in median.items()), flush=True)
    peak_after = matmul_peak(2048, 7)
    peak = min(peak_before["gflops_median"], peak_after["gflops_median"])
    report["matmul_peak"] = {"before": peak_before, "after": peak_after, "gflops_used": peak}
    for entry in report["entries"]:
        entry["fraction_of_matmul_peak"] = {k: g / peak for k, g in entry["achieved_gflops"].items()}
    report["load_average_at_end"] = list(os.getloadavg())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"matmul peak {peak:.1f} GFLOP/s; load average {report['load_average_at_start'][0]:.2f} -> "
          f"{report['load_average_at_end'][0]:.2f}; written to {args.out}")


if __name__ == "__main__":
    main()
