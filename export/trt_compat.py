"""A static TensorRT-compatibility check of exported ONNX graphs, runnable where TensorRT is not installed.

``check_tensorrt_compat`` reads a graph (without its external weights) and lists what TensorRT 10.x's ONNX
parser, or edgefm's TensorRT runner, would refuse:

* operators: the default ONNX domain only, and only operators the parser imports (``SUPPORTED_OPS``);
  nodes inside ``If``/``Loop``/``Scan`` bodies and model-local functions are checked too;
* element types of graph inputs/outputs, initializers, ``value_info``, ``Cast`` targets and constants;
* graph inputs/outputs of a known rank (a shape, with named or fixed dims);
* data-dependent output shapes (``NonZero``, ``NonMaxSuppression``, ``Unique``, ``Compress``, ``Loop`` scan
  outputs with a computed trip count): edgefm's runner sizes every output from the input shapes and refuses
  an engine whose outputs it cannot size that way (``runtime/backends/tensorrt.py``);
* the cheap per-operator restrictions the parser checks statically (Resize modes, Einsum equations, extra
  training outputs, pooling dilations, ``If`` branch arity).

It is a fast CI gate, not a replacement for the parser: a graph that passes can still fail in TensorRT (a
restriction that needs shapes or values), but one that fails here would fail there or in edgefm's runner.
Imports onnx only (no torch, no TensorRT).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from edgefm.runtime.errors import BundleError, InputError
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, numpy_helper

from .onnx import constant_names

# Operators TensorRT 10.x's ONNX parser imports, read from the parser's source (onnx/onnx-tensorrt, 10.x
# line, onnxOpCheckers.cpp): every operator registered with a static checker that does not reject it
# outright, minus the parser's own ``TRT_*`` operators. docs/operators.md there is the same parser's
# human-readable support matrix (its per-type and per-attribute notes are not encoded here).
# Deliberately absent (the parser registers them only to reject them, or not at all): Bernoulli, BitShift,
# Bitwise*, Col2Im, Compress, ConcatFromSequence, ConvInteger, DFT, Det, DynamicQuantizeLinear, ImageDecoder,
# MatMulInteger, MaxRoiPool, MaxUnpool, MelWeightMatrix, Multinomial, Optional*, QLinear*, Sequence*, String*,
# TfIdfVectorizer, Unique and the training losses.
SUPPORTED_OPS = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "Attention",
    "AveragePool", "BatchNormalization", "BlackmanWindow", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Concat",
    "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "DeformConv", "DepthToSpace",
    "DequantizeLinear", "Div", "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten",
    "Floor", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalLpPool",
    "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample", "GroupNormalization", "GRU", "HammingWindow",
    "HannWindow", "Hardmax", "HardSigmoid", "HardSwish", "Identity", "If", "ImageScaler", "InstanceNormalization",
    "IsInf", "IsNaN", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LRN",
    "LSTM", "LpNormalization", "LpPool", "MatMul", "Max", "MaxPool", "Mean", "MeanVarianceNormalization", "Min",
    "Mish", "Mod", "Mul", "Neg", "NonMaxSuppression", "NonZero", "Not", "OneHot", "Or", "Pad",
    "ParametricSoftplus", "Pow", "PRelu", "QuantizeLinear", "RandomNormal", "RandomNormalLike", "RandomUniform",
    "RandomUniformLike", "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
    "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape",
    "Resize", "ReverseSequence", "RMSNormalization", "RNN", "RoiAlign", "RotaryEmbedding", "Round", "ScaledTanh",
    "Scan", "Scatter", "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh",
    "Size", "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "STFT", "Sub",
    "Sum", "Tan", "Tanh", "TensorScatter", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze",
    "Upsample", "Where", "Xor",
})
# Operators the 10.x parser gained after 10.0 (onnx-tensorrt docs/Changelog.md, TensorRT OSS CHANGELOG.md):
# checked only when the caller names the minor version it targets.
ADDED_IN_MINOR = {"DeformConv": 1, "BlackmanWindow": 4, "HammingWindow": 4, "HannWindow": 4, "STFT": 5,
                  "Attention": 14, "RMSNormalization": 15, "RotaryEmbedding": 15, "TensorScatter": 15}
MIN_OPSET = 9  # TensorRT 10.0 parses opsets 9 to 20; later 10.x minors raise the upper end.

# Output shapes that depend on input *values*. TensorRT 10 parses NonZero and NonMaxSuppression (with an
# output allocator), but edgefm's runner binds outputs sized from input shapes and refuses such engines;
# Unique and Compress the parser does not import at all. If, Loop and Scan are parsed (IIfConditional/ILoop)
# and are not flagged as such: their bodies are checked node by node, and a Loop is flagged only when it
# has scan outputs and a computed trip count (the scan outputs' length is then a value).
DATA_DEPENDENT_OPS = frozenset({"NonZero", "NonMaxSuppression", "Unique", "Compress"})

# Element types TensorRT 10 has a DataType for. FLOAT8E4M3FN and INT4 occur only as quantized weights and
# Q/DQ zero points (ModelOpt graphs); no float64, strings, complex, (u)int16, uint32/64.
TRT_DTYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT32,
                        TensorProto.INT64, TensorProto.INT8, TensorProto.UINT8, TensorProto.BOOL,
                        TensorProto.FLOAT8E4M3FN, TensorProto.INT4})
# Graph inputs/outputs additionally need a numpy twin: edgefm's runner binds them as numpy arrays.
IO_DTYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT32, TensorProto.INT64,
                       TensorProto.INT8, TensorProto.UINT8, TensorProto.BOOL})

_RESIZE_MODES = ("nearest", "linear", "cubic")
_RESIZE_TRANSFORMS = ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners")
_EINSUM_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz,->. ")
_SINGLE_OUTPUT = ("MaxPool", "BatchNormalization", "LayerNormalization")  # the rest are training artifacts
_POOLS = ("AveragePool", "MaxPool", "LpPool")


@dataclass(frozen=True)
class Violation:
    """One reason a graph would not build: a node (``op_type``/``domain`` set) or a tensor (``op_type`` "")."""

    node: str
    op_type: str
    domain: str
    reason: str

    @property
    def op(self) -> str:
        """The operator as written in messages: ``MatMul``, ``com.microsoft.MultiHeadAttention``."""
        return f"{self.domain}.{self.op_type}" if self.domain not in ("", "ai.onnx") else self.op_type

    def __str__(self) -> str:
        if not self.op_type:
            return f"{self.node}: {self.reason}" if self.node else self.reason
        return f"{self.op} node {self.node!r}: {self.reason}"


def _dtype(t: int) -> str:
    return TensorProto.DataType.Name(t) if t in TensorProto.DataType.values() else str(t)


def _attrs(node: NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute
            if a.type not in (AttributeProto.GRAPH, AttributeProto.GRAPHS)}


def _text(value: object, default: str) -> str:
    return value.decode() if isinstance(value, bytes) else (default if value is None else str(value))


def _restrictions(node: NodeProto, opset: int) -> list[str]:
    """The parser's cheap static checks of one node (onnxOpCheckers.cpp), as reasons."""
    op, a, out = node.op_type, _attrs(node), []
    if op == "Resize":
        mode = _text(a.get("mode"), "nearest")
        ctm = _text(a.get("coordinate_transformation_mode"), "half_pixel")
        if mode not in _RESIZE_MODES:
            out.append(f"Resize mode {mode!r} is not supported (TensorRT takes {', '.join(_RESIZE_MODES)})")
        if opset >= 11 and ctm not in _RESIZE_TRANSFORMS:
            out.append(f"Resize coordinate_transformation_mode {ctm!r} is not supported "
                       f"(TensorRT takes {', '.join(_RESIZE_TRANSFORMS)})")
        if ctm == "tf_half_pixel_for_nn" and _text(a.get("nearest_mode"), "round_prefer_floor") != "round_prefer_floor":
            out.append("Resize with tf_half_pixel_for_nn needs nearest_mode 'round_prefer_floor'")
        if a.get("antialias", 0):
            out.append("Resize antialias=1 is not supported")
        if _text(a.get("keep_aspect_ratio_policy"), "stretch") != "stretch":
            out.append("Resize keep_aspect_ratio_policy must be 'stretch'")
    elif op == "Einsum":
        bad = sorted(set(_text(a.get("equation"), "")) - _EINSUM_CHARS)
        if bad:
            out.append(f"Einsum equation {_text(a.get('equation'), '')!r} uses {''.join(bad)!r}; TensorRT takes "
                       "lower-case subscripts only")
    elif op == "Cast" and a.get("to") not in TRT_DTYPES:
        out.append(f"Cast to {_dtype(a.get('to', 0))}, a type TensorRT has no DataType for")
    elif op == "If":
        branches = {g.name: len(g.g.output) for g in node.attribute if g.type == AttributeProto.GRAPH}
        if len(set(branches.values())) > 1:
            out.append(f"If branches have different numbers of outputs {branches}")
    if op in _SINGLE_OUTPUT and any(node.output[1:]):
        out.append(f"{op} outputs beyond the first (training statistics/indices) are not supported")
    if op == "BatchNormalization" and a.get("training_mode", 0):
        out.append("BatchNormalization training_mode=1 is not supported")
    if op in _POOLS and any(d != 1 for d in a.get("dilations", [])):
        out.append(f"{op} dilations {list(a['dilations'])} are not supported (only 1)")
    return out


class _Walker:
    """Collects violations over a graph, its subgraphs and the model-local functions they call."""

    def __init__(self, model: ModelProto, trt_minor: int | None) -> None:
        self.functions = {(f.domain, f.name): f for f in model.functions}
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.trt_minor = trt_minor
        self.found: list[Violation] = []
        self._called: list[tuple[str, str]] = []
        self.values: dict[str, TensorProto] = {}  # initializers and Constant values, for the Q/DQ checks

    def tensor(self, where: str, name: str, elem_type: int, io: bool = False) -> None:
        if elem_type == TensorProto.UNDEFINED and not io:
            return  # value_info without a type says nothing
        if elem_type not in TRT_DTYPES:
            self.found.append(Violation(name, "", "", f"{where} has element type {_dtype(elem_type)}, which "
                                        "TensorRT has no DataType for"))
        elif io and elem_type not in IO_DTYPES:
            self.found.append(Violation(name, "", "", f"{where} has element type {_dtype(elem_type)}, which "
                                        "edgefm's TensorRT runner cannot bind (no numpy type)"))

    def graph(self, g: GraphProto, prefix: str = "", outer: frozenset[str] = frozenset()) -> None:
        for init in g.initializer:
            self.tensor("initializer", prefix + init.name, init.data_type)
        for vi in g.value_info:
            if vi.type.HasField("tensor_type"):
                self.tensor("value_info", prefix + vi.name, vi.type.tensor_type.elem_type)
        local = constant_names(g)
        self.values.update({i.name: i for i in g.initializer})
        self.values.update({n.output[0]: a.t for n in g.node if n.op_type == "Constant"
                            for a in n.attribute if a.type == AttributeProto.TENSOR})
        constants = outer | local
        for i, node in enumerate(g.node):
            self.node(node, prefix + (node.name or f"#{i}"), constants)

    def node(self, node: NodeProto, name: str, constants: frozenset[str]) -> None:
        op, domain = node.op_type, node.domain
        add = self.found.append
        if domain not in ("", "ai.onnx"):
            if (domain, op) in self.functions:
                if (domain, op) not in self._called:
                    self._called.append((domain, op))
                return
            add(Violation(name, op, domain, f"operator of domain {domain}, not the ONNX domain: TensorRT's "
                          "parser would only look for a plugin of that name, and edgefm ships none"))
            return
        if op in DATA_DEPENDENT_OPS:
            parsed = "" if op in SUPPORTED_OPS else " (and TensorRT's ONNX parser does not import it)"
            add(Violation(name, op, domain, "data-dependent output shape: it depends on input values, not "
                          f"shapes, and edgefm engines need outputs sized from input shapes{parsed}"))
            return
        if op not in SUPPORTED_OPS:
            add(Violation(name, op, domain, "not supported by TensorRT 10's ONNX parser"))
            return
        if self.trt_minor is not None and self.trt_minor < ADDED_IN_MINOR.get(op, 0):
            add(Violation(name, op, domain, f"imported by TensorRT's parser only since 10.{ADDED_IN_MINOR[op]}"))
        if op == "Loop":
            n_carried = max(len(node.input) - 2, 0)
            trip = node.input[0] if node.input else ""
            if len(node.output) > n_carried and trip not in constants:
                add(Violation(name, op, domain, "data-dependent output shape: its scan outputs are as long as a "
                              "trip count computed at run time"))
        for reason in _restrictions(node, self.opset) + self.qdq(node, constants):
            add(Violation(name, op, domain, reason))
        if op == "Constant":
            for a in node.attribute:
                if a.type == AttributeProto.TENSOR:
                    self.tensor("Constant value", name, a.t.data_type)
                elif a.name in ("sparse_value", "value_string", "value_strings"):
                    add(Violation(name, op, domain, f"Constant {a.name} is not supported"))
        for a in node.attribute:
            subgraphs = [a.g] if a.type == AttributeProto.GRAPH else list(a.graphs)
            for sub in subgraphs:
                self.graph(sub, f"{name} > {a.name} > ", constants)  # subgraphs see the outer scope

    def qdq(self, node: NodeProto, constants: frozenset[str]) -> list[str]:
        """TensorRT's explicit quantization rules: symmetric signed quantization (zero point 0, int8 / fp8 /
        int4), scales known at build time, per-channel scales on constant weights only, no int32 (bias)
        dequantization."""
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            return []
        x, scale, zero = (list(node.input) + ["", ""])[:3]
        out = []
        if scale not in constants:
            out.append(f"its scale {scale!r} is computed at run time; TensorRT needs int8 scales at build time")
        elif x not in constants and scale in self.values and int(np.prod(self.values[scale].dims)) > 1:
            out.append("per-channel scale on an activation: TensorRT quantizes activations per tensor "
                       "(per-channel scales are for constant weights)")
        if node.op_type == "DequantizeLinear" and x in self.values and self.values[x].data_type == TensorProto.INT32:
            return out + ["dequantizes an int32 tensor (a quantized bias): TensorRT dequantizes int8, fp8 and int4 "
                          "only; keep biases in floating point (onnxruntime's QuantizeBias=False)"]
        if zero:
            z = self.values.get(zero)
            if z is None:
                out.append(f"its zero point {zero!r} is computed at run time; TensorRT needs a constant 0")
            elif z.data_type not in (TensorProto.INT8, TensorProto.FLOAT8E4M3FN, TensorProto.INT4):
                out.append(f"zero point of type {_dtype(z.data_type)}: TensorRT's quantized types are signed "
                           "(int8, fp8, int4), so quantize symmetrically to int8")
            elif z.data_location != TensorProto.EXTERNAL and np.any(numpy_helper.to_array(z)):
                out.append("non-zero zero point: TensorRT quantizes symmetrically (zero point 0)")
        return out

    def functions_called(self) -> None:
        done = 0
        while done < len(self._called):  # a function may call others; each body is checked once
            f = self.functions[self._called[done]]
            done += 1
            for i, node in enumerate(f.node):
                self.node(node, f"function {f.domain}.{f.name} > {node.name or f'#{i}'}", frozenset())


def load_graph(path_or_model: str | Path | ModelProto) -> ModelProto:
    """The model at a path, without its external weights (only their types and shapes are needed)."""
    if isinstance(path_or_model, ModelProto):
        return path_or_model
    path = Path(path_or_model)
    if not path.is_file():
        raise BundleError(f"{path} does not exist; re-export the bundle")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError and friends: the protobuf is not an ONNX model
        raise BundleError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc}); "
                          "re-export the component") from exc


def check_tensorrt_compat(path_or_model: str | Path | ModelProto, trt_major: int = 10,
                          trt_minor: int | None = None) -> list[Violation]:
    """Every reason the graph would not build into a TensorRT ``trt_major``.x engine edgefm can run.

    ``trt_minor`` (e.g. 3 for a TensorRT 10.3 install) also flags operators the parser gained after that
    minor version; ``None`` accepts everything the newest 10.x parser imports. Returns ``[]`` for a compatible
    graph; the order follows the graph (tensors, then nodes depth-first).
    """
    if trt_major != 10:
        raise InputError(f"trt_major={trt_major}: only TensorRT 10.x's ONNX operator list is encoded "
                         "(export/trt_compat.py SUPPORTED_OPS); check against 10")
    model = load_graph(path_or_model)
    walk = _Walker(model, trt_minor)
    found = walk.found
    if walk.opset and walk.opset < MIN_OPSET:
        found.append(Violation("", "", "", f"ONNX opset {walk.opset} is older than {MIN_OPSET}, the oldest "
                               "TensorRT 10 parses; re-export with a newer opset"))
    for role, values in (("graph input", model.graph.input), ("graph output", model.graph.output)):
        for v in values:
            if not v.type.HasField("tensor_type"):
                found.append(Violation(v.name, "", "", f"{role} is not a tensor ({v.type.WhichOneof('value')})"))
                continue
            walk.tensor(role, v.name, v.type.tensor_type.elem_type, io=True)
            if not v.type.tensor_type.HasField("shape"):
                found.append(Violation(v.name, "", "", f"{role} has no shape (unknown rank); TensorRT needs "
                                       "the rank of every input and output"))
    walk.graph(model.graph)
    walk.functions_called()
    return found


def describe(violations: list[Violation], limit: int = 6) -> str:
    """Violations grouped by operator and reason, with counts and one example node each, at most ``limit``."""
    groups: Counter[tuple[str, str, str]] = Counter()
    first: dict[tuple[str, str, str], Violation] = {}
    for v in violations:
        key = (v.domain, v.op_type, v.reason if v.op_type else str(v))
        groups[key] += 1
        first.setdefault(key, v)
    parts = []
    for key, n in list(groups.items())[:limit]:
        v = first[key]
        if v.op_type:
            parts.append(f"{n} x {v.op} (e.g. node {v.node!r}): {v.reason}")
        else:
            parts.append(str(v))
    more = len(groups) - limit
    return "; ".join(parts) + (f"; and {more} more kind(s)" if more > 0 else "")


def assert_tensorrt_compatible(path: str | Path | ModelProto, trt_major: int = 10, trt_minor: int | None = None,
                               skip_unreadable: bool = False) -> None:
    """Raise :class:`BundleError` with one paragraph listing what keeps ``path`` from TensorRT.

    ``skip_unreadable`` leaves a file that is not an ONNX protobuf to TensorRT's parser (whose errors name it).
    """
    try:
        found = check_tensorrt_compat(path, trt_major, trt_minor)
    except BundleError:
        if skip_unreadable:
            return
        raise
    if not found:
        return
    what = "the ONNX model" if isinstance(path, ModelProto) else str(path)
    hint = ""
    if any(v.domain == "com.microsoft" for v in found):
        hint = ("com.microsoft operators are ONNX Runtime's own: re-export a SAM or CLIP bundle made with "
                "--attention fused with --attention plain (the default). ")
    raise BundleError(
        f"{what} cannot become a TensorRT {trt_major}.x engine: {len(found)} problem(s) found by edgefm's static "
        f"check against the rules of TensorRT's ONNX parser (export/trt_compat.py; TensorRT itself was not run): "
        f"{describe(found)}. {hint}To fix: re-export the component without them (opset 17 or newer, fp32/fp16 "
        "tensors, output shapes that follow from input shapes), or run it with onnxruntime "
        "(--backend ort-cuda or ort-cpu) instead of building an engine.")
