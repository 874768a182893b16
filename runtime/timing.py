"""Timing loops and latency statistics shared by ``edgefm bench`` and its pipelines."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def latency_stats(samples_s: Sequence[float], items: int = 1) -> dict[str, Any]:
    """Statistics of per-call times given in seconds; latencies in ms, throughput per second."""
    a = np.asarray(samples_s, np.float64) * 1e3
    total_s = float(a.sum()) / 1e3
    qps = len(a) / total_s if total_s > 0 else float("inf")
    return {
        "iterations": int(a.size),
        "latency_ms": {"min": float(a.min()), "median": float(np.median(a)), "mean": float(a.mean()),
                       "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
                       "max": float(a.max()), "std": float(a.std())},
        "throughput": {"qps": qps, "items_per_s": qps * items},
        "samples_ms": [round(float(v), 4) for v in a],
    }


def time_calls(fn: Callable[[], Any], iters: int, warmup: int) -> list[float]:
    """Seconds of each of ``iters`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out
