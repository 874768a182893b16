"""Timing loops and latency statistics shared by ``edgefm bench`` and its pipelines."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

UNCERTAIN_MEDIAN = 0.10  # a row whose median's 95% interval is wider than this share of the median is flagged
BUSY_LOAD_PER_CORE = 0.5  # a 1-minute load average above this per usable core at the start is flagged


def median_ci(samples: Sequence[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """Distribution-free confidence interval of the median: the order statistics ``x_(l)`` and ``x_(n+1-l)``
    for the largest ``l`` whose coverage, ``P(l <= B <= n - l)`` with ``B ~ Binomial(n, 1/2)``, is at least
    ``confidence``. None when even the extremes cover less (fewer than 6 samples at 95%)."""
    x = np.sort(np.asarray(samples, np.float64))
    n = x.size
    k = np.arange(n + 1)
    log_pmf = (math.lgamma(n + 1) - np.array([math.lgamma(i + 1) + math.lgamma(n - i + 1) for i in k])
               - n * math.log(2.0))
    cdf = np.cumsum(np.exp(log_pmf))  # cdf[j] = P(B <= j)
    best = 0
    for lo in range(1, n // 2 + 1):
        if 1.0 - 2.0 * cdf[lo - 1] < confidence:
            break
        best = lo
    return (float(x[best - 1]), float(x[n - best])) if best else None


def latency_stats(samples_s: Sequence[float], items: int = 1) -> dict[str, Any]:
    """Statistics of per-call times given in seconds; latencies in ms, throughput per second. ``cv`` is the
    standard deviation over the mean; ``median_ci95_ms`` the 95% confidence interval of the median
    (:func:`median_ci`; None under 6 samples)."""
    a = np.asarray(samples_s, np.float64) * 1e3
    total_s = float(a.sum()) / 1e3
    qps = len(a) / total_s if total_s > 0 else float("inf")
    mean = float(a.mean())
    ci = median_ci(a)
    return {
        "iterations": int(a.size),
        "latency_ms": {"min": float(a.min()), "median": float(np.median(a)), "mean": mean,
                       "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
                       "max": float(a.max()), "std": float(a.std())},
        "cv": float(a.std()) / mean if mean > 0 else 0.0,
        "median_ci95_ms": list(ci) if ci else None,
        "throughput": {"qps": qps, "items_per_s": qps * items},
        "samples_ms": [round(float(v), 4) for v in a],
    }


def stability_warnings(rows: Iterable[tuple[str, dict[str, Any]]], load_average: float | None = None,
                       usable_cores: int | None = None) -> list[str]:
    """What makes a run's figures doubtful: rows whose median is uncertain (its 95% interval wider than
    ``UNCERTAIN_MEDIAN`` of it: a rare outlier does not do that, a bimodal or drifting row does), and a machine
    already busy when the run started (other processes take CPU time from the timed calls; on a GPU backend,
    from their launches)."""
    out = []
    for name, r in rows:
        ci, median = r.get("median_ci95_ms"), r["latency_ms"]["median"]
        if ci and median > 0 and (ci[1] - ci[0]) / median > UNCERTAIN_MEDIAN:
            out.append(f"{name}: its median is uncertain, the 95% interval {ci[0]:.3f}–{ci[1]:.3f} ms spans "
                       f"{(ci[1] - ci[0]) / median:.0%} of it (standard deviation {r['cv']:.0%} of the mean); close "
                       "other work, pin the clocks or add --iters")
    if load_average is not None and usable_cores and load_average > BUSY_LOAD_PER_CORE * usable_cores:
        out.append(f"the machine was busy: 1-minute load average {load_average:.1f} on {usable_cores} usable cores "
                   "when the run started; absolute figures may be slow, ratios within one run are fairer")
    return out


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
