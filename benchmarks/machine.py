"""What every benchmark records about the machine it ran on (CPU model, cores, platform, library versions) and the
weights it ran, and the timing and memory helpers every benchmark measures with. torch is imported by the helpers
that need it."""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def cpuinfo_field(key: str) -> str | None:
    """The first ``key`` line's value in /proc/cpuinfo (Linux), None where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    return cpuinfo_field("model name") or platform.processor()


def cpu_bf16_flags() -> list[str]:
    """The CPU's native bfloat16 instruction flags (/proc/cpuinfo), empty when it has none or elsewhere."""
    flags = (cpuinfo_field("flags") or "").split()
    return sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16", "avx_ne_convert"))


def machine_info(distributions: Iterable[str] = ()) -> dict[str, Any]:
    """CPU, cores, platform, Python and the installed versions of ``distributions`` (missing ones left out)."""
    versions = {}
    for dist in distributions:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {"platform": platform.platform(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "python": platform.python_version(), "versions": versions}


def snapshot_file(source: Path, copy: Path) -> str:
    """Copy a bundle's shipped weights to ``copy`` (training may rewrite the shipped file while a benchmark runs) and
    return the label every result names them by: the path in the repository, the copy's sha256 prefix and the
    shipped file's modification time (UTC)."""
    shutil.copyfile(source, copy)
    digest = hashlib.sha256(Path(copy).read_bytes()).hexdigest()[:16]
    mtime = datetime.datetime.fromtimestamp(Path(source).stat().st_mtime, datetime.timezone.utc)
    return (f"{Path(source).resolve().relative_to(REPO)} (sha256 {digest}..., modified "
            f"{mtime.isoformat(timespec='seconds')})")


def vm_status_kib(key: str) -> int:
    """A ``Vm*`` line of /proc/self/status (VmHWM = peak resident set, VmRSS = resident set) in KiB; -1 if none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def sync(device: str) -> None:
    """Wait for queued GPU work, so a timer measures it; nothing on the CPU."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def median_time(fn: Callable[[], Any], repeats: int, device: str = "cpu",
                warmup: int = 1) -> tuple[float, list[float], Any]:
    """(median seconds, every timing, the last result) of ``fn`` over ``repeats`` calls after ``warmup`` calls."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, out


def fma_peak(threads: int, seconds: float = 2.0, kinds: Iterable[str] = ("avx512", "avx2", "bf16")
             ) -> dict[str, Any]:
    """The CPU's arithmetic peak in GFLOP/s per ``kinds`` (float32 AVX-512 / AVX2 FMA, bfloat16 dot products),
    measured by benchmarks/fma_peak.c with ``threads`` threads: register-only FMA chains, the roofline's compute
    ceiling. Built with the machine's C compiler (``cc -O3 -march=native -fopenmp``) into a temporary folder; a
    kind the CPU or compiler lacks, or a missing compiler, is recorded as ``{"error": ...}``."""
    import subprocess
    import tempfile

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return {kind: {"error": "no C compiler (cc, gcc) on PATH"} for kind in kinds}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fma_peak_") as tmp:
        binary = Path(tmp) / "fma_peak"
        build = subprocess.run([compiler, "-O3", "-march=native", "-fopenmp", str(REPO / "benchmarks" / "fma_peak.c"),
                                "-o", str(binary)], capture_output=True, text=True, check=False)
        if build.returncode:
            return {kind: {"error": f"build failed: {build.stderr.strip()[-300:]}"} for kind in kinds}
        for kind in kinds:
            run = subprocess.run([str(binary), kind, str(threads), str(seconds)], capture_output=True, text=True,
                                 check=False, timeout=60 + 10 * seconds)
            results[kind] = (json.loads(run.stdout.strip().splitlines()[-1]) if run.returncode == 0
                             else {"error": run.stderr.strip() or f"exit {run.returncode}"})
    return results


def matmul_peak(n: int, repeats: int, device: str = "cpu") -> dict[str, Any]:
    """Seconds and GFLOP/s of an n x n float32 matmul on ``device``: the practical float32 peak."""
    import torch

    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    t, times, _ = median_time(lambda: torch.matmul(a, b), repeats, device, warmup=2)
    return {"n": n, "repeats": repeats, "device": device, "seconds_median": t, "seconds_min": min(times),
            "gflops_median": 2 * n ** 3 / t / 1e9, "gflops_best": 2 * n ** 3 / min(times) / 1e9}
