"""DMMN's shipped network through MONAI's own pipeline (issue #22); ``bench_peers.py --bundles dmmn`` runs it.

MONAI core has no multi-resolution engine: ``PatchWSIDataset``, ``WSISlidingWindowSplitter`` and ``PatchInferer``
each read one level. A MONAI user wires DMMN's three concentric views from its parts, as done here:

- one ``PatchWSIDataset`` per view (``patch_level`` 0, 1, 2 of the phantom's 0.5 / 1.0 / 2.0 um/px pyramid, 256 px
  each, ``pathbundles.wsi.TiledTiffWSIReader``: MONAI's ``WSIReader`` interface over tiled reads, since MONAI's
  tifffile backend decodes a whole level per patch), all at the centres of the bundle's 256 px target grid. The
  corners are given in level-0 pixels with ``center_location=False``: MONAI's ``center_location`` subtracts half
  the patch size in level-0 pixels whatever the level, so it would misplace the 1.0 and 2.0 um/px views;
- each view with the bundle's own per-view transforms, read from its ``preprocessing``, as MONAI's own
  (``CastToTyped`` float32, ``ScaleIntensityRanged`` 0..255 to -1..1; the bundle runs the same arithmetic in one
  buffer, ``CastScaleIntensityRanged``), ``ZipDataset`` of the three (its items are tuples of the views),
  ``DataLoader`` (the bundle's batch 2 and 2 workers), the three batches concatenated into 9 channels (the
  bundle's ``ConcatItemsd`` order: 20x, 10x, 5x);
- the bundle's prepared network (BatchNorm folded, channels_last), softmax, argmax into an in-memory uint8 label
  canvas at 0.5 um/px (the tiles do not overlap, so no merger is needed). It writes no file; the bundle writes its
  label pyramid TIFF, overlay, polygons and report.

Outside the slide the reader gives white (255) where the bundle pads 0 (its ``pad_value``): border tiles differ.
The softmax of every tile is appended to ``prob_out`` in the bundle's dataset order (row by row) for the comparison;
its seconds are counted apart (``capture_s``) and left out of ``total_s``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np


def view_corners(rows: int, cols: int, patch_px: int, downsamples: list[float]) -> list[np.ndarray]:
    """Per view, the level-0 (row, col) corner of each tile's ``patch_px`` read, row-major over the target grid:
    the view of downsample ``d`` is centred on the target tile's centre and spans ``patch_px * d`` level-0 px."""
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    centre = np.stack([rr.ravel(), cc.ravel()], 1) * patch_px + patch_px // 2
    return [centre - round(patch_px * d / 2) for d in downsamples]


#: The bundle's one-buffer step and the MONAI transforms it stands for (the same values: tests/test_transforms.py).
_BUNDLE_CAST_SCALE = "pathbundles.transforms.CastScaleIntensityRanged"


def view_transforms(parser: Any) -> list[Any]:
    """The bundle's per-view transforms of its ``preprocessing`` (all before ``ConcatItemsd``: the cast and the
    intensity scaling), instantiated for one view under the key "image", as MONAI's own transforms: the bundle's
    ``CastScaleIntensityRanged`` becomes MONAI's ``CastToTyped`` + ``ScaleIntensityRanged`` with its arguments (the
    same values; MONAI's pipeline runs MONAI's code). The concatenation they feed is checked to take the views in
    ``mpps`` order, the order of the zipped datasets."""
    from monai.bundle import ConfigParser

    steps = list(parser["preprocessing"]["transforms"])
    concat = next(i for i, step in enumerate(steps) if step["_target_"] == "ConcatItemsd")
    if list(steps[concat]["keys"]) != ["x20", "x10", "x5"] or len(parser["mpps"]) != 3:
        raise ValueError(f"the bundle's ConcatItemsd takes {steps[concat]['keys']}: expected the 20x, 10x and 5x "
                         f"views in mpps order")
    views: list[dict[str, Any]] = []
    for step in steps[:concat]:
        if step["_target_"] == _BUNDLE_CAST_SCALE:
            ranges = {k: step[k] for k in ("a_min", "a_max", "b_min", "b_max")}
            views += [{"_target_": "CastToTyped", "keys": "image", "dtype": step.get("dtype", "$torch.float32")},
                      {"_target_": "ScaleIntensityRanged", "keys": "image", **ranges}]
        else:
            views.append({**step, "keys": "image"})
    return ConfigParser({"views": views}).get_parsed_content("views")


def monai_worker(cfg: dict) -> dict[str, Any]:
    """MONAI's pipeline in this fresh process; writes timings, peak memory and label counts to ``result_out``."""
    import torch

    torch.set_num_threads(cfg["threads"])
    start = time.perf_counter()
    from monai.bundle import ConfigParser
    from monai.data import DataLoader, PatchWSIDataset, ZipDataset
    from monai.transforms import Compose

    from bench_peers import bundle_networks
    from machine import vm_status_kib
    from pathbundles import wsi

    import_s = time.perf_counter() - start
    parser = ConfigParser()
    parser.read_config(cfg["config"])
    parser["bundle_root"] = str(Path(cfg["config"]).parents[1])
    mpps, patch_px = list(parser["mpps"]), int(parser["patch_px"])
    intensity = Compose(view_transforms(parser))
    net = bundle_networks(Path(cfg["config"]), cfg["weights"])["prepared"]

    hwm_before = vm_status_kib("VmHWM")
    start = time.perf_counter()
    reader = wsi.TiledTiffWSIReader()
    slide = reader.read(cfg["slide"])
    height0, width0 = reader.get_size(slide, 0)
    levels = []
    for mpp in mpps:  # the pyramid level of each view, checked (a view read from another level would be resampled)
        level = next((k for k in range(reader.get_level_count(slide))
                      if abs(reader.get_mpp(slide, k)[0] - mpp) <= 1e-6 * mpp), None)
        if level is None:
            raise ValueError(f"{cfg['slide']}: no pyramid level at {mpp} um/px for MONAI's PatchWSIDataset")
        levels.append(level)
    rows, cols = -(-height0 // patch_px), -(-width0 // patch_px)
    corners = view_corners(rows, cols, patch_px, [reader.get_downsample_ratio(slide, k) for k in levels])
    views = [PatchWSIDataset([{"image": cfg["slide"], "location": [int(y), int(x)]} for y, x in at],
                             patch_size=patch_px, patch_level=level, center_location=False, include_label=False,
                             transform=intensity, reader=wsi.TiledTiffWSIReader)
             for level, at in zip(levels, corners)]
    dataset = ZipDataset(views)
    loader = DataLoader(dataset, batch_size=cfg["batch"], num_workers=cfg["num_workers"], shuffle=False)
    labels = np.zeros((rows * patch_px, cols * patch_px), np.uint8)
    setup = time.perf_counter() - start
    seconds, calls, done, capture_s = 0.0, 0, 0, 0.0
    with torch.inference_mode(), open(cfg["prob_out"], "wb") as capture:
        for batch in loader:
            x = torch.cat([torch.as_tensor(view["image"]) for view in batch], 1)  # 20x, 10x, 5x: 9 channels
            t0 = time.perf_counter()
            logits = net(x)
            seconds += time.perf_counter() - t0
            calls += 1
            prob = torch.softmax(logits.float(), 1)
            tile_labels = (prob.argmax(1) + 1).to(torch.uint8).numpy()
            for i, lab in enumerate(tile_labels):
                r, c = divmod(done + i, cols)
                labels[r * patch_px:(r + 1) * patch_px, c * patch_px:(c + 1) * patch_px] = lab
            done += len(tile_labels)
            t0 = time.perf_counter()
            capture.write(np.ascontiguousarray(prob.numpy(), np.float32).tobytes())
            capture_s += time.perf_counter() - t0
    total = time.perf_counter() - start - capture_s
    counts = np.bincount(labels[:height0, :width0].ravel(), minlength=len(parser["class_names"]) + 1)
    result = {"mode": "monai", "import_s": import_s, "setup_s": setup, "total_s": total,
              "network_forward_s": seconds, "network_calls": calls, "tiles": done, "capture_s": capture_s,
              "data_s": total - setup - seconds, "vmhwm_before_pipeline_mib": hwm_before / 1024,
              "vmhwm_mib": vm_status_kib("VmHWM") / 1024, "num_workers": cfg["num_workers"], "batch": cfg["batch"],
              "threads": torch.get_num_threads(), "levels": levels, "grid": [rows, cols],
              "label_pixels_per_class": counts[1:].tolist(),
              "reader": "pathbundles.wsi.TiledTiffWSIReader (MONAI's WSIReader interface)"}
    Path(cfg["result_out"]).write_text(json.dumps(result))
    return result
