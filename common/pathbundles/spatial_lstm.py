"""Spatially sensitive CNN + LSTM (Zheng, Zhou, Huang, Mathematics 2022, 002_bc708bb93d5e8a23.txt).

A grid of G x G patches (default 3 x 3 patches of 256 px, each centre-cropped to 224, the NCRF layout) goes through a
ResNet-34 feature extractor (MONAI's ``resnet34``, features after global average pooling, Sec. 3.1), then an LSTM
over the grid's patch features (Sec. 3.2, Eq. 2) gives one tumour logit per patch. Training minimises binary
cross-entropy plus ``beta`` times the spatial constraint loss of Eq. (3)-(5) (:class:`SpatialLSTMLoss`).

Conventions:

- **Scan order.** Patches of a grid are indexed in raster order, ``index = row * G + col`` (rows top to bottom, each
  row left to right); this is the order :class:`GridToPatchesd` emits and the order the LSTM reads them. The paper
  only says the grid is "transformed into a sequence" (Sec. 4.3), so the LSTM is a single forward pass over that
  sequence (Eq. 2): patch ``t`` sees patches ``0..t``. ``bidirectional=True`` adds the backward pass.
- **Neighbourhood of the spatial loss.** Fig. 3 shows a patch centre and its surrounding patch centres; in a 3 x 3
  grid these are the 8-connected neighbours. Every patch of the grid is an ``x*`` (Eq. 6 sums over all training
  patches) with its 8-connected neighbours inside the grid (3 for a corner, 5 for an edge, 8 for the centre);
  ``connectivity=4`` is offered as a variant.
- **Normalisation** (Sec. 4.1): ``(x - 128) / 128`` on 0..255 RGB. Training chain (one item = one grid region):
  ``CastToTyped(float32)`` -> :class:`RandDihedrald` on ``image`` and ``label`` -> ``ScaleIntensityRanged`` 0..255
  to 0..1 -> :class:`pathbundles.transforms.RandHEColorJitterd` (brightness 64/255, contrast 0.75, saturation 0.25,
  hue 0.04) -> ``ScaleIntensityRanged(a_min=0, a_max=1, b_min=-1, b_max=127/128)`` (= ``(255 x - 128) / 128``) ->
  :class:`GridToPatchesd` (G*G patches, 224 centre crop). Inference: ``CastToTyped(float32)`` ->
  ``NormalizeIntensityd(subtrahend=128, divisor=128)``; the inferer cuts the crops itself.
- **Shapes.** Network input (N, G*G, 3, crop, crop), output (N, G*G) logits (sigmoid = tumour probability). For
  MONAI's ``verify_net_in_out`` give the metadata input ``num_channels: G*G`` with ``spatial_shape: [3, crop, crop]``
  and the output ``num_channels: G*G``. The model scripts and traces to TorchScript and exports to ONNX (MONAI
  ``ckpt_export`` / ``onnx_export``, see :mod:`pathbundles.exported`). An exported model has ``forward`` only
  (``torch.jit.trace`` cannot compile extra exported methods over traced submodules, and ONNX has one graph), so
  :func:`lattice_map` runs it by :func:`naive_grid_map`: the same map, each patch through the CNN up to G*G times.
- **Map geometry** (:class:`LatticeGeometry`, all lengths in pixels at the scanning resolution): map pixel ``k`` is
  the grid centred on scan pixel ``k * stride + G * patch / 2`` and holds the tumour probability of that grid's
  centre patch (NCRF's convention). The first grid lies wholly inside the slide, as ScanNet's first patch does.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.inferers import Inferer
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_tensor
from torch import nn

from pathbundles.checks import flag
from pathbundles.sampling import ClassBalancedPatchDataset
from pathbundles.slide_inference import MapGrid

GRID_SIZE = 3  # NCRF's 3 x 3 grid
PATCH_PX = 256  # patch read per grid cell (Sec. 3.1)
CROP_PX = 224  # centre crop fed to ResNet-34
STRIDE_PX = 64  # map stride (Sec. 4.1)
N_DIHEDRAL = 8  # 4 rotations x optional left-right flip (Sec. 4.1)


# -------------------------------------------------------------------------------------------------------------- network


class SpatialLSTMNet(nn.Module):
    """ResNet-34 patch features -> LSTM over the grid in raster order -> one tumour logit per patch (Sec. 3.1-3.2).

    Args:
        grid_size: G, patches per grid side (the input holds G*G patches in raster order).
        crop_px: side of the (centre-cropped) patches the network takes.
        hidden_size: LSTM hidden state size (the paper gives none).
        use_lstm: False gives the "ResNet-34 alone" ablation: a linear classifier on each patch's features.
        bidirectional: add a backward LSTM pass over the raster sequence (the paper's LSTM is one forward pass).
        widen_factor: multiplier of ResNet-34's widths (64, 128, 256, 512); 1.0 is the paper's network, demo and
            test models are narrow. Feature size is ``int(512 * widen_factor)``.
        in_channels: input image channels.
        feature_norm: LayerNorm on the patch features before the LSTM (not in the paper, which gives no detail). The
            shipped demo weights have none; their unbounded post-ReLU pooled features (norms of 20-30) meet a
            tumour logit that stalls at one ceiling (every tumour patch at sigmoid 0.61), which the LayerNorm is
            meant to prevent (not yet shown by a full training).

    The CNN is MONAI's 2-D ``resnet34`` with a 7x7 stride-2 first convolution (He et al.; MONAI's default stride 1
    suits 3-D volumes), no final fully connected layer and no pretrained weights.
    """

    def __init__(self, grid_size: int = GRID_SIZE, crop_px: int = CROP_PX, hidden_size: int = 256,
                 use_lstm: bool = True, bidirectional: bool = False, widen_factor: float = 1.0,
                 in_channels: int = 3, feature_norm: bool = False) -> None:
        super().__init__()
        from monai.networks.nets import resnet34

        if grid_size < 1:
            raise ValueError(f"grid_size must be >= 1, got {grid_size}")
        if crop_px < 1:
            raise ValueError(f"crop_px must be >= 1, got {crop_px}")
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        if int(64 * widen_factor) < 1:
            raise ValueError(f"widen_factor must be >= 1/64 (at least one channel), got {widen_factor}")
        use_lstm, bidirectional = flag(use_lstm, "use_lstm"), flag(bidirectional, "bidirectional")
        feature_norm = flag(feature_norm, "feature_norm")
        self.grid_size, self.crop_px, self.in_channels = int(grid_size), int(crop_px), int(in_channels)
        self.cnn = resnet34(pretrained=False, spatial_dims=2, n_input_channels=in_channels, conv1_t_size=7,
                            conv1_t_stride=2, widen_factor=widen_factor, feed_forward=False)
        self.feature_size = int(512 * widen_factor)
        self.feature_norm = nn.LayerNorm(self.feature_size) if use_lstm and feature_norm else nn.Identity()
        self.lstm = nn.LSTM(self.feature_size, hidden_size, batch_first=True,
                            bidirectional=bidirectional) if use_lstm else None
        head_in = hidden_size * (2 if bidirectional else 1) if use_lstm else self.feature_size
        self.classifier = nn.Linear(head_in, 1)

    def patch_features(self, patches: torch.Tensor) -> torch.Tensor:
        """CNN features (M, feature_size) of patches (M, 3, crop_px, crop_px) (Eq. 1)."""
        if patches.dim() != 4 or patches.shape[1] != self.in_channels or patches.shape[2] != self.crop_px \
                or patches.shape[3] != self.crop_px:
            raise ValueError(f"expected patches (M, {self.in_channels}, {self.crop_px}, {self.crop_px}), "
                             f"got {list(patches.shape)}")
        return self.cnn(patches)

    def grid_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Tumour logits (N, G*G) from the patch features (N, G*G, feature_size) of N grids in raster order."""
        if features.dim() != 3 or features.shape[1] != self.grid_size * self.grid_size \
                or features.shape[2] != self.feature_size:
            raise ValueError(f"expected features (N, {self.grid_size * self.grid_size}, {self.feature_size}), "
                             f"got {list(features.shape)}")
        if self.lstm is not None:
            features = self.lstm(self.feature_norm(features))[0]
        return self.classifier(features).squeeze(-1)

    def forward(self, grids: torch.Tensor) -> torch.Tensor:
        """Logits (N, G*G) of grids (N, G*G, 3, crop_px, crop_px), patches in raster order."""
        if grids.dim() != 5 or grids.shape[1] != self.grid_size * self.grid_size:
            raise ValueError(f"expected grids (N, {self.grid_size * self.grid_size}, {self.in_channels}, "
                             f"{self.crop_px}, {self.crop_px}), got {list(grids.shape)}")
        n, k = grids.shape[0], grids.shape[1]
        features = self.patch_features(grids.flatten(0, 1)).reshape(n, k, self.feature_size)
        return self.grid_logits(features)


# ----------------------------------------------------------------------------------------------------------------- loss


def neighbour_pairs(grid_size: int, connectivity: int = 8) -> torch.Tensor:
    """Ordered (patch, neighbour) raster-index pairs of a G x G grid, shape (E, 2), every unordered pair twice.

    Args:
        grid_size: G.
        connectivity: 8 (the paper's Fig. 3: all surrounding patches) or 4 (edge-sharing patches only).
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    if grid_size < 1:
        raise ValueError(f"grid_size must be >= 1, got {grid_size}")
    steps = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)
             if (dr, dc) != (0, 0) and (connectivity == 8 or dr == 0 or dc == 0)]
    pairs = [(r * grid_size + c, (r + dr) * grid_size + c + dc) for r in range(grid_size) for c in range(grid_size)
             for dr, dc in steps if 0 <= r + dr < grid_size and 0 <= c + dc < grid_size]
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def spatial_constraint_loss(prob: torch.Tensor, labels: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Eq. (3)-(5) averaged over patches: for each patch ``x*`` the mean over its neighbours ``x^n`` of
    ``(1 - |y* - y^n|) L_same + |y* - y^n| L_dif``, ``L_same = (p* - p^n)^2``,
    ``L_dif = (1 - p^n)(1 - p*) + p^n p*``; then the mean over the patches and grids.

    Args:
        prob: (N, K) tumour probabilities of N grids of K patches.
        labels: (N, K) patch labels (1 tumour, 0 normal).
        pairs: (E, 2) ordered (patch, neighbour) indices from :func:`neighbour_pairs`.
    """
    centre, other = pairs[:, 0], pairs[:, 1]
    p_c, p_n = prob[:, centre], prob[:, other]
    differ = (labels[:, centre] - labels[:, other]).abs()
    same = (p_c - p_n) ** 2
    dif = (1 - p_n) * (1 - p_c) + p_n * p_c
    terms = (1 - differ) * same + differ * dif
    total = torch.zeros_like(prob).index_add_(1, centre, terms)
    degree = torch.bincount(centre, minlength=prob.shape[1]).to(prob.dtype).clamp(min=1)
    return (total / degree).mean()


class SpatialLSTMLoss(nn.Module):
    """Binary cross-entropy over all patches + ``beta`` x the spatial constraint loss (Eq. 3-6).

    Args:
        beta: weight of the spatial loss (cross-validated in the paper, value not given); 0 gives the paper's
            "+ LSTM without spatial loss" ablation.
        grid_size: G; inputs hold G*G patches in raster order.
        connectivity: neighbourhood of the spatial loss, 8 (the paper's Fig. 3) or 4.
    """

    def __init__(self, beta: float = 1.0, grid_size: int = GRID_SIZE, connectivity: int = 8) -> None:
        super().__init__()
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.beta, self.grid_size = float(beta), int(grid_size)
        self.register_buffer("pairs", neighbour_pairs(grid_size, connectivity), persistent=False)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of logits (N, G*G) against labels with N*G*G elements ((N, G*G) or (N, G, G))."""
        k = self.grid_size * self.grid_size
        if logits.dim() != 2 or logits.shape[1] != k:
            raise ValueError(f"expected logits (N, {k}), got {tuple(logits.shape)}")
        if labels.numel() != logits.numel():
            raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
        logits = logits.float()
        labels = labels.reshape(logits.shape).to(logits)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels)
        if self.beta:
            loss = loss + self.beta * spatial_constraint_loss(torch.sigmoid(logits), labels, self.pairs)
        return loss


# ------------------------------------------------------------------------------------------- training data + transforms


def dihedral(x: Any, k: int) -> Any:
    """Dihedral element ``k`` (0..7) of the last two axes: left-right flip when ``k >= 4``, then ``k % 4``
    counter-clockwise quarter turns. Works on torch tensors and numpy arrays."""
    if not 0 <= k < N_DIHEDRAL:
        raise ValueError(f"dihedral element must be 0..7, got {k}")
    if isinstance(x, np.ndarray):
        x = np.flip(x, -1) if k >= 4 else x
        return np.ascontiguousarray(np.rot90(x, k % 4, axes=(-2, -1)))
    x = torch.flip(x, (-1,)) if k >= 4 else x
    return torch.rot90(x, k % 4, (-2, -1))


def inverse_dihedral(x: Any, k: int) -> Any:
    """The inverse of :func:`dihedral` element ``k``: ``inverse_dihedral(dihedral(x, k), k) == x``."""
    if not 0 <= k < N_DIHEDRAL:
        raise ValueError(f"dihedral element must be 0..7, got {k}")
    if isinstance(x, np.ndarray):
        x = np.rot90(x, -(k % 4), axes=(-2, -1))
        return np.ascontiguousarray(np.flip(x, -1) if k >= 4 else x)
    x = torch.rot90(x, -(k % 4), (-2, -1))
    return torch.flip(x, (-1,)) if k >= 4 else x


class RandDihedrald(RandomizableTransform, MapTransform):
    """One of the 8 dihedral transforms (Sec. 4.1), drawn uniformly, applied alike to the last two axes of every key.

    Give it the grid region (3, G*P, G*P) and its label grid (G, G): rotating or flipping the region moves every
    patch to its transformed grid cell and transforms its content, and the label grid moves with it.

    Args:
        keys: keys to transform (e.g. ``["image", "label"]``).
        prob: probability of drawing a transform at all (1.0: each of the 8, identity included, with p = 1/8).
    """

    def __init__(self, keys: str | Sequence[str], prob: float = 1.0, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, flag(allow_missing_keys, "allow_missing_keys"))
        RandomizableTransform.__init__(self, prob)
        self.k = 0

    def randomize(self, data: object = None) -> None:
        super().randomize(None)
        self.k = int(self.R.randint(N_DIHEDRAL))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        out = dict(data)
        self.randomize()
        if not self._do_transform:
            return out
        for key in self.key_iterator(out):
            out[key] = dihedral(out[key], self.k)
        return out


class GridToPatchesd(MapTransform):
    """Cut a grid region (C, G*P, G*P) into G*G patches (G*G, C, crop, crop), raster order, each the centre crop of
    its P x P cell; flatten the label grid (G, G) to (G*G,).

    Args:
        keys: keys of grid regions.
        grid_size: G.
        crop_px: side of the centre crop of each cell (224); ``P - crop_px`` must be even.
        label_key: key of the (G, G) label grid to flatten (None: no label).
    """

    def __init__(self, keys: str | Sequence[str] = "image", grid_size: int = GRID_SIZE, crop_px: int = CROP_PX,
                 label_key: str | None = "label", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, flag(allow_missing_keys, "allow_missing_keys"))
        if grid_size < 1 or crop_px < 1:
            raise ValueError(f"grid_size and crop_px must be >= 1, got {grid_size} and {crop_px}")
        self.grid_size, self.crop_px, self.label_key = int(grid_size), int(crop_px), label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        out = dict(data)
        g, crop = self.grid_size, self.crop_px
        for key in self.key_iterator(out):
            region = convert_to_tensor(out[key], track_meta=False)
            if region.dim() != 3 or region.shape[1] != region.shape[2] or region.shape[1] % g:
                raise ValueError(f"{key}: expected a (C, H, H) region with H a multiple of grid_size {g}, "
                                 f"got {tuple(region.shape)}")
            c, cell = region.shape[0], region.shape[1] // g
            if crop > cell or (cell - crop) % 2:
                raise ValueError(f"{key}: crop_px {crop} must be <= the cell size {cell} px with an even difference")
            o = (cell - crop) // 2
            cells = region.reshape(c, g, cell, g, cell)[:, :, o:o + crop, :, o:o + crop]
            out[key] = cells.permute(1, 3, 0, 2, 4).reshape(g * g, c, crop, crop)
        if self.label_key is not None and self.label_key in out:
            label = convert_to_tensor(out[self.label_key], track_meta=False)
            if label.numel() != g * g:
                raise ValueError(f"{self.label_key}: expected {g * g} patch labels, got shape {tuple(label.shape)}")
            out[self.label_key] = label.reshape(g * g)
        return out


#: Patch-label rules of :class:`SpatialGridDataset`: the paper's "any" (a patch is tumour when any pixel of it is)
#: and NCRF's "centre" (when its centre is).
LABEL_RULES = ("any", "centre")
#: Points per cell side the "any" rule tests (16 x 16 = 256 per cell).
ANY_RULE_SAMPLES = 16


def check_label_rule(rule: str) -> str:
    """``rule`` when it is one of :data:`LABEL_RULES`; :class:`SettingError` otherwise."""
    from pathbundles.checks import choice

    return choice(rule, LABEL_RULES, "patch_label_rule")


class _TumourLookup:
    """Whether level-0 points of one slide lie in tumour: exact polygon test of the ``annotation`` (exclusion
    regions removed), else the ``mask`` image, else never (a normal slide)."""

    def __init__(self, item: Mapping[str, Any], backend: str, mpp: float | tuple[float, float] | None = None) -> None:
        from pathbundles.annotations import read_annotations
        from pathbundles.tissue import LevelMask
        from pathbundles.wsi import open_slide

        self.annotations, self.mask = None, None
        if item.get("annotation"):
            self.annotations = [a for a in read_annotations(item["annotation"]) if a.kind == "polygon"]
        elif item.get("mask"):
            with open_slide(str(item["image"]), backend=backend, mpp=mpp) as slide:
                self.mask = LevelMask.load_mask(item["mask"], slide.level_dimensions[0], float(slide.mpp[0]))

    def grid(self, origin_xy: tuple[float, float], grid_size: int, cell0_px: float,
             rule: str = "any") -> np.ndarray:
        """(G, G) bool: is each cell of side ``cell0_px`` level-0 px from ``origin_xy`` tumour, by ``rule``.

        ``"any"`` (the paper's, Sec. 4.1: "at least one pixel marked as a tumor within the patch area"): any of
        :data:`ANY_RULE_SAMPLES` x :data:`ANY_RULE_SAMPLES` points spread evenly over the cell is in tumour (a
        tumour region smaller than 1/16 of a cell side between them can be missed). ``"centre"`` (NCRF's): the
        cell's centre is in tumour.
        """
        from pathbundles.annotations import rasterize

        k = ANY_RULE_SAMPLES if check_label_rule(rule) == "any" else 1
        if self.annotations is not None:
            # A pixel of a rasterised mask is inside when its centre is: (G k) x (G k) sub-cells, then any per cell.
            inside = rasterize(self.annotations, (grid_size * k, grid_size * k), cell0_px / k, origin_xy=origin_xy) > 0
        elif self.mask is not None:
            centres = (np.arange(grid_size * k) + 0.5) * cell0_px / k
            inside = self.mask.at_level0(origin_xy[0] + centres[None, :], origin_xy[1] + centres[:, None]) > 0
        else:
            return np.zeros((grid_size, grid_size), bool)
        return inside.reshape(grid_size, k, grid_size, k).any(axis=(1, 3))


class SpatialGridDataset(ClassBalancedPatchDataset):
    """Class-balanced grids of G x G patches from annotated slides (Sec. 4.1 sampling, NCRF's grid layout).

    The grid's centre is drawn as :class:`pathbundles.sampling.ClassBalancedPatchDataset` draws a patch centre
    (class with equal probability, then a slide having it, then a location of that class; hard negatives join the
    normal pool); one region of ``G * patch_px`` pixels centred there is read. Each item is a dict: ``image``
    (3, G*patch_px, G*patch_px) uint8 tensor, ``label`` (G, G) float32 tensor (1 where that ``patch_px`` cell is
    tumour by ``label_rule``, 0 elsewhere), ``location`` level-0 (x, y) float64 of the grid centre; then
    ``transform`` (see the module docstring: :class:`RandDihedrald` on image and label, colour jitter,
    normalisation, :class:`GridToPatchesd`).

    Args:
        data: datalist dicts with ``image`` and optionally ``annotation`` (polygons, used when present) or
            ``mask`` (tumour > 0) as tumour ground truth.
        mpp: resolution of the patches (um/px).
        grid_size: G.
        patch_px: side of one grid cell in pixels at ``mpp`` (256; the network's crop is cut by the transforms).
        samples_per_epoch, hard_negative_fraction, fixed, seed, backend, tissue_mpp, transform, mpp_override: as
            :class:`pathbundles.sampling.ClassBalancedPatchDataset`.
        label_rule: "any" (the paper's: a cell with any tumour pixel is tumour) or "centre" (NCRF's: its centre
            decides); see :meth:`_TumourLookup.grid`.
    """

    def __init__(self, data: Sequence[dict], mpp: float, grid_size: int = GRID_SIZE, patch_px: int = PATCH_PX,
                 samples_per_epoch: int = 1024, hard_negative_fraction: float | None = None, fixed: bool = False,
                 seed: int = 0, backend: str = "auto", tissue_mpp: float = 8.0,
                 transform: Callable[[dict], dict] | None = None,
                 mpp_override: float | tuple[float, float] | None = None, label_rule: str = "any") -> None:
        if grid_size < 1 or patch_px < 1:
            raise ValueError(f"grid_size and patch_px must be >= 1, got {grid_size} and {patch_px}")
        super().__init__(data, read_px=grid_size * patch_px, mpp=mpp, samples_per_epoch=samples_per_epoch,
                         hard_negative_fraction=hard_negative_fraction, fixed=flag(fixed, "fixed"), seed=seed,
                         backend=backend, tissue_mpp=tissue_mpp, transform=transform, mpp_override=mpp_override)
        self.grid_size, self.patch_px = int(grid_size), int(patch_px)
        self.label_rule = check_label_rule(label_rule)
        self.tumour = {s.path: _TumourLookup(item, backend, s.mpp_override) for item, s in zip(data, self.slides)}

    def __getitem__(self, i: int) -> dict:
        slide, x, y, _ = self.draw_item(i)
        origin = self.region_origin(slide, x, y)
        region = self.handles(slide.path, slide.mpp_override).read_region(origin, (self.read_px, self.read_px),
                                                                          self.mpp)
        labels = self.tumour[slide.path].grid(origin, self.grid_size, self.patch_px * self.mpp / slide.level0_mpp,
                                              self.label_rule)
        item = {"image": torch.from_numpy(np.ascontiguousarray(region.transpose(2, 0, 1))),
                "label": torch.from_numpy(labels.astype(np.float32)),
                "location": torch.tensor([x, y], dtype=torch.float64)}
        return self.transform(item) if self.transform is not None else item


# ------------------------------------------------------------------------------------------------------------ inference


@dataclass(frozen=True)
class LatticeGeometry:
    """Sizes of the stride-``stride_px`` scan of grids over one ROI. All lengths in pixels at the scanning mpp.

    Patches (``patch_px`` windows, of which the network sees the ``crop_px`` centre) lie on a lattice of stride
    ``stride_px``; the G x G grid centred on a lattice point takes its neighbours ``patch_px / stride_px`` lattice
    steps apart, so patches of one grid do not overlap and every lattice patch belongs to up to G*G grids.
    ROI tile ``(r, c)`` holds ``tile_px x tile_px`` map pixels; map pixel ``k`` is the grid centred on scan pixel
    ``k * stride_px + grid_size * patch_px / 2``.

    Args:
        tile_px: map pixels per ROI side.
        grid_size: G (odd, so a grid has a centre patch).
        patch_px: grid cell side (256).
        crop_px: centre crop the network sees (224).
        stride_px: map stride (64); must divide ``patch_px``.
    """

    tile_px: int
    grid_size: int = GRID_SIZE
    patch_px: int = PATCH_PX
    crop_px: int = CROP_PX
    stride_px: int = STRIDE_PX

    def __post_init__(self) -> None:
        if min(self.tile_px, self.grid_size, self.patch_px, self.crop_px, self.stride_px) < 1:
            raise ValueError(f"tile_px, grid_size, patch_px, crop_px and stride_px must be >= 1, got {self}")
        if self.grid_size % 2 == 0:
            raise ValueError(f"grid_size must be odd (a grid needs a centre patch), got {self.grid_size}")
        if self.patch_px % self.stride_px:
            raise ValueError(f"stride_px {self.stride_px} must divide patch_px {self.patch_px}, so that grid "
                             f"neighbours lie on the patch lattice")
        if self.crop_px > self.patch_px or (self.patch_px - self.crop_px) % 2:
            raise ValueError(f"crop_px {self.crop_px} must be <= patch_px {self.patch_px} with an even difference")

    @property
    def grid_step(self) -> int:
        """Lattice steps between neighbouring patches of one grid: ``patch_px / stride_px``."""
        return self.patch_px // self.stride_px

    @property
    def lattice_px(self) -> int:
        """Lattice points per ROI side: the tile plus ``(G - 1) * grid_step`` for the grids' outer patches."""
        return self.tile_px + (self.grid_size - 1) * self.grid_step

    @property
    def read_px(self) -> int:
        """Side of the region read per ROI: ``(tile_px - 1) * stride_px + G * patch_px``."""
        return (self.tile_px - 1) * self.stride_px + self.grid_size * self.patch_px

    @property
    def roi_stride_px(self) -> int:
        """Distance between ROIs, ``tile_px * stride_px``, so that their tiles stitch without gaps or overlaps."""
        return self.tile_px * self.stride_px

    @property
    def map_origin_px(self) -> float:
        """Scan pixel on which map pixel 0 is centred: ``G * patch_px / 2``."""
        return self.grid_size * self.patch_px / 2

    @property
    def crop_offset_px(self) -> int:
        """Offset of the crop inside its patch window: ``(patch_px - crop_px) / 2``."""
        return (self.patch_px - self.crop_px) // 2

    @property
    def centre_index(self) -> int:
        """Raster index of the centre patch of a grid."""
        return self.grid_size * self.grid_size // 2

    def grid(self) -> MapGrid:
        """The ROI/map geometry for :class:`pathbundles.slide_inference.SlideROIDataset` and its writer."""
        return MapGrid(read_px=self.read_px, roi_stride_px=self.roi_stride_px, tile_px=self.tile_px,
                       map_step_px=self.stride_px, map_origin_px=self.map_origin_px)

    def map_to_image(self, k: float) -> float:
        """Map index ``k`` -> scan pixel of the centre of its grid: ``k * stride_px + G * patch_px / 2``."""
        return k * self.stride_px + self.map_origin_px


def _check_region(region: torch.Tensor, geometry: LatticeGeometry, network: nn.Module) -> None:
    if region.dim() != 4 or region.shape[-1] != geometry.read_px or region.shape[-2] != geometry.read_px:
        raise ValueError(f"expected regions (N, C, {geometry.read_px}, {geometry.read_px}), "
                         f"got {tuple(region.shape)}")
    net_grid = getattr(network, "grid_size", geometry.grid_size)
    if net_grid != geometry.grid_size:
        raise ValueError(f"the network takes {net_grid} x {net_grid} grids, the geometry has grid_size "
                         f"{geometry.grid_size}")


def _check_positions(positions: Any, region: torch.Tensor, geometry: LatticeGeometry) -> torch.Tensor | None:
    """``positions`` as a bool tensor (N, tile_px, tile_px) on the region's device, or None."""
    if positions is None:
        return None
    positions = torch.as_tensor(positions, device=region.device)
    expected = (region.shape[0], geometry.tile_px, geometry.tile_px)
    if tuple(positions.shape) != expected:
        raise ValueError(f"expected positions {expected} (map pixels to compute), got {tuple(positions.shape)}")
    return positions.bool()


def _dihedral_mean(scan: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], region: torch.Tensor,
                   positions: torch.Tensor | None = None) -> torch.Tensor:
    """Test-time augmentation: the mean over the 8 dihedral transforms of the region (and of the map positions to
    compute, which turn with it) of the maps brought back."""
    return torch.stack([inverse_dihedral(scan(dihedral(region, k), None if positions is None else
                                              dihedral(positions, k)), k) for k in range(N_DIHEDRAL)]).mean(0)


def _lattice_windows(region: torch.Tensor, geometry: LatticeGeometry) -> torch.Tensor:
    """A view (N, C, L, L, crop, crop) of the regions: entry (a, b) is the centre crop of the patch window at offset
    ``(a * stride_px, b * stride_px)``, ``L = lattice_px``."""
    lattice, crop, o = geometry.lattice_px, geometry.crop_px, geometry.crop_offset_px
    span = (lattice - 1) * geometry.stride_px + crop
    return region[:, :, o:o + span, o:o + span].unfold(2, crop, geometry.stride_px).unfold(
        3, crop, geometry.stride_px)


def _grid_cells(positions: torch.Tensor, geometry: LatticeGeometry) -> torch.Tensor:
    """Flat lattice indices (P, G*G) of the patches of the grids at map pixels ``positions`` (P, 2), raster order:
    patch (u, v) of the grid at (r, c) is lattice patch (r + u * grid_step, c + v * grid_step)."""
    g, step = geometry.grid_size, geometry.grid_step
    offsets = torch.arange(g, device=positions.device) * step
    rows = positions[:, 0, None, None] + offsets[None, :, None]
    cols = positions[:, 1, None, None] + offsets[None, None, :]
    return (rows * geometry.lattice_px + cols).reshape(len(positions), g * g)


class LatticeFeatureCache:
    """CNN features of the lattice patches that neighbouring ROIs share, kept from one ROI to the next.

    An ROI's lattice reaches ``(grid_size - 1) * grid_step`` steps (8 at the defaults) into its right and lower
    neighbours' tiles, so on a slide each patch of those margins belongs to up to four ROIs' lattices. ROIs come
    in raster order; the features of an ROI's margin patches are kept under their slide-wide lattice position and
    read by the ROIs after it instead of going through the CNN again. Entries above the current ROI row are
    dropped as the rows advance, and everything when the slide changes (``start``). Valid for one network state:
    :meth:`SpatialLSTMInferer.attach` makes a fresh cache at each engine epoch and drops it at its end.
    """

    def __init__(self) -> None:
        self.slide: Any = None
        self.top_row = 0
        self.features: dict[tuple[int, int], torch.Tensor] = {}
        self.hits = self.computed = 0

    def start(self, slide: Any, top_row: int) -> None:
        """An ROI of ``slide`` whose lattice starts at slide-wide lattice row ``top_row`` comes next."""
        if slide != self.slide:
            self.slide, self.top_row = slide, top_row
            self.features.clear()
        elif top_row > self.top_row:
            self.top_row = top_row
            self.features = {k: v for k, v in self.features.items() if k[0] >= top_row}


def sparse_lattice_map(network: nn.Module, region: torch.Tensor, geometry: LatticeGeometry,
                       positions: torch.Tensor, patch_batch: int = 256, origins: Sequence[tuple[Any, int, int]]
                       | None = None, cache: LatticeFeatureCache | None = None) -> torch.Tensor:
    """:func:`lattice_map` (no TTA) at the map pixels ``positions`` (N, tile_px, tile_px) only, 0 at the others:
    only the lattice patches their grids read go through the CNN, each once per region, and with a ``cache`` once
    per slide: ``origins`` gives each region's (slide, ROI row, ROI column), whose lattice starts at slide-wide
    lattice position ``(row, column) * tile_px``."""
    out = torch.zeros((region.shape[0], geometry.tile_px, geometry.tile_px), dtype=torch.float32,
                      device=region.device)
    windows, lattice, t = _lattice_windows(region, geometry), geometry.lattice_px, geometry.tile_px
    caching = cache is not None and origins is not None
    for i in range(region.shape[0]):
        where = torch.nonzero(positions[i])  # (P, 2)
        if not len(where):
            continue
        needed, grid_rows = torch.unique(_grid_cells(where, geometry), return_inverse=True)  # sorted, (P, G*G)
        rows, cols = (needed // lattice).tolist(), (needed % lattice).tolist()
        found: list[torch.Tensor | None] = [None] * len(rows)
        if caching:
            slide, roi_row, roi_col = origins[i]
            cache.start(slide, int(roi_row) * t)
            keys = [(a + int(roi_row) * t, b + int(roi_col) * t) for a, b in zip(rows, cols)]
            found = [cache.features.get(k) for k in keys]
        missing = [j for j, f in enumerate(found) if f is None]
        if missing:
            computed = torch.cat([network.patch_features(windows[i][:, part // lattice, part % lattice]
                                                         .transpose(0, 1))
                                  for part in needed[missing].split(patch_batch)])
            for j, feature in zip(missing, computed):
                found[j] = feature
                if caching and (rows[j] >= t or cols[j] >= t):
                    cache.features[keys[j]] = feature  # a margin patch: the next ROIs read it
        if caching:
            cache.computed += len(missing)
            cache.hits += len(rows) - len(missing)
        logits = network.grid_logits(torch.stack(found)[grid_rows])  # (P, G*G)
        out[i, where[:, 0], where[:, 1]] = torch.sigmoid(logits[:, geometry.centre_index].float())
    return out


def lattice_features(network: nn.Module, region: torch.Tensor, geometry: LatticeGeometry,
                     patch_batch: int = 256) -> torch.Tensor:
    """CNN features of every lattice patch of ROI regions, each patch through the CNN once.

    Args:
        network: an eager :class:`SpatialLSTMNet` (exported models have no ``patch_features``).
        region: (N, C, read_px, read_px) normalised regions.
        geometry: the scan geometry.
        patch_batch: patches per CNN call (memory bound).

    Returns:
        (N, L, L, feature_size); entry (a, b) is the crop of the patch window at offset
        ``(a * stride_px, b * stride_px)`` of the region, ``L = lattice_px``.
    """
    n, lattice, crop = region.shape[0], geometry.lattice_px, geometry.crop_px
    windows = _lattice_windows(region, geometry)
    flat = torch.arange(lattice * lattice, device=region.device)
    chunk = max(1, patch_batch // max(n, 1))
    features = []
    for part in flat.split(chunk):
        patches = windows[:, :, part // lattice, part % lattice]  # (N, C, k, crop, crop)
        patches = patches.permute(0, 2, 1, 3, 4).reshape(-1, region.shape[1], crop, crop)
        features.append(network.patch_features(patches).reshape(n, len(part), -1))
    return torch.cat(features, 1).reshape(n, lattice, lattice, -1)


def lattice_map(network: nn.Module, region: torch.Tensor, geometry: LatticeGeometry, tta: bool = False,
                patch_batch: int = 256, positions: Any = None, origins: Sequence[tuple[Any, int, int]] | None = None,
                cache: LatticeFeatureCache | None = None) -> torch.Tensor:
    """Tumour probability map tiles of ROI regions: CNN once per lattice patch, then the LSTM per grid.

    Args:
        network: a :class:`SpatialLSTMNet` in eval mode, or an exported one (forward only: run by
            :func:`naive_grid_map`).
        region: (N, C, read_px, read_px) normalised regions.
        geometry: the scan geometry.
        tta: average the probabilities over the 8 dihedral transforms of the region (Sec. 4.1).
        patch_batch: patches per CNN call.
        positions: (N, tile_px, tile_px) bool, the map pixels to compute (:func:`sparse_lattice_map`: only the
            lattice patches their grids read go through the CNN); the others are 0. None: every map pixel.
        origins, cache: with ``positions`` and without TTA, each region's (slide, ROI row, ROI column) and a
            :class:`LatticeFeatureCache`: the features of patches an earlier ROI of the slide computed are reused.

    Returns:
        (N, tile_px, tile_px) probabilities of the centre patch of the grid centred on each map pixel.
    """
    positions = _check_positions(positions, region, geometry)
    if not (hasattr(network, "patch_features") and hasattr(network, "grid_logits")):
        prob = naive_grid_map(network, region, geometry, tta=tta)  # an exported model: forward only
        return prob if positions is None else prob * positions
    _check_region(region, geometry, network)
    g, t = geometry.grid_size, geometry.tile_px
    cells = torch.arange(t, device=region.device)[:, None] + \
        torch.arange(g, device=region.device)[None, :] * geometry.grid_step  # (T, G) lattice rows/cols

    def scan(x: torch.Tensor, wanted: torch.Tensor | None = None) -> torch.Tensor:
        if wanted is not None:
            return sparse_lattice_map(network, x, geometry, wanted, patch_batch,
                                      origins=None if tta else origins, cache=None if tta else cache)
        features = lattice_features(network, x, geometry, patch_batch)  # (N, L, L, D)
        grids = features[:, cells[:, None, :, None], cells[None, :, None, :]]  # (N, T, T, G, G, D)
        logits = network.grid_logits(grids.reshape(-1, g * g, features.shape[-1]))
        return torch.sigmoid(logits[:, geometry.centre_index].float()).reshape(x.shape[0], t, t)

    return _dihedral_mean(scan, region, positions) if tta else scan(region, positions)


def naive_grid_map(network: nn.Module, region: torch.Tensor, geometry: LatticeGeometry,
                   tta: bool = False) -> torch.Tensor:
    """The same map as :func:`lattice_map`, cutting each grid's G*G patches and running the whole network per grid
    (each patch through the CNN up to G*G times). The reference the lattice path must equal."""
    _check_region(region, geometry, network)
    g, t, s, p = geometry.grid_size, geometry.tile_px, geometry.stride_px, geometry.patch_px
    o, crop, step = geometry.crop_offset_px, geometry.crop_px, geometry.grid_step

    def scan(x: torch.Tensor, wanted: torch.Tensor | None = None) -> torch.Tensor:
        rows = []
        for i in range(t):  # one network call per map row
            grids = []
            for j in range(t):
                patches = []
                for u in range(g):
                    for v in range(g):  # raster order; neighbours one patch (grid_step lattice steps) apart
                        top, left = (i + u * step) * s, (j + v * step) * s
                        window = x[:, :, top:top + p, left:left + p]
                        patches.append(window[:, :, o:o + crop, o:o + crop])
                grids.append(torch.stack(patches, 1))
            logits = network(torch.stack(grids, 1).flatten(0, 1))  # (N * T, G*G)
            rows.append(torch.sigmoid(logits[:, geometry.centre_index].float()).reshape(x.shape[0], t))
        return torch.stack(rows, 1)

    return _dihedral_mean(scan, region) if tta else scan(region)


class SpatialLSTMInferer(Inferer):
    """MONAI inferer for :class:`pathbundles.slide_inference.SlideROIDataset` ROI regions: the stride-64 map tile of
    centre-patch tumour probabilities, computed on a feature lattice (:func:`lattice_map`).

    Returns (N, 2, tile_px, tile_px): channel 0 normal, channel 1 tumour probability (what
    :class:`pathbundles.slide_inference.SlideMapWriter` reads by default). Build the dataset's grid with
    ``inferer.geometry.grid()``.

    Args:
        tile_px: map pixels per ROI side (16 gives 1024 px ROI strides and 1728 px reads at the defaults).
        grid_size, patch_px, crop_px, stride_px: as :class:`LatticeGeometry`.
        tta: average over the 8 dihedral transforms (the paper's test-time augmentation; 8x the work).
        patch_batch: patches per CNN call.

        tissue_grids_only: when called with ``positions`` (N, tile_px, tile_px) bool (the dataset's ``tissue_key``
            item, passed by ``monai.engines.PrepareBatchExtraInput({"positions": key})``), compute those map pixels
            only and leave the others 0 (:func:`sparse_lattice_map`); False: every map pixel, ``positions`` ignored.

    Attached to an engine (:meth:`attach`, the bundle lists it among its handlers) and called with the items'
    ``slide_index``, ``roi_row`` and ``roi_col`` as well, it keeps a :class:`LatticeFeatureCache` for the epoch:
    patches shared with the ROIs before (the lattice margins) go through the CNN once per slide, not once per ROI.
    """

    def __init__(self, tile_px: int = 16, grid_size: int = GRID_SIZE, patch_px: int = PATCH_PX,
                 crop_px: int = CROP_PX, stride_px: int = STRIDE_PX, tta: bool = True, patch_batch: int = 256,
                 tissue_grids_only: bool = True) -> None:
        super().__init__()
        if patch_batch < 1:
            raise ValueError(f"patch_batch must be >= 1, got {patch_batch}")
        self.geometry = LatticeGeometry(tile_px=tile_px, grid_size=grid_size, patch_px=patch_px, crop_px=crop_px,
                                        stride_px=stride_px)
        self.tta, self.patch_batch = flag(tta, "tta"), int(patch_batch)
        self.tissue_grids_only = flag(tissue_grids_only, "tissue_grids_only")
        self.cache: LatticeFeatureCache | None = None

    def attach(self, engine: Any) -> None:
        """A fresh :class:`LatticeFeatureCache` for each epoch of ``engine`` (one network state), none after it."""
        from ignite.engine import Events

        def fresh(_: Any) -> None:
            self.cache = LatticeFeatureCache()

        def drop(_: Any) -> None:
            self.cache = None

        engine.add_event_handler(Events.EPOCH_STARTED, fresh)
        engine.add_event_handler(Events.EPOCH_COMPLETED, drop)
        engine.add_event_handler(Events.EXCEPTION_RAISED, drop)

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, positions: Any = None,
                 slide_index: Any = None, roi_row: Any = None, roi_col: Any = None, **kwargs: Any) -> torch.Tensor:
        region = convert_to_tensor(inputs, track_meta=False)
        origins = None
        if self.cache is not None and slide_index is not None and roi_row is not None and roi_col is not None:
            origins = list(zip(*(torch.as_tensor(v).reshape(-1).tolist() for v in (slide_index, roi_row, roi_col))))
        prob = lattice_map(network, region, self.geometry, tta=self.tta, patch_batch=self.patch_batch,
                           positions=positions if self.tissue_grids_only else None, origins=origins,
                           cache=self.cache)
        return torch.stack([1 - prob, prob], 1)
