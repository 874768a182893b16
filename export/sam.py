"""SAM -> bundle with the official three components (image_encoder, prompt_encoder, mask_decoder) and the
two that serve prompts without a mask input faster (decoder_context, prompt_decoder: ``sam_context.py``).

The graph wrappers sit beside the model (as segment-anything's ``SamOnnxModel`` does) and bend it for
export without changing its math: branch-free prompt embedding, all four mask tokens always decoded (the
runtime picks the official 1-of-4 or 3-of-4), the dense positional encoding baked in as a constant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from edgefm.models.checkpoint import sha256_file
from edgefm.models.sam import SAM_CONFIGS, Sam, SamConfig, load_sam
from edgefm.runtime.manifest import Manifest
from edgefm.runtime.sam.spec import (
    DECODER_CONTEXT,
    IMAGE_ENCODER,
    MASK_DECODER,
    MASK_OUTPUTS,
    PROMPT_DECODER,
    PROMPT_ENCODER,
    sam_specs,
)
from edgefm.runtime.spec import ComponentSpec
from torch import nn

from .bundle import BundleWriter
from .fused_attention import to_ort_ops
from .onnx import INT8_INFO, at_precision, check_options, example_inputs, onnx_from_module
from .parity import gate, measure
from .sam_context import DecoderContextGraph, PromptDecoderGraph, mask_head, point_embeddings

# What --precision int8 writes per component. The prompt encoder stays fp32: it has no MatMul with a constant
# weight worth quantizing (its Convs stay fp32 in any case, INT8_OPS). The decoder context stays fp32: it runs
# once per image, and its error would reach every prompt. The two decoders fall back to fp32 if int8 misses
# the mask IoU policy.
INT8_PRECISIONS = {IMAGE_ENCODER: "int8", PROMPT_ENCODER: "fp32", MASK_DECODER: "int8", DECODER_CONTEXT: "fp32",
                   PROMPT_DECODER: "int8"}
DECODERS = (MASK_DECODER, PROMPT_DECODER)


class ImageEncoderGraph(nn.Module):
    """Normalized, padded image (B, 3, S, S) -> image embeddings (B, C, S/16, S/16)."""

    def __init__(self, sam: Sam, attention: str = "plain") -> None:
        super().__init__()
        if attention == "plain":
            self.encoder = sam.image_encoder
        else:
            from .sam_fused import with_fused_attention

            self.encoder = with_fused_attention(sam.image_encoder, "qk" if attention == "fused-qk" else "bias")

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder(image)


class PromptEncoderGraph(nn.Module):
    """Points (B, N, 2) XY in the resized frame + labels (B, N) + optional low-res mask -> embeddings."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.pe = sam.prompt_encoder
        self.image_size = sam.prompt_encoder.input_image_size

    def forward(self, point_coords, point_labels, mask_input, has_mask_input):
        pe = self.pe
        emb = point_embeddings(pe, self.image_size, point_coords, point_labels)
        has_mask = has_mask_input.reshape(-1, 1, 1, 1)
        no_mask = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dense = has_mask * pe.mask_downscaling(mask_input) + (1 - has_mask) * no_mask
        return emb, dense


class MaskDecoderGraph(nn.Module):
    """One image embedding (1, C, h, w) and B prompts -> IoU predictions (B, 4) and mask logits (B, 4, 4h, 4w)."""

    def __init__(self, sam: Sam, fused_attention: bool = False) -> None:
        super().__init__()
        if fused_attention:
            from .sam_fused import decoder_with_fused_attention

            self.decoder = decoder_with_fused_attention(sam.mask_decoder)
        else:
            self.decoder = sam.mask_decoder
        self.fused = fused_attention
        # Constant for a given model: fold it into the graph instead of recomputing it per call.
        self.register_buffer("image_pe", sam.prompt_encoder.get_dense_pe().detach().clone())
        self.size = tuple(sam.prompt_encoder.image_embedding_size)

    def forward(self, image_embeddings, sparse_embeddings, dense_embeddings):
        d = self.decoder
        tokens = torch.cat([d.iou_token.weight, d.mask_tokens.weight], dim=0)
        tokens = tokens.unsqueeze(0).expand(sparse_embeddings.shape[0], -1, -1)
        tokens = torch.cat([tokens, sparse_embeddings], dim=1)
        # Broadcasting the single image over the prompt batch replaces the official repeat_interleave.
        src = image_embeddings + dense_embeddings
        hs, src = d.transformer(src, self.image_pe, tokens)
        return mask_head(d, hs, src, self.size, fused=self.fused)


def component_graphs(sam: Sam, attention: str = "plain") -> dict[str, nn.Module]:
    """Component name -> the module its ONNX is exported from (and its PyTorch twin in benchmarks), in the
    bundle's order."""
    fused = attention != "plain"
    return {IMAGE_ENCODER: ImageEncoderGraph(sam, attention), PROMPT_ENCODER: PromptEncoderGraph(sam),
            MASK_DECODER: MaskDecoderGraph(sam, fused), DECODER_CONTEXT: DecoderContextGraph(sam),
            PROMPT_DECODER: PromptDecoderGraph(sam, fused)}


def parity_inputs(cfg: SamConfig, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Seeded inputs covering every prompt kind: points with padding, a box, and a mask input."""
    rng = np.random.default_rng(seed)
    s, e = cfg.image_size, cfg.image_embedding_size
    image = rng.normal(0.0, 1.0, (1, 3, s, s)).astype(np.float32)
    # Batch of 3 prompts with 3 points each: [fg, bg, pad], [box tl, box br, fg], [fg, fg, pad].
    coords = rng.uniform(0, s, (3, 3, 2)).astype(np.float32)
    labels = np.array([[1, 0, -1], [2, 3, 1], [1, 1, -1]], dtype=np.float32)
    mask = rng.normal(0.0, 4.0, (3, 1, 4 * e, 4 * e)).astype(np.float32)
    has_mask = np.array([0, 1, 0], dtype=np.float32)
    prompts = {"point_coords": coords, "point_labels": labels, "mask_input": mask, "has_mask_input": has_mask}
    return {IMAGE_ENCODER: {"image": image}, PROMPT_ENCODER: prompts}


def _torch_run(module: nn.Module, spec: ComponentSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        outs = module(*(torch.from_numpy(feeds[n]) for n in spec.input_names))
    outs = outs if isinstance(outs, tuple) else (outs,)
    return {n: o.numpy() for n, o in zip(spec.output_names, outs)}


def sam_preprocess(cfg: SamConfig) -> dict[str, Any]:
    return {
        "image_size": cfg.image_size,
        "resize": "longest_side",
        "resize_rounding": "int(x * scale + 0.5)",
        "interpolation": "bilinear",
        "mean": list(cfg.pixel_mean),
        "std": list(cfg.pixel_std),
        "pad": "bottom_right_zeros_after_normalize",
        "pixel_format": "RGB",
        "layout": "NCHW",
    }


def export_sam(
    model: Sam | str | Path,
    out: str | Path,
    variant: str | SamConfig = "vit_b",
    precision: str = "fp32",
    opset: int = 17,
    parity_gate: bool = True,
    overwrite: bool = False,
    progress=None,
    attention: str = "plain",
) -> Path:
    """Export a SAM (a model, or a checkpoint path loaded strictly as ``variant``) to a bundle at ``out``.

    ``attention="fused"`` writes the attention of the image encoder and both decoders as ONNX Runtime's
    fused MultiHeadAttention (:mod:`edgefm.export.sam_fused`): fewer, larger kernels for ort-cuda, but not
    parsable by TensorRT. ``"fused-qk"`` (experimental, not yet timed on a GPU) folds the encoder's relative
    positions into the query/key dot product instead of passing them as a (heads, HW, HW) bias.

    ``precision="int8"`` (for CPUs) writes each component at the precision of :data:`INT8_PRECISIONS`,
    dynamically quantized (:func:`edgefm.export.onnx.int8_from_onnx`) and gated by the int8 policy. A mask
    decoder that misses it is written in fp32 instead, its int8 report kept in the manifest's parity entry
    (``int8_rejected``); the manifest entry's precision always says what was written."""
    check_options("SAM", precision, ("fp32", "fp16", "int8"), opset, attention, ("plain", "fused", "fused-qk"))
    cfg = SAM_CONFIGS[variant] if isinstance(variant, str) else variant
    source: dict[str, Any] = {"loader": "in-memory model"}
    if not isinstance(model, nn.Module):
        path = Path(model)
        model = load_sam(path, variant)
        source = {"checkpoint": path.name, "sha256": sha256_file(path),
                  "loader": "torch.load(weights_only=True) / safetensors, strict keys and shapes"}
    model = model.eval()
    specs = sam_specs(cfg.image_size, cfg.prompt_embed_dim, cfg.image_embedding_size)
    fused = attention != "plain"
    graphs = component_graphs(model, attention)
    feeds = parity_inputs(cfg)
    parity: dict[str, Any] = {"gate": parity_gate, "reference": f"PyTorch {torch.__version__} fp32, CPU",
                              "backend": "onnxruntime CPU"}
    with BundleWriter(out, overwrite=overwrite) as writer:
        for name in graphs:
            if progress:
                progress(f"exporting {name} ({precision})")
            spec, graph = specs[name], graphs[name]
            ref = _torch_run(graph, spec, feeds[name])
            work = writer.workdir(name)
            onnx_path = work / f"{name}.onnx"
            extra = onnx_from_module(graph, spec, onnx_path, example_inputs(spec, feeds[name]), opset)
            info: dict[str, Any] = {"opset": opset}
            if name in (IMAGE_ENCODER, *DECODERS) and fused:
                info.update(to_ort_ops(onnx_path))
            wanted = INT8_PRECISIONS[name] if precision == "int8" else precision
            path, files = at_precision(onnx_path, wanted, extra, writer.workdir)
            report = measure(path, spec, feeds[name], ref, wanted, masks=MASK_OUTPUTS)
            if not report["passed"] and wanted == "int8" and name in DECODERS and parity_gate:
                # The encoder's int8 speed-up does not depend on the decoder: a usable bundle with an fp32
                # decoder beats a refused export.
                rejected = report
                path, files = onnx_path, extra
                report = measure(path, spec, feeds[name], ref, "fp32", masks=MASK_OUTPUTS)
                report["int8_rejected"] = rejected
            parity[name] = report
            gate(name, report, parity_gate)
            if report["precision"] == "int8":
                info["quantization"] = INT8_INFO
            writer.add(path, spec, "onnx", report["precision"], files, info=info)
            if name == IMAGE_ENCODER:
                feeds[MASK_DECODER] = {"image_embeddings": ref["image_embeddings"]}
                feeds[DECODER_CONTEXT] = dict(feeds[MASK_DECODER])
            if name == PROMPT_ENCODER:
                feeds[MASK_DECODER].update(ref)
            if name == DECODER_CONTEXT:  # the prompts of the mask decoder's check, without their mask input
                points = {n: feeds[PROMPT_ENCODER][n] for n in ("point_coords", "point_labels")}
                feeds[PROMPT_DECODER] = {**points, **ref}
        manifest = Manifest(
            family="sam", variant=variant if isinstance(variant, str) else "custom", source=source,
            preprocess=sam_preprocess(cfg), components=[], parity=parity,
            config={"mask_threshold": 0.0, "image_size": cfg.image_size,
                    "embed_dim": cfg.prompt_embed_dim, "embed_size": cfg.image_embedding_size},
        )
        return writer.finish(manifest)
