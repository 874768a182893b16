"""fp16_from_onnx repairs what onnxruntime 1.31's float16 converter got wrong (seen on the H100 machine):
the same Cast inserted twice when one tensor feeds two fp32-kept ops, which ORT refuses to load."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper


def _model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    nodes = [helper.make_node("Sub", ["x", "x"], ["d"], name="sub"),
             helper.make_node("Pow", ["d", "two"], ["p"], name="pow"),
             helper.make_node("Add", ["p", "d"], ["y"], name="add")]
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=[two])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_duplicate_casts_from_the_converter_are_dropped(tmp_path, monkeypatch):
    import onnxruntime.transformers.float16 as f16
    from edgefm.export.onnx import fp16_from_onnx

    real = f16.convert_float_to_float16

    def buggy(model, **kwargs):  # what 1.31 produced: a second, identical Cast of the same tensor
        half = real(model, **kwargs)
        cast = next(n for n in half.graph.node if n.op_type == "Cast")
        half.graph.node.insert(len(half.graph.node) - 1, onnx.NodeProto.FromString(cast.SerializeToString()))
        return half

    monkeypatch.setattr(f16, "convert_float_to_float16", buggy)
    src, dst = tmp_path / "m.onnx", tmp_path / "h.onnx"
    onnx.save_model(_model(), str(src))
    broken = buggy(onnx.load(str(src)), keep_io_types=True)
    outputs = [o for n in broken.graph.node for o in n.output]
    assert len(outputs) != len(set(outputs))  # the stand-in reproduces the duplicate definition
    with pytest.raises(Exception, match="invalid model"):
        ort.InferenceSession(broken.SerializeToString(), providers=["CPUExecutionProvider"])
    fp16_from_onnx(src, dst)
    fixed = onnx.load(str(dst))
    outputs = [o for n in fixed.graph.node for o in n.output]
    assert len(outputs) == len(set(outputs))
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    got = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, np.zeros((2, 3), np.float32))


def test_fp16_policy_layernorm_in_half_with_fp32_statistics_softmax_in_fp32(tmp_path):
    """LayerNormalization keeps fp16 I/O (no Casts around it) with stash_type = 1, so its statistics stay fp32
    even for inputs whose squares overflow half; Softmax stays fp32; Div/Erf (GELU) run in half."""
    from edgefm.export.onnx import fp16_from_onnx
    from onnx import numpy_helper

    d = 64
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.ones(d, np.float32), "g"),
             numpy_helper.from_array(np.zeros(d, np.float32), "b"),
             numpy_helper.from_array((rng.standard_normal((d, d)) / 8).astype(np.float32), "w"),
             numpy_helper.from_array(np.float32(2**0.5), "r2"), numpy_helper.from_array(np.float32(1.0), "one")]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], axis=-1, epsilon=1e-5),
             helper.make_node("MatMul", ["n", "w"], ["m"]),
             helper.make_node("Div", ["m", "r2"], ["s"]), helper.make_node("Erf", ["s"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["m", "e1"], ["gelu"]),
             helper.make_node("Softmax", ["gelu"], ["y"], axis=-1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, d])], inits)
    src, dst = tmp_path / "m.onnx", tmp_path / "h.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    fp16_from_onnx(src, dst)
    half = onnx.load(str(dst))
    producers = {o: n for n in half.graph.node for o in n.output}
    consumers = {i: n for n in half.graph.node for i in n.input}
    ln = next(n for n in half.graph.node if n.op_type == "LayerNormalization")
    assert {a.name: a.i for a in ln.attribute}["stash_type"] == TensorProto.FLOAT
    assert producers[ln.input[0]].op_type == "Cast" and ln.input[0] != "x"  # only the graph's fp32 input
    assert consumers[ln.output[0]].op_type == "MatMul"  # straight into the fp16 MatMul, no Cast between
    for op in ("Div", "Erf"):
        node = next(n for n in half.graph.node if n.op_type == op)
        assert producers.get(node.input[0]) is None or producers[node.input[0]].op_type != "Cast", op
    soft = next(n for n in half.graph.node if n.op_type == "Softmax")
    cast_in = producers[soft.input[0]]
    assert cast_in.op_type == "Cast" and {a.name: a.i for a in cast_in.attribute}["to"] == TensorProto.FLOAT
    # Inputs around 2000 with spread 300: sum(x^2) passes fp16's 65504 many times over.
    x = (rng.standard_normal((4, d)) * 300 + 2000).astype(np.float32)
    got = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.isfinite(got).all()
    cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cos.min() >= 0.999 and np.abs(got - want).max() <= 1e-2 * np.abs(want).max()
