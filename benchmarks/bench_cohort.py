"""Cohort inference (``pathbundles.cohort``) with the scannet bundle on CPU: slides per hour in one process versus
two gloo processes under torchrun, the area balancing, where a slide's time goes, and how long the network waits
for data with and without DataLoader workers.

Slides: one large and four small phantom metastasis slides (``make_phantom``, 0.5 um/px; default 4096 px and 4 x
2048 px, so the large slide has the area of the four small ones together: a balanced split by area puts it alone on
one rank, a split by count would not). Each configuration is one fresh ``python -m pathbundles.cohort`` (or
``python -m torch.distributed.run --nproc_per_node 2 -m pathbundles.cohort``) over the same datalist into a fresh
output folder, with the bundle's own CPU settings (lp 24, alpha 2, batch 1) unless ``--lp`` is given:

1. ``one_process``: one process with ``--threads`` torch threads (default 2: the whole machine), 2 DataLoader workers;
2. ``two_processes``: torchrun, 2 processes x 1 thread, 2 workers each;
3. ``one_process_no_workers``: as 1 with ``num_workers 0`` (reading in the network's thread), for the data wait.

Per configuration: the cohort's ``summary.json`` (wall time from planning to summary, slides/hour, the pooled
steady-state data-wait fraction, busy seconds per rank) and the per-slide timings of ``slides.csv`` (setup = workflow
parsing + tissue planning + network build + checkpoint load; first batch = DataLoader start-up + first read;
iterations; data waits; tail = the writer finishing the slide's files), plus the process wall time (with imports).

Run (2 cores, ~6 min under load): cd /work/main && .venv/bin/python benchmarks/bench_cohort.py
Smoke run (~2 min):             cd /work/main && .venv/bin/python benchmarks/bench_cohort.py --quick --out /tmp/c.json
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "common"))

from machine import machine_info  # noqa: E402  (benchmarks/machine.py, the script's own folder)

from pathbundles.atomic import atomic_path  # noqa: E402
from pathbundles.cohort import shard_by_area  # noqa: E402

BUNDLE = REPO / "bundles" / "scannet"
LEVEL0_MPP = 0.5
TIMING_COLUMNS = ("seconds", "setup_s", "first_batch_s", "data_wait_s", "iteration_s", "tail_s")


def make_slides(root: Path, large_px: int, small_px: int, n_small: int) -> Path:
    """One large and ``n_small`` small phantom slides; the datalist (names made unique) as ``cohort.json``."""
    from pathbundles.phantom import make_phantom

    items = []
    for tag, size, n, seed in (("large", large_px, 1, 21), ("small", small_px, n_small, 22)):
        doc = json.loads(make_phantom(root / tag, kind="metastasis", n=n, seed=seed, size_px=(size, size)).read_text())
        items += [{"image": str(root / tag / item["image"]), "label": item["label"],
                   "name": f"{tag}_{Path(item['image']).stem}"} for item in doc["items"]]
    path = root / "cohort.json"
    path.write_text(json.dumps({"items": items}, indent=1))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_configuration(label: str, datalist: Path, out: Path, nproc: int, threads: int, num_workers: int,
                      lp: int | None) -> dict[str, Any]:
    """One cohort run in fresh processes: its summary, per-slide timings and wall time."""
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                str(free_port())] if nproc > 1 else []
    command = [sys.executable, *launcher, "-m", "pathbundles.cohort", "--bundle", str(BUNDLE), "--slides",
               str(datalist), "--out", str(out), "--num_workers", str(num_workers)] + \
        (["--lp", str(lp)] if lp is not None else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO / "common")}
    print(f"{label}: {nproc} process(es) x {threads} thread(s), {num_workers} DataLoader workers ...", flush=True)
    load = list(os.getloadavg())
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        return {"label": label, "error": f"exit status {proc.returncode}", "process_wall_s": wall}
    summary = json.loads((out / "summary.json").read_text())
    with open(out / "slides.csv", newline="") as f:
        slides = [{k: (float(v) if k in TIMING_COLUMNS or k in ("area_px", "steady_data_wait_fraction") else v)
                   for k, v in row.items() if k in ("name", "rank", "area_px", "steady_data_wait_fraction",
                                                    *TIMING_COLUMNS)} for row in csv.DictReader(f)]
    totals = {k: sum(s[k] for s in slides) for k in TIMING_COLUMNS}
    # A process's first slide also pays its one-time imports (MONAI bundle, ignite, the method's modules).
    later = [s for s in slides if any(o["rank"] == s["rank"] for o in slides[:slides.index(s)])]
    result = {"label": label, "processes": nproc, "threads_per_process": threads, "num_workers": num_workers,
              "load_average_at_start": load, "process_wall_s": wall,
              "cohort_wall_s": summary["wall_s"], "slides_per_hour": summary["slides_per_hour"],
              "area_gpx_per_hour": summary["area_gpx_per_hour"], "busy_s_per_rank": summary["busy_s_per_rank"],
              "steady_data_wait_fraction": summary["steady_data_wait_fraction"], "done": summary["done"],
              "failed": summary["failed"],
              "share_of_slide_time": {k: totals[k] / totals["seconds"] for k in TIMING_COLUMNS if k != "seconds"},
              "setup_s_median_after_first_slide_of_a_process": statistics.median(s["setup_s"] for s in later)
              if later else None,
              "slides": slides}
    print(f"  {summary['done']} slides in {summary['wall_s']:.1f} s ({wall:.1f} s with imports): "
          f"{summary['slides_per_hour']:.0f} slides/h, data wait {summary['steady_data_wait_fraction']:.3f}, "
          f"busy s per rank {summary['busy_s_per_rank']}", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cohort.json")
    parser.add_argument("--quick", action="store_true", help="2048 px + 2 x 1024 px slides, lp 8")
    parser.add_argument("--large-px", type=int, default=None, help="side of the large slide (default 4096)")
    parser.add_argument("--small-px", type=int, default=None, help="side of the small slides (default 2048)")
    parser.add_argument("--n-small", type=int, default=None, help="number of small slides (default 4)")
    parser.add_argument("--lp", type=int, default=None, help="ScanNet lp override (default: the bundle's)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the one-process runs")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the slides go (default: a temp folder)")
    args = parser.parse_args(argv)
    large = args.large_px or (2048 if args.quick else 4096)
    small = args.small_px or (1024 if args.quick else 2048)
    n_small = args.n_small or (2 if args.quick else 4)
    lp = args.lp if args.lp is not None else (8 if args.quick else None)

    started = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "bench_cohort", "quick": args.quick, "complete": False,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": list(os.getloadavg()), "machine": machine_info(("torch", "monai", "numpy")),
        "command": sys.argv[1:] if argv is None else argv,
        "settings": {"bundle": "scannet", "large_px": large, "small_px": small, "n_small": n_small,
                     "level0_mpp": LEVEL0_MPP, "lp": lp or "bundle default (24 on CPU)"},
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = args.cache_dir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        print(f"phantom slides: 1 x {large} px + {n_small} x {small} px ...", flush=True)
        datalist = make_slides(root, large, small, n_small)
        areas = [float(large) ** 2] + [float(small) ** 2] * n_small
        by_area = shard_by_area(areas, 2)
        by_count = [list(range(0, len(areas), 2)), list(range(1, len(areas), 2))]
        report["sharding_2_ranks"] = {
            "by_area": {"shards": by_area, "area_px": [sum(areas[i] for i in s) for s in by_area]},
            "by_count_round_robin": {"shards": by_count, "area_px": [sum(areas[i] for i in s) for s in by_count]}}
        for label, nproc, threads, workers in (("one_process", 1, args.threads, 2), ("two_processes", 2, 1, 2),
                                               ("one_process_no_workers", 1, args.threads, 0)):
            report["runs"].append(run_configuration(label, datalist, root / f"out-{label}", nproc, threads, workers,
                                                    lp))
            report["benchmark_wall_s"] = time.perf_counter() - started
            with atomic_path(args.out) as tmp_out:  # after every configuration: a long run keeps its part
                tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    runs = {r["label"]: r for r in report["runs"] if "error" not in r}
    if "one_process" in runs and "two_processes" in runs:
        report["speedup_two_processes"] = runs["two_processes"]["slides_per_hour"] / runs["one_process"][
            "slides_per_hour"]
    report["complete"] = True
    report["load_average_at_end"] = list(os.getloadavg())
    report["benchmark_wall_s"] = time.perf_counter() - started
    with atomic_path(args.out) as tmp_out:
        tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
