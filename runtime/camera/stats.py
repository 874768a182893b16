"""Throughput, capture-to-result latency and dropped frames of a camera run: overlay line, summary, JSON.

Latency of a frame = the moment its result is ready (after postprocess/draw, before the sink writes it)
minus its capture timestamp, both ``time.monotonic()``. FPS = results per second of wall time between the
first and the last result; the overlay shows the rate over the last second.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from ..manifest import write_json_atomic


class RunStats:
    """Collected by the pipeline's threads (thread-safe); read by the overlay, the summary and --stats."""

    def __init__(self, task: str, backend: str, source: str, preprocess: str = "host") -> None:
        self.task, self.backend, self.source = task, backend, source
        self.preprocess = preprocess  # where frames are resized and normalized: "host" or "device"
        self.latencies: list[float] = []  # seconds, one per result
        self.stage_times: dict[str, list[float]] = {}
        self.captured = 0
        self.dropped = 0
        self.reconnects = 0
        self.ended = ""  # why the run ended: "end of stream", "max frames", "stopped", "error: ..."
        self.t_start = time.monotonic()
        self.t_first: float | None = None
        self.t_last: float | None = None
        self._recent: deque[float] = deque()
        self._lock = threading.Lock()

    def stage(self, name: str, seconds: float) -> None:
        with self._lock:
            self.stage_times.setdefault(name, []).append(seconds)

    def result(self, t_capture: float, t_result: float | None = None) -> float:
        """Record one result; returns its latency in seconds."""
        t = time.monotonic() if t_result is None else t_result
        with self._lock:
            latency = t - t_capture
            self.latencies.append(latency)
            self.t_first = t if self.t_first is None else self.t_first
            self.t_last = t
            self._recent.append(t)
            while self._recent and t - self._recent[0] > 1.0:
                self._recent.popleft()
        return latency

    @property
    def processed(self) -> int:
        return len(self.latencies)

    def fps(self) -> float:
        if self.processed < 2 or self.t_last == self.t_first:
            return 0.0
        return (self.processed - 1) / (self.t_last - self.t_first)

    def recent_fps(self) -> float:
        with self._lock:
            if len(self._recent) < 2:
                return 0.0
            return (len(self._recent) - 1) / max(self._recent[-1] - self._recent[0], 1e-9)

    def percentile_ms(self, q: float) -> float:
        with self._lock:
            return float(np.percentile(self.latencies, q) * 1e3) if self.latencies else float("nan")

    def overlay_text(self) -> str:
        last = self.latencies[-1] * 1e3 if self.latencies else float("nan")
        return (f"{self.task} | {self.recent_fps():.1f} FPS | latency {last:.0f} ms (p50 {self.percentile_ms(50):.0f}"
                f" p99 {self.percentile_ms(99):.0f}) | dropped {self.dropped} | {self.backend}")

    def to_dict(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies) * 1e3
        stages = {k: {"median_ms": float(np.median(v) * 1e3), "count": len(v)}
                  for k, v in self.stage_times.items() if v}
        return {
            "task": self.task, "backend": self.backend, "preprocess": self.preprocess, "source": self.source,
            "ended": self.ended,
            "captured": self.captured, "processed": self.processed, "dropped": self.dropped,
            "reconnects": self.reconnects, "fps": round(self.fps(), 3),
            "wall_s": round(time.monotonic() - self.t_start, 3),
            "latency_ms": {
                "last": float(lat[-1]) if lat.size else None,
                "p50": float(np.percentile(lat, 50)) if lat.size else None,
                "p99": float(np.percentile(lat, 99)) if lat.size else None,
                "max": float(lat.max()) if lat.size else None,
            },
            "stages": stages,
        }

    def summary(self) -> str:
        d = self.to_dict()
        lat = d["latency_ms"]

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.1f} ms"

        rows = [
            ("task", d["task"]), ("source", d["source"]), ("backend", d["backend"]),
            ("preprocessing", f"on the {d['preprocess']}"), ("ended", d["ended"]),
            ("frames captured", d["captured"]), ("frames processed", d["processed"]),
            ("frames dropped", d["dropped"]), ("throughput", f"{d['fps']:.1f} FPS"),
            ("latency last", ms(lat["last"])), ("latency p50", ms(lat["p50"])), ("latency p99", ms(lat["p99"])),
        ]
        if d["reconnects"]:
            rows.append(("reconnects", d["reconnects"]))
        rows += [(f"stage {k} (median)", f"{v['median_ms']:.1f} ms") for k, v in d["stages"].items()]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)

    def write_json(self, path: str | Path) -> Path:
        """Write ``to_dict()`` atomically (temporary file, then rename)."""
        path = Path(path)
        write_json_atomic(path, self.to_dict())
        return path
