"""segment-anything's model wired with the numbers of an edgefm ``SamConfig``: the tests' reference, and the
official side of ``benchmarks/sam_cpu.py`` and ``benchmarks/sam_amg_cpu.py``. No pytest here, so the benchmarks
can import it."""

from __future__ import annotations


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
