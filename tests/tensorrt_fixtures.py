"""A fake of the documented TensorRT and cuda-python surface, for the TensorRT tests that run without them.

Imported by test modules (not a conftest). Host memory stands in for device memory; the fake engine doubles
its input ``x`` into ``y``; a captured "CUDA graph" is the list of launches recorded during capture. The fake
ONNX parser reads JSON stand-ins written by ``make_bundle`` (the graph's input/output names and any errors).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import sys
import types
from pathlib import Path

import numpy as np
from edgefm.runtime.bundle import sha256_file
from edgefm.runtime.manifest import ComponentEntry, Manifest
from edgefm.runtime.spec import ComponentSpec, DimRange, TensorSpec

H100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
DOUBLE = ComponentSpec("double", (TensorSpec("x", "float32", ("batch", 3)),),
                       (TensorSpec("y", "float32", ("batch", 3)),), {"batch": DimRange(1, 2, 4)})


class FakeCudart(types.ModuleType):
    """cuda.bindings.runtime: (err, value) tuples; "device" memory is host memory; graphs record closures."""

    def __init__(self, cc: tuple[int, int] = (9, 0)) -> None:
        super().__init__("cuda.bindings.runtime")
        self.cc, self.mem, self.capturing, self.launches, self.mallocs, self.destroyed = cc, {}, None, 0, 0, 0
        self.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
        self.cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeThreadLocal=1)

    def cudaGetDeviceProperties(self, dev):
        return 0, types.SimpleNamespace(name=H100["name"].encode() + b"\0\0", major=self.cc[0], minor=self.cc[1])

    def cudaSetDevice(self, dev):
        return (0,)

    def cudaMalloc(self, n):
        buf = ctypes.create_string_buffer(n)
        self.mem[ctypes.addressof(buf)] = buf
        self.mallocs += 1
        return 0, ctypes.addressof(buf)

    def cudaFree(self, ptr):
        self.mem.pop(ptr)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        assert self.capturing is None, "copies stay outside the captured graph"
        ctypes.memmove(dst, src, n)
        return (0,)

    def cudaStreamCreate(self):
        return 0, 7

    def cudaStreamBeginCapture(self, stream, mode):
        self.capturing = []
        return (0,)

    def cudaStreamEndCapture(self, stream):
        graph, self.capturing = self.capturing, None
        return 0, graph

    def cudaGraphInstantiate(self, graph, flags):
        return 0, ("exec", graph)

    def cudaGraphLaunch(self, exec_, stream):
        self.launches += 1
        for fn in exec_[1]:
            fn()
        return (0,)

    def cudaGraphExecDestroy(self, exec_):
        self.destroyed += 1
        return (0,)

    def cudaEventCreate(self):
        return 0, object()

    def cudaEventElapsedTime(self, a, b):
        return 0, 0.25

    def __getattr__(self, name):  # synchronize, record, destroy...: succeed and do nothing
        if name.startswith("cuda"):
            return lambda *a: (0,)
        raise AttributeError(name)


def make_fake_trt(cudart: FakeCudart, version: str = "10.13.0.35", fp16_flag: bool = True) -> types.ModuleType:
    """TensorRT 10.x's surface; with ``version`` 11.x, without what 11.x removed (the FP16 builder flag and
    ``INormalizationLayer.compute_precision``, as its bindings show)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.log = {"networks": [], "configs": [], "deserialized": 0, "executes": 0}
    trt.engine_factor = 2.0  # what the fake engine multiplies x by
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
    trt.BuilderFlag = types.SimpleNamespace(TF32="TF32", **({"FP16": "FP16"} if fp16_flag else {}))
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.LayerType = types.SimpleNamespace(NORMALIZATION="NORMALIZATION", MATRIX_MULTIPLY="MATRIX_MULTIPLY")
    trt.float32, trt.float16 = "float32", "float16"

    class Layer:  # ILayer: its type; the builder down-casts by assigning __class__, as the bindings document
        def __init__(self, kind):
            self.type, self.name = kind, f"/{kind.lower()}"

    class INormalizationLayer(Layer):
        if not version.startswith("11."):
            compute_precision = None

    trt.INormalizationLayer = INormalizationLayer

    class Network:
        def __init__(self, flags):
            self.flags, self.inputs, self.outputs, self.layers = flags, [], [], []
            trt.log["networks"].append(self)

        num_inputs = property(lambda self: len(self.inputs))
        num_layers = property(lambda self: len(self.layers))

        def get_input(self, i):
            return types.SimpleNamespace(name=self.inputs[i], is_shape_tensor=False)

        def get_layer(self, i):
            return self.layers[i]

    class Profile(dict):
        def set_shape(self, name, lo, opt, hi):
            self[name] = [list(lo), list(opt), list(hi)]

    class Config:
        def __init__(self):
            self.profiles, self.flags, self.pool, self.cache_in = [], [], {}, None
            trt.log["configs"].append(self)

        def set_memory_pool_limit(self, pool, n):
            self.pool[pool] = n

        def set_flag(self, flag):
            self.flags.append(flag)

        def clear_flag(self, flag):
            self.cleared = [*getattr(self, "cleared", []), flag]

        def add_optimization_profile(self, p):
            self.profiles.append(dict(p))

        def create_timing_cache(self, data):
            return types.SimpleNamespace(data=bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache_in = cache.data
            return True

        def get_timing_cache(self):  # each build adds one "t" to the cache it loaded
            return types.SimpleNamespace(serialize=lambda: self.cache_in + b"t")

    class Builder:
        def __init__(self, logger):
            pass

        create_network = staticmethod(Network)
        create_builder_config = staticmethod(Config)
        create_optimization_profile = staticmethod(Profile)

        def build_serialized_network(self, network, config):
            return json.dumps({"inputs": network.inputs, "outputs": network.outputs,
                               "profiles": config.profiles}).encode()

    class OnnxParser:
        """Reads the test's stand-in for an ONNX file: JSON with the graph's inputs, outputs, errors."""

        def __init__(self, network, logger):
            self.network, self.errors = network, []

        def parse_from_file(self, path):
            try:
                graph = json.loads(Path(path).read_text())
            except (UnicodeDecodeError, json.JSONDecodeError):  # a real ONNX file: its I/O names
                import onnx

                g = onnx.load(str(path)).graph
                graph = {"inputs": [i.name for i in g.input], "outputs": [o.name for o in g.output]}
            self.errors = graph.get("errors", [])
            self.network.inputs, self.network.outputs = graph["inputs"], graph["outputs"]
            self.network.layers = [Layer(kind) for kind in graph.get("layers", [])]
            return not self.errors

        num_errors = property(lambda self: len(self.errors))

        def get_error(self, i):
            e = self.errors[i]
            return types.SimpleNamespace(node=lambda: e["node"], desc=lambda: e["desc"],
                                         node_name=lambda: e["name"], node_operator=lambda: e["op"])

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addr = engine, {}, {}

        def set_optimization_profile_async(self, p, stream):
            self.profile = p

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            return self.shapes["x"]

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr

        def execute_async_v3(self, stream):
            n = int(np.prod(self.shapes["x"]))
            src, dst = self.addr["x"], self.addr["y"]

            def run():  # y = 2 x (trt.engine_factor), reading and writing the bound "device" buffers
                trt.log["executes"] += 1
                x = np.frombuffer((ctypes.c_float * n).from_address(src), np.float32)
                np.frombuffer((ctypes.c_float * n).from_address(dst), np.float32)[:] = trt.engine_factor * x

            if cudart.capturing is not None:
                cudart.capturing.append(run)
            else:
                run()
            return True

    class Engine:
        def __init__(self, data):
            d = json.loads(bytes(data))
            self.names, self.inputs, self.profiles = d["inputs"] + d["outputs"], d["inputs"], d["profiles"]

        num_io_tensors = property(lambda self: len(self.names))
        num_optimization_profiles = property(lambda self: len(self.profiles))

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return "INPUT" if name in self.inputs else "OUTPUT"

        def get_tensor_dtype(self, name):
            return types.SimpleNamespace(name="FLOAT")

        def get_tensor_profile_shape(self, name, p):
            return self.profiles[p][name]

        def create_execution_context(self):
            return Context(self)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            trt.log["deserialized"] += 1
            return Engine(data)

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    return trt


def install_fakes(monkeypatch, version: str = "10.13.0.35") -> tuple[types.ModuleType, FakeCudart]:
    """Install fake ``tensorrt`` and ``cuda.bindings.runtime`` modules for one test; returns (trt, cudart)."""
    cudart = FakeCudart()
    trt = make_fake_trt(cudart, version, fp16_flag=not version.startswith("11."))
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    cuda.bindings, bindings.runtime = bindings, cudart
    for name, mod in (("tensorrt", trt), ("cuda", cuda), ("cuda.bindings", bindings),
                      ("cuda.bindings.runtime", cudart)):
        monkeypatch.setitem(sys.modules, name, mod)
    return trt, cudart


def make_bundle(folder: Path, specs: dict[str, ComponentSpec], precisions=("fp32",), errors=None) -> Path:
    """A bundle whose "ONNX" files are the fake parser's JSON stand-ins."""
    folder.mkdir(parents=True, exist_ok=True)
    comps = []
    for name, spec in specs.items():
        for prec in precisions:
            f = folder / f"{name}.{prec}.onnx"
            # Layer types as the parser would create them: a LayerNorm between two MatMuls.
            f.write_text(json.dumps({"inputs": spec.input_names, "outputs": spec.output_names,
                                     "errors": (errors or {}).get(name, []),
                                     "layers": ["MATRIX_MULTIPLY", "NORMALIZATION", "MATRIX_MULTIPLY"]}))
            comps.append(ComponentEntry(name, f.name, sha256_file(f), "onnx", prec, spec, info={"opset": 17}))
    Manifest("sam", "toy", {"loader": "test"}, {"image_size": 1024}, comps).write(folder)
    return folder


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
