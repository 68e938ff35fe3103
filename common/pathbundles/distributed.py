"""The ranks of a ``torch.distributed`` run: which one writes shared files, and the end of the run, shared by the
bundles' ``multi_gpu_train.json`` and the cohort runner."""

from __future__ import annotations

import time

#: Seconds the main thread sleeps (GIL and CPU released) after tearing the group down; see :func:`end_process_group`.
SETTLE_SECONDS = 1.0


def is_first_rank() -> bool:
    """True in a process that is not part of a ``torch.distributed`` group, or is its rank 0: the one that writes
    a run's shared files."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def end_process_group(barrier: bool = True, settle_s: float = SETTLE_SECONDS) -> None:
    """Meet the other ranks, destroy the default process group, and let gloo's worker threads finish.

    A no-op when no process group is initialised. Without the last step a gloo run could abort at exit with
    ``terminate called without an active exception`` (SIGABRT), about one two-process scannet training run in
    six on a 2-core VM. A core dump showed why: gloo's worker thread drops its last reference to a collective's
    work (the validation metric's ``all_gather``, or a barrier holding it) after ``wait()`` has returned, and
    dropping the tensors needs the GIL. When the main thread reached interpreter shutdown first, Python ended that
    thread with ``pthread_exit``, whose unwinding through a ``noexcept`` destructor calls ``std::terminate``.
    ``destroy_process_group`` does not join those threads while the DDP module still holds the group, and the
    barrier's own work keeps the previous collectives alive, so neither helps alone: the sleep releases the GIL
    and the CPU, and the waiting thread finishes while Python is still running.

    Args:
        barrier: meet the other ranks first, so that no rank tears down while another still communicates.
        settle_s: seconds to sleep after the teardown.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if barrier:
        dist.barrier()
    dist.destroy_process_group()
    time.sleep(settle_s)
