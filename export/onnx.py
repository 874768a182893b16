"""Export one component to ONNX from its spec, and the fp16 (mixed precision) rewrite.

``OnnxFromModule`` writes names and dynamic axes straight from the :class:`ComponentSpec`, so the graph,
the manifest and the runtime checks can never disagree. Models over 2 GB (SAM ViT-H) are written with their
weights in one external data file beside the graph.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from edgefm.runtime.errors import require
from edgefm.runtime.spec import ComponentSpec

# Ops kept in fp32 in fp16 graphs: reductions that overflow or lose precision in half (DESIGN.md policy).
FP32_OPS = ["LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Erf", "Exp", "Sin", "Cos", "Div"]
_TWO_GB = 2**31 - 1


def _torch():
    return require("torch", "export", "Exporting")


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
    onnx.checker.check_model(str(path))
    return extra


def fp16_from_onnx(src: str | Path, dst: str | Path) -> list[str]:
    """Mixed precision: weights and most ops in fp16; FP32_OPS and the graph's I/O stay fp32."""
    onnx = require("onnx", "export", "Exporting fp16")
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = convert_float_to_float16(model, keep_io_types=True, op_block_list=FP32_OPS)
    # onnxruntime 1.31's converter can insert the same Cast twice (same input, same output name) when one
    # tensor feeds two blocked ops; ORT then refuses the graph. Keep the first of identical nodes.
    made: set[tuple] = set()
    keep = []
    for node in half.graph.node:
        key = (node.op_type, tuple(node.input), tuple(node.output), node.SerializeToString(deterministic=True)
               if node.op_type != "Cast" else tuple((a.name, a.i) for a in node.attribute))
        if node.op_type == "Cast" and key in made:
            continue
        made.add(key)
        keep.append(node)
    if len(keep) != len(half.graph.node):
        del half.graph.node[:]
        half.graph.node.extend(keep)
    n_bytes = sum(len(t.raw_data) for t in half.graph.initializer)
    if n_bytes < _TWO_GB:
        onnx.save_model(half, str(dst))
        return []
    data_name = Path(dst).name + ".data"
    onnx.save_model(half, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    return [data_name] if (Path(dst).parent / data_name).exists() else []
