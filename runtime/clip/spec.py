"""I/O specs of CLIP's two components, written once for exporter, engine builder and runtime.

Conventions:
- ``image`` is float32 ``[batch, 3, S, S]``: RGB, short side resized to S (bicubic, antialiased as PIL),
  center-cropped, scaled to [0, 1] and normalized with the manifest's mean/std (see ``preprocess``).
- ``tokens`` is int64 ``[batch, length]`` with ``1 <= length <= 77``: ``<start_of_text> ids <end_of_text>``
  then zero padding. The end-of-text id is the largest in the vocabulary; the graph pools the feature at
  each row's largest id, so any length that keeps every row's end token gives the same embeddings (the
  causal mask hides later positions).
- Both outputs are unnormalized projections, like OpenAI's ``encode_image`` / ``encode_text``; the
  runtime L2-normalizes them.
"""

from __future__ import annotations

from ..spec import ComponentSpec, DimRange, TensorSpec

IMAGE_ENCODER = "image_encoder"
TEXT_ENCODER = "text_encoder"
COMPONENTS = (IMAGE_ENCODER, TEXT_ENCODER)
TOKENIZER_ASSET = "bpe_simple_vocab_16e6.txt.gz"

# Ranges: ONNX Runtime accepts anything inside them; TensorRT profiles are built from them. Text batches
# of 80 prompts (one label's ImageNet templates) are the common case for zero-shot.
IMAGE_BATCH = DimRange(1, 1, 64)
TEXT_BATCH = DimRange(1, 80, 256)


def clip_specs(image_size: int, embed_dim: int, context_length: int = 77) -> dict[str, ComponentSpec]:
    """Specs of a CLIP with ``image_size``² inputs, ``embed_dim`` embeddings, ``context_length`` tokens."""
    image = ComponentSpec(
        IMAGE_ENCODER,
        inputs=(TensorSpec("image", "float32", ("image_batch", 3, image_size, image_size)),),
        outputs=(TensorSpec("image_embeds", "float32", ("image_batch", embed_dim)),),
        dims={"image_batch": IMAGE_BATCH},
    )
    text = ComponentSpec(
        TEXT_ENCODER,
        inputs=(TensorSpec("tokens", "int64", ("text_batch", "length")),),
        outputs=(TensorSpec("text_embeds", "float32", ("text_batch", embed_dim)),),
        dims={"text_batch": TEXT_BATCH, "length": DimRange(1, 16, context_length)},
    )
    return {s.name: s for s in (image, text)}
