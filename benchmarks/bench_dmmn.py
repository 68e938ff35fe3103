"""DMMN: concentric multi-magnification reads per backend and read path, and whole-slide segmentation time and memory.

The issue asks to "benchmark both paths (patch sets per second) and pick the faster by default per slide", and for
the whole-slide segmentation time and peak memory of the dmmn bundle. Measured here (see benchmarks/README.md):

1. Reads (``reads`` in the JSON). Patch sets per second of :func:`pathbundles.multimag.read_concentric` (three
   256 px views at 0.5, 1.0 and 2.0 um/px around one centre; the default ``pad_value=0``) for every slide backend
   (tifffile, openslide, and cucim when it imports; otherwise recorded as unavailable) x read path ("levels": each
   view at exactly its mpp, a pyramid level as stored where one is at that mpp, area-resampled where none is;
   "tile": one 1024 px tile at 0.5 um/px area-averaged to the coarser views) x slide variant x read order, all in one run over
   the same centres:

   * slide variants: the phantom multi-class slide (``make_multiclass_dataset(n=1, size_px=--size, seed=5)``, a
     pyramidal JPEG TIFF, 256 px tiles, downsample-2 levels at 0.5, 1, 2, ... um/px) and the same level-0 pixels
     rewritten as a single-level JPEG TIFF (``write_pyramid_tiff(min_level_px=side)``), where "levels" has to
     resample the 10x and 5x views from 512 and 1024 px of level 0;
   * read orders: ``shuffled``, --centres tissue tiles of the stride-256 grid drawn at random (seeded), as a
     shuffled training epoch reads them; ``raster``, a run of --centres consecutive tissue tiles in row-major order,
     as inference walks the grid (neighbouring tiles share most of the 1024 px tile, so caches help).

   Each measurement opens the slide afresh (empty tile cache; opening is not timed) and reads every centre once in
   order; --repeats rounds, each timing every configuration once in turn with the two paths in alternating order
   (so load changes on a shared machine hit all alike); patch sets per second = centres / seconds, median and best
   round reported. One warm-up set per backend and path before the first round. Also recorded: the mean absolute
   difference between the two paths' views at one centre, and what :func:`pathbundles.multimag.choose_read_path`
   (the dataset's ``read_path="auto"``) picks in --chooser-trials trials, each on a fresh handle with 7 spread
   centres (1 warm-up + 3 timed per path, each at a centre of its own, as the dataset does), next to the path the
   full measurement found faster.
2. Whole slide (``whole_slide``), only when ``bundles/dmmn/configs/inference.json`` exists (else recorded as
   skipped with the reason): ``python -m monai.bundle run --config_file bundles/dmmn/configs/inference.json
   --data_source <folder with one slide> --output_dir <tmp> --ckpt_path <copy>`` on phantom multi-class slides
   of --slide-sizes (default 4096 and 8192 px square; --quick 1024 and 2048), one process at a time. Weights: a
   copy of ``bundles/dmmn/models/model.pt`` (training may rewrite it meanwhile; sha256 in the JSON), else random
   weights of the config's ``network_def`` (seed 0): time and memory do not depend on them. Each run goes through
   a small wrapper process of this script that times the command and reports
   ``getrusage(RUSAGE_CHILDREN).ru_maxrss``: the peak resident set of the bundle process (or of its largest
   waited-for descendant, e.g. a DataLoader worker, whichever is larger; not their sum; CPU memory only). A
   baseline run of the same wrapper that only imports torch, MONAI and the DMMN modules gives the memory every run
   pays before it reads a pixel. Reported: seconds and peak RSS per slide, and for each larger slide its area
   ratio to the smallest beside the ratios of time, peak RSS and peak RSS above the baseline (a whole-slide map
   held in memory grows with the area; a tiled, on-disk pipeline should not). Runs that exit non-zero are kept in
   the JSON with their return code and left out of the ratios.
3. bfloat16 autocast (``whole_slide.autocast``; skipped with --no-autocast): right after the float32 run of the
   smallest slide, the same command with ``--autocast True`` (``pathbundles.inferers.AutocastInferer``), and its
   time, peak RSS and time ratio to the float32 run, beside the agreement of the two label maps (level 0 of the
   label TIFFs): the fraction of pixels with the same class, per float32 class too. Whether the CPU has native
   bfloat16 instructions (``avx512_bf16``, ``amx_bf16`` in /proc/cpuinfo) is recorded: without them autocast can be
   slower than float32.

Full run (part 1 about 2-3 minutes on 2 busy cores; part 2 on the CPU about 1 s per 256 px tile under load, i.e.
roughly 5 and 20 minutes for the 4096 and 8192 px slides, whose whole grid the bundle segments):
    cd /work/main && .venv/bin/python benchmarks/bench_dmmn.py
Smoke run (part 1 on a 2048 px slide, 16 centres, 2 rounds: under a minute; parts 2 and 3 on 1024 and 2048 px
slides: about 2 minutes):
    cd /work/main && .venv/bin/python benchmarks/bench_dmmn.py --quick --out /tmp/dmmn_quick.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "common"))

from machine import cpu_bf16_flags, machine_info, snapshot_file  # noqa: E402  (benchmarks/machine.py, the script's own folder)
import numpy as np  # noqa: E402

from pathbundles.atomic import atomic_path  # noqa: E402

BUNDLE_CONFIG = REPO / "bundles" / "dmmn" / "configs" / "inference.json"
SHIPPED_MODEL = REPO / "bundles" / "dmmn" / "models" / "model.pt"
SLIDE_SEED, LEVEL0_MPP, PATCH_PX = 5, 0.5, 256
MPPS = (0.5, 1.0, 2.0)
READ_PATHS = ("levels", "tile")
BACKENDS = ("tifffile", "openslide", "cucim")
ORDERS = ("shuffled", "raster")
DISTRIBUTIONS = ("numpy", "pillow", "tifffile", "imagecodecs", "openslide-python", "openslide-bin", "cucim-cu12",
                 "torch", "monai")
BASELINE_IMPORTS = "import torch, monai.bundle, pathbundles.dmmn, pathbundles.multimag"


# ---- slides ----------------------------------------------------------------------------------------------------


def make_slide(cache: Path, size_px: int) -> Path:
    """The phantom multi-class slide of ``size_px`` (pyramidal JPEG TIFF, levels 0.5, 1, 2, ... um/px)."""
    from pathbundles.phantom import make_multiclass_dataset

    folder = cache / f"phantom_mc_{size_px}_seed{SLIDE_SEED}"
    if not (folder / "dataset.json").exists():
        make_multiclass_dataset(folder, n=1, size_px=size_px, seed=SLIDE_SEED, mpp=LEVEL0_MPP)
    return folder / "phantom_mc_000.tif"


def make_level0_only(pyramid: Path) -> Path:
    """The level-0 pixels of ``pyramid`` as a single-level JPEG TIFF (no 1.0 or 2.0 um/px level)."""
    from pathbundles.wsi import open_slide
    from pathbundles.writers import write_pyramid_tiff

    flat = pyramid.parent / "level0_only" / f"{pyramid.stem}_level0.tif"
    if not flat.exists():
        flat.parent.mkdir(exist_ok=True)
        with open_slide(pyramid, backend="tifffile") as slide:
            pixels = slide.read_level_region(0, (0, 0), slide.dimensions)
        write_pyramid_tiff(flat, pixels, mpp=LEVEL0_MPP, tile_px=256, compression="jpeg", quality=90,
                           min_level_px=max(pixels.shape[:2]))
    return flat


def tissue_centres(pyramid: Path, n: int, seed: int) -> dict[str, Any]:
    """Centres of tissue tiles of the stride-256 grid at 0.5 um/px: n at random and a row-major run of n."""
    from pathbundles.tissue import tissue_mask
    from pathbundles.wsi import open_slide

    with open_slide(pyramid, backend="tifffile") as slide:
        origins = tissue_mask(slide, mpp=8.0).tile_origins(PATCH_PX, PATCH_PX, MPPS[0])
    half = PATCH_PX / 2 * MPPS[0] / LEVEL0_MPP
    centres = [(float(x) + half, float(y) + half) for x, y in origins]
    n = min(n, len(centres))
    shuffled = [centres[i] for i in np.random.default_rng(seed).choice(len(centres), n, replace=False)]
    start = max(0, len(centres) // 2 - n // 2)
    return {"shuffled": shuffled, "raster": centres[start:start + n], "n_tissue_tiles": len(centres)}


def slide_levels(path: Path) -> list[dict[str, Any]]:
    from pathbundles.wsi import open_slide

    with open_slide(path, backend="tifffile") as slide:
        return [{"width": w, "height": h, "mpp": slide.level_mpp(i)[0]}
                for i, (w, h) in enumerate(slide.level_dimensions)]


# ---- part 1: reads ---------------------------------------------------------------------------------------------


def time_reads(path: Path, backend: str, read_path: str, centres: list[tuple[float, float]]) -> float:
    """Seconds to read every centre's patch set in order, from a freshly opened slide (opening not timed)."""
    from pathbundles.multimag import read_concentric
    from pathbundles.wsi import open_slide

    with open_slide(path, backend=backend) as slide:
        start = time.perf_counter()
        for centre in centres:
            read_concentric(slide, centre, MPPS, PATCH_PX, read_path)
        return time.perf_counter() - start


def path_difference(path: Path, backend: str, centre: tuple[float, float]) -> list[float]:
    """Mean absolute difference (grey levels) between the "levels" and "tile" views at one centre, per view."""
    from pathbundles.multimag import read_concentric
    from pathbundles.wsi import open_slide

    with open_slide(path, backend=backend) as slide:
        a, b = (read_concentric(slide, centre, MPPS, PATCH_PX, p) for p in READ_PATHS)
    return [float(np.abs(x.astype(np.float64) - y).mean()) for x, y in zip(a, b)]


def chooser_trials(path: Path, backend: str, centres: list[tuple[float, float]], trials: int) -> list[dict]:
    """``choose_read_path`` on a fresh handle per trial, each with its own ``1 + 2 * AUTO_READ_REPEATS`` of
    ``centres`` (as MultiMagnificationDataset: one warm-up, then one centre per timed read of each path)."""
    from pathbundles.multimag import AUTO_READ_REPEATS, choose_read_path
    from pathbundles.wsi import open_slide

    n = 1 + len(READ_PATHS) * AUTO_READ_REPEATS
    out = []
    for t in range(trials):
        picked = [centres[(t * n + k) % len(centres)] for k in range(n)]
        with open_slide(path, backend=backend) as slide:
            choice, seconds = choose_read_path(slide, picked, MPPS, PATCH_PX, repeats=AUTO_READ_REPEATS)
        out.append({"path": choice, "seconds_per_set": seconds})
    return out


def run_reads(cache: Path, size_px: int, n_centres: int, repeats: int, trials: int,
              report: dict[str, Any], out: Path) -> dict[str, Any]:
    from pathbundles.wsi import available_backends

    print(f"phantom multi-class slide {size_px} px and its level-0-only copy ...", flush=True)
    t0 = time.perf_counter()
    pyramid = make_slide(cache, size_px)
    variants = {"pyramid": pyramid, "level0_only": make_level0_only(pyramid)}
    centres = tissue_centres(pyramid, n_centres, SLIDE_SEED)
    found = available_backends()
    backends = {b: ({"available": True} if b in found else
                    {"available": False, "reason": f"{b} is not importable here"}) for b in BACKENDS}
    usable = [b for b in BACKENDS if backends[b]["available"]]
    part: dict[str, Any] = {
        "slide": {"generator": f"pathbundles.phantom.make_multiclass_dataset(n=1, size_px={size_px}, "
                               f"seed={SLIDE_SEED}, mpp={LEVEL0_MPP})", "size_px": size_px,
                  "prepared_s": time.perf_counter() - t0, "n_tissue_tiles": centres["n_tissue_tiles"],
                  "variants": {v: {"file": p.name, "levels": slide_levels(p)} for v, p in variants.items()}},
        "backends": backends, "mpps": list(MPPS), "patch_px": PATCH_PX, "n_centres": len(centres["shuffled"]),
        "repeats": repeats, "centres": {o: centres[o] for o in ORDERS},
    }
    configs = [(v, b, o) for v in variants for b in usable for o in ORDERS]
    seconds: dict[tuple[str, str, str, str], list[float]] = {(v, b, o, p): [] for v, b, o in configs
                                                              for p in READ_PATHS}
    for v in variants:
        for b in usable:
            for p in READ_PATHS:  # warm-up: decoder libraries, first allocations
                time_reads(variants[v], b, p, centres["shuffled"][:1])
    for r in range(repeats):
        print(f"round {r + 1}/{repeats} ...", flush=True)
        for k, (v, b, o) in enumerate(configs):
            for p in (READ_PATHS if (r + k) % 2 == 0 else READ_PATHS[::-1]):
                seconds[(v, b, o, p)].append(time_reads(variants[v], b, p, centres[o]))
    rows = []
    n = len(centres["shuffled"])
    for v, b, o in configs:
        row = {"variant": v, "backend": b, "order": o}
        for p in READ_PATHS:
            s = seconds[(v, b, o, p)]
            row[p] = {"seconds_per_round": s, "sets_per_s_median": n / statistics.median(s),
                      "sets_per_s_best": n / min(s)}
        row["faster"] = max(READ_PATHS, key=lambda p: row[p]["sets_per_s_median"])
        row["speedup_of_faster"] = (max(row[p]["sets_per_s_median"] for p in READ_PATHS)
                                    / min(row[p]["sets_per_s_median"] for p in READ_PATHS))
        rows.append(row)
    part["throughput"] = rows
    choices = []
    for v in variants:
        for b in usable:
            print(f"choose_read_path on {v} / {b} ...", flush=True)
            tried = chooser_trials(variants[v], b, centres["shuffled"], trials)
            counts = Counter(t["path"] for t in tried)
            measured = {o: next(r["faster"] for r in rows if (r["variant"], r["backend"], r["order"]) == (v, b, o))
                        for o in ORDERS}
            choices.append({"variant": v, "backend": b, "trials": tried, "picks": dict(counts),
                            "majority": counts.most_common(1)[0][0], "faster_measured": measured,
                            "view_mean_abs_diff_levels_vs_tile": path_difference(variants[v], b,
                                                                                  centres["shuffled"][0])})
    part["chooser"] = choices
    report["reads"] = part
    write(report, out)
    return part


# ---- part 2: whole slide ---------------------------------------------------------------------------------------


def measure_child(command: list[str], timeout_s: float) -> dict[str, Any]:
    """Run ``command`` under a fresh wrapper process of this script: wall seconds and the children's peak RSS."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--measure-child", json.dumps(command),
                           "--child-timeout", str(timeout_s)], stdout=subprocess.PIPE, text=True, check=False,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO / "common")})
    if proc.returncode:
        return {"error": f"wrapper exited with {proc.returncode} (see its stderr above)"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_worker(command: list[str], timeout_s: float) -> dict[str, Any]:
    """In the wrapper: run the command (its output to our stderr), then report time and RUSAGE_CHILDREN peak."""
    start = time.perf_counter()
    try:
        code = subprocess.run(command, stdout=sys.stderr, cwd=REPO, timeout=timeout_s, check=False).returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    wall = time.perf_counter() - start
    # Linux reports ru_maxrss in KiB: the largest peak of any waited-for descendant.
    return {"command": command, "returncode": code, "wall_s": wall,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def run_whole_slide(cache: Path, sizes: list[int], timeout_s: float, report: dict[str, Any],
                    out: Path, autocast: bool = True) -> dict[str, Any]:
    if not BUNDLE_CONFIG.exists():
        reason = (f"skipped: {BUNDLE_CONFIG.relative_to(REPO)} not found (the dmmn bundle is not in this checkout "
                  "yet); run again once it exists")
        print(reason, flush=True)
        report["whole_slide"] = {"skipped": reason}
        write(report, out)
        return report["whole_slide"]
    print("baseline (imports only) ...", flush=True)
    part: dict[str, Any] = {"config": str(BUNDLE_CONFIG.relative_to(REPO)), "baseline_imports": BASELINE_IMPORTS,
                            "baseline": measure_child([sys.executable, "-c", BASELINE_IMPORTS], timeout_s),
                            "runs": []}
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        weights, part["weights"] = snapshot_weights(Path(tmp))
        for size in sizes:
            slide = make_slide(cache, size)
            source = Path(tmp) / f"slides_{size}"  # a folder holding this one slide: the bundle's data_source
            source.mkdir()
            try:
                os.link(slide, source / slide.name)
            except OSError:
                shutil.copyfile(slide, source / slide.name)
            command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE_CONFIG),
                       "--data_source", str(source), "--output_dir", str(Path(tmp) / f"out_{size}"),
                       "--ckpt_path", str(weights)]
            print(f"whole slide {size} x {size} px (fresh process) ...", flush=True)
            run = {"size_px": size, "area_px": size * size, **measure_child(command, timeout_s)}
            part["runs"].append(run)
            report["whole_slide"] = part
            write(report, out)
            if autocast and size == sizes[0]:
                part["autocast"] = (run_autocast(command, run, Path(tmp), size, timeout_s)
                                    if run.get("returncode") == 0 else
                                    {"size_px": size, "skipped": "the float32 run of this slide failed"})
                write(report, out)
    ok = [r for r in part["runs"] if r.get("returncode") == 0]
    base_rss = part["baseline"].get("peak_rss_mib")
    if ok:
        first = ok[0]
        for r in ok[1:]:
            r["vs_smallest"] = {"area_ratio": r["area_px"] / first["area_px"],
                                "time_ratio": r["wall_s"] / first["wall_s"],
                                "peak_rss_ratio": r["peak_rss_mib"] / first["peak_rss_mib"]}
            if base_rss is not None and first["peak_rss_mib"] > base_rss:
                r["vs_smallest"]["peak_rss_above_baseline_ratio"] = ((r["peak_rss_mib"] - base_rss)
                                                                      / (first["peak_rss_mib"] - base_rss))
    report["whole_slide"] = part
    write(report, out)
    return part


def run_autocast(command: list[str], float32_run: dict[str, Any], tmp: Path, size: int,
                 timeout_s: float) -> dict[str, Any]:
    """The float32 ``command`` again with bfloat16 autocast; time, memory, and label agreement with float32."""
    import numpy as np
    import tifffile

    out_f32 = Path(command[command.index("--output_dir") + 1])
    out_bf16 = tmp / f"out_{size}_bf16"
    bf16_command = [*command, "--autocast", "True"]
    bf16_command[bf16_command.index("--output_dir") + 1] = str(out_bf16)
    print(f"whole slide {size} x {size} px with bfloat16 autocast (fresh process) ...", flush=True)
    run: dict[str, Any] = {"size_px": size, "cpu_bf16_flags": cpu_bf16_flags(),
                           **measure_child(bf16_command, timeout_s)}
    if run.get("returncode") != 0 or float32_run.get("returncode") != 0:
        return run
    run["time_ratio_vs_float32"] = run["wall_s"] / float32_run["wall_s"]
    agreement: dict[str, Any] = {}
    for f32_path in sorted((out_f32 / "labels").glob("*.tif")):
        try:
            a = tifffile.imread(f32_path, level=0)
            b = tifffile.imread(out_bf16 / "labels" / f32_path.name, level=0)
        except (OSError, ValueError) as err:  # a missing or unreadable label map: record it, go on
            agreement[f32_path.stem] = {"error": f"{type(err).__name__}: {err}"}
            continue
        agreement[f32_path.stem] = {"pixels": int(a.size), "same_class": float(np.mean(a == b)),
                                    "same_class_per_float32_class": {int(c): float(np.mean(b[a == c] == c))
                                                                     for c in np.unique(a)}}
    run["label_agreement"] = agreement
    return run


def snapshot_weights(tmp: Path) -> tuple[Path, str]:
    """A copy of the shipped checkpoint (training may rewrite it during the run), else random weights; and a label.

    Timing and memory do not depend on the weights, so the benchmark also runs before the bundle has been trained.
    """
    weights = tmp / "dmmn_model.pt"
    if SHIPPED_MODEL.exists():
        return weights, snapshot_file(SHIPPED_MODEL, weights)
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE_CONFIG))
    parser["bundle_root"] = str(BUNDLE_CONFIG.parents[1])
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    torch.save({"model": network.state_dict()}, weights)
    return weights, (f"random (torch.manual_seed(0), the config's network_def): "
                     f"{SHIPPED_MODEL.relative_to(REPO)} does not exist")


# ---- output ----------------------------------------------------------------------------------------------------


def write(report: dict[str, Any], out: Path) -> None:
    with atomic_path(out) as tmp_out:
        tmp_out.write_text(json.dumps(report, indent=2) + "\n")


def print_tables(report: dict[str, Any]) -> None:
    reads = report.get("reads")
    if reads:
        print(f"\npatch sets per second (median of {reads['repeats']} rounds of {reads['n_centres']} centres, "
              f"fresh handle per round), {reads['slide']['size_px']} px slide\n")
        print("| slide | backend | order | levels sets/s | tile sets/s | faster | by |")
        print("|---|---|---|---|---|---|---|")
        for r in reads["throughput"]:
            print(f"| {r['variant']} | {r['backend']} | {r['order']} | {r['levels']['sets_per_s_median']:.1f} | "
                  f"{r['tile']['sets_per_s_median']:.1f} | {r['faster']} | {r['speedup_of_faster']:.2f}x |")
        for b, info in reads["backends"].items():
            if not info["available"]:
                print(f"\n{b}: unavailable ({info['reason']})")
        print("\n| slide | backend | choose_read_path picks | faster measured (shuffled / raster) | "
              "view diff levels vs tile (x20, x10, x5) |")
        print("|---|---|---|---|---|")
        for c in reads["chooser"]:
            picks = ", ".join(f"{p} {n}" for p, n in sorted(c["picks"].items()))
            diff = ", ".join(f"{d:.2f}" for d in c["view_mean_abs_diff_levels_vs_tile"])
            print(f"| {c['variant']} | {c['backend']} | {picks} | {c['faster_measured']['shuffled']} / "
                  f"{c['faster_measured']['raster']} | {diff} |")
    whole = report.get("whole_slide")
    if whole and "skipped" not in whole:
        base = whole["baseline"]
        print(f"\nwhole slide (baseline imports: {base.get('peak_rss_mib', float('nan')):.0f} MiB, "
              f"{base.get('wall_s', float('nan')):.1f} s)\n")
        print(f"weights: {whole.get('weights')}\n")
        print("| slide px | return code | wall s | peak RSS MiB | vs smallest: area | time | peak RSS | "
              "RSS above baseline |")
        print("|---|---|---|---|---|---|---|---|")
        for r in whole["runs"]:
            vs = r.get("vs_smallest", {})
            ratios = " | ".join(f"{vs[k]:.2f}" if k in vs else "-" for k in
                                ("area_ratio", "time_ratio", "peak_rss_ratio", "peak_rss_above_baseline_ratio"))
            print(f"| {r['size_px']} | {r.get('returncode', r.get('error'))} | {r.get('wall_s', float('nan')):.1f} | "
                  f"{r.get('peak_rss_mib', float('nan')):.0f} | {ratios} |")
        auto = whole.get("autocast")
        if auto:
            agree = ", ".join(f"{name} {a['same_class']:.4f}" if "same_class" in a else f"{name} {a.get('error')}"
                              for name, a in auto.get("label_agreement", {}).items())
            flags = auto.get("cpu_bf16_flags") or "none"
            print(f"\nbfloat16 autocast, {auto['size_px']} px (CPU bf16 flags: {flags}): "
                  f"return code {auto.get('returncode', auto.get('error', auto.get('skipped')))}, "
                  f"{auto.get('wall_s', float('nan')):.1f} s, "
                  f"{auto.get('peak_rss_mib', float('nan')):.0f} MiB, time vs float32 "
                  f"{auto.get('time_ratio_vs_float32', float('nan')):.2f}; same class as float32: {agree or '-'}")
    elif whole:
        print(f"\nwhole slide: {whole['skipped']}")


# ---- main ------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2048 px slide, 16 centres, 2 rounds, 3 chooser trials; whole slides of "
                             "1024 and 2048 px")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dmmn.json")
    parser.add_argument("--size", type=int, default=None, help="side of the read benchmark's slide, px at 0.5 um/px "
                                                               "(default 4096; --quick 2048)")
    parser.add_argument("--centres", type=int, default=None, help="centres per read order (default 64; --quick 16)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3; --quick 2)")
    parser.add_argument("--chooser-trials", type=int, default=None, help="choose_read_path trials per slide variant "
                                                                         "and backend (default 5; --quick 3)")
    parser.add_argument("--slide-sizes", default=None,
                        help="comma-separated whole-slide sides in px (default 4096,8192; --quick 1024,2048)")
    parser.add_argument("--slide-timeout", type=float, default=3600.0, help="seconds per whole-slide run (3600)")
    parser.add_argument("--skip-reads", action="store_true", help="run only the whole-slide part")
    parser.add_argument("--skip-slides", action="store_true", help="run only the read part")
    parser.add_argument("--no-autocast", action="store_true",
                        help="skip the bfloat16 autocast run of the smallest whole slide")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the phantom slides are generated (default: a temporary folder)")
    parser.add_argument("--measure-child", metavar="JSON", help=argparse.SUPPRESS)
    parser.add_argument("--child-timeout", type=float, default=3600.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_child:
        print(json.dumps(child_worker(json.loads(args.measure_child), args.child_timeout)))
        return

    size = args.size or (2048 if args.quick else 4096)
    n_centres = args.centres or (16 if args.quick else 64)
    repeats = args.repeats or (2 if args.quick else 3)
    trials = args.chooser_trials or (3 if args.quick else 5)
    sizes = [int(s) for s in (args.slide_sizes or ("1024,2048" if args.quick else "4096,8192")).split(",")]
    load_start = list(os.getloadavg())
    started = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "bench_dmmn", "quick": args.quick, "complete": False,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": load_start, "machine": machine_info(DISTRIBUTIONS),
        "command": sys.argv[1:] if argv is None else argv,
        "settings": {"size_px": size, "centres": n_centres, "repeats": repeats, "chooser_trials": trials,
                     "slide_sizes": sizes, "autocast": not args.no_autocast, "slide_timeout_s": args.slide_timeout,
                     "mpps": list(MPPS), "patch_px": PATCH_PX},
    }
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        if not args.skip_reads:
            run_reads(cache, size, n_centres, repeats, trials, report, args.out)
        if not args.skip_slides:
            run_whole_slide(cache, sizes, args.slide_timeout, report, args.out, autocast=not args.no_autocast)
    report["complete"] = True
    report["load_average_at_end"] = list(os.getloadavg())
    report["benchmark_wall_s"] = time.perf_counter() - started
    write(report, args.out)
    print_tables(report)
    print(f"\nload average start {load_start} end {report['load_average_at_end']}; "
          f"{report['benchmark_wall_s']:.0f} s; wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
