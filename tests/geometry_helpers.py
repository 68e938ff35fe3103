"""What the geometry tests share: "oracle" networks that answer where a slide is dark, with each bundle network's
exact input/output geometry, a reference resampling, and matching of found positions to the phantom's markers.

The oracles replace a bundle's ``network_def`` (bundle configs resolve ``geometry_helpers.DarkSpot*`` because pytest
puts tests/ on ``sys.path``), so a bundle run exercises its own reads, scanning geometry, stitching, post-processing
and writers, while the answer no longer depends on what trained weights learned: the response peaks on the dark
cone markers of :func:`pathbundles.phantom.make_geometry_dataset`, wherever the geometry puts them.

Bundle inputs are normalised to about [-1, 1] (``(x - 127.5) / 127.5`` or ``(x - 128) / 128``); the markers' apex is
about -0.4 there and the tissue ground +0.5, so a threshold at 0.2 separates them whatever the normalisation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

# Logit = GAIN * (THRESHOLD - normalised intensity): positive over the dark markers, and never saturated (a
# saturated probability would make a plateau whose maximum lies wherever raster order puts it).
GAIN, THRESHOLD = 4.0, 0.2
WINDOW_PX = 16  # side of the central window whose mean intensity a patch oracle answers with


def oracle_checkpoint(folder: Path) -> Path:
    """A checkpoint the bundles' ``CheckpointLoader`` loads into a parameterless oracle."""
    path = folder / "oracle.pt"
    torch.save({"model": {}}, path)
    return path


def _intensity(x: torch.Tensor) -> torch.Tensor:
    return x.float().mean(dim=1, keepdim=True)


def _centre_window_mean(patches: torch.Tensor) -> torch.Tensor:
    """Mean normalised intensity of the central WINDOW_PX square of (M, C, H, W) patches -> (M,)."""
    h, w = patches.shape[-2:]
    top, left = (h - WINDOW_PX) // 2, (w - WINDOW_PX) // 2
    return _intensity(patches)[:, 0, top:top + WINDOW_PX, left:left + WINDOW_PX].mean(dim=(-2, -1))


class DarkSpotScanNet(nn.Module):
    """ScanNet's geometry (244 px patches, stride 32, no padding): the tumour logit of the patch at offset 32 k is
    GAIN * (THRESHOLD - mean intensity of its central 16 px), the patch centre being at 32 k + 122."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_out = [(s - 244) // 32 + 1 for s in x.shape[-2:]]
        start = 122 - WINDOW_PX // 2
        pooled = nn.functional.avg_pool2d(_intensity(x)[..., start:, start:], WINDOW_PX, stride=32)
        tumour = GAIN * (THRESHOLD - pooled[..., :n_out[0], :n_out[1]])
        return torch.cat([torch.zeros_like(tumour), tumour], dim=1)


class DarkSpotSpatialLSTM(nn.Module):
    """The spatial LSTM's interface (``patch_features``, ``grid_logits``, ``forward`` on (N, G*G, C, crop, crop)):
    a patch's feature is the mean intensity of its central 16 px, a grid patch's logit its own feature's.

    Args:
        threshold: intensity below which a patch is "tumour"; a map of stride 64 um needs a higher one than
            THRESHOLD, so that a marker 45 um (half a diagonal) from the nearest map pixel still exceeds 0.5 there.
    """

    def __init__(self, grid_size: int = 3, crop_px: int = 224, threshold: float = THRESHOLD) -> None:
        super().__init__()
        self.grid_size, self.crop_px, self.in_channels, self.feature_size = grid_size, crop_px, 3, 1
        self.threshold = threshold

    def patch_features(self, patches: torch.Tensor) -> torch.Tensor:
        return _centre_window_mean(patches)[:, None]

    def grid_logits(self, features: torch.Tensor) -> torch.Tensor:
        return GAIN * (self.threshold - features[..., 0])

    def forward(self, grids: torch.Tensor) -> torch.Tensor:
        n, k = grids.shape[:2]
        return self.grid_logits(self.patch_features(grids.flatten(0, 1)).reshape(n, k, 1))


class DarkSpotFCN(nn.Module):
    """SegMitos' interface (image -> per-pixel logits of the same size): mitosis logit per pixel from its own
    intensity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tumour = GAIN * (THRESHOLD - _intensity(x))
        return torch.cat([torch.zeros_like(tumour), tumour], dim=1)


class DarkSpotDMMN(nn.Module):
    """DMMN's interface ((N, 9, 256, 256) stacked 20x/10x/5x views -> (N, classes, 256, 256)): carcinoma (class 1)
    where the 20x view is dark, stroma (class 3) elsewhere."""

    def __init__(self, num_classes: int = 6) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dark = (_intensity(x[:, :3]) < THRESHOLD).float()
        logits = torch.zeros((x.shape[0], self.num_classes, *x.shape[-2:]), device=x.device)
        logits[:, 0:1] = dark
        logits[:, 2:3] = 1 - dark
        return logits


def box_reference(level0: np.ndarray, xy: tuple[float, float], size: tuple[int, int], scale: float) -> np.ndarray:
    """Exact area average of level-0 pixels for output pixels of ``scale`` level-0 px from ``xy`` (x, y), each
    level-0 pixel weighted by its overlap: the reference resampling, independent of PIL and of pyramid levels."""
    def weights(start: float, n: int, limit: int) -> np.ndarray:
        edges = start + np.arange(n + 1) * scale
        lo, hi = edges[:-1, None], edges[1:, None]
        px = np.arange(limit)[None, :]
        return np.clip(np.minimum(hi, px + 1) - np.maximum(lo, px), 0, None) / scale

    wy, wx = weights(xy[1], size[1], level0.shape[0]), weights(xy[0], size[0], level0.shape[1])
    return np.einsum("ip,pqc,jq->ijc", wy, level0.astype(np.float64), wx, optimize=True)


def nearest_offsets(found_xy: np.ndarray, truth_xy: np.ndarray) -> np.ndarray:
    """(len(truth), 2) offsets found - truth of the found position nearest to each true one."""
    found_xy, truth_xy = np.asarray(found_xy, float).reshape(-1, 2), np.asarray(truth_xy, float).reshape(-1, 2)
    distance = np.hypot(*(found_xy[None, :, :] - truth_xy[:, None, :]).transpose(2, 0, 1))
    return found_xy[distance.argmin(axis=1)] - truth_xy


def response_centroid_um(image: np.ndarray, mpp: float, near_um: np.ndarray, radius_um: float,
                         ground: float) -> np.ndarray:
    """Centroid (x, y) in um of ``|image - ground|`` within ``radius_um`` of each of ``near_um``, pixel (r, c) of a
    raster registered to the slide lying at ((c + 0.5) * mpp, (r + 0.5) * mpp) um."""
    out = []
    rows, cols = np.indices(image.shape[:2])
    x_um, y_um = (cols + 0.5) * mpp, (rows + 0.5) * mpp
    weight = np.abs(image.astype(np.float64) - ground)
    for cx, cy in np.asarray(near_um, float).reshape(-1, 2):
        w = weight * (np.hypot(x_um - cx, y_um - cy) <= radius_um)
        out.append([(w * x_um).sum() / w.sum(), (w * y_um).sum() / w.sum()])
    return np.asarray(out)
