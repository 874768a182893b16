"""What the benchmark scripts share: timing loops, statistics and the machine/version stamp."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from edgefm.runtime.timing import time_calls


def stats_ms(samples: list[float]) -> dict[str, Any]:
    """min / median / p90 / mean in milliseconds, from samples in seconds."""
    a = np.asarray(samples, np.float64) * 1e3
    return {"n": int(a.size), "min_ms": float(a.min()), "median_ms": float(np.median(a)),
            "p90_ms": float(np.percentile(a, 90)), "mean_ms": float(a.mean()),
            "samples_ms": [round(float(v), 3) for v in a]}


def timed(fn, n: int) -> list[float]:
    """Seconds of each of ``n`` calls of ``fn`` (the runtime's own loop, without warm-up)."""
    return time_calls(fn, n, 0)


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    field = lambda key: next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith(key)), "")  # noqa: E731
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_kb = next(ln for ln in meminfo if ln.startswith("MemTotal")).split()[1]
    simd = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile")
    return {"cpu_model": field("model name"), "logical_cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)),
            "simd": [f for f in simd if f in field("flags").split()],
            "memory_gib": round(int(mem_kb) / 2**20, 1), "platform": platform.platform(),
            "python": platform.python_version()}


def versions(dists: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def split(n: int, rounds: int) -> list[int]:
    """n runs spread over at most ``rounds`` rounds (interleaved sides share each round's load)."""
    rounds = max(1, min(rounds, n))
    return [n // rounds + (i < n % rounds) for i in range(rounds)]
