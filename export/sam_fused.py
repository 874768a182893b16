"""SAM's image encoder with its attention as one fused ONNX Runtime operator (``--attention fused``).

The plain export spells attention out: ``q @ kᵀ``, the decomposed relative-position terms, ``Softmax``,
``@ v``. In the four global-attention blocks of ViT-B that is a 12 x 4096 x 4096 score tensor written and read
several times (in fp32 around the softmax of an fp16 graph): memory traffic that dominates the encoder on a GPU.
Here each block's attention becomes ONNX Runtime's ``com.microsoft.MultiHeadAttention`` with the relative
positions passed as its ``attention_bias`` input (1, heads, HW, HW), which lets the CUDA provider run its
fused (memory-efficient) attention kernels. The arithmetic is the official one; only where it runs changes.

The result is an ONNX Runtime graph: TensorRT's ONNX parser does not know ``com.microsoft`` operators, so
``edgefm build-engine`` needs the plain export.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from edgefm.models.sam.image_encoder import Attention, get_rel_pos
from torch import nn

PLACEHOLDER_DOMAIN = "edgefm"
PLACEHOLDER_OP = "FusedAttention"
ORT_DOMAIN = "com.microsoft"


class _FusedAttentionFn(torch.autograd.Function):
    """Attention of ``q, k, v`` (B, S, heads*hd) with an additive ``bias`` (B, heads, S, S).

    PyTorch runs the plain math; the exporter writes one placeholder node that :func:`to_ort_attention`
    turns into ``com.microsoft.MultiHeadAttention`` (whose default scale is ``hd ** -0.5``, SAM's own)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, num_heads: int):  # noqa: ANN001 - autograd.Function signature
        b, s, d = q.shape
        hd = d // num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, -1, num_heads, hd).transpose(1, 2)

        attn = (heads(q) * hd**-0.5) @ heads(k).transpose(-2, -1) + bias
        return (attn.softmax(dim=-1) @ heads(v)).transpose(1, 2).reshape(b, s, d)

    @staticmethod
    def symbolic(g, q, k, v, bias, num_heads: int):  # noqa: ANN001 - exporter signature
        return g.op(f"{PLACEHOLDER_DOMAIN}::{PLACEHOLDER_OP}", q, k, v, bias, num_heads_i=num_heads)


class FusedAttention(nn.Module):
    """Drop-in for :class:`Attention` (same parameters, same outputs) that exports as one fused node."""

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        self.inner = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.inner
        b, h, w, dim = x.shape
        hd = dim // a.num_heads
        # Channels of qkv are laid out (3, heads, hd): q, k, v are (B, HW, heads*hd), heads-major.
        q, k, v = a.qkv(x).reshape(b, h * w, 3, dim).unbind(2)
        if a.use_rel_pos:
            # Decomposed relative positions from the unscaled queries, as add_decomposed_rel_pos does.
            r_q = q.reshape(b, h, w, a.num_heads, hd).permute(0, 3, 1, 2, 4)  # B, heads, h, w, hd
            rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, get_rel_pos(h, h, a.rel_pos_h))
            rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, get_rel_pos(w, w, a.rel_pos_w))
            bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, a.num_heads, h * w, h * w)
        else:
            bias = q.new_zeros(b, a.num_heads, h * w, h * w)
        out = _FusedAttentionFn.apply(q, k, v, bias, a.num_heads)
        return a.proj(out.reshape(b, h, w, dim))


def with_fused_attention(encoder: nn.Module) -> nn.Module:
    """A shallow copy of a SAM image encoder whose blocks use :class:`FusedAttention` (weights shared)."""
    fused = copy.copy(encoder)
    fused._modules = dict(encoder._modules)
    blocks = nn.ModuleList()
    for block in encoder.blocks:
        nb = copy.copy(block)
        nb._modules = dict(block._modules)
        nb._modules["attn"] = FusedAttention(block.attn)
        blocks.append(nb)
    fused._modules["blocks"] = blocks
    return fused


def to_ort_attention(path: str | Path) -> int:
    """Rewrite the placeholder nodes of an exported graph in place; returns how many were rewritten."""
    import onnx
    from onnx import helper

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    n = 0
    for node in model.graph.node:
        if node.domain == PLACEHOLDER_DOMAIN and node.op_type == PLACEHOLDER_OP:
            q, k, v, bias = node.input
            heads = next(a.i for a in node.attribute if a.name == "num_heads")
            new = helper.make_node("MultiHeadAttention", [q, k, v, "", "", bias], list(node.output),
                                   name=node.name or f"fused_attention_{n}", domain=ORT_DOMAIN, num_heads=heads)
            node.CopyFrom(new)
            n += 1
    kept = [o for o in model.opset_import if o.domain not in (PLACEHOLDER_DOMAIN, ORT_DOMAIN)]
    del model.opset_import[:]
    model.opset_import.extend(kept + [helper.make_opsetid(ORT_DOMAIN, 1)])
    onnx.save_model(model, str(path))  # external data, if any, stays in its file beside the graph
    return n
