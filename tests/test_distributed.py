"""pathbundles.distributed: the end of a torch.distributed run."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_end_process_group_is_a_no_op_without_a_group(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    from pathbundles import distributed

    slept: list[float] = []
    monkeypatch.setattr(distributed.time, "sleep", slept.append)
    assert not dist.is_initialized()
    distributed.end_process_group()
    assert slept == []


def test_end_process_group_meets_destroys_and_settles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    import torch.distributed as dist

    from pathbundles import distributed

    calls: list[str] = []
    monkeypatch.setattr(distributed.time, "sleep", lambda s: calls.append(f"sleep {s}"))
    barrier = dist.barrier
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: calls.append("barrier") or barrier(*a, **k))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        gathered = [torch.zeros(2)]
        dist.all_gather(gathered, torch.ones(2))  # a collective holding tensors, as the validation metric's
        assert gathered[0].tolist() == [1.0, 1.0]
        distributed.end_process_group(settle_s=0.25)
        assert not dist.is_initialized()  # destroyed by end_process_group itself
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert calls == ["barrier", "sleep 0.25"]
