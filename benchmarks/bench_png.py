"""PNG encoding of overlays: pathbundles.png.write_png against Pillow's encoder, seconds and bytes per image.

The images are overlays as the bundles write them (``write_circle_overlay_png``: title strip, legend, rings): one of
a phantom HPF of 2084 x 2084 px (segmitos' HPF size, ``make_phantom(kind="mitosis", seed=10)``) and one of
CMU-1-Small-Region.svs level 0 (2220 x 2967 px of real H&E, when ../shared/data is present). Each is encoded by
Pillow at zlib level 1 (what overlays used before), by Pillow at its default level 6, and by ``write_png``, in
rotating order, ``--repeats`` times; the median is reported, and every encoding is decoded again by Pillow and
compared with the image.

Run: PYTHONPATH=common python benchmarks/bench_png.py [--repeats 7] [--out benchmarks/results/png.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from pathbundles.atomic import atomic_path
from pathbundles.hpf import write_circle_overlay_png
from pathbundles.png import write_png

from machine import machine_info  # benchmarks/machine.py (the script's own folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _overlay(image: np.ndarray, detections: np.ndarray, workdir: Path) -> np.ndarray:
    """The pixels of the overlay the bundles write for ``image``."""
    path = workdir / "overlay.png"
    write_circle_overlay_png(path, image, detections, truth=None, title=["name", "model 0.0.0", "detections"])
    with Image.open(path) as overlay:
        return np.asarray(overlay.convert("RGB"))


def _images(workdir: Path) -> dict[str, np.ndarray]:
    from pathbundles.phantom import make_phantom
    from pathbundles.sampling import read_datalist

    dataset = make_phantom(workdir / "hpf", kind="mitosis", n=1, seed=10, size_px=2084, mpp=0.25)
    hpf = np.asarray(Image.open(read_datalist(dataset)[0]["image"]).convert("RGB"))
    rings = np.array([[500.0, 600.0, 0.9], [1500.0, 1200.0, 0.8], [1000.0, 1800.0, 0.7]])
    images = {"phantom HPF overlay (2084 px HPF)": _overlay(hpf, rings, workdir)}
    svs = SHARED_DATA / "CMU-1-Small-Region.svs"
    if svs.exists():
        import tifffile

        images["CMU-1-Small-Region.svs level 0 overlay"] = _overlay(tifffile.imread(svs, key=0), rings, workdir)
    return images


def _encoders() -> dict[str, Callable[[np.ndarray], bytes]]:
    def pillow(level: int) -> Callable[[np.ndarray], bytes]:
        def encode(image: np.ndarray) -> bytes:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG", compress_level=level)
            return buffer.getvalue()
        return encode

    def ours(image: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        write_png(buffer, image)
        return buffer.getvalue()

    return {"Pillow, zlib level 1 (before)": pillow(1), "Pillow, level 6 (its default)": pillow(6),
            "pathbundles.png.write_png": ours}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed encodings per image and encoder (median)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "png.json")
    args = parser.parse_args(argv)
    report = {"benchmark": "bench_png.py", "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "load_average_at_start": list(os.getloadavg()), "repeats": args.repeats,
              "machine": machine_info(("numpy", "pillow")), "images": []}
    encoders = _encoders()
    with tempfile.TemporaryDirectory() as tmp:
        images = _images(Path(tmp))
    for name, image in images.items():
        times: dict[str, list[float]] = {key: [] for key in encoders}
        sizes: dict[str, int] = {}
        for encoder in encoders.values():  # warm-up, and the check that every encoding decodes to the image
            data = encoder(image)
            with Image.open(io.BytesIO(data)) as decoded:
                assert np.array_equal(np.asarray(decoded.convert("RGB")), image), name
        for round_ in range(args.repeats):
            keys = list(encoders)
            for key in keys[round_ % len(keys):] + keys[:round_ % len(keys)]:  # rotating order
                start = time.perf_counter()
                data = encoders[key](image)
                times[key].append(time.perf_counter() - start)
                sizes[key] = len(data)
        before = statistics.median(times["Pillow, zlib level 1 (before)"])
        rows = [{"encoder": key, "median_s": statistics.median(t), "times_s": t, "bytes": sizes[key],
                 "speedup_vs_before": before / statistics.median(t),
                 "size_vs_before": sizes[key] / sizes["Pillow, zlib level 1 (before)"]} for key, t in times.items()]
        report["images"].append({"image": name, "shape": list(image.shape), "raw_bytes": int(image.nbytes),
                                 "encoders": rows, "decoded_equal": True})
        for row in rows:
            print(f"{name:42s} {row['encoder']:32s} {row['median_s']:.3f} s  {row['bytes'] / 2**20:6.2f} MiB  "
                  f"{row['speedup_vs_before']:.2f}x faster, {row['size_vs_before']:.3f}x the bytes")
    report["load_average_at_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
