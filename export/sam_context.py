"""SAM's decoder split at what the image alone determines: ``decoder_context`` once per image, then
``prompt_decoder`` per click.

For a prompt without a mask input, the decoder's image tokens start as the image embedding plus the constant
no-mask embedding, and its first two-way block projects them three times before any prompt is involved: the
keys and values of the tokens -> image attention, the queries of the image -> tokens attention. The official
decoder recomputes those for every prompt, and for each prompt of a batch: three 4096 x 256 -> 128 products at
ViT sizes, 0.8 of its 3.6 GFLOP per prompt. ``decoder_context`` computes them once per image.
``prompt_decoder`` is the rest of the first block, the other blocks and the mask head, with the prompt
encoder's point embedding in front: one graph from points (and box corners) to masks, without the dense
mask-prompt path a click never uses, as the official ONNX export also merges prompt encoding and decoding.
A prompt with a mask input still runs ``prompt_encoder`` + ``mask_decoder``. The arithmetic is the official
one in the same order, so the masks match the three-component path to float rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from edgefm.models.sam import Sam
from edgefm.models.sam.transformer import Attention
from torch import nn

from .fused_attention import fused_attention
from .sam_fused import add_norm, mlp_without_out_bias


def point_embeddings(prompt_encoder: nn.Module, image_size: tuple[int, int], point_coords: torch.Tensor,
                     point_labels: torch.Tensor) -> torch.Tensor:
    """Sparse prompt embeddings (B, N, C) of points in the resized frame; labels 1 / 0 points, 2 / 3 box
    corners, -1 padding (the runtime sends no other). Branch-free: one graph for every label mix.
    The Fourier features' 2-column projection is written as two products and a sum, the same arithmetic as
    the official matrix product, so that ``--precision int8`` (which quantizes MatMul) leaves it in fp32: a
    uint8 coordinate would move a click by up to 4 pixels of a 1024 frame."""
    pe = prompt_encoder
    coords = point_coords + 0.5  # pixel centers, as the official prompt encoder shifts them
    coords = coords / coords.new_tensor([image_size[1], image_size[0]])
    coords = 2 * coords - 1
    g = pe.pe_layer.positional_encoding_gaussian_matrix
    coords = 2 * math.pi * (coords[..., :1] * g[0] + coords[..., 1:] * g[1])
    emb = torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)
    # Each label adds its learned embedding (padding: not_a_point, after its features are zeroed): one
    # Gather from the stacked table instead of a masked sum per label, the same values (the official masked
    # assignments add exactly one row per point).
    table = torch.cat([pe.not_a_point_embed.weight, *(e.weight for e in pe.point_embeddings)], dim=0)
    labels = point_labels.unsqueeze(-1)
    return emb * (labels != -1).to(emb.dtype) + table[(point_labels + 1).long()]


def mask_head(decoder: nn.Module, tokens: torch.Tensor, image: torch.Tensor, size: tuple[int, int],
              fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder after its transformer: output tokens (B, T, C) and image tokens (B, h*w, C) -> IoU
    predictions (B, 4) and low-res mask logits (B, 4, 4h, 4w). ``fused`` (ONNX Runtime graphs): the same
    arithmetic in fewer, channels-last operators (:func:`_channels_last_masks`)."""
    # Sizes as Python ints from the model, so the graph computes no shapes but the prompt batch.
    d, (h, w), c = decoder, size, decoder.transformer_dim
    if fused:
        return d.iou_prediction_head(tokens[:, 0, :]), _channels_last_masks(d, tokens, image, size)
    upscaled = d.output_upscaling(image.transpose(1, 2).reshape(-1, c, h, w))  # (B, C/8, 4h, 4w)
    hyper_in = torch.stack(
        [mlp(tokens[:, 1 + i, :]) for i, mlp in enumerate(d.output_hypernetworks_mlps)], dim=1
    )
    masks = (hyper_in @ upscaled.reshape(-1, c // 8, 16 * h * w)).reshape(-1, d.num_mask_tokens, 4 * h, 4 * w)
    return d.iou_prediction_head(tokens[:, 0, :]), masks


def _channels_last_masks(d: nn.Module, tokens: torch.Tensor, image: torch.Tensor, size: tuple[int, int]
                         ) -> torch.Tensor:
    """The mask logits of :func:`mask_head` without leaving the tokens' channels-last layout.

    Each stride-2, 2 x 2 ConvTranspose2d maps every pixel on its own to a 2 x 2 patch: a MatMul from C_in to
    (2, 2, C_out) per pixel. So the upscaling is two MatMuls on the (B, h*w, C) image tokens, LayerNorm2d is a
    LayerNormalization over their last axis, and the four hypernetwork MLPs run as one batched MatMul per
    layer. The patches are put in raster order once, on the (B, 4, ...) logits at the end. After ONNX
    Runtime's optimizations the ViT-B mask decoder has 16 operators fewer than with the NCHW head (two
    ConvTranspose, LayerNorm2d spelled out in 9, 4 x 3 MLP layers with their gathers and the stack)."""
    (h, w), up = size, d.output_upscaling
    conv1, norm, act1, conv2, act2 = up
    c1, c2 = conv1.out_channels, conv2.out_channels
    # ConvTranspose2d weights are (C_in, C_out, 2, 2): as (C_in, 2, 2, C_out) the output of one pixel is its
    # 2 x 2 patch, row-major, channels last.
    x = image @ conv1.weight.permute(0, 2, 3, 1).reshape(-1, 4 * c1)  # (B, hw, 2*2*c1)
    x = x.reshape(-1, h * w * 4, c1) + conv1.bias
    x = act1(F.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps))
    x = (x @ conv2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)).reshape(-1, h * w * 16, c2)
    x = act2(x + conv2.bias)  # (B, hw*4*4, c2): pixel (i, j), first patch offset (a, b), second (e, f)
    mlps = d.output_hypernetworks_mlps
    hyper = tokens[:, 1 : 1 + d.num_mask_tokens, :].unsqueeze(2)  # (B, M, 1, C)
    for i in range(mlps[0].num_layers):
        weight = torch.stack([m.layers[i].weight.t() for m in mlps])  # (M, in, out)
        bias = torch.stack([m.layers[i].bias for m in mlps]).unsqueeze(1)  # (M, 1, out)
        hyper = hyper @ weight + bias
        hyper = F.relu(hyper) if i < mlps[0].num_layers - 1 else hyper
    logits = hyper.squeeze(2) @ x.transpose(1, 2)  # (B, M, hw*16)
    # (i, j, a, b, e, f) -> row 4i + 2a + e, column 4j + 2b + f (prompts and masks as one axis: rank 7)
    logits = logits.reshape(-1, h, w, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6)
    return logits.reshape(-1, d.num_mask_tokens, 4 * h, 4 * w)


def _projected_attention(a: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: int | None,
                         out_bias: bool = True) -> torch.Tensor:
    """``a``'s attention of already projected ``q``, ``k``, ``v`` (batch B or 1, broadcast), then its output
    projection: :class:`Attention.forward` after its three input projections. ``batch`` (the prompt count,
    for the fused graph): ONNX Runtime's MultiHeadAttention wants one batch size, so the context is expanded.
    ``out_bias=False`` (fused): the output projection's bias is left to the SkipLayerNormalization after it."""
    if batch is not None:
        q, k, v = (t.expand(batch, -1, -1) for t in (q, k, v))
        out = fused_attention(q, k, v, a.num_heads)
        return a.out_proj(out) if out_bias else F.linear(out, a.out_proj.weight)
    q, k, v = (Attention._separate_heads(t, a.num_heads) for t in (q, k, v))
    attn = (q @ k.permute(0, 1, 3, 2) / math.sqrt(q.shape[3])).softmax(dim=-1)
    return a.out_proj(Attention._recombine_heads(attn @ v))


class DecoderContextGraph(nn.Module):
    """One image embedding (1, C, h, w) -> its decoder context: image tokens (1, h*w, C) and the first
    block's keys, values (tokens -> image) and queries (image -> tokens), each (1, h*w, C/2)."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.block = sam.mask_decoder.transformer.layers[0]
        pe = sam.prompt_encoder
        self.register_buffer("image_pe", pe.get_dense_pe().flatten(2).transpose(1, 2).detach().clone())
        self.register_buffer("no_mask", pe.no_mask_embed.weight.detach().reshape(1, 1, -1).clone())

    def forward(self, image_embeddings: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tokens = image_embeddings.flatten(2).transpose(1, 2) + self.no_mask
        keyed = tokens + self.image_pe
        to_image, to_tokens = self.block.cross_attn_token_to_image, self.block.cross_attn_image_to_token
        return tokens, to_image.k_proj(keyed), to_image.v_proj(tokens), to_tokens.q_proj(keyed)


class PromptDecoderGraph(nn.Module):
    """Points (B, N, 2) XY in the resized frame + labels (B, N) + one image's decoder context -> IoU
    predictions (B, 4) and mask logits (B, 4, 4h, 4w): ``prompt_encoder`` + ``mask_decoder`` for prompts
    without a mask input, the first block's image-side projections read from the context."""

    def __init__(self, sam: Sam, fused_attention: bool = False) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.image_size = sam.prompt_encoder.input_image_size
        self.size = tuple(sam.prompt_encoder.image_embedding_size)
        if fused_attention:
            from .sam_fused import decoder_with_fused_attention

            self.decoder = decoder_with_fused_attention(sam.mask_decoder)
        else:
            self.decoder = sam.mask_decoder
        self.fused = fused_attention
        self.register_buffer("image_pe", sam.prompt_encoder.get_dense_pe().flatten(2).transpose(1, 2).detach().clone())

    def forward(self, point_coords, point_labels, context_tokens, context_keys, context_values, context_queries):
        d = self.decoder
        sparse = point_embeddings(self.prompt_encoder, self.image_size, point_coords, point_labels)
        prompt = torch.cat([d.iou_token.weight, d.mask_tokens.weight], dim=0)
        prompt = torch.cat([prompt.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse], dim=1)
        first, later = d.transformer.layers[0], d.transformer.layers[1:]
        batch = prompt.shape[0] if self.fused else None
        # The first block (TwoWayAttentionBlock.forward with skip_first_layer_pe), its image side from the context.
        block = _inner(first)
        queries = block.norm1(first.self_attn(q=prompt, k=prompt, v=prompt))
        a = _inner(first.cross_attn_token_to_image)
        attended = _projected_attention(a, a.q_proj(queries + prompt), context_keys, context_values, batch,
                                        out_bias=not self.fused)
        if self.fused:  # the residual adds with the biases before them and the norms after them: one node each
            queries = add_norm(queries, attended, block.norm2, a.out_proj.bias)
            queries = add_norm(queries, mlp_without_out_bias(block.mlp, queries), block.norm3, block.mlp.lin2.bias)
        else:
            queries = block.norm2(queries + attended)
            queries = block.norm3(queries + block.mlp(queries))
        a, q = _inner(first.cross_attn_image_to_token), queries + prompt
        attended = _projected_attention(a, context_queries, a.k_proj(q), a.v_proj(queries), batch)
        # Plain add + norm even when fused: the one context_tokens (1, HW, C) meets B prompts' attention here.
        keys = block.norm4(context_tokens + attended)
        for layer in later:
            queries, keys = layer(queries=queries, keys=keys, query_pe=prompt, key_pe=self.image_pe)
        t = d.transformer
        if self.fused:
            queries = t.final(queries, keys, prompt, self.image_pe)
        else:
            final = t.final_attn_token_to_image(q=queries + prompt, k=keys + self.image_pe, v=keys)
            queries = t.norm_final_attn(queries + final)
        return mask_head(d, queries, keys, self.size, fused=self.fused)


def _inner(module: nn.Module) -> nn.Module:
    """The official module (an :class:`Attention`, a two-way block: its weights), also inside a fused drop-in."""
    return getattr(module, "inner", module)
