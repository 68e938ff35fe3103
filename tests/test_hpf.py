"""pathbundles.hpf: HPF reading, training crops, blob detection, threshold tuning, CSV and overlay output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pathbundles.annotations import read_points_csv, write_points_csv
from pathbundles.errors import InputError
from pathbundles.hpf import (FN_COLOUR, FP_COLOUR, LEVEL0_CSV_HEADER, TP_COLOUR, HPFCropDataset, HPFDataset,
                             HPFDetectionWriter, MitosisMetricsReport, ThresholdTuner, TunedMitosisF1,
                             average_precision, blob_candidates, detect_mitoses, filter_blobs, read_hpf,
                             store_thresholds, tune_blob_thresholds, tune_thresholds, write_circle_overlay_png,
                             write_detections)
from pathbundles.phantom import make_phantom
from pathbundles.sampling import read_datalist
from pathbundles.segmitos import RandConcentricLabeld
from pathbundles.writers import read_overlay_layout


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Three 400 px phantom HPFs (2, 3 and 0 mitoses with seed 1)."""
    return read_datalist(make_phantom(tmp_path_factory.mktemp("hpf"), kind="mitosis", n=3, seed=1, size_px=400))


def _hand_made(tmp_path: Path, size_wh: tuple[int, int], xy: list[tuple[float, float]], name: str = "a") -> dict:
    """An HPF whose pixel (x, y) has red = x % 256, green = y % 256, with mitoses at ``xy``."""
    w, h = size_wh
    yy, xx = np.mgrid[:h, :w]
    rgb = np.stack([xx % 256, yy % 256, np.full_like(xx, 7)], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / f"{name}.png")
    write_points_csv(tmp_path / f"{name}.csv", np.asarray(xy, float).reshape(-1, 2), order="xy")
    return {"image": str(tmp_path / f"{name}.png"), "centroids": str(tmp_path / f"{name}.csv")}


def _gaussian_map(shape_hw: tuple[int, int], blobs: list[tuple[float, float, float, float]]) -> np.ndarray:
    """Sum of Gaussian bumps (x, y, peak, sigma px), clipped to [0, 1]."""
    yy, xx = np.mgrid[:shape_hw[0], :shape_hw[1]].astype(np.float64)
    prob = np.zeros(shape_hw)
    for x, y, peak, sigma in blobs:
        prob += peak * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2))
    return np.clip(prob, 0, 1).astype(np.float32)


# ------------------------------------------------------------------------------------------------------- read_hpf


def test_read_hpf_rgb_grey_and_errors(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (12, 9, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.tif")
    np.testing.assert_array_equal(read_hpf(tmp_path / "a.tif"), rgb)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "g.png")
    grey = read_hpf(tmp_path / "g.png")
    assert grey.shape == (12, 9, 3) and grey.dtype == np.uint8 and (grey == rgb[..., :1]).all()
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="bad.png"):
        read_hpf(tmp_path / "bad.png")
    Image.fromarray(np.zeros((4, 4), np.int32)).save(tmp_path / "deep.tif")
    with pytest.raises(InputError, match="deep.tif.*8-bit"):
        read_hpf(tmp_path / "deep.tif")


# ------------------------------------------------------------------------------------------------ HPFCropDataset


def test_crop_shapes_and_centroid_coordinates(tmp_path: Path) -> None:
    mitoses = [(100.0, 40.0), (150.5, 170.0), (20.0, 180.0)]
    ds = HPFCropDataset([_hand_made(tmp_path, (220, 200), mitoses), _hand_made(tmp_path, (220, 200), [], "b")],
                        crop_px=64, samples_per_epoch=50, centroid_order="xy")
    assert ds.max_centroids == 3
    for i in range(50):
        item = ds[i]
        x0, y0 = item["location"].tolist()
        image = item["image"]
        assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
        # The colour code gives back each crop pixel's HPF position.
        assert int(image[0, 0, 0]) == x0 % 256 and int(image[1, 0, 0]) == y0 % 256
        n = item["n_centroids"]
        assert item["centroids"].shape == (3, 2) and torch.isnan(item["centroids"][n:]).all()
        # A centroid belongs to the pixel holding it (pixel k covers [k - 0.5, k + 0.5)), so x = 150.5 is pixel 151.
        expected = [(x - x0, y - y0) for x, y in mitoses
                    if 0 <= math.floor(x + 0.5) - x0 < 64 and 0 <= math.floor(y + 0.5) - y0 < 64]
        if item["path"].endswith("a.png"):
            np.testing.assert_allclose(sorted(item["centroids"][:n].tolist()), sorted(expected))
        else:
            assert n == 0


def test_small_image_is_padded_white_at_bottom_right(tmp_path: Path) -> None:
    ds = HPFCropDataset([_hand_made(tmp_path, (30, 20), [(5, 6)])], crop_px=48, samples_per_epoch=4,
                        centroid_order="rc")  # rc: the CSV's (5, 6) is row 5, column 6
    item = ds[0]
    assert item["location"].tolist() == [0, 0] and item["image"].shape == (3, 48, 48)
    assert (item["image"][:, 20:, :] == 255).all() and (item["image"][:, :, 30:] == 255).all()
    assert item["centroids"][0].tolist() == [6.0, 5.0]


def test_centroids_outside_the_image_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="outside"):
        HPFCropDataset([_hand_made(tmp_path, (30, 20), [(25, 5)])], crop_px=16, centroid_order="rc")


def test_positive_fraction_is_honoured(phantom: list[dict]) -> None:
    for fraction in (0.25, 0.75):
        ds = HPFCropDataset(phantom, crop_px=96, samples_per_epoch=200, positive_fraction=fraction,
                            centroid_order="xy", fixed=True, seed=3)
        positive = np.mean([ds[i]["n_centroids"] > 0 for i in range(len(ds))])
        assert abs(positive - fraction) < 0.1, (fraction, positive)


def test_fixed_is_reproducible_and_random_follows_torch_seed(phantom: list[dict]) -> None:
    a = HPFCropDataset(phantom, crop_px=96, samples_per_epoch=8, centroid_order="xy", fixed=True, seed=5)
    b = HPFCropDataset(phantom, crop_px=96, samples_per_epoch=8, centroid_order="xy", fixed=True, seed=5)
    for i in range(8):
        assert torch.equal(a[i]["location"], b[i]["location"]) and torch.equal(a[i]["image"], b[i]["image"])
    assert torch.equal(a[3]["location"], a[3]["location"])
    free = HPFCropDataset(phantom, crop_px=96, samples_per_epoch=8, centroid_order="xy")
    torch.manual_seed(11)
    first = [free[i]["location"].tolist() for i in range(8)]
    torch.manual_seed(11)
    assert [free[i]["location"].tolist() for i in range(8)] == first


def test_collates_in_a_dataloader_and_builds_concentric_labels(phantom: list[dict]) -> None:
    label = RandConcentricLabeld(mode="circle", fixed_r_px=4)
    ds = HPFCropDataset(phantom, crop_px=128, samples_per_epoch=6, positive_fraction=1.0, centroid_order="xy",
                        transform=label, fixed=True)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=6, num_workers=0)))
    assert batch["image"].shape == (6, 3, 128, 128) and batch["label"].shape == (6, 1, 128, 128)
    assert batch["centroids"].shape == (6, ds.max_centroids, 2) and (batch["n_centroids"] >= 1).all()
    for label_map, xy, n in zip(batch["label"], batch["centroids"], batch["n_centroids"]):
        ones = torch.nonzero(label_map[0] == 1).float()  # (row, col)
        assert len(ones)
        for x, y in xy[:n].tolist():
            assert label_map[0, round(y), round(x)] == 1
        # Every labelled pixel lies within r of one of the crop's mitoses: none comes from NaN rows or elsewhere.
        distance = torch.cdist(ones.flip(1), xy[:n]).min(dim=1).values
        assert (distance <= 4 + 1e-6).all()


# ---------------------------------------------------------------------------------- detection and threshold tuning


def test_detect_mitoses_finds_two_gaussian_blobs() -> None:
    prob = _gaussian_map((160, 200), [(50, 40, 0.9, 5), (150.0, 120.0, 0.8, 6)])
    detections = detect_mitoses(torch.from_numpy(prob), mpp=0.25)
    assert detections.shape == (2, 3)
    # Pixel centres at integers: a blob centred on pixel (50, 40) is reported at (50, 40), not half a pixel off.
    np.testing.assert_allclose(detections[:, :2], [[50, 40], [150, 120]], atol=0.02)
    assert detections[0, 2] > detections[1, 2] > 0


def test_tune_thresholds_removes_a_weak_false_blob() -> None:
    # Two true mitoses per map and a weak, wide false blob that only a score threshold separates.
    maps = [_gaussian_map((200, 200), [(40, 40, 0.95, 5), (160, 60, 0.9, 5), (100, 160, 0.35, 5)]),
            _gaussian_map((200, 200), [(60, 150, 0.9, 5), (150, 150, 0.95, 5), (40, 50, 0.3, 5)])]
    truths = [np.array([[40, 40], [160, 60]]), np.array([[60, 150], [150, 150]])]
    assert len(detect_mitoses(maps[0])) == 3  # the false blob survives Otsu: only the tuning removes it
    result = tune_thresholds(maps, truths, radius_px=30, score_grid=[0.0, 0.1, 0.2, 0.4, 0.9],
                             area_grid_um2=[0.0])
    assert result["min_mean_score"] == 0.2 and result["f1"] == 1.0
    assert result["tp"] == 4 and result["fp"] == 0 and result["fn"] == 0
    by_score = {g["min_mean_score"]: g for g in result["grid"]}
    assert len(result["grid"]) == 5 and by_score[0.0]["fp"] == 2 and by_score[0.9]["fn"] > 0
    kept = detect_mitoses(maps[0], min_mean_score=result["min_mean_score"])
    np.testing.assert_allclose(sorted(kept[:, :2].tolist()), [[40, 40], [160, 60]], atol=0.5)


# ------------------------------------------------------------------------------------------------------ output


def test_write_detections_round_trips(tmp_path: Path) -> None:
    detections = np.array([[10.5, 20.0, 0.9], [3.0, 4.0, 0.25]])
    write_detections(tmp_path / "d.csv", detections)
    xy, scores = read_points_csv(tmp_path / "d.csv", "xy")
    np.testing.assert_array_equal(np.column_stack([xy, scores]), detections)


def test_overlay_has_tp_fp_and_fn_colours(tmp_path: Path) -> None:
    image = np.full((200, 200, 3), 128, np.uint8)
    truth = np.array([[50, 50], [150, 150]])
    detections = np.array([[55, 52, 0.9], [150, 40, 0.8]])  # one hit, one false alarm; (150, 150) is missed
    write_circle_overlay_png(tmp_path / "o.png", image, detections, truth=truth, radius_px=20)
    drawn = np.asarray(Image.open(tmp_path / "o.png").convert("RGB"))
    colours = {tuple(c) for c in drawn.reshape(-1, 3)}
    assert {TP_COLOUR, FP_COLOUR, FN_COLOUR} <= colours
    assert tuple(drawn[52, 55 + 20]) == TP_COLOUR and tuple(drawn[40, 150 - 20]) == FP_COLOUR
    assert tuple(drawn[150 + 20, 150]) == FN_COLOUR
    assert [p.name for p in tmp_path.iterdir()] == ["o.png"]  # atomic: no temporary file left


# ------------------------------------------------------------------------- inference components (segmitos bundle)


def test_blob_filter_and_tuning_on_blobs_agree_with_map_tuning() -> None:
    maps = [_gaussian_map((200, 200), [(50, 50, 0.9, 5), (150, 150, 0.3, 12)])]
    truths = [np.array([[50.0, 50.0]])]
    blobs = blob_candidates(maps[0])
    assert blobs.shape == (2, 4)
    # The strong blob first, centred on its bump; filter_blobs reorders to [x, y, score].
    np.testing.assert_allclose(blobs[0, 1:3], [50, 50], atol=0.5)
    kept = filter_blobs(blobs, min_mean_score=float(blobs[1, 0]))
    assert kept.shape == (1, 3) and kept[0, 2] == blobs[0, 0]
    np.testing.assert_array_equal(filter_blobs(blobs, 0.0, float(blobs[:, 3].max())), np.zeros((0, 3)))
    by_blobs = tune_blob_thresholds([blobs], truths, score_grid=[0.0, 0.2], area_grid_um2=[0.0])
    by_maps = tune_thresholds(maps, truths, score_grid=[0.0, 0.2], area_grid_um2=[0.0])
    assert by_blobs == by_maps
    assert (by_blobs["f1"], by_blobs["min_mean_score"], by_blobs["tp"], by_blobs["fp"]) == (1.0, 0.2, 1, 0)


def test_average_precision_hand_computed() -> None:
    # Recall steps 0 -> 0.5 at precision 1, 0.5 -> 0.5 (no gain), 0.5 -> 1.0 at precision 2/3.
    assert average_precision(np.array([1.0, 0.5, 2 / 3]), np.array([0.5, 0.5, 1.0])) == pytest.approx(
        0.5 * 1.0 + 0.5 * 2 / 3)
    assert average_precision(np.zeros(0), np.zeros(0)) == 0.0


def test_hpf_dataset_items_names_and_errors(tmp_path: Path) -> None:
    a = _hand_made(tmp_path, (70, 50), [(10, 20), (60.4, 45)], "a")
    b = {"image": _hand_made(tmp_path, (40, 30), [], "b")["image"]}
    ds = HPFDataset([a, b], centroid_order="xy")
    assert ds.names == ["a", "b"] and len(ds) == 2
    item = ds[0]
    assert item["image"].shape == (3, 50, 70) and item["image"].dtype == torch.uint8
    assert int(item["image"][0, 45, 60]) == 60 and int(item["image"][1, 45, 60]) == 45  # (x, y) = (60, 45)
    np.testing.assert_allclose(item["label"].numpy(), [[10, 20], [60.4, 45]], rtol=1e-6)
    assert "label" not in ds[1] and ds[1]["index"] == 1 and ds[1]["error"] == ""
    # An item that cannot be used is left out with its error (the writer fails it by name); the others stay.
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    bad = HPFDataset([dict(a, mpp=0.5), {"image": str(tmp_path / "broken.png")}, b,
                      {"image": str(tmp_path / "loop.png")}], centroid_order="xy")
    assert len(bad) == 1 and bad.usable == [2] and bad[0]["name"] == "b" and bad[0]["index"] == 2
    assert sorted(bad.failed) == [0, 1, 3]
    assert "0.5 um/px" in bad.failed[0] and "broken.png" in bad.failed[1] and "loop.png" in bad.failed[3]
    rc = HPFDataset([a], centroid_order="rc")  # (45, 60.4) read as (row, col) falls outside the 70 x 50 image
    assert len(rc) == 0 and "centroids outside" in rc.failed[0]
    with pytest.raises(InputError, match="output name 'a' is the same name"):
        HPFDataset([a, a])  # a datalist problem: the whole run is refused


def test_hpf_dataset_reads_a_slide_box(shared_data: Path) -> None:
    from pathbundles.wsi import open_slide

    svs = shared_data / "CMU-1-Small-Region.svs"  # 0.499 um/px: a 200 x 100 px level-0 box is ~400 x 200 at 0.25
    ds = HPFDataset([{"image": str(svs), "box": [1000, 1200, 200, 100]}], mpp=0.25, backend="openslide")
    assert ds.names == ["CMU-1-Small-Region_x1000_y1200"]
    image = ds[0]["image"]
    assert image.shape == (3, 200, 399) or image.shape == (3, 200, 400)
    with open_slide(svs, backend="openslide") as slide:
        expected = slide.read_region((1000, 1200), (image.shape[2], image.shape[1]), 0.25)
    np.testing.assert_array_equal(image.numpy().transpose(1, 2, 0), expected)
    with pytest.raises(InputError, match="box must be"):
        HPFDataset([{"image": str(svs), "box": [0, 0, -5, 10]}], backend="openslide")


class _Engine:
    """The bits of an ignite engine the HPF handlers read."""

    def __init__(self) -> None:
        from types import SimpleNamespace

        self.state = SimpleNamespace(batch=[], output=[], metrics={})


def _run_handlers(dataset: HPFDataset, maps: list[np.ndarray], *handlers) -> _Engine:
    engine = _Engine()
    handlers[0].started(engine)
    for i, prob in enumerate(maps):
        engine.state.batch = [{"index": i}]
        engine.state.output = [{"pred": torch.from_numpy(np.stack([1 - prob, prob]))}]
        handlers[0].iteration_completed(engine)
    handlers[0].completed(engine)
    for handler in handlers[1:]:
        handler(engine)
    return engine


def test_writer_fails_unreadable_hpfs_by_name_and_writes_the_others(tmp_path: Path) -> None:
    """An HPF left out by the dataset, and one whose read fails during the run, get no output and are named by
    ensure_completed; the good one is written and counted."""
    from pathbundles.errors import SlidesFailedError

    good = _hand_made(tmp_path, (200, 200), [(50, 50)], "good")
    late = _hand_made(tmp_path, (200, 200), [], "late")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    ds = HPFDataset([{"image": str(tmp_path / "loop.png")}, good, late])
    writer = HPFDetectionWriter(ds, tmp_path / "out", min_mean_score=0.0)
    engine = _Engine()
    writer.started(engine)
    for k, index in enumerate(ds.usable):
        item = ds[k]
        if index == 2:  # as if the file broke after the check
            item["error"] = f"{late['image']}: truncated"
        prob = _gaussian_map((200, 200), [(50, 50, 0.9, 5)])
        engine.state.batch = [item]
        engine.state.output = [{"pred": torch.from_numpy(np.stack([1 - prob, prob]))}]
        writer.iteration_completed(engine)
    writer.completed(engine)
    assert [r["name"] for r in writer.results()] == ["good"]
    assert (tmp_path / "out" / "detections" / "good.csv").exists()
    assert not (tmp_path / "out" / "detections" / "late.csv").exists()
    counts = (tmp_path / "out" / "hpf_counts.csv").read_text().splitlines()
    assert len(counts) == 2 and counts[1].startswith("good,1,")
    with pytest.raises(SlidesFailedError, match=r"2 HPF\(s\) failed, the others were written: loop: .*loop\.png.*; "
                                                 r"late: .*truncated"):
        writer.ensure_completed()


def test_writer_metrics_report_and_tuner_store(tmp_path: Path) -> None:
    a = _hand_made(tmp_path, (200, 200), [(50, 50), (150, 60)], "a")
    b = _hand_made(tmp_path, (200, 200), [(100, 100)], "b")
    maps = [_gaussian_map((200, 200), [(50, 50, 0.9, 5), (150, 150, 0.3, 12)]),  # 1 TP, a weak FP, 1 miss
            _gaussian_map((200, 200), [(101, 99, 0.8, 5)])]  # 1 TP
    ds = HPFDataset([a, b])
    writer = HPFDetectionWriter(ds, tmp_path / "out", min_mean_score=0.0, radius_px=30)
    report = MitosisMetricsReport(writer, tmp_path / "out", radius_px=30)
    config = tmp_path / "inference.json"
    config.write_text(json.dumps({"min_mean_score": 0.0, "min_area_um2": 0.0, "other": [1, 2]}, indent=4) + "\n")
    tuner = ThresholdTuner(writer, tmp_path / "out", config_file=config, score_grid=[0.0, 0.2], area_grid_um2=[0.0])
    engine = _run_handlers(ds, maps, writer, report, tuner)
    # At s1 = 0: TP 2, FP 1, FN 1 -> P = R = F1 = 2/3.
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    assert metrics["f1"] == pytest.approx(2 / 3) and metrics["precision"] == pytest.approx(2 / 3)
    assert engine.state.metrics["recall"] == pytest.approx(2 / 3)
    # Well-separated mitoses: the challenge scorers' greedy matching counts the same as the optimal one.
    details = json.loads((tmp_path / "out" / "metrics.json").read_text())["details"]
    assert details["matching"] == "optimal"
    assert {m: (c["tp"], c["fp"], c["fn"]) for m, c in details["counts_by_matching"].items()} == {
        "optimal": (2, 1, 1), "greedy": (2, 1, 1)}
    # PR curve: the two strong TPs first (P 1, R 2/3), then the weak FP (P 2/3): AP = 2/3 * 1 + 0 * 2/3.
    assert metrics["average_precision"] == pytest.approx(2 / 3)
    curves = json.loads((tmp_path / "out" / "curves.json").read_text())
    np.testing.assert_allclose(curves["pr"]["precision"], [1.0, 1.0, 2 / 3])
    # Files: detections CSV (x, y, score), 8-bit map, overlay, counts; the tuner removed the FP with s1 = 0.2.
    det = read_points_csv(tmp_path / "out" / "detections" / "a.csv", "xy")
    assert det[0].shape == (2, 2) and det[1][0] == pytest.approx(float(writer.blobs["a"][0, 0]))
    prob_png = np.asarray(Image.open(tmp_path / "out" / "maps" / "b.png"))
    assert prob_png.shape == (200, 200) and prob_png.dtype == np.uint8 and prob_png[99, 101] == round(0.8 * 255)
    overlay = np.asarray(Image.open(tmp_path / "out" / "overlays" / "a.png"))
    assert (overlay == FN_COLOUR).all(axis=-1).any() and (overlay == FP_COLOUR).all(axis=-1).any()
    assert (tmp_path / "out" / "hpf_counts.csv").read_text().splitlines() == [
        "name,n_detections,max_score", f"a,2,{writer.blobs['a'][0, 0]:.6f}", f"b,1,{writer.blobs['b'][0, 0]:.6f}"]
    stored = json.loads(config.read_text())
    assert (stored["min_mean_score"], stored["min_area_um2"], stored["other"]) == (0.2, 0.0, [1, 2])
    assert stored["thresholds_tuned_on"]["f1"] == pytest.approx(0.8)  # TP 2, FP 0, FN 1
    assert stored["thresholds_tuned_on"]["sigma_um"] == writer.sigma_um == 1.0  # the smoothing they assume
    assert json.loads((tmp_path / "out" / "tuning.json").read_text())["best"]["min_mean_score"] == 0.2
    assert not list((tmp_path / "out").rglob("*.partial*")) and not list(tmp_path.glob(".*"))


def test_store_thresholds_refuses_a_foreign_config(tmp_path: Path) -> None:
    config = tmp_path / "x.json"
    config.write_text('{"min_mean_score": 0.1}')
    with pytest.raises(InputError, match="min_area_um2"):
        store_thresholds(config, 0.2, 3.0)
    assert json.loads(config.read_text()) == {"min_mean_score": 0.1}


def test_thresholds_go_to_a_new_override_file_and_bad_targets_fail_before_tuning(tmp_path: Path) -> None:
    from pathbundles.hpf import check_thresholds_target

    target = tmp_path / "eval" / "tune" / "thresholds.json"  # folders made when stored
    assert check_thresholds_target(target) == target and not target.parent.exists()
    store_thresholds(target, 0.35, 42.0, {"hpfs": 3, "f1": 0.5, "radius_px": 30.0})
    assert json.loads(target.read_text()) == {"min_mean_score": 0.35, "min_area_um2": 42.0,
                                              "thresholds_tuned_on": {"hpfs": 3, "f1": 0.5, "radius_px": 30.0}}
    store_thresholds(target, 0.4, 10.0)  # a second tune run updates its own file
    assert json.loads(target.read_text())["min_mean_score"] == 0.4
    foreign = tmp_path / "train.json"
    foreign.write_text('{"epochs": 3}')
    with pytest.raises(InputError, match=r"train\.json: the config has no min_mean_score, min_area_um2 key"):
        check_thresholds_target(foreign)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(InputError, match=rf"cannot store the tuned thresholds: {blocker} is not a writable folder"):
        check_thresholds_target(blocker / "sub" / "thresholds.json")
    # The tuner checks its target when it is made, before any HPF is run.
    ds = HPFDataset([_hand_made(tmp_path, (64, 64), [(20, 20)], "c")])
    writer = HPFDetectionWriter(ds, tmp_path / "out")
    with pytest.raises(InputError, match="a_file is not a writable folder"):
        ThresholdTuner(writer, tmp_path / "out", config_file=blocker / "thresholds.json")


def test_tuned_f1_metric_is_the_best_grid_f1() -> None:
    maps = [_gaussian_map((200, 200), [(50, 50, 0.9, 5), (150, 150, 0.3, 12)])]
    metric = TunedMitosisF1()
    metric.reset()
    metric.update(([torch.from_numpy(np.stack([1 - maps[0], maps[0]]))], [torch.tensor([[50.0, 50.0]])]))
    assert metric.compute() == tune_thresholds(maps, [np.array([[50.0, 50.0]])])["f1"] == 1.0


def test_circle_overlay_with_no_detections(tmp_path: Path) -> None:
    image = np.full((40, 50, 3), 200, np.uint8)
    write_circle_overlay_png(tmp_path / "o.png", image, np.zeros((0, 3)), truth=np.array([[20.0, 20.0]]),
                             radius_px=5, width_px=1)
    x0, y0, w, h = read_overlay_layout(tmp_path / "o.png")["slide_box_px"]
    out = np.asarray(Image.open(tmp_path / "o.png"))[y0:y0 + h, x0:x0 + w]
    assert out.shape == (40, 50, 3) and (out == FN_COLOUR).all(axis=-1).sum() > 10  # the miss is drawn
    assert not (out == FP_COLOUR).all(axis=-1).any()


def test_writer_and_miner_thresholds_are_probabilities(tmp_path: Path) -> None:
    """Checked when the run is built, not after it: a blob score threshold above 1 keeps no mitosis at all."""
    from pathbundles.errors import SettingError
    from pathbundles.scannet import HardNegativeMining

    with pytest.raises(SettingError, match=r"min_mean_score must be a probability in \[0, 1\], got 1.5"):
        HPFDetectionWriter(None, tmp_path, min_mean_score=1.5)
    with pytest.raises(SettingError, match=r"threshold must be a probability in \[0, 1\], got 2"):
        HardNegativeMining(None, None, threshold=2)


# ------------------------------------------------------------------------------------------- level-0 outputs of boxes


def _darkness_map(hpf_chw: torch.Tensor) -> np.ndarray:
    """An oracle's mitosis probability: how much darker than the phantom's tissue ground each HPF pixel is."""
    from pathbundles.phantom import GEOMETRY_MARKER_RGB, GEOMETRY_TISSUE_RGB

    grey = hpf_chw.numpy().astype(np.float64).mean(axis=0)
    ground, apex = float(np.mean(GEOMETRY_TISSUE_RGB)), float(np.mean(GEOMETRY_MARKER_RGB))
    return np.clip((ground - grey) / (ground - apex), 0, 1).astype(np.float32)


def test_slide_box_detections_are_written_at_their_level0_position(tmp_path: Path) -> None:
    """Boxes of a 0.2527 um/px geometry phantom read at 0.25 um/px: the detection of the mitosis-sized dark blob
    in each box is written (CSV with a level-0 header, GeoJSON, ASAP XML) at the blob's level-0 position within a
    quarter level-0 pixel, though the box's own pixels are another size and start elsewhere."""
    from pathbundles.annotations import read_annotations
    from pathbundles.phantom import make_geometry_dataset
    from pathbundles.writers import read_detections_geojson

    slide = read_datalist(make_geometry_dataset(tmp_path / "g", n=1, seed=4, size_um=400.0, mpp=0.2527,
                                                marker_radius_um=5.0, marker_spacing_um=100.0, edge_um=50.0))[0]
    markers = np.asarray(slide["markers_xy"])
    assert len(markers) >= 3
    items = []
    for k, (mx, my) in enumerate(markers[:3]):
        side0 = 60.0 / 0.2527  # a 60 um box, the blob off its centre
        items.append({"image": slide["image"], "box": [int(mx - side0 * (0.3 + 0.1 * k)), int(my - side0 * 0.6),
                                                       int(side0), int(side0)], "name": f"box{k}"})
    ds = HPFDataset(items, mpp=0.25, backend="tifffile")
    assert len(ds) == len(items) and ds.level0_mpp(0) == pytest.approx(0.2527)
    writer = HPFDetectionWriter(ds, tmp_path / "out", mpp=0.25, min_mean_score=0.0, min_area_um2=10.0)
    _run_handlers(ds, [_darkness_map(ds[k]["image"]) for k in range(len(ds))], writer)
    for k, (mx, my) in enumerate(markers[:3]):
        name = ds.names[k]
        assert name.startswith(f"box{k}_x")
        files = writer.outputs(name)
        csv_lines = files["detections"].read_text().splitlines()
        assert csv_lines[0] == ",".join(LEVEL0_CSV_HEADER)
        xy, scores = read_points_csv(files["detections"], "xy")
        assert len(xy) == 1, (k, xy)
        # Level-0 px of the slide, not box px; a quarter pixel: taking pixel centres as corners is half a pixel off.
        np.testing.assert_allclose(xy[0], [mx, my], atol=0.25)
        hpf_xy = writer.detections[name][0, :2]
        box = np.array(items[k]["box"][:2], float)
        np.testing.assert_allclose(xy[0], box + (hpf_xy + 0.5) * 0.25 / 0.2527, rtol=0, atol=1e-9)
        geojson = read_detections_geojson(files["geojson"])
        np.testing.assert_allclose(geojson, [[scores[0], *xy[0]]], rtol=0, atol=1e-9)
        doc = json.loads(files["geojson"].read_text())
        assert doc["properties"]["mpp"] == pytest.approx(0.2527)
        assert doc["features"][0]["properties"]["classification"] == {"name": "Mitosis", "color": [255, 255, 0]}
        (dot,) = read_annotations(files["asap_xml"])
        assert (dot.kind, dot.group) == ("point", "Mitosis")
        np.testing.assert_allclose(dot.xy[0], xy[0], rtol=0, atol=1e-9)


def test_hpf_file_detections_keep_the_challenge_csv_and_get_geojson(tmp_path: Path) -> None:
    """An HPF file: the CSV stays header-less in HPF px (pixel centres at integers, as the challenges'); GeoJSON and
    ASAP XML place the same detection in the image's pixels as viewers do (pixel k spans [k, k + 1)): + 0.5."""
    from pathbundles.annotations import read_annotations
    from pathbundles.writers import read_detections_geojson

    ds = HPFDataset([_hand_made(tmp_path, (200, 200), [(60, 70)], "a")])
    writer = HPFDetectionWriter(ds, tmp_path / "out", min_mean_score=0.0)
    _run_handlers(ds, [_gaussian_map((200, 200), [(60, 70, 0.9, 5)])], writer)
    files = writer.outputs("a")
    xy, scores = read_points_csv(files["detections"], "xy")
    assert files["detections"].read_text()[0].isdigit()  # no header
    np.testing.assert_allclose(xy, [[60, 70]], atol=0.05)
    np.testing.assert_allclose(read_detections_geojson(files["geojson"]), [[scores[0], *(xy[0] + 0.5)]], atol=1e-9)
    np.testing.assert_allclose(read_annotations(files["asap_xml"])[0].xy, xy + 0.5, atol=1e-9)


def test_overlay_takes_the_pixels_the_dataset_read_instead_of_reading_the_hpf_again(tmp_path: Path) -> None:
    """With ``pixels_key`` each item carries the HPF as read (uint8, untouched by the transform); the writer draws
    the overlay from them, byte for byte the overlay it draws after reading the HPF again."""
    from monai.transforms import CastToTyped, NormalizeIntensityd

    item = _hand_made(tmp_path, (120, 90), [(40, 30)], "a")
    transform = lambda d: NormalizeIntensityd("image", subtrahend=128.0, divisor=128.0)(  # noqa: E731
        CastToTyped("image", dtype=torch.float32)(d))
    prob = _gaussian_map((90, 120), [(40, 30, 0.9, 4)])
    written = {}
    for key in (None, "hpf_rgb"):
        ds = HPFDataset([item], transform=transform, pixels_key=key)
        got = ds[0]
        assert got["image"].dtype == torch.float32 and float(got["image"].min()) < 0  # transformed
        if key is None:
            assert "hpf_rgb" not in got
        else:
            assert got[key].dtype == torch.uint8 and got[key].shape == (90, 120, 3)
            np.testing.assert_array_equal(got[key].numpy(), ds.read_image(0))
            ds.read_image = None  # the writer must not read the HPF again
        writer = HPFDetectionWriter(ds, tmp_path / f"out_{key}", min_mean_score=0.0)
        engine = _Engine()
        writer.started(engine)
        engine.state.batch = [got]
        engine.state.output = [{"pred": torch.from_numpy(np.stack([1 - prob, prob]))}]
        writer.iteration_completed(engine)
        writer.completed(engine)
        written[key] = (tmp_path / f"out_{key}" / "overlays" / "a.png").read_bytes()
    assert written[None] == written["hpf_rgb"]
