"""I/O specs of SAM's components, written once for exporter, engine builder and runtime.

Three follow the official split: ``image_encoder``, ``prompt_encoder``, ``mask_decoder``. Two more serve the
prompts without a mask input (clicks and boxes, the common case) faster: ``decoder_context`` computes, once
per image, what the decoder's first block derives from the image alone, and ``prompt_decoder`` takes points
straight to masks with it (``export/sam_context.py``). Bundles exported before them have the three only.

Prompt conventions follow the official predictor: point coordinates are XY pixels in the resized
(``image_size``) frame; labels 1 = foreground, 0 = background, -1 = padding point (added when there is
no box), 2 / 3 = top-left / bottom-right box corners. Several prompts for one image form the batch.
"""

from __future__ import annotations

from ..spec import ComponentSpec, DimRange, TensorSpec

IMAGE_ENCODER = "image_encoder"
PROMPT_ENCODER = "prompt_encoder"
MASK_DECODER = "mask_decoder"
DECODER_CONTEXT = "decoder_context"
PROMPT_DECODER = "prompt_decoder"
# decoder_context's outputs = prompt_decoder's inputs beside the points: the image tokens (embedding + the
# no-mask embedding) and the first block's projections of them (tokens -> image keys and values, image ->
# tokens queries).
CONTEXT = ("context_tokens", "context_keys", "context_values", "context_queries")
NUM_MASK_OUTPUTS = 4  # token 0: single-mask output; tokens 1..3: the multimask outputs
MASK_OUTPUTS = ("low_res_masks",)  # mask logits: parity judges them by the IoU of the thresholded masks

# Ranges: ONNX Runtime accepts anything inside them; TensorRT profiles are built from them.
IMAGE_BATCH = DimRange(1, 1, 8)
PROMPT_BATCH = DimRange(1, 1, 128)  # the automatic mask generator decodes 64 points per call
NUM_POINTS = DimRange(1, 2, 32)


def sam_specs(image_size: int, embed_dim: int, embed_size: int) -> dict[str, ComponentSpec]:
    """Specs for a SAM whose encoder maps ``image_size``² to ``embed_dim`` × ``embed_size``²."""
    mask_size = 4 * embed_size  # low-res mask logits (256 for the official 1024 models)
    tokens = embed_size * embed_size
    attn_dim = embed_dim // 2  # the two-way transformer's cross-attention width (downsample rate 2, as in SAM)
    emb = TensorSpec("image_embeddings", "float32", ("image_batch", embed_dim, embed_size, embed_size))
    encoder = ComponentSpec(
        IMAGE_ENCODER,
        inputs=(TensorSpec("image", "float32", ("image_batch", 3, image_size, image_size)),),
        outputs=(emb,),
        dims={"image_batch": IMAGE_BATCH},
    )
    prompt = ComponentSpec(
        PROMPT_ENCODER,
        inputs=(
            TensorSpec("point_coords", "float32", ("batch", "num_points", 2)),
            TensorSpec("point_labels", "float32", ("batch", "num_points")),
            TensorSpec("mask_input", "float32", ("batch", 1, mask_size, mask_size)),
            TensorSpec("has_mask_input", "float32", ("batch",)),
        ),
        outputs=(
            TensorSpec("sparse_embeddings", "float32", ("batch", "num_points", embed_dim)),
            TensorSpec("dense_embeddings", "float32", ("batch", embed_dim, embed_size, embed_size)),
        ),
        dims={"batch": PROMPT_BATCH, "num_points": NUM_POINTS},
    )
    decoder = ComponentSpec(
        MASK_DECODER,
        inputs=(
            # One image, many prompts: the embedding is broadcast over the prompt batch inside the graph.
            TensorSpec("image_embeddings", "float32", (1, embed_dim, embed_size, embed_size)),
            TensorSpec("sparse_embeddings", "float32", ("batch", "num_points", embed_dim)),
            TensorSpec("dense_embeddings", "float32", ("batch", embed_dim, embed_size, embed_size)),
        ),
        outputs=(
            TensorSpec("iou_predictions", "float32", ("batch", NUM_MASK_OUTPUTS)),
            TensorSpec("low_res_masks", "float32", ("batch", NUM_MASK_OUTPUTS, mask_size, mask_size)),
        ),
        dims={"batch": PROMPT_BATCH, "num_points": NUM_POINTS},
    )
    context = ComponentSpec(
        DECODER_CONTEXT,
        inputs=decoder.inputs[:1],  # the one image's embedding
        outputs=tuple(TensorSpec(n, "float32", (1, tokens, embed_dim if n == CONTEXT[0] else attn_dim))
                      for n in CONTEXT),
    )
    prompt_decoder = ComponentSpec(
        PROMPT_DECODER,
        inputs=prompt.inputs[:2] + context.outputs,
        outputs=decoder.outputs,
        dims={"batch": PROMPT_BATCH, "num_points": NUM_POINTS},
    )
    return {s.name: s for s in (encoder, prompt, decoder, context, prompt_decoder)}
