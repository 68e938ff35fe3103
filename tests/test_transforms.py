"""pathbundles.transforms.CastScaleIntensityRanged: bit for bit MONAI's CastToTyped + ScaleIntensityRanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import CastToTyped, Compose, ScaleIntensityRanged

from pathbundles.transforms import CastScaleIntensityRanged

RANGES = [(0.0, 255.0, -1.0, 1.0),  # scannet, segmitos, dmmn inference
          (0.0, 1.0, -1.0, 127.0 / 128.0),  # spatial_lstm's training range
          (10.0, 200.0, 0.25, 3.0)]


def monai_pair(keys, a_min, a_max, b_min, b_max, dtype=torch.float32) -> Compose:
    return Compose([CastToTyped(keys, dtype=dtype),
                    ScaleIntensityRanged(keys, a_min=a_min, a_max=a_max, b_min=b_min, b_max=b_max, dtype=dtype)])


@pytest.mark.parametrize("a_min, a_max, b_min, b_max", RANGES)
def test_every_uint8_value_equals_monai_bit_for_bit(a_min, a_max, b_min, b_max) -> None:
    values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    ours = CastScaleIntensityRanged("image", a_min, a_max, b_min, b_max)({"image": values})["image"]
    theirs = monai_pair("image", a_min, a_max, b_min, b_max)({"image": values})["image"]
    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(torch.as_tensor(ours), torch.as_tensor(theirs))
    # by hand, (0, 255) -> (-1, 1): 0 -> -1, 255 -> 1, 51 -> 51 / 255 * 2 - 1 = -0.6
    if (a_min, a_max, b_min, b_max) == RANGES[0]:
        flat = torch.as_tensor(ours).flatten()
        assert flat[0] == -1.0 and flat[255] == 1.0 and abs(float(flat[51]) + 0.6) < 1e-7


def test_images_of_several_keys_and_dtypes_equal_monai() -> None:
    rng = np.random.default_rng(3)
    data = {"x20": rng.integers(0, 256, (3, 64, 48), dtype=np.uint8),
            "x10": torch.from_numpy(rng.integers(0, 256, (3, 64, 48), dtype=np.uint8)).permute(0, 2, 1),
            "x5": rng.uniform(-5, 300, (3, 32, 32)),  # float64: cast first, then scaled in float32
            "other": np.ones(3)}
    keys = ["x20", "x10", "x5"]
    ours = CastScaleIntensityRanged(keys, 0.0, 255.0, -1.0, 1.0)(data)
    theirs = monai_pair(keys, 0.0, 255.0, -1.0, 1.0)(data)
    for key in keys:
        assert ours[key].shape == theirs[key].shape
        assert torch.equal(torch.as_tensor(ours[key]), torch.as_tensor(theirs[key])), key
    assert ours["other"] is data["other"]
    double = CastScaleIntensityRanged("x5", 0.0, 255.0, -1.0, 1.0, dtype=torch.float64)(data)["x5"]
    assert double.dtype == torch.float64
    assert torch.equal(torch.as_tensor(double), torch.as_tensor(monai_pair("x5", 0.0, 255.0, -1.0, 1.0,
                                                                            torch.float64)(data)["x5"]))


def test_input_is_left_as_it_was_and_metadata_is_tracked() -> None:
    image = torch.full((3, 4, 4), 255.0)
    out = CastScaleIntensityRanged("image", 0.0, 255.0, -1.0, 1.0)({"image": image})["image"]
    assert torch.equal(image, torch.full((3, 4, 4), 255.0))  # a float32 input is copied, not scaled in place
    assert torch.equal(torch.as_tensor(out), torch.ones(3, 4, 4))
    assert isinstance(out, MetaTensor)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="empty input range"):
        CastScaleIntensityRanged("image", 1.0, 1.0, -1.0, 1.0)
    with pytest.raises(ValueError, match="not a floating point"):
        CastScaleIntensityRanged("image", 0.0, 255.0, -1.0, 1.0, dtype=torch.int32)
    with pytest.raises(KeyError):
        CastScaleIntensityRanged("image", 0.0, 255.0, -1.0, 1.0)({"label": np.ones(3)})
