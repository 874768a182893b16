"""What the GPU check's sections share: the run record (results, log, time budget) and its markdown report."""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from edgefm.runtime.timing import time_calls

TARGETS_MS = {  # issue 6, H100, batch 1, median
    "sam.image_encoder": 7.0, "clip.image_encoder": 1.0, "dalle.dvae_decoder": 1.5, "sam.prompt_to_masks": 1.0,
}


class Run:
    """Results, the log and the time budget of one run."""

    def __init__(self, out: Path, smoke: bool, budget_s: float, iters: int, warmup: int) -> None:
        self.out, self.smoke, self.budget_s = out, smoke, budget_s
        self.iters, self.warmup = iters, warmup
        self.t0 = time.monotonic()
        self.results: dict[str, Any] = {"sections": {}, "errors": {}, "rows": []}
        self.log_file = open(out / "log.txt", "a", buffering=1)

    def log(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self.log_file.write(line + "\n")

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def section(self, name: str, fn: Callable[[], Any], min_left_s: float = 0.0) -> Any:
        if self.left() < min_left_s:
            self.log(f"skip {name}: {self.left():.0f} s left of the budget, it needs {min_left_s:.0f}")
            self.results["sections"][name] = {"skipped": f"time budget ({self.left():.0f} s left)"}
            self.save()
            return None
        self.log(f"== {name}")
        t = time.monotonic()
        try:
            value = fn()
            self.results["sections"].setdefault(name, {})["seconds"] = round(time.monotonic() - t, 1)
            return value
        except Exception as exc:  # recorded, and the next section runs
            self.log(f"!! {name} failed: {type(exc).__name__}: {exc}")
            self.results["errors"][name] = traceback.format_exc()
            return None
        finally:
            self.save()

    def row(self, component: str, impl: str, precision: str, stats: dict[str, Any], **extra: Any) -> None:
        row = {"component": component, "impl": impl, "precision": precision, **stats, **extra}
        self.results["rows"].append(row)
        self.log(f"   {component:24s} {impl:34s} {precision:5s} median {stats['median_ms']:8.3f} ms "
                 f"(p90 {stats['p90_ms']:.3f}, n={stats['n']})")

    def save(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=1, default=str))
        (self.out / "gpu_check.md").write_text(markdown(self.results))


# ---------------------------------------------------------------- timing


def stats(samples_s: list[float]) -> dict[str, Any]:
    a = np.asarray(samples_s, np.float64) * 1e3
    return {"n": int(a.size), "min_ms": round(float(a.min()), 4), "median_ms": round(float(np.median(a)), 4),
            "mean_ms": round(float(a.mean()), 4), "p90_ms": round(float(np.percentile(a, 90)), 4),
            "p99_ms": round(float(np.percentile(a, 99)), 4)}


def time_fn(fn: Callable[[], Any], iters: int, warmup: int, sync: Callable[[], None] = lambda: None) -> dict:
    """Wall time of ``fn`` per call, synchronized (a call is done when its results are usable)."""
    return stats(time_calls(lambda: (fn(), sync()), iters, warmup))


# ---------------------------------------------------------------- report


def markdown(res: dict[str, Any]) -> str:
    env = res.get("env", {})
    gpu = env.get("gpu", {}).get("name", "no GPU (smoke run)")
    lines = [f"# edgefm GPU check — {gpu}", "", f"Backend {env.get('backend')}; versions "
             f"{json.dumps(env.get('versions', {}))}", "", "## Latency, batch 1 (CLIP text: 80 prompts), median",
             "", "| component | implementation | precision | median ms | p90 ms | target ms |",
             "|---|---|---|---|---|---|"]
    for r in res.get("rows", []):
        target = TARGETS_MS.get(r["component"], "")
        lines.append(f"| {r['component']} | {r['impl']} | {r['precision']} | {r['median_ms']:.3f} | "
                     f"{r['p90_ms']:.3f} | {target} |")
    par = res.get("sections", {}).get("gpu_parity", {})
    if par:
        lines += ["", "## Parity on the device (vs PyTorch fp32, TF32 off)", "",
                  "| component | result | worst cosine / mask IoU | max abs |", "|---|---|---|---|"]
        for key, rep in par.items():
            if not isinstance(rep, dict) or "outputs" not in rep:
                continue
            worst = min(m.get("mask_iou", m["cosine"]) for m in rep["outputs"].values())
            mx = max(m["max_abs"] for m in rep["outputs"].values())
            lines.append(f"| {key} | {'pass' if rep['passed'] else 'FAIL'} | {worst:.6f} | {mx:.3g} |")
    cam = res.get("sections", {}).get("camera_1280x720", {})
    if cam:
        lines += ["", "## Camera pipeline, 1280x720 at 60 FPS offered", "",
                  "| task | FPS | latency p50 ms | p99 ms | dropped |", "|---|---|---|---|---|"]
        for task, d in cam.items():
            if isinstance(d, dict) and "fps" in d:
                lat = d.get("latency_ms", {})
                lines.append(f"| {task} | {d['fps']} | {lat.get('p50')} | {lat.get('p99')} | {d.get('dropped')} |")
    prof = res.get("sections", {}).get("kernel_profile", {})
    if prof:
        lines += ["", "## Where the time goes (CUDA kernels per call, fp16, batch 1)", "",
                  "| graph | wall ms | GPU busy ms | launches | top kernels (share of busy) |", "|---|---|---|---|---|"]
        for key, p in prof.items():
            if isinstance(p, dict) and "wall_ms" in p:
                top = "; ".join(f"{t['kernel'][:48]} ({t['share']})" for t in p["top"][:3])
                lines.append(f"| {key} | {p['wall_ms']} | {p['busy_ms']} | {p['launches']} | {top} |")
    ver = res.get("sections", {}).get("edgefm_verify", {})
    if any(isinstance(v, dict) and "components" in v for v in ver.values()):
        lines += ["", f"## `edgefm verify` on {env.get('backend')} (vs ONNX Runtime CPU)", "",
                  "| bundle | component | result |", "|---|---|---|"]
        for key, v in ver.items():
            for name, line in (v.get("components", {}) if isinstance(v, dict) else {}).items():
                lines.append(f"| {key} | {name} | {line} |")
    if res.get("errors"):
        lines += ["", "## Errors", ""]
        lines += [f"- {k}: {v.strip().splitlines()[-1][:300]}" for k, v in res["errors"].items()]
    return "\n".join(lines) + "\n"
