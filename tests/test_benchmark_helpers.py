"""The arithmetic the benchmark scripts report with: the scaling fit, segmitos's HPF grid and map agreement, the
per-layer roofline's FLOPs and bytes, the FMA peak program, bench_autocast's output comparisons, the Spatial
LSTM peers' grid and lattice bookkeeping, and the DMMN peers' view corners and tile-by-tile agreement."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_autocast  # noqa: E402
import bench_hpf_budget  # noqa: E402
import bench_inference_network  # noqa: E402
import bench_peers  # noqa: E402
import bench_scaling  # noqa: E402
import machine  # noqa: E402
import peers_dmmn  # noqa: E402
import peers_spatial_lstm  # noqa: E402

from pathbundles.tissue import LevelMask  # noqa: E402


def test_fit_line_matches_hand_computed_least_squares():
    # x mean 2, y mean 14.1667; Sxy = 4.5, Sxx = 2 -> slope 2.25, intercept 9.6667; residuals 1/12, -1/6, 1/12.
    fit = bench_scaling.fit_line([1.0, 2.0, 3.0], [12.0, 14.0, 16.5])
    assert fit["slope_s_per_mm2"] == pytest.approx(2.25)
    assert fit["intercept_s"] == pytest.approx(29 / 3)
    assert fit["max_relative_residual"] == pytest.approx((1 / 6) / 14)
    assert bench_scaling.fit_line([1.0], [3.0]) == {}


def test_network_share_end_to_end_and_steady_state():
    # 100 s in the run, 80 s in the network, 5 s before its first call and 7 s after its last:
    # end to end 100 / 80 = 1.25, steady state (100 - 5 - 7) / 80 = 1.1.
    worker = {"import_s": 4.0, "total_s": 100.0, "network_forward_s": 80.0, "network_calls": 10,
              "first_forward_after_s": 5.0, "after_last_forward_s": 7.0, "capture_s": 0.0}
    share = bench_scaling.network_share(worker)
    assert share["end_to_end_over_network"] == pytest.approx(1.25)
    assert share["steady_state_over_network"] == pytest.approx(1.1)
    assert (share["run_s"], share["network_calls"]) == (100.0, 10)


def test_summarise_ratios_and_flat_memory():
    runs = [{"size_px": 2, "returncode": 0, "tissue_area_mm2": 4.0, "wall_s": 30.0, "peak_rss_mib": 1000.0},
            {"size_px": 1, "returncode": 0, "tissue_area_mm2": 1.0, "wall_s": 12.0, "peak_rss_mib": 1000.0},
            {"size_px": 3, "returncode": 1, "tissue_area_mm2": 16.0, "wall_s": 5.0, "peak_rss_mib": 900.0}]
    summary = bench_scaling.summarise(runs, baseline_mib=700.0)
    assert summary["fit_time_vs_tissue_area"]["slope_s_per_mm2"] == pytest.approx(6.0)  # (30 - 12) / 3
    assert summary["fit_time_vs_tissue_area"]["points"] == 2  # the failed run is left out
    assert summary["peak_rss_mib_range"] == [1000.0, 1000.0]
    big = runs[0]
    assert big["vs_smallest"] == {"tissue_area_ratio": 4.0, "time_ratio": 2.5, "peak_rss_ratio": 1.0}
    assert big["s_per_tissue_mm2"] == pytest.approx(7.5)
    assert big["incremental_s_per_tissue_mm2"] == pytest.approx(6.0)  # 18 s more for 3 mm^2 more
    assert "incremental_s_per_tissue_mm2" not in runs[1]
    assert big["peak_rss_above_baseline_mib"] == pytest.approx(300.0)


def test_hpf_boxes_keep_the_grid_boxes_whose_centre_is_tissue(tmp_path):
    # Level 0 at 5 um/px: an HPF of 2084 px at 0.25 um/px is a box of round(104.2) = 104 level-0 px. A 400 x 300
    # slide holds 3 x 2 whole boxes (x 0, 104, 208; y 0, 104). Mask at 20 um/px (4 level-0 px per mask px),
    # tissue only round the centre (156, 52) of the box at x 104, y 0.
    mask = np.zeros((75, 100), bool)
    mask[12:15, 38:41] = True
    level_mask = LevelMask(mask, mpp=20.0, level0_mpp=5.0, level0_size=(400, 300))
    info = {"level0_size": [400, 300], "level0_mpp": 5.0}
    path, n = bench_scaling.hpf_boxes(tmp_path / "slide.tif", info, level_mask, tmp_path)
    assert n == 1
    assert json.loads(path.read_text()) == [{"image": str(tmp_path / "slide.tif"), "box": [104, 0, 104, 104],
                                             "mpp": 5.0}]
    mask[:] = True
    _, n_all = bench_scaling.hpf_boxes(tmp_path / "slide.tif", info, level_mask, tmp_path)
    assert n_all == 6


def test_segmitos_compare_splits_border_and_interior():
    ours = np.zeros((10, 10), np.float32)
    theirs = ours.copy()
    theirs[0, 0], theirs[5, 5] = 0.5, 0.1  # a border pixel (padding's reach) and an interior one
    got = bench_peers.segmitos_compare(theirs, ours, margin_px=2)
    assert got["max_abs"] == pytest.approx(0.5)
    assert got["interior_max_abs"] == pytest.approx(0.1)
    assert got["mean_abs"] == pytest.approx(0.6 / 100)
    assert got["interior_mean_abs"] == pytest.approx(0.1 / 36)


def test_layer_flops_and_bytes_match_hand_counts():
    import torch

    conv = torch.nn.Conv2d(4, 6, 3, padding=1, groups=2)  # 6 x (2 x 3 x 3) weights + 6 biases = 114 parameters
    x = torch.zeros(1, 4, 5, 7)
    flops, nbytes = bench_inference_network.layer_flops_bytes(conv, x, conv(x))
    assert flops == 2 * (6 * 5 * 7) * (2 * 9)  # 2 per multiply-add, 18 per output value
    assert nbytes == 4 * (4 * 35 + 6 * 35 + 114)
    linear = torch.nn.Linear(10, 3)
    x = torch.zeros(2, 10)
    flops, nbytes = bench_inference_network.layer_flops_bytes(linear, x, linear(x))
    assert (flops, nbytes) == (2 * 6 * 10, 4 * (20 + 6 + 33))


def test_fma_peak_program_measures_a_positive_rate():
    import shutil

    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler: the benchmark records the error instead")
    result = machine.fma_peak(threads=1, seconds=0.05, kinds=("avx2", "no_such_kind"))
    assert result["no_such_kind"]["error"].startswith("no_such_kind: not built")
    avx2 = result["avx2"]
    if "error" in avx2:
        pytest.skip(f"this CPU or compiler has no AVX2 FMA: {avx2['error']}")
    assert avx2["threads"] == 1 and avx2["seconds"] >= 0.05 and avx2["gflops"] > 0.1


def test_autocast_comparisons_of_written_outputs(tmp_path):
    from PIL import Image

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "slide_scores.csv").write_text("name,score,n_detections\ns1,0.75,2\ns2,0.125,0\n")
    assert bench_autocast.slide_scores(tmp_path / "a") == {"s1": 0.75, "s2": 0.125}

    a, b = tmp_path / "a", tmp_path / "b"
    for folder, values in ((a, [0, 255, 10]), (b, [3, 250, 10])):
        (folder / "maps").mkdir(parents=True)
        Image.fromarray(np.array([values], dtype=np.uint8)).save(folder / "maps" / "h.png")
        (folder / "detections").mkdir()
        (folder / "detections" / "h.csv").write_text("10,10,0.9\n50,50,0.8\n" if folder == a else "12,13,0.9\n")
    maps = bench_autocast.map_difference(a, b, "maps/*.png")
    assert maps["maps"] == 1
    assert maps["max_abs_probability_difference"] == pytest.approx(5 / 255)
    assert maps["mean_abs_probability_difference"] == pytest.approx(8 / 255 / 3)
    near = bench_autocast.detection_agreement(a, b)
    assert (near["float32"], near["bfloat16"]) == (2, 1)
    assert near["matched"] == 1  # (10, 10)-(12, 13): 3.6 px; (50, 50) has no partner


def test_gpu_script_refuses_a_machine_without_cuda(tmp_path):
    """benchmarks/gpu.sh checks for a CUDA device before it writes anything (CI and this project's machines have
    none; where torch sees one, the check passes and the script is not run here)."""
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: gpu.sh would run the GPU benchmarks")
    run = subprocess.run(["bash", str(BENCHMARKS / "gpu.sh")], capture_output=True, text=True, timeout=600,
                         env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "GPU_OUT": str(tmp_path / "gpu")})
    assert run.returncode == 1, run.stderr
    assert "sees no CUDA device" in run.stderr
    assert not (tmp_path / "gpu").exists()


def test_spatial_lstm_peers_grid_cells_lattice_and_agreement():
    # The grid at map pixel (1, 2), G = 3, grid_step 4: lattice rows 1, 5, 9 x columns 2, 6, 10, raster order.
    rows, cols = peers_spatial_lstm.grid_indices(np.array([[1, 2]]), 3, 4)
    assert rows.tolist() == [[1, 1, 1, 5, 5, 5, 9, 9, 9]] and cols.tolist() == [[2, 6, 10] * 3]
    # Grids at (0, 0) and (0, 4) share lattice columns 4 and 8: 12 patches, not 18, on a 3 x 5 + 8 lattice.
    wanted = np.zeros((3, 5), bool)
    wanted[0, 0] = wanted[0, 4] = True
    needed = peers_spatial_lstm.lattice_needed(wanted, 3, 4)
    assert needed.shape == (11, 13) and needed.sum() == 12
    assert needed[np.ix_([0, 4, 8], [0, 4, 8, 12])].all()
    # No wanted grid (an ROI chosen for tissue under its footprint but with no map pixel centred on it): no patch.
    assert peers_spatial_lstm.grid_indices(np.zeros((0, 2), int), 3, 4)[0].shape == (0, 9)
    assert not peers_spatial_lstm.lattice_needed(np.zeros((4, 4), bool), 3, 4).any()
    ours = np.array([[0.2, 0.9], [0.6, np.nan]], np.float32)
    other = np.array([[0.25, 0.4], [np.nan, 0.1]], np.float32)
    got = peers_spatial_lstm.compare(ours, other, np.array([[True, True], [True, False]]),
                                     np.array([[True, False], [True, True]]))
    assert got["all"]["positions"] == 2 and got["all"]["prob_max_abs_diff"] == pytest.approx(0.5)
    assert got["all"]["decision_disagreements_at_0.5"] == 1  # 0.9 against 0.4
    assert got["interior"]["positions"] == 1 and got["interior"]["prob_max_abs_diff"] == pytest.approx(0.05)
    assert got["positions_wanted_not_evaluated"] == 1  # (1, 0): the other pipeline has no value there


def test_dmmn_monai_view_corners_centre_each_view_on_its_target_tile():
    # Tile (r, c) of the 256 px target grid has its centre at level-0 (256 r + 128, 256 c + 128); a view of
    # downsample d spans 256 d level-0 px round it, so its corner is the centre minus 128 d.
    x20, x10, x5 = peers_dmmn.view_corners(2, 3, 256, [1.0, 2.0, 4.0])
    assert x20.tolist() == [[0, 0], [0, 256], [0, 512], [256, 0], [256, 256], [256, 512]]
    assert x10[4].tolist() == [384 - 256, 384 - 256] and x5[4].tolist() == [384 - 512, 384 - 512]
    assert x5[0].tolist() == [-384, -384]  # reaches 384 px beyond the slide's corner, as the bundle's 5x view
    # an uneven pyramid step (a 3.9x level): the corner rounds half the footprint to whole level-0 pixels
    assert peers_dmmn.view_corners(1, 1, 256, [3.9])[0].tolist() == [[128 - 499, 128 - 499]]


def test_dmmn_compare_reads_a_peer_in_tiles_as_in_a_canvas():
    rng = np.random.default_rng(3)
    grid, p, k = (2, 3), bench_peers.DMMN_PATCH_PX, bench_peers.DMMN_CLASSES
    ours = rng.dirichlet(np.ones(k), size=(6, p, p)).astype(np.float32).transpose(0, 3, 1, 2)  # (6, k, p, p)
    labels = np.concatenate([bench_peers.dmmn_tile_row(ours, r, 3) for r in range(2)]).argmax(-1) + 1
    peer = ours.copy()
    peer[4, :, 10, 20] = np.eye(k)[(ours[4, :, 10, 20].argmax() + 1) % k]  # one pixel of tile (1, 1) relabelled
    canvas = np.concatenate([bench_peers.dmmn_tile_row(peer, r, 3) for r in range(2)])  # (512, 768, k)
    assert canvas.shape == (2 * p, 3 * p, k) and np.array_equal(canvas[p + 10, p + 20], peer[4, :, 10, 20])
    interior = np.array([[False, False, False], [False, True, False]])
    by_tiles, tile_max = bench_peers.dmmn_compare(ours, peer, labels.astype(np.uint8), grid, interior,
                                                  peer_tiles=True)
    by_canvas, _ = bench_peers.dmmn_compare(ours, canvas, labels.astype(np.uint8), grid, interior)
    assert by_tiles == by_canvas
    assert by_tiles["all"]["same_label_fraction"] == 1 - 1 / (6 * p * p)
    assert by_tiles["interior"]["same_label_fraction"] == 1 - 1 / (p * p)
    assert by_tiles["border"]["same_label_fraction"] == 1.0 and by_tiles["border"]["prob_max_abs_diff"] == 0.0
    assert tile_max[1, 1] == pytest.approx(np.abs(peer[4, :, 10, 20] - ours[4, :, 10, 20]).max())
    assert by_tiles["bundle_labels_differing_from_captured_argmax"] == 0
    assert sum(map(sum, by_tiles["confusion_ours_rows_peer_cols"])) == 6 * p * p


def test_dmmn_monai_views_get_the_bundles_own_per_view_transforms():
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bench_peers.DMMN_CONFIG))
    transforms = peers_dmmn.view_transforms(parser)
    assert [type(t).__name__ for t in transforms] == ["CastToTyped", "ScaleIntensityRanged"]
    view = {"image": torch.tensor([[[0, 51, 255]]], dtype=torch.uint8)}
    for t in transforms:
        view = t(view)
    # 0..255 to -1..1 in float32, as the bundle scales each of x20, x10, x5 before concatenating them
    assert view["image"].dtype == torch.float32
    assert torch.allclose(torch.as_tensor(view["image"]), torch.tensor([[[-1.0, -0.6, 1.0]]]))


def test_hpf_budget_predicts_the_steady_state_from_core_seconds():
    """bench_hpf_budget.budget by hand: 2 threads x 0.5 s = 1.0 core-s of network; 0.1 + 0.02 + 0.01 + 0.17 = 0.30
    core-s of the rest -> 1.30x (1.33x with MONAI's 0.05 s transforms); 1.1x allows 0.1; 0.8 / (2 x 0.5) = 80 %."""
    median = {"network": 0.5, "network_1_thread": 0.8, "read": 0.1, "to_tensor_and_transforms": 0.02,
              "to_tensor_and_monai_transforms": 0.05, "softmax": 0.01, "writer_add": 0.17}
    out = bench_hpf_budget.budget(median, threads=2)
    assert out["network_core_s"] == pytest.approx(1.0) and out["other_core_s"] == pytest.approx(0.30)
    assert out["predicted_steady_state"] == pytest.approx(1.30)
    assert out["predicted_steady_state_with_monai_transforms"] == pytest.approx(1.33)
    assert out["other_core_s_allowed_at_1_1x"] == pytest.approx(0.1)
    assert out["network_parallel_efficiency"] == pytest.approx(0.8)
