"""``edgefm bench --profile``: where a component's time goes, operator by operator (ONNX Runtime's profiler).

A second session of the component is opened with profiling on (the timed session is left alone: profiling adds
host work to every node), run ``warmup`` + ``iters`` times on the same inputs, and its trace is read back. Of
the runs after the warm-up: per operator type, the time per call summed over its nodes, how many nodes, and
their share of all node time; the slowest nodes; the profiled run's median wall time (the nodes' sum plus the
executor's own work). The trace times each node's kernel on the host. On ort-cpu that is the computation; on
ort-cuda kernels run asynchronously, so a node's time is its launch and host work, not its GPU time (a CUDA
profiler such as Nsight Systems measures that); on ort-trt each TensorRT subgraph is one node.
TensorRT engines are profiled by NVIDIA's own tool: ``trtexec --loadEngine=ENGINE --dumpProfile
--separateProfileRun`` gives per-layer GPU times.
"""

from __future__ import annotations

import bisect
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

_NODE_SUFFIX = "_kernel_time"


def summarize_trace(events: list[dict[str, Any]], skip: int, top: int = 8) -> dict[str, Any]:
    """Per-call figures of an ONNX Runtime profile trace (Chrome trace events, times in µs), leaving out the
    first ``skip`` runs: ``ops`` (per operator type: ms per call, nodes, share of all node time, slowest
    first), ``top_nodes`` (the ``top`` slowest nodes), ``nodes_ms`` (their sum), ``run_ms`` (median run)."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")[skip:]
    if not runs:
        raise ValueError(f"the profile has no runs after the {skip} skipped")
    starts = [a for a, _ in runs]
    by_op: dict[str, list[float]] = {}  # op -> [µs over kept runs, node events]
    by_node: dict[str, list[Any]] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith(_NODE_SUFFIX):
            continue
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if i < 0 or e["ts"] > runs[i][1]:  # a warm-up run's node (or one outside any run)
            continue
        op = e["args"].get("op_name", "?")
        acc = by_op.setdefault(op, [0.0, 0])
        acc[0] += e["dur"]
        acc[1] += 1
        node = by_node.setdefault(e["name"][: -len(_NODE_SUFFIX)], [op, 0.0])
        node[1] += e["dur"]
    n = len(runs)
    total = sum(us for us, _ in by_op.values()) or 1.0
    ops = [{"op": op, "ms": us / n / 1e3, "nodes": round(count / n), "share": us / total}
           for op, (us, count) in sorted(by_op.items(), key=lambda kv: -kv[1][0])]
    nodes = sorted(by_node.items(), key=lambda kv: -kv[1][1])[:top]
    return {"runs": n, "run_ms": float(np.median([b - a for a, b in runs])) / 1e3, "nodes_ms": total / n / 1e3,
            "ops": ops, "top_nodes": [{"node": name, "op": op, "ms": us / n / 1e3} for name, (op, us) in nodes]}


def op_profile(runner: Any, feeds: dict[str, np.ndarray], iters: int, warmup: int, top: int = 8) -> dict[str, Any]:
    """Profile ``iters`` calls of an ONNX Runtime runner's component on ``feeds`` (after ``warmup``)."""
    feeds = runner.spec.check_feeds(feeds)
    with tempfile.TemporaryDirectory(prefix="edgefm-profile-") as tmp:
        session = runner.profiling_session(Path(tmp) / runner.spec.name)
        for _ in range(warmup + iters):
            session.run(runner.spec.output_names, feeds)
        trace = json.loads(Path(session.end_profiling()).read_text())
    host_only = getattr(runner, "device", "cpu") != "cpu"
    return {"method": "ONNX Runtime profiler, host time per node"
                      + (" (kernels run asynchronously: launch and host work, not GPU time)" if host_only else ""),
            **summarize_trace(trace, warmup, top)}


def profile_lines(result: dict[str, Any], ops: int = 5) -> list[str]:
    """Markdown: one line per profiled component, its heaviest operator types."""
    rows = [(name, r["profile"]) for name, r in result["components"].items() if r.get("profile")]
    if not rows:
        return []
    lines = ["", f"Where the time goes ({rows[0][1]['method']}; per call, slowest operator types first):", ""]
    for name, p in rows:
        parts = ", ".join(f"{o['op']} {o['share']:.0%} ({o['ms']:.3f} ms, {o['nodes']} nodes)" for o in p["ops"][:ops])
        lines.append(f"- {name}: {p['run_ms']:.3f} ms profiled, nodes {p['nodes_ms']:.3f} ms: {parts}")
    return lines
