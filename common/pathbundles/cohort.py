"""Cohort inference: one bundle over many slides, in many processes or on many machines, resumable and measured.

Launched plainly it is one process; launched by ``torchrun`` every process of the job (any number per node, any
number of nodes; the process group is NCCL on GPUs, gloo on CPU) takes a disjoint share of the slides, balanced by
level-0 slide area (:func:`shard_by_area`). Rank 0 plans (what is left to do, who does what) and broadcasts the plan;
every rank runs the bundle's own inference workflow on each of its slides, one slide per workflow run
(:func:`run_bundle_slide`) into a private work folder, and moves the files into place only when the slide
succeeded; after a barrier rank 0 merges the ranks' manifest fragments and writes the summary.
See docs/COHORT.md for the commands, the manifest format, the resume rules and measured numbers.

Output folder ``out``:

- the bundle's per-slide files under the same relative paths a ``python -m monai.bundle run --output_dir out``
  writes them (``maps/<name>.tif``, ``detections/<name>.csv``, ...), so the union over ranks is a one-process run;
- ``manifest.json``: per slide its status (``done``, ``failed`` with the error, ``skipped``), the bundle's name,
  version, weights hash and config hash, timings and output files;
- ``manifest/<run_id>.rank<r>.jsonl``: what rank ``r`` of a run has finished so far, one JSON line per slide,
  appended and fsynced as each slide ends (only that rank writes the file); merged into ``manifest.json`` at the end
  of a run, or at the start of the next one when the run was killed;
- ``summary.json`` (counts, slides per hour, data-wait fraction, AUC when the slides have labels), ``slides.csv``
  (one row per slide of the list: status, error, timings) and ``scores.csv`` (``name,label,score,n_detections`` of
  every slide with a result, the input of a slide-level AUC);
- ``report.html``: the cohort's report (:mod:`pathbundles.report`: per slide its thumbnail, overlay, score and
  detections), unless ``write_report`` is false.

One job per output folder at a time: rank 0 locks the folder for the run (:class:`pathbundles.outputs.FolderLock`;
a second job fails at its start naming the holder's PID and host), then removes the work folder ``.cohort-work``
and the other work files a killed run left (:func:`pathbundles.outputs.claim_folder`). Slide names come from
:func:`pathbundles.outputs.slide_name`: an item whose name is not one plain file name, or two items with one name,
stop the run before any slide.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pathbundles.atomic import atomic_path
from pathbundles.errors import SlideTimeoutError
from pathbundles.outputs import claim_folder, inside, output_names, slide_name
from pathbundles.weights import csv_header_and_row, weights_identity

logger = logging.getLogger("pathbundles.cohort")  # also when run as __main__

MANIFEST_FORMAT = 1
#: Test hook: a process exits hard (``os._exit``, no cleanup, no merge) after finishing this many slides.
STOP_AFTER_ENV = "PATHBUNDLES_COHORT_STOP_AFTER"
STOP_EXIT_CODE = 75
WORK_DIR = ".cohort-work"
#: What identifies the bundle a slide was done with: a slide is redone when any of these changes.
BUNDLE_KEYS = ("name", "version", "weights_sha256", "config_sha256")
#: ``python -m monai.bundle run`` arguments that are not config overrides (see :func:`bundle_run_command`).
_RUN_ARGUMENTS = {"config_file", "meta_file", "logging_file", "tracking", "args_file", "run_id", "init_id", "final_id",
                  "bundle_root", "output_dir", "data_source", "datalist"}
#: Config ids of the ``configs/cohort.json`` overlay: settings of the cohort, not of each slide's run.
_COHORT_KEYS = {"slide_timeout_s"}


# ---- sharding ----------------------------------------------------------------------------------------------------


def shard_by_area(areas: Sequence[float], world_size: int) -> list[list[int]]:
    """Split slides into ``world_size`` disjoint shards of about equal total area (greedy longest processing time).

    Slides go largest first (ties: list order) to the shard with the least area so far (ties: fewer slides, then the
    lower rank), so slides of unknown area (0) still spread by count. Deterministic: every rank computes the same.

    Args:
        areas: level-0 area of each slide in pixels (any unit proportional to the work).
        world_size: number of processes.

    Returns:
        For each rank, the indices into ``areas`` of its slides, in list order.
    """
    if world_size < 1:
        raise ValueError(f"world_size {world_size}: expected at least 1 process")
    loads = [0.0] * world_size
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(areas)), key=lambda i: (-float(areas[i]), i)):
        rank = min(range(world_size), key=lambda r: (loads[r], len(shards[r]), r))
        loads[rank] += float(areas[i])
        shards[rank].append(i)
    return [sorted(shard) for shard in shards]


def slide_area_px(item: Mapping[str, Any]) -> float:
    """Level-0 area in pixels of a datalist item: its ``box`` (HPF boxes of a slide), the slide's level-0 size, or
    an image's pixel size (HPF files); 0 when it is not a regular file or a DICOM slide (a folder of a series'
    instances, a DICOMweb series URL: its metadata is fetched), or cannot be opened (the run then reports why)."""
    if item.get("box") is not None:
        return float(item["box"][2]) * float(item["box"][3])
    path = str(item["image"])
    from pathbundles.dicom_wsi import is_dicom_source
    from pathbundles.errors import PathBundlesError
    from pathbundles.wsi import open_slide

    dicom = is_dicom_source(path)
    # PIL would open a FIFO or a device and wait for data that never comes.
    if not dicom and not os.path.isfile(path):
        return 0.0

    try:
        with open_slide(path) as slide:
            width, height = slide.level_dimensions[0]
        return float(width) * float(height)
    except (PathBundlesError, OSError, ValueError):
        if dicom:
            return 0.0
    try:
        from PIL import Image

        with Image.open(path) as image:
            return float(image.size[0]) * float(image.size[1])
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # the bomb: a header claiming 1e12 px
        return 0.0


# ---- manifest ----------------------------------------------------------------------------------------------------


def read_manifest(out: str | os.PathLike) -> dict[str, dict]:
    """Every slide's latest record in ``out``: ``manifest.json``, then the rank fragments in run order (a run that
    was killed never merged its own), later records replacing earlier ones. A line cut short by a kill is ignored."""
    out = Path(out)
    records: dict[str, dict] = {}
    merged = out / "manifest.json"
    if merged.is_file():
        try:
            doc = json.loads(merged.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            from pathbundles.errors import InputError

            raise InputError(merged, f"not a cohort manifest ({err}); move it away to start afresh") from err
        records.update(doc.get("slides", {}))
    for fragment in sorted((out / "manifest").glob("*.jsonl")):
        for line in fragment.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s: ignoring an incomplete manifest line (a killed run)", fragment)
                continue
            records[record["name"]] = record
    return records


def is_done(record: Mapping[str, Any] | None, bundle: Mapping[str, Any], out: str | os.PathLike) -> bool:
    """Whether a slide's manifest ``record`` makes running it again unnecessary: done (or skipped, which carries the
    record of the run that did it) with the same bundle name, version, weights hash and config hash as ``bundle``
    (a :func:`pathbundles.bundle_runner.bundle_info`), and every output file still there. Failed slides are retried.
    """
    if not record or record.get("status") not in ("done", "skipped"):
        return False
    if any(record.get("bundle", {}).get(k) != bundle.get(k) for k in BUNDLE_KEYS):
        return False
    outputs = record.get("outputs") or {}
    return bool(outputs) and all((Path(out) / rel).is_file() for rel in outputs.values())


class ManifestFragment:
    """The manifest lines of one rank of one run: ``out/manifest/<run_id>.rank<rank>.jsonl``, each record appended,
    flushed and fsynced as its slide ends, so a killed job loses at most the slide it was working on."""

    def __init__(self, out: str | os.PathLike, run_id: str, rank: int) -> None:
        self.path = Path(out) / "manifest" / f"{run_id}.rank{rank}.jsonl"

    def append(self, record: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _write_json(path: Path, doc: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")


def merge_manifest(out: str | os.PathLike, skipped: Mapping[str, str] | None = None) -> dict[str, dict]:
    """Merge the fragments into ``out/manifest.json`` (atomically), then remove them; returns the records.

    Args:
        out: the cohort output folder.
        skipped: {slide name: run id} of the slides a run skipped; their records get status ``skipped`` and
            ``skipped_in`` and keep the rest (timings, outputs, bundle) of the run that did them.
    """
    out = Path(out)
    records = read_manifest(out)
    for name, run_id in (skipped or {}).items():
        if name in records:
            records[name] = {**records[name], "status": "skipped", "skipped_in": run_id}
    _write_json(out / "manifest.json", {"format": MANIFEST_FORMAT, "updated": _now(),
                                        "slides": dict(sorted(records.items()))})
    for fragment in (out / "manifest").glob("*.jsonl"):
        fragment.unlink()
    with contextlib.suppress(OSError):
        (out / "manifest").rmdir()
    return records


# ---- timing ------------------------------------------------------------------------------------------------------


class LoopTimer:
    """Ignite handler: where an engine's epoch goes, waiting for batches versus running iterations.

    Attached after the other handlers, so an iteration's time includes theirs (a writer stitching tiles) and the
    tail is the time the handlers take to finish the epoch (a writer completing its files). The first batch (worker
    start-up and first reads) is counted apart from the steady-state waits.

    Summary (seconds): ``iterations``, ``first_batch_s``, ``data_wait_s`` (waits for the other batches),
    ``iteration_s``, ``tail_s`` (last iteration to epoch end), ``run_s`` (engine start to epoch end) and
    ``steady_data_wait_fraction`` = data_wait_s / (data_wait_s + iteration_s) (None without a second batch).
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.iterations, self.first_batch_s, self.data_wait_s, self.iteration_s = 0, 0.0, 0.0, 0.0
        self.tail_s, self.run_s = 0.0, 0.0
        self._started = self._mark = self._last_end = time.perf_counter()

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self.get_batch_started)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self.get_batch_completed)
        engine.add_event_handler(Events.ITERATION_STARTED, self.iteration_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def started(self, engine: Any = None) -> None:
        self._reset()

    def get_batch_started(self, engine: Any = None) -> None:
        self._mark = time.perf_counter()

    def get_batch_completed(self, engine: Any = None) -> None:
        wait = time.perf_counter() - self._mark
        if self.iterations == 0:
            self.first_batch_s += wait
        else:
            self.data_wait_s += wait

    def iteration_started(self, engine: Any = None) -> None:
        self._mark = time.perf_counter()

    def iteration_completed(self, engine: Any = None) -> None:
        self._last_end = time.perf_counter()
        self.iteration_s += self._last_end - self._mark
        self.iterations += 1

    def epoch_completed(self, engine: Any = None) -> None:
        end = time.perf_counter()
        self.tail_s, self.run_s = end - self._last_end, end - self._started

    def summary(self) -> dict:
        busy = self.data_wait_s + self.iteration_s
        return {"iterations": self.iterations, "first_batch_s": self.first_batch_s, "data_wait_s": self.data_wait_s,
                "iteration_s": self.iteration_s, "tail_s": self.tail_s, "run_s": self.run_s,
                "steady_data_wait_fraction": self.data_wait_s / busy if self.iterations > 1 and busy > 0 else None}


# ---- one slide ---------------------------------------------------------------------------------------------------


def run_bundle_slide(bundle: str | os.PathLike, item: Mapping[str, Any], work_dir: Path,
                     config_files: Sequence[str] = ("inference.json",),
                     overrides: Mapping[str, Any] | None = None) -> tuple[dict, dict | None]:
    """Run the bundle's inference workflow on one slide into ``work_dir``: (the writer's record, the
    :class:`LoopTimer` summary, None when the evaluator had nothing to iterate).

    :func:`pathbundles.bundle_runner.run_inference` with a :class:`LoopTimer` on the bundle's ``evaluator``.
    """
    from pathbundles.bundle_runner import run_inference

    timer = LoopTimer()
    # The bundle's own report of its (temporary) output paths goes to stderr: stdout is the cohort's summary.
    with contextlib.redirect_stdout(sys.stderr):
        records = run_inference(bundle, [dict(item)], work_dir, config_files, overrides, handlers=[timer])
    if len(records) != 1:
        raise RuntimeError(f"{item['image']}: the bundle's writer reported {len(records)} records for one slide")
    return records[0], timer.summary() if timer.iterations else None


SlideRunner = Callable[[Mapping[str, Any], Path], "tuple[dict, dict | None]"]


@contextlib.contextmanager
def time_budget(seconds: float | None, image: str) -> Iterator[None]:
    """Raise :class:`pathbundles.errors.SlideTimeoutError` naming ``image`` in the block once ``seconds`` pass.

    SIGALRM, so only in the main thread (elsewhere the block runs without a budget, with a warning). The error is
    raised where Python code runs: the network, stitching, waiting for DataLoader workers (a worker stuck in a read
    is then terminated as the loader shuts down); a read stuck inside a C library in the main thread itself
    (``num_workers`` 0) is interrupted when it returns.

    Args:
        seconds: the budget; None or <= 0 for none.
        image: the slide's file, for the message.
    """
    if not seconds or seconds <= 0:
        yield
        return
    if threading.current_thread() is not threading.main_thread():
        logger.warning("%s: no time budget outside the main thread", image)
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise SlideTimeoutError(f"{image}: stopped after its time budget of {seconds:g} s (slide_timeout_s)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _move_outputs(record: Mapping[str, Any], work_dir: Path, out: Path) -> dict[str, str]:
    """Move a slide's files from ``work_dir`` to the same relative paths under ``out``; {kind: relative path}."""
    moved = {}
    for kind, path in record["outputs"].items():
        rel = Path(path).resolve().relative_to(work_dir.resolve())
        target = inside(out, *rel.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        moved[kind] = rel.as_posix()
    return moved


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def process_slide(item: Mapping[str, Any], out: Path, work_root: Path, run_slide: SlideRunner,
                  bundle: Mapping[str, Any], run_id: str, rank: int, area_px: float,
                  slide_timeout_s: float | None = None) -> dict:
    """Run one slide and return its manifest record; a failure (an error, or the slide's time budget
    ``slide_timeout_s`` in seconds running out) becomes a ``failed`` record and leaves no file."""
    name = slide_name(item)[0]
    work_dir = inside(work_root, name)
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    record: dict[str, Any] = {"name": name, "image": str(item["image"]), "status": "failed", "error": None,
                              "bundle": {k: bundle.get(k) for k in BUNDLE_KEYS}, "run_id": run_id, "rank": rank,
                              "host": socket.gethostname(), "area_px": area_px, "started": _now()}
    if item.get("label") is not None:
        record["label"] = item["label"]
    start = time.perf_counter()
    try:
        with time_budget(slide_timeout_s, str(item["image"])):
            result, timing = run_slide(item, work_dir)
        record["outputs"] = _move_outputs(result, work_dir, out)
        record.update(status="done", score=float(result["score"]), n_detections=int(result["n_detections"]),
                      details={k: v for k, v in result.items()
                               if k not in ("name", "score", "n_detections", "outputs")},
                      timing=timing)
    except Exception as err:  # noqa: BLE001 - one slide's failure must not stop the others
        from pathbundles.bundle import pathbundles_error_behind

        record["error"] = f"{type(err).__name__}: {err}"[:4000]
        # A bad slide's error names its file and problem: one line. Anything else is a bug: keep its traceback.
        logger.error("cohort: slide %s failed: %s", name, record["error"],
                     exc_info=pathbundles_error_behind(err) is None)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    record.update(finished=_now(), seconds=time.perf_counter() - start)
    return record


# ---- processes ---------------------------------------------------------------------------------------------------


@dataclass
class ProcessGroup:
    """This process's place in the job: rank, world size, and the collectives the cohort needs (on CPU tensors,
    through gloo, also when the job's default group is NCCL)."""

    rank: int = 0
    world_size: int = 1
    group: Any = None

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=self.group)


@contextlib.contextmanager
def process_group(timeout_hours: float = 72.0) -> Iterator[ProcessGroup]:
    """The job's process group: under ``torchrun`` (``WORLD_SIZE`` > 1) joins it (NCCL with one GPU per local rank
    when CUDA is available, gloo otherwise) unless it is already initialised; else a group of one process.

    ``timeout_hours`` bounds the collectives: the final barrier waits for the slowest rank's last slide.
    """
    import torch
    import torch.distributed as dist

    initialised = dist.is_available() and dist.is_initialized()
    if not initialised and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield ProcessGroup()
        return
    timeout = datetime.timedelta(hours=timeout_hours)
    if not initialised:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            # The bundles put their network on torch.device("cuda"): the current device, this rank's GPU.
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timeout)
    group = ProcessGroup(dist.get_rank(), dist.get_world_size(),
                         dist.new_group(backend="gloo", timeout=timeout) if dist.get_backend() != "gloo" else None)
    try:
        yield group
        group.barrier()  # nobody tears the group down while another rank still receives the summary
    finally:
        if not initialised:
            from pathbundles.distributed import end_process_group

            end_process_group(barrier=False)  # the barrier above already met the ranks (not after an error)


# ---- the cohort --------------------------------------------------------------------------------------------------


def plan_cohort(items: Sequence[Mapping[str, Any]], out: Path, bundle: Mapping[str, Any], world_size: int) -> dict:
    """Rank 0's plan: a run id, the slides an earlier run did with this bundle and config (skipped), and the
    others' indices split by area over the ranks. Raises InputError when an item's name is not one plain file name
    or two items share a name (:func:`pathbundles.outputs.output_names`), ValueError when there is no item."""
    if not items:
        raise ValueError("no slides to run: the slide list is empty")
    names = output_names(items)
    records = read_manifest(out)
    skipped = [i for i, name in enumerate(names) if is_done(records.get(name), bundle, out)]
    todo = sorted(set(range(len(items))) - set(skipped))
    areas = {i: slide_area_px(items[i]) for i in todo}
    shards = [[todo[j] for j in shard] for shard in shard_by_area([areas[i] for i in todo], world_size)]
    run_id = f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    return {"run_id": run_id, "skipped": skipped, "shards": shards, "areas": areas}


def run_cohort(items: Sequence[Mapping[str, Any]] | Callable[[], Sequence[Mapping[str, Any]]],
               out: str | os.PathLike, bundle: Mapping[str, Any],
               run_slide: SlideRunner, group: ProcessGroup | None = None,
               slide_timeout_s: float | None = None, write_report: bool = True) -> dict:
    """Run ``run_slide`` over this rank's share of ``items``, then (rank 0) merge the manifest and summarise.

    Rank 0 holds the output folder's lock (:class:`pathbundles.outputs.FolderLock`) for the whole run, so a second
    run into the same folder fails at its start naming this one; the other ranks follow rank 0's plan.

    Args:
        items: datalist items (``image`` absolute, optionally ``name``, ``label``, ``box``); rank 0's list is used.
            A function returning them is called on rank 0 only, as the run's first step, so that its error (an
            empty or malformed datalist) reaches every rank instead of leaving the others waiting.
        out: the cohort output folder (shared by all ranks: on several machines, a shared file system).
        bundle: :func:`pathbundles.bundle_runner.bundle_info` of the bundle and config being run.
        run_slide: ``f(item, work_dir) -> (writer record, timing or None)``, writing into ``work_dir``.
        group: the job's processes (default: this process alone).
        slide_timeout_s: time budget of each slide in seconds (None or 0: none); see :func:`time_budget`.
        write_report: rank 0 writes ``report.html`` of the cohort after the summary
            (:func:`pathbundles.report.write_run_report`).

    Returns:
        The run's summary (the same on every rank); see :func:`summarise`.
    """
    group = group or ProcessGroup()
    out = Path(out).resolve()
    start = time.perf_counter()
    plan: dict[str, Any]
    with contextlib.ExitStack() as held:
        if group.rank == 0:
            try:
                items = items() if callable(items) else items
                # One run per folder: a second one stops here naming the holder; a killed run's work files go.
                held.enter_context(claim_folder(out))
                shutil.rmtree(out / WORK_DIR, ignore_errors=True)  # left by a killed run
                plan = {**plan_cohort(items, out, bundle, group.world_size), "items": [dict(i) for i in items]}
            except Exception as err:  # noqa: BLE001 - the other ranks wait for the plan: tell them, then raise
                group.broadcast({"error": f"{type(err).__name__}: {err}"})
                raise
        plan = group.broadcast(plan if group.rank == 0 else None)
        if "error" in plan:
            raise RuntimeError(f"cohort planning failed on rank 0: {plan['error']}")
        items, run_id = plan["items"], plan["run_id"]
        mine = plan["shards"][group.rank]
        logger.info("cohort run %s: rank %d of %d, %d slide(s), %d skipped in all", run_id, group.rank,
                    group.world_size, len(mine), len(plan["skipped"]))
        fragment = ManifestFragment(out, run_id, group.rank)
        work_root = out / WORK_DIR / run_id / f"rank{group.rank}"
        stop_after = int(os.environ.get(STOP_AFTER_ENV, "0") or 0)
        for n, i in enumerate(mine, start=1):
            record = process_slide(items[i], out, work_root, run_slide, bundle, run_id, group.rank,
                                   plan["areas"][i], slide_timeout_s)
            fragment.append(record)
            logger.info("cohort: slide %s %s in %.1f s (%d/%d on rank %d)", record["name"], record["status"],
                        record["seconds"], n, len(mine), group.rank)
            if stop_after and n >= stop_after:
                os._exit(STOP_EXIT_CODE)
        group.barrier()
        summary = None
        if group.rank == 0:
            names = output_names(items)
            records = merge_manifest(out, {names[i]: run_id for i in plan["skipped"]})
            shutil.rmtree(out / WORK_DIR, ignore_errors=True)
            summary = summarise(out, names, records, run_id, bundle, group.world_size, time.perf_counter() - start)
            if write_report:
                from pathbundles.report import COHORT_IMAGE_PX, write_run_report

                write_run_report(out, items, max_image_px=COHORT_IMAGE_PX)
        return group.broadcast(summary)


def _sum(values: Sequence[float | None]) -> float:
    return float(sum(v for v in values if v is not None))


def summarise(out: Path, names: Sequence[str], records: Mapping[str, dict], run_id: str,
              bundle: Mapping[str, Any], world_size: int, wall_s: float) -> dict:
    """Write ``slides.csv``, ``scores.csv`` and ``summary.json`` for the slides ``names`` of run ``run_id``.

    ``scores.csv`` ends each row with the run's weights (:data:`pathbundles.weights.RECORD_FIELDS`, from
    ``bundle``), and ``summary.json``'s ``bundle`` holds them too. Slides per hour count the slides this run did
    (not the skipped ones) over the run's wall time. The data-wait
    fraction pools the slides' steady-state waits for batches over waits plus iterations (:class:`LoopTimer`).
    """
    rows = [records.get(name, {"name": name, "status": "missing", "error": "no record (the run did not reach it)"})
            for name in names]
    ran = [r for r in rows if r.get("run_id") == run_id and r["status"] in ("done", "failed")]
    done = [r for r in ran if r["status"] == "done"]
    failed = [r for r in rows if r["status"] not in ("done", "skipped")]
    timings = [r["timing"] for r in done if r.get("timing")]
    wait, busy = _sum([t["data_wait_s"] for t in timings]), _sum([t["data_wait_s"] + t["iteration_s"]
                                                                 for t in timings])
    columns = ["name", "status", "error", "label", "score", "n_detections", "seconds", "rank", "host", "area_px",
               "setup_s", "first_batch_s", "data_wait_s", "iteration_s", "tail_s", "steady_data_wait_fraction",
               "run_id"]
    with atomic_path(out / "slides.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            timing = r.get("timing") or {}
            setup = r["seconds"] - timing["run_s"] if timing and r.get("seconds") is not None else None
            writer.writerow({**r, **timing, "setup_s": setup})
    scored = [r for r in rows if r["status"] in ("done", "skipped")]
    weights = weights_identity(bundle)
    extra_columns, extra_values = csv_header_and_row(weights)
    with atomic_path(out / "scores.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "label", "score", "n_detections", *extra_columns])
        for r in scored:
            writer.writerow([r["name"], "" if r.get("label") is None else r["label"], f"{r['score']:.6f}",
                             r["n_detections"], *extra_values])
    summary = {
        "run_id": run_id, "output_dir": str(out), "bundle": dict(bundle), "world_size": world_size,
        "slides": len(rows), "done": len(done), "skipped": sum(r["status"] == "skipped" for r in rows),
        "failed": len(failed), "failed_slides": {r["name"]: r.get("error") for r in failed},
        "wall_s": wall_s, "slides_per_hour": len(done) / wall_s * 3600.0 if wall_s > 0 else None,
        "area_gpx_per_hour": _sum([r.get("area_px") for r in done]) / 1e9 / wall_s * 3600.0 if wall_s > 0 else None,
        "busy_s_per_rank": {str(k): _sum([r["seconds"] for r in ran if r.get("rank") == k])
                            for k in range(world_size)},
        "steady_data_wait_fraction": wait / busy if busy > 0 else None,
        "slide_auc": _auc(scored),
        "files": {k: str(out / v) for k, v in (("manifest", "manifest.json"), ("slides", "slides.csv"),
                                                ("scores", "scores.csv"), ("summary", "summary.json"))},
    }
    _write_json(out / "summary.json", summary)
    if weights is not None:
        weights.log_warning("end")
    return summary


def _auc(scored: Sequence[Mapping[str, Any]]) -> float | None:
    """Slide-level ROC AUC (no interval) when every scored slide has a 0/1 label and both classes occur."""
    labels = [r.get("label") for r in scored]
    if not labels or any(label not in (0, 1) for label in labels) or len(set(labels)) < 2:
        return None
    import numpy as np

    from pathbundles.metrics.classification import slide_auc

    return float(slide_auc(np.asarray(labels), np.asarray([r["score"] for r in scored]), n_bootstrap=0).auc)


def bundle_datalist(bundle: str | os.PathLike, source: str | os.PathLike,
                    config_files: Sequence[str] = ("inference.json",),
                    overrides: Mapping[str, Any] | None = None) -> list[dict]:
    """The slides of ``source`` as the bundle's own ``datalist`` config item lists them (with its slide kind: whole
    slides, HPF images, multi-class slides), ``source`` given as its ``data_source``."""
    from monai.bundle import ConfigParser

    from pathbundles.bundle_runner import config_errors_unwrapped, config_paths

    root = Path(bundle).resolve()
    parser = ConfigParser()
    parser.read_config([str(p) for p in config_paths(root, config_files)])
    if "datalist" not in parser or "data_source" not in parser:
        raise ValueError(f"{root}: the config has no 'datalist' / 'data_source' items to list the slides with")
    from pathbundles.dicomweb import is_dicomweb_url

    # Absolute, so that the path is never read as config syntax (a name starting with '$', '@' or '%'); a DICOMweb
    # series URL starts with http(s)://, which is no config syntax either.
    source = str(source).strip() if is_dicomweb_url(source) else os.path.abspath(source)
    parser.update({"bundle_root": str(root), **dict(overrides or {}), "data_source": source})
    with config_errors_unwrapped():  # an empty or malformed datalist names its file, not a config expression
        return [dict(item) for item in parser.get_parsed_content("datalist")]


def cohort_command(bundle: str | os.PathLike, slides: str | os.PathLike | Sequence[Mapping[str, Any]],
                   out: str | os.PathLike, config_files: str | Sequence[str] = ("inference.json",),
                   overrides: Mapping[str, Any] | None = None, timeout_hours: float = 72.0,
                   slide_timeout_s: float | None = None) -> dict:
    """Run a bundle's inference over a cohort, as one process or as every process of a ``torchrun`` job.

    Args:
        bundle: the bundle folder (``bundles/<name>`` or an exported copy).
        slides: what the bundle's ``--data_source`` takes (a folder of slides, HPF images for segmitos; one slide;
            a text manifest; a datalist JSON: :func:`pathbundles.bundle.datalist`), or datalist items.
        out: the cohort output folder (see the module docstring).
        config_files: the bundle's config names (or paths) merged per slide run, ``inference.json`` by default.
        overrides: config ids to set in every slide's run (``lp``, ``num_workers``, ``ckpt_path``, ...); part of
            the config hash, so changing one redoes the slides.
        timeout_hours: how long a rank may wait for the others at the end.
        slide_timeout_s: each slide's time budget in seconds (None: none): a slide that runs longer fails by name
            and the run goes on (:func:`time_budget`). Not part of the config hash.

    Returns:
        The run's summary (see :func:`summarise`), on every rank; ``failed`` > 0 when any slide failed.
    """
    import functools

    from pathbundles.bundle_runner import bundle_info
    from pathbundles.checks import flag

    config_files = [config_files] if isinstance(config_files, str) else list(config_files)
    overrides = dict(overrides or {})
    # The bundles' write_report key is the cohort's: one report of the cohort, none per slide; not in the hash.
    write_report = flag(overrides.pop("write_report", True), "write_report")
    info = bundle_info(bundle, config_files, overrides)
    weights = weights_identity(info)
    if weights is not None and int(os.environ.get("RANK", "0")) == 0:
        weights.log_warning("start")
    with process_group(timeout_hours) as group:
        # Every rank imports MONAI (~10 s on a loaded CPU) while rank 0 plans, rather than in its first slide.
        import monai.bundle  # noqa: F401

        if isinstance(slides, (str, os.PathLike)):
            items = functools.partial(bundle_datalist, bundle, slides, config_files, overrides)
        else:
            items = [dict(item) for item in slides]
        runner = functools.partial(_run_slide, bundle=bundle, config_files=config_files, overrides=overrides)
        return run_cohort(items, out, info, runner, group, slide_timeout_s, bool(write_report))


def _run_slide(item: Mapping[str, Any], work_dir: Path, *, bundle: str | os.PathLike, config_files: Sequence[str],
               overrides: Mapping[str, Any]) -> tuple[dict, dict | None]:
    return run_bundle_slide(bundle, item, work_dir, config_files, {**overrides, "write_report": False})


def cohort_cli(bundle: str, slides: str, out: str, config: str | Sequence[str] = "inference.json",
               timeout_hours: float = 72.0, slide_timeout_s: float | None = None, **overrides: Any) -> None:
    """``pathbundles cohort``: run BUNDLE over SLIDES (a folder, one slide, a text manifest or a datalist) into OUT,
    each slide within ``--slide_timeout_s`` seconds when given; further ``--key value`` flags set bundle config
    ids. Rank 0 prints the summary as JSON; the exit status is 1 when any slide failed."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    summary = cohort_command(bundle, slides, out, config_files=config, overrides=overrides,
                             timeout_hours=timeout_hours, slide_timeout_s=slide_timeout_s)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2, default=str))
    if summary["failed"]:
        sys.exit(1)


def bundle_run_command(bundle_root: str, datalist: Sequence[Mapping[str, Any]], output_dir: str,
                       slide_timeout_s: float | None = None) -> dict:
    """The ``run`` of a bundle's ``configs/cohort.json`` overlay: the cohort of ``python -m monai.bundle run``.

    The configs and overrides of the command line (``--config_file`` without the overlay, ``--lp 8``, ...) are those
    of every slide's run, except the overlay's own ``--slide_timeout_s`` (each slide's time budget in seconds);
    raises RuntimeError naming the failed slides after finishing the others (exit status 1).
    """
    import fire.parser

    from pathbundles.bundle import config_file_list

    configs, overrides, argv = [], {}, sys.argv[1:]
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        key, sep, value = arg[2:].partition("=")
        if not sep:
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else "True"
        if key == "config_file":
            configs = config_file_list(value)
        elif key not in _RUN_ARGUMENTS and key not in _COHORT_KEYS:
            overrides[key] = fire.parser.DefaultParseValue(value)
    configs = [str(Path(c).resolve()) for c in configs if Path(c).name != "cohort.json"] or ["inference.json"]
    summary = cohort_command(bundle_root, datalist, output_dir, configs, overrides, slide_timeout_s=slide_timeout_s)
    if summary["failed"]:
        raise RuntimeError(f"{summary['failed']} slide(s) failed (see {summary['files']['slides']}): "
                           + "; ".join(f"{k}: {v}" for k, v in summary["failed_slides"].items()))
    return summary


if __name__ == "__main__":
    import fire

    fire.Fire(cohort_cli, name="pathbundles.cohort")
