"""SAM's image encoder with its attention as one fused ONNX Runtime operator (``--attention fused``).

In the four global-attention blocks of ViT-B the plain export's score tensor is 12 x 4096 x 4096, written and
read several times (in fp32 around the softmax of an fp16 graph): memory traffic that dominates the encoder on
a GPU. Here each block's attention becomes ``com.microsoft.MultiHeadAttention``
(:mod:`edgefm.export.fused_attention`) with SAM's decomposed relative positions passed as its
``attention_bias`` (1, heads, HW, HW). The mask decoder's seven attentions (token self-attention and the
two-way cross-attentions, queries and keys of different lengths) become the same operator without an
attention bias, their q/k/v projection biases passed to its ``bias`` input: the plain graph splits their heads
with shapes computed per call from the dynamic prompt count, about a hundred Shape/Gather nodes for a
component whose whole run should take about a millisecond on a GPU. The arithmetic is the official one; only
where it runs changes.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from edgefm.models.sam.image_encoder import Attention, Block, get_rel_pos
from edgefm.models.sam.transformer import Attention as DecoderAttention
from torch import nn

from .fused_attention import fused_attention

REL_POS_MODES = ("bias", "qk")


class FusedAttention(nn.Module):
    """Drop-in for :class:`Attention` (same parameters, same outputs) that exports as one fused node.

    ``rel_pos="bias"``: the decomposed relative positions become the operator's additive bias, a
    (B, heads, HW, HW) tensor (400 MB per global block of ViT-B in fp16). ``rel_pos="qk"``: the same sum
    folded into the dot product instead, as the bias for query i and key j is ``rel_h[i, row j] + rel_w[i,
    col j]`` = [rel_h_i, rel_w_i] · [one-hot(row j), one-hot(col j)]: queries carry their scaled values and
    their two relative-position rows, keys their values and two constant one-hots. No bias tensor is made,
    and no bias input limits the kernels ONNX Runtime may choose; the query/key head size grows from 64 to
    64 + h + w, padded to a multiple of 8 (96 for ViT-B's 14 x 14 windows, 192 for the global blocks).

    Why it matters on a GPU (ONNX Runtime's CUDA MultiHeadAttention, read in its source): with an attention
    bias, its memory-efficient kernel needs the query count to be a multiple of 8, which a 14 x 14 window's
    196 is not, and flash attention takes no bias at all; without a bias, and with head sizes that are
    multiples of 8, the memory-efficient kernel takes the block. So ``"bias"`` folds the relative positions
    into q·k in the blocks whose token count is not a multiple of 8 (ViT-B's eight windowed blocks) and keeps
    the bias where that kernel accepts it (the global blocks, 4096 tokens); ``"qk"`` folds them everywhere.
    The sums are the same either way."""

    def __init__(self, attn: Attention, rel_pos: str = "bias") -> None:
        super().__init__()
        if rel_pos not in REL_POS_MODES:
            raise ValueError(f"rel_pos must be one of {REL_POS_MODES}, got {rel_pos!r}")
        self.inner, self.rel_pos = attn, rel_pos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.inner
        # The token grid is fixed by the encoder's input size (1024 -> 64 x 64, windows 14 x 14): as Python
        # ints, the relative-position tables are gathered once at export (constant-folded into initializers)
        # instead of by index arithmetic and two gathers per block on every run. Only the batch stays dynamic.
        h, w, dim = int(x.shape[1]), int(x.shape[2]), int(x.shape[3])
        n, hd = a.num_heads, dim // a.num_heads
        mode = "qk" if self.rel_pos == "qk" or (h * w) % 8 else "bias"  # see the class docstring
        # Channels of qkv are laid out (3, heads, hd): q, k, v are (B, HW, heads*hd), heads-major.
        q, k, v = a.qkv(x).reshape(-1, h * w, 3, dim).unbind(2)
        if not a.use_rel_pos:
            return a.proj(fused_attention(q, k, v, n).reshape(-1, h, w, dim))
        # Decomposed relative positions from the unscaled queries, as add_decomposed_rel_pos does.
        r_q = q.reshape(-1, h, w, n, hd)  # B, h, w, heads, hd
        rel_h = torch.einsum("bhwnc,hkc->bhwnk", r_q, get_rel_pos(h, h, a.rel_pos_h))  # B, h, w, heads, h
        rel_w = torch.einsum("bhwnc,wkc->bhwnk", r_q, get_rel_pos(w, w, a.rel_pos_w))  # B, h, w, heads, w
        if mode == "bias":
            bias = (rel_h.permute(0, 3, 1, 2, 4)[..., :, None] + rel_w.permute(0, 3, 1, 2, 4)[..., None, :])
            out = fused_attention(q, k, v, n, bias.reshape(-1, n, h * w, h * w))
        else:
            # Query/key heads padded with zero columns to a multiple of 8 (dot products unchanged): ONNX Runtime's
            # CUDA memory-efficient attention takes only such head sizes (ViT-B's windows: 64 + 28 -> 96).
            pad = -(hd + h + w) % 8
            width = hd + h + w + pad
            q_aug = F.pad(torch.cat([r_q * hd**-0.5, rel_h, rel_w], dim=-1), (0, pad)).reshape(-1, h * w, n * width)
            rows = torch.arange(h, device=k.device).repeat_interleave(w)  # on the model's device (a GPU export)
            cols = torch.arange(w, device=k.device).repeat(h)
            one_hots = torch.cat([F.one_hot(rows, h), F.one_hot(cols, w)], dim=-1).to(k.dtype)  # HW, h + w
            # A constant (HW, heads, width) added to the zero-padded keys: no batch-sized expand, no Shape op.
            key_pos = F.pad(one_hots, (hd, pad))[:, None, :].expand(h * w, n, width)
            k_aug = (F.pad(k.reshape(-1, h * w, n, hd), (0, h + w + pad)) + key_pos).reshape(-1, h * w, n * width)
            out = fused_attention(q_aug, k_aug, v, n, scale=1.0)
        return a.proj(out.reshape(-1, h, w, dim))


class FusedBlock(nn.Module):
    """Drop-in for a :class:`Block`: the same norms, MLP and windowing (with the grid and padding as
    constants), its attention a :class:`FusedAttention`."""

    def __init__(self, block: Block, rel_pos: str = "bias") -> None:
        super().__init__()
        self.inner = block
        self.attn = FusedAttention(block.attn, rel_pos)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blk, ws = self.inner, self.inner.window_size
        h, w, c = int(x.shape[1]), int(x.shape[2]), int(x.shape[3])
        shortcut, x = x, blk.norm1(x)
        if ws > 0:
            hp, wp = -(-h // ws) * ws, -(-w // ws) * ws  # padded up to whole windows, bottom/right
            if (hp, wp) != (h, w):
                x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
            x = x.reshape(-1, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, c)
        x = self.attn(x)
        if ws > 0:
            x = x.reshape(-1, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, hp, wp, c)
            x = x[:, :h, :w, :]
        x = shortcut + x
        return x + blk.mlp(blk.norm2(x))


class FusedDecoderAttention(nn.Module):
    """Drop-in for the mask decoder's :class:`~edgefm.models.sam.transformer.Attention` (q, k, v projected
    to its internal width, heads split inside the fused node)."""

    def __init__(self, attn: DecoderAttention) -> None:
        super().__init__()
        self.inner = attn

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        a = self.inner
        # Bias-free projections (one MatMul each); the operator adds the three biases as it splits the heads.
        proj_bias = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        q, k, v = F.linear(q, a.q_proj.weight), F.linear(k, a.k_proj.weight), F.linear(v, a.v_proj.weight)
        return a.out_proj(fused_attention(q, k, v, a.num_heads, proj_bias=proj_bias))


def replaced(module: nn.Module, kind: type, make) -> nn.Module:  # noqa: ANN001 - make: module -> module
    """``module`` with every submodule of type ``kind`` swapped for ``make(submodule)``: shallow copies along
    the changed paths only, so the original model and its weights are shared, never modified."""
    if isinstance(module, kind):
        return make(module)
    children = {name: replaced(child, kind, make) for name, child in module._modules.items() if child is not None}
    if all(children[name] is module._modules[name] for name in children):
        return module
    new = copy.copy(module)
    new._modules = {**module._modules, **children}
    return new


def with_fused_attention(encoder: nn.Module, rel_pos: str = "bias") -> nn.Module:
    """A SAM image encoder whose blocks are :class:`FusedBlock` (weights shared)."""
    return replaced(encoder, Block, lambda block: FusedBlock(block, rel_pos))


def decoder_with_fused_attention(decoder: nn.Module) -> nn.Module:
    """A SAM mask decoder whose attentions are :class:`FusedDecoderAttention` (weights shared)."""
    return replaced(decoder, DecoderAttention, FusedDecoderAttention)
