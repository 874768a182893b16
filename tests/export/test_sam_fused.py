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
    assert not [n for n in model.graph.node if n.op_type in ("Softmax", "Einsum")]  # rel-pos tables: MatMuls
    assert not [n for n in model.graph.node if n.domain == "edgefm"]
    # The token grid and the windows are constants: no Shape or Range ops compute them per run, so the
    # relative-position indices are constants too (ONNX Runtime folds their gathers when it loads the graph).
    assert not [n for n in model.graph.node if n.op_type in ("Shape", "Range")]
    info = json.loads((fused_bundle / "manifest.json").read_text())["components"][0]["info"]
    assert info["fused_attention"] == len(mha)


def test_residual_adds_are_fused_with_the_layer_norms_after_them(fused_bundle, sam_tiny):
    """Each block's two residual adds (with the projection biases before them) and the LayerNorm after each
    (norm2, the next block's norm1) are one SkipLayerNormalization, which also passes the sum on; only the
    first block's norm1 stays a LayerNormalization, and the last block ends with a plain add."""
    nodes = onnx.load(str(fused_bundle / "image_encoder.onnx")).graph.node
    skip = [n for n in nodes if n.op_type == "SkipLayerNormalization"]
    blocks = len(sam_tiny.image_encoder.blocks)
    assert len(skip) == 2 * blocks - 1 and {n.domain for n in skip} == {"com.microsoft"}
    # input, skip, gamma, beta and the bias; outputs: the normalized sum and (fourth) the sum itself
    assert all(len(n.input) == 5 and n.output[1:3] == ["", ""] and n.output[3] for n in skip)
    eps = [onnx.helper.get_attribute_value(a) for n in skip for a in n.attribute if a.name == "epsilon"]
    assert eps == pytest.approx([sam_tiny.image_encoder.blocks[0].norm1.eps] * len(skip))  # SAM's 1e-6
    norms = [n for n in nodes if n.op_type == "LayerNormalization"]
    assert len(norms) == 1 + 2  # blocks.0's norm1, and the neck's two LayerNorm2d on channels-last tensors
    assert not [n for n in nodes if n.op_type in ("ReduceMean", "Sqrt")]  # nothing spelled out
    info = json.loads((fused_bundle / "manifest.json").read_text())["components"][0]["info"]
    assert info["skip_layer_norm"] == len(skip)


def test_fused_graph_matches_the_plain_export(fused_bundle, sam_tiny_bundle):
    image = np.random.default_rng(1).standard_normal((2, 3, 256, 256)).astype(np.float32)
    plain = Bundle(sam_tiny_bundle, "ort-cpu").runner("image_encoder").run({"image": image})["image_embeddings"]
    fused = Bundle(fused_bundle, "ort-cpu").runner("image_encoder").run({"image": image})["image_embeddings"]
    assert np.abs(fused - plain).max() <= 1e-5 * max(1.0, np.abs(plain).max())


def test_unknown_attention_kind_is_refused(sam_tiny, tmp_path):
    from edgefm.export.sam import export_sam

    refused = "--attention 'flash' is not supported for SAM; choose plain, fused or fused-qk"
    with pytest.raises(InputError, match=refused):
        export_sam(sam_tiny, tmp_path / "x", "tiny", attention="flash")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("rel_pos", ["bias", "qk"])
@pytest.mark.parametrize("window", [5, 4, 0])  # 12 x 12 tokens: padded to 15, exact, global
def test_fused_block_equals_the_block_with_and_without_window_padding(window, rel_pos):
    import torch
    from edgefm.export.sam_fused import FusedBlock
    from edgefm.models.sam.image_encoder import Block

    torch.manual_seed(window)
    block = Block(32, 4, use_rel_pos=True, window_size=window, input_size=(12, 12)).eval()
    with torch.no_grad():  # the relative-position tables start at zero: give them values that count
        block.attn.rel_pos_h.normal_(0.0, 0.5)
        block.attn.rel_pos_w.normal_(0.0, 0.5)
    x = torch.randn(2, 12, 12, 32)
    with torch.no_grad():
        want, got = block(x), FusedBlock(block, rel_pos)(x)
        block.attn.rel_pos_h.zero_()
        without = block(x)
    assert float((want - without).abs().max()) > 0.1  # the relative positions matter here
    assert float((got - want).abs().max()) <= 1e-5 * max(1.0, float(want.abs().max()))


def test_relative_positions_folded_into_the_dot_product_export(sam_tiny, sam_tiny_bundle, tmp_path):
    """``attention="fused-qk"``: no bias input, scale 1 (the queries come scaled), a wider query/key head; the
    same embeddings as the plain export."""
    from edgefm.export.sam import export_sam

    path = export_sam(sam_tiny, tmp_path / "qk", "tiny", attention="fused-qk")
    model = onnx.load(str(path / "image_encoder.onnx"))
    mha = [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
    assert len(mha) == len(sam_tiny.image_encoder.blocks)
    assert all(len(n.input) == 3 and onnx.helper.get_attribute_value(
        next(a for a in n.attribute if a.name == "scale")) == 1.0 for n in mha)
    image = np.random.default_rng(1).standard_normal((2, 3, 256, 256)).astype(np.float32)
    plain = Bundle(sam_tiny_bundle, "ort-cpu").runner("image_encoder").run({"image": image})["image_embeddings"]
    folded = Bundle(path, "ort-cpu").runner("image_encoder").run({"image": image})["image_embeddings"]
    assert np.abs(folded - plain).max() <= 1e-5 * max(1.0, np.abs(plain).max())


def test_fused_decoders_match_the_plain_export(fused_bundle, sam_tiny_bundle):
    """The decoders' fused attentions (q/k/v biases added inside the operator) give the plain graphs' masks."""
    rng = np.random.default_rng(2)
    emb = rng.standard_normal((1, 32, 16, 16)).astype(np.float32)
    points = {"point_coords": rng.uniform(0, 256, (3, 3, 2)).astype(np.float32),
              "point_labels": np.array([[1, 0, -1], [2, 3, 1], [1, 1, -1]], np.float32)}
    prompts = {**points, "mask_input": rng.normal(0, 3, (3, 1, 64, 64)).astype(np.float32),
               "has_mask_input": np.array([0, 1, 0], np.float32)}
    outs = {}
    for name, folder in (("plain", sam_tiny_bundle), ("fused", fused_bundle)):
        b = Bundle(folder, "ort-cpu")
        dec = b.runner("mask_decoder").run({"image_embeddings": emb, **b.runner("prompt_encoder").run(prompts)})
        ctx = b.runner("decoder_context").run({"image_embeddings": emb})
        outs[name] = (dec, b.runner("prompt_decoder").run({**points, **ctx}))
    for plain, fused in zip(outs["plain"], outs["fused"]):
        for key in ("iou_predictions", "low_res_masks"):
            assert np.abs(fused[key] - plain[key]).max() <= 1e-5 * max(1.0, np.abs(plain[key]).max()), key
    model = onnx.load(str(fused_bundle / "mask_decoder.onnx"))
    mha = [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
    assert len(mha) == 7 and all(len(n.input) == 4 and n.input[3] for n in mha)  # the q/k/v biases inside
    # Post-norm residual adds, each with the bias before it and the norm after it, are one SkipLayerNormalization
    # without the sum output (nothing reads it): 3 in the first block (its self-attention has no residual), 4 in
    # the second, 1 after the final attention; the prompt decoder's first block keeps norm4 as add + norm (the
    # context's one image against B prompts). The mask head is channels-last: its LayerNorm2d is one
    # LayerNormalization, its ConvTranspose2d are MatMuls, its four hypernetwork MLPs one batched MatMul per layer.
    for component, fused_norms, plain_norms in (("mask_decoder", 8, 1 + 1), ("prompt_decoder", 7, 2 + 1)):
        model = onnx.load(str(fused_bundle / f"{component}.onnx"))
        nodes = model.graph.node
        skip = [n for n in nodes if n.op_type == "SkipLayerNormalization"]
        assert len(skip) == fused_norms and all(list(n.output) == [n.output[0]] for n in skip), component
        assert len([n for n in nodes if n.op_type == "LayerNormalization"]) == plain_norms, component
        assert not [n for n in nodes if n.op_type in ("ConvTranspose", "ReduceMean")], component
        assert len([n for n in nodes if n.op_type == "Gemm"]) == 3, component  # the IoU head's three layers only
        stacked = {i.name for i in model.graph.initializer if list(i.dims)[:1] == [4] and len(i.dims) == 3}
        assert len([n for n in nodes if n.op_type == "MatMul" and set(n.input) & stacked]) == 3, component


@pytest.mark.parametrize("rel_pos", ["bias", "qk"])
def test_vit_b_windows_fold_relative_positions_into_heads_padded_to_a_multiple_of_8(monkeypatch, rel_pos):
    """ViT-B's 14 x 14 windows: 196 queries, which ONNX Runtime's CUDA memory-efficient attention refuses with
    an attention bias, so both modes fold the relative positions into q·k there; the query/key heads (64 + 28)
    are zero-padded to 96, as that kernel takes multiples of 8 only. The result is unchanged."""
    import torch
    from edgefm.export import sam_fused
    from edgefm.models.sam.image_encoder import Attention

    calls, fused = [], sam_fused.fused_attention

    def spy(q, k, v, num_heads, bias=None, *args, **kwargs):
        calls.append((q.shape[-1] // num_heads, k.shape[-1] // num_heads, v.shape[-1] // num_heads, bias is None))
        return fused(q, k, v, num_heads, bias, *args, **kwargs)

    monkeypatch.setattr(sam_fused, "fused_attention", spy)
    torch.manual_seed(0)
    attn = Attention(768, 12, use_rel_pos=True, input_size=(14, 14)).eval()
    with torch.no_grad():
        attn.rel_pos_h.normal_(0.0, 0.5)
        attn.rel_pos_w.normal_(0.0, 0.5)
        x = torch.randn(2, 14, 14, 768)
        want, got = attn(x), sam_fused.FusedAttention(attn, rel_pos)(x)
    assert calls == [(96, 96, 64, True)]
    assert float((got - want).abs().max()) <= 1e-5 * max(1.0, float(want.abs().max()))


def test_int8_fused_decoders_keep_their_stacked_hypernetwork_weights_in_float(sam_tiny, tmp_path):
    """Dynamic int8 quantizes 2-D MatMul weights per channel; the fused decoders' batched hypernetwork MLPs
    ((4, in, out) weights) stay float MatMuls, and the int8 decoders pass the int8 parity gate."""
    from edgefm.export.sam import export_sam

    folder = export_sam(sam_tiny, tmp_path / "sam", "tiny", precision="int8", attention="fused")
    manifest = json.loads((folder / "manifest.json").read_text())
    for component in ("mask_decoder", "prompt_decoder"):
        entry = next(c for c in manifest["components"] if c["name"] == component)
        assert entry["precision"] == "int8" and manifest["parity"][component]["passed"]
        model = onnx.load(str(folder / entry["file"]))
        stacked = {i.name for i in model.graph.initializer if len(i.dims) == 3}
        float_mm = [n for n in model.graph.node if n.op_type == "MatMul" and set(n.input) & stacked]
        assert len(float_mm) == 3, component
        assert any(n.op_type in ("DynamicQuantizeMatMul", "MatMulInteger") for n in model.graph.node)
