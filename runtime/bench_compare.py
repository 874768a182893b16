"""``edgefm bench --baseline FILE``: this run against an earlier ``--json`` result, row by row.

A row is compared only with the baseline row of the same name and the same input shapes. The verdict is
conservative: "faster" or "slower" only when the two medians' 95% confidence intervals (recomputed from the
stored samples, :func:`edgefm.runtime.timing.median_ci`) do not overlap; otherwise "no clear difference".
Differences in where the two ran (GPU, CPU, backend, versions, threads) are listed, since they explain a ratio
as often as the change under test does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .bench_plot import bench_rows
from .errors import InputError
from .timing import median_ci

_STAMP_KEYS = ("cpu", "gpu", "backend", "precision", "threads", "versions", "tf32")


def read_baseline(path: str | Path, schema: str) -> dict[str, Any]:
    """An ``edgefm bench --json`` file, checked enough to compare against."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise InputError(f"--baseline {path}: cannot read it ({exc.strerror or exc}); give the file an earlier "
                         "`edgefm bench --json FILE` wrote") from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"--baseline {path}: not JSON ({exc.msg} at line {exc.lineno}); give the file an earlier "
                         "`edgefm bench --json FILE` wrote") from exc
    if not isinstance(data, dict) or data.get("schema") != schema:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise InputError(f"--baseline {path}: not an edgefm bench result (schema {found!r}, expected {schema!r})")
    return data


def _interval(r: dict[str, Any]) -> tuple[float, float] | None:
    samples = r.get("samples_ms") or []
    return median_ci(samples) if samples else None


def compare(current: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """Per row: both medians, their ratio (this run / baseline) and the verdict; rows found on one side only
    and the differences between the two environments."""
    base = dict(bench_rows(baseline))
    rows, only_here = [], []
    for name, r in bench_rows(current):
        b = base.pop(name, None)
        if b is None:
            only_here.append(name)
            continue
        now_ms, base_ms = r["latency_ms"]["median"], b["latency_ms"]["median"]
        row = {"name": name, "baseline_median_ms": base_ms, "median_ms": now_ms,
               "ratio": now_ms / base_ms if base_ms > 0 else float("inf")}
        if r.get("inputs") != b.get("inputs"):
            row["verdict"] = "different inputs"
        else:
            ci_now, ci_base = _interval(r), _interval(b)
            if ci_now is None or ci_base is None:
                row["verdict"] = "too few runs (6 per side at least)"
            elif ci_now[1] < ci_base[0]:
                row["verdict"] = "faster"
            elif ci_now[0] > ci_base[1]:
                row["verdict"] = "slower"
            else:
                row["verdict"] = "no clear difference"
        rows.append(row)
    env_now, env_base = current.get("environment", {}), baseline.get("environment", {})
    changed = {k: {"baseline": env_base.get(k), "now": env_now.get(k)} for k in _STAMP_KEYS
               if env_base.get(k) != env_now.get(k)}
    return {"rows": rows, "only_in_this_run": only_here, "only_in_baseline": list(base),
            "environment_differences": changed}


def compare_lines(comparison: dict[str, Any]) -> list[str]:
    """The comparison (:func:`compare`'s, with the baseline's ``file``) as a markdown table and notes."""
    lines = ["", f"Against the baseline {comparison['file']} (ratio = this run's median / the baseline's; a verdict "
             "needs the medians' 95% intervals apart):", "",
             "| component | baseline median ms | median ms | ratio | verdict |", "|---|--:|--:|--:|---|"]
    for r in comparison["rows"]:
        lines.append(f"| {r['name']} | {r['baseline_median_ms']:.3f} | {r['median_ms']:.3f} | {r['ratio']:.2f}x "
                     f"| {r['verdict']} |")
    lines.append("")
    for key, label in (("only_in_this_run", "not in the baseline"), ("only_in_baseline", "not timed in this run")):
        if comparison[key]:
            lines.append(f"- {label}: {', '.join(comparison[key])}")
    for key, d in comparison["environment_differences"].items():
        lines.append(f"- {key} differs: baseline {json.dumps(d['baseline'])}, now {json.dumps(d['now'])}")
    return lines
