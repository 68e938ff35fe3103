"""Every bundle's own inference over phantom slides of growing size: time against tissue area, peak memory.

Issue #22 asks for the scaling curves of every bundle: time must grow linearly with tissue area and peak memory
must stay flat. For each bundle of ``--bundles`` and each side S of ``--sizes``, one phantom slide at a real
scanner's resolution (default 0.243 um/px level 0, Camelyon16's Radboud scanner, so no bundle's working
resolution is a stored level: the 4x level is 0.972 um/px, not 1.0) goes through the bundle as users run it:

    python -m monai.bundle run --config_file bundles/<name>/configs/inference.json --data_source <slide or list>
        --output_dir <tmp> --ckpt_path <copy of the shipped weights>

with the bundle's CPU defaults (scannet alpha 2, spatial_lstm without TTA, dmmn over every tile of the slide
(``use_tissue`` false), segmitos one pass per HPF), one fresh process per run, under bench_dmmn.py's
``measure_child`` wrapper: wall seconds of the whole process (start-up, imports, tissue mask, reading, network,
writing) and the peak resident set of its largest process (``getrusage(RUSAGE_CHILDREN).ru_maxrss``). A baseline
run of the wrapper that only imports torch, MONAI and pathbundles gives the memory paid before a pixel is read.
The process is bench_peers.py's ``bundle_ours_worker`` (``monai.bundle.run`` with those arguments, what the command
line calls, with forward hooks on the prepared network; nothing copied), which also gives ``in_process``: the
seconds of the run in the network's calls, before the first and after the last, and the run over the network end to
end and at steady state (first call to last; issue #22 asks for <= 1.1x there). ``--compile-network`` runs scannet,
dmmn and segmitos with ``--compile_network true`` (torch.compile) into ``results/scaling_compiled.json``.

Slides: scannet, spatial_lstm and segmitos share ``make_phantom(kind="metastasis", n=1, seed=11, size_px=(S, S),
mpp=M)`` (pyramid step 4); dmmn runs on ``make_phantom(kind="multiclass", n=1, seed=5, size_px=S, mpp=M)`` (step
2). Segmitos is an HPF method: its datalist is every 2084 x 2084 px HPF at 0.25 um/px (a level-0 box of
round(2084 x 0.25 / M) px) of the slide's grid whose centre lies on tissue, as ``box`` items of the one slide, so
its work grows with the tissue area as the others' does. Tissue: Otsu mask at 8 um/px
(``pathbundles.tissue.tissue_mask``, what the bundles use); the fraction and the area in mm^2 are recorded.

Reported per bundle: seconds, seconds per mm^2 of tissue, the added seconds per added mm^2 from the next smaller
slide, peak RSS and peak RSS above the baseline at each size; a least-squares line ``seconds = a + b * tissue mm^2``
(a: the fixed start-up cost) with its largest relative residual; and for each larger slide the ratios of area, time
and peak RSS to the smallest. ``results/scaling.png``
plots time against tissue area and peak RSS against slide area for every bundle. Results of bundles and sizes not
run are kept from the existing file (``--fresh`` drops them), so sizes can be added in separate runs.

Full run (2 cores at load 1-2, 2026-12-07: about 10 min for 4096, 8192 and 16384 px; 32768 px took 1 min for
scannet, 3 for spatial_lstm, 6 for dmmn and 7 for segmitos's 99 HPFs, plus 3-4 min to generate each of the two
32768 px phantoms):
    ulimit -s 32768; PYTHONPATH=common MPLBACKEND=Agg .venv/bin/python benchmarks/bench_scaling.py
    ... .venv/bin/python benchmarks/bench_scaling.py --bundles scannet --sizes 32768
Smoke run (about 3 min): ... .venv/bin/python benchmarks/bench_scaling.py --quick --out /tmp/scaling_quick.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "common"))

from machine import machine_info, snapshot_file  # noqa: E402  (the script's folder)

BUNDLES = ("scannet", "spatial_lstm", "dmmn", "segmitos")
SEEDS = {"metastasis": 11, "multiclass": 5}
HPF_PX, HPF_MPP = 2084, 0.25  # segmitos: TUPAC16's HPF side at the bundle's 0.25 um/px
BASELINE_IMPORTS = "import torch, monai.bundle, pathbundles.bundle, pathbundles.wsi"
#: Modules whose calls are the network's time (bench_peers.py's forward hooks): the whole network, except for
#: spatial_lstm, whose inferer calls these three and never ``forward``.
TIMED_MODULES = {"spatial_lstm": ["cnn", "lstm", "classifier"]}


def shipped_weights(bundle: str) -> Path:
    """The weights file the bundle's inference.json loads by default."""
    from monai.bundle import ConfigParser

    config = REPO / "bundles" / bundle / "configs" / "inference.json"
    parser = ConfigParser()
    parser.read_config(str(config))
    parser["bundle_root"] = str(config.parents[1])
    return Path(parser.get_parsed_content("ckpt_path"))


def phantom(cache: Path, kind: str, size: int, mpp: float) -> tuple[Path, str, float]:
    """The phantom slide of ``kind`` and side ``size`` px at ``mpp`` (generated once into ``cache``)."""
    from pathbundles.phantom import make_phantom

    folder = cache / f"phantom_{kind}_{size}_mpp{mpp}_seed{SEEDS[kind]}"
    start = time.perf_counter()
    if not (folder / "dataset.json").exists():
        print(f"generating the {kind} phantom, {size} px at {mpp} um/px ...", flush=True)
        make_phantom(folder, kind=kind, n=1, seed=SEEDS[kind], size_px=(size, size) if kind == "metastasis" else size,
                     mpp=mpp)
    item = json.loads((folder / "dataset.json").read_text())["items"][0]
    return (folder / item["image"], f"pathbundles.phantom.make_phantom(kind={kind!r}, n=1, seed={SEEDS[kind]}, "
            f"size_px={size}, mpp={mpp})", time.perf_counter() - start)


def tissue(slide: Path) -> tuple[dict[str, Any], Any]:
    """Tissue fraction and area of the slide (Otsu at 8 um/px), its size and level-0 um/px; and the mask."""
    import numpy as np

    from pathbundles.tissue import tissue_mask
    from pathbundles.wsi import open_slide

    with open_slide(slide, backend="tifffile") as s:
        (w, h), mpp = s.dimensions, float(s.mpp[0])
        mask = tissue_mask(s, mpp=8.0)
    fraction = float(np.mean(np.asarray(mask.mask) != 0))
    area_mm2 = w * h * mpp * mpp / 1e6
    return {"level0_size": [w, h], "level0_mpp": mpp, "slide_area_mm2": area_mm2, "tissue_fraction": fraction,
            "tissue_area_mm2": fraction * area_mm2}, mask


def hpf_boxes(slide: Path, info: dict[str, Any], mask: Any, folder: Path) -> tuple[Path, int]:
    """Segmitos's datalist: every HPF box of the slide's grid whose centre is on the tissue ``mask`` (a
    ``LevelMask``), as a JSON list of ``box`` items of the one slide."""
    import numpy as np

    (w, h), mpp = info["level0_size"], info["level0_mpp"]
    box = round(HPF_PX * HPF_MPP / mpp)
    ys, xs = np.meshgrid(np.arange(0, h - box + 1, box), np.arange(0, w - box + 1, box), indexing="ij")
    on = np.asarray(mask.at_level0(xs + box / 2, ys + box / 2)) != 0
    items = [{"image": str(slide), "box": [int(x), int(y), box, box], "mpp": mpp} for x, y in zip(xs[on], ys[on])]
    path = folder / f"hpfs_{slide.stem}_{w}.json"
    path.write_text(json.dumps(items))
    return path, len(items)


def network_share(worker: dict[str, Any]) -> dict[str, Any]:
    """The in-process seconds of a bundle run (bench_peers.py's ``bundle_ours_worker``): ``monai.bundle.run`` in
    all, in the network's calls, before the first call and after the last; the run over the network's seconds end
    to end and at steady state (between the first call and the last: start-up, the tissue mask, the first item and
    the last slide's writing left out)."""
    total, network = worker["total_s"], worker["network_forward_s"]
    first, after = worker["first_forward_after_s"], worker["after_last_forward_s"]
    return {"import_s": worker["import_s"], "run_s": total, "network_forward_s": network,
            "network_calls": worker["network_calls"], "first_forward_after_s": first, "after_last_forward_s": after,
            "end_to_end_over_network": total / network if network else None,
            "steady_state_over_network": (total - first - after) / network if network else None}


def fit_line(xs: list[float], ys: list[float]) -> dict[str, Any]:
    """Least squares ``y = a + b x`` and the largest |residual| / y."""
    import numpy as np

    x, y = np.asarray(xs, float), np.asarray(ys, float)
    if len(x) < 2:
        return {}
    b, a = np.polyfit(x, y, 1)
    resid = y - (a + b * x)
    return {"intercept_s": float(a), "slope_s_per_mm2": float(b),
            "max_relative_residual": float(np.max(np.abs(resid) / y)), "points": len(x)}


def summarise(runs: list[dict[str, Any]], baseline_mib: float | None) -> dict[str, Any]:
    ok = sorted((r for r in runs if r.get("returncode") == 0), key=lambda r: r["tissue_area_mm2"])
    out: dict[str, Any] = {"fit_time_vs_tissue_area": fit_line([r["tissue_area_mm2"] for r in ok],
                                                               [r["wall_s"] for r in ok])}
    if ok:
        first = ok[0]
        for before, r in zip(ok, ok[1:]):
            added = r["tissue_area_mm2"] - before["tissue_area_mm2"]
            r["incremental_s_per_tissue_mm2"] = (r["wall_s"] - before["wall_s"]) / added if added > 0 else None
        for r in ok:
            r["s_per_tissue_mm2"] = r["wall_s"] / r["tissue_area_mm2"] if r["tissue_area_mm2"] else None
            if baseline_mib is not None:
                r["peak_rss_above_baseline_mib"] = r["peak_rss_mib"] - baseline_mib
            r["vs_smallest"] = {"tissue_area_ratio": r["tissue_area_mm2"] / first["tissue_area_mm2"],
                                "time_ratio": r["wall_s"] / first["wall_s"],
                                "peak_rss_ratio": r["peak_rss_mib"] / first["peak_rss_mib"]}
        out["peak_rss_mib_range"] = [min(r["peak_rss_mib"] for r in ok), max(r["peak_rss_mib"] for r in ok)]
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    """Time against tissue area and peak RSS against slide area, one line per bundle, into ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pathbundles.atomic import atomic_path

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    for bundle, part in report["bundles"].items():
        ok = sorted((r for r in part["runs"] if r.get("returncode") == 0), key=lambda r: r["slide_area_mm2"])
        if not ok:
            continue
        ta = [r["tissue_area_mm2"] for r in ok]
        line, = ax_t.plot(ta, [r["wall_s"] for r in ok], "o-", label=bundle)
        fit = part["summary"]["fit_time_vs_tissue_area"]
        if fit:
            ax_t.plot([0, max(ta)], [fit["intercept_s"], fit["intercept_s"] + fit["slope_s_per_mm2"] * max(ta)], ":",
                      color=line.get_color(), linewidth=1)
        ax_m.plot([r["slide_area_mm2"] for r in ok], [r["peak_rss_mib"] for r in ok], "o-", label=bundle)
    baseline = report.get("baseline", {}).get("peak_rss_mib")
    if baseline:
        ax_m.axhline(baseline, color="grey", linestyle="--", linewidth=1, label="imports only")
    ax_t.set(xlabel="tissue area, mm$^2$", ylabel="wall time of the bundle run, s",
             title="time against tissue area (dotted: least-squares line)")
    ax_m.set(xlabel="slide area, mm$^2$", ylabel="peak RSS of the largest process, MiB", title="peak memory",
             ylim=(0, None))
    for ax in (ax_t, ax_m):
        ax.grid(alpha=0.3)
        ax.legend()
    machine = report["machine"]
    loads = [r[k][0] for part in report["bundles"].values() for r in part["runs"]
             for k in ("load_average_at_start", "load_average_at_end") if k in r]
    fig.suptitle(f"pathbundles inference scaling: phantoms at {report['settings']['level0_mpp']} um/px, "
                 f"{machine.get('cpu')}, {machine.get('cores')} cores, torch threads {report['settings']['threads']}, "
                 f"1-min load {min(loads):.1f}-{max(loads):.1f} over the runs", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_json(report: dict[str, Any], path: Path) -> None:
    """The report, atomically."""
    from pathbundles.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundles", default=",".join(BUNDLES), help="comma separated (default all four)")
    parser.add_argument("--sizes", default=None, help="slide sides in level-0 px, comma separated (default "
                                                      "4096,8192,16384; --quick 2048,4096)")
    parser.add_argument("--mpp", type=float, default=0.243, help="level-0 um/px of the phantoms (default 0.243)")
    parser.add_argument("--threads", type=int, default=2, help="OMP threads of every run (default 2)")
    parser.add_argument("--timeout", type=float, default=5400.0, help="seconds per bundle run (a hang guard)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2048 and 4096 px")
    parser.add_argument("--fresh", action="store_true", help="drop the results of bundles and sizes not run")
    parser.add_argument("--compile-network", action="store_true",
                        help="run the bundles with --compile_network true (torch.compile; not spatial_lstm, "
                             "which has no such key; default --out results/scaling_compiled.json)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default results/scaling.json)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG (default: --out with .png)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where phantoms are generated (default a "
                                                                     "temporary folder)")
    parser.add_argument("--replot", action="store_true", help="run nothing: derive the summaries and the PNG again "
                                                              "from --out")
    args = parser.parse_args(argv)
    args.out = args.out or REPO / "benchmarks" / "results" / (
        "scaling_compiled.json" if args.compile_network else "scaling.json")
    overrides = {"compile_network": True} if args.compile_network else {}
    plot_path = args.plot or args.out.with_suffix(".png")
    if args.replot:
        report = json.loads(args.out.read_text())
        for part in report["bundles"].values():
            part["summary"] = summarise(part["runs"], report["baseline"].get("peak_rss_mib"))
        write_json(report, args.out)
        plot(report, plot_path)
        print(f"wrote {args.out} and {plot_path}")
        return
    bundles = [b for b in args.bundles.split(",") if b]
    if set(bundles) - set(BUNDLES):
        parser.error(f"unknown bundles {sorted(set(bundles) - set(BUNDLES))}: expected {', '.join(BUNDLES)}")
    if args.compile_network and "spatial_lstm" in bundles:
        # Its inferer calls the network's cnn, lstm and classifier, never the network: no compile_network key.
        print("--compile-network: spatial_lstm left out (it has no compile_network key)", flush=True)
        bundles.remove("spatial_lstm")
    sizes = [int(s) for s in (args.sizes or ("2048,4096" if args.quick else "4096,8192,16384")).split(",") if s]
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the bundle processes' torch threads

    from bench_dmmn import measure_child

    old = json.loads(args.out.read_text()) if args.out.exists() and not args.fresh else {}
    report: dict[str, Any] = {
        "benchmark": "bench_scaling", "quick": args.quick,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv[1:] if argv is None else argv, "load_average_at_start": list(os.getloadavg()),
        "machine": machine_info(("torch", "monai", "numpy", "tifffile", "pillow")),
        "settings": {"level0_mpp": args.mpp, "threads": args.threads, "sizes_this_run": sizes,
                     "hpf_px": HPF_PX, "hpf_mpp": HPF_MPP, "overrides": overrides},
        "bundles": old.get("bundles", {}) if old.get("settings", {}).get("level0_mpp") == args.mpp else {}}

    def write() -> None:
        report["updated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        write_json(report, args.out)

    print("baseline (imports only) ...", flush=True)
    report["baseline"] = {"imports": BASELINE_IMPORTS,
                          **measure_child([sys.executable, "-c", BASELINE_IMPORTS], args.timeout)}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cache = args.cache_dir or tmp
        cache.mkdir(parents=True, exist_ok=True)
        for bundle in bundles:
            config = REPO / "bundles" / bundle / "configs" / "inference.json"
            shipped = shipped_weights(bundle)
            weights = tmp / f"{bundle}_{shipped.name}"
            label = snapshot_file(shipped, weights)
            part = report["bundles"].setdefault(bundle, {"runs": []})
            part.update({"config": str(config.relative_to(REPO)), "weights": label})
            part["runs"] = [r for r in part["runs"] if r.get("size_px") not in sizes]
            part["summary"] = summarise(part["runs"], report["baseline"].get("peak_rss_mib"))
            for size in sizes:
                kind = "multiclass" if bundle == "dmmn" else "metastasis"
                slide, generator, made_s = phantom(cache, kind, size, args.mpp)
                info, mask = tissue(slide)
                run: dict[str, Any] = {"size_px": size, "slide": {"file": slide.name, "generator": generator,
                                                                  "generated_s": made_s}, **info}
                source: Path = slide
                if bundle == "segmitos":
                    source, run["hpfs"] = hpf_boxes(slide, info, mask, tmp)
                    run["work_unit"] = f"{run['hpfs']} HPFs of {HPF_PX} px at {HPF_MPP} um/px on tissue"
                    if not run["hpfs"]:
                        print(f"{bundle}: {size} px holds no whole HPF on tissue, skipped", flush=True)
                        continue
                elif bundle == "dmmn":
                    run["work_unit"] = "every 256 px tile of the slide at 0.5 um/px (use_tissue false)"
                else:
                    run["work_unit"] = "the tissue of the slide (the bundle's tissue ROIs)"
                run_kwargs = {"data_source": str(source), "output_dir": str(tmp / f"out_{bundle}_{size}"),
                              "ckpt_path": str(weights), **overrides}
                run["command"] = ("python -m monai.bundle run --config_file " + str(config.relative_to(REPO))
                                  + "".join(f" --{k} {v}" for k, v in run_kwargs.items()))
                cfg = {"config": str(config), "threads": args.threads, "capture": "none",
                       "timed_modules": TIMED_MODULES.get(bundle, [""]),
                       "result_out": str(tmp / f"result_{bundle}_{size}.json"), "run_kwargs": run_kwargs}
                cfg_path = tmp / f"cfg_{bundle}_{size}.json"
                cfg_path.write_text(json.dumps(cfg))
                command = [sys.executable, str(REPO / "benchmarks" / "bench_peers.py"), "--worker", "bundle-ours",
                           str(cfg_path)]
                print(f"{bundle}: {size} px, tissue {100 * info['tissue_fraction']:.1f} % "
                      f"({info['tissue_area_mm2']:.1f} mm^2) ...", flush=True)
                run["load_average_at_start"] = list(os.getloadavg())
                run.update(measure_child(command, args.timeout))
                run["load_average_at_end"] = list(os.getloadavg())
                if run.get("returncode") == 0:
                    run["in_process"] = network_share(json.loads(Path(cfg["result_out"]).read_text()))
                share = run.get("in_process", {})
                print(f"  {run.get('wall_s', 0):.1f} s, peak RSS {run.get('peak_rss_mib', 0):.0f} MiB, "
                      f"returncode {run.get('returncode')}; network {share.get('network_forward_s') or 0:.1f} s, "
                      f"steady state {share.get('steady_state_over_network') or 0:.3f}x it", flush=True)
                part["runs"].append(run)
                part["runs"].sort(key=lambda r: r["size_px"])
                part["summary"] = summarise(part["runs"], report["baseline"].get("peak_rss_mib"))
                write()
    report["load_average_at_end"] = list(os.getloadavg())
    write()
    plot(report, plot_path)
    for bundle, part in report["bundles"].items():
        fit = part["summary"]["fit_time_vs_tissue_area"]
        print(f"\n{bundle}: " + (f"{fit['intercept_s']:.1f} s + {fit['slope_s_per_mm2']:.2f} s/mm^2 tissue, largest "
                                 f"residual {100 * fit['max_relative_residual']:.1f} %" if fit else "one point"))
        for r in part["runs"]:
            share = r.get("in_process") or {}
            print(f"  {r['size_px']:6d} px  tissue {r['tissue_area_mm2']:7.2f} mm^2  {r.get('wall_s', 0):8.1f} s  "
                  f"{r.get('peak_rss_mib', 0):6.0f} MiB  rc {r.get('returncode')}  network "
                  f"{share.get('network_forward_s') or 0:7.1f} s  x{share.get('end_to_end_over_network') or 0:.3f} "
                  f"end to end, x{share.get('steady_state_over_network') or 0:.3f} steady")
    print(f"wrote {args.out} and {plot_path}")


if __name__ == "__main__":
    main()
