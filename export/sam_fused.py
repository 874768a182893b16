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
from edgefm.models.sam.transformer import TwoWayTransformer
from torch import nn

from .fused_attention import fused_attention, skip_layer_norm

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

    def forward(self, x: torch.Tensor, proj_bias: bool = True) -> torch.Tensor:
        """``proj_bias=False``: the output projection without its bias, for a caller that adds it later (the
        encoder's SkipLayerNormalization)."""
        a = self.inner
        proj = a.proj if proj_bias else (lambda t: F.linear(t, a.proj.weight))
        # The token grid is fixed by the encoder's input size (1024 -> 64 x 64, windows 14 x 14): as Python
        # ints, the relative-position tables are gathered once at export (constant-folded into initializers)
        # instead of by index arithmetic and two gathers per block on every run. Only the batch stays dynamic.
        h, w, dim = int(x.shape[1]), int(x.shape[2]), int(x.shape[3])
        n, hd = a.num_heads, dim // a.num_heads
        mode = "qk" if self.rel_pos == "qk" or (h * w) % 8 else "bias"  # see the class docstring
        # Channels of qkv are laid out (3, heads, hd): q, k, v are (B, HW, heads*hd), heads-major.
        q, k, v = a.qkv(x).reshape(-1, h * w, 3, dim).unbind(2)
        if not a.use_rel_pos:
            return proj(fused_attention(q, k, v, n).reshape(-1, h, w, dim))
        # Decomposed relative positions from the unscaled queries, as add_decomposed_rel_pos does.
        r_q = q.reshape(-1, h, w, n, hd)  # B, h, w, heads, hd
        # As MatMuls that broadcast the tables over the batch, not Einsum: ONNX Runtime's Einsum kernel works out
        # its plan on every call and runs it as separate transposes, copies and MatMuls into temporaries (its
        # EinsumTypedComputeProcessor). rel_h: per query row, (w*heads, hd) @ (hd, h); rel_w: per query column.
        table_h = get_rel_pos(h, h, a.rel_pos_h).transpose(1, 2)  # h, hd, h (k)
        table_w = get_rel_pos(w, w, a.rel_pos_w).transpose(1, 2)  # w, hd, w (k)
        rel_h = (r_q.reshape(-1, h, w * n, hd) @ table_h).reshape(-1, h, w, n, h)  # B, h, w, heads, h
        rel_w = (r_q.reshape(-1, w, n, hd) @ table_w).reshape(-1, h, w, n, w)  # B, h, w, heads, w
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
        return proj(out.reshape(-1, h, w, dim))


class FusedBlock(nn.Module):
    """Drop-in for a :class:`Block`: the same norms, MLP and windowing (with the grid and padding as
    constants), its attention a :class:`FusedAttention`."""

    def __init__(self, block: Block, rel_pos: str = "bias") -> None:
        super().__init__()
        self.inner = block
        self.attn = FusedAttention(block.attn, rel_pos)

    def forward(self, x: torch.Tensor, normed: torch.Tensor | None = None, grid: tuple[int, int] | None = None,
                next_norm: nn.Module | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The block on (B, H, W, C) ``x``; or, from :class:`FusedEncoder`, on the (B, HW, C) residual stream
        ``x`` and its ``normed`` = ``norm1(x)`` over the token ``grid``, with its residual adds fused into the
        LayerNorms after them: returns ``(next_norm(out), out)``, or ``out`` for the last block."""
        blk = self.inner
        if normed is None:
            x = x + self.attend(blk.norm1(x))
            return x + blk.mlp(blk.norm2(x))
        (h, w), c = grid, int(x.shape[-1])
        branch = self.attend(normed.reshape(-1, h, w, c), proj_bias=False).reshape(-1, h * w, c)
        normed, x = skip_layer_norm(x, branch, blk.norm2, blk.attn.proj.bias)
        branch, bias = mlp_without_out_bias(blk.mlp, normed), blk.mlp.lin2.bias
        if next_norm is None:
            return x + branch + bias
        return skip_layer_norm(x, branch, next_norm, bias)

    def attend(self, x: torch.Tensor, proj_bias: bool = True) -> torch.Tensor:
        """The block's attention branch on the normalized (B, H, W, C) ``x``: windows made and undone around
        the attention, the padding cut off."""
        ws = self.inner.window_size
        h, w, c = int(x.shape[1]), int(x.shape[2]), int(x.shape[3])
        if ws > 0:
            hp, wp = -(-h // ws) * ws, -(-w // ws) * ws  # padded up to whole windows, bottom/right
            if (hp, wp) != (h, w):
                x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
            x = x.reshape(-1, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, c)
        x = self.attn(x, proj_bias)
        if ws > 0:
            x = x.reshape(-1, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, hp, wp, c)
            x = x[:, :h, :w, :]
        return x


class FusedEncoder(nn.Module):
    """The image encoder with :class:`FusedBlock` s whose residual adds are ONNX Runtime's
    SkipLayerNormalization (:func:`~edgefm.export.fused_attention.skip_layer_norm`): each block's output
    projection bias + residual add + ``norm2``, and its MLP's second bias + residual add + the next block's
    ``norm1``, are one node each (3 kernels where there were 6 per block on a GPU at batch 1). The residual
    stream is kept as (B, HW, C) tokens, which the operator takes; the attention sees (B, H, W, C) views."""

    def __init__(self, encoder: nn.Module, rel_pos: str = "bias") -> None:
        super().__init__()
        self.inner = encoder
        self.blocks = nn.ModuleList(FusedBlock(block, rel_pos) for block in encoder.blocks)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        enc = self.inner
        x = enc.patch_embed(image)
        if enc.pos_embed is not None:
            x = x + enc.pos_embed
        h, w, c = int(x.shape[1]), int(x.shape[2]), int(x.shape[3])
        x = x.reshape(-1, h * w, c)
        normed = self.blocks[0].inner.norm1(x)
        for i, block in enumerate(self.blocks):
            after = self.blocks[i + 1].inner.norm1 if i + 1 < len(self.blocks) else None
            out = block(x, normed, (h, w), after)
            normed, x = out if after is not None else (None, out)
        return _channels_last_neck(enc.neck, x, (h, w))


def _channels_last_neck(neck: nn.Module, tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The encoder's neck (1 x 1 conv, LayerNorm2d, 3 x 3 conv, LayerNorm2d) on the (B, HW, C) tokens: the 1 x 1
    conv as a MatMul and each LayerNorm2d as one LayerNormalization over the channels-last layout, where the NCHW
    form spells each out in 9 operators (in fp32 between Casts in an fp16 graph). Only the 3 x 3 conv sees NCHW."""
    (h, w), (conv1, norm1, conv3, norm2) = size, neck
    x = F.linear(tokens, conv1.weight.flatten(1), conv1.bias)  # (B, HW, C_out)
    x = F.layer_norm(x, norm1.weight.shape, norm1.weight, norm1.bias, norm1.eps)
    x = conv3(x.reshape(-1, h, w, conv1.out_channels).permute(0, 3, 1, 2))
    x = F.layer_norm(x.permute(0, 2, 3, 1), norm2.weight.shape, norm2.weight, norm2.bias, norm2.eps)
    return x.permute(0, 3, 1, 2)


class FusedDecoderAttention(nn.Module):
    """Drop-in for the mask decoder's :class:`~edgefm.models.sam.transformer.Attention` (q, k, v projected
    to its internal width, heads split inside the fused node)."""

    def __init__(self, attn: DecoderAttention) -> None:
        super().__init__()
        self.inner = attn

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out_bias: bool = True) -> torch.Tensor:
        """``out_bias=False``: the output projection without its bias (added by the SkipLayerNormalization
        after it)."""
        a = self.inner
        # Bias-free projections (one MatMul each); the operator adds the three biases as it splits the heads.
        proj_bias = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        q, k, v = F.linear(q, a.q_proj.weight), F.linear(k, a.k_proj.weight), F.linear(v, a.v_proj.weight)
        out = fused_attention(q, k, v, a.num_heads, proj_bias=proj_bias)
        return a.out_proj(out) if out_bias else F.linear(out, a.out_proj.weight)


def add_norm(residual: torch.Tensor, branch: torch.Tensor, norm: nn.LayerNorm, bias: torch.Tensor) -> torch.Tensor:
    """``norm(residual + branch + bias)`` of the post-norm decoder as one SkipLayerNormalization (ONNX
    Runtime's own fusion of it does not fire in the decoder's graphs)."""
    return skip_layer_norm(residual, branch, norm, bias)[0]


class FusedTwoWayBlock(nn.Module):
    """Drop-in for a :class:`~edgefm.models.sam.transformer.TwoWayAttentionBlock`: fused attentions, and each
    residual add with the bias before it and the LayerNorm after it as one node (:func:`add_norm`)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.inner = block
        self.self_attn = FusedDecoderAttention(block.self_attn)
        self.cross_attn_token_to_image = FusedDecoderAttention(block.cross_attn_token_to_image)
        self.cross_attn_image_to_token = FusedDecoderAttention(block.cross_attn_image_to_token)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.inner
        if b.skip_first_layer_pe:  # the attention replaces the tokens: no residual to fuse
            queries = b.norm1(self.self_attn(queries, queries, queries))
        else:
            q = queries + query_pe
            queries = add_norm(queries, self.self_attn(q, q, queries, out_bias=False), b.norm1,
                               b.self_attn.out_proj.bias)
        q, k = queries + query_pe, keys + key_pe
        queries = add_norm(queries, self.cross_attn_token_to_image(q, k, keys, out_bias=False), b.norm2,
                           b.cross_attn_token_to_image.out_proj.bias)
        queries = add_norm(queries, mlp_without_out_bias(b.mlp, queries), b.norm3, b.mlp.lin2.bias)
        q, k = queries + query_pe, keys + key_pe
        keys = add_norm(keys, self.cross_attn_image_to_token(k, q, queries, out_bias=False), b.norm4,
                        b.cross_attn_image_to_token.out_proj.bias)
        return queries, keys


def mlp_without_out_bias(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An :class:`~edgefm.models.sam.common.MLPBlock` without its second bias (added by the norm after it)."""
    return F.linear(mlp.act(mlp.lin1(x)), mlp.lin2.weight)


class FusedTwoWayTransformer(nn.Module):
    """Drop-in for the decoder's :class:`~edgefm.models.sam.transformer.TwoWayTransformer` built from
    :class:`FusedTwoWayBlock` s, its final attention and norm fused the same way."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.inner = transformer
        self.layers = nn.ModuleList(FusedTwoWayBlock(layer) for layer in transformer.layers)
        self.final_attn_token_to_image = FusedDecoderAttention(transformer.final_attn_token_to_image)

    def forward(self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        keys = image_embedding.flatten(2).permute(0, 2, 1)  # B C H W -> B HW C
        image_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries=queries, keys=keys, query_pe=point_embedding, key_pe=image_pe)
        return self.final(queries, keys, point_embedding, image_pe), keys

    def final(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
              ) -> torch.Tensor:
        """The final tokens -> image attention and its norm."""
        t = self.inner
        attended = self.final_attn_token_to_image(queries + query_pe, keys + key_pe, keys, out_bias=False)
        return add_norm(queries, attended, t.norm_final_attn, t.final_attn_token_to_image.out_proj.bias)


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
    """A SAM image encoder whose blocks are :class:`FusedBlock` and whose residual adds are fused with the
    LayerNorms after them (:class:`FusedEncoder`; weights shared)."""
    return FusedEncoder(encoder, rel_pos)


def decoder_with_fused_attention(decoder: nn.Module) -> nn.Module:
    """A SAM mask decoder whose transformer is a :class:`FusedTwoWayTransformer` (weights shared)."""
    return replaced(decoder, TwoWayTransformer, FusedTwoWayTransformer)
