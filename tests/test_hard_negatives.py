"""ScanNet's hard negative mining (Sec. 2.2, 3.2): iterative rounds that stop when nothing new is found, mined
locations in normal tissue of the training slides only, re-scoring above the threshold, and mined negatives
drawn in proportion to their number."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from geometry_helpers import DarkSpotScanNet

from pathbundles.phantom import make_metastasis_dataset
from pathbundles.sampling import NORMAL, TUMOUR, ClassBalancedPatchDataset, read_datalist
from pathbundles.scannet import HardNegativeMining

SCAN_MPP = 1.0


@pytest.fixture(scope="module")
def training_slides(tmp_path_factory) -> list[dict]:
    """A tumour and a normal phantom slide at 0.243 um/px (Camelyon16's Radboud scanner), 2048 px, 4x pyramid."""
    path = make_metastasis_dataset(tmp_path_factory.mktemp("hnm"), n=2, seed=11, size_px=2048, mpp=0.243)
    return read_datalist(path)


def _dataset(items: list[dict], fraction: float | None = None) -> ClassBalancedPatchDataset:
    return ClassBalancedPatchDataset(items, read_px=244, mpp=SCAN_MPP, samples_per_epoch=8, backend="tifffile",
                                     hard_negative_fraction=fraction)


def _normal_cells_xy(dataset: ClassBalancedPatchDataset, s: int, n: int) -> np.ndarray:
    slide = dataset.slides[s]
    rows_cols = slide.pools[NORMAL][:: max(1, len(slide.pools[NORMAL]) // n)][:n]
    return (rows_cols[:, ::-1] + 0.5) * slide.downsample


def test_mined_negatives_are_drawn_in_proportion_to_their_number(training_slides: list[dict]) -> None:
    dataset = _dataset(training_slides)
    n_normal = sum(len(s.pools[NORMAL]) for s in dataset.slides)
    xy = _normal_cells_xy(dataset, 1, 10)
    assert dataset.add_hard_negatives(dataset.slides[1].path, xy) == 10
    assert dataset.add_hard_negatives(dataset.slides[1].path, xy[:4]) == 0  # mined again: nothing new
    assert dataset.n_hard_negatives == 10
    share = dataset.hard_negative_share()
    assert share == pytest.approx(10 / (10 + n_normal))
    rng = np.random.default_rng(0)
    mined = {tuple(p) for p in xy.tolist()}
    draws = [dataset.draw(rng) for _ in range(20000)]
    normal = [(x, y) for _, x, y, label in draws if label == NORMAL]
    hits = sum((x, y) in mined for x, y in normal)
    expected = share * len(normal)
    assert abs(hits - expected) <= 4 * np.sqrt(expected) + 1, (hits, expected)
    # The old fixed share: half of the normal draws from 10 spots, whatever the pool size.
    fixed = _dataset(training_slides, fraction=0.5)
    fixed.add_hard_negatives(fixed.slides[1].path, xy)
    assert fixed.hard_negative_share() == 0.5


class _Oracle(DarkSpotScanNet):
    """ScanNet's geometry, tumour where the patch centre is dark; one unused parameter for the device lookup."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))


class _Trainer:
    """What HardNegativeMining uses of a MONAI SupervisedTrainer: ``network``, ``state.max_epochs``, ``run()``."""

    def __init__(self, network: torch.nn.Module) -> None:
        self.network, self.runs = network, 0
        self.state = type("State", (), {"max_epochs": 2})()

    def run(self) -> None:
        self.runs += 1


def _preprocess(item: dict) -> dict:
    return {**item, "image": (item["image"].float() - 127.5) / 127.5}


def test_iterative_mining_stops_and_mines_only_normal_tissue(training_slides: list[dict]) -> None:
    """The oracle does not learn, so round 2 finds only what round 1 added: mining stops there without fine-tuning.
    Every mined location lies in a normal-tissue cell of a training slide, and the patch read there re-scores
    above the threshold with the model that mined it."""
    from pathbundles.slide_inference import SlideHandles

    dataset = _dataset(training_slides)
    trainer = _Trainer(_Oracle())
    threshold = 0.3
    mining = HardNegativeMining(trainer, dataset, rounds=3, epochs_per_round=2, threshold=threshold,
                                max_per_slide=20, lp=4, alpha=1, preprocessing=_preprocess, batch_size=2)
    mining.run()
    assert mining.mined[0] > 0 and mining.mined[1:] == [0], mining.mined
    assert trainer.runs == 2 and trainer.state.max_epochs == 4  # first stage + one fine-tuning
    handles = SlideHandles("tifffile")
    for slide in dataset.slides:
        if not len(slide.hard_negatives):
            continue
        assert slide.path in {item["image"] for item in training_slides}
        assert slide.in_pool(NORMAL, slide.hard_negatives).all()
        assert not slide.in_pool(TUMOUR, slide.hard_negatives).any()
        to_level0 = SCAN_MPP / slide.level0_mpp
        for x, y in slide.hard_negatives:
            patch = handles(slide.path).read_region((x - 122 * to_level0, y - 122 * to_level0), (244, 244), SCAN_MPP)
            image = _preprocess({"image": torch.from_numpy(np.ascontiguousarray(patch.transpose(2, 0, 1)))})["image"]
            with torch.no_grad():
                prob = torch.softmax(trainer.network(image[None]), dim=1)[0, 1, 0, 0]
            assert float(prob) > threshold, (slide.name, x, y, float(prob))


def test_model_before_mining_and_rounds_are_recorded(training_slides: list[dict], tmp_path) -> None:
    """The first stage's model is saved before any mining round changes it (for the before/after comparison), and
    every round's additions, pool size and share are written as they happen."""
    import json

    from pathbundles.checkpoints import TrainingSettings

    dataset = _dataset(training_slides)
    network = _Oracle()
    trainer = _Trainer(network)
    before, record = tmp_path / "train" / "model_before_mining.pt", tmp_path / "train" / "hnm.json"
    with torch.no_grad():
        network.unused.fill_(7.0)
    mining = HardNegativeMining(trainer, dataset, rounds=3, epochs_per_round=2, threshold=0.3, max_per_slide=20,
                                lp=4, alpha=1, preprocessing=_preprocess, batch_size=2,
                                save_dict={"model": network, "training": TrainingSettings({"bundle": "scannet"})},
                                before_mining_path=str(before), record_path=str(record))
    original_run = trainer.run

    def run_and_change() -> None:  # each fine-tuning changes the model after the saved copy was taken
        original_run()
        with torch.no_grad():
            network.unused.add_(1.0)

    trainer.run = run_and_change
    mining.run()
    saved = torch.load(before, weights_only=True)
    assert saved["training"] == {"bundle": "scannet"}
    assert float(saved["model"]["unused"]) == 8.0  # after the first stage, before the one fine-tuning
    assert float(network.unused.detach()) == 9.0
    rounds = json.loads(record.read_text())
    assert [r["added"] for r in rounds["rounds"]] == mining.mined and mining.mined[0] > 0
    assert rounds["rounds"][0]["pool"] == mining.mined[0] == dataset.n_hard_negatives
    assert rounds["rounds"][0]["share"] == pytest.approx(dataset.hard_negative_share())
    assert [r["epochs_after"] for r in rounds["rounds"]] == [2, 0]
    assert rounds["before_mining"] == str(before) and rounds["threshold"] == 0.3
    assert not list(before.parent.glob(".*"))  # nothing half-written left
    with pytest.raises(ValueError, match="save_dict"):
        HardNegativeMining(trainer, dataset, before_mining_path=str(before))
