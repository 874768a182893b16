"""Attention written as one ONNX Runtime operator (``--attention fused``), shared by SAM and CLIP.

A plain export spells attention out: a head split (``Reshape``/``Transpose`` whose target shapes the tracer
computes from ``Shape`` ops at run time), ``q @ kᵀ``, an additive mask or bias, ``Softmax``, ``@ v`` and the
head merge: about 25 nodes per block for CLIP ViT-B/32, half of them shape arithmetic, and the score tensor
written and read several times. ``com.microsoft.MultiHeadAttention`` takes ``q, k, v`` as (B, S, heads*hd)
and an optional additive ``attention_bias`` broadcast over (B or 1, heads or 1, S, S), so a block's attention is
one node with no shape arithmetic around it (its ``bias`` input also takes the q/k/v projections' biases: the
CUDA provider adds them in one kernel before its flash / memory-efficient kernels, or while it splits the heads
for the unfused one, instead of three separate Adds), and the CUDA provider can pick its fused kernels. The
arithmetic is unchanged, with the operator's default scale ``hd ** -0.5``; the CPU provider has the same
operator, which is how CI checks it.

The same graphs write each residual add, with the projection bias before it and the LayerNorm after it, as one
``com.microsoft.SkipLayerNormalization`` (:func:`skip_layer_norm`): ONNX Runtime's own fusion of that pattern
does not fire in these graphs (see ``benchmarks/results/graph_stats.md``).

The result is an ONNX Runtime graph: TensorRT's ONNX parser does not know ``com.microsoft`` operators, so
``edgefm build-engine`` needs the plain export (``export/trt_compat.py`` refuses fused graphs by name).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

PLACEHOLDER_DOMAIN = "edgefm"
PLACEHOLDER_OP = "FusedAttention"
SKIP_LN_OP = "SkipLayerNorm"
ORT_DOMAIN = "com.microsoft"


class _FusedAttentionFn(torch.autograd.Function):
    """Attention of ``q, k`` (B, S, heads*d_qk) and ``v`` (B, S, heads*d_v) with an optional additive ``bias``
    (broadcast to (B, heads, S, S)) and ``scale`` (default ``d_qk ** -0.5``); ``proj_bias`` (optional, the
    concatenated q, k and v projection biases) is added to ``q, k, v`` first. PyTorch runs the plain math; the
    exporter writes one placeholder node that :func:`to_ort_ops` turns into
    ``com.microsoft.MultiHeadAttention``."""

    @staticmethod
    def forward(ctx, q, k, v, bias, num_heads: int, scale, proj_bias, causal: bool):  # noqa: ANN001
        if proj_bias is not None:
            bq, bk, bv = proj_bias.split([q.shape[-1], k.shape[-1], v.shape[-1]])
            q, k, v = q + bq, k + bk, v + bv
        b, s, _ = q.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, t.shape[1], num_heads, -1).transpose(1, 2)

        qh = heads(q)
        attn = (qh * (qh.shape[-1] ** -0.5 if scale is None else scale)) @ heads(k).transpose(-2, -1)
        if bias is not None:
            attn = attn + bias
        if causal:
            attn = attn.masked_fill(torch.ones_like(attn, dtype=torch.bool).triu(1), float("-inf"))
        return (attn.softmax(dim=-1) @ heads(v)).transpose(1, 2).reshape(b, s, v.shape[-1])

    @staticmethod
    def symbolic(g, q, k, v, bias, num_heads: int, scale, proj_bias, causal: bool):  # noqa: ANN001
        # Only the inputs given, in order; the two flags say which optional ones are there.
        given = [(name, t) for name, t in (("proj_bias", proj_bias), ("bias", bias))
                 if t is not None and not _is_none(t)]
        inputs = (q, k, v, *(t for _, t in given))
        attrs = {"num_heads_i": num_heads, **({} if scale is None else {"scale_f": float(scale)}),
                 **{f"has_{name}_i": 1 for name, _ in given}, **({"unidirectional_i": 1} if causal else {})}
        out = g.op(f"{PLACEHOLDER_DOMAIN}::{PLACEHOLDER_OP}", *inputs, **attrs)
        # The output has the query's batch and length and the value's width.
        qs, vs = q.type().varyingSizes(), v.type().varyingSizes()
        out.setType(q.type().with_sizes([qs[0], qs[1], vs[2]]) if qs and vs else q.type())
        return out


def _is_none(value) -> bool:  # noqa: ANN001 - a TorchScript graph value
    node = getattr(value, "node", None)
    return node is not None and value.node().mustBeNone()


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                    bias: torch.Tensor | None = None, scale: float | None = None,
                    proj_bias: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """Multi-head attention of (B, S, heads*d) ``q, k, v`` (``v``'s head size may differ) that exports as one
    fused node; ``scale`` multiplies ``q @ kᵀ`` (default ``d_qk ** -0.5``); ``proj_bias``: the q, k and v
    projection biases, concatenated, added by the operator (``q, k, v`` are then the bias-free projections);
    ``causal``: each query sees the keys up to its own position (the operator's ``unidirectional``), with no
    bias tensor, which leaves ONNX Runtime's CUDA flash attention eligible."""
    return _FusedAttentionFn.apply(q, k, v, bias, num_heads, scale, proj_bias, causal)


class _SkipLayerNormFn(torch.autograd.Function):
    """``LayerNorm(x + skip + bias)`` and the sum itself (the residual stream of the next block); exported as
    one placeholder that :func:`to_ort_ops` turns into ``com.microsoft.SkipLayerNormalization``."""

    @staticmethod
    def forward(ctx, x, skip, weight, beta, bias, eps: float):  # noqa: ANN001
        total = x + skip if bias is None else x + skip + bias
        normed = F.layer_norm(total.float(), weight.shape, weight.float(), beta.float(), eps).to(total.dtype)
        return normed, total

    @staticmethod
    def symbolic(g, x, skip, weight, beta, bias, eps: float):  # noqa: ANN001
        given = bias is not None and not _is_none(bias)
        normed, total = g.op(f"{PLACEHOLDER_DOMAIN}::{SKIP_LN_OP}", x, skip, weight, beta, *([bias] if given else []),
                             epsilon_f=float(eps), outputs=2)
        normed.setType(x.type())
        total.setType(x.type())
        return normed, total


def skip_layer_norm(x: torch.Tensor, skip: torch.Tensor, norm: torch.nn.LayerNorm,
                    bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(x + skip + bias), x + skip + bias)`` for (B, S, C) tensors, as one fused node: a pre-norm
    block's residual add, the projection bias before it and the next LayerNorm after it. ONNX Runtime's own
    SkipLayerNormalization fusion leaves pre-norm transformers alone, because their sum also feeds the next
    residual; the operator's optional fourth output carries it."""
    return _SkipLayerNormFn.apply(x, skip, norm.weight, norm.bias, bias, norm.eps)


def to_ort_ops(path: str | Path) -> dict[str, int]:
    """Rewrite the placeholder nodes of an exported graph in place into ONNX Runtime's operators; returns how
    many of each kind were rewritten (``fused_attention``, ``skip_layer_norm``)."""
    import onnx
    from onnx import helper

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    n = norms = 0
    read = {i for node in model.graph.node for i in node.input} | {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.domain == PLACEHOLDER_DOMAIN and node.op_type == SKIP_LN_OP:
            eps = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "epsilon")
            # Outputs: the normalized sum, mean and inverse std (not needed), and the sum itself where it is
            # read (a pre-norm residual stream; a post-norm block drops it).
            outputs = [node.output[0], "", "", node.output[1]] if node.output[1] in read else [node.output[0]]
            new = helper.make_node("SkipLayerNormalization", list(node.input), outputs,
                                   name=node.name or f"skip_layer_norm_{norms}", domain=ORT_DOMAIN, epsilon=eps)
            node.CopyFrom(new)
            norms += 1
        if node.domain == PLACEHOLDER_DOMAIN and node.op_type == PLACEHOLDER_OP:
            q, k, v, *rest = node.input
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            proj_bias = rest.pop(0) if attrs.pop("has_proj_bias", 0) else ""
            bias = rest.pop(0) if attrs.pop("has_bias", 0) else ""
            # MultiHeadAttention's inputs: query, key, value, bias (of the projections), key_padding_mask,
            # attention_bias.
            inputs = [q, k, v, proj_bias, "", bias] if bias else [q, k, v, proj_bias] if proj_bias else [q, k, v]
            new = helper.make_node("MultiHeadAttention", inputs, list(node.output),
                                   name=node.name or f"fused_attention_{n}", domain=ORT_DOMAIN, **attrs)
            node.CopyFrom(new)
            n += 1
    kept = [o for o in model.opset_import if o.domain not in (PLACEHOLDER_DOMAIN, ORT_DOMAIN)]
    del model.opset_import[:]
    model.opset_import.extend(kept + [helper.make_opsetid(ORT_DOMAIN, 1)])
    onnx.save_model(model, str(path))  # external data, if any, stays in its file beside the graph
    return {"fused_attention": n, "skip_layer_norm": norms}
