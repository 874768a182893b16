"""ONNX Runtime backend: CPU, CUDA (IO binding, device-resident outputs) and the TensorRT execution provider.

Sessions are created once per component and reused. Threads, graph optimisation level and optimized-model
caching are set here deliberately rather than left to defaults.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import os
from collections.abc import Callable
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


@functools.lru_cache(maxsize=1)
def gpu_visible() -> bool:
    """A CUDA device is visible (onnxruntime-gpu lists its CUDA provider on machines without any GPU)."""
    from .tensorrt import current_gpu

    return current_gpu() is not None


@functools.lru_cache(maxsize=1)
def tensorrt_libraries() -> bool:
    """TensorRT's runtime library can be loaded: onnxruntime-gpu lists its TensorRT provider whether or not
    TensorRT is installed, and a session asked for it then fails."""
    try:
        import tensorrt  # noqa: F401  (its wheels load libnvinfer into the process)

        return True
    except Exception:
        pass
    for name in ("libnvinfer.so.10", "libnvinfer.so.11", "libnvinfer.so"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def available_ort_backends() -> list[str]:
    """ORT-based backends that can run here: the provider is built in *and* what it needs is present."""
    have = set(ort().get_available_providers())
    out = []
    if "CUDAExecutionProvider" in have and gpu_visible():
        if "TensorrtExecutionProvider" in have and tensorrt_libraries():
            out.append("ort-trt")
        out.append("ort-cuda")
    return out + ["ort-cpu"]


def unavailable_reason(backend: str) -> str:
    """Why an ORT backend is not in :func:`available_ort_backends`, for error messages."""
    providers = ort().get_available_providers()
    if backend in ("ort-cuda", "ort-trt") and "CUDAExecutionProvider" not in providers:
        return (f"this onnxruntime build has no CUDA provider (it has {providers}); "
                "install onnxruntime-gpu: pip install 'edgefm[gpu]'")
    if backend in ("ort-cuda", "ort-trt") and not gpu_visible():
        return "no CUDA GPU is visible (cuda-python and nvidia-smi found none)"
    if backend == "ort-trt":
        return ("TensorRT's libraries (libnvinfer) cannot be loaded: install TensorRT "
                "(pip install 'edgefm[tensorrt]') or choose --backend ort-cuda")
    return "it is not installed or not usable here"


def _version_tuple(version: str) -> tuple[int, ...]:
    """``"1.18.0"`` -> ``(1, 18, 0)``; a dev/local suffix ends the numbers."""
    parts = []
    for piece in version.split("."):
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def trt_profile_options(spec: ComponentSpec) -> dict[str, str]:
    """ONNX Runtime TensorRT provider options for one optimization profile over ``spec``'s ranges (the inputs
    with a free dim, at their min/opt/max). Without them the provider builds an engine for the first shapes it
    sees and builds again whenever a later input falls outside them: a stall of seconds in the middle of a
    stream (a click with more points, a longer caption)."""
    free = [t.name for t in spec.inputs if any(isinstance(d, str) for d in t.shape)]
    if not free:
        return {}
    out = {}
    for which in ("min", "opt", "max"):
        shapes = spec.profile(which)
        out[f"trt_profile_{which}_shapes"] = ",".join(f"{n}:{'x'.join(map(str, shapes[n]))}" for n in free)
    return out


def _provider_options(backend: str, cache_dir: Path | None, cuda_options: dict[str, Any] | None = None,
                      explicit_int8: bool = False, spec: ComponentSpec | None = None
                      ) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for p in _PROVIDERS[backend]:
        opts: dict[str, Any] = {}
        if p == "TensorrtExecutionProvider":
            opts = {"trt_fp16_enable": True, "trt_engine_cache_enable": cache_dir is not None,
                    **(trt_profile_options(spec) if spec is not None else {})}
            if explicit_int8:
                # A Q/DQ graph (edgefm quantize): TensorRT's builder refuses int8 layers unless int8 is enabled
                # (onnxruntime issue 13381); the scales are in the graph, so no calibration table is given.
                opts["trt_int8_enable"] = True
            if cache_dir is not None:
                opts["trt_engine_cache_path"] = str(cache_dir / "trt-ep")
                opts["trt_timing_cache_enable"] = True
        elif p == "CUDAExecutionProvider":
            # Exhaustive conv algo search pays once per session and wins on every call after. ONNX Runtime runs
            # fp32 MatMul/Conv in TF32 unless told otherwise; fp32 here means fp32, as in PyTorch's default and
            # fp32 engines, so TF32 is opt-in (cuda_options use_tf32="1"). The option came with 1.18 (onnxruntime
            # PR 19357), and older builds refuse options they do not know.
            opts = {"cudnn_conv_algo_search": "EXHAUSTIVE", "do_copy_in_default_stream": True}
            if _version_tuple(ort().__version__) >= (1, 18):
                opts["use_tf32"] = "0"
            opts.update(cuda_options or {})
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
        cuda_graph: bool = False,
        cuda_options: dict[str, Any] | None = None,
        explicit_int8: bool = False,
    ) -> None:
        """``explicit_int8``: the graph is explicitly quantized (Q/DQ), so the TensorRT provider builds int8."""
        if backend not in _PROVIDERS:
            raise BackendError(f"unknown ONNX Runtime backend {backend!r}; expected one of {list(_PROVIDERS)}")
        if cuda_graph and backend != "ort-cuda":
            raise BackendError(f"cuda_graph=True needs the ort-cuda backend, not {backend!r}")
        rt = ort()
        self.spec = spec
        self.backend = backend
        self.path = Path(path)
        self.cuda_graph = cuda_graph
        # Captured graphs by input shapes, most recently used last (see _run_graph).
        self._graphs: dict[tuple, _CapturedGraph] = {}
        cache = Path(cache_dir) if cache_dir is not None else None
        self._threads, self._spin = threads, spin
        so = self._session_options()
        missing = [p for p in _PROVIDERS[backend][:1] if p not in rt.get_available_providers()]
        if missing:
            raise BackendError(
                f"backend {backend!r} needs ONNX Runtime's {missing[0]}, which this onnxruntime build lacks "
                f"(it has {rt.get_available_providers()}); install onnxruntime-gpu "
                "(pip install 'edgefm[gpu]') or choose --backend ort-cpu"
            )
        self._providers = _provider_options(backend, cache, cuda_options, explicit_int8, spec)
        self.session = self._open(so, self._providers)
        got_in = [i.name for i in self.session.get_inputs()]
        got_out = [o.name for o in self.session.get_outputs()]
        if got_in != spec.input_names or got_out != spec.output_names:
            raise BundleError(
                f"{self.path}: graph I/O {got_in} -> {got_out} does not match the manifest "
                f"{spec.input_names} -> {spec.output_names}; re-export the bundle"
            )
        self.device = "cuda" if backend != "ort-cpu" else "cpu"

    @property
    def providers(self) -> list[tuple[str, dict[str, Any]]]:
        """The ONNX Runtime providers, with their options, that this runner's session was opened with."""
        return list(self._providers)

    def _session_options(self):
        """Fresh options for one session (a captured graph adds its own dimension overrides to its copy)."""
        rt = ort()
        so = rt.SessionOptions()
        so.graph_optimization_level = rt.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Default: one intra-op thread per core; a pipeline runs one component at a time.
        so.intra_op_num_threads = self._threads or (os.cpu_count() or 1)
        so.inter_op_num_threads = 1
        if self.backend == "ort-cpu" and not self._spin:
            # Idle intra-op threads would spin on the cores that OpenCV pre/post-processing and a camera
            # pipeline's other stages need next; measured on 2 cores with one other busy process, SAM ViT-B's
            # prompt -> mask went from 192 ms spinning to 81 ms without (a tiny model on a quiet machine
            # loses ~0.4 ms per call: pass spin=True for a dedicated machine).
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        return so

    def profiling_session(self, prefix: str | Path):
        """A second session of this component, opened as this one was, with ONNX Runtime's profiler writing its
        trace to ``prefix``_<date>.json (``end_profiling()`` returns the path)."""
        so = self._session_options()
        so.enable_profiling = True
        so.profile_file_prefix = str(prefix)
        return self._open(so, self._providers)

    def _open(self, so, providers):
        try:
            return ort().InferenceSession(str(self.path), sess_options=so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors for corrupt files
            raise BundleError(
                f"ONNX Runtime could not load {self.path} ({type(exc).__name__}: {str(exc)[:300]}); "
                "the file is corrupt or truncated: re-export the bundle"
            ) from exc

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = self.spec.check_feeds(feeds)
        if self.cuda_graph:
            return self._run_graph(feeds)
        if self.device == "cpu":
            outs = self.session.run(self.spec.output_names, feeds)
            return dict(zip(self.spec.output_names, outs))
        return {k: v.numpy() for k, v in self.run_on_device(feeds).items()}

    def run_on_device(self, feeds: dict[str, Any], keep: tuple[str, ...] = (),
                      into: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run with IO binding. ``feeds`` values may be host arrays or device ``OrtValue``s (a previous
        component's outputs), so chained components never round-trip through the host. Returns
        ``OrtValue``s; those named in ``keep`` stay on the runner's device, the rest are bound to host
        memory. ``into``: outputs written into these existing device ``OrtValue``s (e.g. a captured graph's
        input buffers). (On ort-cpu all of it is host memory: the same code path, testable without a GPU.)"""
        rt = ort()
        binding = self.session.io_binding()
        for name in self.spec.input_names:
            value = feeds[name]
            if isinstance(value, np.ndarray):
                value = rt.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self.device, 0)
            binding.bind_ortvalue_input(name, value)
        for name in self.spec.output_names:
            if into and name in into:
                binding.bind_ortvalue_output(name, into[name])
            elif name in keep:
                binding.bind_output(name, self.device, 0)
            else:
                binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return dict(zip(self.spec.output_names, binding.get_outputs()))

    # Captured graphs kept per runner: each is its own session (its own copy of the weights on the device), so a
    # component called with many shapes (SAM's decoder: one per click count) keeps only the recent ones.
    MAX_GRAPHS = 4

    def resident_call(self, feeds: dict[str, np.ndarray]) -> Callable[[], dict[str, Any]]:
        """``feeds`` uploaded to the runner's device once; the returned call runs the component with every
        output left there (IO binding): its time without host copies, as benchmarks measure it."""
        rt = ort()
        dev = {n: rt.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self.device, 0) for n, a in feeds.items()}
        keep = tuple(self.spec.output_names)
        return lambda: self.run_on_device(dev, keep=keep)

    def _run_graph(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Static shapes: the first call with a set of input shapes captures a CUDA graph for it, later calls
        with the same shapes replay it; the least recently used of more than MAX_GRAPHS is released."""
        graph, _ = recent_graph(self._graphs, shapes_key(feeds), lambda: _CapturedGraph(self, feeds), self.MAX_GRAPHS)
        return graph.run(feeds)


def shapes_key(feeds: dict[str, Any]) -> tuple:
    """The input names and shapes a captured graph is fixed to."""
    return tuple((n, a.shape) for n, a in feeds.items())


def recent_graph(cache: dict[tuple, Any], key: tuple, capture: Callable[[], Any], limit: int) -> tuple[Any, bool]:
    """``cache[key]``, captured with ``capture()`` when missing, and ``True`` when it was. The cache's order is
    its recency: the key becomes the most recent, and after a capture the least recent go while the cache
    holds more than ``limit``."""
    value = cache.pop(key, None)
    captured = value is None
    if captured:
        value = capture()
        while len(cache) >= limit:
            cache.pop(next(iter(cache)))
    cache[key] = value
    return value, captured


class _CapturedGraph:
    """A CUDA-graph session fixed to one set of input shapes, with its device buffers bound once.

    ``bound``: inputs given as existing device ``OrtValue``s (e.g. another captured graph's ``outputs``) are
    bound as they are, so chained graphs share buffers at fixed addresses and replay without any copy; the
    rest get buffers of their own, refilled from host arrays by :meth:`run`. ``into``: outputs written into
    existing device ``OrtValue``s (two graphs that hand a buffer back and forth), the rest into their own."""

    def __init__(self, runner: OrtRunner, feeds: dict[str, np.ndarray], bound: dict[str, Any] | None = None,
                 into: dict[str, Any] | None = None) -> None:
        rt = ort()
        bound = dict(bound or {})
        self.shapes = {**{n: a.shape for n, a in feeds.items()}, **{n: tuple(v.shape()) for n, v in bound.items()}}
        sizes: dict[str, int] = {}
        for t in runner.spec.inputs:
            for axis, dim in enumerate(t.shape):
                if isinstance(dim, str):
                    sizes[dim] = self.shapes[t.name][axis]
        so = runner._session_options()
        # Every symbolic dim becomes a constant, so that ORT folds the shape arithmetic away at load time and
        # every node lands on the CUDA provider (a captured graph cannot hold host-side shape nodes).
        for dim, value in sizes.items():
            so.add_free_dimension_override_by_name(dim, int(value))
        # One provider only: a captured graph must hold every node. (On ort-cpu, used by the tests, this is
        # a plain static-shape session with pre-bound buffers.)
        first, opts = runner._providers[0]
        if first == "CUDAExecutionProvider":
            opts = {**opts, "enable_cuda_graph": "1"}
        self.session = runner._open(so, [(first, opts)])
        device = runner.device
        self.inputs = {**{n: rt.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), device, 0)
                          for n, a in feeds.items()}, **bound}
        into = into or {}
        self.outputs = {
            t.name: into[t.name] if t.name in into else rt.OrtValue.ortvalue_from_shape_and_type(
                list(runner.spec.concrete_shape(t, "opt", **sizes)), np.dtype(t.dtype), device, 0)
            for t in runner.spec.outputs
        }
        self.binding = self.session.io_binding()
        for name, value in self.inputs.items():
            self.binding.bind_ortvalue_input(name, value)
        for name, value in self.outputs.items():
            self.binding.bind_ortvalue_output(name, value)
        self.session.run_with_iobinding(self.binding)  # allocation and capture

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Refill the given inputs (host arrays; bound inputs are left as they are), replay, return host copies."""
        self.replay(feeds)
        return {name: value.numpy() for name, value in self.outputs.items()}

    def replay(self, feeds: dict[str, np.ndarray] | None = None) -> None:
        """Refill the given inputs and replay; outputs stay in :attr:`outputs` (on the device)."""
        for name, value in (feeds or {}).items():
            self.inputs[name].update_inplace(np.ascontiguousarray(value))
        self.session.run_with_iobinding(self.binding)
