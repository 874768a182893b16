"""``edgefm bench``'s environment stamp and memory figures: what ran where, and how busy the machine was."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import resource
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .bundle import Bundle


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages, where the platform has them."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def usable_cores() -> int | None:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _version(dist: str, module: str | None = None) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        if module and module in sys.modules:
            return str(getattr(sys.modules[module], "__version__", None))
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_memory_used_mib() -> float | None:
    """Device-wide GPU memory in use (nvidia-smi, so no CUDA context is created just to ask); None if unknown."""
    try:
        out = subprocess.run(["nvidia-smi", "--id=0", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        return float(out.strip().splitlines()[0])
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return None


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def environment_stamp(bundle: Bundle, threads: int | None, load_start: list[float] | None = None) -> dict[str, Any]:
    """What ran where: versions, CPU/GPU, backend, precisions, threads; the load averages when the run started
    (``load_start``) and now."""
    gpu = None
    if bundle.backend != "ort-cpu":
        from .backends.tensorrt import current_gpu

        gpu = current_gpu()
    versions = {"edgefm": _version("edgefm"), "numpy": np.__version__, "opencv": cv2.__version__,
                "onnxruntime": _version("onnxruntime", "onnxruntime") or _version("onnxruntime-gpu", "onnxruntime")}
    if bundle.backend == "tensorrt":
        versions["tensorrt"] = _version("tensorrt", "tensorrt")
        versions["cuda-python"] = _version("cuda-python")
    effective = (threads or os.cpu_count()) if bundle.backend.startswith("ort") else None
    return {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "os": platform.platform(), "python": platform.python_version(),
        "cpu": _cpu_model(), "cpu_cores": os.cpu_count(),
        "cpu_affinity": usable_cores(),
        "gpu": gpu, "versions": versions, "backend": bundle.backend,
        "precision": sorted({bundle.entry(n).precision for n in bundle.manifest.component_names}),
        "threads": {"requested": threads, "ort_intra_op": effective},
        # ort-cuda's fp32 math; under ort-trt, TensorRT's own engines allow TF32 whatever this says.
        "tf32": bundle.tf32 if bundle.backend == "ort-cuda" else None,
        "load_average": {"start": load_start, "end": load_average()},
    }
