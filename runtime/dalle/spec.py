"""I/O specs of the DALL·E components, written once for exporter, engine builder and runtime.

Conventions:
- image token ids are int64 ``[batch, grid, grid]``, row-major over the grid (the prior's order);
- images are float32 NCHW RGB in [0, 1] (the dVAE's ``map_pixels`` / ``unmap_pixels`` run inside the graphs);
- text ids are int64 ``[batch, text_len]``: CLIP BPE ``<start_of_text> ... <end_of_text>`` followed by the
  prior's padding id (see :mod:`edgefm.runtime.dalle.generator`);
- the KV cache of the prior is ``[n_layers, batch, n_heads, context_len, head_dim]`` with
  ``context_len = text_len + grid² - 1``. Its size never changes during generation: ``prior_prefill`` writes
  positions ``0..text_len-1`` (zeros elsewhere) and each ``prior_step`` writes one more position, so a GPU
  runtime can keep both buffers on the device (IO binding) and replay the same shapes every step.
- ``position`` of ``prior_step`` is the sequence index of the fed image token, shape ``[1]``: image token
  ``j`` sits at ``text_len + j``; feeding ``i_j`` yields the logits of ``i_{j+1}``.
"""

from __future__ import annotations

from ..spec import ComponentSpec, DimRange, TensorSpec

DVAE_ENCODER = "dvae_encoder"
DVAE_DECODER = "dvae_decoder"
PRIOR_PREFILL = "prior_prefill"
PRIOR_STEP = "prior_step"
COMPONENTS = (DVAE_DECODER, DVAE_ENCODER, PRIOR_PREFILL, PRIOR_STEP)

# Ranges: ONNX Runtime accepts anything inside them; TensorRT profiles are built from them. The prior's
# opt is the CLI's default -n 8; a generator splits larger n into batches of at most ``max``.
IMAGE_BATCH = DimRange(1, 1, 32)
SAMPLE_BATCH = DimRange(1, 8, 32)


def dvae_specs(grid: int, image_size: int) -> dict[str, ComponentSpec]:
    """Specs of the dVAE encoder and decoder for ``image_size``² images and ``grid``² codes."""
    ids = TensorSpec("image_tokens", "int64", ("batch", grid, grid))
    image = TensorSpec("image", "float32", ("batch", 3, image_size, image_size))
    dims = {"batch": IMAGE_BATCH}
    encoder = ComponentSpec(DVAE_ENCODER, inputs=(image,), outputs=(ids,), dims=dims)
    decoder = ComponentSpec(DVAE_DECODER, inputs=(ids,), outputs=(image,), dims=dims)
    return {s.name: s for s in (encoder, decoder)}


def prior_specs(
    text_len: int, image_vocab: int, n_layers: int, n_heads: int, context_len: int, head_dim: int
) -> dict[str, ComponentSpec]:
    """Specs of the prior's prefill and step graphs (sizes from its ``PriorConfig``)."""
    cache = (n_layers, "batch", n_heads, context_len, head_dim)
    logits = TensorSpec("logits", "float32", ("batch", image_vocab))
    dims = {"batch": SAMPLE_BATCH}
    prefill = ComponentSpec(
        PRIOR_PREFILL,
        inputs=(TensorSpec("text_tokens", "int64", ("batch", text_len)),),
        outputs=(logits, TensorSpec("k_cache", "float32", cache), TensorSpec("v_cache", "float32", cache)),
        dims=dims,
    )
    step = ComponentSpec(
        PRIOR_STEP,
        inputs=(
            TensorSpec("token", "int64", ("batch",)),
            TensorSpec("position", "int64", (1,)),
            TensorSpec("k_cache", "float32", cache),
            TensorSpec("v_cache", "float32", cache),
        ),
        # Output names differ from the inputs' (one name per tensor); the runtime feeds them back.
        outputs=(
            logits,
            TensorSpec("k_cache_out", "float32", cache),
            TensorSpec("v_cache_out", "float32", cache),
        ),
        dims=dims,
    )
    return {s.name: s for s in (prefill, step)}
