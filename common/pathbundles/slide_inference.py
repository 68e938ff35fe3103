"""Whole-slide inference as MONAI components: a dataset of tissue ROIs over many slides and a handler that stitches
each ROI's output tile into a per-slide probability map on disk, then writes the map, overlay, detections and score.

Geometry (``MapGrid``): ROIs lie on a grid anchored at level-0 (0, 0) with stride ``roi_stride_px`` pixels at the
scanning resolution ``scan_mpp``; ROI (r, c) reads ``read_px`` x ``read_px`` pixels from scan pixel
``(c * roi_stride_px, r * roi_stride_px)`` and yields a ``tile_px`` x ``tile_px`` output tile that fills map rows
``r * tile_px ...`` and columns ``c * tile_px ...``. Map pixel ``k`` is centred on scan pixel
``map_origin_px + k * map_step_px``; multiply by ``scan_mpp / level0_mpp`` for level-0 pixels. Reads are exact at
``scan_mpp`` whatever the slide's own resolution (``Slide.read_region``), so these positions hold on any scanner.

Written maps are registered to the slide instead (:func:`registered_map`): pixel ``k`` of a map TIFF or overlay
covers scan pixels ``[k * map_step_px, (k + 1) * map_step_px)`` from the slide's origin, so a viewer that places a
raster by its physical size (mpp) lays it over the slide; its values are the network's map interpolated
(bilinearly) at those pixels' centres.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pathbundles.atomic import atomic_path
from pathbundles.checks import flag
from pathbundles.errors import PathBundlesError, SlidesFailedError
from pathbundles.outputs import claim_folder, output_file, output_names, slide_name, work_area
from pathbundles.weights import RecordsWeights, WeightsIdentity, csv_header_and_row

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MapGrid:
    """How ROI outputs tile a slide's map. All lengths in pixels at the scanning resolution.

    Args:
        read_px: side of the region read per ROI.
        roi_stride_px: distance between neighbouring ROIs.
        tile_px: map pixels per ROI side.
        map_step_px: scan pixels between neighbouring map pixels.
        map_origin_px: scan pixel on which map pixel 0 is centred.
    """

    read_px: int
    roi_stride_px: int
    tile_px: int
    map_step_px: float
    map_origin_px: float

    def map_shape(self, scan_size_wh: tuple[float, float]) -> tuple[int, int]:
        """(H, W) of the map of a slide whose size at the scanning resolution is ``scan_size_wh`` (w, h)."""
        return (max(1, math.ceil(scan_size_wh[1] / self.map_step_px)),
                max(1, math.ceil(scan_size_wh[0] / self.map_step_px)))


@dataclass
class SlidePlan:
    """One slide of a run: where it is, its geometry, and the ROIs that cover its tissue."""

    name: str
    path: str
    mpp_override: float | tuple[float, float] | None = None  # level-0 um/px over the file's (item's mpp, slide_mpp)
    level0_mpp: float = 0.0
    level0_size: tuple[int, int] = (0, 0)
    map_shape: tuple[int, int] = (0, 0)
    rois_rc: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    error: str | None = None
    tissue: Any = None  # the slide's tissue LevelMask (Otsu or the user's), for maps restricted to tissue

    @property
    def n_rois(self) -> int:
        return int(len(self.rois_rc))


def plan_slides(data: Sequence[dict | str], grid: MapGrid, scan_mpp: float, *, backend: str = "auto",
                tissue_mpp: float = 8.0, mpp_override: float | None = None,
                tissue_mask_key: str | None = None) -> list[SlidePlan]:
    """Open every slide once, get its tissue mask and list the ROIs (r, c) whose read footprint has tissue.

    A slide opens with its item's ``mpp`` when it has one, else ``mpp_override`` (um/px), else its file's mpp. The
    mask is the Otsu tissue mask at ``tissue_mpp``, or the user's mask image named by the item's
    ``tissue_mask_key`` entry when that key is set and present (any image over the whole slide, tissue > 0).
    A slide that cannot be opened gets ``error`` set (logged with its name) instead of stopping the run. Names are
    checked first (:func:`pathbundles.outputs.output_names`): an item whose outputs would leave the output folder
    or overwrite another item's stops the run before any slide is read.
    """
    from pathbundles.tissue import TissueMask, tissue_mask
    from pathbundles.wsi import item_mpp, open_slide

    plans = []
    for name, item in zip(output_names(data), data):
        path = slide_name(item)[1]
        plan = SlidePlan(name=name, path=path, mpp_override=item_mpp(item, mpp_override))
        try:
            with open_slide(path, backend=backend, mpp=plan.mpp_override) as slide:
                plan.level0_mpp = float(slide.mpp[0])
                plan.level0_size = tuple(int(v) for v in slide.level_dimensions[0])
                scale = plan.level0_mpp / scan_mpp
                plan.map_shape = grid.map_shape((plan.level0_size[0] * scale, plan.level0_size[1] * scale))
                user_mask = item.get(tissue_mask_key) if tissue_mask_key and isinstance(item, dict) else None
                mask = TissueMask.load_mask(user_mask, plan.level0_size, plan.level0_mpp) if user_mask else \
                    tissue_mask(slide, mpp=tissue_mpp)
                origins = mask.tile_origins(grid.read_px, grid.roi_stride_px, scan_mpp)
                plan.tissue = mask
            step0 = grid.roi_stride_px * scan_mpp / plan.level0_mpp
            plan.rois_rc = np.unique(np.rint(np.asarray(origins, dtype=np.float64)[:, ::-1] / step0).astype(np.int64),
                                     axis=0).reshape(-1, 2)
        except (PathBundlesError, OSError, ValueError) as err:
            plan.error = str(err)
            logger.error("skipping slide %s: %s", name, err)
        plans.append(plan)
    return plans


def map_on_tissue(plan: SlidePlan, grid: MapGrid, scan_mpp: float, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Whether map pixels (``rows``, ``cols``: map indices, broadcast together) of a slide lie on its tissue mask:
    the mask at the level-0 point on which each map pixel is centred. All of them where the plan has no mask."""
    rows, cols = np.broadcast_arrays(np.asarray(rows, np.float64), np.asarray(cols, np.float64))
    if plan.tissue is None:
        return np.ones(rows.shape, bool)
    origin0 = grid.map_origin_px * scan_mpp / plan.level0_mpp
    step0 = grid.map_step_px * scan_mpp / plan.level0_mpp
    return np.asarray(plan.tissue.at_level0(origin0 + cols * step0, origin0 + rows * step0)) > 0


class SlideHandles:
    """Slides opened lazily and kept open, one handle per (path, mpp override) per process (each DataLoader worker
    has its own)."""

    def __init__(self, backend: str = "auto") -> None:
        self.backend = backend
        self._open: dict[tuple[str, Any], Any] = {}

    def __call__(self, path: str, mpp: float | tuple[float, float] | None = None) -> Any:
        """The open slide at ``path``, with ``mpp`` (level-0 um/px) overriding its file's when given."""
        key = (path, mpp)
        if key not in self._open:
            from pathbundles.wsi import open_slide

            self._open[key] = open_slide(path, backend=self.backend, mpp=mpp)
        return self._open[key]

    def __getstate__(self) -> dict:
        # Open slide handles do not cross process boundaries: workers reopen what they read.
        return {"backend": self.backend, "_open": {}}


class SlideROIDataset(torch.utils.data.Dataset):
    """Tissue ROIs of many slides, read at ``scan_mpp``; one item per ROI.

    Items are dicts: ``image`` (3, read_px, read_px) uint8 tensor (after ``transform``), ``slide_index``,
    ``roi_row``, ``roi_col`` and ``error`` ("" when the read succeeded); with ``tissue_key`` also that key, a
    (tile_px, tile_px) bool tensor telling which of the ROI's map pixels lie on the slide's tissue mask
    (:func:`map_on_tissue`, the rule of ``SlideMapWriter(tissue_only=True)``), for inferers that compute only those.
    Slides are opened lazily once per DataLoader worker, so reading overlaps with the network in worker processes.

    Args:
        data: slide paths or datalist dicts with ``image`` (and optionally ``mpp``, level-0 um/px over the file's).
        grid: the ROI/map geometry.
        scan_mpp: the resolution the network reads (um/px).
        backend: slide reader backend ("auto", "openslide", "tifffile", "cucim").
        tissue_mpp: resolution of the tissue mask (um/px).
        mpp_override: level-0 um/px over the slides' files (the bundles' ``slide_mpp``), for files that state none or
            a wrong one; an item's own ``mpp`` wins over it.
        transform: a MONAI dict transform applied to each item.
        tissue_mask_key: datalist key of user-supplied tissue mask images (None: always the Otsu mask).
        tissue_key: item key of the ROI's map pixels on tissue (None: not given).
    """

    def __init__(self, data: Sequence[dict | str], grid: MapGrid, scan_mpp: float, backend: str = "auto",
                 tissue_mpp: float = 8.0, mpp_override: float | None = None,
                 transform: Callable[[dict], dict] | None = None, tissue_mask_key: str | None = None,
                 tissue_key: str | None = None) -> None:
        self.grid, self.scan_mpp, self.backend, self.mpp_override = grid, float(scan_mpp), backend, mpp_override
        self.transform, self.tissue_key = transform, tissue_key
        self.plans = plan_slides(data, grid, scan_mpp, backend=backend, tissue_mpp=tissue_mpp,
                                 mpp_override=mpp_override, tissue_mask_key=tissue_mask_key)
        self.index = [(s, r, c) for s, plan in enumerate(self.plans) for r, c in plan.rois_rc]
        self.slides = SlideHandles(backend)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        s, r, c = self.index[i]
        plan, grid = self.plans[s], self.grid
        step0 = grid.roi_stride_px * self.scan_mpp / plan.level0_mpp
        error = ""
        try:
            slide = self.slides(plan.path, plan.mpp_override)
            region = slide.read_region((c * step0, r * step0), (grid.read_px, grid.read_px), self.scan_mpp)
        except (PathBundlesError, OSError, ValueError) as err:
            region, error = np.zeros((grid.read_px, grid.read_px, 3), np.uint8), f"{plan.path}: {err}"
        item = {"image": torch.from_numpy(np.ascontiguousarray(region.transpose(2, 0, 1))),
                "slide_index": s, "roi_row": int(r), "roi_col": int(c), "error": error}
        if self.tissue_key:
            k = np.arange(grid.tile_px)
            on_tissue = map_on_tissue(plan, grid, self.scan_mpp, r * grid.tile_px + k[:, None],
                                      c * grid.tile_px + k[None, :])
            item[self.tissue_key] = torch.from_numpy(on_tissue)
        return self.transform(item) if self.transform is not None else item


def _read_overview(path: str | os.PathLike, backend: str, mpp: Any, long_side_px: int) -> np.ndarray:
    from pathbundles.wsi import open_slide

    with open_slide(path, backend=backend, mpp=mpp) as slide:
        return slide.read_overview(long_side_px)[0]


class StreamedSlideWriter(RecordsWeights):
    """Ignite handler base of the whole-slide writers: per-slide outputs written on a background thread.

    The lifecycle shared by :class:`SlideMapWriter` and
    :class:`pathbundles.slide_segmentation.SlideLabelWriter`: the output folder locked for the run, with what a
    killed run left there removed (:func:`pathbundles.outputs.claim_folder`); a progress bar over the dataset's
    items, each slide handed to one writer thread as soon as its last item is in (:meth:`_submit`), so the network
    goes on with the next slide meanwhile; a slide that fails (read error or writing error) is logged, loses every
    file it had started (:meth:`outputs`), and does not stop the others; at the end of the epoch the slides not
    finished yet are finished (:meth:`_finish_remaining`), the run's own files are written
    (:meth:`_write_run_files`) and the folder is released. A config runs :meth:`ensure_completed` after the engine:
    it completes the run in which no slide gave an item (MONAI's ``Workflow.run`` then returns without firing any
    event), and raises :class:`~pathbundles.errors.SlidesFailedError` naming every failed slide. That is raised
    there rather than from the engine's end-of-epoch event, because a slide's failure is no engine failure: MONAI's
    ``StatsHandler`` logs an exception inside the engine with a traceback, and the handlers after the writer (the
    metrics reports, which leave failed slides out) would not run.

    Subclasses implement ``iteration_completed``, :meth:`_finish_remaining`, :meth:`_write_run_files` and
    :meth:`outputs`, and call :meth:`_submit` with a slide's name, its error (None when it read well), its
    stitching canvas (closed by the writer thread) and the function that writes its files.

    Args:
        dataset: the dataset being run (its length is the progress bar's total).
        output_dir: folder for all outputs.
        progress_desc, progress_unit: label and unit of the progress bar.
        weights: the run's weights (the ``checkpoint_loader``'s ``weights``): recorded in the run's files (the
            columns of :data:`pathbundles.weights.RECORD_FIELDS` after a table's own, the maps' fields, the
            GeoJSON properties), with the demo warning logged at the end of the run; None records nothing.
    """

    def __init__(self, dataset: Any, output_dir: str | os.PathLike, progress_desc: str,
                 progress_unit: str = "item", weights: WeightsIdentity | None = None) -> None:
        self.dataset, self.output_dir = dataset, Path(output_dir)
        self.weights = weights
        self.progress_desc, self.progress_unit = progress_desc, progress_unit
        #: {slide name: why} of the slides that failed.
        self.failed: dict[str, str] = {}
        #: names of the slides written.
        self.written: list[str] = []
        self._bar: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        #: {slide name: its overview being read on the writer thread} (:meth:`_prefetch_overview`)
        self._overviews: dict[str, Future] = {}
        self._completed = False
        self._lock: Any = None

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        # EPOCH_COMPLETED (not COMPLETED): metric handlers and trackers that read the outputs run on it after us.
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.completed)

    def started(self, engine: Any = None) -> None:
        from pathbundles.progress import progress

        self._claim()
        self._bar = progress(total=len(self.dataset), desc=self.progress_desc, unit=self.progress_unit)

    def _claim(self) -> None:
        """Lock the output folder for this run and remove a killed run's work files from it."""
        if self._lock is None or not self._lock.held:
            self._lock = claim_folder(self.output_dir)

    def iteration_completed(self, engine: Any) -> None:
        raise NotImplementedError

    def _advance(self, n: int) -> None:
        """Move the progress bar by ``n`` items."""
        if self._bar is not None:
            self._bar.update(n)

    def _writer_thread(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slide-writer")
        return self._pool

    def _submit(self, name: str, error: str | None, canvas: Any, write: Callable[[Any], None]) -> None:
        """Write slide ``name`` on the writer thread: ``write(canvas)``, or its failure when ``error`` is set."""
        self._pending.append(self._writer_thread().submit(self._finish_slide, name, error, canvas, write))

    def _prefetch_overview(self, name: str, path: str | os.PathLike, backend: str, mpp: Any,
                           long_side_px: int) -> None:
        """Read slide ``name``'s overview (:meth:`pathbundles.wsi.Slide.read_overview`) on the writer thread now,
        while the network works through the slide's items, instead of after its last one; called with the slide's
        first item. :meth:`_overview` takes it when the slide is written (the one thread runs tasks in order)."""
        if name not in self._overviews:
            self._overviews[name] = self._writer_thread().submit(_read_overview, path, backend, mpp, long_side_px)

    def _overview(self, name: str, path: str | os.PathLike, backend: str, mpp: Any,
                  long_side_px: int) -> np.ndarray:
        """Slide ``name``'s overview, uint8 (H, W, 3): the prefetched one, or read now. A read that failed raises
        here, in the slide's writing, which fails that slide alone."""
        future = self._overviews.pop(name, None)
        return _read_overview(path, backend, mpp, long_side_px) if future is None else future.result()

    def _finish_slide(self, name: str, error: str | None, canvas: Any, write: Callable[[Any], None]) -> None:
        try:
            if error is not None:
                raise RuntimeError(error)
            write(canvas)
            self.written.append(name)
        except Exception as err:  # noqa: BLE001 - one slide's failure must not stop the others
            self.failed[name] = str(err)
            for path in self.outputs(name).values():
                path.unlink(missing_ok=True)
            logger.error("slide %s failed: %s", name, err)
        finally:
            if canvas is not None:
                canvas.close()

    def completed(self, engine: Any = None) -> None:
        """Finish the slides not finished yet, wait for the writer, write the run's files; the output folder's lock
        is released (also when this raises). The slides that failed are in :attr:`failed`, raised by
        :meth:`ensure_completed`."""
        self._completed = True
        self._claim()  # a run whose engine never started (ensure_completed)
        try:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            self._finish_remaining()
            for future in self._pending:
                future.result()
            self._pending.clear()
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
            self._overviews.clear()  # those of slides that failed before they were written
            self._write_run_files()
        finally:
            self._lock.release()

    def ensure_completed(self, engine: Any = None) -> None:
        """End a run: complete it when its engine never started (every slide failed to open or has no tissue, so
        the data loader was empty and no event fired; the slides without tissue are then written with all-zero
        outputs), then raise :class:`~pathbundles.errors.SlidesFailedError` naming every slide that failed. A run is
        completed once: its dataset is fixed, so its runs are all empty or none is."""
        if not self._completed:
            self.completed(engine)
        self.warn_at_end()
        if self.failed:
            raise SlidesFailedError.listing(self.failed, written=len(self.written))

    def _finish_remaining(self) -> None:
        """Submit every slide whose items did not all come back (no tissue, say)."""
        raise NotImplementedError

    def _write_run_files(self) -> None:
        """Write the files of the whole run (a CSV over slides) once every slide is written."""
        raise NotImplementedError

    def outputs(self, name: str) -> dict[str, Path]:
        """The files written for slide ``name`` (:func:`pathbundles.outputs.output_file`: inside the output
        folder)."""
        raise NotImplementedError


class SlideMapWriter(StreamedSlideWriter):
    """Ignite handler: stitch ROI tiles into per-slide maps on disk and write each slide's outputs when complete.

    For slide ``name`` under ``output_dir``: ``maps/name.tif`` (probability x 255, stored R = G = B, as a tiled
    pyramidal OME-TIFF with mpp tags (:func:`pathbundles.writers.write_pyramid_tiff`), registered to the slide:
    pixel (0, 0) starts at the slide's origin, see :func:`registered_map`),
    ``overlays/name.png`` (for review: the slide thumbnail, its long side ``overlay_long_side_px``, with the map in
    the jet colours where it is at least ``overlay_min_probability`` on tissue, glass left as scanned, in the same
    registration; the detections ringed and numbered as the CSV's rows; a colour bar; the slide name, model and
    version, and score in a title strip; :func:`pathbundles.writers.write_overlay_png`), ``detections/name.csv``
    (Camelyon16 ``prob,x,y``, x and y the whole level-0 pixel holding the detection),
    ``detections/name.geojson`` (QuPath points, sub-pixel level-0 positions, stable ids) and
    ``detections/name.xml`` (ASAP "Dot" annotations, named with their score); and one ``slide_scores.csv``
    (``name,score,n_detections``, then ``weights_sha256,demo_weights,weights_warning`` when the writer
    knows the run's weights) for the run. A slide without tissue gets an all-zero map, no detections and
    score 0. A slide that fails is reported by name, gets no output, and the run raises at the end after finishing
    the other slides.

    Args:
        dataset: the ``SlideROIDataset`` being run (its plans give each slide's geometry).
        output_dir: folder for all outputs.
        detect: ``f(prob_map, map_mpp, level0_mpp, origin_xy=...) -> (N, >=3) [score, x, y, ...]`` level-0
            detections, e.g. ``pathbundles.postprocess.detections_from_components``.
        prob_channel: channel of the network output holding the tumour probability.
        overlay_long_side_px: pixels along the overlay thumbnail's long side (at most the slide's level 0).
        model_label: the model and version printed on overlays (:func:`pathbundles.bundle.model_label`).
        overlay_min_probability: map values below this are not coloured on the overlay (0..1).
        pred_key: key of the prediction in ``engine.state.output``.
        tissue_only: zero the map where the slide's tissue mask (the one that chose the ROIs) has no tissue at the
            map pixel's centre, before detection, scoring and writing: a probability map "over tissue", as NCRF
            computes it (a network trained on tissue patches says nothing meaningful about glass).
        weights: the run's weights, recorded in every output (see :class:`StreamedSlideWriter`).
    """

    def __init__(self, dataset: SlideROIDataset, output_dir: str, detect: Callable[..., np.ndarray],
                 prob_channel: int = 1, overlay_long_side_px: int = 2000, model_label: str = "",
                 overlay_min_probability: float = 0.05, pred_key: str = "pred", tissue_only: bool = False,
                 weights: WeightsIdentity | None = None) -> None:
        from pathbundles.checks import probability

        super().__init__(dataset, output_dir, "tissue ROIs", "roi", weights)
        self.detect = detect
        self.prob_channel, self.pred_key = prob_channel, pred_key
        self.overlay_long_side_px, self.model_label = int(overlay_long_side_px), str(model_label)
        self.overlay_min_probability = probability(overlay_min_probability, "overlay_min_probability")
        self.tissue_only = flag(tissue_only, "tissue_only")
        self._canvas: dict[int, Any] = {}
        self._done_rois: dict[int, int] = {}
        self.scores: dict[str, tuple[float, int]] = {}

    def _canvas_for(self, s: int) -> Any:
        if s not in self._canvas:
            from pathbundles.writers import DiskCanvas

            plan = self.dataset.plans[s]
            self._canvas[s] = DiskCanvas(plan.map_shape, np.float32, fill=0.0, dir=work_area(self.output_dir))
            self._prefetch_overview(plan.name, plan.path, self.dataset.backend, plan.mpp_override,
                                    self.overlay_long_side_px)
        return self._canvas[s]

    def iteration_completed(self, engine: Any) -> None:
        batch, output = engine.state.batch, engine.state.output
        self._advance(len(batch))
        for item, out in zip(batch, output):
            s = int(item["slide_index"])
            plan = self.dataset.plans[s]
            if plan.error is None and item["error"]:
                plan.error = str(item["error"])
                logger.error("slide %s failed: %s", plan.name, plan.error)
            if plan.error is None:
                tile = out[self.pred_key][self.prob_channel].detach().float().cpu().numpy()
                paste_tile(self._canvas_for(s), plan.map_shape, int(item["roi_row"]), int(item["roi_col"]), tile)
            self._done_rois[s] = self._done_rois.get(s, 0) + 1
            if self._done_rois[s] == plan.n_rois:
                self._finish(s)

    def _finish_remaining(self) -> None:
        """Finish slides without ROIs (no tissue): all-zero maps, no detections, score 0."""
        for s, plan in enumerate(self.dataset.plans):
            if self._done_rois.get(s, 0) < max(plan.n_rois, 1):
                self._done_rois[s] = max(plan.n_rois, 1)
                self._finish(s)

    def _write_run_files(self) -> None:
        """``slide_scores.csv``, slides in datalist order whatever order the writer finished them in."""
        self.scores = {p.name: self.scores[p.name] for p in self.dataset.plans if p.name in self.scores}
        extra_columns, extra_values = csv_header_and_row(self.weights)
        with atomic_path(self.output_dir / "slide_scores.csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["name", "score", "n_detections", *extra_columns])
            for name, (score, n) in self.scores.items():
                writer.writerow([name, f"{score:.6f}", n, *extra_values])

    def results(self) -> list[dict]:
        """One record per slide written by the run (datalist order): ``name``, ``score`` (max of the map),
        ``n_detections`` and ``outputs`` {kind: path} (the writer protocol of :mod:`pathbundles.bundle_runner`)."""
        return [{"name": name, "score": score, "n_detections": n, "outputs": self.outputs(name)}
                for name, (score, n) in self.scores.items()]

    def outputs(self, name: str) -> dict[str, Path]:
        """The files written for slide ``name``."""
        return {"map": output_file(self.output_dir, "maps", name, ".tif"),
                "overlay": output_file(self.output_dir, "overlays", name, ".png"),
                "detections": output_file(self.output_dir, "detections", name, ".csv"),
                "geojson": output_file(self.output_dir, "detections", name, ".geojson"),
                "asap_xml": output_file(self.output_dir, "detections", name, ".xml")}

    def _finish(self, s: int) -> None:
        """Hand a complete slide to the writer thread, so the network goes on with the next slide meanwhile."""
        plan = self.dataset.plans[s]
        self._submit(plan.name, plan.error, self._canvas.pop(s, None), lambda canvas: self._write_slide(plan, canvas))

    def _write_slide(self, plan: SlidePlan, canvas: Any) -> None:
        from pathbundles.writers import (write_detections_asap_xml, write_detections_csv, write_detections_geojson,
                                         write_overlay_png, write_pyramid_tiff)

        grid, scan_mpp = self.dataset.grid, self.dataset.scan_mpp
        # Post-processing needs the whole map (connected components); it is at the scan stride (Sd = 8-32 px), so a
        # Camelyon16 slide's map is at most a few hundred MB.
        prob = np.zeros(plan.map_shape, np.float32) if canvas is None else np.asarray(canvas[:], np.float32)
        map_mpp = grid.map_step_px * scan_mpp
        origin0 = grid.map_origin_px * scan_mpp / plan.level0_mpp
        if self.tissue_only and plan.tissue is not None:
            prob *= map_on_tissue(plan, grid, scan_mpp, *np.indices(prob.shape, dtype=np.float64))
        detections = np.asarray(self.detect(prob, map_mpp, plan.level0_mpp, origin_xy=(origin0, origin0)),
                                dtype=np.float64)[:, :3].reshape(-1, 3)
        files = self.outputs(plan.name)
        pixel_centres = (np.arange(max(plan.map_shape)) + 0.5) * grid.map_step_px
        registered = registered_map(prob, grid, pixel_centres[:plan.map_shape[0]], pixel_centres[:plan.map_shape[1]])
        # RGB (R = G = B): TIAToolbox reads no single-channel TIFF (pathbundles.writers, samples).
        write_pyramid_tiff(files["map"], np.clip(np.rint(registered * 255.0), 0, 255).astype(np.uint8), mpp=map_mpp,
                           compression="deflate", store_rgb=True,
                           description={"content": "tumour probability map: value / 255 = probability "
                                                   "(R = G = B)",
                                        "registration": f"pixel (0, 0) starts at the slide's level-0 origin; pixel "
                                                        f"(r, c) covers level-0 [c * s, (c + 1) * s) x [r * s, "
                                                        f"(r + 1) * s), s = {map_mpp} / level-0 mpp",
                                        **self.weights_record()})
        thumb = self._overview(plan.name, plan.path, self.dataset.backend, plan.mpp_override,
                               self.overlay_long_side_px)
        # Thumbnail pixel centres in level-0 and scan pixels: the overlay samples the map where each pixel lies.
        (w0, h0), to_scan = plan.level0_size, plan.level0_mpp / scan_mpp
        step_x, step_y = w0 / thumb.shape[1], h0 / thumb.shape[0]
        rows0, cols0 = (np.arange(thumb.shape[0]) + 0.5) * step_y, (np.arange(thumb.shape[1]) + 0.5) * step_x
        tissue = (np.asarray(plan.tissue.at_level0(cols0[None, :], rows0[:, None])) > 0
                  if plan.tissue is not None else None)
        score = float(prob.max()) if prob.size else 0.0
        write_overlay_png(files["overlay"], thumb, registered_map(prob, grid, rows0 * to_scan, cols0 * to_scan),
                          threshold=self.overlay_min_probability, mask=tissue,
                          detections_px=detections[:, 1:] / (step_x, step_y),
                          title=[plan.name, *([self.model_label] if self.model_label else []),
                                 f"slide score {score:.3f}; {len(detections)} detections, numbered as the rows of "
                                 f"detections/{files['detections'].name}"],
                          colour_bar="tumour probability",
                          fields={"slide": plan.name, "model": self.model_label,
                                  "level0_px_per_overlay_px": [step_x, step_y],
                                  "overlay_um_per_px": [step_x * plan.level0_mpp, step_y * plan.level0_mpp]})
        write_detections_csv(files["detections"], detections)
        write_detections_geojson(files["geojson"], detections, mpp=plan.level0_mpp,
                                 id_scope=f"{plan.name}/detections", properties=self.weights_record())
        write_detections_asap_xml(files["asap_xml"], detections)
        self.scores[plan.name] = (score, int(len(detections)))


def registered_map(prob: np.ndarray, grid: MapGrid, rows_scan_px: np.ndarray, cols_scan_px: np.ndarray) -> np.ndarray:
    """The map's values at given scan-pixel positions: bilinear between map pixel centres, 0 beyond them.

    Map pixel ``k`` of ``prob`` is centred on scan pixel ``grid.map_origin_px + k * grid.map_step_px`` (half a
    network input from the slide's origin), so a map written as it is would lie that far off its slide. Sampling it
    at the centres of the pixels of a raster anchored at the origin registers it.

    Args:
        prob: (H, W) map as the network made it.
        grid: the map's geometry.
        rows_scan_px, cols_scan_px: positions (y and x) in pixels at the scanning resolution.

    Returns:
        float32 (len(rows_scan_px), len(cols_scan_px)).
    """
    def axis(positions: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        u = (np.asarray(positions, np.float64) - grid.map_origin_px) / grid.map_step_px
        lo = np.floor(u).astype(np.int64)
        frac = (u - lo).astype(np.float32)
        # Weights of samples outside the map are zeroed, so positions past the outermost centres fade to 0.
        w_lo = np.where((lo >= 0) & (lo < n), 1 - frac, 0).astype(np.float32)
        w_hi = np.where((lo + 1 >= 0) & (lo + 1 < n), frac, 0).astype(np.float32)
        return np.clip(lo, 0, n - 1), np.clip(lo + 1, 0, n - 1), w_lo, w_hi

    prob = np.asarray(prob, np.float32)
    r_lo, r_hi, rw_lo, rw_hi = axis(rows_scan_px, prob.shape[0])
    c_lo, c_hi, cw_lo, cw_hi = axis(cols_scan_px, prob.shape[1])
    rows = prob[r_lo] * rw_lo[:, None] + prob[r_hi] * rw_hi[:, None]
    return rows[:, c_lo] * cw_lo + rows[:, c_hi] * cw_hi


def paste_tile(canvas: Any, map_shape: tuple[int, int], roi_row: int, roi_col: int, tile: np.ndarray) -> None:
    """Write ROI (roi_row, roi_col)'s output tile into its place on a map, clipped at the map's edge."""
    th, tw = tile.shape[-2:]
    r0, c0 = roi_row * th, roi_col * tw
    h, w = map_shape
    if r0 < h and c0 < w:
        canvas[r0:min(h, r0 + th), c0:min(w, c0 + tw)] = tile[:h - r0, :w - c0]


def predict_maps(dataset: SlideROIDataset, network: torch.nn.Module,
                 inferer: Callable[[torch.Tensor, torch.nn.Module], torch.Tensor], *, device: str = "cpu",
                 batch_size: int = 4, num_workers: int = 0,
                 prob_channel: int = 1) -> Iterator[tuple[SlidePlan, np.ndarray]]:
    """Run ``inferer`` over every ROI and yield ``(plan, probability map)`` per slide, maps held in memory.

    For work on the maps themselves (hard negative mining, tests, benchmarks); bundle runs stream to disk with
    :class:`SlideMapWriter` instead. Slides that failed to open are skipped; slides without tissue yield zeros.
    A dataset with a ``tissue_key`` passes its items' map pixels on tissue to the inferer as ``positions``.
    """
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    maps = {s: np.zeros(plan.map_shape, np.float32) for s, plan in enumerate(dataset.plans) if plan.error is None}
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                extra = {"positions": batch[dataset.tissue_key].to(device)} if dataset.tissue_key else {}
                probs = inferer(batch["image"].to(device), network, **extra)[:, prob_channel].float().cpu().numpy()
                for s, r, c, tile in zip(batch["slide_index"].tolist(), batch["roi_row"].tolist(),
                                         batch["roi_col"].tolist(), probs):
                    paste_tile(maps[s], dataset.plans[s].map_shape, r, c, tile)
    finally:
        network.train(was_training)
    for s, prob in maps.items():
        yield dataset.plans[s], prob
