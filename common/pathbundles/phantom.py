"""Deterministic synthetic H&E-like data ("phantoms") for demos, tests and benchmarks when no real slide is at hand.

Three generators, each writing a folder with a ``dataset.json`` datalist (paths relative to the folder):

- :func:`make_metastasis_dataset`: Camelyon16-style pyramidal JPEG TIFFs of lymph-node-like tissue, half of them
  with breast-carcinoma-like metastases (macro, micro, ITC), ASAP XML annotations and tumour masks.
- :func:`make_mitosis_dataset`: high-power fields of carcinoma-like nuclei with mitotic figures, hard-negative
  mimics and centroid CSVs.
- :func:`make_multiclass_dataset`: pyramidal TIFFs with six tissue classes, full label maps and partial
  (GeoJSON + PNG) annotations.
- :func:`make_geometry_dataset`: geometry test slides at a scanner's resolution and pyramid (0.2265 um/px, 2x or 4x
  steps with sizes rounded up or down, so downsamples such as 3.9991 or 4.0027): dark cone-shaped markers at known
  sub-pixel positions on tissue-coloured ground, the ground truth for "does every output land where it belongs on
  the slide".

How the pixels are made: colour follows a Beer-Lambert stain model (haematoxylin and eosin concentrations times
per-slide stain vectors). All geometry is global and seeded: region polygons, nucleus positions (jittered-grid
point processes thinned by region), nucleus sprites, smooth fields on a coarse grid and periodic texture tiles.
A slide is rendered band by band from that geometry, so bands meet without seams and memory stays at a few bands,
and the same seed gives the same pixels whatever order the bands are asked for. None of this is real morphology:
see docs/PHANTOM.md for what the textures encode and what the data must not be used for.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage.measure import points_in_poly

from pathbundles.annotations import Annotation, rasterize, write_asap_xml, write_geojson, write_points_csv
from pathbundles.atomic import atomic_path
from pathbundles.progress import logged_steps, progress
from pathbundles.writers import write_pyramid_tiff

__all__ = ["make_phantom", "make_metastasis_dataset", "make_mitosis_dataset", "make_multiclass_dataset",
           "make_geometry_dataset", "MULTICLASS_CLASSES", "lesion_kind"]

#: Class ids of the multi-class phantom (label maps use these; 0 in partial labels = unannotated).
MULTICLASS_CLASSES = {1: "carcinoma", 2: "benign epithelium", 3: "stroma", 4: "necrosis", 5: "adipose",
                      6: "background"}

# Optical density per unit concentration (natural log) of haematoxylin (blue-purple) and eosin (pink), R, G, B.
_H_OD = np.array([0.65, 0.70, 0.29], np.float32)
_E_OD = np.array([0.17, 0.89, 0.41], np.float32)
_GLASS_OD = np.array([0.015, 0.02, 0.012], np.float32)  # slide glass + mountant: not quite 255 white
_BAND_PX = 256  # rows rendered at a time; equals the writers' band so no band is rendered twice
_COARSE_DS = 8  # level-0 px per sample of the smooth fields
_TILE_PX = 1024  # period of the texture tiles (512 um at 0.5 um/px: too large to notice)
_GRAIN_TILE_PX = 509  # a period prime to _TILE_PX, so the two textures never repeat together
# Camelyon16 lesion classes by longest diameter (um): ITC < 200 <= micro <= 2000 < macro.
_ITC_MAX_UM, _MACRO_MIN_UM = 200.0, 2000.0


def lesion_kind(diameter_um: float) -> str:
    """Camelyon16 size class of a lesion from its longest diameter in um: "itc" (< 200), "micro" or "macro" (> 2000)."""
    if diameter_um < _ITC_MAX_UM:
        return "itc"
    return "macro" if diameter_um > _MACRO_MIN_UM else "micro"


# ---------------------------------------------------------------------------------------------------------------
# Geometry: lobulated polygons and point processes
# ---------------------------------------------------------------------------------------------------------------


def _blob(rng: np.random.Generator, centre_xy: Sequence[float], radii_xy: Sequence[float], lobes: float = 0.1,
          n_vertices: int = 256, angle: float | None = None) -> np.ndarray:
    """Lobulated closed outline (N, 2) in level-0 (x, y): an ellipse whose radius wobbles with random harmonics.

    Args:
        centre_xy: centre, level-0 px.
        radii_xy: semi-axes before rotation, level-0 px.
        lobes: relative amplitude of the low harmonics (0 = smooth ellipse); a tenth of it goes to fine wiggles.
    """
    t = np.linspace(0, 2 * np.pi, n_vertices, endpoint=False)
    r = np.ones_like(t)
    for k in range(2, 17):
        amp = lobes * (1.0 if k <= 6 else 0.1) / k ** 0.5
        r += amp * rng.normal() * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    r = np.maximum(r, 0.35)
    angle = rng.uniform(0, np.pi) if angle is None else angle
    x, y = radii_xy[0] * r * np.cos(t), radii_xy[1] * r * np.sin(t)
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([centre_xy[0] + c * x - s * y, centre_xy[1] + s * x + c * y], axis=1)


def _feret_px(xy: np.ndarray) -> float:
    """Longest distance between two vertices (maximum Feret diameter), in the units of ``xy``."""
    d = xy[:, None, :] - xy[None, :, :]
    return float(np.sqrt((d ** 2).sum(-1)).max())


def _inset(xy: np.ndarray, inset_px: float) -> np.ndarray:
    """Move every vertex ``inset_px`` towards the outline's centroid (a cheap inner offset for star-shaped blobs)."""
    centre = xy.mean(axis=0)
    d = xy - centre
    r = np.hypot(d[:, 0], d[:, 1])
    return centre + d * (np.maximum(r - inset_px, 0.2 * r) / np.maximum(r, 1e-9))[:, None]


def _inside(points_xy: np.ndarray, outline_xy: np.ndarray) -> np.ndarray:
    """Boolean (N,): which level-0 (x, y) points lie inside the closed outline."""
    return points_in_poly(np.asarray(points_xy, np.float64).reshape(-1, 2), outline_xy)


def _jittered_grid(rng: np.random.Generator, shape_hw: tuple[int, int], spacing_px: float,
                   jitter: float = 0.4) -> np.ndarray:
    """Points (N, 2) level-0 (x, y), one per grid cell of ``spacing_px`` moved by up to ``jitter`` cells.

    A jittered grid packs like cells do (no two nuclei on top of each other), unlike a Poisson process.
    """
    ny, nx = math.ceil(shape_hw[0] / spacing_px), math.ceil(shape_hw[1] / spacing_px)
    gy, gx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    xy = np.stack([gx.ravel(), gy.ravel()], axis=1) + 0.5
    xy += rng.uniform(-jitter, jitter, xy.shape)
    xy *= spacing_px
    keep = (xy[:, 0] < shape_hw[1]) & (xy[:, 1] < shape_hw[0])
    return xy[keep]


def _lookup(field: np.ndarray, ds: float, xy: np.ndarray) -> np.ndarray:
    """Values of a coarse map (one sample per ``ds`` level-0 px) at level-0 (x, y) points, nearest sample."""
    r = np.clip((xy[:, 1] / ds).astype(np.int64), 0, field.shape[0] - 1)
    c = np.clip((xy[:, 0] / ds).astype(np.int64), 0, field.shape[1] - 1)
    return field[r, c]


# ---------------------------------------------------------------------------------------------------------------
# Smooth fields and texture tiles
# ---------------------------------------------------------------------------------------------------------------


def _smooth_field(rng: np.random.Generator, shape_hw: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field of ``shape_hw`` whose features are about ``scale`` samples wide."""
    small = (math.ceil(shape_hw[0] / scale) + 2, math.ceil(shape_hw[1] / scale) + 2)
    noise = ndi.gaussian_filter(rng.standard_normal(small).astype(np.float32), 0.7)
    up = _upsample(noise, scale, 0, shape_hw[0], shape_hw[1])
    return (up - up.mean()) / (up.std() + 1e-9)


def _upsample(field: np.ndarray, ds: float, y0: int, y1: int, width: int) -> np.ndarray:
    """Bilinear values of a coarse field at level-0 rows ``y0:y1`` and columns ``0:width``, float32.

    Sample (i, j) of the field sits at the centre of its ``ds`` x ``ds`` level-0 block. Evaluated per band from
    global coordinates, so neighbouring bands agree at their shared edge.
    """
    def axis(coords: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        pos = (coords + 0.5) / ds - 0.5
        i0 = np.clip(np.floor(pos).astype(np.int64), 0, n - 2)
        return i0, np.clip(pos - i0, 0, 1).astype(np.float32)

    i0, ty = axis(np.arange(y0, y1), field.shape[0])
    j0, tx = axis(np.arange(width), field.shape[1])
    rows = field[i0] * (1 - ty)[:, None] + field[i0 + 1] * ty[:, None]
    return rows[:, j0] * (1 - tx) + rows[:, j0 + 1] * tx


def _tile_lookup(tile: np.ndarray, y0: int, y1: int, width: int) -> np.ndarray:
    """Rows ``y0:y1`` and columns ``0:width`` of the plane tiled with the periodic ``tile``."""
    t = tile.shape[0]
    return tile[np.arange(y0, y1) % t][:, np.arange(width) % t]


def _fibre_tile(rng: np.random.Generator, mpp: float, transpose: bool) -> np.ndarray:
    """Periodic texture of wavy collagen-like streaks (about 0.5 um thick, 6 um long), unit std, float32."""
    t = _TILE_PX
    sigma = (0.5 / mpp, 6.0 / mpp)
    streaks = ndi.gaussian_filter(rng.standard_normal((t, t)).astype(np.float32), sigma, mode="wrap")
    # A smooth periodic sideways shift makes straight streaks wave like fibres do.
    rows, cols = np.mgrid[0:t, 0:t].astype(np.float32)
    shift = np.zeros_like(rows)
    for _ in range(6):  # whole numbers of periods across the tile keep it periodic
        ky, kx = rng.integers(-3, 4, 2)
        shift += rng.normal(0, 0.4) * np.sin(2 * np.pi * (ky * rows + kx * cols) / t + rng.uniform(0, 2 * np.pi))
    wavy = ndi.map_coordinates(streaks, [rows + shift * (4.0 / mpp), cols], order=1, mode="grid-wrap")
    wavy = (wavy - wavy.mean()) / (wavy.std() + 1e-9)
    return np.ascontiguousarray(wavy.T if transpose else wavy, dtype=np.float32)


def _grain_tile(rng: np.random.Generator, mpp: float) -> np.ndarray:
    """Periodic fine isotropic texture (cytoplasm granularity, about 0.7 um), unit std, float32."""
    t = _GRAIN_TILE_PX
    g = ndi.gaussian_filter(rng.standard_normal((t, t)).astype(np.float32), 0.35 / mpp, mode="wrap")
    return (g - g.mean()) / (g.std() + 1e-9)


# ---------------------------------------------------------------------------------------------------------------
# Sprites: nuclei, mitotic figures, vacuoles
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _NucleusStyle:
    """How one kind of nucleus looks. Lengths in um; ``density`` is the haematoxylin concentration at the rim.

    Args:
        radius_um: range of the mean radius.
        elongation: range of the long/short axis ratio.
        irregularity: relative amplitude of outline wobble.
        density: peak haematoxylin concentration.
        vesicular: 0 = solid chromatin, 1 = pale centre with a dark rim (open chromatin).
        grain: relative amplitude of chromatin granularity.
        nucleoli: range (inclusive) of the number of nucleoli.
    """

    radius_um: tuple[float, float]
    elongation: tuple[float, float] = (1.0, 1.2)
    irregularity: float = 0.05
    density: float = 2.0
    vesicular: float = 0.0
    grain: float = 0.2
    nucleoli: tuple[int, int] = (0, 0)


_LYMPHOCYTE = _NucleusStyle(radius_um=(2.5, 3.2), elongation=(1.0, 1.2), irregularity=0.04, density=1.7,
                            vesicular=0.1, grain=0.2)
_HISTIOCYTE = _NucleusStyle(radius_um=(3.5, 5.0), elongation=(1.2, 1.8), irregularity=0.08, density=1.1,
                            vesicular=0.5, grain=0.3, nucleoli=(0, 1))
_FIBROBLAST = _NucleusStyle(radius_um=(2.6, 3.6), elongation=(3.0, 5.0), irregularity=0.05, density=1.7,
                            vesicular=0.0, grain=0.2)
_TUMOUR = _NucleusStyle(radius_um=(3.8, 6.5), elongation=(1.0, 1.5), irregularity=0.12, density=2.2,
                        vesicular=0.7, grain=0.45, nucleoli=(1, 2))
_EPITHELIUM = _NucleusStyle(radius_um=(2.6, 3.4), elongation=(1.1, 1.5), irregularity=0.04, density=1.6,
                            vesicular=0.3, grain=0.25)
_MYOEPITHELIUM = _NucleusStyle(radius_um=(2.2, 3.0), elongation=(2.5, 3.5), irregularity=0.03, density=1.9)
_HYPERCHROMATIC = _NucleusStyle(radius_um=(3.5, 5.0), elongation=(1.0, 1.3), irregularity=0.04, density=2.4,
                                vesicular=0.0, grain=0.1)
_APOPTOTIC = _NucleusStyle(radius_um=(1.8, 3.2), elongation=(1.0, 1.15), irregularity=0.02, density=2.8,
                           vesicular=0.0, grain=0.05)
_DEBRIS = _NucleusStyle(radius_um=(0.5, 1.6), elongation=(1.0, 2.0), irregularity=0.25, density=1.8)
_GHOST = _NucleusStyle(radius_um=(3.5, 6.0), elongation=(1.0, 1.4), irregularity=0.1, density=0.45,
                       vesicular=0.8, grain=0.5)


def _soft_disc(rho: np.ndarray, radius_px: float) -> np.ndarray:
    """Coverage of a shape whose normalised radius is ``rho`` (1 on the outline), with a ~1 px anti-aliased edge."""
    return np.clip(0.5 + (1.0 - rho) * radius_px, 0.0, 1.0)


def _nucleus_sprite(rng: np.random.Generator, style: _NucleusStyle, mpp: float,
                    angle: float | None = None) -> np.ndarray:
    """One nucleus as a float32 haematoxylin-concentration sprite (odd size, centred).

    Args:
        style: the nucleus kind.
        mpp: um per pixel of the image the sprite is stamped into.
        angle: long-axis direction in radians (random when None).
    """
    r = rng.uniform(*style.radius_um) / mpp
    aspect = rng.uniform(*style.elongation)
    a, b = r * math.sqrt(aspect), r / math.sqrt(aspect)
    half = int(math.ceil(a * (1 + 3 * style.irregularity))) + 2
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float32)
    angle = rng.uniform(0, np.pi) if angle is None else angle
    c, s = math.cos(angle), math.sin(angle)
    u, v = (c * xx + s * yy) / a, (-s * xx + c * yy) / b
    theta = np.arctan2(v, u)
    wobble = np.ones_like(theta)
    for k in range(2, 6):
        wobble += style.irregularity * rng.normal() / k ** 0.5 * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    rho = np.hypot(u, v) / np.maximum(wobble, 0.5)
    cover = _soft_disc(rho, b)
    rim = np.exp(-(((1.0 - rho) * b) / (0.7 / mpp)) ** 2)  # chromatin pushed to the nuclear membrane
    body = (1 - style.vesicular) + style.vesicular * (0.22 + 0.78 * rim)
    grain = ndi.gaussian_filter(rng.standard_normal(xx.shape).astype(np.float32), 0.3 / mpp)
    grain /= grain.std() + 1e-9
    conc = cover * style.density * body * np.clip(1 + style.grain * grain, 0.2, None)
    for _ in range(rng.integers(style.nucleoli[0], style.nucleoli[1] + 1)):
        # Nucleoli: small, very dense, away from the rim: the "visible nucleoli" of carcinoma cells.
        rn = rng.uniform(0.6, 1.1) / mpp
        pos = rng.uniform(-0.4, 0.4, 2) * np.array([a, b])
        px, py = c * pos[0] - s * pos[1], s * pos[0] + c * pos[1]
        conc += style.density * 0.9 * _soft_disc(np.hypot(xx - px, yy - py) / rn, rn) * cover
    return conc.astype(np.float32)


def _mitosis_sprite(rng: np.random.Generator, mpp: float) -> np.ndarray:
    """A mitotic figure (6-12 um): clumped, very dark chromatin with ragged edges, float32 sprite centred on it.

    Three forms: a metaphase plate (a bar of clumps), a prometaphase clump (an irregular ball) and an anaphase /
    telophase pair (two parallel bars, the centre of the sprite between them).
    """
    form = rng.choice(["metaphase", "clump", "anaphase"], p=[0.4, 0.3, 0.3])
    length_um = rng.uniform(6.0, 10.0)
    if form == "metaphase":
        centres = [(0.0, 0.0)]
        extent = (length_um / 2, rng.uniform(1.0, 1.6))
    elif form == "clump":
        centres = [(0.0, 0.0)]
        extent = (rng.uniform(2.5, 4.0), rng.uniform(2.5, 4.0))
    else:
        gap = rng.uniform(2.5, 4.0)
        centres = [(0.0, -gap), (0.0, gap)]
        extent = (length_um / 2 * 0.8, rng.uniform(0.9, 1.4))
    half = int(math.ceil(8.0 / mpp))
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float32)
    chromatin = np.zeros_like(xx)
    sigma = 0.55 / mpp
    for cx, cy in centres:
        n = rng.integers(10, 22)
        px = rng.uniform(-extent[0], extent[0], n) / mpp
        py = rng.normal(cy, extent[1] * 0.5, n) / mpp + rng.normal(0, 0.2, n) / mpp
        for x, y in zip(px, py):
            chromatin += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2))
    chromatin = ndi.gaussian_filter(chromatin, 0.2 / mpp)
    # Ragged, "hairy" outline: threshold the clump field with fine noise added.
    ragged = chromatin + 0.25 * ndi.gaussian_filter(rng.standard_normal(xx.shape).astype(np.float32), 0.25 / mpp)
    cover = np.clip((ragged - 0.45) * 4.0, 0, 1)
    angle = rng.uniform(0, 180)
    return np.clip(ndi.rotate(cover * 2.9, angle, reshape=False, order=1), 0, None).astype(np.float32)


def _halo_sprite(rng: np.random.Generator, radius_um: tuple[float, float], amount: tuple[float, float],
                 mpp: float) -> np.ndarray:
    """A soft disc of extra eosin (cytoplasm of one cell), float32 sprite."""
    r = rng.uniform(*radius_um) / mpp
    half = int(math.ceil(r)) + 2
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float32)
    rho = np.hypot(xx, yy) / r
    return (rng.uniform(*amount) * _soft_disc(rho, r / 3)).astype(np.float32)


def _vacuole_sprite(rng: np.random.Generator, radius_px: float, aspect: float = 1.15,
                    irregularity: float = 0.06) -> np.ndarray:
    """Coverage (0..1) of an empty space (fat vacuole, lumen), float32 sprite; stamped as "remove the stain"."""
    aspect = rng.uniform(1.0, aspect)
    a, b = radius_px * math.sqrt(aspect), radius_px / math.sqrt(aspect)
    half = int(math.ceil(a * (1 + 3 * irregularity))) + 2
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    c, s = math.cos(angle), math.sin(angle)
    u, v = (c * xx + s * yy) / a, (-s * xx + c * yy) / b
    theta = np.arctan2(v, u)
    wobble = np.ones_like(theta)
    for k in range(2, 6):
        wobble += irregularity * rng.normal() / k * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return _soft_disc(np.hypot(u, v) / wobble, b / 1.5).astype(np.float32)


_FAT_UM = 70.0  # adipocyte spacing


def _fat_sprites(rng: np.random.Generator, mpp: float) -> list[np.ndarray]:
    """Adipocyte vacuoles sized to nearly touch on a ``_FAT_UM`` grid, leaving thin septa (some merge, as in
    sectioned fat)."""
    return [_vacuole_sprite(rng, rng.uniform(0.5, 0.62) * _FAT_UM / mpp) for _ in range(24)]


@dataclass
class _Stamps:
    """Sprites max-composited at level-0 positions; sorted by y so a band finds its stamps by bisection.

    Args:
        xy: int64 (N, 2) level-0 (x, y) of each sprite centre.
        index: int64 (N,) which sprite.
        sprites: float32 odd-sized sprites, centred.
    """

    xy: np.ndarray
    index: np.ndarray
    sprites: list[np.ndarray]

    def __post_init__(self) -> None:
        order = np.argsort(self.xy[:, 1], kind="stable")
        self.xy = np.round(self.xy[order]).astype(np.int64)
        self.index = np.asarray(self.index, np.int64)[order]
        self.margin = max((s.shape[0] // 2 for s in self.sprites), default=0)

    def stamp(self, dst: np.ndarray, y0: int) -> None:
        """Max-composite every sprite that touches rows ``y0 : y0 + dst.shape[0]`` into ``dst``, in place."""
        h, w = dst.shape
        lo, hi = np.searchsorted(self.xy[:, 1], [y0 - self.margin, y0 + h + self.margin])
        for (x, y), k in zip(self.xy[lo:hi].tolist(), self.index[lo:hi].tolist()):
            sprite = self.sprites[k]
            half = sprite.shape[0] // 2
            r0, c0 = y - y0 - half, x - half
            r1, c1 = r0 + sprite.shape[0], c0 + sprite.shape[1]
            rr0, cc0, rr1, cc1 = max(r0, 0), max(c0, 0), min(r1, h), min(c1, w)
            if rr1 <= rr0 or cc1 <= cc0:
                continue
            view = dst[rr0:rr1, cc0:cc1]
            np.maximum(view, sprite[rr0 - r0:rr1 - r0, cc0 - c0:cc1 - c0], out=view)


def _stamps_of(rng: np.random.Generator, xy: np.ndarray, sprites: list[np.ndarray]) -> _Stamps:
    """Stamps at ``xy`` each with a random sprite of ``sprites``."""
    return _Stamps(xy.reshape(-1, 2), rng.integers(0, len(sprites), len(xy)), sprites)


# ---------------------------------------------------------------------------------------------------------------
# Scene: everything a band needs, and the band renderer
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tissue:
    """Base stain of one region label. Concentrations are haematoxylin / eosin before the slide's stain factors.

    Args:
        h: background haematoxylin.
        e: eosin.
        fibre: how much the eosin follows the collagen streak texture (0..1).
        grain: relative eosin granularity.
        glass: True where there is no tissue (nuclei and textures are not drawn).
    """

    h: float
    e: float
    fibre: float = 0.1
    grain: float = 0.15
    glass: bool = False


_GLASS = _Tissue(0.0, 0.0, 0.0, 0.0, glass=True)


@dataclass
class _Scene:
    """Global geometry of one image; :meth:`render` turns any band of rows into RGB.

    Args:
        shape_hw: image (H, W) in level-0 px.
        regions: polygons painted in order (later wins) onto label 0; ``group`` names a key of ``label_ids``.
        label_ids: region name -> label index into ``tissues``.
        tissues: base stain per label (index 0 is whatever lies under every polygon, usually glass).
        nested: label whose sheets are split into nests by thin septa of ``septa_label`` texture, or None.
        septa_label: label whose stain the septa take.
        nuclei, halos, voids: stamps of haematoxylin, extra eosin, and empty space (fat, lumens).
        fields: smooth fields on the coarse grid (``_COARSE_DS`` px): "stain_h", "stain_e", "fibre_dir", "septa".
        tiles: periodic textures "fibre_a", "fibre_b", "grain".
        stain_h, stain_e: this slide's RGB optical density per unit haematoxylin / eosin.
        septa_width: |septa field| below which a pixel of the nested label is septum.
    """

    shape_hw: tuple[int, int]
    regions: list[Annotation]
    label_ids: dict[str, int]
    tissues: list[_Tissue]
    nested: int | None
    septa_label: int
    nuclei: list[_Stamps]
    halos: list[_Stamps]
    voids: list[_Stamps]
    fields: dict[str, np.ndarray]
    tiles: dict[str, np.ndarray]
    stain_h: np.ndarray
    stain_e: np.ndarray
    septa_width: float = 0.09

    def labels(self, y0: int, y1: int) -> np.ndarray:
        """uint8 region labels of level-0 rows ``y0:y1`` (pixel centres, as :func:`rasterize` decides)."""
        return rasterize(self.regions, (y1 - y0, self.shape_hw[1]), 1.0, label_of=self.label_ids,
                         exclude_groups=(), origin_xy=(0, y0))

    def render(self, y0: int, y1: int) -> np.ndarray:
        """RGB uint8 (y1 - y0, W, 3) of level-0 rows ``y0:y1``."""
        width = self.shape_hw[1]
        lab = self.labels(y0, y1)
        table = np.array([[t.h, t.e, t.fibre, t.grain, float(not t.glass)] for t in self.tissues], np.float32)
        h0, e0, fib_amp, grain_amp, tissue = (table[:, k][lab] for k in range(5))
        fibre_w = _upsample(self.fields["fibre_dir"], _COARSE_DS, y0, y1, width)
        fibre = (_tile_lookup(self.tiles["fibre_a"], y0, y1, width) * np.clip(fibre_w + 0.5, 0, 1)
                 + _tile_lookup(self.tiles["fibre_b"], y0, y1, width) * np.clip(0.5 - fibre_w, 0, 1))
        grain = _tile_lookup(self.tiles["grain"], y0, y1, width)
        if self.nested is not None and (lab == self.nested).any():
            # Thin fibrous septa split carcinoma sheets into nests: where the septa field crosses zero.
            septa = _upsample(self.fields["septa"], _COARSE_DS, y0, y1, width)
            w = np.clip(1.6 - np.abs(septa) / self.septa_width, 0, 1) * (lab == self.nested)
            base = self.tissues[self.septa_label]
            h0 += w * (base.h - h0)
            e0 += w * (base.e - e0)
            fib_amp += w * (base.fibre - fib_amp)
        cE = e0 * (1 + fib_amp * np.clip(fibre, -2, 2) * 0.5) * (1 + grain_amp * grain)
        cH = h0 * (1 + 0.5 * grain_amp * grain)
        empty = np.zeros_like(cH)
        for voids in self.voids:
            voids.stamp(empty, y0)
        keep = 1 - empty
        cH *= keep
        cE *= keep
        extra = np.zeros_like(cH)
        for halos in self.halos:
            halos.stamp(extra, y0)
        cE += extra * tissue
        extra[:] = 0
        for nuclei in self.nuclei:
            nuclei.stamp(extra, y0)
        cH += extra * tissue
        cH *= _upsample(self.fields["stain_h"], _COARSE_DS, y0, y1, width)
        cE *= _upsample(self.fields["stain_e"], _COARSE_DS, y0, y1, width)
        rgb = np.empty((y1 - y0, width, 3), np.uint8)
        for ch in range(3):
            od = cH * self.stain_h[ch] + cE * self.stain_e[ch] + _GLASS_OD[ch]
            rgb[..., ch] = np.clip(255.0 * np.exp(-od) + 0.5, 0, 255)
        return rgb


class _BandSource:
    """Lazy (H, W, 3) uint8 image for :func:`write_pyramid_tiff`: renders fixed bands of ``_BAND_PX`` rows.

    The next band is rendered on a worker thread while the writer compresses the current one (numpy releases the
    GIL), which nearly halves the wall time on two cores. Bands are fixed, so the pixels do not depend on how the
    caller slices.
    """

    dtype = np.dtype(np.uint8)

    def __init__(self, scene: _Scene, desc: str) -> None:
        self.scene = scene
        self.shape = (*scene.shape_hw, 3)
        self._n_bands = math.ceil(scene.shape_hw[0] / _BAND_PX)
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._futures: dict[int, Future[np.ndarray]] = {}
        self._lock = threading.Lock()
        self._bar = progress(total=self._n_bands, desc=desc, unit="band")

    def _band(self, k: int) -> np.ndarray:
        with self._lock:
            for j in (k, k + 1):
                if j < self._n_bands and j not in self._futures:
                    y0 = j * _BAND_PX
                    self._futures[j] = self._pool.submit(self.scene.render, y0,
                                                         min(y0 + _BAND_PX, self.scene.shape_hw[0]))
            for j in [j for j in self._futures if j < k - 1]:
                del self._futures[j]
        band = self._futures[k].result()
        self._bar.update(1)
        return band

    def __getitem__(self, rows: slice) -> np.ndarray:
        y0, y1, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError(f"band rows must be contiguous, got step {step}")
        parts = []
        for k in range(y0 // _BAND_PX, (max(y1, y0 + 1) - 1) // _BAND_PX + 1):
            b0 = k * _BAND_PX
            parts.append(self._band(k)[max(y0, b0) - b0:min(y1, b0 + _BAND_PX) - b0])
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._futures.clear()
        self._bar.close()


def _write_slide(path: Path, scene: Any, mpp: float, downsample_step: int, description: dict[str, Any],
                 level_rounding: str = "ceil") -> None:
    """Render ``scene`` (anything with ``shape_hw`` and ``render(y0, y1)``) into a pyramidal JPEG TIFF (tiles 256,
    quality 90)."""
    source = _BandSource(scene, path.name)
    try:
        write_pyramid_tiff(path, source, mpp=mpp, tile_px=256, compression="jpeg", quality=90,
                           downsample_step=downsample_step, level_rounding=level_rounding, description=description)
    finally:
        source.close()


def _slide_stain(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-slide stain vectors: strength and hue vary between slides as they do between labs and staining runs.

    The strength range is wide on purpose: it makes mean colour a poor tumour/normal feature, so a model has to
    use nuclear size and texture.
    """
    h = _H_OD * rng.uniform(0.5, 1.5) * (1 + rng.normal(0, 0.06, 3))
    e = _E_OD * rng.uniform(0.45, 1.5) * (1 + rng.normal(0, 0.08, 3))
    return h.astype(np.float32), np.clip(e, 0.02, None).astype(np.float32)


def _common_fields(rng: np.random.Generator, shape_hw: tuple[int, int], mpp: float) -> tuple[dict, dict]:
    """Coarse fields and texture tiles every scene uses (stain drift across the slide, fibre direction, septa)."""
    coarse = (math.ceil(shape_hw[0] / _COARSE_DS) + 1, math.ceil(shape_hw[1] / _COARSE_DS) + 1)
    drift = 1500.0 / _COARSE_DS  # stain drifts over ~1500 level-0 px (0.75 mm at 0.5 um/px)
    fields = {
        "stain_h": 1 + 0.12 * _smooth_field(rng, coarse, drift),
        "stain_e": 1 + 0.12 * _smooth_field(rng, coarse, drift),
        "fibre_dir": _smooth_field(rng, coarse, 300.0 / _COARSE_DS),
        # Nest size ~ 60-120 um whatever the mpp: the septa field scale is set in um.
        "septa": _smooth_field(rng, coarse, 45.0 / mpp / _COARSE_DS),
    }
    tiles = {"fibre_a": _fibre_tile(rng, mpp, False), "fibre_b": _fibre_tile(rng, mpp, True),
             "grain": _grain_tile(rng, mpp)}
    return fields, tiles


def _sprites(rng: np.random.Generator, style: _NucleusStyle, mpp: float, n: int = 48) -> list[np.ndarray]:
    return [_nucleus_sprite(rng, style, mpp) for _ in range(n)]


def _seed_points(rng: np.random.Generator, shape_hw: tuple[int, int], spacing_um: float, mpp: float,
                 label_map: np.ndarray, label_ds: float, keep_prob: dict[int, float],
                 jitter: float = 0.4) -> np.ndarray:
    """Nucleus centres: a jittered grid thinned by a per-region keep probability (looked up on ``label_map``)."""
    xy = _jittered_grid(rng, shape_hw, spacing_um / mpp, jitter)
    prob = np.zeros(256, np.float64)
    for label, p in keep_prob.items():
        prob[label] = p
    keep = rng.random(len(xy)) < prob[_lookup(label_map, label_ds, xy)]
    return xy[keep]


def _septa_mask(scene_fields: dict[str, np.ndarray], xy: np.ndarray, width: float) -> np.ndarray:
    """True for points on a septum (no carcinoma cell there), a little wider than the drawn septum."""
    return np.abs(_lookup(scene_fields["septa"], _COARSE_DS, xy)) < width * 1.1


def _rng(seed: int, kind: str, index: int) -> np.random.Generator:
    """Independent stream per (seed, dataset kind, image index): adding images never changes earlier ones."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), sum(map(ord, kind)), int(index)]))


# ---------------------------------------------------------------------------------------------------------------
# Metastasis (Camelyon16-style) slides
# ---------------------------------------------------------------------------------------------------------------

# Region labels of a lymph-node slide; 0 = glass.
_LN = {"capsule": 3, "cortex": 1, "sinus": 2, "trabecula": 3, "fat": 4, "tumour": 5, "exclusion": 1}
_LN_TISSUES = [_GLASS,
               _Tissue(h=0.12, e=0.22, fibre=0.1, grain=0.2),   # 1 lymphoid parenchyma: scant cytoplasm
               _Tissue(h=0.07, e=0.30, fibre=0.35, grain=0.3),  # 2 sinus: pale, loose
               _Tissue(h=0.05, e=0.62, fibre=0.8, grain=0.15),  # 3 capsule / trabecular stroma
               _Tissue(h=0.03, e=0.30, fibre=0.2, grain=0.1),   # 4 fat (septa between vacuoles)
               _Tissue(h=0.22, e=0.40, fibre=0.1, grain=0.35)]  # 5 carcinoma: eosinophilic cytoplasm
# Tissue layouts as (centre x, centre y, semi-axis x, semi-axis y) in fractions of the slide; the first blob is
# the largest and is where a macro-metastasis goes.
_LAYOUTS = [[(0.5, 0.5, 0.40, 0.42)],
            [(0.37, 0.5, 0.32, 0.42), (0.84, 0.5, 0.12, 0.30)],
            [(0.30, 0.5, 0.25, 0.42), (0.76, 0.28, 0.19, 0.20), (0.76, 0.74, 0.19, 0.20)]]
# Lesion longest diameters in level-0 px on an 8192-px slide at 0.5 um/px (macro and micro scale with the slide;
# ITC never does, so it stays an ITC on small test slides).
_MACRO_PX, _MICRO_PX, _ITC_PX = (4500.0, 5200.0), (650.0, 2800.0), (90.0, 330.0)


@dataclass
class _SlidePlan:
    """Geometry of one metastasis slide: the scene plus what the annotation files and datalist need."""

    scene: _Scene
    tissue: list[Annotation]
    tumour: list[Annotation]
    lesions: list[dict[str, Any]]


def _place(rng: np.random.Generator, inside_of: np.ndarray, avoid: list[tuple[np.ndarray, float]],
           diameter_px: float, bounds_xy: np.ndarray, tries: int = 400) -> np.ndarray | None:
    """Rejection-sample a lesion outline fully inside ``inside_of``, clear of the ``avoid`` (centre, radius) discs.

    A new outline is drawn every 50 tries, 10 % smaller every 100 tries, so that small tissue still gets its
    lesion.
    """
    for attempt in range(tries):
        if attempt % 50 == 0:
            shape = _lesion_outline(rng, np.zeros(2), diameter_px * 0.9 ** (attempt // 100))
            radius = float(np.hypot(*shape.T).max())
        centre = rng.uniform(bounds_xy[0], bounds_xy[1])
        if any(np.hypot(*(centre - c)) < radius + r + 30 for c, r in avoid):
            continue
        xy = shape + centre
        if _inside(_inset(xy, -40), inside_of).all():
            return xy
    return None


def _lesion_outline(rng: np.random.Generator, centre: np.ndarray, diameter_px: float) -> np.ndarray:
    """Irregular lesion outline with the given longest diameter (level-0 px)."""
    aspect = rng.uniform(1.0, 1.5)
    xy = _blob(rng, (0.0, 0.0), (aspect, 1.0), lobes=0.16, n_vertices=192)
    return centre + xy * (diameter_px / _feret_px(xy))


def _plan_metastasis_slide(rng: np.random.Generator, size_wh: tuple[int, int], mpp: float,
                           tumour: bool) -> _SlidePlan:
    """Tissue, compartments, lesions and nuclei of one lymph-node slide (nothing rendered yet)."""
    width, height = size_wh
    scale = min(width, height) / 8192.0
    layout = _LAYOUTS[rng.choice(2, p=[0.75, 0.25]) if tumour else rng.integers(0, 3)]
    tissue_xy = []
    for cx, cy, ax, ay in layout:
        centre = ((cx + rng.uniform(-0.02, 0.02)) * width, (cy + rng.uniform(-0.02, 0.02)) * height)
        radii = (ax * width * rng.uniform(0.88, 1.0), ay * height * rng.uniform(0.88, 1.0))
        tissue_xy.append(_blob(rng, centre, radii, lobes=0.07, angle=rng.uniform(-0.15, 0.15)))
    capsule_px = rng.uniform(30, 60) / mpp
    cortex_xy = [_inset(xy, capsule_px) for xy in tissue_xy]

    def region(name: str, xy: np.ndarray) -> Annotation:
        return Annotation(name=name, group=name, kind="polygon", label=name, xy=xy)

    regions = [region("capsule", xy) for xy in tissue_xy] + [region("cortex", xy) for xy in cortex_xy]
    area_frac = width * height / 8192.0 ** 2
    for k, outline in enumerate(cortex_xy):
        lo, hi = outline.min(0), outline.max(0)
        share = max(1, round(area_frac * (6 if k == 0 else 2)))
        for name, count, radii_um, lobes in (("sinus", share * 2, ((80, 350), (30, 90)), 0.2),
                                             ("trabecula", share, ((200, 600), (12, 25)), 0.1),
                                             ("fat", rng.integers(0, 2) * max(1, share // 2), ((150, 450),
                                                                                               (120, 300)), 0.12)):
            for _ in range(count):
                radii = (rng.uniform(*radii_um[0]) / mpp, rng.uniform(*radii_um[1]) / mpp)
                for _ in range(50):
                    xy = _blob(rng, rng.uniform(lo, hi), radii, lobes=lobes, n_vertices=96)
                    if _inside(xy, outline).all():
                        regions.append(region(name, xy))
                        break

    tumour_ann: list[Annotation] = []
    lesions: list[dict[str, Any]] = []
    if tumour:
        main = cortex_xy[0]
        bounds = np.array([main.min(0), main.max(0)])
        avoid: list[tuple[np.ndarray, float]] = []
        # On small slides the macro-lesion may not exceed half the main blob, or nothing else would fit.
        room = float((main.max(0) - main.min(0)).min())
        sizes = ([min(rng.uniform(*_MACRO_PX) * scale, 0.8 * room)]
                 + [min(rng.uniform(*_MICRO_PX) * scale, 0.25 * room) for _ in range(rng.integers(1, 3))]
                 + [rng.uniform(*_ITC_PX) for _ in range(rng.integers(1, 4))])
        for k, diameter in enumerate(sizes):
            target = cortex_xy[0] if k == 0 else cortex_xy[rng.integers(0, len(cortex_xy))]
            xy = _place(rng, target, avoid, diameter,
                        np.array([target.min(0), target.max(0)]) if k else bounds)
            if xy is None:
                continue
            centre = xy.mean(0)
            avoid.append((centre, float(np.hypot(*(xy - centre).T).max())))
            diameter_um = _feret_px(xy) * mpp
            tumour_ann.append(Annotation(name=f"Annotation {len(tumour_ann)}", group="_0", kind="polygon",
                                         label="Tumor", xy=xy))
            lesions.append({"kind": lesion_kind(diameter_um), "center_xy": [round(float(v), 1) for v in centre],
                            "diameter_um": round(diameter_um, 1)})
        regions += [region("tumour", a.xy) for a in tumour_ann]
        macro = tumour_ann[0].xy if tumour_ann else None
        if macro is not None and lesions[0]["kind"] == "macro" and rng.random() < 0.5:
            # A patch of normal node inside the macro-metastasis, annotated as a Camelyon16 exclusion ("_2").
            centre = macro.mean(0)
            for _ in range(100):
                c = centre + rng.normal(0, 0.12, 2) * _feret_px(macro)
                xy = _lesion_outline(rng, c, _feret_px(macro) * rng.uniform(0.1, 0.18))
                if _inside(_inset(xy, -40), macro).all():
                    tumour_ann.append(Annotation(name=f"Annotation {len(tumour_ann)}", group="_2",
                                                 kind="polygon", label="Exclusion", xy=xy))
                    regions.append(region("exclusion", xy))
                    break

    scene = _lymph_node_scene(rng, (height, width), mpp, regions)
    return _SlidePlan(scene=scene, tissue=[region("capsule", xy) for xy in tissue_xy], tumour=tumour_ann,
                      lesions=lesions)


def _lymph_node_scene(rng: np.random.Generator, shape_hw: tuple[int, int], mpp: float,
                      regions: list[Annotation]) -> _Scene:
    """Nuclei, vacuoles and fields of a lymph-node slide whose regions are already laid out."""
    fields, tiles = _common_fields(rng, shape_hw, mpp)
    label_ds = 4.0
    label_map = rasterize(regions, (math.ceil(shape_hw[0] / label_ds), math.ceil(shape_hw[1] / label_ds)),
                          label_ds, label_of=_LN, exclude_groups=())
    # Dense small lymphocytes everywhere in the node, sparse in sinuses and stroma, a few inside carcinoma.
    lymph = _seed_points(rng, shape_hw, 6.0, mpp, label_map, label_ds, {1: 0.93, 2: 0.22, 3: 0.04, 5: 0.03})
    density = _lookup(_smooth_field(rng, label_map.shape, 400 / label_ds), label_ds, lymph)
    lymph = lymph[density > -1.3]  # paler patches in the parenchyma
    histio = _seed_points(rng, shape_hw, 16.0, mpp, label_map, label_ds, {2: 0.45, 1: 0.04})
    fibro = _seed_points(rng, shape_hw, 14.0, mpp, label_map, label_ds, {3: 0.35, 4: 0.02})
    tumour = _seed_points(rng, shape_hw, 14.0, mpp, label_map, label_ds, {5: 0.96})
    septa_width = 0.09
    tumour = tumour[~_septa_mask(fields, tumour, septa_width)]
    fat = _seed_points(rng, shape_hw, _FAT_UM, mpp, label_map, label_ds, {4: 1.0}, jitter=0.3)
    fat_sprites = _fat_sprites(rng, mpp)
    return _Scene(
        shape_hw=shape_hw, regions=regions, label_ids=_LN, tissues=_LN_TISSUES, nested=5, septa_label=3,
        nuclei=[_stamps_of(rng, lymph, _sprites(rng, _LYMPHOCYTE, mpp)),
                _stamps_of(rng, histio, _sprites(rng, _HISTIOCYTE, mpp)),
                _stamps_of(rng, fibro, _sprites(rng, _FIBROBLAST, mpp)),
                _stamps_of(rng, tumour, _sprites(rng, _TUMOUR, mpp, 96))],
        halos=[_stamps_of(rng, tumour, [_halo_sprite(rng, (6.5, 8.5), (0.0, 0.2), mpp) for _ in range(24)])],
        voids=[_stamps_of(rng, fat, fat_sprites)],
        fields=fields, tiles=tiles, septa_width=septa_width, **dict(zip(("stain_h", "stain_e"), _slide_stain(rng))))


def make_metastasis_dataset(outdir: str | os.PathLike, n: int = 4, seed: int = 0,
                            size_px: int | tuple[int, int] = (8192, 8192), mpp: float = 0.5,
                            downsample_step: int = 4) -> Path:
    """Write ``n`` Camelyon16-style phantom slides (even index = tumour, odd = normal) and ``dataset.json``.

    Per slide: ``phantom_{tumor|normal}_{i:03d}.tif`` (pyramidal JPEG TIFF, tiles 256, downsample step 4 like an
    Aperio SVS), ``tissue/<name>.png`` (tissue mask) and, for tumour slides, ``annotations/<name>.xml`` (ASAP XML,
    group "_0" tumour, "_2" exclusion) and ``masks/<name>.png`` (0/255, both at downsample 16, rasterised from
    the XML polygons).

    Args:
        outdir: output folder (created).
        n: number of slides.
        seed: random seed; the same seed gives byte-identical files.
        size_px: slide (width, height) in level-0 px, or one int for a square. Macro and micro lesion sizes scale
            with ``min(size) / 8192``; ITCs keep their size (< 400 px).
        mpp: level-0 resolution, um/px (0.243 for Radboud's scanner, 0.226 for Utrecht's).
        downsample_step: pyramid step (4 like an Aperio SVS; 2 like NDPI, MRXS or DICOM).

    Returns:
        Path of ``dataset.json``.
    """
    out = Path(outdir)
    width, height = (size_px, size_px) if isinstance(size_px, int) else (int(size_px[0]), int(size_px[1]))
    mask_ds = 16
    mask_hw = (math.ceil(height / mask_ds), math.ceil(width / mask_ds))
    items = []
    for i in logged_steps(range(n), "phantom metastasis slides"):
        tumour = i % 2 == 0
        name = f"phantom_{'tumor' if tumour else 'normal'}_{i:03d}"
        plan = _plan_metastasis_slide(_rng(seed, "metastasis", i), (width, height), mpp, tumour)
        _write_slide(out / f"{name}.tif", plan.scene, mpp, downsample_step,
                     {"phantom": "metastasis", "seed": seed, "label": int(tumour)})
        _write_png(out / "tissue" / f"{name}.png", rasterize(plan.tissue, mask_hw, mask_ds) * np.uint8(255))
        item: dict[str, Any] = {"image": f"{name}.tif", "label": int(tumour), "annotation": None, "mask": None,
                                "tissue": f"tissue/{name}.png", "lesions": plan.lesions}
        if tumour:
            write_asap_xml(out / "annotations" / f"{name}.xml", plan.tumour)
            _write_png(out / "masks" / f"{name}.png", rasterize(plan.tumour, mask_hw, mask_ds) * np.uint8(255))
            item.update(annotation=f"annotations/{name}.xml", mask=f"masks/{name}.png")
        items.append(item)
    return _write_datalist(out, {"kind": "metastasis", "seed": seed, "level0_mpp": mpp, "mask_downsample": mask_ds,
                                 "size_px": [width, height], "items": items})


# ---------------------------------------------------------------------------------------------------------------
# Mitosis high-power fields
# ---------------------------------------------------------------------------------------------------------------

_HPF = {"carcinoma": 1, "stroma": 2}
_HPF_TISSUES = [_Tissue(h=0.10, e=0.55, fibre=0.1, grain=0.35),  # 0 carcinoma sheet (under everything)
                _Tissue(h=0.10, e=0.55, fibre=0.1, grain=0.35),
                _Tissue(h=0.05, e=0.70, fibre=0.8, grain=0.15)]


def _mitosis_scene(rng: np.random.Generator, size_px: int, mpp: float,
                   n_mitoses: int) -> tuple[_Scene, np.ndarray]:
    """A carcinoma field with ``n_mitoses`` mitotic figures and a few dark mimics; returns (scene, centroids xy)."""
    shape_hw = (size_px, size_px)
    fields, tiles = _common_fields(rng, shape_hw, mpp)
    regions = []
    if rng.random() < 0.6:
        # A stroma band crossing the field, as between carcinoma nests in a real HPF.
        c = rng.uniform(0.2, 0.8, 2) * size_px
        xy = _blob(rng, c, (size_px * 0.9, rng.uniform(8, 25) / mpp), lobes=0.05)
        regions.append(Annotation(name="stroma", group="stroma", kind="polygon", label="stroma", xy=xy))
    label_map = rasterize(regions, shape_hw, 1.0, label_of=_HPF, exclude_groups=())
    septa_width = 0.09
    cells = _seed_points(rng, shape_hw, 13.0, mpp, label_map, 1.0, {0: 0.95, 2: 0.0})
    cells = cells[~_septa_mask(fields, cells, septa_width)]
    fibro = _seed_points(rng, shape_hw, 14.0, mpp, label_map, 1.0, {2: 0.35})
    # Mitoses and mimics replace carcinoma nuclei, at least 20 um apart so each figure is counted once.
    order = rng.permutation(len(cells))
    chosen: list[int] = []
    n_mimics = int(rng.integers(2, 7))
    for k in order:
        if len(chosen) == n_mitoses + n_mimics:
            break
        if all(np.hypot(*(cells[k] - cells[j])) > 20.0 / mpp for j in chosen):
            chosen.append(int(k))
    mitoses, mimics = cells[chosen[:n_mitoses]], cells[chosen[n_mitoses:]]
    special = cells[chosen]
    near = np.zeros(len(cells), bool)
    for xy in special:
        near |= np.hypot(*(cells - xy).T) < 9.0 / mpp
    normal = cells[~near]
    mimic_sprites = ([_nucleus_sprite(rng, _APOPTOTIC, mpp) for _ in range(8)]
                     + [_nucleus_sprite(rng, _HYPERCHROMATIC, mpp) for _ in range(8)])
    scene = _Scene(
        shape_hw=shape_hw, regions=regions, label_ids=_HPF, tissues=_HPF_TISSUES, nested=0, septa_label=2,
        nuclei=[_stamps_of(rng, normal, _sprites(rng, _TUMOUR, mpp, 64)),
                _stamps_of(rng, fibro, _sprites(rng, _FIBROBLAST, mpp)),
                _stamps_of(rng, mitoses, [_mitosis_sprite(rng, mpp) for _ in range(max(n_mitoses, 1))]),
                _stamps_of(rng, mimics, mimic_sprites)],
        halos=[_stamps_of(rng, normal, [_halo_sprite(rng, (6.5, 8.5), (0.0, 0.2), mpp) for _ in range(24)]),
               # Mitotic cells round up with clear-to-pink cytoplasm; apoptotic bodies sit in eosinophilic halos.
               _stamps_of(rng, np.vstack([mitoses, mimics]),
                          [_halo_sprite(rng, (6.0, 8.5), (0.2, 0.5), mpp) for _ in range(8)])],
        voids=[], fields=fields, tiles=tiles, septa_width=septa_width,
        **dict(zip(("stain_h", "stain_e"), _slide_stain(rng))))
    # The stamps round centres to whole pixels; the centroids are those pixels.
    return scene, np.round(mitoses).astype(np.float64).reshape(-1, 2)


def make_mitosis_dataset(outdir: str | os.PathLike, n: int = 8, seed: int = 0, size_px: int = 1000,
                         mpp: float = 0.25) -> Path:
    """Write ``n`` phantom high-power fields with mitotic figures and ``dataset.json``.

    Per image: ``images/phantom_hpf_{i:03d}.png`` (RGB, ``size_px`` square) and ``centroids/<name>.csv``
    (header-less ``x,y`` rows, image pixels). Each image has 0-6 mitoses (the last image none if no other has
    none) and 2-6 dark mimics (apoptotic bodies, hyperchromatic nuclei) that are not in the CSV.

    Args:
        outdir: output folder (created).
        n: number of images.
        seed: random seed; the same seed gives byte-identical files.
        size_px: image side, px.
        mpp: um/px (0.25 = 40x, as in MITOS/AMIDA/TUPAC).

    Returns:
        Path of ``dataset.json``.
    """
    out = Path(outdir)
    counts = _rng(seed, "mitosis-counts", 0).integers(0, 7, n)
    if n and not (counts == 0).any():
        counts[-1] = 0
    items = []
    for i in logged_steps(range(n), "phantom mitosis HPFs", unit="image"):
        name = f"phantom_hpf_{i:03d}"
        scene, centroids = _mitosis_scene(_rng(seed, "mitosis", i), size_px, mpp, int(counts[i]))
        _write_png(out / "images" / f"{name}.png", scene.render(0, size_px))
        write_points_csv(out / "centroids" / f"{name}.csv", centroids, order="xy")
        items.append({"image": f"images/{name}.png", "centroids": f"centroids/{name}.csv",
                      "n_mitoses": int(len(centroids))})
    return _write_datalist(out, {"kind": "mitosis", "seed": seed, "level0_mpp": mpp, "size_px": size_px,
                                 "items": items})


# ---------------------------------------------------------------------------------------------------------------
# Multi-class tissue slides
# ---------------------------------------------------------------------------------------------------------------

_MC = {"stroma": 3, "adipose": 5, "carcinoma": 1, "necrosis": 4, "benign epithelium": 2}
_MC_TISSUES = [_GLASS,
               _Tissue(h=0.10, e=0.60, fibre=0.1, grain=0.35),  # 1 carcinoma
               _Tissue(h=0.08, e=0.42, fibre=0.05, grain=0.2),  # 2 benign epithelium (cytoplasm)
               _Tissue(h=0.05, e=0.66, fibre=0.85, grain=0.15),  # 3 stroma
               _Tissue(h=0.12, e=0.48, fibre=0.0, grain=0.6),   # 4 necrosis: pale, granular
               _Tissue(h=0.03, e=0.40, fibre=0.2, grain=0.1),   # 5 adipose
               _GLASS]                                          # 6 background


def _plan_multiclass_slide(rng: np.random.Generator, size_wh: tuple[int, int],
                           mpp: float) -> tuple[_Scene, list[Annotation]]:
    """Regions and nuclei of one multi-class slide; returns the scene and its region polygons (painting order)."""
    width, height = size_wh
    layout = _LAYOUTS[rng.integers(0, 2)]
    tissue = [_blob(rng, ((cx + rng.uniform(-0.02, 0.02)) * width, (cy + rng.uniform(-0.02, 0.02)) * height),
                    (ax * 1.1 * width, ay * 1.05 * height), lobes=0.08, angle=rng.uniform(-0.15, 0.15))
              for cx, cy, ax, ay in layout]
    regions = [Annotation(name="stroma", group="stroma", kind="polygon", label="stroma", xy=xy) for xy in tissue]
    avoid: list[tuple[np.ndarray, float]] = []
    um = 1.0 / mpp
    area_frac = width * height / 4096.0 ** 2
    scale = min(1.0, min(width, height) / 4096.0)  # region sizes shrink on small (test) slides; cells do not

    def add(name: str, diameter_um: tuple[float, float], count: int, lobes: float, inside: Sequence[np.ndarray],
            gap_px: float = 40.0) -> list[np.ndarray]:
        placed = []
        for _ in range(count):
            for attempt in range(100):
                outline = inside[rng.integers(0, len(inside))]
                centre = rng.uniform(outline.min(0), outline.max(0))
                d = rng.uniform(*diameter_um) * um * scale * 0.98 ** attempt
                xy = _blob(rng, centre, (d / 2 * rng.uniform(1, 1.4), d / 2), lobes=lobes, n_vertices=128)
                radius = float(np.hypot(*(xy - centre).T).max())
                if (all(np.hypot(*(centre - c)) > radius + r + gap_px for c, r in avoid)
                        and _inside(_inset(xy, -30), outline).all()):
                    avoid.append((centre, radius))
                    placed.append(xy)
                    regions.append(Annotation(name=name, group=name, kind="polygon", label=name, xy=xy))
                    break
        return placed

    scale_count = max(1, round(area_frac))
    carcinoma = add("carcinoma", (500, 1300), int(rng.integers(1, 3)) * scale_count, 0.2, tissue)
    add("adipose", (300, 800), int(rng.integers(1, 3)) * scale_count, 0.12, tissue)
    necrosis = []
    for xy in carcinoma:
        # Comedo-type necrosis in the middle of a carcinoma nest (not in every one, but in at least one).
        if necrosis and rng.random() > 0.6:
            continue
        for attempt in range(30):
            d = _feret_px(xy) * rng.uniform(0.35, 0.55) * 0.95 ** attempt
            n_xy = _lesion_outline(rng, xy.mean(0), d)
            if _inside(_inset(n_xy, -20), xy).all():
                necrosis.append(n_xy)
                regions.append(Annotation(name="necrosis", group="necrosis", kind="polygon", label="necrosis",
                                          xy=n_xy))
                break
    # Lobules: clusters of small acini; and a few larger ducts. Each acinus/duct is one benign polygon.
    ducts: list[tuple[np.ndarray, float]] = []
    for _ in range(int(rng.integers(2, 4)) * scale_count):
        for _ in range(100):
            outline = tissue[rng.integers(0, len(tissue))]
            centre = rng.uniform(outline.min(0), outline.max(0))
            lobule_r = rng.uniform(150, 300) * um * scale
            if (all(np.hypot(*(centre - c)) > lobule_r + r + 40 for c, r in avoid)
                    and _inside(_inset(_blob(rng, centre, (lobule_r, lobule_r), 0.0, 32), -30), outline).all()):
                avoid.append((centre, lobule_r))
                break
        else:
            continue
        large = rng.random() < 0.3
        n_acini = 1 if large else int(rng.integers(6, 14))
        local: list[tuple[np.ndarray, float]] = []
        for _ in range(n_acini * 4):
            if len(local) == n_acini:
                break
            r = (rng.uniform(90, 140) * scale if large else rng.uniform(22, 40)) * um
            c = centre + (rng.uniform(-1, 1, 2) * (lobule_r - r) if not large else 0)
            if all(np.hypot(*(c - cc)) > r + rr + 6 * um for cc, rr in local):
                local.append((c, r))
        for c, r in local:
            xy = _blob(rng, c, (r * rng.uniform(1.0, 1.25), r), lobes=0.04, n_vertices=96)
            regions.append(Annotation(name="benign epithelium", group="benign epithelium", kind="polygon",
                                      label="benign epithelium", xy=xy))
            ducts.append((c, r))
    return _breast_scene(rng, (height, width), mpp, regions, ducts), regions


def _breast_scene(rng: np.random.Generator, shape_hw: tuple[int, int], mpp: float, regions: list[Annotation],
                  ducts: list[tuple[np.ndarray, float]]) -> _Scene:
    """Nuclei, vacuoles and lumens of a multi-class slide whose regions are laid out."""
    fields, tiles = _common_fields(rng, shape_hw, mpp)
    label_ds = 4.0
    label_map = rasterize(regions, (math.ceil(shape_hw[0] / label_ds), math.ceil(shape_hw[1] / label_ds)),
                          label_ds, label_of=_MC, exclude_groups=())
    septa_width = 0.09
    carcinoma = _seed_points(rng, shape_hw, 14.0, mpp, label_map, label_ds, {1: 0.96})
    carcinoma = carcinoma[~_septa_mask(fields, carcinoma, septa_width)]
    fibro = _seed_points(rng, shape_hw, 15.0, mpp, label_map, label_ds, {3: 0.3, 5: 0.02})
    lymph = _seed_points(rng, shape_hw, 20.0, mpp, label_map, label_ds, {3: 0.06})
    debris = _seed_points(rng, shape_hw, 6.0, mpp, label_map, label_ds, {4: 0.4})
    ghosts = _seed_points(rng, shape_hw, 14.0, mpp, label_map, label_ds, {4: 0.25})
    fat = _seed_points(rng, shape_hw, _FAT_UM, mpp, label_map, label_ds, {5: 1.0}, jitter=0.3)
    # Two-layer epithelium: cuboidal luminal cells round the lumen, flat myoepithelial cells along the outside,
    # each myoepithelial nucleus lying along the duct wall (sprite angle follows the tangent).
    luminal, myo, myo_angle, lumens, lumen_sprites = [], [], [], [], []
    angle_bins = 12
    for centre, r in ducts:
        lumen_r = r * rng.uniform(0.45, 0.65)
        lumens.append(centre)
        lumen_sprites.append(_vacuole_sprite(rng, lumen_r, aspect=1.1, irregularity=0.04))
        for radius, spacing, out, angles in ((lumen_r + 3.5 / mpp, 6.0 / mpp, luminal, None),
                                             (r - 2.0 / mpp, 11.0 / mpp, myo, myo_angle)):
            n = max(6, int(2 * np.pi * radius / spacing))
            t = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi)
            rr = radius + rng.normal(0, 0.6 / mpp, n)
            out.append(centre + np.stack([rr * np.cos(t), rr * np.sin(t)], 1))
            if angles is not None:
                angles.append(((t + np.pi / 2) % np.pi / np.pi * angle_bins).astype(np.int64) % angle_bins)
    myo_sprites = [_nucleus_sprite(rng, _MYOEPITHELIUM, mpp, angle=k * np.pi / angle_bins) for k in
                   range(angle_bins)]
    empty = np.zeros((0, 2))
    return _Scene(
        shape_hw=shape_hw, regions=regions, label_ids=_MC, tissues=_MC_TISSUES, nested=1, septa_label=3,
        nuclei=[_stamps_of(rng, carcinoma, _sprites(rng, _TUMOUR, mpp, 96)),
                _stamps_of(rng, fibro, _sprites(rng, _FIBROBLAST, mpp)),
                _stamps_of(rng, lymph, _sprites(rng, _LYMPHOCYTE, mpp, 16)),
                _stamps_of(rng, debris, _sprites(rng, _DEBRIS, mpp, 32)),
                _stamps_of(rng, ghosts, _sprites(rng, _GHOST, mpp, 16)),
                _stamps_of(rng, np.vstack(luminal) if luminal else empty, _sprites(rng, _EPITHELIUM, mpp, 32)),
                _Stamps(np.vstack(myo) if myo else empty,
                        np.concatenate(myo_angle) if myo_angle else np.zeros(0, np.int64), myo_sprites)],
        halos=[_stamps_of(rng, carcinoma, [_halo_sprite(rng, (6.5, 8.5), (0.0, 0.2), mpp) for _ in range(24)])],
        voids=[_stamps_of(rng, fat, _fat_sprites(rng, mpp)),
               _Stamps(np.array(lumens).reshape(-1, 2), np.arange(len(lumens)), lumen_sprites)],
        fields=fields, tiles=tiles, septa_width=septa_width,
        **dict(zip(("stain_h", "stain_e"), _slide_stain(rng))))


def _partial_annotations(rng: np.random.Generator, labels: np.ndarray, label_ds: float,
                         per_class: int = 3) -> list[Annotation]:
    """Annotator-style polygons, each wholly inside one class of ``labels`` (checked on the rasterised polygon).

    Only part of every class is covered, as in the partially annotated DMMN training data.
    """
    height, width = labels.shape
    out = []
    for class_id, name in MULTICLASS_CLASSES.items():
        rr, cc = np.nonzero(labels == class_id)
        placed = 0
        for _ in range(60):
            if placed == per_class or not len(rr):
                break
            k = rng.integers(0, len(rr))
            centre = (np.array([cc[k], rr[k]]) + 0.5) * label_ds
            d = rng.uniform(40, 300) / 0.5 * rng.uniform(0.5, 1.0)  # level-0 px at 0.5 um/px
            xy = _blob(rng, centre, (d / 2 * rng.uniform(1, 1.6), d / 2), lobes=0.15, n_vertices=48)
            ann = Annotation(name=f"{name} {placed}", group=name, kind="polygon", label=name, xy=xy)
            painted = rasterize([ann], (height, width), label_ds) > 0
            if painted.sum() >= 4 and (labels[painted] == class_id).all():
                out.append(ann)
                placed += 1
    return out


def make_multiclass_dataset(outdir: str | os.PathLike, n: int = 4, seed: int = 0,
                            size_px: int | tuple[int, int] = (4096, 4096), mpp: float = 0.5,
                            downsample_step: int = 2) -> Path:
    """Write ``n`` multi-class phantom slides (DMMN-style) and ``dataset.json``.

    Per slide: ``phantom_mc_{i:03d}.tif`` (pyramidal JPEG TIFF, downsample step 2), ``labels/<name>.png`` (class
    per pixel at downsample 4, classes of :data:`MULTICLASS_CLASSES`), ``annotations/<name>.geojson`` (partial
    annotation polygons, classification = class name) and ``partial_labels/<name>.png`` (those polygons
    rasterised at downsample 4, 0 = unannotated).

    Args:
        outdir: output folder (created).
        n: number of slides.
        seed: random seed; the same seed gives byte-identical files.
        size_px: slide (width, height) in level-0 px, or one int for a square.
        mpp: level-0 resolution, um/px.
        downsample_step: pyramid step (as :func:`make_metastasis_dataset`).

    Returns:
        Path of ``dataset.json``.
    """
    out = Path(outdir)
    width, height = (size_px, size_px) if isinstance(size_px, int) else (int(size_px[0]), int(size_px[1]))
    label_ds = 4
    label_hw = (math.ceil(height / label_ds), math.ceil(width / label_ds))
    label_of = {**_MC}
    items = []
    for i in logged_steps(range(n), "phantom multi-class slides"):
        name = f"phantom_mc_{i:03d}"
        rng = _rng(seed, "multiclass", i)
        scene, regions = _plan_multiclass_slide(rng, (width, height), mpp)
        labels = rasterize(regions, label_hw, label_ds, label_of=label_of, exclude_groups=())
        labels[labels == 0] = 6
        partial = _partial_annotations(rng, labels, label_ds)
        _write_slide(out / f"{name}.tif", scene, mpp, downsample_step, {"phantom": "multiclass", "seed": seed})
        _write_png(out / "labels" / f"{name}.png", labels)
        write_geojson(out / "annotations" / f"{name}.geojson", partial)
        _write_png(out / "partial_labels" / f"{name}.png",
                   rasterize(partial, label_hw, label_ds, label_of={v: k for k, v in MULTICLASS_CLASSES.items()}))
        items.append({"image": f"{name}.tif", "labels": f"labels/{name}.png",
                      "partial_labels": f"partial_labels/{name}.png", "annotation": f"annotations/{name}.geojson"})
    classes = {str(k): v for k, v in MULTICLASS_CLASSES.items()}
    for item in items:
        item["classes"] = classes
    return _write_datalist(out, {"kind": "multiclass", "seed": seed, "level0_mpp": mpp, "label_downsample": label_ds,
                                 "classes": classes, "size_px": [width, height], "items": items})


# ---------------------------------------------------------------------------------------------------------------
# Geometry test slides
# ---------------------------------------------------------------------------------------------------------------

#: Colours of the geometry slides: eosin-pink ground (chroma 75, so the tissue mask takes it), a white glass margin,
#: and the haematoxylin-purple apex of every marker.
GEOMETRY_TISSUE_RGB, GEOMETRY_MARKER_RGB = (235, 160, 205), (70, 30, 120)


@dataclass(frozen=True)
class _MarkerScene:
    """A slide of pink tissue (inside a glass margin) with cone-shaped dark markers; ``render`` as :class:`_Scene`.

    A marker's colour goes linearly from the ground at ``radius_px`` to :data:`GEOMETRY_MARKER_RGB` at its centre,
    evaluated at pixel centres (level-0 pixel (i, j) covers ``[j, j + 1) x [i, i + 1)``), so its centre of mass and
    its darkest point lie at the sub-pixel position given, and any local darkness measure peaks there.
    """

    shape_hw: tuple[int, int]
    centres_xy: np.ndarray  # (N, 2) level-0 (x, y), continuous coordinates
    radius_px: float
    margin_px: float

    def render(self, y0: int, y1: int) -> np.ndarray:
        height, width = self.shape_hw
        ys = np.arange(y0, y1, dtype=np.float64)[:, None] + 0.5
        xs = np.arange(width, dtype=np.float64)[None, :] + 0.5
        tissue = ((xs >= self.margin_px) & (xs < width - self.margin_px)
                  & (ys >= self.margin_px) & (ys < height - self.margin_px))
        weight = np.zeros((y1 - y0, width), np.float32)
        near = np.abs(self.centres_xy[:, 1] - (y0 + y1) / 2) <= (y1 - y0) / 2 + self.radius_px
        for cx, cy in self.centres_xy[near]:
            c0, c1 = max(0, math.floor(cx - self.radius_px)), min(width, math.ceil(cx + self.radius_px) + 1)
            distance = np.hypot(xs[:, c0:c1] - cx, ys - cy)
            np.maximum(weight[:, c0:c1], np.clip(1 - distance / self.radius_px, 0, None), out=weight[:, c0:c1])
        ground = np.where(tissue[..., None], np.float32(GEOMETRY_TISSUE_RGB), np.float32(255))
        rgb = ground + weight[..., None] * (np.float32(GEOMETRY_MARKER_RGB) - ground)
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def make_geometry_dataset(outdir: str | os.PathLike, n: int = 1, seed: int = 0, size_um: float = 1000.0,
                          mpp: float = 0.2265, downsample_step: int = 4, level_rounding: str = "floor",
                          marker_radius_um: float = 60.0, marker_spacing_um: float = 300.0,
                          edge_um: float = 200.0) -> Path:
    """Write ``n`` geometry test slides at a scanner's resolution and pyramid step, and ``dataset.json``.

    Each slide (``phantom_geometry_{i:03d}.tif``, square, ``size_um`` wide) is pink tissue inside a 40 um glass margin
    with dark cone-shaped markers (radius ``marker_radius_um``) at seeded sub-pixel positions, at least
    ``marker_spacing_um`` apart and ``edge_um`` from the slide's edges. Whatever reads, scans or segments the slide
    must put each marker's response at the marker's position: the ground truth for every output's geometry, at
    resolutions (0.2265, 0.243, 0.2527, 0.499 um/px) and pyramids (2x, 4x; sizes rounded down as SVS levels are,
    or up, which makes downsamples such as 4.0027 or 3.9991) where a snapped pyramid level or an unregistered map
    would misplace it.

    Args:
        outdir: output folder (created).
        n: number of slides.
        seed: random seed of the marker positions.
        size_um: slide side in um (level-0 side ``round(size_um / mpp)`` px).
        mpp: level-0 resolution, um/px.
        downsample_step: pyramid step.
        level_rounding: "floor" or "ceil", how level sizes are rounded (:func:`pathbundles.writers.write_pyramid_tiff`).
        marker_radius_um: radius of each cone, um.
        marker_spacing_um: smallest distance between marker centres, um.
        edge_um: smallest distance of a marker centre from the slide's edges, um.

    Returns:
        Path of ``dataset.json``: ``{"kind": "geometry", "level0_mpp", "downsample_step", "marker_radius_um",
        "items": [{"image", "markers_xy": [[x, y], ...] level-0 px (continuous: pixel (0, 0) covers [0, 1)),
        "markers_um": [[x, y], ...]}]}``.
    """
    out = Path(outdir)
    side = round(size_um / mpp)
    items = []
    for i in range(n):
        rng = _rng(seed, "geometry", i)
        centres: list[np.ndarray] = []
        for _ in range(2000):
            xy = rng.uniform(edge_um, size_um - edge_um, 2)
            if all(np.hypot(*(xy - c)) >= marker_spacing_um for c in centres):
                centres.append(xy)
        markers_um = np.asarray(centres).reshape(-1, 2)
        scene = _MarkerScene((side, side), markers_um / mpp, marker_radius_um / mpp, 40.0 / mpp)
        name = f"phantom_geometry_{i:03d}"
        _write_slide(out / f"{name}.tif", scene, mpp, downsample_step,
                     {"phantom": "geometry", "seed": seed, "mpp": mpp, "downsample_step": downsample_step},
                     level_rounding)
        items.append({"image": f"{name}.tif", "markers_xy": (markers_um / mpp).tolist(),
                      "markers_um": markers_um.tolist()})
    return _write_datalist(out, {"kind": "geometry", "seed": seed, "level0_mpp": mpp,
                                 "downsample_step": downsample_step, "level_rounding": level_rounding,
                                 "marker_radius_um": marker_radius_um,
                                 "size_px": [side, side], "items": items})


# ---------------------------------------------------------------------------------------------------------------
# Output helpers and dispatch
# ---------------------------------------------------------------------------------------------------------------


def _write_png(path: Path, array: np.ndarray) -> None:
    """PNG written atomically; PIL writes no timestamp, so equal arrays give equal bytes."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")


def _write_datalist(out: Path, datalist: dict[str, Any]) -> Path:
    """``dataset.json`` last, so that a folder with a datalist is always complete."""
    path = out / "dataset.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(datalist, indent=2) + "\n", encoding="utf-8")
    return path


_MAKERS = {"metastasis": make_metastasis_dataset, "mitosis": make_mitosis_dataset,
           "multiclass": make_multiclass_dataset, "geometry": make_geometry_dataset}


def make_phantom(outdir: str | os.PathLike, kind: str = "metastasis", n: int = 4, seed: int = 0,
                 **size_options: Any) -> Path:
    """Write a phantom dataset of ``kind`` ("metastasis", "mitosis", "multiclass") into ``outdir``.

    Args:
        outdir: output folder.
        kind: which generator.
        n: number of slides / images.
        seed: random seed.
        size_options: ``size_px`` (``size_um`` for "geometry"), ``mpp`` and ``downsample_step`` (not "mitosis")
            passed to the generator.

    Returns:
        Path of the ``dataset.json`` written.
    """
    if kind not in _MAKERS:
        raise ValueError(f"phantom kind {kind!r}: expected one of {sorted(_MAKERS)}")
    return _MAKERS[kind](outdir, n=n, seed=seed, **size_options)
