"""Patches per second of the slide readers: pathbundles backends versus MONAI's own WSIReader backends, and the
cost of exact-resolution reads.

Part 1 reads random 244 x 244 level-0 patches (the same seeded locations for every reader, after a warm-up on other
locations; best of several rounds taken in rotating order) from CMU-1-Small-Region.svs (when ../shared/data is
present) and from a generated 16384 x 16384 JPEG pyramidal TIFF (tile 256, 4x levels), where decoding a whole level
per patch (MONAI's tifffile backend) shows its cost. MONAI's tifffile backend reads only a few patches, in one
round, so the run stays within minutes.

Part 2 ("exact_reads") times ``Slide.read_region`` on a generated 8192 x 8192 slide at 0.243 um/px (Radboud's
Camelyon16 scanner; 4x levels rounded down as in SVS): 244 px patches as stored (0.243, level 0), at exactly 0.25
(area-resampled from level 0), at exactly 1.0 (resampled from the 0.972 um/px level 1) and snapped to that level
(``read_region_near``, what reads did before they were exact), per backend, in rotating order.

Run: PYTHONPATH=common python benchmarks/bench_readers.py [--patches 400] [--only-exact] [--out ...readers.json]
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


EXACT_MPP_LEVEL0 = 0.243


def _make_exact_read_slide(path: Path, size_px: int = 8192) -> None:
    """8192 x 8192 JPEG pyramid at 0.243 um/px (levels 4x, floor-rounded) of H&E crops, through the project's
    writer (a pathbundles.writers band source)."""
    from pathbundles.writers import write_pyramid_tiff

    rng = np.random.default_rng(SEED)
    source_png = SHARED_DATA / "he_carcinoma_1000px.png"
    if source_png.exists():
        from PIL import Image

        texture = np.asarray(Image.open(source_png).convert("RGB"))
    else:
        texture = (rng.random((1000, 1000, 3)) * 200 + 30).astype(np.uint8)

    class Bands:
        shape, dtype = (size_px, size_px, 3), np.dtype(np.uint8)

        def __getitem__(self, rows: slice) -> np.ndarray:
            y0, y1, _ = rows.indices(size_px)
            ys = (np.arange(y0, y1) % texture.shape[0])[:, None]
            return texture[ys, (np.arange(size_px) % texture.shape[1])[None, :]]

    write_pyramid_tiff(path, Bands(), mpp=EXACT_MPP_LEVEL0, compression="jpeg", downsample_step=4,
                       level_rounding="floor")


def _bench_exact_reads(path: Path, patches: int, rounds: int) -> dict:
    """Patches/s of 244 px reads as stored, at exact mpps and snapped, per backend (best and median of rounds)."""
    cases = {"stored_0.243": ("exact", EXACT_MPP_LEVEL0), "exact_0.25": ("exact", 0.25),
             "exact_1.0": ("exact", 1.0), "snapped_1.0": ("near", 1.0)}
    rng = np.random.default_rng(SEED)
    span0 = PATCH_PX * 1.0 / EXACT_MPP_LEVEL0 + 2  # level-0 px of the largest patch
    with wsi.open_slide(path, backend="tifffile") as slide:
        width, height = slide.dimensions
    locations = np.stack([rng.uniform(0, width - span0, patches + WARMUP),
                          rng.uniform(0, height - span0, patches + WARMUP)], axis=1)
    results: dict[str, dict] = {}
    for backend in [b for b in wsi.available_backends() if b in ("openslide", "tifffile")]:
        rates: dict[str, list[float]] = {name: [] for name in cases}
        for round_index in range(rounds):
            names = list(cases)[round_index % len(cases):] + list(cases)[:round_index % len(cases)]
            for name in names:
                kind, mpp = cases[name]
                with wsi.open_slide(path, backend=backend) as slide:
                    def read(x: float, y: float) -> np.ndarray:
                        if kind == "near":
                            return slide.read_region_near((x, y), (PATCH_PX, PATCH_PX), mpp, tolerance=0.1)[0]
                        return slide.read_region((x, y), (PATCH_PX, PATCH_PX), mpp)

                    for x, y in locations[:WARMUP]:
                        read(x, y)
                    start = time.perf_counter()
                    for x, y in locations[WARMUP:]:
                        read(x, y)
                    rates[name].append(patches / (time.perf_counter() - start))
                print(f"{path.name} {backend} round {round_index} {name}: {rates[name][-1]:.1f} patches/s", flush=True)
        stored = max(rates["stored_0.243"])
        results[backend] = {name: {"patches_per_s_best": float(f"{max(v):.4g}"),
                                   "patches_per_s_median": float(f"{np.median(v):.4g}"),
                                   "ratio_vs_stored": float(f"{max(v) / stored:.3g}")} for name, v in rates.items()}
    return {"path": path.name, "width": width, "height": height, "level0_mpp": EXACT_MPP_LEVEL0, "patch_px": PATCH_PX,
            "patches": patches, "rounds": rounds, "backends": results}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=400, help="timed patches per reader (default 400)")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds per reader; the best is reported")
    parser.add_argument("--only-exact", action="store_true",
                        help="run part 2 only (exact-resolution reads), keeping part 1 of an existing --out")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "readers.json")
    args = parser.parse_args(argv)

    report = {"patch_px": PATCH_PX, "level": 0, "seed": SEED, "warmup_patches": WARMUP, "rounds": args.rounds,
              "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
              "machine": machine_info(("numpy", "tifffile", "imagecodecs", "openslide-python", "openslide-bin", "monai",
                                          "pillow", "cucim")), "slides": []}
    if args.only_exact and args.out.exists():
        report = {**json.loads(args.out.read_text()), "load_average_at_start_exact": report["load_average_at_start"],
                  "machine_exact": report["machine"]}
    with tempfile.TemporaryDirectory() as folder:
        exact = Path(folder) / "generated_8192_0.243um.tif"
        _make_exact_read_slide(exact)
        report["exact_reads"] = _bench_exact_reads(exact, args.patches, args.rounds)
    if args.only_exact:
        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
        return
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
