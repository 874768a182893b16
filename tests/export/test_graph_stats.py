"""``benchmarks/graph_stats.py``: the operator counts quoted for the fused graphs and the fp16 policy."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import onnx
import pytest
from clip_fixtures import tiny_bundle, tiny_pair
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def graph_stats():
    spec = importlib.util.spec_from_file_location("graph_stats", ROOT / "benchmarks" / "graph_stats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_only_casts_that_change_the_dtype_count(graph_stats):
    nodes = [helper.make_node("Cast", ["x"], ["a"], to=TensorProto.FLOAT),  # a no-op: ORT removes it
             helper.make_node("Cast", ["a"], ["b"], to=TensorProto.FLOAT16),
             helper.make_node("Cast", ["b"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph))
    assert graph_stats._real_casts(model) == 2


def test_fused_clip_has_fewer_nodes_and_no_head_split_shapes(graph_stats):
    model, _ = tiny_pair("tiny-vit")
    layers = len(model.visual.transformer.resblocks)
    plain = graph_stats.component_stats(tiny_bundle("tiny-vit") / "image_encoder.onnx", "fp32")
    fused = graph_stats.component_stats(tiny_bundle("tiny-vit", attention="fused") / "image_encoder.onnx", "fp32")
    assert (plain["attention_nodes"], fused["attention_nodes"]) == (0, layers)
    assert fused["optimized_nodes"] < 0.5 * plain["optimized_nodes"]
    assert plain["optimized_shape_ops"] >= layers and fused["optimized_shape_ops"] <= 3
    half = graph_stats.component_stats(tiny_bundle("tiny-vit", "fp16", attention="fused") / "image_encoder.onnx",
                                       "fp16")
    assert half["dtype_casts"] == 2  # the fp32 input and output only: LayerNorm and GELU run in half
