"""bfloat16 autocast against float32, end to end, for every bundle: the held-out evaluation (``inference.json`` +
``evaluate.json`` with the shipped weights) run twice in fresh processes, ``--autocast false`` and ``--autocast
true`` (``pathbundles.inferers.AutocastInferer`` around the bundle's inferer), one bundle after the other.

Per bundle it records the wall time and peak RSS of both runs (bench_dmmn.py's ``measure_child``: the whole process,
start-up included), the paper's metrics of both (``metrics.json``: FROC and slide AUC, F1, IoU / mean IoU) and how
far the written outputs moved:

- scannet, spatial_lstm: the probability maps (``maps/*.tif`` level 0, uint8 = probability x 255): max and mean
  |difference| in probability, and the slide scores (``slide_scores.csv``);
- segmitos: the probability maps (``maps/*.png``) likewise, and the detections (``detections/*.csv``): how many,
  and how many pair one to one within 5 px;
- dmmn: the label maps (``labels/*.tif`` level 0): the fraction of pixels with the same label.

Native bfloat16 needs AVX512-BF16 or AMX (``machine.cpu_bf16_flags``, recorded); without them bfloat16 is converted
in software and can be slower than float32, which is why every bundle's default stays ``autocast false``.

    ulimit -s 32768; PYTHONPATH=common .venv/bin/python benchmarks/bench_autocast.py [--bundles scannet,dmmn]
        [--threads 2] [--out benchmarks/results/autocast.json]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dmmn import measure_child  # noqa: E402  (the script's own folder)
from machine import cpu_bf16_flags, machine_info, snapshot_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ("scannet", "spatial_lstm", "segmitos", "dmmn")
PRECISIONS = {"float32": "false", "bfloat16": "true"}


def bundle_command(bundle: str, output_dir: Path, weights: Path, autocast: str) -> list[str]:
    configs = [str(REPO / "bundles" / bundle / "configs" / name) for name in ("inference.json", "evaluate.json")]
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(configs),
            "--bundle_root", str(REPO / "bundles" / bundle), "--output_dir", str(output_dir),
            "--ckpt_path", str(weights), "--autocast", autocast]


def scalar_metrics(output_dir: Path) -> dict[str, float]:
    """The scalar metrics of a run's ``metrics.json`` (its ``metrics`` object, or the file's top level)."""
    data = json.loads((output_dir / "metrics.json").read_text())
    data = data.get("metrics", data)
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _level0(path: Path) -> np.ndarray:
    if path.suffix == ".png":
        from PIL import Image

        return np.asarray(Image.open(path))
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].levels[0].asarray()
    return page[..., 0] if page.ndim == 3 else page


def map_difference(a_dir: Path, b_dir: Path, pattern: str) -> dict[str, Any]:
    """Max and mean |difference| in probability (uint8 maps / 255) over the maps both runs wrote."""
    worst, total, pixels, names = 0.0, 0.0, 0, []
    for a in sorted(a_dir.glob(pattern)):
        b = b_dir / a.relative_to(a_dir)
        pa, pb = _level0(a).astype(np.int16), _level0(b).astype(np.int16)
        if pa.shape != pb.shape:
            raise ValueError(f"{a.name}: maps of different shapes {pa.shape} and {pb.shape}")
        d = np.abs(pa - pb)
        worst, total, pixels = max(worst, float(d.max()) / 255), total + float(d.sum()) / 255, pixels + d.size
        names.append(a.name)
    return {"maps": len(names), "max_abs_probability_difference": worst,
            "mean_abs_probability_difference": total / max(pixels, 1)}


def label_agreement(a_dir: Path, b_dir: Path) -> dict[str, Any]:
    same = pixels = 0
    for a in sorted((a_dir / "labels").glob("*.tif")):
        la, lb = _level0(a), _level0(b_dir / "labels" / a.name)
        same, pixels = same + int((la == lb).sum()), pixels + la.size
    return {"pixels": pixels, "same_label_fraction": same / max(pixels, 1)}


def slide_scores(output_dir: Path) -> dict[str, float]:
    """{name: score} of a run's ``slide_scores.csv`` (scannet, spatial_lstm)."""
    with open(output_dir / "slide_scores.csv", newline="") as f:
        return {row["name"]: float(row["score"]) for row in csv.DictReader(f)}


def detection_agreement(a_dir: Path, b_dir: Path, radius_px: float = 5.0) -> dict[str, Any]:
    """segmitos: the detections of both runs, and how many pair one to one within ``radius_px`` (the project's
    ``match_points``, as the F1 of ``metrics.json`` pairs detections with mitoses)."""
    from pathbundles.annotations import read_points_csv
    from pathbundles.metrics.mitosis import match_points

    n_a = n_b = matched = 0
    for a in sorted((a_dir / "detections").glob("*.csv")):
        pa, pb = read_points_csv(a, "xy")[0], read_points_csv(b_dir / "detections" / a.name, "xy")[0]
        n_a, n_b, matched = n_a + len(pa), n_b + len(pb), matched + len(match_points(pa, pb, radius_px))
    return {"float32": n_a, "bfloat16": n_b, "matched": matched, "radius_px": radius_px}


def compare(bundle: str, dirs: dict[str, Path]) -> dict[str, Any]:
    a, b = dirs["float32"], dirs["bfloat16"]
    if bundle in ("scannet", "spatial_lstm"):
        sa, sb = slide_scores(a), slide_scores(b)
        return {"maps": map_difference(a, b, "maps/*.tif"),
                "max_abs_slide_score_difference": max(abs(sa[k] - sb[k]) for k in sa)}
    if bundle == "segmitos":
        return {"maps": map_difference(a, b, "maps/*.png"), "detections": detection_agreement(a, b)}
    return {"labels": label_agreement(a, b)}


def prepare_data(bundle: str) -> int:
    """Generate the held-out phantoms of ``evaluate.json`` (on first use), so neither timed run includes it."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / bundle / "configs" / n) for n in ("inference.json", "evaluate.json")])
    parser.update({"bundle_root": str(REPO / "bundles" / bundle)})
    return len(parser.get_parsed_content("datalist"))


def run_bundle(bundle: str, work: Path, timeout_s: float) -> dict[str, Any]:
    entry_items = prepare_data(bundle)
    weights = work / f"{bundle}_model.pt"
    label = snapshot_file(REPO / "bundles" / bundle / "models" / "model.pt", weights)
    entry: dict[str, Any] = {"weights": label, "items": entry_items, "runs": {}}
    dirs = {}
    for precision, value in PRECISIONS.items():
        dirs[precision] = work / bundle / precision
        print(f"{bundle} {precision} ...", flush=True)
        run = measure_child(bundle_command(bundle, dirs[precision], weights, value), timeout_s)
        if run.get("returncode") != 0:
            entry["runs"][precision] = run
            entry["error"] = f"{precision} run failed: {run.get('returncode', run.get('error'))}"
            return entry
        run["metrics"] = scalar_metrics(dirs[precision])
        entry["runs"][precision] = {k: v for k, v in run.items() if k != "command"}
        print(f"  {run['wall_s']:.1f} s, {run['peak_rss_mib']:.0f} MiB, {run['metrics']}", flush=True)
    entry["command"] = " ".join(bundle_command(bundle, Path("OUT"), Path("WEIGHTS"), "true|false")[1:])
    entry["speedup"] = entry["runs"]["float32"]["wall_s"] / entry["runs"]["bfloat16"]["wall_s"]
    entry["agreement"] = compare(bundle, dirs)
    return entry


def write_json(report: dict[str, Any], path: Path) -> None:
    """The report, atomically (after every bundle, so a later failure keeps the earlier ones)."""
    from pathbundles.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundles", default=",".join(BUNDLES))
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every run (OMP_NUM_THREADS)")
    parser.add_argument("--timeout", type=float, default=5400.0, help="seconds per run (a hang guard)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "autocast.json")
    args = parser.parse_args(argv)
    bundles = [b for b in args.bundles.split(",") if b]
    unknown = sorted(set(bundles) - set(BUNDLES))
    if unknown:
        parser.error(f"unknown bundles {unknown}; expected some of {list(BUNDLES)}")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    report: dict[str, Any] = {
        "machine": machine_info(["torch", "monai"]), "cpu_bf16_flags": cpu_bf16_flags(), "threads": args.threads,
        "note": "each bundle's entry has its own start time and load (runs of single bundles are merged)",
        "bundles": {}}
    if args.out.exists():  # keep the bundles this run does not measure
        report["bundles"] = {k: v for k, v in json.loads(args.out.read_text()).get("bundles", {}).items()
                             if k not in bundles}
    with tempfile.TemporaryDirectory(prefix="bench_autocast_") as tmp:
        for bundle in bundles:
            started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            load = list(os.getloadavg())
            entry = {"started": started, "load_average_at_start": load,
                     **run_bundle(bundle, Path(tmp), args.timeout), "load_average_after": list(os.getloadavg())}
            report["updated"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            report["bundles"][bundle] = entry
            write_json(report, args.out)
    print(json.dumps({b: {k: report["bundles"][b].get(k) for k in ("speedup", "agreement", "error")}
                      for b in bundles}, indent=1))


if __name__ == "__main__":
    main()
