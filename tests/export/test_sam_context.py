"""decoder_context + prompt_decoder: the same masks as prompt_encoder + mask_decoder for prompts without a mask
input, in PyTorch and through the bundle, with the context computed once per image; old bundles still work."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import assert_scaled_close, scene
from edgefm.export.sam import MaskDecoderGraph, PromptEncoderGraph
from edgefm.export.sam_context import DecoderContextGraph, PromptDecoderGraph
from edgefm.runtime.errors import InputError
from edgefm.runtime.sam import SamPredictor


def _prompts(seed: int, b: int = 4, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Points, background points, padding and box corners, in the tiny model's 256 frame."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.rand(b, n, 2, generator=g) * 256
    labels = torch.tensor([[1, 0, -1], [2, 3, 1], [1, 1, -1], [2, 3, 0]], dtype=torch.float32)[:b, :n]
    return coords, labels


@pytest.mark.parametrize("fused", [False, True])
def test_prompt_decoder_equals_prompt_encoder_plus_mask_decoder(sam_tiny, fused):
    emb = torch.randn(1, 32, 16, 16, generator=torch.Generator().manual_seed(0))
    coords, labels = _prompts(1)
    b = coords.shape[0]
    with torch.no_grad():
        sparse, dense = PromptEncoderGraph(sam_tiny)(coords, labels, torch.zeros(b, 1, 64, 64), torch.zeros(b))
        want = MaskDecoderGraph(sam_tiny)(emb, sparse, dense)
        got = PromptDecoderGraph(sam_tiny, fused)(coords, labels, *DecoderContextGraph(sam_tiny)(emb))
    assert (want[1] > 0).float().mean().item() not in (0.0, 1.0)  # masks with both signs: the check means something
    for w, g in zip(want, got):
        assert_scaled_close(g.numpy(), w.numpy(), rel=1e-6)


def test_bundle_has_both_components_gated_with_their_specs(sam_tiny_bundle):
    manifest = json.loads((sam_tiny_bundle / "manifest.json").read_text())
    entries = {c["name"]: c for c in manifest["components"]}
    ctx, dec = entries["decoder_context"], entries["prompt_decoder"]
    assert [t["name"] for t in ctx["outputs"]] == [t["name"] for t in dec["inputs"]][2:]
    assert [t["shape"] for t in ctx["outputs"]] == [[1, 256, 32], [1, 256, 16], [1, 256, 16], [1, 256, 16]]
    assert dec["dims"] == {"batch": [1, 1, 128], "num_points": [1, 2, 32]}
    assert manifest["parity"]["prompt_decoder"]["passed"]
    assert manifest["parity"]["prompt_decoder"]["outputs"]["low_res_masks"]["mask_iou"] >= 0.999


def _counting(runner, calls: list[str]):
    run = runner.run

    def counted(feeds):
        calls.append(runner.spec.name)
        return run(feeds)

    runner.run = counted
    return runner


def test_predictor_uses_one_context_per_image_and_gives_the_three_component_masks(sam_tiny_bundle):
    fast, slow = SamPredictor(sam_tiny_bundle, "ort-cpu"), SamPredictor(sam_tiny_bundle, "ort-cpu")
    slow.prompt_decoder = None  # what a bundle without the two components does
    calls: list[str] = []
    for runner in (fast.context_encoder, fast.prompt_decoder, fast.prompt_encoder, fast.decoder):
        _counting(runner, calls)
    box = np.array([30, 20, 140, 90], np.float32)
    for seed in (1, 2):
        image = scene(120, 180, seed=seed)
        fast.set_image(image)
        slow.set_image(image)
        for points, labels, prompt_box in ((np.array([[60, 50]]), np.array([1]), None),
                                           (np.array([[60, 50], [150, 30]]), np.array([1, 0]), None),
                                           (None, None, box), (np.array([[60, 50]]), np.array([1]), box)):
            m1, s1, low1 = fast.predict(points, labels, box=prompt_box)
            m2, s2, low2 = slow.predict(points, labels, box=prompt_box)
            assert 0.02 < m2.mean() < 0.98
            assert_scaled_close(low1, low2, rel=1e-5, what="low-res logits")
            np.testing.assert_allclose(s1, s2, rtol=0, atol=1e-5)
            assert (m1 == m2).mean() > 0.9999
        pts = np.array([[[60, 50]], [[100, 70]], [[20, 100]]], np.float32)
        m1, s1, low1 = fast.predict_batch(pts, np.ones((3, 1)))
        m2, s2, low2 = slow.predict_batch(pts, np.ones((3, 1)))
        assert_scaled_close(low1, low2, rel=1e-5, what="batched low-res logits")
        # A mask prompt takes the two-component path.
        fast.predict(np.array([[60, 50]]), np.array([1]), mask_input=low1[0, :1], multimask_output=False)
    assert calls.count("decoder_context") == 2  # once per image, not per prompt
    assert calls.count("prompt_decoder") == 10
    assert calls.count("prompt_encoder") == calls.count("mask_decoder") == 2


def test_a_bundle_exported_before_the_split_still_predicts(sam_tiny_bundle, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(sam_tiny_bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["components"] = [c for c in manifest["components"]
                              if c["name"] not in ("decoder_context", "prompt_decoder")]
    (old / "manifest.json").write_text(json.dumps(manifest))
    before, now = SamPredictor(old, "ort-cpu"), SamPredictor(sam_tiny_bundle, "ort-cpu")
    assert before.prompt_decoder is None and not before.bundle.has("prompt_decoder")
    assert now.bundle.has("prompt_decoder") and not now.bundle.has("no_such_component")
    image = scene(90, 120, seed=4)
    before.set_image(image)
    now.set_image(image)
    _, s1, low1 = before.predict(np.array([[40, 30]]), np.array([1]))
    _, s2, low2 = now.predict(np.array([[40, 30]]), np.array([1]))
    assert_scaled_close(low1, low2, rel=1e-5)
    with pytest.raises(InputError, match="has no decoder_context component .* re-export it"):
        before.decoder_context()


def test_int8_prompt_decoder_keeps_the_point_coordinates_in_float(sam_tiny, tmp_path):
    """Dynamic int8 quantizes MatMul inputs to uint8; the click's Fourier features must not go through one."""
    import onnx
    from edgefm.export.sam import export_sam

    out = export_sam(sam_tiny, tmp_path / "b", "tiny", precision="int8")
    entry = next(c for c in json.loads((out / "manifest.json").read_text())["components"]
                 if c["name"] == "prompt_decoder")
    graph = onnx.load(str(out / entry["file"])).graph
    made_by = {o: n for n in graph.node for o in n.output}
    sin = next(n for n in graph.node if n.op_type == "Sin")
    seen, todo = set(), [sin.input[0]]
    while todo:  # every node between point_coords and the Sin
        node = made_by.get(todo.pop())
        if node is not None and node.name not in seen:
            seen.add(node.name)
            todo.extend(node.input)
    ops = {n.op_type for n in graph.node if n.name in seen}
    assert "Mul" in ops and not ops & {"DynamicQuantizeLinear", "MatMulInteger", "MatMul"}
    assert any(n.op_type == "MatMulInteger" or n.op_type.startswith("DynamicQuantize") for n in graph.node)
