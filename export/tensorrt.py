"""TensorRT engines from a bundle's ONNX components, in small Polygraphy-style steps.

``network_from_onnx`` -> ``engine_from_network`` with profiles from ``profiles_from_spec``; ``build_engine``
runs them for every component of a bundle and adds ``.engine`` components to its manifest.

Precision. Networks are strongly typed wherever the installed TensorRT allows it (the creation flag exists
since 8.6 and is implied in 11.x): the ONNX graph carries the precision. fp16 engines are therefore built
from the bundle's mixed-precision ONNX (``export/onnx.py`` ``fp16_from_onnx``: Softmax and the written-out
reductions kept fp32, fp32 I/O; LayerNorm's statistics pinned to fp32 by ``pin_normalization_fp32``); only
when a bundle has no fp16 ONNX *and* the installed TensorRT still has ``BuilderFlag.FP16`` (10.x) is the fp32
graph built weakly typed with that flag. int8 engines are built, strongly typed, from the explicitly
quantized (Q/DQ, fp16 elsewhere) components that ``edgefm quantize`` adds (``export/quantize.py``), and the
components it leaves alone are built fp16 where the rules above allow, else fp32; calibrated implicit INT8
is deprecated in 10.x and gone in 11.x, so it is not offered.

Profiles come from the component's :class:`ComponentSpec` ranges (min/opt/max of every symbolic dim);
``--max-batch`` / ``--max-points`` replace the max of the dims named ``batch``/``image_batch`` and
``num_points``. The engine's manifest entry carries the resulting ranges, so the runtime's feed check and the
engine agree. The manifest also records the TensorRT version, GPU name and compute capability (queried with
cuda-python, else nvidia-smi: see ``edgefm.runtime.backends.tensorrt.current_gpu``), which the runtime
checks before it deserializes. Engine files are content-addressed (``name.precision.sha8.engine``) and the
manifest is replaced by rename, so a failed or interrupted build leaves the bundle as it was.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefm.runtime.backends.tensorrt import (
    ProfileShapes,
    current_gpu,
    import_tensorrt,
    profiles_to_json,
)
from edgefm.runtime.bundle import sha256_file
from edgefm.runtime.errors import BackendError, BundleError, InputError, ParityError
from edgefm.runtime.manifest import ComponentEntry, Manifest, read_manifest, write_atomic
from edgefm.runtime.spec import ComponentSpec, DimRange

from .bundle import commit_components
from .verify import ParityInputs, check_engine_file, failure_message, parity_summary

PRECISIONS = ("fp32", "fp16", "int8")
PARITY_MODES = ("gate", "report", "skip")  # refuse a failing engine / record it / do not run the check
BATCH_DIMS = ("batch", "image_batch")  # what --max-batch bounds
POINT_DIMS = ("num_points",)  # what --max-points bounds
DEFAULT_WORKSPACE = "4GiB"
TIMING_CACHE = Path(".cache") / "tensorrt-timing.cache"  # inside the bundle, beside ORT's caches
# The ONNX component an engine of each precision is built from, best first.
_SOURCES = {"fp32": ("fp32",), "fp16": ("fp16", "mixed"), "int8": ("int8",)}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str | int) -> int:
    """Bytes from "4GiB", "512MiB", "2GB" or a plain integer."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise InputError(f"--workspace {text!r} is not a size; write it like 4GiB, 512MiB or 2000000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def dim_overrides(max_batch: int | None = None, max_points: int | None = None) -> dict[str, int]:
    """--max-batch / --max-points as new maxima of dims, by dim name."""
    out: dict[str, int] = {}
    for flag, value, dims in (("--max-batch", max_batch, BATCH_DIMS), ("--max-points", max_points, POINT_DIMS)):
        if value is None:
            continue
        if int(value) < 1:
            raise InputError(f"{flag} must be at least 1, got {value}")
        out.update({d: int(value) for d in dims})
    return out


def dims_with_overrides(spec: ComponentSpec, overrides: dict[str, int] | None = None) -> dict[str, DimRange]:
    """The spec's dim ranges with overridden maxima (opt clipped to the new max); unknown dims are ignored."""
    dims = dict(spec.dims)
    for name, hi in (overrides or {}).items():
        if name not in dims:
            continue
        r = dims[name]
        if hi < r.min:
            raise InputError(f"component {spec.name!r}: the new max {hi} of dim {name!r} is below its min {r.min}")
        dims[name] = DimRange(r.min, min(r.opt, hi), hi)
    return dims


def profiles_from_spec(spec: ComponentSpec, overrides: dict[str, int] | None = None) -> list[ProfileShapes]:
    """Optimization profiles (one) for ``spec``'s inputs: input name -> (min, opt, max) shapes."""
    dims = dims_with_overrides(spec, overrides)
    profile: ProfileShapes = {}
    for t in spec.inputs:
        profile[t.name] = tuple(
            tuple(d if isinstance(d, int) else getattr(dims[d], which) for d in t.shape)
            for which in ("min", "opt", "max")
        )
    return [profile]


def engine_spec(spec: ComponentSpec, overrides: dict[str, int] | None = None) -> ComponentSpec:
    """The spec recorded with an engine: the same tensors, the ranges the engine was built for."""
    return ComponentSpec(spec.name, spec.inputs, spec.outputs, dims_with_overrides(spec, overrides))


@dataclass(frozen=True)
class BuildStep:
    """One engine to build: from which ONNX entry, and whether it needs the weakly typed FP16 flag."""

    source: ComponentEntry
    precision: str
    fp16_flag: bool


def plan_sources(manifest: Manifest, precision: str, has_fp16_flag: bool,
                 components: list[str] | None = None) -> list[BuildStep]:
    """Choose the ONNX component each engine is built from (see the module docstring for the rules)."""
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r} is not supported; choose one of {list(PRECISIONS)}")
    names = components or manifest.component_names
    unknown = [n for n in names if n not in manifest.component_names]
    if unknown:
        raise InputError(f"--component {unknown} not in the bundle; it has {manifest.component_names}")
    if precision == "int8":
        return _plan_int8(manifest, names, has_fp16_flag)
    return [_plan_float(manifest, name, precision, has_fp16_flag) for name in names]


def _plan_float(manifest: Manifest, name: str, precision: str, has_fp16_flag: bool) -> BuildStep:
    onnx = {c.precision: c for c in manifest.find(name, format="onnx")}
    src = next((onnx[p] for p in _SOURCES[precision] if p in onnx), None)
    if src is not None:
        return BuildStep(src, precision, False)
    if precision == "fp16" and "fp32" in onnx and has_fp16_flag:
        return BuildStep(onnx["fp32"], precision, True)
    if precision == "fp16" and "fp32" in onnx:
        raise InputError(f"component {name!r} has only an fp32 ONNX and this TensorRT has no FP16 builder flag "
                         "(11.x builds strongly typed networks only): re-export the bundle with --precision "
                         "fp16 to get the mixed-precision ONNX, or build --precision fp32")
    raise InputError(f"component {name!r} has no {'/'.join(_SOURCES[precision])} ONNX to build a "
                     f"{precision} engine from (it has {sorted(onnx)}); choose one of those precisions")


def _plan_int8(manifest: Manifest, names: list[str], has_fp16_flag: bool) -> list[BuildStep]:
    """int8 engines from the Q/DQ components ``edgefm quantize`` adds; the components it does not quantize
    (small, or without image inputs) are built fp16 where a source allows it, else fp32 (TensorRT 11 with the
    fp32 bundle that quantize starts from), and their entries say which."""
    steps: list[BuildStep] = []
    for name in names:
        src = next(iter(manifest.find(name, format="onnx", precision="int8")), None)
        if src is None:
            try:
                steps.append(_plan_float(manifest, name, "fp16", has_fp16_flag))
            except InputError:
                steps.append(_plan_float(manifest, name, "fp32", has_fp16_flag))
        elif not src.explicitly_quantized:
            raise InputError(f"component {name!r}: its int8 ONNX ({src.file}) is ONNX Runtime's dynamic "
                             "quantization (MatMulInteger, for CPUs), which TensorRT cannot parse. Export the "
                             "model with --precision fp32 and run `edgefm quantize BUNDLE --calibration IMAGES` "
                             "to add a calibrated Q/DQ graph")
        else:
            steps.append(BuildStep(src, "int8", False))
    if not any(s.precision == "int8" for s in steps):
        raise InputError(f"no component of {names} has an int8 (Q/DQ) ONNX: run `edgefm quantize BUNDLE "
                         "--calibration IMAGES` first (it adds calibrated int8 image encoders), or build "
                         "--precision fp16")
    return steps


def _parser_errors(parser: Any, path: Path) -> str:
    lines = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        where = [f"node {e.node()}"]
        for attr, label in (("node_name", "name"), ("node_operator", "op")):
            if hasattr(e, attr) and getattr(e, attr)():
                where.append(f"{label} {getattr(e, attr)()}")
        lines.append(f"  {', '.join(where)}: {e.desc()}")
    return f"TensorRT's ONNX parser rejected {path}:\n" + "\n".join(lines or ["  (no error recorded)"])


def network_from_onnx(path: str | Path, strongly_typed: bool = True, logger: Any = None) -> tuple[Any, Any, Any]:
    """Parse ``path`` (external weights beside it are found by path) into ``(builder, network, parser)``."""
    trt = import_tensorrt("Building TensorRT engines")
    logger = logger or trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(1 << int(flag) if strongly_typed and flag is not None else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        raise BundleError(_parser_errors(parser, Path(path)) + "\nre-export the component or report the operator")
    return builder, network, parser


def pin_normalization_fp32(network: Any, trt: Any) -> int | None:
    """Run every normalization layer's statistics in fp32 (``INormalizationLayer.compute_precision``), as the
    ONNX ``stash_type`` of the exported LayerNormalization says: the fp16 ONNX keeps LayerNorm's I/O in fp16
    (``export/onnx.py`` FP32_OPS), so the accumulation must not follow the I/O type. Returns how many layers
    were pinned, or None where TensorRT has no such control: 11.x removed the property (its bindings have no
    ``compute_precision``) and types every layer from the network, so there the engine's parity check against
    the fp32 ONNX (``export/verify.py``) is what proves the fp16 LayerNorms hold."""
    if not hasattr(trt.INormalizationLayer, "compute_precision"):
        return None
    n = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.NORMALIZATION:
            layer.__class__ = trt.INormalizationLayer  # the Python bindings' documented down-cast
            try:
                layer.compute_precision = trt.float32
            except Exception as exc:  # the bindings raise their own types
                raise BackendError(
                    f"TensorRT {trt.__version__} refused to run normalization layer {layer.name!r} in fp32 "
                    f"({type(exc).__name__}: {exc}); fp16 LayerNorm statistics could overflow, so the engine is "
                    "not built: build --precision fp32, or use --backend ort-cuda") from exc
            n += 1
    return n


@dataclass
class TimingCache:
    """A serialized TensorRT timing cache carried from build to build; the caller decides when to save it."""

    data: bytes = b""

    @classmethod
    def load(cls, path: Path) -> TimingCache:
        return cls(path.read_bytes() if path.is_file() else b"")

    def save(self, path: Path) -> None:
        write_atomic(path, self.data)


def engine_from_network(builder: Any, network: Any, profiles: list[ProfileShapes], workspace: int,
                        fp16_flag: bool = False, timing_cache: TimingCache | None = None, tf32: bool = True
                        ) -> bytes:
    """Build a serialized engine, starting from and updating ``timing_cache`` when given. ``tf32=False`` clears
    TensorRT's TF32 flag (on by default in 10.x and 11.x: fp32 MatMuls and Convs would round their inputs to
    10-bit mantissas), so that an fp32 engine meets the fp32 parity policy rather than fp16's."""
    trt = import_tensorrt("Building TensorRT engines")
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    shape_tensors = [network.get_input(i).name for i in range(network.num_inputs)
                     if network.get_input(i).is_shape_tensor]
    if shape_tensors:
        raise BundleError(f"inputs {shape_tensors} are shape tensors; edgefm engines take data inputs only")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    if not tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    for shapes in profiles:
        if sorted(shapes) != sorted(names):
            raise BundleError(f"the graph's inputs {names} differ from the spec's {sorted(shapes)}; re-export")
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    cache_bytes = timing_cache.data if timing_cache is not None else b""
    # ignore_mismatch=False: a cache written on another GPU or TensorRT is refused; start a fresh one then.
    if not config.set_timing_cache(config.create_timing_cache(cache_bytes), False) and cache_bytes:
        config.set_timing_cache(config.create_timing_cache(b""), False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError("TensorRT failed to build the engine (its log above says why); try a larger --workspace")
    if timing_cache is not None:
        timing_cache.data = bytes(memoryview(config.get_timing_cache().serialize()))
    return bytes(memoryview(serialized))


def build_engine(bundle: str | Path, precision: str = "fp16", workspace: str | int = DEFAULT_WORKSPACE,
                 max_batch: int | None = None, max_points: int | None = None,
                 timing_cache: str | Path | None = None, components: list[str] | None = None,
                 progress: Any = None, parity: str = "gate", threads: int | None = None) -> list[ComponentEntry]:
    """Build one engine per component of ``bundle`` and add them to its manifest; returns the new entries.

    Each engine is run once against the bundle's ONNX on ONNX Runtime's CPU (``export/verify.py``)
    before anything is written: ``parity="gate"`` refuses an engine that misses its precision's policy,
    ``"report"`` records the result either way, ``"skip"`` does not run the check. Engines already in the
    bundle for the same component and precision are replaced. Nothing in the bundle changes unless every
    engine builds (and passes the gate).
    """
    folder = Path(bundle)
    manifest = read_manifest(folder)
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r} is not supported; choose one of {list(PRECISIONS)}")
    if parity not in PARITY_MODES:
        raise InputError(f"parity={parity!r}: choose one of {list(PARITY_MODES)}")
    n_bytes = parse_size(workspace)
    overrides = dim_overrides(max_batch, max_points)
    # edgefm's static check first (export/trt_compat.py): an incompatible graph fails with one clear message
    # even where TensorRT is not installed. It needs onnx (the [export] extra, which the lean CLI may lack;
    # the parser checks again anyway). The FP16-flag guess changes no source file, only a later error.
    if importlib.util.find_spec("onnx") is not None:
        from .trt_compat import assert_tensorrt_compatible

        for step in plan_sources(manifest, precision, True, components):
            assert_tensorrt_compatible(folder / step.source.file, skip_unreadable=True)
    trt = import_tensorrt("`edgefm build-engine`")
    steps = plan_sources(manifest, precision, hasattr(trt.BuilderFlag, "FP16"), components)
    gpu = current_gpu()
    if gpu is None:
        raise BackendError("building a TensorRT engine needs an NVIDIA GPU, and none is visible")
    cache_path = Path(timing_cache) if timing_cache is not None else folder / TIMING_CACHE
    cache = TimingCache.load(cache_path)
    built: list[ComponentEntry] = []
    files: dict[str, Path] = {}
    tmps: list[Path] = []
    reports: dict[str, Any] = {}
    inputs = ParityInputs(folder, manifest, threads=threads)  # references open at the first check
    try:
        for step in steps:
            src = step.source
            if progress:
                progress(f"building {src.name} ({step.precision}) from {src.file}")
            profiles = profiles_from_spec(src.spec, overrides)
            builder, network, _parser = network_from_onnx(folder / src.file, strongly_typed=not step.fp16_flag)
            pinned = pin_normalization_fp32(network, trt)
            data = engine_from_network(builder, network, profiles, n_bytes, step.fp16_flag, cache,
                                       tf32=step.precision != "fp32")
            del builder, network, _parser  # the builder's GPU memory goes before the engine runs
            tmp = folder / f".{src.name}.{step.precision}.engine.tmp-{os.getpid()}"
            tmps.append(tmp)
            tmp.write_bytes(data)
            digest = sha256_file(tmp)
            flags = (["FP16"] if step.fp16_flag else []) + (["no TF32"] if step.precision == "fp32" else [])
            info = {
                "tensorrt_version": trt.__version__, "gpu": gpu["name"],
                "compute_capability": gpu["compute_capability"],
                "profiles": profiles_to_json(profiles), "source": src.file, "source_precision": src.precision,
                "strongly_typed": not step.fp16_flag, "builder_flags": flags,
                "workspace_bytes": n_bytes, "normalization_layers_fp32": pinned,
                "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            }
            entry = ComponentEntry(src.name, f"{src.name}.{step.precision}.{digest[:8]}.engine", digest,
                                   "tensorrt", step.precision, engine_spec(src.spec, overrides), info=info)
            info["parity"] = {"checked": False}
            if parity != "skip":
                report = check_engine_file(tmp, entry, inputs, progress)
                report["gate"] = parity == "gate"
                reports[f"{src.name}.tensorrt.{step.precision}"] = report
                info["parity"] = {"checked": True, "passed": report["passed"], "reference": report["reference"]}
                if not report["passed"] and parity == "gate":
                    raise ParityError(failure_message(src.name, src.file, report))
            files[entry.file] = tmp
            built.append(entry)
        manifest.parity.update(reports)
        commit_components(folder, manifest, built, files)
        cache.save(cache_path)
    finally:  # after a failure nothing of this build stays; after success the temp files were renamed
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    return built


def add_build_engine_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``edgefm build-engine`` on an argparse subparsers object."""
    p = sub.add_parser("build-engine", help="build TensorRT engines for a bundle's components (needs a GPU)")
    p.add_argument("bundle")
    p.add_argument("--precision", default="fp16", choices=list(PRECISIONS))
    p.add_argument("--workspace", default=DEFAULT_WORKSPACE, help="builder scratch memory, e.g. 4GiB")
    p.add_argument("--max-batch", type=int, default=None, help="largest batch (dims batch/image_batch)")
    p.add_argument("--max-points", type=int, default=None, help="largest number of SAM prompt points")
    p.add_argument("--timing-cache", default=None, help=f"timing cache file (default BUNDLE/{TIMING_CACHE})")
    p.add_argument("--component", action="append", default=None, help="build only this component (repeatable)")
    p.add_argument("--no-parity-gate", action="store_true",
                   help="add engines that miss the parity policy against the ONNX anyway (recorded)")
    p.add_argument("--skip-parity", action="store_true",
                   help="do not run each engine against the ONNX on ONNX Runtime's CPU (recorded as unchecked)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of the ONNX Runtime reference runs")
    p.set_defaults(func=cmd_build_engine)
    return p


def cmd_build_engine(args: argparse.Namespace) -> None:
    parity = "skip" if args.skip_parity else "report" if args.no_parity_gate else "gate"
    entries = build_engine(args.bundle, args.precision, args.workspace, args.max_batch, args.max_points,
                           args.timing_cache, args.component,
                           progress=lambda m: print(f"edgefm: {m}", file=sys.stderr, flush=True),
                           parity=parity, threads=args.threads)
    reports = read_manifest(args.bundle).parity
    for e in entries:
        ranges = ", ".join(f"{k}=[{r.min}..{r.max}] opt {r.opt}" for k, r in e.spec.dims.items())
        print(f"wrote {Path(args.bundle) / e.file}  ({e.precision}, TensorRT {e.info['tensorrt_version']}, "
              f"{e.info['gpu']} sm {e.info['compute_capability']}; {ranges or 'static shapes'})")
        report = reports.get(f"{e.name}.tensorrt.{e.precision}")
        said = parity_summary(report, "FAILED (added with --no-parity-gate)") if report else "not checked"
        print(f"  parity: {said}")
