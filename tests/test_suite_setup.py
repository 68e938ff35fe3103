"""The test suite's own setup (tests/conftest.py): parallel workers share the cores instead of oversubscribing them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import WORKER_THREADS, threads_per_worker


@pytest.mark.parametrize(("cores", "workers", "threads"), [(2, 2, 1), (16, 2, 8), (16, 3, 5), (2, 4, 1), (4, 1, 4)])
def test_threads_per_worker_is_an_equal_share_of_at_least_one(cores: int, workers: int, threads: int) -> None:
    assert threads_per_worker(cores, workers) == threads


def test_a_parallel_worker_and_the_processes_it_starts_use_its_share() -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        pytest.skip("runs under pytest-xdist with more than one worker (the suite's default, -n 2)")
    if WORKER_THREADS is None:
        pytest.skip("OMP_NUM_THREADS was set before the run: the suite keeps it")
    share = threads_per_worker(len(os.sched_getaffinity(0)), workers)
    assert WORKER_THREADS == share
    assert os.environ["OMP_NUM_THREADS"] == str(share)
    assert torch.get_num_threads() == share
    child = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                           capture_output=True, text=True, timeout=300, check=True)
    assert int(child.stdout) == share
