"""Concentric multi-magnification patches and the DMMN tile dataset (Ho et al., 004_01b453305fb6e6d6.txt, II-B/C).

A DMMN input is three 256 px patches centred on one level-0 point: 20x (0.5 um/px), 10x (1.0) and 5x (2.0), i.e.
the centre 256, the centre 512 and the whole of a 1024 px tile at 20x. :func:`read_concentric` reads them either
per magnification from the pyramid (``"levels"``: each view read at exactly its mpp by ``Slide.read_region``, a
pyramid level as stored only where one is at that mpp, else anti-aliased from the next finer level) or as the paper
and the authors' code do, one 1024 tile at 20x downsampled (``"tile"``; here area-averaged, where the authors' code
strides without anti-aliasing). Both give views of exactly 0.5, 1.0 and 2.0 um/px centred on the same level-0
point on any scanner (a 0.2265 um/px slide has a 0.453 um/px level, not a 20x one). Which is faster depends on the file
(the levels it has, its tile size and codec) and the reader, so :func:`choose_read_path` times both on a few tiles
of each slide and :class:`MultiMagnificationDataset` (``read_path="auto"``) keeps the faster one per slide.

:class:`MultiMagnificationDataset` lists target tiles (the 20x patch) on a grid of stride 256 at 20x anchored at
level-0 (0, 0). Training keeps the tiles whose target has more than 1 % annotated pixels, classifies each by the
highest-ordered class present and multiplies class c by elastic deformation at rate r_c (Sec. II-C). Inference
lists the grid over tissue (or the whole slide).

Near the slide edge the coarse views reach past the slide. Every view pixel whose centre lies outside the level-0
slide rectangle is set to ``pad_value``: 0 by default, the paper's zero padding (Sec. II-F), in training and in
inference alike, so the network sees at inference the same edges it was trained on. A config can choose 255 (the
white that ``Slide.read_region`` returns outside a slide, the colour of glass) to make an edge look like
background, e.g. for weights trained on white-padded tiles; ``None`` keeps the reader's pixels unchanged. Training
and inference configs must use the same value.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from pathbundles.checks import flag
from pathbundles.errors import PathBundlesError
from pathbundles.outputs import output_names, slide_name
from pathbundles.progress import logged_steps
from pathbundles.slide_inference import SlideHandles

logger = logging.getLogger(__name__)

MPPS_20X_10X_5X: tuple[float, float, float] = (0.5, 1.0, 2.0)
VIEW_KEYS: tuple[str, str, str] = ("x20", "x10", "x5")
READ_PATHS: tuple[str, str] = ("levels", "tile")
AUTO_READ_REPEATS = 3  # timed reads per path and slide for read_path="auto", after one warm-up
ELASTIC_GRID = 17  # control points per side (Sec. II-C)
ELASTIC_SIGMA_PX = 4.0  # std of their displacement, pixels at the finest mpp


def _level0_mpp(slide: Any) -> float:
    return float(np.mean(slide.mpp))


def read_concentric(slide: Any, center_level0_xy: Sequence[float], mpps: Sequence[float] = MPPS_20X_10X_5X,
                    patch_px: int = 256, path: Literal["levels", "tile"] = "levels",
                    pad_value: int | None = 0) -> list[np.ndarray]:
    """Patches of ``patch_px`` at each of ``mpps``, all centred on one level-0 point.

    Args:
        slide: an open :class:`pathbundles.wsi.Slide`.
        center_level0_xy: the common centre (x, y) in level-0 pixels.
        mpps: resolutions in um/px, finest first (20x, 10x, 5x).
        patch_px: side of every patch in pixels at its own mpp.
        path: "levels" reads each patch at exactly its own mpp with ``Slide.read_region`` (a pyramid level as
            stored when one is at that mpp, else anti-aliased from the next finer level); "tile" reads one tile of
            ``patch_px * mpps[-1] / mpps[0]`` px at ``mpps[0]`` and area-averages its centre for each coarser patch.
        pad_value: grey level (0..255, all three channels) of the pixels whose centre lies outside the level-0
            slide rectangle; 0 is the paper's zero padding, None keeps what the reader returns there (white).

    Returns:
        One uint8 (patch_px, patch_px, 3) RGB array per mpp.
    """
    if list(mpps) != sorted(mpps) or mpps[0] <= 0:
        raise ValueError(f"mpps must be positive and finest first, got {tuple(mpps)}")
    if path not in READ_PATHS:
        raise ValueError(f"read path {path!r}: expected one of {READ_PATHS}")
    _check_pad_value(pad_value)
    cx, cy = float(center_level0_xy[0]), float(center_level0_xy[1])
    level0_mpp = _level0_mpp(slide)

    def read(size_px: int, mpp: float) -> np.ndarray:
        half = size_px / 2 * mpp / level0_mpp
        return slide.read_region((cx - half, cy - half), (size_px, size_px), mpp)

    if path == "levels":
        views = [read(patch_px, mpp) for mpp in mpps]
    else:
        tile = read(round(patch_px * mpps[-1] / mpps[0]), mpps[0])
        views = []
        for mpp in mpps:
            span = patch_px * mpp / mpps[0]  # tile pixels covered by this patch
            lo = (tile.shape[0] - span) / 2
            views.append(np.asarray(Image.fromarray(tile).resize((patch_px, patch_px), Image.Resampling.BOX,
                                                                 box=(lo, lo, lo + span, lo + span))))
    if pad_value is None:
        return views
    return [_pad_outside(view, (cx, cy), mpp / level0_mpp, slide.dimensions, int(pad_value))
            for view, mpp in zip(views, mpps)]


def _check_pad_value(pad_value: int | None) -> None:
    if pad_value is not None and not (isinstance(pad_value, (int, np.integer)) and 0 <= pad_value <= 255):
        raise ValueError(f"pad_value {pad_value!r}: expected an integer grey level 0..255, or None")


def _pad_outside(view: np.ndarray, centre_xy: tuple[float, float], level0_per_px: float,
                 level0_size: tuple[int, int], pad_value: int) -> np.ndarray:
    """``view`` with every pixel whose centre lies outside the level-0 rectangle set to ``pad_value``.

    The view is square, centred on ``centre_xy`` (level-0 px) with ``level0_per_px`` level-0 px per pixel. Inside or
    outside is decided on these nominal pixel centres, so both read paths pad exactly the same pixels.
    """
    offsets = (np.arange(view.shape[0]) + 0.5 - view.shape[0] / 2) * level0_per_px
    xs, ys = centre_xy[0] + offsets, centre_xy[1] + offsets
    outside_x = (xs < 0) | (xs >= level0_size[0])
    outside_y = (ys < 0) | (ys >= level0_size[1])
    if not (outside_x.any() or outside_y.any()):
        return view
    view = np.array(view)  # arrays from PIL are read-only
    view[:, outside_x] = pad_value
    view[outside_y] = pad_value
    return view


def choose_read_path(slide: Any, centres: Sequence[Sequence[float]], mpps: Sequence[float] = MPPS_20X_10X_5X,
                     patch_px: int = 256, repeats: int = 3) -> tuple[str, dict[str, float]]:
    """Time both read paths of :func:`read_concentric` on ``slide`` and return the faster.

    ``centres[0]`` is read once by each path as a warm-up (first decoder calls, allocations). Then each path reads
    up to ``repeats`` patch sets timed, every timed read at a centre of its own (the first path ``centres[1]``,
    ``centres[3]``, ..., the second ``centres[2]``, ``centres[4]``, ...; the path that reads first alternating from
    repeat to repeat; fewer timed reads when there are fewer than ``1 + 2 * repeats`` centres): neither path reads
    tiles that it or the other path decoded into the slide's tile cache. Centres spread over the slide make
    every read decode its own tiles, as reads in a shuffled epoch do. (Timing both paths at one centre biased the
    median towards the path that more often read second, from the cache: on a level-0-only slide it picked "tile"
    where "levels" was 12-15 % faster.)

    Args:
        slide: an open :class:`pathbundles.wsi.Slide`.
        centres: level-0 (x, y) centres of patch sets on the slide (tissue or training tiles), at least one;
            ``1 + 2 * repeats`` spread ones for reads that all decode their own tiles.
        mpps: um/px of the views, finest first.
        patch_px: view side in pixels.
        repeats: timed reads per path.

    Returns:
        (the path with the lower median seconds per patch set, "levels" on a tie;
        {path: median seconds per patch set}).
    """
    if not len(centres) or repeats < 1:
        raise ValueError(f"choose_read_path needs at least one centre and repeats >= 1, got {len(centres)} centres "
                         f"and repeats={repeats}")
    for path in READ_PATHS:
        read_concentric(slide, centres[0], mpps, patch_px, path)
    timed = list(centres[1:]) or list(centres)
    # Path i reads timed[i], timed[i + 2], ...: never a tile the other path decoded (both share the one centre only
    # when there is one), nor one it read itself (fewer timed reads when there are fewer than 2 * repeats).
    own = {path: timed[i::len(READ_PATHS)] or timed for i, path in enumerate(READ_PATHS)}
    seconds: dict[str, list[float]] = {path: [] for path in READ_PATHS}
    for k in range(repeats):
        for path in (READ_PATHS if k % 2 == 0 else READ_PATHS[::-1]):
            if k >= len(own[path]):
                continue
            centre = own[path][k]
            start = perf_counter()
            read_concentric(slide, centre, mpps, patch_px, path)
            seconds[path].append(perf_counter() - start)
    median = {path: float(np.median(times)) for path, times in seconds.items()}
    return min(READ_PATHS, key=median.__getitem__), median


def tile_class(labels: np.ndarray, class_order: Sequence[int]) -> int:
    """The class of a patch: of the classes present in ``labels``, the one earliest in ``class_order``.

    Args:
        labels: label map, 0 = unannotated.
        class_order: class ids, highest order first; classes missing from it rank below all listed ones, in
            increasing id.

    Returns:
        The class id, or 0 when nothing is annotated.
    """
    present = [int(c) for c in np.unique(labels) if c != 0]
    if not present:
        return 0
    rank = {int(c): i for i, c in enumerate(class_order)}
    return min(present, key=lambda c: (rank.get(c, len(rank)), c))


def elastic_fields(rng: np.random.Generator, grid: int = ELASTIC_GRID,
                   sigma_px: float = ELASTIC_SIGMA_PX) -> np.ndarray:
    """Random control-point displacements (Sec. II-C): (2, grid, grid) (dy, dx) in pixels, each N(0, sigma_px)."""
    return rng.normal(0.0, sigma_px, size=(2, grid, grid))


def deform_views(views: Sequence[np.ndarray], field: np.ndarray, scales: Sequence[float],
                 labels: np.ndarray | None = None) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Apply one elastic deformation, defined over the coarsest view's footprint, to every concentric view.

    The control grid spans the field of view of the last (coarsest) view, with displacements in pixels of the
    finest view; each view samples the same level-0 displacement at its own pixel positions, so the three views
    stay aligned after deformation. Images use bicubic interpolation (as the paper), labels nearest; samples that
    fall outside a view mirror its border.

    Args:
        views: (H, W, 3) uint8 patches of equal size, finest first.
        field: (2, G, G) control-point displacements (dy, dx), pixels at the finest resolution.
        scales: finest-resolution pixels per pixel of each view (1, 2, 4 for 20x, 10x, 5x).
        labels: optional (H, W) label map of the finest view.

    Returns:
        (deformed views, deformed labels or None).
    """
    size = views[0].shape[0]
    extent = size * scales[-1]  # finest-resolution pixels across the coarsest view
    grid = field.shape[-1]
    out = []
    label_out = None
    for k, (view, scale) in enumerate(zip(views, scales)):
        # Position of each pixel centre in finest-resolution pixels, origin at the coarsest view's corner.
        pos = (np.arange(size) + 0.5 - size / 2) * scale + extent / 2
        g = pos / extent * (grid - 1)
        gy, gx = np.meshgrid(g, g, indexing="ij")
        dy = ndimage.map_coordinates(field[0], [gy, gx], order=3, mode="nearest") / scale
        dx = ndimage.map_coordinates(field[1], [gy, gx], order=3, mode="nearest") / scale
        rows, cols = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64), indexing="ij")
        coords = [rows + dy, cols + dx]
        channels = [ndimage.map_coordinates(view[..., ch].astype(np.float32), coords, order=3, mode="mirror")
                    for ch in range(view.shape[-1])]
        out.append(np.clip(np.rint(np.stack(channels, -1)), 0, 255).astype(np.uint8))
        if k == 0 and labels is not None:
            label_out = ndimage.map_coordinates(labels, coords, order=0, mode="mirror").astype(labels.dtype)
    return out, label_out


@dataclass
class _SlideEntry:
    """What the dataset needs of one slide, picklable into DataLoader workers."""

    name: str
    path: str
    level0_mpp: float
    level0_size: tuple[int, int]
    labels_at: _AnnotationLabels | _MaskLabels | None
    read_path: str
    #: why the slide could not be opened (inference mode), "" when it was; such a slide has no tiles.
    error: str = ""
    #: level-0 um/px over the file's (the item's mpp, else the dataset's mpp_override), None for the file's own.
    mpp_override: float | tuple[float, float] | None = None


def _grid_starts(length_px: int, stride0: float) -> np.ndarray:
    """Level-0 starts of the grid anchored at 0 along an axis of ``length_px`` (as ``LevelMask.tile_origins``)."""
    return np.arange(int(np.ceil(length_px / stride0))) * stride0


class _AnnotationLabels:
    """Labels of a square region rasterised from polygon annotations (exact, at the region's own resolution)."""

    def __init__(self, annotations: list, label_of: Mapping[str, int], level0_mpp: float,
                 level0_size: tuple[int, int]) -> None:
        self.annotations = [a for a in annotations if a.kind == "polygon"]
        self.label_of, self.level0_mpp, self.level0_size = dict(label_of), level0_mpp, level0_size

    def candidate_origins(self, tile_px: int, stride_px: int, mpp: float) -> np.ndarray:
        """Level-0 origins of the grid tiles that a polygon's bounding box reaches (a superset of the annotated)."""
        scale = mpp / self.level0_mpp
        tile0, stride0 = tile_px * scale, stride_px * scale
        xs, ys = _grid_starts(self.level0_size[0], stride0), _grid_starts(self.level0_size[1], stride0)
        keep = np.zeros((len(ys), len(xs)), bool)
        for a in self.annotations:
            (x0, y0), (x1, y1) = a.xy.min(0), a.xy.max(0)
            keep[max(0, int((y0 - tile0) // stride0)):int(y1 // stride0) + 1,
                 max(0, int((x0 - tile0) // stride0)):int(x1 // stride0) + 1] = True
        iy, ix = np.nonzero(keep)
        return np.stack([xs[ix], ys[iy]], 1).astype(np.float64).reshape(-1, 2)

    def __call__(self, origin_xy: tuple[float, float], size_px: int, mpp: float) -> np.ndarray:
        from pathbundles.annotations import rasterize

        return rasterize(self.annotations, (size_px, size_px), mpp / self.level0_mpp, label_of=self.label_of,
                         origin_xy=origin_xy)


class _MaskLabels:
    """Labels of a square region looked up (nearest) in a label-map image over the whole slide."""

    def __init__(self, mask: Any) -> None:
        self.mask = mask

    def candidate_origins(self, tile_px: int, stride_px: int, mpp: float) -> np.ndarray:
        """Level-0 origins of the grid tiles whose footprint touches a labelled mask pixel."""
        return self.mask.tile_origins(tile_px, stride_px, mpp)

    def __call__(self, origin_xy: tuple[float, float], size_px: int, mpp: float) -> np.ndarray:
        step = mpp / self.mask.level0_mpp
        centres = (np.arange(size_px) + 0.5) * step
        x, y = np.meshgrid(origin_xy[0] + centres, origin_xy[1] + centres)
        return np.asarray(self.mask.at_level0(x, y), dtype=np.uint8)


def _labels_of(item: dict, label_keys: Sequence[str], classes: Mapping[int, str] | None, level0_mpp: float,
               level0_size: tuple[int, int]) -> _AnnotationLabels | _MaskLabels | None:
    """The label reader of a datalist item: the first of ``label_keys`` it has, or None."""
    from pathbundles.annotations import read_annotations
    from pathbundles.tissue import LevelMask

    for key in label_keys:
        if not item.get(key):
            continue
        if key == "annotation":
            names = classes if classes is not None else {int(k): v for k, v in (item.get("classes") or {}).items()}
            if not names:
                raise ValueError(f"{item[key]}: polygon annotations need class names; pass classes= or give the "
                                 f"datalist item a 'classes' mapping {{id: name}}")
            return _AnnotationLabels(read_annotations(item[key]), {v: int(k) for k, v in names.items()}, level0_mpp,
                                     level0_size)
        return _MaskLabels(LevelMask.load_mask(item[key], level0_size, level0_mpp))
    return None


class MultiMagnificationDataset(torch.utils.data.Dataset):
    """DMMN tiles of a datalist: three concentric views per tile, labels of the 20x view when training.

    Items are dicts: ``x20``, ``x10``, ``x5`` (3, patch_px, patch_px) uint8 tensors, ``location`` level-0 (x, y)
    of the common centre (float64), ``slide_index``, in training mode ``label`` (patch_px, patch_px) long
    (0 = unannotated, 1..C), in inference mode ``error`` ("" when the read succeeded; a failed read gives black
    views and the error, so the writer drops that slide and finishes the others), then ``transform``. Tiles are target squares of ``patch_px`` at ``mpps[0]`` on a grid of
    stride ``stride_px`` at ``mpps[0]`` anchored at level-0 (0, 0).

    Training: a tile is kept when more than ``min_annotated`` of its target pixels are annotated; its class is the
    highest-ordered class present (``class_order``). A tile of class c appears ``1 + rates[c]`` times: as read, then
    ``rates[c]`` elastically deformed copies (17 x 17 control points, sigma 4 px at 20x, one field over the 5x
    footprint applied to all views and the label). Copy k of tile t is deformed with a generator seeded
    ``(seed, t, k)``, so items are the same in every epoch, worker and run.

    Inference: every grid tile whose target touches tissue (:func:`pathbundles.tissue.tissue_mask`), or every tile
    of the slide with ``use_tissue=False``; the paper skips Otsu on TNBC because it drops adipose tissue. A slide
    that cannot be opened is logged and kept with its ``error`` and no tiles, so the writer reports it by name and
    finishes the others (training raises instead: every training slide must read).

    Read path: with ``read_path="auto"`` each slide is read by the path :func:`choose_read_path` finds faster on up
    to ``1 + 2 * AUTO_READ_REPEATS`` of its tiles (spread over its tile list) when the dataset is built; the choice is
    logged and kept in :attr:`read_paths`. A slide without tiles is never read and gets "levels" untimed.

    Args:
        data: datalist dicts with ``image`` (optionally ``mpp``, level-0 um/px over the file's) and, for training,
            one of ``label_keys``.
        mode: "train" or "infer".
        class_order: class ids, highest order first (the paper's TNBC order: benign epithelium, carcinoma,
            necrosis, background, ...).
        rates: r_c, extra deformed copies per tile of class c (missing classes: 0).
        mpps: um/px of the views, finest first.
        patch_px: view side in pixels.
        stride_px: grid stride in pixels at ``mpps[0]``.
        min_annotated: annotated fraction of the target a training tile must exceed (0.01 = 1 %).
        label_keys: datalist keys tried in order: "annotation" (GeoJSON/XML polygons, rasterised exactly at
            ``mpps[0]``; class names from ``classes`` or the item's "classes"), or a label-map image over the
            whole slide ("partial_labels", "labels").
        classes: {id: name} for polygon annotations.
        read_path: "auto" (time both per slide, keep the faster), or "levels" or "tile" for every slide, as for
            :func:`read_concentric`.
        pad_value: grey level of view pixels outside the slide (0, the paper's zero padding), or None for the
            reader's white; use the same value for training and inference.
        use_tissue: inference only: restrict the grid to tissue.
        tissue_mpp: um/px of the tissue mask.
        seed: seed of the elastic deformations.
        backend: slide reader backend.
        transform: dict transform applied to each item.
        mpp_override: level-0 um/px over the slides' files (the bundle's ``slide_mpp``); an item's ``mpp`` wins.
    """

    def __init__(self, data: Sequence[dict], mode: Literal["train", "infer"] = "train",
                 class_order: Sequence[int] = (), rates: Mapping[int, int] | None = None,
                 mpps: Sequence[float] = MPPS_20X_10X_5X, patch_px: int = 256, stride_px: int = 256,
                 min_annotated: float = 0.01, label_keys: Sequence[str] = ("annotation", "partial_labels", "labels"),
                 classes: Mapping[int, str] | None = None, read_path: Literal["auto", "levels", "tile"] = "auto",
                 pad_value: int | None = 0, use_tissue: bool = True, tissue_mpp: float = 8.0, seed: int = 0,
                 backend: str = "auto", transform: Callable[[dict], dict] | None = None,
                 mpp_override: float | tuple[float, float] | None = None) -> None:
        from pathbundles.tissue import LevelMask, tissue_mask
        from pathbundles.wsi import item_mpp, open_slide

        if mode not in ("train", "infer"):
            raise ValueError(f"mode {mode!r}: expected 'train' or 'infer'")
        if read_path not in ("auto", *READ_PATHS):
            raise ValueError(f"read_path {read_path!r}: expected 'auto' or one of {READ_PATHS}")
        _check_pad_value(pad_value)
        self.mode, self.mpps, self.patch_px, self.stride_px = mode, tuple(float(m) for m in mpps), patch_px, stride_px
        self.class_order, self.rates = tuple(int(c) for c in class_order), {int(k): int(v) for k, v in
                                                                            (rates or {}).items()}
        if any(r < 0 for r in self.rates.values()):
            raise ValueError(f"rates must be non-negative integers, got {self.rates}")
        self.pad_value, self.seed, self.transform = pad_value, seed, transform
        use_tissue = flag(use_tissue, "use_tissue")
        self.handles = SlideHandles(backend)
        self.slides: list[_SlideEntry] = []
        tiles = []  # rows (slide index, level-0 origin x, origin y, class); origins exact, not rounded

        def plan(index: int, name: str, path: str,
                 item: dict) -> tuple[_SlideEntry, list[tuple[int, float, float, int]]]:
            """One slide's entry and tiles (slide index, origin x, origin y, class)."""
            override = item_mpp(item, mpp_override)
            with open_slide(path, backend=backend, mpp=override) as slide:
                level0_mpp, level0_size = _level0_mpp(slide), tuple(slide.level_dimensions[0])
                tissue = tissue_mask(slide, mpp=tissue_mpp) if mode == "infer" and use_tissue else None
                labels_at = (_labels_of(item, label_keys, classes, level0_mpp, level0_size) if mode == "train"
                             else None)
                if mode == "train" and labels_at is None:
                    raise ValueError(f"{path}: training needs labels, the datalist item has none of "
                                     f"{tuple(label_keys)}")
                if labels_at is not None:
                    origins = labels_at.candidate_origins(patch_px, stride_px, self.mpps[0])
                else:
                    if tissue is None:  # one foreground mask pixel over the whole frame: every grid tile
                        tissue = LevelMask(np.ones((1, 1), bool), max(level0_size) * level0_mpp, level0_mpp,
                                           level0_size)
                    origins = tissue.tile_origins(patch_px, stride_px, self.mpps[0])
                slide_tiles = []
                for x0, y0 in origins:
                    cls = 0
                    if labels_at is not None:
                        labels = labels_at((float(x0), float(y0)), patch_px, self.mpps[0])
                        if np.count_nonzero(labels) <= min_annotated * labels.size:
                            continue
                        cls = tile_class(labels, self.class_order)
                    slide_tiles.append((index, float(x0), float(y0), cls))
                chosen = read_path if read_path != "auto" else self._timed_read_path(slide, name, slide_tiles)
            return _SlideEntry(name, path, level0_mpp, level0_size, labels_at, chosen,
                               mpp_override=override), slide_tiles

        # Names first: outputs that would leave the output folder or overwrite each other stop the run unread
        # (training writes no per-slide outputs, so a slide may be listed twice there).
        names = output_names(data) if mode == "infer" else [slide_name(item)[0] for item in data]
        for index, (name, item) in enumerate(logged_steps(list(zip(names, data)), f"{mode} tiles")):
            path = slide_name(item)[1]
            try:
                entry, slide_tiles = plan(index, name, path, item)
            except (PathBundlesError, OSError, ValueError) as err:
                if mode == "train":
                    raise
                logger.error("skipping slide %s: %s", name, err)
                self.slides.append(_SlideEntry(name, path, float("nan"), (0, 0), None, "levels", error=str(err)))
                continue
            self.slides.append(entry)
            tiles.extend(slide_tiles)
            logger.info("%s: %d tiles, read path %r", name, len(slide_tiles), entry.read_path)
        #: (N, 4) float64 rows (slide index, level-0 x, level-0 y of the target's top-left corner, class).
        self.tiles = np.asarray(tiles, dtype=np.float64).reshape(-1, 4)
        copies = np.array([1 + self.rates.get(int(c), 0) for c in self.tiles[:, 3]], dtype=np.int64)
        # Item i -> (tile, copy): copy 0 is the tile as read, copies 1.. are deformed.
        self.item_tile = np.repeat(np.arange(len(self.tiles)), copies)
        self.item_copy = np.concatenate([np.arange(n) for n in copies]) if len(copies) else np.zeros(0, np.int64)

    def _centre(self, x0: float, y0: float, level0_mpp: float) -> tuple[float, float]:
        """Level-0 centre of the views of the tile whose target starts at level-0 (x0, y0)."""
        half = self.patch_px / 2 * self.mpps[0] / level0_mpp
        return x0 + half, y0 + half

    def _timed_read_path(self, slide: Any, name: str, slide_tiles: list[tuple[int, float, float, int]]) -> str:
        """The faster read path of one slide, timed by :func:`choose_read_path` on tiles spread over its list."""
        if not slide_tiles:
            logger.info("%s: no tiles, read path 'levels' not timed", name)
            return "levels"
        picks = np.unique(np.linspace(0, len(slide_tiles) - 1, 1 + len(READ_PATHS) * AUTO_READ_REPEATS)
                          .round().astype(int))
        level0_mpp = _level0_mpp(slide)
        centres = [self._centre(slide_tiles[i][1], slide_tiles[i][2], level0_mpp) for i in picks]
        path, seconds = choose_read_path(slide, centres, self.mpps, self.patch_px, repeats=AUTO_READ_REPEATS)
        logger.info("%s: read path %r, faster of %s ms per patch set (%s backend)", name, path,
                    ", ".join(f"{p} {1e3 * s:.1f}" for p, s in seconds.items()), slide.backend)
        return path

    @property
    def read_paths(self) -> dict[str, str]:
        """{slide name: read path} ("levels" or "tile") each slide is read with."""
        return {entry.name: entry.read_path for entry in self.slides}

    def __len__(self) -> int:
        return len(self.item_tile)

    def class_counts(self, balanced: bool = True) -> dict[int, int]:
        """Tiles per class, after (``balanced``) or before the elastic multiplication."""
        classes = (self.tiles[self.item_tile, 3] if balanced else self.tiles[:, 3]).astype(np.int64)
        values, counts = np.unique(classes, return_counts=True)
        return {int(v): int(n) for v, n in zip(values, counts)}

    def __getitem__(self, i: int) -> dict:
        t, k = int(self.item_tile[i]), int(self.item_copy[i])
        index, x0, y0 = int(self.tiles[t, 0]), float(self.tiles[t, 1]), float(self.tiles[t, 2])
        entry = self.slides[index]
        centre = self._centre(x0, y0, entry.level0_mpp)
        error = ""
        try:
            slide = self.handles(entry.path, entry.mpp_override)
            views = read_concentric(slide, centre, self.mpps, self.patch_px, entry.read_path, self.pad_value)
        except (PathBundlesError, OSError, ValueError) as err:
            if self.mode == "train":
                raise
            # Inference: the writer drops this slide with the error and finishes the others.
            views, error = [np.zeros((self.patch_px, self.patch_px, 3), np.uint8)] * len(self.mpps), \
                f"{entry.path}: {err}"
        labels = entry.labels_at((float(x0), float(y0)), self.patch_px, self.mpps[0]) if entry.labels_at else None
        if k > 0:
            field = elastic_fields(np.random.default_rng((self.seed, t, k)))
            views, labels = deform_views(views, field, [m / self.mpps[0] for m in self.mpps], labels)
        item = {key: torch.from_numpy(np.ascontiguousarray(v.transpose(2, 0, 1))) for key, v in zip(VIEW_KEYS, views)}
        item["location"] = torch.tensor(centre, dtype=torch.float64)
        item["slide_index"] = index
        if self.mode == "infer":
            item["error"] = error
        if labels is not None:
            item["label"] = torch.from_numpy(labels.astype(np.int64))
        return self.transform(item) if self.transform is not None else item
