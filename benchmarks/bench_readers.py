"""Patches per second of the slide readers: pathbundles backends versus MONAI's own WSIReader backends.

Reads random 244 x 244 level-0 patches (the same seeded locations for every reader, after a warm-up on other
locations; best of several rounds taken in rotating order) from CMU-1-Small-Region.svs (when ../shared/data is
present) and from a generated 16384 x 16384 JPEG pyramidal TIFF (tile 256, 4x levels), where decoding a whole level
per patch (MONAI's tifffile backend) shows its cost. MONAI's tifffile backend reads only a few patches, in one
round, so the run stays within minutes.

Run: PYTHONPATH=common python benchmarks/bench_readers.py [--patches 400] [--out benchmarks/results/readers.json]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pathbundles import wsi
from pathbundles.atomic import atomic_path

from machine import machine_info  # benchmarks/machine.py (the script's own folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
PATCH_PX = 244
SEED = 20240601
WARMUP = 10
MONAI_TIFFFILE_PATCHES = {"small": 20, "large": 3}  # it decodes the whole level on every call


def _make_large_tiff(path: Path, size_px: int = 16384, tile_px: int = 256) -> None:
    """A JPEG pyramidal TIFF of H&E-like tiles: crops of he_carcinoma_1000px.png when present, else smooth noise."""
    import tifffile

    rng = np.random.default_rng(SEED)
    source_png = SHARED_DATA / "he_carcinoma_1000px.png"
    if source_png.exists():
        from PIL import Image

        texture = np.asarray(Image.open(source_png).convert("RGB"))
    else:
        from scipy import ndimage

        texture = (ndimage.zoom(rng.random((63, 63, 3)), (16, 16, 1), order=1) * 200 + 30).astype(np.uint8)

    def tiles(level_px: int):
        for _ in range((-(-level_px // tile_px)) ** 2):
            y, x = rng.integers(0, texture.shape[0] - tile_px), rng.integers(0, texture.shape[1] - tile_px)
            yield texture[y:y + tile_px, x:x + tile_px]

    mpp = 0.25
    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        level_px, subfiletype = size_px, 0
        while level_px >= tile_px:
            level_mpp = mpp * size_px / level_px
            writer.write(tiles(level_px), shape=(level_px, level_px, 3), dtype=np.uint8, tile=(tile_px, tile_px),
                         compression="jpeg", compressionargs={"level": 90}, photometric="rgb",
                         subfiletype=subfiletype, resolution=(1e4 / level_mpp, 1e4 / level_mpp),
                         resolutionunit="CENTIMETER")
            level_px, subfiletype = level_px // 4, 1


def _readers() -> dict[str, tuple[Callable[[Path], object], Callable[[object, int, int], np.ndarray]]]:
    """name -> (open(path) -> handle, read(handle, x, y) -> patch) for every reader that imports here."""
    readers = {}
    for backend in wsi.available_backends():
        readers[f"pathbundles-{backend}"] = (
            lambda path, b=backend: wsi.open_slide(path, backend=b),
            lambda slide, x, y: slide.read_level_region(0, (x, y), (PATCH_PX, PATCH_PX)))
    from monai.data import WSIReader

    for backend in ("cucim", "openslide", "tifffile"):
        try:
            importlib.import_module(backend)
        except Exception:  # optional backend not installed: nothing to compare
            continue
        reader = WSIReader(backend=backend, channel_dim=-1)
        readers[f"monai-{backend}"] = (
            lambda path, r=reader: r.read(str(path)),
            lambda handle, x, y, r=reader: r.get_data(handle, location=(y, x), size=(PATCH_PX, PATCH_PX),
                                                       level=0)[0])
    return readers


def _time_reader(path: Path, open_fn: Callable, read_fn: Callable, warmup: np.ndarray,
                 timed: np.ndarray) -> tuple[float, np.ndarray]:
    """Open afresh, warm up on `warmup` locations, return (patches/s over `timed`, the first timed patch)."""
    handle = open_fn(path)
    for x, y in warmup:
        read_fn(handle, int(x), int(y))
    start = time.perf_counter()
    first = None
    for x, y in timed:
        patch = read_fn(handle, int(x), int(y))
        first = patch if first is None else first
    return len(timed) / (time.perf_counter() - start), first


def _bench_slide(path: Path, kind: str, patches: int, rounds: int) -> dict:
    with wsi.open_slide(path, backend="tifffile") as slide:
        width, height = slide.dimensions
    rng = np.random.default_rng(SEED)
    locations = np.stack([rng.integers(0, width - PATCH_PX, patches + WARMUP),
                          rng.integers(0, height - PATCH_PX, patches + WARMUP)], axis=1)
    warmup, timed = locations[:WARMUP], locations[WARMUP:]
    readers = _readers()
    rates: dict[str, list[float]] = {name: [] for name in readers}
    firsts: dict[str, np.ndarray] = {}
    # Readers take turns in a rotating order each round, so load from other processes spreads over all of them.
    for round_index in range(rounds):
        names = list(readers)
        names = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in names:
            if name == "monai-tifffile" and rates[name]:
                continue  # one round is minutes of whole-level decoding already
            slow = name == "monai-tifffile"
            count = min(patches, MONAI_TIFFFILE_PATCHES[kind]) if slow else patches
            rate, firsts[name] = _time_reader(path, *readers[name], warmup[:1 if slow else WARMUP], timed[:count])
            rates[name].append(rate)
            print(f"{path.name} round {round_index} {name}: {rate:.1f} patches/s ({count} patches)", flush=True)
    reference = firsts.get("pathbundles-openslide", next(iter(firsts.values())))
    results = {}
    for name, values in rates.items():
        results[name] = {
            "patches": min(patches, MONAI_TIFFFILE_PATCHES[kind]) if name == "monai-tifffile" else patches,
            "rounds": len(values), "patches_per_s_best": float(f"{max(values):.4g}"),
            "patches_per_s_median": float(f"{np.median(values):.4g}"),
            "first_patch_mean_abs_diff_vs_openslide": round(float(np.abs(firsts[name] - reference.astype(int)).mean()),
                                                            3)}
    base = results.get("pathbundles-openslide", {}).get("patches_per_s_best")
    for entry in results.values():
        entry["ratio_vs_openslide"] = float(f"{entry['patches_per_s_best'] / base:.4g}") if base else None
    return {"path": path.name, "width": width, "height": height, "readers": results}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=400, help="timed patches per reader (default 400)")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds per reader; the best is reported")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "readers.json")
    args = parser.parse_args(argv)

    report = {"patch_px": PATCH_PX, "level": 0, "seed": SEED, "warmup_patches": WARMUP, "rounds": args.rounds,
              "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
              "machine": machine_info(("numpy", "tifffile", "imagecodecs", "openslide-python", "openslide-bin", "monai",
                                          "pillow", "cucim")), "slides": []}
    if (SHARED_DATA / "CMU-1-Small-Region.svs").exists():
        report["slides"].append(_bench_slide(SHARED_DATA / "CMU-1-Small-Region.svs", "small", args.patches,
                                                args.rounds))
    with tempfile.TemporaryDirectory() as folder:
        large = Path(folder) / "generated_16384_jpeg_pyramid.tif"
        start = time.perf_counter()
        _make_large_tiff(large)
        print(f"generated {large.name} in {time.perf_counter() - start:.1f} s", flush=True)
        entry = _bench_slide(large, "large", args.patches, args.rounds)
        entry["generated"] = "16384 x 16384 JPEG (q 90) tiles 256, levels 4x, 0.25 um/px, H&E crops"
        report["slides"].append(entry)
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
