"""ONNX Runtime backend: CPU, CUDA (IO binding, device-resident outputs) and the TensorRT execution provider.

Sessions are created once per component and reused. Threads, graph optimisation level and optimized-model
caching are set here deliberately rather than left to defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendError, BundleError
from ..spec import ComponentSpec

_PROVIDERS = {
    "ort-cpu": ["CPUExecutionProvider"],
    "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "ort-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def ort():
    import onnxruntime

    return onnxruntime


def available_ort_backends() -> list[str]:
    """ORT-based backends whose execution provider this onnxruntime build offers."""
    have = set(ort().get_available_providers())
    return [name for name, providers in _PROVIDERS.items() if providers[0] in have]


def _provider_options(backend: str, cache_dir: Path | None) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for p in _PROVIDERS[backend]:
        opts: dict[str, Any] = {}
        if p == "TensorrtExecutionProvider":
            opts = {"trt_fp16_enable": True, "trt_engine_cache_enable": cache_dir is not None}
            if cache_dir is not None:
                opts["trt_engine_cache_path"] = str(cache_dir / "trt-ep")
                opts["trt_timing_cache_enable"] = True
        elif p == "CUDAExecutionProvider":
            # Exhaustive conv algo search pays once per session and wins on every call after.
            opts = {"cudnn_conv_algo_search": "EXHAUSTIVE", "do_copy_in_default_stream": True}
        out.append((p, opts))
    return out


class OrtRunner:
    """One ONNX Runtime session for one component file."""

    def __init__(
        self,
        path: str | Path,
        spec: ComponentSpec,
        backend: str = "ort-cpu",
        threads: int | None = None,
        cache_dir: str | Path | None = None,
        spin: bool = False,
    ) -> None:
        if backend not in _PROVIDERS:
            raise BackendError(f"unknown ONNX Runtime backend {backend!r}; expected one of {list(_PROVIDERS)}")
        rt = ort()
        self.spec = spec
        self.backend = backend
        self.path = Path(path)
        cache = Path(cache_dir) if cache_dir is not None else None
        so = rt.SessionOptions()
        so.graph_optimization_level = rt.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Default: one intra-op thread per core; a pipeline runs one component at a time.
        so.intra_op_num_threads = threads or (os.cpu_count() or 1)
        so.inter_op_num_threads = 1
        if backend == "ort-cpu" and not spin:
            # Idle intra-op threads would spin on the cores that OpenCV pre/post-processing and a camera
            # pipeline's other stages need next; measured on 2 cores with one other busy process, SAM ViT-B's
            # prompt -> mask went from 192 ms spinning to 81 ms without (a tiny model on a quiet machine
            # loses ~0.4 ms per call: pass spin=True for a dedicated machine).
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        missing = [p for p in _PROVIDERS[backend][:1] if p not in rt.get_available_providers()]
        if missing:
            raise BackendError(
                f"backend {backend!r} needs ONNX Runtime's {missing[0]}, which this onnxruntime build lacks "
                f"(it has {rt.get_available_providers()}); install onnxruntime-gpu "
                "(pip install 'edgefm[gpu]') or choose --backend ort-cpu"
            )
        try:
            self.session = rt.InferenceSession(
                str(self.path), sess_options=so, providers=_provider_options(backend, cache)
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors for corrupt files
            raise BundleError(
                f"ONNX Runtime could not load {self.path} ({type(exc).__name__}: {str(exc)[:300]}); "
                "the file is corrupt or truncated: re-export the bundle"
            ) from exc
        got_in = [i.name for i in self.session.get_inputs()]
        got_out = [o.name for o in self.session.get_outputs()]
        if got_in != spec.input_names or got_out != spec.output_names:
            raise BundleError(
                f"{self.path}: graph I/O {got_in} -> {got_out} does not match the manifest "
                f"{spec.input_names} -> {spec.output_names}; re-export the bundle"
            )
        self.device = "cuda" if backend != "ort-cpu" else "cpu"

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = self.spec.check_feeds(feeds)
        if self.device == "cpu":
            outs = self.session.run(self.spec.output_names, feeds)
            return dict(zip(self.spec.output_names, outs))
        return {k: v.numpy() for k, v in self.run_on_device(feeds).items()}

    def run_on_device(self, feeds: dict[str, Any], keep: tuple[str, ...] = ()) -> dict[str, Any]:
        """Run with IO binding. ``feeds`` values may be host arrays or device ``OrtValue``s (a previous
        component's outputs), so chained components never round-trip through the host. Returns
        ``OrtValue``s; those named in ``keep`` stay on the device, the rest are bound to host memory."""
        rt = ort()
        binding = self.session.io_binding()
        for name in self.spec.input_names:
            value = feeds[name]
            if isinstance(value, np.ndarray):
                value = rt.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), "cuda", 0)
            binding.bind_ortvalue_input(name, value)
        for name in self.spec.output_names:
            if name in keep:
                binding.bind_output(name, "cuda", 0)
            else:
                binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return dict(zip(self.spec.output_names, binding.get_outputs()))
