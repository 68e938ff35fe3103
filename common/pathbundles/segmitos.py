"""SegMitos (Li et al., 003_c658ffddaac44f63.txt): VGG16 FCN-32s/16s/8s trained with the concentric loss.

Network: the FCN recipe (Long, Shelhamer and Darrell), as in the released ``voc-fcn*`` Caffe nets: conv1_1 padding
100, ceil-mode 2x2 pools, fc6 a 7x7 convolution, fc7 1x1, score_fr 1x1; the skip variants fuse score_pool4 (crop 5)
and score_pool3 (crop 9); the output is cropped back to the input size (offsets 19 / 27 / 31), so any input size
gives an output of the same size.

Label (section 3.2): around each annotated centroid a disc of radius ``r`` is mitosis (1), the ring ``r < d <= R``
is ignored by the loss, the rest is background (0). The paper's random label draws ``r ~ U{10..17}`` px and
``R = r * U(1.5, 2.5)`` per mitosis and per sample (px at 0.25 um/px); r12R24, r15R30 (fixed) and r12, r15 (circle,
no ring) are its ablations.
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import Inferer
from monai.transforms import MapTransform, Randomizable
from monai.utils import convert_to_tensor
from torch import nn

from pathbundles.checkpoints import check_fit, read_weights
from pathbundles.checks import flag
from pathbundles.errors import InputError
from pathbundles.scannet import VGG16_LAYOUT

#: variant -> (kernel, stride) of the final upsampling and the crop offset of its output (FCN's voc-fcn* nets).
FINAL_UPSCORE = {"32s": (64, 32, 19), "16s": (32, 16, 27), "8s": (16, 8, 31)}
CONV1_PADDING_PX = 100  # lets any input size survive the 32x downsampling and fc6's 7x7 window
NET_STRIDE_PX = 32  # five 2x2 pools: the grid of fc6/score_fr samples on the input
#: the layers every variant shares (VGG16 convolutions, fc6, fc7, score_fr): what :func:`load_trunk` transfers
_TRUNK = ("to_pool3", "to_pool4", "to_pool5", "fc", "score_fr")
SKIP_CROP_PX = (5, 9)  # crop offsets of score_pool4 and score_pool3 against the upsampled scores they are added to


def bilinear_kernel(size: int) -> torch.Tensor:
    """The (size, size) bilinear upsampling filter of FCN's ``surgery.upsample_filt``.

    Args:
        size: kernel side in px; ``2 * factor`` for an upsampling by ``factor`` (4 -> the 2x kernel).
    """
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    ramp = 1 - (torch.arange(size, dtype=torch.float64) - center).abs() / factor
    return torch.outer(ramp, ramp).float()


def _bilinear_upsampler(channels: int, size: int, stride: int, learnable: bool) -> nn.ConvTranspose2d:
    """A per-class bilinear ConvTranspose2d without bias (FCN's Deconvolution + ``surgery.interp``).

    The weight is diagonal over classes (class c only feeds class c), so a learnable one can still learn to mix them.
    """
    up = nn.ConvTranspose2d(channels, channels, kernel_size=size, stride=stride, bias=False)
    with torch.no_grad():
        up.weight.zero_()
        kernel = bilinear_kernel(size)
        for c in range(channels):
            up.weight[c, c] = kernel
    up.weight.requires_grad_(learnable)
    return up


def _crop(x: torch.Tensor, offset: int, height: int, width: int) -> torch.Tensor:
    """FCN's Crop layer: ``x[..., offset:offset + height, offset:offset + width]``."""
    return x[:, :, offset:offset + height, offset:offset + width]


class SegMitosFCN(nn.Module):
    """VGG16 FCN-32s, -16s or -8s (FCN recipe; SegMitos section 3.1, Fig. 3). Logits (N, classes, H, W) for any H, W.

    Layer names follow the Caffe nets (``score_fr``, ``score_pool4``, ``upscore2``, ...) except that the final
    upsampling is ``upscore`` in every variant (FCN's upscore / upscore16 / upscore8), so that weights carry over
    between variants by name. ``score_pool4`` and ``score_pool3`` start at zero (FCN's staged training), so a finer
    net initialised with :meth:`from_coarser` starts from the coarser net's scores: its pre-upsampling score map is
    exactly the coarser one upsampled 2x, and its output differs only by interpolating in two bilinear steps
    instead of one (at most 1/8 of the scores' second difference per axis).

    Args:
        variant: "32s", "16s" or "8s": the stride in px of the score map before the final upsampling.
        num_classes: output channels (2: background, mitosis).
        width: multiplier of every VGG and fc6/fc7 channel count (1.0 = VGG16 / 4096; tests use narrow nets).
        in_channels: input image channels.
        dropout: dropout after fc6 and fc7, identity in eval mode.
        learnable_upsampling: the in-network 2x upsamplings (``upscore2``, ``upscore_pool4``) start bilinear and
            are trained, as the FCN paper describes (section 4.2); False freezes them, as the released Caffe nets do
            (lr_mult 0). The final upsampling is always fixed bilinear, as in both.
        batch_norm: BatchNorm after every VGG convolution (VGG16-BN), for training from scratch: the paper starts
            from an ImageNet/PASCAL FCN, which this project never downloads. In eval mode it is a per-channel
            affine map, so any input size still works.
    """

    def __init__(self, variant: str = "32s", num_classes: int = 2, width: float = 1.0, in_channels: int = 3,
                 dropout: float = 0.5, learnable_upsampling: bool = True, batch_norm: bool = False) -> None:
        super().__init__()
        if variant not in FINAL_UPSCORE:
            raise ValueError(f"variant must be one of {sorted(FINAL_UPSCORE)}, got {variant!r}")
        batch_norm = flag(batch_norm, "batch_norm")
        learnable_upsampling = flag(learnable_upsampling, "learnable_upsampling")
        self.variant, self.batch_norm = variant, batch_norm
        self.num_classes, self.width, self.in_channels = num_classes, width, in_channels
        # Three trunk stages ending at pool3, pool4 and pool5: the taps the skip variants score.
        stages: list[list[nn.Module]] = [[]]
        pool_channels: list[int] = []
        channels = in_channels
        for item in VGG16_LAYOUT:
            if item == "M":
                stages[-1].append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
                stages.append([])
                pool_channels.append(channels)
                continue
            out = max(1, round(int(item) * width))
            padding = CONV1_PADDING_PX if not stages[0] else 1  # conv1_1 is the first layer of stage 0
            stages[-1] += [nn.Conv2d(channels, out, kernel_size=3, padding=padding),
                           *([nn.BatchNorm2d(out)] if batch_norm else []), nn.ReLU(inplace=True)]
            channels = out
        self.to_pool3 = nn.Sequential(*stages[0], *stages[1], *stages[2])
        self.to_pool4 = nn.Sequential(*stages[3])
        self.to_pool5 = nn.Sequential(*stages[4])
        pool3_channels = pool_channels[2]
        fc = max(1, round(4096 * width))
        self.fc = nn.Sequential(
            nn.Conv2d(channels, fc, kernel_size=7), nn.ReLU(inplace=True), nn.Dropout(dropout),  # fc6
            nn.Conv2d(fc, fc, kernel_size=1), nn.ReLU(inplace=True), nn.Dropout(dropout),  # fc7
        )
        self.score_fr = nn.Conv2d(fc, num_classes, kernel_size=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
        # Near-zero score_fr: first logits near uniform instead of Kaiming-scale losses.
        nn.init.normal_(self.score_fr.weight, std=0.01)
        self.score_pool4: nn.Conv2d | None = None
        self.upscore2: nn.ConvTranspose2d | None = None
        self.score_pool3: nn.Conv2d | None = None
        self.upscore_pool4: nn.ConvTranspose2d | None = None
        if variant in ("16s", "8s"):
            self.score_pool4 = _zero_conv(channels, num_classes)
            self.upscore2 = _bilinear_upsampler(num_classes, 4, 2, learnable_upsampling)
        if variant == "8s":
            self.score_pool3 = _zero_conv(pool3_channels, num_classes)
            self.upscore_pool4 = _bilinear_upsampler(num_classes, 4, 2, learnable_upsampling)
        # Offsets as attributes, not module globals: TorchScript cannot read global ints.
        self.pool4_crop_px, self.pool3_crop_px = SKIP_CROP_PX
        size, stride, self.crop_px = FINAL_UPSCORE[variant]
        self.upscore = _bilinear_upsampler(num_classes, size, stride, learnable=False)

    def score_map(self, x: torch.Tensor) -> torch.Tensor:
        """Fused class scores before the final upsampling, at a stride of 32, 16 or 8 px (padded grid)."""
        pool3 = self.to_pool3(x)
        pool4 = self.to_pool4(pool3)
        score = self.score_fr(self.fc(self.to_pool5(pool4)))
        if self.upscore2 is not None and self.score_pool4 is not None:
            score = self.upscore2(score)
            score = score + _crop(self.score_pool4(pool4), self.pool4_crop_px, score.shape[2], score.shape[3])
        if self.upscore_pool4 is not None and self.score_pool3 is not None:
            score = self.upscore_pool4(score)
            score = score + _crop(self.score_pool3(pool3), self.pool3_crop_px, score.shape[2], score.shape[3])
        return score

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, classes, H, W) for images (N, in_channels, H, W)."""
        return _crop(self.upscore(self.score_map(x)), self.crop_px, x.shape[2], x.shape[3])

    @classmethod
    def from_coarser(cls, coarser: SegMitosFCN, variant: str, learnable_upsampling: bool = True) -> SegMitosFCN:
        """A finer FCN initialised from a trained coarser one (FCN's staged 32s -> 16s -> 8s training).

        Every layer of ``coarser`` except its final upsampling is copied (trunk, fc6, fc7, score_fr, and from a 16s
        also score_pool4 and upscore2); the new score layer is zero, so the new net starts where the coarser ended.

        Args:
            coarser: the trained 32s (or 16s) net; its width, classes and input channels are kept.
            variant: the finer variant ("16s" or "8s"), finer than ``coarser.variant``.
            learnable_upsampling: as in :class:`SegMitosFCN`.
        """
        order = list(FINAL_UPSCORE)
        if variant not in FINAL_UPSCORE or order.index(variant) <= order.index(coarser.variant):
            raise ValueError(f"variant must be finer than the coarser net's {coarser.variant!r}, got {variant!r}")
        finer = cls(variant, num_classes=coarser.num_classes, width=coarser.width, in_channels=coarser.in_channels,
                    dropout=coarser.fc[2].p, learnable_upsampling=learnable_upsampling,
                    batch_norm=coarser.batch_norm)
        shared = {k: v for k, v in coarser.state_dict().items() if not k.startswith("upscore.")}
        unexpected = finer.load_state_dict(shared, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"layers of the {coarser.variant} net not found in the {variant} net: {unexpected}")
        return finer


#: the paper's training chain: each variant starts from the trained net of the previous one
COARSER = {"16s": "32s", "8s": "16s"}

# The paper trains the random concentric label on FCN-32s only (Sec. 3.3: "we do not use the concentric label to
# train a 16s or 8s model"); the 32s -> 16s -> 8s chain on concentric labels is this project's extension.
DEFAULT_VARIANT = "32s"


def weights_filename(variant: str, default_variant: str = DEFAULT_VARIANT) -> str:
    """The file name of a variant's weights in a bundle's ``models/`` folder: ``model.pt`` for the variant the
    bundle runs by default (``default_variant``), ``model_<variant>.pt`` for the others (``model_8s.pt``)."""
    if variant not in FINAL_UPSCORE or default_variant not in FINAL_UPSCORE:
        raise ValueError(f"unknown SegMitos variant {variant!r} or {default_variant!r}: one of "
                         f"{', '.join(FINAL_UPSCORE)}")
    return "model.pt" if variant == default_variant else f"model_{variant}.pt"


def load_trunk(net: SegMitosFCN, ckpt: str) -> SegMitosFCN:
    """Start ``net`` from the trunk of trained weights of any variant (same width and normalisation): the VGG16
    convolutions, fc6, fc7 and score_fr. ``net``'s own skip score layers and upsamplings keep their initialisation.
    This stands in for the paper's start from a pre-trained FCN (this project downloads no weights).

    Raises:
        InputError: ``ckpt`` cannot be read, or its trunk does not fit ``net`` (another width, normalisation or
            network), naming it.
    """
    state = read_weights(ckpt)
    own = net.state_dict()
    trunk = {k: v for k, v in own.items() if k.split(".")[0] in _TRUNK}
    missing = sorted(k for k in trunk if k not in state)
    misfit = sorted(k for k in trunk if k in state and tuple(state[k].shape) != tuple(trunk[k].shape))
    if missing or misfit:
        raise InputError(ckpt, "its weights are not a SegMitos trunk of this network (width "
                               f"{net.width}, batch_norm {net.batch_norm}): "
                               + "; ".join(f"{what} {', '.join(keys[:4])}" for what, keys in
                                           (("missing", missing), ("other shape", misfit)) if keys))
    net.load_state_dict({**own, **{k: state[k] for k in trunk}})
    return net


def chain_network(variant: str = "32s", width: float = 1.0, coarser_ckpt: str | None = None, num_classes: int = 2,
                  dropout: float = 0.5, learnable_upsampling: bool = True, batch_norm: bool = False,
                  init_ckpt: str | None = None, trunk_ckpt: str | None = None) -> SegMitosFCN:
    """The network of one stage of the 32s -> 16s -> 8s chain (what the bundle's train.json builds).

    Args:
        variant: the stage to train.
        width, num_classes, dropout, learnable_upsampling, batch_norm: as in :class:`SegMitosFCN`.
        coarser_ckpt: checkpoint of the trained previous stage (``COARSER[variant]``), a state dict or a bundle
            checkpoint ``{"model": state_dict, "training": {...}}``; None starts from scratch (the 32s stage, or a
            finer net trained alone).

        init_ckpt: weights of this same variant to start from instead (fine-tuning, or more epochs of a stage);
            takes precedence over ``coarser_ckpt``.
        trunk_ckpt: weights of any variant whose trunk starts the network (:func:`load_trunk`), instead of
            ``coarser_ckpt``; ``init_ckpt`` takes precedence.

    Raises:
        FileNotFoundError: ``coarser_ckpt`` does not exist (train the previous stage first).
        InputError: a checkpoint that cannot be read or does not fit the network, naming it.
    """
    learnable_upsampling = flag(learnable_upsampling, "learnable_upsampling")
    batch_norm = flag(batch_norm, "batch_norm")
    if init_ckpt is not None:
        net = SegMitosFCN(variant, num_classes=num_classes, width=width, dropout=dropout,
                          learnable_upsampling=learnable_upsampling, batch_norm=batch_norm)
        state = read_weights(init_ckpt)
        check_fit(init_ckpt, net, state)
        net.load_state_dict(state)
        return net
    if trunk_ckpt is not None:
        return load_trunk(SegMitosFCN(variant, num_classes=num_classes, width=width, dropout=dropout,
                                      learnable_upsampling=learnable_upsampling, batch_norm=batch_norm), trunk_ckpt)
    if coarser_ckpt is None:
        return SegMitosFCN(variant, num_classes=num_classes, width=width, dropout=dropout,
                           learnable_upsampling=learnable_upsampling, batch_norm=batch_norm)
    if variant not in COARSER:
        raise ValueError(f"the {variant!r} stage has no coarser stage to start from (32s starts from scratch)")
    if not os.path.exists(coarser_ckpt):
        raise FileNotFoundError(f"{coarser_ckpt}: no {COARSER[variant]} checkpoint to start the {variant} stage from;"
                                f" train the {COARSER[variant]} stage first")
    state = read_weights(coarser_ckpt)
    coarser = SegMitosFCN(COARSER[variant], num_classes=num_classes, width=width, dropout=dropout,
                          learnable_upsampling=learnable_upsampling, batch_norm=batch_norm)
    check_fit(coarser_ckpt, coarser, state)
    coarser.load_state_dict(state)
    return SegMitosFCN.from_coarser(coarser, variant, learnable_upsampling=learnable_upsampling)


def _zero_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """A 1x1 score layer starting at zero (FCN: new skip layers must not perturb the trained coarser net)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def concentric_label(shape_hw: tuple[int, int], centroids_xy: np.ndarray | Sequence[Sequence[float]],
                     r_px: float | Sequence[float] | np.ndarray, R_px: float | Sequence[float] | np.ndarray | None = None,
                     ignore_index: int = 255) -> np.ndarray:
    """Concentric (or circle) label of mitosis centroids (section 3.2).

    A pixel (row y, column x) at distance ``d`` from a centroid is mitosis (1) if ``d <= r``, ignored
    (``ignore_index``) if ``r < d <= R``, background (0) otherwise; where discs and rings of several centroids
    overlap, mitosis wins over ring wins over background.

    Args:
        shape_hw: (H, W) of the label in px.
        centroids_xy: (K, 2) centroids as (x, y) = (column, row) in px of the label (pixel centres at integers).
        r_px: inner radius in px, one for all or one per centroid.
        R_px: outer radius in px, one or one per centroid; None = circle label (no ring).
        ignore_index: value of the ring pixels (must not be 0 or 1).
    """
    height, width = shape_hw
    label = np.zeros((height, width), dtype=np.uint8)
    xy = np.asarray(centroids_xy, dtype=np.float64).reshape(-1, 2)
    r = np.broadcast_to(np.asarray(r_px, dtype=np.float64), (len(xy),))
    outer = r if R_px is None else np.broadcast_to(np.asarray(R_px, dtype=np.float64), (len(xy),))
    if ignore_index in (0, 1):
        raise ValueError(f"ignore_index must differ from the classes 0 and 1, got {ignore_index}")
    if np.any(outer < r):
        raise ValueError(f"outer radii R_px {outer} must be >= the inner radii r_px {r}")
    mitosis = np.zeros((height, width), dtype=bool)
    for (x, y), r_in, r_out in zip(xy, r, outer):
        # Only the bounding box of the outer circle can change, which keeps large HPFs cheap.
        y0, y1 = max(0, math.floor(y - r_out)), min(height, math.ceil(y + r_out) + 1)
        x0, x1 = max(0, math.floor(x - r_out)), min(width, math.ceil(x + r_out) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        d2 = (np.arange(y0, y1)[:, None] - y) ** 2 + (np.arange(x0, x1)[None, :] - x) ** 2
        label[y0:y1, x0:x1][d2 <= r_out ** 2] = ignore_index
        mitosis[y0:y1, x0:x1] |= d2 <= r_in ** 2
    label[mitosis] = 1
    return label


class RandConcentricLabeld(Randomizable, MapTransform):
    """Build the SegMitos label of an image from its mitosis centroids, with fresh random radii on every call.

    The label is required on every sample, so this is ``Randomizable`` without an apply-probability. The output is
    a (1, H, W) uint8 tensor (1 mitosis, 0 background, ``ignore_index`` ring).

    Args:
        keys_centroids: key of the (K, 2) centroids as (x, y) in px of the image (after any spatial transform).
        image_key: key of the channel-first (C, H, W) image that gives the label size.
        label_key: key the label is written to.
        mode: "random" (r, R drawn per mitosis per call), "fixed" (r = fixed_r_px, R = fixed_R_px) or "circle"
            (r = fixed_r_px, no ring).
        r_px: inclusive range of the integer inner radius in px for "random" (the paper: 10..17 at 0.25 um/px).
        R_scale: range of R / r for "random" (the paper: 1.5..2.5).
        fixed_r_px, fixed_R_px: radii in px for "fixed" and "circle" (r12R24, r15R30; r12, r15).
        mpp: the image's resolution in um/px; only used with ``r_um``.
        r_um: radii in um instead of px: an inclusive (lo, hi) range for "random", one radius for "fixed"/"circle"
            ("fixed" keeps the ratio fixed_R_px / fixed_r_px). Converted with ``mpp``.
        ignore_index: label value of the ring (what :class:`ConcentricLoss` ignores).
    """

    def __init__(self, keys_centroids: str = "centroids", image_key: str = "image", label_key: str = "label",
                 mode: str = "random", r_px: tuple[int, int] = (10, 17), R_scale: tuple[float, float] = (1.5, 2.5),
                 fixed_r_px: float = 12, fixed_R_px: float = 24, mpp: float = 0.25,
                 r_um: float | tuple[float, float] | None = None, ignore_index: int = 255) -> None:
        MapTransform.__init__(self, keys_centroids)
        if mode not in ("random", "fixed", "circle"):
            raise ValueError(f"mode must be 'random', 'fixed' or 'circle', got {mode!r}")
        self.centroids_key, self.image_key, self.label_key = keys_centroids, image_key, label_key
        self.mode, self.R_scale, self.ignore_index = mode, R_scale, ignore_index
        self.r_range = r_px
        self.fixed_r, self.fixed_R = float(fixed_r_px), float(fixed_R_px)
        if r_um is not None:
            if mode == "random":
                lo, hi = r_um
                self.r_range = (round(lo / mpp), round(hi / mpp))
            else:
                self.fixed_r, self.fixed_R = float(r_um) / mpp, float(r_um) / mpp * fixed_R_px / fixed_r_px
        self.radii: tuple[np.ndarray, np.ndarray | None] = (np.zeros(0), None)

    def randomize(self, n_centroids: int) -> None:
        """Draw (r, R) per centroid in px for the next label."""
        if self.mode == "random":
            r = self.R.randint(self.r_range[0], self.r_range[1] + 1, size=n_centroids).astype(np.float64)
            self.radii = (r, r * self.R.uniform(self.R_scale[0], self.R_scale[1], size=n_centroids))
        else:
            r = np.full(n_centroids, self.fixed_r)
            self.radii = (r, np.full(n_centroids, self.fixed_R) if self.mode == "fixed" else None)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        out = dict(data)
        xy = np.asarray(out[self.centroids_key], dtype=np.float64).reshape(-1, 2)
        self.randomize(len(xy))
        shape_hw = tuple(int(s) for s in np.shape(out[self.image_key])[-2:])
        label = concentric_label(shape_hw, xy, self.radii[0], self.radii[1], self.ignore_index)
        out[self.label_key] = torch.from_numpy(label[None])
        return out


class RandMitosisAugmentd(Randomizable, MapTransform):
    """The paper's augmentation (section 3.1.4, 4.2): many more variants of crops holding a mitosis than of others.

    A crop with at least one centroid (positive) is rotated by one of ``positive_angles`` equally spaced angles,
    translated by one of the 9 offsets ``{-t, 0, t}^2`` px and mirrored with probability 1/2 (16 x 9 x 2 = 288
    variants with the defaults, as in the paper); a crop without (negative) is rotated by a multiple of 90 degrees
    and mirrored (8 variants). Rotations other than multiples of 90 degrees and translations reflect the image at
    its border. Image and label move together (bilinear image, nearest label); apply it after the label is built
    (:class:`RandConcentricLabeld`), so the centroids need not move.

    Args:
        keys: image and label keys, e.g. ``["image", "label"]``.
        centroids_key: key of the (K, 2) centroids that tell positive crops from negative ones.
        positive_angles: number of equally spaced rotation angles of positive crops.
        translate_px: translation step t of positive crops, px.
        modes: interpolation per key ("bilinear" for images, "nearest" for labels).
    """

    def __init__(self, keys: Sequence[str] = ("image", "label"), centroids_key: str = "centroids",
                 positive_angles: int = 16, translate_px: int = 32,
                 modes: Sequence[str] = ("bilinear", "nearest")) -> None:
        MapTransform.__init__(self, keys)
        if len(modes) != len(self.keys):
            raise ValueError(f"one interpolation mode per key: {len(self.keys)} keys, {len(modes)} modes")
        self.centroids_key, self.positive_angles, self.translate_px = centroids_key, positive_angles, translate_px
        self.modes = tuple(modes)
        self.angle, self.shift, self.mirror = 0.0, (0, 0), False

    def randomize(self, positive: bool) -> None:
        """Draw the next variant: (angle in radians, (dx, dy) px, mirror)."""
        if positive:
            self.angle = 2 * math.pi * int(self.R.randint(self.positive_angles)) / self.positive_angles
            self.shift = tuple(int(v) * self.translate_px for v in self.R.randint(-1, 2, size=2))
        else:
            self.angle, self.shift = math.pi / 2 * int(self.R.randint(4)), (0, 0)
        self.mirror = bool(self.R.randint(2))

    def _apply(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        quarter = self.angle / (math.pi / 2)
        if self.shift == (0, 0) and abs(quarter - round(quarter)) < 1e-9:
            x = torch.rot90(x, k=round(quarter) % 4, dims=(-2, -1))  # exact: no resampling for 90-degree turns
        else:
            from monai.transforms import Affine

            affine = Affine(rotate_params=self.angle, translate_params=(self.shift[1], self.shift[0]),
                            padding_mode="reflection", mode=mode, image_only=True)
            # Plain tensors out of both branches, so items collate (MONAI's Affine returns a MetaTensor).
            x = convert_to_tensor(affine(x.float()), track_meta=False).to(x.dtype)
        return torch.flip(x, dims=(-1,)) if self.mirror else x

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        out = dict(data)
        self.randomize(positive=len(np.asarray(out[self.centroids_key]).reshape(-1, 2)) > 0)
        for key, mode in zip(self.keys, self.modes):
            out[key] = self._apply(torch.as_tensor(out[key]), mode)
        return out


class ConcentricLoss(nn.Module):
    """The concentric loss (Eq. 1): softmax cross-entropy averaged over the pixels outside the ignored rings.

    The paper's L2 term is the optimiser's weight decay. With class ``weight`` the mean is weighted, as in
    ``F.cross_entropy``. A batch with every pixel ignored gives 0 (not NaN), so it cannot poison training.

    Args:
        ignore_index: label value of the ring pixels.
        weight: optional per-class weights (C,).
    """

    def __init__(self, ignore_index: int = 255, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Args: logits (N, C, H, W); target (N, H, W) or (N, 1, H, W) class indices or ``ignore_index``."""
        if target.ndim == logits.ndim:
            target = target[:, 0]
        target = target.long()
        if not bool((target != self.ignore_index).any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits, target, weight=self.weight, ignore_index=self.ignore_index)


class SegMitosInferer(Inferer):
    """MONAI inferer: class probabilities (N, C, H, W) of a SegMitos FCN, in one pass or in stitched tiles.

    Tiling keeps the centre of overlapping tiles: each output pixel comes from the one tile whose core holds it,
    at least ``overlap_px`` from that tile's inner edges; tile origins lie on the network's 32 px grid so the pooling
    grid matches the whole-image pass. A pixel's logit depends on about +-250 px of input (fc6's 404 px receptive
    field plus the final upsampling), so with ``overlap_px >= 256`` tiles reproduce the whole-image pass up to float
    rounding. (Gaussian-blended sliding windows, MONAI's alternative, average context-dependent predictions and
    never match the one-pass map.)

    Args:
        tile_px: tile side in px (a multiple of 32, > 2 * overlap_px); None = the whole image in one pass (the
            paper's image-to-image inference).
        overlap_px: context in px kept around each tile's core (a multiple of 32).
        whole_max_px: with ``tile_px``, images whose height and width are both <= this still go in one pass
            (the whole HPF when it fits in memory, tiles only beyond); None = always tile.
    """

    def __init__(self, tile_px: int | None = None, overlap_px: int = 256, whole_max_px: int | None = None) -> None:
        super().__init__()
        if tile_px is not None and (tile_px % NET_STRIDE_PX or overlap_px % NET_STRIDE_PX
                                    or tile_px <= 2 * overlap_px):
            raise ValueError(f"tile_px ({tile_px}) and overlap_px ({overlap_px}) must be multiples of "
                                 f"{NET_STRIDE_PX} px with tile_px > 2 * overlap_px")
        self.tile_px, self.overlap_px, self.whole_max_px = tile_px, overlap_px, whole_max_px

    def _spans(self, size: int, tile_px: int) -> list[tuple[int, int, int, int]]:
        """(tile start, tile end, core start, core end) in px along one axis of ``size`` px."""
        core = tile_px - 2 * self.overlap_px
        return [(max(0, c - self.overlap_px), min(size, c + core + self.overlap_px), c, min(size, c + core))
                for c in range(0, size, core)]

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs) -> torch.Tensor:
        tile_px = self.tile_px
        if self.whole_max_px is not None and max(inputs.shape[-2:]) <= self.whole_max_px:
            tile_px = None
        if tile_px is None:
            return torch.softmax(network(inputs, *args, **kwargs).float(), dim=1)
        out: torch.Tensor | None = None
        for y0, y1, cy0, cy1 in self._spans(inputs.shape[-2], tile_px):
            for x0, x1, cx0, cx1 in self._spans(inputs.shape[-1], tile_px):
                prob = torch.softmax(network(inputs[..., y0:y1, x0:x1], *args, **kwargs).float(), dim=1)
                if out is None:
                    out = prob.new_empty((*prob.shape[:2], *inputs.shape[-2:]))
                out[..., cy0:cy1, cx0:cx1] = prob[..., cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
        if out is None:
            raise ValueError(f"cannot infer on an empty image of shape {tuple(inputs.shape)}")
        return out
