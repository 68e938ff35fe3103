"""Training patch samplers over annotated slides.

``ClassBalancedPatchDataset`` draws patches as ScanNet and the spatial LSTM paper do: pick a class (normal or
tumour) with equal probability, then uniformly a slide that has that class, then a location of that class on it.
Locations come from the tissue mask (~8 um/px) and the rasterised tumour annotations on the same grid; a patch's
label is its pool's (tumour pools keep away from the lesion border by one mask pixel, normal pools by two).
Hard negatives (false positives mined from an earlier model) join the normal pool.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from pathbundles.checks import flag, probability
from pathbundles.outputs import slide_name
from pathbundles.progress import logged_steps
from pathbundles.slide_inference import SlideHandles
from pathbundles.tissue import LevelMask

logger = logging.getLogger(__name__)

NORMAL, TUMOUR = 0, 1


@dataclass
class SlideLocations:
    """Candidate patch centres of one slide, as mask pixels (row, col) of a grid with ``downsample`` level-0 px."""

    name: str
    path: str
    downsample: float
    level0_mpp: float
    pools: dict[int, np.ndarray]
    grid_shape: tuple[int, int]
    hard_negatives: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # level-0 (x, y)
    mpp_override: float | tuple[float, float] | None = None  # level-0 um/px over the file's (item mpp, slide_mpp)

    def in_pool(self, label: int, level0_xy: np.ndarray) -> np.ndarray:
        """Whether each level-0 (x, y) lies in a mask cell of the ``label`` pool."""
        grid = np.zeros(self.grid_shape, bool)
        grid[tuple(self.pools[label].T)] = True
        rc = np.floor(np.asarray(level0_xy, float).reshape(-1, 2)[:, ::-1] / self.downsample).astype(np.int64)
        inside = (rc >= 0).all(1) & (rc < np.asarray(self.grid_shape)).all(1)
        out = np.zeros(len(rc), bool)
        out[inside] = grid[rc[inside, 0], rc[inside, 1]]
        return out


def tumour_grid(item: dict, tissue: LevelMask) -> np.ndarray:
    """Tumour mask of a datalist item on the grid of ``tissue`` (same shape and level-0 frame).

    Uses ``annotation`` (ASAP XML, NCRF JSON or GeoJSON polygons) when the item has one, else ``mask`` (an image
    over the whole slide, tumour > 0), else an empty mask (a normal slide).
    """
    from pathbundles.annotations import rasterize, read_annotations

    if item.get("annotation"):
        return rasterize(read_annotations(item["annotation"]), tissue.mask.shape, tissue.downsample) > 0
    if item.get("mask"):
        mask = LevelMask.load_mask(item["mask"], tissue.level0_size, tissue.level0_mpp)
        rows, cols = np.indices(tissue.mask.shape)
        return mask.at_level0((cols + 0.5) * tissue.downsample, (rows + 0.5) * tissue.downsample) > 0
    return np.zeros(tissue.mask.shape, bool)


def locate(data: Sequence[dict], backend: str = "auto", tissue_mpp: float = 8.0,
           mpp_override: float | tuple[float, float] | None = None) -> list[SlideLocations]:
    """Tissue and tumour locations of every training slide (one tissue mask per slide); a slide opens with its
    item's ``mpp``, else ``mpp_override``, else its file's mpp (um/px)."""
    from pathbundles.tissue import tissue_mask
    from pathbundles.wsi import item_mpp, open_slide

    out = []
    for item in logged_steps(data, "training locations (a tissue mask per slide)"):
        name, path = slide_name(item)
        override = item_mpp(item, mpp_override)
        with open_slide(path, backend=backend, mpp=override) as slide:
            tissue = tissue_mask(slide, mpp=tissue_mpp)
            level0_mpp = float(slide.mpp[0])
        tumour = tumour_grid(item, tissue)
        pools = {TUMOUR: np.argwhere(ndimage.binary_erosion(tumour, iterations=1)),
                 NORMAL: np.argwhere(tissue.mask & ~ndimage.binary_dilation(tumour, iterations=2))}
        out.append(SlideLocations(name, path, tissue.downsample, level0_mpp, pools, tissue.mask.shape,
                                  mpp_override=override))
        logger.info("%s: %d tumour and %d normal candidate cells", name, len(pools[TUMOUR]), len(pools[NORMAL]))
    return out


class ClassBalancedPatchDataset(torch.utils.data.Dataset):
    """Class-balanced random patches of ``read_px`` pixels at ``mpp`` from annotated slides.

    Each item is a dict ``image`` (3, read_px, read_px) uint8 tensor (then ``transform``), ``label`` (1, 1) long
    tensor (the shape of a ScanNet output for a 244 px patch), ``location`` level-0 (x, y) of the patch centre.
    Random draws use torch's RNG, so ``monai.utils.set_determinism`` makes a run repeatable and each DataLoader
    worker and epoch draws different patches.

    Args:
        data: datalist dicts with ``image`` and optionally ``annotation`` or ``mask`` (tumour ground truth) and
            ``mpp`` (level-0 um/px over the file's).
        read_px: side of the region read (patch plus room for rotation/scaling/translation augmentation).
        mpp: resolution of the patches (um/px).
        samples_per_epoch: length of the dataset.
        hard_negative_fraction: share of normal draws taken from mined hard negatives, when there are any; ``None``
            (the default) adds them back to the normal candidates, as the paper does: a normal draw is a mined
            location with probability mined / (mined + normal tissue-mask cells of all slides), i.e. in proportion
            to their number (10 mined spots among 10,000 normal cells: 0.1 % of normal draws), every mined location
            equally likely; the other normal draws are as without mining (slide first, then a cell).
        fixed: draw item ``i`` from a generator seeded with ``(seed, i)`` (a fixed validation set).
        seed: seed of ``fixed`` draws.
        backend: slide reader backend.
        tissue_mpp: resolution of the tissue masks (um/px).
        transform: MONAI dict transform applied to each item.
        mpp_override: level-0 um/px over the slides' files (the bundles' ``slide_mpp``); an item's ``mpp`` wins.
    """

    def __init__(self, data: Sequence[dict], read_px: int, mpp: float, samples_per_epoch: int = 1024,
                 hard_negative_fraction: float | None = None, fixed: bool = False, seed: int = 0,
                 backend: str = "auto",
                 tissue_mpp: float = 8.0, transform: Callable[[dict], dict] | None = None,
                 mpp_override: float | tuple[float, float] | None = None) -> None:
        self.read_px, self.mpp, self.length = int(read_px), float(mpp), int(samples_per_epoch)
        if hard_negative_fraction is not None:
            hard_negative_fraction = probability(hard_negative_fraction, "hard_negative_fraction")
        self.hard_negative_fraction, self.fixed, self.seed = hard_negative_fraction, flag(fixed, "fixed"), seed
        self.transform = transform
        self.slides = locate(data, backend=backend, tissue_mpp=tissue_mpp, mpp_override=mpp_override)
        self.handles = SlideHandles(backend)
        for cls in (NORMAL, TUMOUR):
            if not any(len(s.pools[cls]) for s in self.slides):
                raise ValueError(f"no slide in the datalist has {'tumour' if cls else 'normal'} tissue to sample")

    def __len__(self) -> int:
        return self.length

    def add_hard_negatives(self, slide_path: str, level0_xy: np.ndarray) -> int:
        """Add mined false positives (level-0 (x, y) patch centres) of the slide at ``slide_path``; returns how many
        were new (a location already in the pool, mined again by a later round, is not added twice)."""
        for s in self.slides:
            if s.path == str(slide_path):
                xy = np.asarray(level0_xy, float).reshape(-1, 2)
                known = {tuple(p) for p in np.round(s.hard_negatives, 6).tolist()}
                fresh = []
                for point, key in zip(xy, np.round(xy, 6).tolist()):
                    if tuple(key) not in known:
                        known.add(tuple(key))
                        fresh.append(point)
                if fresh:
                    s.hard_negatives = np.concatenate([s.hard_negatives, np.asarray(fresh)])
                return len(fresh)
        raise KeyError(f"{slide_path} is not a training slide of this dataset")

    def hard_negative_share(self) -> float:
        """Probability that a normal draw takes a mined hard negative: ``hard_negative_fraction`` when set, else
        mined locations / (mined locations + normal candidate cells) over all slides; 0 without mined ones."""
        n_hard = self.n_hard_negatives
        if n_hard == 0:
            return 0.0
        if self.hard_negative_fraction is not None:
            return self.hard_negative_fraction
        return n_hard / (n_hard + sum(len(s.pools[NORMAL]) for s in self.slides))

    @property
    def n_hard_negatives(self) -> int:
        return int(sum(len(s.hard_negatives) for s in self.slides))

    def draw(self, rng: np.random.Generator) -> tuple[SlideLocations, float, float, int]:
        """One (slide, level-0 x, level-0 y, label) draw: class first, then slide, then location."""
        label = int(rng.integers(2))
        hard = [s for s in self.slides if len(s.hard_negatives)]
        if label == NORMAL and hard and rng.random() < self.hard_negative_share():
            if self.hard_negative_fraction is None:  # added back: every mined location equally likely
                sizes = np.asarray([len(s.hard_negatives) for s in hard], np.float64)
                slide = hard[rng.choice(len(hard), p=sizes / sizes.sum())]
            else:
                slide = hard[rng.integers(len(hard))]
            x, y = slide.hard_negatives[rng.integers(len(slide.hard_negatives))]
            return slide, float(x), float(y), label
        candidates = [s for s in self.slides if len(s.pools[label])]
        slide = candidates[rng.integers(len(candidates))]
        row, col = slide.pools[label][rng.integers(len(slide.pools[label]))]
        jitter = rng.random(2)
        return slide, (col + jitter[0]) * slide.downsample, (row + jitter[1]) * slide.downsample, label

    def draw_item(self, i: int) -> tuple[SlideLocations, float, float, int]:
        """Item ``i``'s (slide, level-0 x, level-0 y, label): seeded by ``(seed, i)`` when ``fixed``, else drawn
        from torch's RNG."""
        seed = (self.seed, i) if self.fixed else int(torch.randint(0, 2**62, (1,)).item())
        return self.draw(np.random.default_rng(seed))

    def region_origin(self, slide: SlideLocations, x: float, y: float) -> tuple[int, int]:
        """Level-0 (x, y) of the top-left pixel of the ``read_px`` region centred on level-0 (x, y)."""
        half = self.read_px / 2 * self.mpp / slide.level0_mpp
        return int(round(x - half)), int(round(y - half))

    def __getitem__(self, i: int) -> dict:
        slide, x, y, label = self.draw_item(i)
        region = self.handles(slide.path, slide.mpp_override).read_region(self.region_origin(slide, x, y),
                                                                          (self.read_px, self.read_px), self.mpp)
        item = {"image": torch.from_numpy(np.ascontiguousarray(region.transpose(2, 0, 1))),
                "label": torch.full((1, 1), label, dtype=torch.long),
                "location": torch.tensor([x, y], dtype=torch.float64)}
        return self.transform(item) if self.transform is not None else item


#: Datalist item keys that hold a file path (made absolute by :func:`read_datalist`).
PATH_KEYS = ("image", "annotation", "mask", "labels", "partial_labels", "centroids")


def read_datalist(path: str | Path, split: str | None = None) -> list[dict]:
    """Items of a ``dataset.json`` (``{"items": [...]}`` or a list) with paths made absolute.

    Paths are made absolute without resolving symlinks, so an item whose file is a broken link or a symlink loop
    is still listed (the run then fails that one item by name). A document that is not a non-empty list of items,
    or an item that names no image, is an InputError naming the file and the item's index (:func:`check_datalist`).

    Splits: with ``split=None`` every item is returned. With a split asked for, a file whose items carry no
    ``split`` field is taken as that split whole (a file per split); a file whose items carry one must give it on
    every item, and only that split's items are returned. So one file with train and val items, given as both the
    training and the validation source, yields disjoint sets.

    Raises:
        InputError: naming the file, when it cannot be read or checked, some items have a split and others not, or
            the split asked for has no item.
    """
    import json

    from pathbundles.dicomweb import is_dicomweb_url
    from pathbundles.errors import InputError

    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot read the datalist: {err}") from err
    except RecursionError:
        raise InputError(path, "cannot read the datalist: its JSON is nested too deeply") from None
    items = [dict(item) if isinstance(item, dict) else {"image": item} for item in check_datalist(path, doc)]
    if split is not None:
        without = [i for i, item in enumerate(items) if item.get("split") is None]
        if len(without) < len(items):
            if without:
                raise InputError(path, f"items {without[:5]} have no 'split' while others have one; give every item "
                                       f"a split, or none (a file per split)")
            splits = sorted({str(item["split"]) for item in items})
            items = [item for item in items if str(item["split"]) == split]
            if not items:
                raise InputError(path, f"no item of split {split!r}; the file has splits {splits}")
    for item in items:
        for key in PATH_KEYS:
            if item.get(key) and not is_dicomweb_url(item[key]):  # a DICOMweb series URL is no path
                item[key] = os.path.abspath(path.parent / item[key])
    return items


def check_datalist(path: str | os.PathLike, doc: object) -> list:
    """The items of a parsed datalist document ``doc`` read from ``path``: ``{"items": [...]}`` or a list, each an
    image path or a dict with a non-empty string ``image`` (and a string ``name`` and string paths under
    :data:`PATH_KEYS` when it has them). InputError naming ``path`` and the item's index otherwise, and for a
    datalist without items."""
    from pathbundles.errors import InputError

    if isinstance(doc, dict):
        if "items" not in doc:
            raise InputError(path, f"no 'items' list (keys: {', '.join(map(str, doc)) or 'none'})")
        doc = doc["items"]
    if not isinstance(doc, list):
        raise InputError(path, f"the items must be a JSON list, not {type(doc).__name__}")
    if not doc:
        raise InputError(path, "the datalist lists no items")
    for index, item in enumerate(doc):
        where = f"item {index}"
        if isinstance(item, str):
            item = {"image": item}
        if not isinstance(item, dict):
            raise InputError(path, f"{where}: expected an image path or an object with 'image', got "
                                   f"{type(item).__name__}")
        if "image" not in item:
            raise InputError(path, f"{where}: no 'image' path (keys: {', '.join(map(str, item)) or 'none'})")
        if not isinstance(item["image"], str) or not item["image"]:
            raise InputError(path, f"{where}: 'image' must be a non-empty path, got {item['image']!r}")
        if item.get("name") is not None and not isinstance(item["name"], str):
            raise InputError(path, f"{where}: 'name' must be a string, got {type(item['name']).__name__}")
        for key in PATH_KEYS[1:]:
            if item.get(key) and not isinstance(item[key], str):
                raise InputError(path, f"{where}: '{key}' must be a file path, got {type(item[key]).__name__}")
    return doc
