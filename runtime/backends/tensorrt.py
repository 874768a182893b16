"""Native TensorRT backend: a serialized engine run with cuda-python device buffers, never PyTorch.

``TensorRTRunner(path, entry).run(feeds)`` has the ORT runner's contract: host ``np.ndarray`` in, host arrays
out, feeds checked against the manifest's spec first. Inside: one execution context per optimization profile
(the tightest profile that fits the shapes runs), input shapes set per call, device buffers that grow and
are reused, ``execute_async_v3`` on the runner's own stream, and a CUDA graph captured once the same shapes
repeat (replayed until they change). One runner serves one thread.

Engines only load in the TensorRT version that built them and on GPUs of the compute capability they were
built for. The manifest records both (``edgefm build-engine`` writes them); they are checked *before*
deserializing, so a mismatch is a sentence saying how to rebuild, not a crash inside TensorRT.

The pure-Python parts (compatibility check, profile choice, dtype mapping, graph policy) are plain functions
tested without TensorRT; everything that touches TensorRT or CUDA runs only where both are installed.
"""

from __future__ import annotations

import subprocess
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendError, BundleError, InputError
from ..manifest import ComponentEntry

Shape = tuple[int, ...]
ProfileShapes = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)

INSTALL_HINT = (
    "TensorRT is not installed: pip install 'edgefm[tensorrt]' on a machine with an NVIDIA GPU (the PyPI "
    "bindings alone are not enough: NVIDIA's TensorRT libraries must be installed too), or run the ONNX "
    "components with --backend ort-cuda or ort-cpu"
)
# TensorRT DataType names -> numpy dtype names; BF16/FP8/FP4/INT4 have no numpy twin and never appear at
# edgefm's graph boundaries (the exporters keep fp32 I/O).
_NUMPY_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT8": "int8", "INT32": "int32", "INT64": "int64",
                 "BOOL": "bool", "UINT8": "uint8"}


def import_tensorrt(purpose: str) -> Any:
    """``import tensorrt`` or a :class:`BackendError` saying how to install it."""
    try:
        import tensorrt
    except Exception as exc:  # the PyPI stubs raise RuntimeError/OSError when NVIDIA's libraries are missing
        raise BackendError(f"{purpose} needs TensorRT. {INSTALL_HINT}. ({type(exc).__name__}: {exc})") from exc
    return tensorrt


def import_cudart(purpose: str) -> Any:
    """The CUDA runtime bindings of cuda-python: ``cuda.bindings.runtime`` (>= 12.6), else ``cuda.cudart``."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as exc:
            raise BackendError(
                f"{purpose} needs cuda-python for device buffers and streams: pip install 'edgefm[tensorrt]'"
            ) from exc
    return cudart


def cuda_check(result: Any, what: str) -> Any:
    """cuda-python returns ``(error, *values)``: raise on an error, else return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        name = getattr(err, "name", str(err))
        raise BackendError(f"CUDA call {what} failed with {name}; is an NVIDIA GPU visible and its driver working?")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def current_gpu(device: int = 0) -> dict[str, str] | None:
    """Name and compute capability ("9.0") of CUDA device ``device``; None when no GPU is visible.

    Asks cuda-python (``cudaGetDeviceProperties``) first, then ``nvidia-smi`` (its ``compute_cap`` query
    needs driver >= 510): TensorRT's Python API has no device query of its own.
    """
    try:
        cudart = import_cudart("the GPU query")
        prop = cuda_check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
        name = prop.name.split(b"\0", 1)[0].decode() if isinstance(prop.name, bytes) else str(prop.name)
        return {"name": name, "compute_capability": f"{prop.major}.{prop.minor}"}
    except (BackendError, AttributeError):
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--id={device}", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.strip().splitlines()
        name, cc = (s.strip() for s in out[0].rsplit(",", 1))
        return {"name": name, "compute_capability": cc}
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return None


def check_engine_compat(
    info: dict[str, Any], trt_version: str, gpu: dict[str, str] | None, engine: str, bundle: str
) -> list[str]:
    """Refuse an engine built for another TensorRT version or compute capability; returns warnings.

    ``info`` is the manifest entry's ``info`` (``tensorrt_version``, ``gpu``, ``compute_capability``). Another
    GPU model of the same compute capability loads (TensorRT allows it) but may run slower: a warning.
    """
    rebuild = f"rebuild the engines on this machine with: edgefm build-engine {bundle}"
    built, cc = info.get("tensorrt_version"), info.get("compute_capability")
    if not built or not cc:
        raise BundleError(f"{engine}: the manifest does not record the TensorRT version and compute capability "
                          f"the engine was built for; {rebuild}")
    if str(built) != str(trt_version):
        raise BackendError(f"{engine} was built with TensorRT {built}, but TensorRT {trt_version} is installed; "
                           f"an engine only loads in the TensorRT version that built it: {rebuild}")
    if gpu is None:
        raise BackendError(f"{engine} needs an NVIDIA GPU, but none is visible (no CUDA device found by "
                           "cuda-python or nvidia-smi); run on the GPU machine or use --backend ort-cpu")
    if str(cc) != gpu["compute_capability"]:
        raise BackendError(f"{engine} was built for compute capability {cc} ({info.get('gpu', 'unknown GPU')}), "
                           f"but this GPU is {gpu['name']} with compute capability {gpu['compute_capability']}; "
                           f"{rebuild}")
    if info.get("gpu") and info["gpu"] != gpu["name"]:
        return [f"{engine} was built on {info['gpu']} and runs on {gpu['name']} (same compute capability {cc}): "
                f"it works, but tactics were timed on the other GPU; for best speed, {rebuild}"]
    return []


def numpy_dtype(trt_dtype: Any) -> np.dtype:
    """numpy dtype of a TensorRT ``DataType`` (matched by name, so tests need no TensorRT)."""
    name = getattr(trt_dtype, "name", None) or str(trt_dtype).rsplit(".", 1)[-1]
    if name not in _NUMPY_DTYPES:
        raise BackendError(f"engine I/O tensor type {name} has no numpy equivalent; re-export the component "
                           "with fp32/int64 inputs and outputs and rebuild the engine")
    return np.dtype(_NUMPY_DTYPES[name])


def _fits(profile: ProfileShapes, shapes: dict[str, Shape]) -> bool:
    for name, (lo, _, hi) in profile.items():
        s = shapes.get(name)
        if s is None or len(s) != len(lo) or not all(a <= b <= c for a, b, c in zip(lo, s, hi)):
            return False
    return True


def choose_profile(profiles: list[ProfileShapes], shapes: dict[str, Shape]) -> int:
    """Index of the profile to run ``shapes`` with: among those whose ranges hold every input, the one with
    the smallest max volume (its tactics were timed closest to these shapes)."""
    fits = [i for i, p in enumerate(profiles) if _fits(p, shapes)]
    if not fits:
        ranges = "; ".join(", ".join(f"{n} {list(lo)}..{list(hi)}" for n, (lo, _, hi) in p.items()) for p in profiles)
        raise InputError(f"input shapes {({k: list(v) for k, v in shapes.items()})} fit none of the engine's "
                         f"optimization profiles ({ranges}); rebuild with a larger --max-batch / --max-points")
    return min(fits, key=lambda i: sum(int(np.prod(hi)) for _, _, hi in profiles[i].values()))


def profiles_to_json(profiles: list[ProfileShapes]) -> list[dict[str, dict[str, list[int]]]]:
    return [{n: {"min": list(lo), "opt": list(opt), "max": list(hi)} for n, (lo, opt, hi) in p.items()}
            for p in profiles]


def profiles_from_json(data: list[dict[str, dict[str, list[int]]]]) -> list[ProfileShapes]:
    return [{n: (tuple(r["min"]), tuple(r["opt"]), tuple(r["max"])) for n, r in p.items()} for p in data]


class GraphPolicy:
    """When a CUDA graph pays: capture once the same shapes key has run ``after`` times in a row (the first
    run also does TensorRT's lazy setup, which must not be captured); replay it while the key repeats; drop it
    when the key changes or a buffer moves (a graph bakes in device addresses)."""

    def __init__(self, after: int = 2) -> None:
        self.after = max(1, after)
        self.key: Any = None
        self.count = 0
        self.captured = False

    def observe(self, key: Any) -> str:
        """Returns "direct", "capture" or "replay" for this call."""
        if key != self.key:
            self.key, self.count, self.captured = key, 0, False
        self.count += 1
        if self.captured:
            return "replay"
        return "capture" if self.count > self.after else "direct"

    def invalidate(self) -> None:
        self.key, self.count, self.captured = None, 0, False


class _DeviceBuffer:
    """Grow-only device allocation: reallocated only when a call needs more bytes than it holds."""

    def __init__(self, cudart: Any) -> None:
        self.cudart, self.ptr, self.nbytes = cudart, 0, 0

    def ensure(self, nbytes: int) -> bool:
        if nbytes <= self.nbytes and self.ptr:
            return False
        self.free()
        self.ptr = int(cuda_check(self.cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))
        self.nbytes = max(nbytes, 1)
        return True

    def free(self) -> None:
        if self.ptr:
            self.cudart.cudaFree(self.ptr)
        self.ptr, self.nbytes = 0, 0


class TensorRTRunner:
    """One deserialized engine for one bundle component; ``run(dict) -> dict`` like every runner."""

    backend = "tensorrt"

    def __init__(self, path: str | Path, entry: ComponentEntry, device: int = 0, cuda_graphs: bool = True,
                 graph_after: int = 2, **_: Any) -> None:
        self.path, self.entry, self.spec = Path(path), entry, entry.spec
        trt = import_tensorrt("the tensorrt backend")
        cudart = self.cudart = import_cudart("the tensorrt backend")
        for msg in check_engine_compat(entry.info, trt.__version__, current_gpu(device), str(self.path),
                                       str(self.path.parent)):
            warnings.warn(msg, stacklevel=2)
        cuda_check(cudart.cudaSetDevice(device), "cudaSetDevice")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise BundleError(f"TensorRT could not deserialize {self.path} (see its log above): the file is corrupt "
                              f"or truncated; rebuild it with: edgefm build-engine {self.path.parent}")
        self.engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        if sorted(self.inputs) != sorted(self.spec.input_names) or sorted(self.outputs) != sorted(
                self.spec.output_names):
            raise BundleError(f"{self.path}: engine I/O {self.inputs} -> {self.outputs} does not match the manifest "
                              f"{self.spec.input_names} -> {self.spec.output_names}; rebuild the engine")
        self.dtypes = {n: numpy_dtype(engine.get_tensor_dtype(n)) for n in names}
        for t in self.spec.inputs + self.spec.outputs:
            if self.dtypes[t.name] != np.dtype(t.dtype):
                raise BundleError(f"{self.path}: engine tensor {t.name} is {self.dtypes[t.name]} but the manifest "
                                  f"says {t.dtype}; rebuild the engine")
        self.stream = cuda_check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.profiles: list[ProfileShapes] = [
            {n: tuple(tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(n, p)) for n in self.inputs}
            for p in range(engine.num_optimization_profiles)
        ]
        self.contexts = []
        for p in range(len(self.profiles)):
            ctx = engine.create_execution_context()
            ctx.set_optimization_profile_async(p, int(self.stream))
            self.contexts.append(ctx)
        cuda_check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        self._buffers: dict[tuple[int, str], _DeviceBuffer] = {}
        self._bound: list[Any] = [None] * len(self.contexts)  # per context: shapes key its addresses were set for
        self._policy = GraphPolicy(graph_after) if cuda_graphs else None
        self._graph: tuple[Any, Any] | None = None
        self._events = [cuda_check(cudart.cudaEventCreate(), "cudaEventCreate") for _ in range(4)]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._run(self.spec.check_feeds(feeds), timed=False)[0]

    def run_timed(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """``run`` plus device-side times from CUDA events: ``h2d_ms``, ``compute_ms``, ``d2h_ms``."""
        return self._run(self.spec.check_feeds(feeds), timed=True)

    def _prepare(self, shapes: dict[str, Shape]) -> tuple[int, Any, dict[str, Shape], bool]:
        """Pick the profile, set input shapes and (re)bind buffers; returns whether any tensor address changed."""
        p = choose_profile(self.profiles, shapes)
        ctx, key = self.contexts[p], (p, tuple(shapes[n] for n in self.inputs))
        if self._bound[p] != key:
            for n in self.inputs:
                if not ctx.set_input_shape(n, shapes[n]):
                    raise InputError(f"{self.path}: TensorRT rejected shape {list(shapes[n])} for input {n}")
        out_shapes = {n: tuple(int(d) for d in ctx.get_tensor_shape(n)) for n in self.outputs}
        if any(d < 0 for s in out_shapes.values() for d in s):
            raise BackendError(f"{self.path}: output shapes {out_shapes} depend on data; edgefm engines need "
                               "shapes known from the inputs")
        rebound = False
        for n, s in (*shapes.items(), *out_shapes.items()):
            buf = self._buffers.setdefault((p, n), _DeviceBuffer(self.cudart))
            if buf.ensure(int(np.prod(s, dtype=np.int64)) * self.dtypes[n].itemsize) or self._bound[p] != key:
                ctx.set_tensor_address(n, buf.ptr)
                rebound = True
        self._bound[p] = key
        return p, key, out_shapes, rebound

    def _execute(self, ctx: Any, key: Any, rebound: bool) -> None:
        rt, stream = self.cudart, self.stream
        if self._policy is None:
            action = "direct"
        else:
            if rebound or key != self._policy.key:  # a graph holds one key's shapes and addresses
                self._drop_graph()
            action = self._policy.observe(key)
        if action == "replay":
            cuda_check(rt.cudaGraphLaunch(self._graph[1], stream), "cudaGraphLaunch")
            return
        if action == "capture":
            cuda_check(rt.cudaStreamBeginCapture(stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
                       "cudaStreamBeginCapture")
            ok = ctx.execute_async_v3(int(stream))
            err, graph = rt.cudaStreamEndCapture(stream)
            if ok and int(err) == 0 and graph is not None:
                exec_ = cuda_check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
                self._graph, self._policy.captured = (graph, exec_), True
                cuda_check(rt.cudaGraphLaunch(exec_, stream), "cudaGraphLaunch")
                return
            # Some engines cannot be captured (e.g. data-dependent control flow): run them directly from now on.
            if graph is not None:
                rt.cudaGraphDestroy(graph)
            self._policy = None
        if not ctx.execute_async_v3(int(stream)):
            raise BackendError(f"TensorRT failed to run {self.path} (see its log above)")

    def _run(self, feeds: dict[str, np.ndarray], timed: bool) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        rt, stream = self.cudart, self.stream
        h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        shapes = {n: tuple(a.shape) for n, a in feeds.items()}
        p, key, out_shapes, rebound = self._prepare(shapes)
        ev = self._events
        if timed:
            rt.cudaEventRecord(ev[0], stream)
        for n in self.inputs:
            a = feeds[n]
            if a.nbytes:
                cuda_check(rt.cudaMemcpyAsync(self._buffers[p, n].ptr, a.ctypes.data, a.nbytes, h2d, stream),
                           "cudaMemcpyAsync")
        if timed:
            rt.cudaEventRecord(ev[1], stream)
        self._execute(self.contexts[p], key, rebound)
        if timed:
            rt.cudaEventRecord(ev[2], stream)
        outs = {n: np.empty(s, self.dtypes[n]) for n, s in out_shapes.items()}
        for n, a in outs.items():
            if a.nbytes:
                cuda_check(rt.cudaMemcpyAsync(a.ctypes.data, self._buffers[p, n].ptr, a.nbytes, d2h, stream),
                           "cudaMemcpyAsync")
        if timed:
            rt.cudaEventRecord(ev[3], stream)
        cuda_check(rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        times: dict[str, float] = {}
        if timed:
            for name, a, b in (("h2d_ms", 0, 1), ("compute_ms", 1, 2), ("d2h_ms", 2, 3)):
                times[name] = float(cuda_check(rt.cudaEventElapsedTime(ev[a], ev[b]), "cudaEventElapsedTime"))
        return {n: outs[n] for n in self.spec.output_names}, times

    def _drop_graph(self) -> None:
        if self._graph is not None:
            self.cudart.cudaGraphExecDestroy(self._graph[1])
            self.cudart.cudaGraphDestroy(self._graph[0])
            self._graph = None
        if self._policy is not None:
            self._policy.invalidate()

    def close(self) -> None:
        """Free device memory now (otherwise at garbage collection)."""
        if getattr(self, "_buffers", None) is None:
            return
        self._drop_graph()
        for buf in self._buffers.values():
            buf.free()
        for e in self._events:
            self.cudart.cudaEventDestroy(e)
        self.cudart.cudaStreamDestroy(self.stream)
        self._buffers = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the CUDA bindings may already be gone
            pass
