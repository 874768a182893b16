"""``export_clip(attention="fused")``: every transformer block's attention as ONNX Runtime's MultiHeadAttention.

The fused graphs must compute what the plain ones do (the speed comes from fewer, larger kernels, not from
different math): checked against PyTorch and the plain export on the CPU provider, at several batch sizes and
token lengths (the text encoder's causal mask becomes the operator's attention bias, built from the length).
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("onnxruntime")
from clip_fixtures import tiny_bundle, tiny_pair  # noqa: E402
from edgefm.runtime.bundle import Bundle  # noqa: E402
from edgefm.runtime.clip.tokenizer import ClipTokenizer  # noqa: E402
from edgefm.runtime.errors import InputError  # noqa: E402

PROMPTS = ["a photo of a cat", "", "a red circle on a blue square", "word " * 100]


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_each_block_is_one_node_and_the_head_split_is_gone():
    model, _ = tiny_pair("tiny-vit")
    fused, plain = tiny_bundle("tiny-vit", attention="fused"), tiny_bundle("tiny-vit")
    layers = {"image_encoder": len(model.visual.transformer.resblocks),
              "text_encoder": len(model.transformer.resblocks)}
    manifest = json.loads((fused / "manifest.json").read_text())
    for comp in manifest["components"]:
        ops, before = _ops(fused / comp["file"]), _ops(plain / comp["file"])
        assert ops["MultiHeadAttention"] == layers[comp["name"]] == comp["info"]["fused_attention"]
        assert ops["Softmax"] == 0 and before["Softmax"] == layers[comp["name"]]
        # The plain graph splits heads with Reshapes whose shapes come from Shape ops at run time; the fused
        # graph has none of that per block.
        assert ops["Reshape"] + ops["Transpose"] < 0.2 * (before["Reshape"] + before["Transpose"])
        nodes = onnx.load(str(fused / comp["file"])).graph.node
        assert not [n for n in nodes if n.domain == "edgefm"]
        # q, k, v and the projection bias; the text encoder's causal mask is the operator's own (no bias tensor,
        # so ONNX Runtime's CUDA flash attention may run it), the image encoder has none.
        mha = [n for n in nodes if n.op_type == "MultiHeadAttention"]
        causal = {onnx.helper.get_attribute_value(a) for n in mha for a in n.attribute if a.name == "unidirectional"}
        assert all(len(n.input) == 4 for n in mha) and causal == ({1} if comp["name"] == "text_encoder" else set())
        # Every residual add, with the projection bias before it and the LayerNorm after it (ln_2, the next
        # block's ln_1, or ln_post / ln_final after the last block), is one SkipLayerNormalization.
        assert ops["SkipLayerNormalization"] == 2 * layers[comp["name"]] == comp["info"]["skip_layer_norm"]
        outside = 2 if comp["name"] == "image_encoder" else 1  # ln_pre and ln_post; ln_final
        assert before["LayerNormalization"] == 2 * layers[comp["name"]] + outside
        assert ops["LayerNormalization"] == outside  # ln_pre (image) and blocks.0's ln_1


def test_graphs_can_be_captured_whole_in_a_cuda_graph():
    """ONNX Runtime refuses to capture a session with a control-flow node (If, Loop, Scan) in a CUDA graph; the
    text encoder's EOT pooling used to squeeze inside an If. The fused image encoder computes no shape at all
    (the class token is a Pad whose position row carries it), so nothing of it runs on the host."""
    for attention in ("plain", "fused"):
        folder = tiny_bundle("tiny-vit", attention=attention)
        for comp in ("image_encoder", "text_encoder"):
            ops = _ops(folder / f"{comp}.onnx")
            assert not ops.keys() & {"If", "Loop", "Scan"}, (attention, comp)
    assert _ops(tiny_bundle("tiny-vit", attention="fused") / "image_encoder.onnx")["Shape"] == 0


def test_fused_graphs_match_pytorch_and_the_plain_export():
    model, _ = tiny_pair("tiny-vit")
    fused = Bundle(tiny_bundle("tiny-vit", attention="fused"), backend="ort-cpu")
    plain = Bundle(tiny_bundle("tiny-vit"), backend="ort-cpu")
    s = model.config.image_size
    for batch in (1, 3):
        images = np.random.default_rng(batch).normal(0, 1, (batch, 3, s, s)).astype(np.float32)
        got = fused.runner("image_encoder").run({"image": images})["image_embeds"]
        with torch.no_grad():
            ref = model.encode_image(torch.from_numpy(images)).numpy()
        assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
        want = plain.runner("image_encoder").run({"image": images})["image_embeds"]
        assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())
    tokens = ClipTokenizer()(PROMPTS)
    for length in (77, 9, 1):  # causal at every runtime length (the operator's own masking)
        t = np.ascontiguousarray(tokens[:, :length])
        got = fused.runner("text_encoder").run({"tokens": t})["text_embeds"]
        with torch.no_grad():
            ref = model.encode_text(torch.from_numpy(t)).numpy()
        assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max()), length


def test_fused_fp16_keeps_the_fp16_policy():
    model, _ = tiny_pair("tiny-vit")
    path = tiny_bundle("tiny-vit", "fp16", attention="fused")
    parity = json.loads((path / "manifest.json").read_text())["parity"]
    for name in ("image_encoder", "text_encoder"):
        cos = next(iter(parity[name]["outputs"].values()))["cosine"]
        assert parity[name]["passed"] and cos >= 0.999, (name, cos)
    assert _ops(path / "image_encoder.onnx")["MultiHeadAttention"] == len(model.visual.transformer.resblocks)


def test_unknown_attention_kind_is_refused(tmp_path):
    from edgefm.export.clip import export_clip

    with pytest.raises(InputError, match="--attention 'flash' is not supported for CLIP; choose plain or fused"):
        export_clip(tiny_pair("tiny-vit")[0], tmp_path / "x", attention="flash")
    assert not (tmp_path / "x").exists()


def test_cli_refuses_fused_attention_for_dalle(tmp_path, capsys):
    from edgefm.runtime.cli import main

    assert main(["export", "dalle", "--out", str(tmp_path / "d"), "--attention", "fused"]) == 2
    err = capsys.readouterr().err
    assert "--attention fused applies to sam and clip" in err and "leave --attention out" in err
    assert not (tmp_path / "d").exists()
