"""ScanNet (Lin et al., 000_afe5d6015f3eea2d.txt): a padding-free VGG16 FCN and its dense scanning geometry.

The network is the paper's Table 1: VGG16 convolutions and max-pools with no padding, then conv6 (2x2 -> 1024),
conv7 (1x1 -> 1024), conv8 (1x1 -> classes) with ReLU between them. A 244 px input gives one prediction; an input
of ``244 + 32 k`` px gives ``k + 1`` predictions per side, each exactly the prediction the same network makes on the
244 px patch at offset ``32 j`` (the property that makes FCN scanning valid).

Dense reconstruction (Eq. 2-3): with dense coefficient ``alpha`` the ROI is scanned ``alpha**2`` times at offsets
``(i * Sd, j * Sd)``, ``Sd = Sf / alpha``, and the offset probability tiles are interleaved into one tile of stride
``Sd``. Map index ``k`` lies at ``k * Sd + Lf / 2`` pixels (Eq. 4), in pixels of the scanning resolution.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.inferers import Inferer
from torch import nn

from pathbundles.atomic import atomic_path
from pathbundles.checks import flag, probability
from pathbundles.distributed import is_first_rank
from pathbundles.slide_inference import MapGrid

#: VGG16 convolution widths; "M" is a 2x2 max-pool with stride 2.
VGG16_LAYOUT: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                       512, 512, 512, "M", 512, 512, 512, "M")
logger = logging.getLogger(__name__)

PATCH_PX = 244  # Lf: the inner input size (Table 1)
INNER_STRIDE_PX = 32  # Sf: five 2x2 pools


class ScanNet(nn.Module):
    """The ScanNet FCN: padding-free VGG16 features, conv6 2x2, conv7 1x1, conv8 1x1 (Table 1).

    Args:
        num_classes: output channels of conv8 (2: normal, tumour).
        width: multiplier of every channel count (1.0 = the paper's VGG16 / 1024; the demo ships a narrow model).
        in_channels: input image channels.
        batch_norm: BatchNorm after every convolution of the VGG part (VGG16-BN). The paper starts from ImageNet
            VGG16 without it; training from scratch (no weights can be downloaded here) converges far better with
            it. In eval mode it is a per-channel affine map, so FCN/patch equivalence still holds.
        dropout: dropout after conv6 and conv7 (VGG's fc6/fc7), identity in eval mode.
    """

    def __init__(self, num_classes: int = 2, width: float = 1.0, in_channels: int = 3, batch_norm: bool = False,
                 dropout: float = 0.5) -> None:
        super().__init__()
        batch_norm = flag(batch_norm, "batch_norm")
        layers: list[nn.Module] = []
        channels = in_channels
        for item in VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            out = max(1, round(int(item) * width))
            layers.append(nn.Conv2d(channels, out, kernel_size=3, padding=0))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU(inplace=True))
            channels = out
        self.features = nn.Sequential(*layers)
        fc = max(1, round(1024 * width))
        self.classifier = nn.Sequential(
            nn.Conv2d(channels, fc, kernel_size=2),  # conv6
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Conv2d(fc, fc, kernel_size=1),  # conv7
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Conv2d(fc, num_classes, kernel_size=1),  # conv8
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
        # Start conv8 near zero so the first logits are near uniform (a Kaiming-scaled conv8 gives losses ~10).
        nn.init.normal_(self.classifier[-1].weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, classes, h, w) with ``h = (H - 244) // 32 + 1``; (N, classes, 1, 1) for 244 px patches."""
        return self.classifier(self.features(x))


@dataclass(frozen=True)
class ScanGeometry:
    """Sizes of ScanNet's ROI scanning at the scanning resolution (Eq. 1-4). All sizes in pixels at that mpp.

    Args:
        lp: side of the network's output tile per ROI (``Lp``); the ROI side is ``Lr = Lf + (Lp - 1) * Sf``.
        alpha: dense coefficient (1, 2, 4, ...); the map stride is ``Sd = Sf / alpha``.
        patch_px: the inner input size ``Lf`` (244).
        inner_stride_px: the inner stride ``Sf`` (32).
    """

    lp: int
    alpha: int = 1
    patch_px: int = PATCH_PX
    inner_stride_px: int = INNER_STRIDE_PX

    def __post_init__(self) -> None:
        if self.lp < 1:
            raise ValueError(f"lp must be >= 1, got {self.lp}")
        if self.alpha < 1 or self.inner_stride_px % self.alpha:
            raise ValueError(f"alpha must divide the inner stride {self.inner_stride_px}, got {self.alpha}")

    @property
    def roi_px(self) -> int:
        """``Lr``: the side of one offset ROI fed to the network."""
        return self.patch_px + (self.lp - 1) * self.inner_stride_px

    @property
    def roi_stride_px(self) -> int:
        """``Sr = Sf * Lp``: the stride between ROIs, so that their tiles stitch without gaps or overlaps."""
        return self.inner_stride_px * self.lp

    @property
    def dense_stride_px(self) -> int:
        """``Sd = Sf / alpha``: the distance between neighbouring map pixels."""
        return self.inner_stride_px // self.alpha

    @property
    def read_px(self) -> int:
        """Side of the region read per ROI: the ROI plus the largest offset ``(alpha - 1) * Sd``."""
        return self.roi_px + (self.alpha - 1) * self.dense_stride_px

    @property
    def tile_px(self) -> int:
        """Side of one dense probability tile (map pixels per ROI): ``alpha * Lp``."""
        return self.alpha * self.lp

    def grid(self) -> MapGrid:
        """The ROI/map geometry for :class:`pathbundles.slide_inference.SlideROIDataset` and its writer."""
        return MapGrid(read_px=self.read_px, roi_stride_px=self.roi_stride_px, tile_px=self.tile_px,
                       map_step_px=self.dense_stride_px, map_origin_px=self.patch_px / 2)

    def map_to_image(self, k: float) -> float:
        """Eq. (4): map index ``k`` -> pixel (patch centre) at the scanning resolution: ``k * Sd + Lf / 2``."""
        return k * self.dense_stride_px + self.patch_px / 2


def dense_scan(net: nn.Module, region: torch.Tensor, geometry: ScanGeometry) -> torch.Tensor:
    """Run ScanNet densely over a batch of ROI regions and interleave the offset tiles (Eq. 2-3).

    Args:
        net: a ScanNet returning logits (N, C, h, w).
        region: (N, 3, read_px, read_px) images at the scanning resolution, already normalised.
        geometry: the scan geometry (``read_px``, ``alpha``, ``Sd``).

    Returns:
        (N, C, alpha * Lp, alpha * Lp) logits; output pixel (h', w') is the patch at offset
        ``(h' * Sd, w' * Sd)`` of the region.
    """
    alpha, sd, lr = geometry.alpha, geometry.dense_stride_px, geometry.roi_px
    if region.shape[-1] != geometry.read_px or region.shape[-2] != geometry.read_px:
        raise ValueError(f"expected regions of {geometry.read_px} px, got {tuple(region.shape[-2:])}")
    n = region.shape[0]
    # All alpha^2 offset ROIs go through the network as one batch: (alpha^2 * N, 3, Lr, Lr).
    offsets = [region[:, :, i * sd:i * sd + lr, j * sd:j * sd + lr] for i in range(alpha) for j in range(alpha)]
    tiles = net(torch.cat(offsets, dim=0))  # (alpha^2 * N, C, Lp, Lp), ordered (i, j, n)
    c, lp = tiles.shape[1], tiles.shape[-1]
    tiles = tiles.reshape(alpha, alpha, n, c, lp, lp)
    # p(h', w') = p_ij(h' // alpha, w' // alpha) with i = h' mod alpha, j = w' mod alpha.
    return tiles.permute(2, 3, 4, 0, 5, 1).reshape(n, c, lp * alpha, lp * alpha)


class ScanNetInferer(Inferer):
    """MONAI inferer: dense ScanNet scanning of ROI regions, returning class probabilities per map pixel.

    Args:
        lp: output tile side per offset ROI (``Lp``; the paper uses 83 on a 12 GB GPU, smaller suits CPUs).
        alpha: dense coefficient (1 -> stride 32, 2 -> 16, 4 -> 8 px at the scanning resolution).
    """

    def __init__(self, lp: int = 83, alpha: int = 2) -> None:
        super().__init__()
        self.geometry = ScanGeometry(lp=lp, alpha=alpha)

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs) -> torch.Tensor:
        return torch.softmax(dense_scan(network, inputs, self.geometry).float(), dim=1)


class HardNegativeMining:
    """ScanNet's two-stage training (section 2.2, 3.2): train on general samples, then up to ``rounds`` times scan
    the training slides' normal tissue with the current model, add its false positives to the training set as hard
    negatives, and fine-tune for ``epochs_per_round`` more epochs. Mining is iterative, as in the paper: each round
    mines with the model the previous round fine-tuned, and a round that finds no new false positive (none, or
    only locations already in the pool) ends the mining without fine-tuning. :attr:`mined` holds the new false
    positives of each round.

    Args:
        trainer: a MONAI ``SupervisedTrainer`` whose data loader draws from ``dataset``.
        dataset: the training :class:`pathbundles.sampling.ClassBalancedPatchDataset`.
        rounds: the most mining rounds after the first training stage (0 = no mining).
        epochs_per_round: epochs of fine-tuning after each round.
        threshold: tumour probability above which a normal-tissue location is a false positive.
        max_per_slide: the highest-scoring false positives kept per slide and round.
        lp, alpha: scan geometry used for mining (as :class:`ScanNetInferer`).
        preprocessing: the inference preprocessing transform (uint8 ROI -> network input).
        batch_size: ROIs per forward pass while mining.
        save_dict: what to save of the model before mining, ``{key: object with state_dict()}`` (the training
            CheckpointSaver's ``save_dict``); saved to ``before_mining_path``.
        before_mining_path: where the model of the first stage (before any mining) is saved, atomically; None:
            not saved. With it the effect of mining can be measured (``evaluate.json --ckpt_path``).
        record_path: a JSON file written after every round: ``{"rounds": [{"round", "added", "pool",
            "share", "epochs_after"}], "before_mining": path}``; None: not written.
    """

    def __init__(self, trainer: Any, dataset: Any, rounds: int = 1, epochs_per_round: int = 2,
                 threshold: float = 0.5, max_per_slide: int = 256, lp: int = 8, alpha: int = 1,
                 preprocessing: Any = None, batch_size: int = 2, num_workers: int = 0,
                 save_dict: dict[str, Any] | None = None, before_mining_path: str | None = None,
                 record_path: str | None = None) -> None:
        self.trainer, self.dataset, self.rounds, self.epochs_per_round = trainer, dataset, rounds, epochs_per_round
        self.threshold, self.max_per_slide = probability(threshold, "threshold"), max_per_slide
        self.inferer = ScanNetInferer(lp=lp, alpha=alpha)
        self.preprocessing, self.batch_size, self.num_workers = preprocessing, batch_size, num_workers
        if before_mining_path is not None and not save_dict:
            raise ValueError("HardNegativeMining: before_mining_path needs save_dict (what to save)")
        self.save_dict, self.before_mining_path, self.record_path = save_dict, before_mining_path, record_path
        self.mined: list[int] = []
        self.rounds_done: list[dict[str, Any]] = []

    def mine(self) -> int:
        """Scan every training slide, add false positives on normal tissue; returns how many were added."""
        from pathbundles.sampling import NORMAL
        from pathbundles.slide_inference import SlideROIDataset, predict_maps

        network = getattr(self.trainer.network, "module", self.trainer.network)  # unwrap DDP
        device = next(network.parameters()).device
        geometry = self.inferer.geometry
        rois = SlideROIDataset([{"image": s.path, "mpp": s.mpp_override} for s in self.dataset.slides],
                               geometry.grid(), self.dataset.mpp,
                               backend=self.dataset.handles.backend, transform=self.preprocessing)
        added = 0
        slides = {s.path: s for s in self.dataset.slides}
        for plan, prob in predict_maps(rois, network, self.inferer, device=str(device), batch_size=self.batch_size,
                                       num_workers=self.num_workers):
            slide = slides[plan.path]
            rows, cols = np.nonzero(prob > self.threshold)
            to_level0 = self.dataset.mpp / slide.level0_mpp
            xy = np.stack([geometry.map_to_image(cols), geometry.map_to_image(rows)], 1) * to_level0
            keep = slide.in_pool(NORMAL, xy)
            order = np.argsort(-prob[rows[keep], cols[keep]], kind="stable")[:self.max_per_slide]
            if len(order):
                added += self.dataset.add_hard_negatives(slide.path, xy[keep][order])
        logger.info("hard negative mining: %d false positives added (%d in the pool; a normal draw takes one with "
                    "probability %.4f)", added, self.dataset.n_hard_negatives, self.dataset.hard_negative_share())
        self.mined.append(added)
        return added

    def run(self) -> None:
        """Train, then alternate mining and fine-tuning for up to ``rounds`` rounds, stopping at a round that adds
        no new false positive."""
        self.trainer.run()
        if self.before_mining_path is not None:
            self._save_before_mining()
        for round_index in range(self.rounds):
            added = self.mine()
            if added:
                self.trainer.state.max_epochs += self.epochs_per_round
            self.rounds_done.append({"round": round_index + 1, "added": added,
                                     "pool": int(self.dataset.n_hard_negatives),
                                     "share": float(self.dataset.hard_negative_share()),
                                     "epochs_after": self.epochs_per_round if added else 0})
            self._write_record()
            if added == 0:
                logger.info("hard negative mining: round %d found no new false positive; mining ends",
                            round_index + 1)
                break
            self.trainer.run()

    def _save_before_mining(self) -> None:
        """Save the first stage's model (rank 0 only under DDP), atomically."""
        if not is_first_rank():
            return
        state = {key: getattr(obj, "module", obj).state_dict() for key, obj in self.save_dict.items()}
        with atomic_path(self.before_mining_path) as tmp:
            torch.save(state, tmp)
        logger.info("hard negative mining: the model before mining is saved to %s", self.before_mining_path)

    def _write_record(self) -> None:
        """Write the rounds so far to ``record_path`` (rank 0 only under DDP), atomically."""
        if self.record_path is None or not is_first_rank():
            return
        record = {"threshold": self.threshold, "max_per_slide": self.max_per_slide, "rounds": self.rounds_done,
                  "before_mining": None if self.before_mining_path is None else str(self.before_mining_path)}
        with atomic_path(self.record_path) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")
