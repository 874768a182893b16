"""The device-side mask upscaling graph (``runtime/sam/mask_upscale.py``) against the host path (OpenCV), which
is the official postprocess_masks; run here on ONNX Runtime's CPU provider, the same graph the GPU runs."""

from __future__ import annotations

import numpy as np
import pytest
from edgefm.runtime.sam.mask_upscale import GRAPH, MaskUpscaler, build
from edgefm.runtime.sam.transforms import resized_shape, upscale_masks


def test_the_shipped_graph_is_what_build_writes():
    pytest.importorskip("onnx")
    assert GRAPH.read_bytes() == build(), "run: python -m edgefm.runtime.sam.mask_upscale"


@pytest.mark.parametrize("hw", [(1500, 2250), (480, 640), (1024, 1024), (700, 300)])  # up, down, same, tall
def test_matches_the_host_upscaling(hw):
    up = MaskUpscaler([("CPUExecutionProvider", {})], "cpu")
    low = (np.random.default_rng(hw[1]).standard_normal((2, 4, 256, 256)) * 5).astype(np.float32)
    inp = resized_shape(*hw, 1024)
    for sel in (slice(1, None), slice(0, 1)):  # the three multimask outputs, or the single-mask one
        want = upscale_masks(low[:, sel], inp, hw, 1024)
        logits = up(low, sel, inp, hw, 1024, 0.0, return_logits=True)
        masks = up(low, sel, inp, hw, 1024, 0.0)
        assert logits.dtype == np.float32 and masks.dtype == bool and masks.shape == want.shape
        assert np.abs(logits - want).max() <= 1e-4 * np.abs(want).max()
        inter, union = (masks & (want > 0)).sum((2, 3)), (masks | (want > 0)).sum((2, 3))
        assert (inter / union).min() >= 0.9999
        np.testing.assert_array_equal(up(low, sel, inp, hw, 1024, 2.5), logits > 2.5)  # the threshold is used


def test_stability_scores_are_the_official_formula_on_its_logits():
    """The graph's stability output is count(logits > t + o) / count(logits > t - o) of its own logits (the
    automatic mask generator filters on it without copying logits back), NaN for a map that is all low."""
    from edgefm.runtime.sam.amg_utils import calculate_stability_score

    up = MaskUpscaler([("CPUExecutionProvider", {})], "cpu")
    low = (np.random.default_rng(3).standard_normal((2, 3, 256, 256)) * 5).astype(np.float32)
    low[1, 2] = -50.0  # nothing above either cutoff
    hw = (700, 300)
    inp = resized_shape(*hw, 1024)
    logits = up(low, slice(None), inp, hw, 1024, 0.0, return_logits=True)
    masks, stability = up(low, slice(None), inp, hw, 1024, 0.0, stability_offset=1.0)
    np.testing.assert_array_equal(masks, logits > 0)
    want = calculate_stability_score(logits, 0.0, 1.0)
    assert stability.shape == (2, 3) and np.isnan(stability[1, 2]) and np.isnan(want[1, 2])
    np.testing.assert_array_equal(stability, want)
    assert 0.5 < np.nanmin(stability) and np.nanmax(stability) < 1.0  # real fractions, not 0 or 1
