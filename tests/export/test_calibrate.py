"""The streaming |x| histogram behind ``edgefm quantize``: bounded size, and thresholds within one bin of the
exact percentile of everything it was fed, whatever order the ranges arrive in."""

from __future__ import annotations

import numpy as np
import pytest
from edgefm.export.calibrate import BINS, AbsHistogram, activation_products, activations_to_calibrate


@pytest.mark.parametrize("scales", [(1e-3, 1.0, 50.0), (50.0, 1.0, 1e-3), (0.0, 2.0, 2.0)])
def test_threshold_matches_the_exact_percentile(scales):
    rng = np.random.default_rng(0)
    batches = [rng.standard_t(3, 200_000).astype(np.float32) * s for s in scales]  # heavy tails, as activations
    h = AbsHistogram()
    for b in batches:
        h.add(b)
    everything = np.abs(np.concatenate(batches))
    assert len(h.counts) == BINS and int(h.counts.sum()) == everything.size
    assert h.amax == float(everything.max())
    exact = float(np.percentile(everything, 99.999))
    assert abs(h.threshold() - exact) <= h.top / BINS  # one bin
    assert h.threshold(100.0) == h.amax


def test_empty_and_zero_tensors():
    h = AbsHistogram()
    h.add(np.zeros((0,), np.float32))
    assert h.threshold() == 0.0
    h.add(np.zeros((4, 4), np.float32))
    assert h.threshold() == 0.0 and h.top == 1.0


def test_which_activations_are_calibrated():
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], [0.0] * 16)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="stem"),
             helper.make_node("MatMul", ["c", "w"], ["m"], name="linear"),
             helper.make_node("MatMul", ["m", "c"], ["p"], name="product"),
             helper.make_node("Gemm", ["m", "w"], ["g"], name="gemm"),
             helper.make_node("Relu", ["g"], ["y"], name="relu")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])], initializer=[w])
    assert activations_to_calibrate(g, ["MatMul", "Gemm", "Conv"], ["stem"]) == ["c", "m"]
    assert activation_products(g, ["MatMul", "Gemm", "Conv"]) == ["product"]
