"""Shared pytest fixtures: the real-data folder ../shared/data and a session-wide phantom cache."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def threads_per_worker(cores: int, workers: int) -> int:
    """Torch threads for each of ``workers`` parallel test processes on ``cores`` cores: an equal share, at least 1."""
    return max(1, cores // max(1, workers))


def _share_the_cores() -> int | None:
    """Under pytest-xdist, give each worker (its own torch and every bundle run it starts, which inherit the
    environment) an equal share of the cores, unless OMP_NUM_THREADS is set already. Two workers each running torch
    on both of 2 cores wait on each other's OpenMP barriers: the scannet and spatial_lstm held-out evaluations run
    side by side took 216 and 245 s with torch's default threads, 158 and 157 s with one thread each (2-core VM,
    2026-12-07); their metrics were the same. Returns the threads set, or None where nothing was set."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    threads = threads_per_worker(len(os.sched_getaffinity(0)), workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:  # already imported by a plugin: its thread pool exists
        sys.modules["torch"].set_num_threads(threads)
    return threads


#: torch threads of this test process and the processes it starts (None: torch's default or the caller's setting)
WORKER_THREADS = _share_the_cores()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real slides and annotations in ../shared/data; tests that need them skip when the folder is absent."""
    if not (SHARED_DATA / "CMU-1-Small-Region.svs").exists():
        pytest.skip(f"real test data not found at {SHARED_DATA} (only present beside the project checkout)")
    return SHARED_DATA
