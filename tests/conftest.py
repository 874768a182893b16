"""Shared fixtures: small seeded models, their official twins, and exported bundles (built once per session)."""

from __future__ import annotations

import numpy as np
import pytest


def randomize_(module, seed: int, std: float = 0.1) -> None:
    """Seeded weights that make outputs depend on every parameter: the default init (re-run under the
    seed) plus random values where official inits leave zeros (biases, positional and rel-pos tables)."""
    import torch

    torch.manual_seed(seed)
    for m in module.modules():
        if hasattr(m, "reset_parameters") and m is not module:
            m.reset_parameters()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or "pos" in name.split(".")[-1]:
                p.normal_(0.0, std)


@pytest.fixture(scope="session")
def sam_tiny():
    from edgefm.models.sam import SAM_CONFIGS, build_sam

    model = build_sam(SAM_CONFIGS["tiny"]).eval()
    randomize_(model, seed=0)
    return model


def official_sam(cfg, state_dict=None):
    """The segment-anything model with the same numbers as ``cfg``, loaded strictly with ``state_dict``
    (without one, it keeps its own random initialisation)."""
    from functools import partial

    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    e = cfg.image_embedding_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=cfg.encoder_depth, embed_dim=cfg.encoder_embed_dim, img_size=cfg.image_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=cfg.encoder_num_heads,
            patch_size=cfg.patch_size, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=cfg.encoder_global_attn_indexes, window_size=cfg.window_size,
            out_chans=cfg.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=cfg.prompt_embed_dim, image_embedding_size=(e, e),
            input_image_size=(cfg.image_size, cfg.image_size), mask_in_chans=cfg.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=cfg.num_multimask_outputs,
            transformer=TwoWayTransformer(depth=cfg.decoder_depth, embedding_dim=cfg.prompt_embed_dim,
                                          mlp_dim=cfg.decoder_mlp_dim, num_heads=cfg.decoder_num_heads),
            transformer_dim=cfg.prompt_embed_dim, iou_head_depth=cfg.iou_head_depth,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        ),
        pixel_mean=list(cfg.pixel_mean), pixel_std=list(cfg.pixel_std),
    )
    if state_dict is not None:
        sam.load_state_dict(state_dict, strict=True)
    return sam.eval()


@pytest.fixture(scope="session")
def sam_tiny_official(sam_tiny):
    from edgefm.models.sam import SAM_CONFIGS

    return official_sam(SAM_CONFIGS["tiny"], sam_tiny.state_dict())


@pytest.fixture(scope="session")
def sam_tiny_bundle(sam_tiny, tmp_path_factory):
    from edgefm.export.sam import export_sam

    return export_sam(sam_tiny, tmp_path_factory.mktemp("bundles") / "sam_tiny", "tiny")


def scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A gradient background with filled circles and squares (the demo's scene generator)."""
    from edgefm.runtime.demo import make_scene

    return make_scene(h, w, seed)


def assert_scaled_close(got, ref, rel: float = 1e-5, what: str = "") -> float:
    """Max abs difference <= rel * max(1, |ref|_inf), the repo's parity bound; returns the difference."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    diff = float(np.abs(got - ref).max()) if ref.size else 0.0
    bound = rel * max(1.0, float(np.abs(ref).max()) if ref.size else 0.0)
    assert diff <= bound, f"{what}: max abs diff {diff:.3g} > {bound:.3g}"
    return diff
