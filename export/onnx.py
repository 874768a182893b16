"""Export one component to ONNX from its spec, and the fp16 (mixed precision) and int8 (dynamic) rewrites.

``OnnxFromModule`` writes names and dynamic axes straight from the :class:`ComponentSpec`, so the graph,
the manifest and the runtime checks can never disagree. Models over 2 GB (SAM ViT-H) are written with their
weights in one external data file beside the graph.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from edgefm.runtime.errors import InputError, require
from edgefm.runtime.spec import ComponentSpec

# Ops kept in fp32 in fp16 graphs (DESIGN.md policy: reductions that overflow or lose precision in half).
# Softmax; the statistics of SAM's written-out LayerNorm2d (ReduceMean, and Pow, whose squares pass 65504 once
# |x - mean| > 256); Exp; Sin/Cos of the prompt encoder's large positional phases. Not LayerNormalization: its
# statistics are fp32 by the operator's definition (stash_type = 1, the default), which ONNX Runtime's CPU and
# CUDA kernels follow and the TensorRT builder pins (export/tensorrt.py), so fp16 I/O loses nothing that the
# fp16 MatMul beside it would not. Not Div or Erf: elementwise, and in fp16 GELU stays one fusable pattern.
# Casting around those cost ~100 Cast kernels per CLIP ViT-B/32 (measured on the H100: SAM's fp16 encoder
# ran slower than fp32); the parity of fp16 SAM ViT-B / CLIP ViT-B/32 exports is unchanged
# (benchmarks/results/graph_stats.md).
FP32_OPS = ["Softmax", "ReduceMean", "Pow", "Sqrt", "Exp", "Sin", "Cos"]
# Ops whose constant weights int8 graphs quantize. Conv stays fp32: ORT's ConvInteger has no fast CPU kernel
# (CLIP ViT-B/32 at batch 32 on an AVX-512 VNNI CPU: 2.56 s with the patch Conv quantized, 2.10 s without).
INT8_OPS = ["MatMul", "Gemm"]
# Recorded in the manifest entry of every int8 component (``info["quantization"]``).
INT8_INFO = {"method": "onnxruntime dynamic quantization", "ops": INT8_OPS,
             "weights": "int8, symmetric, per output channel", "activations": "uint8 per tensor, at run time"}
_TWO_GB = 2**31 - 1


def _torch():
    return require("torch", "export", "Exporting")


def _choices(values: tuple[str, ...]) -> str:
    return ", ".join(values[:-1]) + f" or {values[-1]}"


def check_options(family: str, precision: str, precisions: tuple[str, ...], opset: int,
                  attention: str = "plain", attentions: tuple[str, ...] = ("plain", "fused")) -> None:
    """The export options every family validates the same way, each refused with the flag and the choices."""
    if precision not in precisions:
        raise InputError(f"--precision {precision!r} is not supported for {family}; choose {_choices(precisions)}")
    if attention not in attentions:
        raise InputError(f"--attention {attention!r} is not supported for {family}; choose {_choices(attentions)}")
    if opset < 17:
        raise InputError(f"--opset {opset} is too old: opset 17 is needed for one-op LayerNorm")


def constant_names(graph) -> set[str]:
    """Names of a graph's constant tensors: its initializers and the outputs of its Constant nodes."""
    return {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}


def example_inputs(spec: ComponentSpec, values: dict[str, np.ndarray] | None = None, **sizes: int):
    """Torch tensors for tracing: given ``values`` or zeros at the spec's opt sizes."""
    torch = _torch()
    values = values or {}
    out = []
    for t in spec.inputs:
        a = values.get(t.name)
        if a is None:
            a = np.zeros(spec.concrete_shape(t, "opt", **sizes), dtype=t.dtype)
        out.append(torch.from_numpy(np.ascontiguousarray(a)))
    return tuple(out)


def onnx_from_module(
    module, spec: ComponentSpec, path: str | Path, inputs: tuple, opset: int = 17
) -> list[str]:
    """Export ``module`` to ``path``; returns the names of extra files written beside it."""
    torch = _torch()
    onnx = require("onnx", "export", "Exporting")
    path = Path(path)
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    before = set(path.parent.iterdir())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        # The TorchScript-based exporter: dynamic axes from the spec map 1:1 onto its arguments, and it
        # gives plain static graphs that TensorRT parses without the dynamo exporter's extra ops.
        torch.onnx.export(
            module.eval(),
            inputs,
            str(path),
            dynamo=False,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(),
            opset_version=opset,
            do_constant_folding=True,
        )
    extra: list[str] = []
    spilled = set(path.parent.iterdir()) - before - {path}
    if n_bytes > _TWO_GB or spilled:
        # The exporter wrote one file per initializer: gather them into a single data file.
        model = onnx.load(str(path))
        for p in spilled:
            p.unlink()
        data_name = path.name + ".data"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        if (path.parent / data_name).exists():  # small graphs may have no tensor above the threshold
            extra.append(data_name)
    declare_output_shapes(path, spec)
    onnx.checker.check_model(str(path))
    return extra


def declare_output_shapes(path: str | Path, spec: ComponentSpec) -> None:
    """Write the spec's output shapes into the graph: sizes where fixed, the spec's names where symbolic.

    The exporter names the output dims it cannot follow (``Reshapelow_res_masks_dim_1``), and ONNX Runtime fills
    some of them back in depending on its version and optimization level. Readers that compare shapes exactly
    (Triton's onnxruntime backend checks a config's outputs against its session's) then disagree by version.
    Declared, every reader sees the same shapes; the parity check runs the graph and compares its outputs."""
    onnx = require("onnx", "export", "Exporting")
    model = onnx.load(str(path), load_external_data=False)
    wanted = {t.name: t.shape for t in spec.outputs}
    for out in model.graph.output:
        dims = out.type.tensor_type.shape.dim
        if len(dims) != len(wanted[out.name]):
            raise InputError(f"{path}: the exporter gave output {out.name!r} rank {len(dims)}, but the spec says "
                             f"{list(wanted[out.name])}")
        for dim, size in zip(dims, wanted[out.name]):
            if isinstance(size, int):
                dim.dim_value = size
            else:
                dim.dim_param = size
    onnx.save_model(model, str(path))


def fp16_from_onnx(src: str | Path, dst: str | Path) -> list[str]:
    """Mixed precision: weights and most ops in fp16; FP32_OPS and the graph's I/O stay fp32. LayerNormalization
    runs with fp16 I/O and fp32 statistics (its ``stash_type``; set explicitly so no reader can assume fp16)."""
    onnx = require("onnx", "export", "Exporting fp16")
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = convert_float_to_float16(model, keep_io_types=True, op_block_list=FP32_OPS)
    # onnxruntime 1.31's converter can insert the same Cast twice (same input, same output name) when one
    # tensor feeds two blocked ops; ORT then refuses the graph. Keep the first of identical Casts.
    made: set[tuple] = set()
    keep = []
    for node in half.graph.node:
        if node.op_type == "LayerNormalization":
            stash = [a for a in node.attribute if a.name == "stash_type"]
            if stash:
                stash[0].i = onnx.TensorProto.FLOAT
            else:
                node.attribute.append(onnx.helper.make_attribute("stash_type", onnx.TensorProto.FLOAT))
        if node.op_type == "Cast":
            key = (tuple(node.input), tuple(node.output), tuple((a.name, a.i) for a in node.attribute))
            if key in made:
                continue
            made.add(key)
        keep.append(node)
    if len(keep) != len(half.graph.node):
        del half.graph.node[:]
        half.graph.node.extend(keep)
    return save_graph(half, dst)


def int8_from_onnx(src: str | Path, dst: str | Path) -> list[str]:
    """Dynamic int8: MatMul / Gemm weights stored as int8 (symmetric, one scale per output channel), their
    activations quantized to uint8 per tensor at run time; everything else (LayerNorm, Softmax, GELU, Conv,
    the attention's activation x activation MatMuls) stays fp32. Returns the extra files written beside
    ``dst``, as :func:`onnx_from_module` does.

    Dynamic rather than static quantization: the activation ranges are measured on each call, so there is
    no calibration data set to choose or ship, and the graph's inputs, outputs and runtime stay exactly as
    in fp32 (``DynamicQuantizeLinear`` + ``MatMulInteger``, fused by ORT into one kernel that uses VNNI
    int8 dot products where the CPU has them). No reduced range (7-bit weights): it only helps x86 CPUs
    without VNNI, whose u8 x s8 instruction can saturate pairwise sums, and costs accuracy everywhere. The
    parity gate measures on the exporting CPU, so a bundle meant for a pre-VNNI CPU is worth checking there.
    """
    onnx = require("onnx", "export", "Exporting int8")
    require("onnxruntime", "export", "Exporting int8")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    big = sum(p.stat().st_size for p in src.parent.iterdir() if p.name.startswith(src.name)) > _TWO_GB
    with tempfile.TemporaryDirectory(prefix="edgefm-int8-", dir=dst.parent) as tmp:
        out = Path(tmp) / dst.name
        # quantize_dynamic logs (on the root logger) that pre-processing is advised: shape inference and
        # fusions matter for static QDQ graphs, not for MatMul weights whose shapes are initializers.
        root, level = logging.getLogger(), logging.getLogger().level
        root.setLevel(logging.ERROR)
        # MatMuls with a stack of weight matrices (the fused SAM decoders' batched hypernetworks) stay fp32: the
        # per-channel int8 kernel takes 2-D weights only.
        graph = onnx.load(str(src), load_external_data=False).graph
        stacked = {t.name for t in graph.initializer if len(t.dims) > 2}
        keep = [n.name for n in graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in stacked]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_dynamic(src, out, op_types_to_quantize=INT8_OPS, per_channel=True, reduce_range=False,
                                 weight_type=QuantType.QInt8, use_external_data_format=big, nodes_to_exclude=keep,
                                 extra_options={"MatMulConstBOnly": True})
        finally:
            root.setLevel(level)
        # Re-saved by our own rule (one data file named after the graph, only above 2 GB) instead of the
        # quantizer's, so that every precision of a bundle lays its files out the same way.
        model = onnx.load(str(out))
    return save_graph(model, dst)


def at_precision(onnx_path: Path, precision: str, extra: list[str], workdir: Callable[[str], Path]
                 ) -> tuple[Path, list[str]]:
    """The fp32 graph ``onnx_path`` (with its ``extra`` files) rewritten to ``precision`` in the scratch folder
    ``workdir("<stem>-<precision>")`` (a :meth:`BundleWriter.workdir`): ``(graph, its extra files)``. fp32 gives
    the graph back unchanged."""
    if precision == "fp32":
        return onnx_path, extra
    rewrite = {"fp16": fp16_from_onnx, "int8": int8_from_onnx}[precision]
    dst = workdir(f"{onnx_path.stem}-{precision}") / onnx_path.name
    return dst, rewrite(onnx_path, dst)


def save_graph(model, dst: str | Path) -> list[str]:
    """Save ``model`` as one file, or with its weights in ``<name>.data`` beside it above ONNX's 2 GB."""
    onnx = require("onnx", "export", "Exporting")
    n_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    if n_bytes < _TWO_GB:
        onnx.save_model(model, str(dst))
        return []
    data_name = Path(dst).name + ".data"
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    return [data_name] if (Path(dst).parent / data_name).exists() else []
