"""``export_sam(attention="fused")``: SAM's encoder and decoder attention as ONNX Runtime's MultiHeadAttention.

The fused graph must compute what the plain one does (the GPU speed comes from the operator, not from
different math): checked against the original PyTorch encoder and the plain export on the CPU provider.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from edgefm.runtime.bundle import Bundle
from edgefm.runtime.errors import InputError


@pytest.fixture(scope="module")
def fused_bundle(sam_tiny, tmp_path_factory):
    from edgefm.export.sam import export_sam

    return export_sam(sam_tiny, tmp_path_factory.mktemp("fused") / "sam", "tiny", attention="fused")


def test_fused_wrapper_equals_the_encoder_in_pytorch(sam_tiny):
    import torch
    from edgefm.export.sam_fused import with_fused_attention

    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 256, 256)).astype(np.float32))
    with torch.no_grad():
        want = sam_tiny.image_encoder(x)
        got = with_fused_attention(sam_tiny.image_encoder)(x)
    assert float((got - want).abs().max()) <= 1e-5 * max(1.0, float(want.abs().max()))
    # The original model is untouched: its blocks still hold the plain attention.
    assert all(type(b.attn).__name__ == "Attention" for b in sam_tiny.image_encoder.blocks)


def test_every_block_becomes_one_multihead_attention_node(fused_bundle, sam_tiny):
    model = onnx.load(str(fused_bundle / "image_encoder.onnx"))
    mha = [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
    assert len(mha) == len(sam_tiny.image_encoder.blocks)
    assert {n.domain for n in mha} == {"com.microsoft"}
    assert all(list(n.input)[3:5] == ["", ""] and n.input[5] for n in mha)  # attention_bias is input 5
    assert not [n for n in model.graph.node if n.op_type == "Softmax"]
    assert not [n for n in model.graph.node if n.domain == "edgefm"]
    # The token grid and the windows are constants: no Shape or Range ops compute them per run, so the
    # relative-position indices are constants too (ONNX Runtime folds their gathers when it loads the graph).
    assert not [n for n in model.graph.node if n.op_type in ("Shape", "Range")]
    info = json.loads((fused_bundle / "manifest.json").read_text())["components"][0]["info"]
    assert info["fused_attention"] == len(mha)


def test_fused_graph_matches_the_plain_export(fused_bundle, sam_tiny_bundle):
    image = np.random.default_rng(1).standard_normal((2, 3, 256, 256)).astype(np.float32)
    plain = Bundle(sam_tiny_bundle, "ort-cpu").runner("image_encoder").run({"image": image})["image_embeddings"]
    fused = Bundle(fused_bundle, "ort-cpu").runner("image_encoder").run({"image": image})["image_embeddings"]
    assert np.abs(fused - plain).max() <= 1e-5 * max(1.0, np.abs(plain).max())


def test_unknown_attention_kind_is_refused(sam_tiny, tmp_path):
    from edgefm.export.sam import export_sam

    with pytest.raises(InputError, match="--attention 'flash' is not supported; choose plain or fused"):
        export_sam(sam_tiny, tmp_path / "x", "tiny", attention="flash")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("window", [5, 4, 0])  # 12 x 12 tokens: padded to 15, exact, global
def test_fused_block_equals_the_block_with_and_without_window_padding(window):
    import torch
    from edgefm.export.sam_fused import FusedBlock
    from edgefm.models.sam.image_encoder import Block

    torch.manual_seed(window)
    block = Block(32, 4, use_rel_pos=True, rel_pos_zero_init=False, window_size=window, input_size=(12, 12)).eval()
    x = torch.randn(2, 12, 12, 32)
    with torch.no_grad():
        want, got = block(x), FusedBlock(block)(x)
    assert float((got - want).abs().max()) <= 1e-5 * max(1.0, float(want.abs().max()))


def test_decoder_attentions_become_multihead_attention_nodes(fused_bundle, sam_tiny):
    model = onnx.load(str(fused_bundle / "mask_decoder.onnx"))
    ops = [n.op_type for n in model.graph.node]
    layers = len(sam_tiny.mask_decoder.transformer.layers)
    assert ops.count("MultiHeadAttention") == 3 * layers + 1  # self, token->image, image->token; final
    assert "Softmax" not in ops
    info = json.loads((fused_bundle / "manifest.json").read_text())["components"][2]
    assert info["name"] == "mask_decoder" and info["info"]["fused_attention"] == 3 * layers + 1
    # The original decoder is untouched.
    assert type(sam_tiny.mask_decoder.transformer.final_attn_token_to_image).__name__ == "Attention"


def test_fused_decoder_matches_the_plain_one_for_every_prompt_count(fused_bundle, sam_tiny_bundle):
    from edgefm.runtime.sam import SamPredictor

    image = np.random.default_rng(3).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    plain, fused = SamPredictor(Bundle(sam_tiny_bundle, "ort-cpu")), SamPredictor(Bundle(fused_bundle, "ort-cpu"))
    plain.set_image(image)
    fused.set_image(image)
    for points in ([[150, 100]], [[150, 100], [40, 30], [280, 190]]):
        labels = [1] + [0] * (len(points) - 1)
        m1, s1, l1 = plain.predict(np.array(points, np.float32), np.array(labels))
        m2, s2, l2 = fused.predict(np.array(points, np.float32), np.array(labels))
        assert np.abs(l2 - l1).max() <= 1e-4 * max(1.0, np.abs(l1).max())
        assert np.abs(s2 - s1).max() <= 1e-4
        inter, union = (m1 & m2).sum((1, 2)), (m1 | m2).sum((1, 2))
        assert (inter / np.maximum(union, 1)).min() >= 0.999
