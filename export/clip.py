"""CLIP -> bundle with two components: image_encoder and text_encoder, plus the tokenizer vocabulary.

The text graph takes ``[batch, length]`` tokens with ``length`` dynamic (1..77): the causal mask is built
from the runtime length inside the graph (a triangular comparison of two ``arange``s), so the exporter
records it as ops on the input's shape instead of a constant 77 x 77 slice fixed at trace time. End-of-text
pooling is the model's float ArgMax + Gather, which ONNX Runtime and TensorRT both accept.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from edgefm.models.checkpoint import sha256_file
from edgefm.models.clip import CLIP, load_clip, variant_name
from edgefm.runtime.clip.spec import COMPONENTS, IMAGE_ENCODER, TEXT_ENCODER, TOKENIZER_ASSET, clip_specs
from edgefm.runtime.clip.tokenizer import DEFAULT_VOCAB, ClipTokenizer
from edgefm.runtime.manifest import Manifest
from edgefm.runtime.spec import ComponentSpec
from torch import nn

from .bundle import BundleWriter
from .fused_attention import fused_attention, skip_layer_norm, to_ort_ops
from .onnx import INT8_INFO, at_precision, check_options, example_inputs, onnx_from_module
from .parity import gate, measure

PARITY_PROMPTS = ["a photo of a cat", "a diagram", "an extremely long and detailed description " * 3, ""]


def _attention(block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, fused: bool, causal: bool = False
               ) -> torch.Tensor:
    """``block.attn`` on batch-first ``x`` written out with plain ops, or as one fused node.

    nn.MultiheadAttention computes its reshapes from Python ints of the traced shapes, so the TorchScript
    exporter freezes batch and length at their trace-time values; here only the head split is a constant.
    ``fused``: ``com.microsoft.MultiHeadAttention`` (:mod:`edgefm.export.fused_attention`), the mask as its
    additive bias; ``causal`` (fused, instead of a mask): the operator's own causal masking.
    """
    attn = block.attn
    heads = attn.num_heads
    if fused:  # one bias-free MatMul; the operator adds the in-projection bias as it splits the heads
        q, k, v = F.linear(x, attn.in_proj_weight).split(x.shape[-1], dim=-1)
        out = fused_attention(q, k, v, heads, None if mask is None else mask[None, None],
                              proj_bias=attn.in_proj_bias, causal=causal)
        return F.linear(out, attn.out_proj.weight)  # its bias is added by the SkipLayerNormalization after it
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))  # B, h, L, d
    scores = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-1, -2)  # B, h, L, L
    if mask is not None:
        scores = scores + mask
    out = (scores.softmax(dim=-1) @ v).transpose(1, 2).flatten(2)  # B, L, D
    return attn.out_proj(out)


def _transformer(transformer: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None,
                 fused: bool = False, causal: bool = False, final_norm: nn.Module | None = None) -> torch.Tensor:
    """``transformer`` (a stack of pre-norm residual attention blocks) with export-safe attention, then
    ``final_norm`` if given.

    ``fused``: each residual add, the projection bias before it and the LayerNorm after it (the block's
    ``ln_2``, the next block's ``ln_1`` or ``final_norm``) are one SkipLayerNormalization, which also passes
    the sum on as the residual stream: 3 nodes where there were 6 per block."""
    blocks = list(transformer.resblocks)
    if not fused:
        for block in blocks:
            x = x + _attention(block, block.ln_1(x), mask, fused, causal)
            x = x + block.mlp(block.ln_2(x))
        return x if final_norm is None else final_norm(x)
    h = blocks[0].ln_1(x)
    for i, block in enumerate(blocks):
        h, x = skip_layer_norm(x, _attention(block, h, mask, True, causal), block.ln_2, block.attn.out_proj.bias)
        mlp = block.mlp
        m = F.linear(mlp.gelu(mlp.c_fc(h)), mlp.c_proj.weight)
        after = blocks[i + 1].ln_1 if i + 1 < len(blocks) else final_norm
        if after is None:
            return x + m + mlp.c_proj.bias
        h, x = skip_layer_norm(x, m, after, mlp.c_proj.bias)
    return h


class ImageEncoderGraph(nn.Module):
    """Normalized image (B, 3, S, S) -> unnormalized image embeddings (B, D), as ``encode_image``."""

    def __init__(self, clip: CLIP, fused: bool = False) -> None:
        super().__init__()
        self.visual = clip.visual
        self.fused = fused

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        v = self.visual
        if not hasattr(v, "class_embedding"):  # ModifiedResNet: no nn.MultiheadAttention inside
            return v(image)
        # Sizes as Python ints, and the class token prepended as a zero row (Pad) whose position row carries the
        # class embedding: the same sums as cat([class_embedding expanded to the batch, x]) + positions, without
        # the per-call shape arithmetic of that flatten and expand (Shape, Gather, Concat, Where, Expand).
        tokens, width = int(v.positional_embedding.shape[0]), int(v.positional_embedding.shape[1])
        x = v.conv1(image).reshape(-1, width, tokens - 1).transpose(1, 2)  # B, grid**2, width
        positions = torch.cat([v.positional_embedding[:1] + v.class_embedding, v.positional_embedding[1:]])
        x = F.pad(x, (0, 0, 1, 0)) + positions
        if self.fused:  # ln_post of every token (one fused node with the last residual add), then the class token
            return _transformer(v.transformer, v.ln_pre(x), fused=True, final_norm=v.ln_post)[:, 0, :] @ v.proj
        x = _transformer(v.transformer, v.ln_pre(x))
        return v.ln_post(x[:, 0, :]) @ v.proj


class TextEncoderGraph(nn.Module):
    """Tokens (B, L), L in 1..77 -> unnormalized text embeddings (B, D), as ``encode_text``."""

    def __init__(self, clip: CLIP, fused: bool = False) -> None:
        super().__init__()
        self.clip = clip
        self.fused = fused

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        c = self.clip
        length = tokens.shape[1]
        x = c.token_embedding(tokens) + c.positional_embedding[:length]  # B, L, D
        if self.fused:  # the operator's causal masking: no mask tensor, and flash attention stays eligible
            x = _transformer(c.transformer, x, None, fused=True, causal=True, final_norm=c.ln_final)
        else:  # causal mask from the runtime length (not a slice of the 77 x 77 buffer, which tracing would fix)
            pos = torch.arange(length, device=tokens.device)
            mask = torch.zeros(length, length, device=tokens.device)
            mask = mask.masked_fill(pos.unsqueeze(0) > pos.unsqueeze(1), float("-inf"))
            x = _transformer(c.transformer, x, mask, final_norm=c.ln_final)
        return c.pool_eot(x, tokens) @ c.text_projection


@contextlib.contextmanager
def _mha_fastpath(enabled: bool):
    """nn.MultiheadAttention's fused inference path has no ONNX symbolic: trace the plain ops instead."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def parity_inputs(
    image_size: int, context_length: int = 77, seed: int = 0
) -> dict[str, dict[str, np.ndarray]]:
    """Seeded images (batch 2) and real prompts at the full context length (the gate's worst case)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0.0, 1.0, (2, 3, image_size, image_size)).astype(np.float32)
    tokens = ClipTokenizer(context_length=context_length)(PARITY_PROMPTS)
    return {IMAGE_ENCODER: {"image": image}, TEXT_ENCODER: {"tokens": tokens}}


def _torch_run(module: nn.Module, spec: ComponentSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        outs = module(*(torch.from_numpy(feeds[n]) for n in spec.input_names))
    outs = outs if isinstance(outs, tuple) else (outs,)
    return {n: o.numpy() for n, o in zip(spec.output_names, outs)}


def clip_preprocess(image_size: int, mean, std) -> dict[str, Any]:
    return {
        "image_size": image_size,
        "resize": "bicubic_antialias",
        "resize_rule": "short side to image_size, long side int(image_size * long / short)",
        "crop": "center",
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "pixel_format": "RGB",
        "layout": "NCHW",
    }


def export_clip(
    model_or_path: CLIP | str | Path,
    out: str | Path,
    precision: str = "fp32",
    quick_gelu: bool | None = None,
    overwrite: bool = False,
    parity_gate: bool = True,
    progress=None,
    opset: int = 17,
    attention: str = "plain",
) -> Path:
    """Export a CLIP (a model, or a checkpoint loaded strictly by ``load_clip``) to a bundle at ``out``.

    ``quick_gelu`` applies to paths only (``None``: decided by ``load_clip`` from the checkpoint).
    ``precision="int8"`` quantizes both encoders dynamically (:func:`edgefm.export.onnx.int8_from_onnx`),
    for CPUs; the parity gate then holds them to the int8 policy against PyTorch fp32.
    ``attention="fused"`` writes each transformer block's attention as ONNX Runtime's MultiHeadAttention
    (:mod:`edgefm.export.fused_attention`): fewer, larger kernels for ONNX Runtime, but not parsable by TensorRT.
    """
    check_options("CLIP", precision, ("fp32", "fp16", "int8"), opset, attention)
    if isinstance(model_or_path, nn.Module):
        model, config = model_or_path, model_or_path.config
        source: dict[str, Any] = {"loader": "in-memory model"}
        gelu_source = "in-memory model config"
    else:
        path = Path(model_or_path)
        model, config, info = load_clip(path, quick_gelu=quick_gelu)
        source = {"checkpoint": path.name, "sha256": sha256_file(path), "format": info["format"],
                  "loader": "edgefm.models.clip.load_clip (weights only, strict keys and shapes)"}
        gelu_source = info["quick_gelu_source"]
    model = model.float().eval()
    specs = clip_specs(config.image_size, config.embed_dim, config.context_length)
    fused = attention == "fused"
    graphs = {IMAGE_ENCODER: ImageEncoderGraph(model, fused), TEXT_ENCODER: TextEncoderGraph(model, fused)}
    feeds = parity_inputs(config.image_size, config.context_length)
    parity: dict[str, Any] = {"gate": parity_gate, "reference": f"PyTorch {torch.__version__} fp32, CPU",
                              "backend": "onnxruntime CPU"}

    with BundleWriter(out, overwrite=overwrite) as writer:
        for name in COMPONENTS:
            if progress:
                progress(f"exporting {name} ({precision})")
            spec, graph = specs[name], graphs[name]
            # The reference is the model's own encode_* (not the graph wrapper), so the gate also checks
            # the wrapper's in-graph causal mask.
            with torch.no_grad():
                x = torch.from_numpy(feeds[name][spec.input_names[0]])
                ref_out = model.encode_image(x) if name == IMAGE_ENCODER else model.encode_text(x)
            ref = {spec.output_names[0]: ref_out.numpy()}
            work = writer.workdir(name)
            onnx_path = work / f"{name}.onnx"
            # Traced at a short length so that nothing can silently depend on 77.
            trace = feeds[name] if name == IMAGE_ENCODER else {"tokens": feeds[name]["tokens"][:, :16].copy()}
            with _mha_fastpath(False):
                extra = onnx_from_module(graph, spec, onnx_path, example_inputs(spec, trace), opset)
            info: dict[str, Any] = {"opset": opset, **({"quantization": INT8_INFO} if precision == "int8" else {})}
            if fused:
                info.update(to_ort_ops(onnx_path))
            onnx_path, extra = at_precision(onnx_path, precision, extra, writer.workdir)
            report = measure(onnx_path, spec, feeds[name], ref, precision)
            parity[name] = report
            gate(name, report, parity_gate)
            writer.add(onnx_path, spec, "onnx", precision, extra, info=info)
        writer.copy_asset(DEFAULT_VOCAB, TOKENIZER_ASSET)
        manifest = Manifest(
            family="clip", variant=variant_name(config), source=source,
            preprocess=clip_preprocess(config.image_size, config.mean, config.std), components=[],
            parity=parity,
            config={"embed_dim": config.embed_dim, "logit_scale": float(model.logit_scale.detach().exp()),
                    "context_length": config.context_length, "image_size": config.image_size,
                    "quick_gelu": config.quick_gelu, "quick_gelu_source": gelu_source,
                    "tokenizer": TOKENIZER_ASSET, "vocab_size": config.vocab_size},
        )
        return writer.finish(manifest)
