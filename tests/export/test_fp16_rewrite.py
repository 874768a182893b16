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
