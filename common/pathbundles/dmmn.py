"""Deep Multi-Magnification Networks (Ho et al., 004_01b453305fb6e6d6.txt): DMMN-M3 and its baselines.

Every variant is built from U-Net parts with widths ``(32, 64, 128, 256, 512)`` (U-Net halved): CONV BLOCK = two
3x3 convolutions with ReLU (no BatchNorm), 2x2 max-pools, CONV_TR_2 = ConvTranspose(3, stride 2, padding 1,
output padding 1) + ReLU (CONV_TR_4 = two of them), CONV_FINAL = 3x3 conv + ReLU, then 1x1 to the classes. All three
inputs are 256 x 256: 20x = the centre 256 of a 1024 tile at 20x, 10x = its centre 512 downsampled 2x, 5x = the
whole tile downsampled 4x (see :func:`pathbundles.multimag.read_concentric`).

Variants (Fig. 4):

- ``S2`` (DSMN-S2): one U-Net on the 20x patch.
- ``MS`` (DMMN-MS): three encoders, one decoder. The paper's figure is not in the text; here the 10x and 5x
  bottlenecks are centre-cropped to the 20x field of view, brought to 16 x 16 by CONV_TR_2 / CONV_TR_4 and
  concatenated to the 20x bottleneck (the one place three encoders can meet a single decoder without extra skips).
- ``M2S`` (DMMN-M2S): three U-Nets; their last decoder maps are centre-cropped, brought to 256 x 256 by
  CONV_TR_2 / CONV_TR_4 and concatenated only before CONV_FINAL.
- ``M3`` (DMMN-M3): three U-Nets; before each 20x transposed convolution the 20x decoder input is concatenated with
  centre crops of the 10x and 5x decoder maps of the same resolution (crop rate 2 and 4, no upsampling needed):
  ``up4: 896 -> 256, up3: 448 -> 128, up2: 224 -> 64, up1: 96 -> 32`` at width 1 (no 5x map at up1).

Class convention: the network has one output channel per real class; channel ``k`` is class ``k + 1``, so
``logits.argmax(1) + 1`` is a label map in the convention of :mod:`pathbundles.metrics.segmentation` and of the
phantom (0 = unannotated, never predicted; 1..C = classes; the phantom's C = 6 includes "background" = glass).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from pathbundles.checks import flag

#: U-Net widths of the paper (the original U-Net's halved), from the first encoder stage to the bottleneck.
UNET_WIDTHS: tuple[int, ...] = (32, 64, 128, 256, 512)
VARIANTS: tuple[str, ...] = ("S2", "MS", "M2S", "M3")


def _conv_block(cin: int, cout: int, batch_norm: bool = False) -> nn.Sequential:
    """CONV BLOCK: two 3x3 convolutions (padding 1), each followed by ReLU (with ``batch_norm``, BatchNorm first)."""
    layers: list[nn.Module] = []
    for c_in in (cin, cout):
        layers += [nn.Conv2d(c_in, cout, 3, padding=1), *([nn.BatchNorm2d(cout)] if batch_norm else []),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _conv_tr(cin: int, cout: int, rate: int) -> nn.Sequential:
    """CONV_TR_rate: ``log2(rate)`` transposed convolutions (3x3, stride 2), each doubling the size, with ReLU."""
    layers: list[nn.Module] = []
    for step in range(int(np.log2(rate))):
        layers += [nn.ConvTranspose2d(cin if step == 0 else cout, cout, 3, stride=2, padding=1, output_padding=1),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def centre_crop(x: torch.Tensor, rate: int) -> torch.Tensor:
    """The centre ``1 / rate`` of a (N, C, H, W) feature map in both directions (the paper's red arrows)."""
    h, w = x.shape[-2] // rate, x.shape[-1] // rate
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., top:top + h, left:left + w]


class _Encoder(nn.Module):
    """U-Net encoder: a CONV BLOCK per stage with a max-pool before every stage but the first."""

    def __init__(self, in_channels: int, widths: Sequence[int], batch_norm: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_conv_block(cin, cout, batch_norm)
                                    for cin, cout in zip([in_channels, *widths[:-1]], widths))
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features of every stage, finest (256 x 256) first, bottleneck (16 x 16) last."""
        features = []
        for i, block in enumerate(self.blocks):
            x = block(self.pool(x) if i > 0 else x)
            features.append(x)
        return features


class _UpStage(nn.Module):
    """Decoder stage: CONV_TR_2 of the (possibly concatenated) input, then the encoder skip, then a CONV BLOCK."""

    def __init__(self, cin: int, cout: int, batch_norm: bool = False) -> None:
        super().__init__()
        self.up = _conv_tr(cin, cout, 2)
        self.block = _conv_block(2 * cout, cout, batch_norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.up(x), skip], dim=1))


class _Decoder(nn.Module):
    """U-Net decoder of four stages (up4 .. up1); ``extra[i]`` channels join the input of stage i (M3, MS)."""

    def __init__(self, widths: Sequence[int], extra: Sequence[int] = (0, 0, 0, 0), batch_norm: bool = False) -> None:
        super().__init__()
        self.stages = nn.ModuleList(_UpStage(widths[4 - i] + extra[i], widths[3 - i], batch_norm) for i in range(4))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Outputs of up4 (32 x 32) .. up1 (256 x 256) for encoder ``features``."""
        x, outputs = features[-1], []
        for i, stage in enumerate(self.stages):
            x = stage(x, features[3 - i])
            outputs.append(x)
        return outputs


class DMMN(nn.Module):
    """A DMMN variant (``M3``, ``M2S``, ``MS``) or the single-magnification baseline ``S2``.

    ``forward(x20, x10, x5)`` takes three (N, in_channels, 256, 256) float tensors, or one tensor with the three
    views stacked on the channel axis (``S2`` ignores x10 and x5, so every variant has one signature) and returns (N, num_classes, 256, 256) logits for the 20x patch; channel k is
    class k + 1 (label 0 = unannotated is not a class).

    Args:
        variant: "M3", "M2S", "MS" or "S2".
        num_classes: C, the real classes (6 for the paper's TNBC set and the multi-class phantom).
        width: multiplier of every channel count (1.0 = the paper; tests and demos use narrow models).
        in_channels: input image channels.
        batch_norm: BatchNorm after every convolution of the CONV BLOCKs (not the paper's, which has none; the
            narrow demo networks train far faster and more reliably with it on a CPU budget).
    """

    def __init__(self, variant: str = "M3", num_classes: int = 6, width: float = 1.0, in_channels: int = 3,
                 batch_norm: bool = False) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"DMMN variant {variant!r}: expected one of {VARIANTS}")
        self.variant, self.in_channels = variant, int(in_channels)
        c = [max(1, round(w * width)) for w in UNET_WIDTHS]
        self.widths = tuple(c)
        bn = flag(batch_norm, "batch_norm")
        self.enc20 = _Encoder(in_channels, c, bn)
        # Parts a variant lacks are None, not missing: TorchScript compiles every branch of forward and drops only
        # those guarded by ``is None`` on a None attribute (a string comparison with the variant is not pruned).
        self.enc10: _Encoder | None = None
        self.enc5: _Encoder | None = None
        self.dec10: _Decoder | None = None
        self.dec5: _Decoder | None = None
        self.tr10: nn.Sequential | None = None
        self.tr5: nn.Sequential | None = None
        if variant != "S2":
            self.enc10, self.enc5 = _Encoder(in_channels, c, bn), _Encoder(in_channels, c, bn)
        if variant in ("M2S", "M3"):
            self.dec10, self.dec5 = _Decoder(c, batch_norm=bn), _Decoder(c, batch_norm=bn)
        if variant == "MS":
            self.tr10, self.tr5 = _conv_tr(c[4], c[4], 2), _conv_tr(c[4], c[4], 4)
            self.dec20 = _Decoder(c, extra=(2 * c[4], 0, 0, 0), batch_norm=bn)
        elif variant == "M3":
            # Stage i takes the 10x map of its own stage (c[3 - i]) and the 5x map one stage later (c[2 - i]).
            self.dec20 = _Decoder(c, extra=(c[3] + c[2], c[2] + c[1], c[1] + c[0], c[0]), batch_norm=bn)
        else:
            self.dec20 = _Decoder(c, batch_norm=bn)
        if variant == "M2S":
            self.tr10, self.tr5 = _conv_tr(c[0], c[0], 2), _conv_tr(c[0], c[0], 4)
        final_in = 3 * c[0] if variant == "M2S" else c[0]
        self.final = nn.Sequential(nn.Conv2d(final_in, c[0], 3, padding=1), nn.ReLU(inplace=True),
                                   nn.Conv2d(c[0], num_classes, 1))
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                # He init: with ~30 ReLU layers and no BatchNorm, PyTorch's default init shrinks activations to ~0.
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x20: torch.Tensor, x10: torch.Tensor | None = None,
                x5: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (N, C, 256, 256) of the 20x view.

        Either three views ``(x20, x10, x5)``, or one tensor ``x20`` of (N, 3 * in_channels, 256, 256) holding the
        views stacked on the channel axis, 20x first (what the bundles feed, so that MONAI's single-input
        workflows, ``verify_net_in_out`` and TorchScript see one image).
        """
        if x10 is None or x5 is None:
            if x20.shape[1] != 3 * self.in_channels:
                raise ValueError(f"one input must stack the 20x, 10x and 5x views on the channel axis: expected "
                                 f"{3 * self.in_channels} channels, got {x20.shape[1]}")
            c = self.in_channels
            x20, x10, x5 = x20[:, :c], x20[:, c:2 * c], x20[:, 2 * c:]
        f20 = self.enc20(x20)
        # The variant is told by which parts exist (see __init__): S2 has no 10x/5x encoders, MS no 10x/5x
        # decoders, M2S transposed convolutions at the end, M3 none.
        if self.enc10 is None or self.enc5 is None:
            return self.final(self.dec20(f20)[-1])
        f10, f5 = self.enc10(x10), self.enc5(x5)
        if self.dec10 is None or self.dec5 is None:
            bottleneck = torch.cat([f20[4], self.tr10(centre_crop(f10[4], 2)), self.tr5(centre_crop(f5[4], 4))], 1)
            return self.final(self.dec20(f20[:4] + [bottleneck])[-1])
        d10, d5 = self.dec10(f10), self.dec5(f5)
        if self.tr10 is not None and self.tr5 is not None:
            return self.final(torch.cat([self.dec20(f20)[-1], self.tr10(centre_crop(d10[-1], 2)),
                                         self.tr5(centre_crop(d5[-1], 4))], 1))
        x = f20[4]
        for i, stage in enumerate(self.dec20.stages):
            parts = [x, centre_crop(d10[i], 2)]
            if i < 3:
                parts.append(centre_crop(d5[i + 1], 4))
            x = stage(torch.cat(parts, 1), f20[3 - i])
        return self.final(x)


def labels_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) logits -> (N, H, W) long labels 1..C (channel k is class k + 1)."""
    return logits.argmax(1) + 1


def class_weights(label_counts: Sequence[float] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """Eq. 2: ``w_c = 1 - N_c / sum_c N_c``.

    Args:
        label_counts: N_c, annotated pixels of classes 1..C in the training set (unannotated pixels not counted).

    Returns:
        float32 (C,) weights, in channel order (class c at index c - 1).
    """
    counts = torch.as_tensor(np.asarray(label_counts, dtype=np.float64))
    if counts.ndim != 1 or (counts < 0).any() or counts.sum() <= 0:
        raise ValueError(f"label_counts must be C non-negative pixel counts with a positive sum, got {counts.tolist()}")
    return (1.0 - counts / counts.sum()).float()


def label_counts(labels: np.ndarray | torch.Tensor, num_classes: int) -> np.ndarray:
    """N_c of classes 1..C in a label array (any shape; 0 = unannotated is not counted) as int64 (C,)."""
    values = np.asarray(labels).ravel().astype(np.int64)
    return np.bincount(values, minlength=num_classes + 1)[1:num_classes + 1]


class WeightedCELoss(nn.Module):
    """Eq. 1: ``L = -1/N sum_p sum_c w_c t_c(p) log p_c(p)`` over the N pixels of the batch of patches.

    Unannotated pixels (target 0) contribute nothing but, as in Eq. 1, still count in N, so a patch weighs in
    proportion to how much of it is annotated. Targets 1..C select logit channels 0..C-1.

    Args:
        weight: (C,) class weights (:func:`class_weights`); None = all 1.
    """

    def __init__(self, weight: torch.Tensor | Sequence[float] | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Args: logits (N, C, H, W); target (N, H, W) or (N, 1, H, W) long labels 0..C."""
        if target.ndim == logits.ndim:
            target = target[:, 0]
        target = target.long()
        annotated = target > 0
        log_p = torch.log_softmax(logits.float(), dim=1)
        # Unannotated pixels pick channel 0 here and are then zeroed by the mask.
        channel = (target - 1).clamp(min=0)
        picked = log_p.gather(1, channel.unsqueeze(1))[:, 0]
        weight = self.weight[channel] if self.weight is not None else torch.ones_like(picked)
        return -(weight * picked * annotated).sum() / target.numel()


def training_class_weights(dataset: object, num_classes: int, output_dir: str | None = None) -> torch.Tensor:
    """Eq. 2 weights from the annotated pixels of a training :class:`~pathbundles.multimag.MultiMagnificationDataset`.

    N_c counts the annotated pixels of class c over the distinct training tiles (their 20x targets, before the
    elastic copies of class balancing), i.e. over the training annotations as the network sees them. With
    ``output_dir`` the counts and weights are also written to ``output_dir/class_weights.json``, so a run records
    the weights it trained with.

    Args:
        dataset: a training-mode ``MultiMagnificationDataset``.
        num_classes: C (labels 1..C).
        output_dir: folder for ``class_weights.json``, or None.

    Returns:
        float32 (C,) weights in channel order.
    """
    import json
    from pathlib import Path

    from pathbundles.atomic import atomic_path

    counts = np.zeros(num_classes, np.int64)
    mpp, size = dataset.mpps[0], dataset.patch_px
    for index, x0, y0, _ in dataset.tiles:
        labels_at = dataset.slides[int(index)].labels_at
        counts += label_counts(labels_at((float(x0), float(y0)), size, mpp), num_classes)
    weights = class_weights(counts)
    if output_dir is not None:
        path = Path(output_dir) / "class_weights.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        report = {"label_pixels": {str(c + 1): int(n) for c, n in enumerate(counts)},
                  "weights": {str(c + 1): float(w) for c, w in enumerate(weights)},
                  "formula": "w_c = 1 - N_c / sum(N_c) (Eq. 2), N_c over the distinct training tiles"}
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return weights


def label_map(logits: torch.Tensor) -> torch.Tensor:
    """(C, H, W) logits of one patch -> (1, H, W) long labels 1..C (a post-processing ``Lambdad`` function)."""
    return labels_from_logits(logits.unsqueeze(0))
