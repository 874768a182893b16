"""Latency statistics of ``edgefm bench``: the median's confidence interval, the spread, and the warnings that
say when a run's figures are doubtful. Exact values on synthetic samples (no timing)."""

from __future__ import annotations

import numpy as np
import pytest
from edgefm.runtime.timing import latency_stats, median_ci, stability_warnings


def test_median_ci_uses_the_binomial_order_statistics():
    rng = np.random.default_rng(0)
    # Too few samples for 95%: even (min, max) covers the median with probability 1 - 2/32 = 0.9375 at n = 5.
    assert median_ci([5.0, 1.0, 3.0, 2.0, 4.0]) is None
    assert median_ci(rng.permutation(6).astype(float)) == (0.0, 5.0)  # 1 - 2/64 = 0.969
    # The tabulated 95% ranks: n = 10 -> 2nd and 9th; n = 100 -> 40th and 61st; n = 1000 -> 469th and 532nd.
    assert median_ci(rng.permutation(10).astype(float)) == (1.0, 8.0)
    assert median_ci(rng.permutation(100).astype(float)) == (39.0, 60.0)
    assert median_ci(rng.permutation(1000).astype(float)) == (468.0, 531.0)
    # A lower confidence narrows it: n = 100 at 90% -> 42nd and 59th.
    assert median_ci(np.arange(100.0), confidence=0.90) == (41.0, 58.0)


def test_median_ci_covers_the_true_median_at_its_level():
    rng = np.random.default_rng(1)
    draws = rng.lognormal(0.0, 0.5, (2000, 30))  # skewed, like latencies; true median exp(0) = 1
    hits = [lo <= 1.0 <= hi for lo, hi in map(median_ci, draws)]
    assert 0.95 <= np.mean(hits) <= 0.99  # n = 30: the exact coverage of ranks 10 and 21 is 0.957


def test_latency_stats_spread():
    s = latency_stats([0.004, 0.001, 0.002, 0.003])
    assert s["cv"] == pytest.approx(np.sqrt(1.25) / 2.5)
    assert s["median_ci95_ms"] is None  # four samples
    s = latency_stats([0.001 * (i + 1) for i in range(10)])
    assert s["median_ci95_ms"] == pytest.approx([2.0, 9.0])


def _row(median: float, ci: list[float] | None, cv: float) -> dict:
    return {"latency_ms": {"median": median}, "median_ci95_ms": ci, "cv": cv}


def test_stability_warnings_name_the_row_and_the_load():
    rows = [("image_encoder", _row(10.0, [9.8, 10.6], 0.30)),  # one slow outlier: a large cv, a tight median
            ("sam.predict (pipeline)", _row(4.0, [3.5, 4.5], 0.12)),
            ("prompt_encoder", _row(1.0, None, 0.5))]  # under 6 runs: no interval, nothing to judge
    assert stability_warnings(rows) == [
        "sam.predict (pipeline): its median is uncertain, the 95% interval 3.500–4.500 ms spans 25% of it "
        "(standard deviation 12% of the mean); close other work, pin the clocks or add --iters"]
    assert stability_warnings(rows[:1], load_average=0.9, usable_cores=2) == []
    assert stability_warnings(rows[:1], load_average=1.5, usable_cores=2) == [
        "the machine was busy: 1-minute load average 1.5 on 2 usable cores when the run started; absolute figures "
        "may be slow, ratios within one run are fairer"]
