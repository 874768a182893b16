"""SAM variants as data, the whole model wiring, and loading official ``sam_vit_*.pth`` checkpoints.

Variants differ only in numbers (:class:`SamConfig` in :data:`SAM_CONFIGS`). :class:`Sam` holds the
three components plus the pixel normalisation (0-255 RGB mean/std as non-persistent buffers, exactly
like the official model: they are not in the checkpoints).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from edgefm.runtime.errors import CheckpointError
from torch import nn

from ..checkpoint import HintFn, check_state_dict, read_state_dict
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .transformer import TwoWayTransformer


@dataclass(frozen=True)
class SamConfig:
    """Numbers that define a SAM variant. Image size, mean and std are in model-input pixels (0-255 RGB)."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    decoder_mlp_dim: int = 2048
    iou_head_hidden_dim: int = 256
    iou_head_depth: int = 3
    num_multimask_outputs: int = 3
    pixel_mean: tuple[float, float, float] = field(default=(123.675, 116.28, 103.53))
    pixel_std: tuple[float, float, float] = field(default=(58.395, 57.12, 57.375))

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.encoder_embed_dim % self.encoder_num_heads:
            raise ValueError(f"encoder_num_heads {self.encoder_num_heads} must divide {self.encoder_embed_dim}")
        if any(not 0 <= i < self.encoder_depth for i in self.encoder_global_attn_indexes):
            raise ValueError(f"encoder_global_attn_indexes {self.encoder_global_attn_indexes} exceed the depth")

    @property
    def image_embedding_size(self) -> int:
        """Side of the image embedding grid (64 for 1024 / 16)."""
        return self.image_size // self.patch_size

    @property
    def low_res_mask_size(self) -> int:
        """Side of the decoder's mask logits and of the mask prompt (256 officially)."""
        return 4 * self.image_embedding_size


SAM_CONFIGS: dict[str, SamConfig] = {
    "vit_b": SamConfig(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamConfig(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamConfig(1280, 32, 16, (7, 15, 23, 31)),
    # for tests and demos: 16 x 16 token grid, 4 x 4 windows
    "tiny": SamConfig(
        encoder_embed_dim=64,
        encoder_depth=4,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(1, 3),
        image_size=256,
        patch_size=16,
        window_size=4,
        prompt_embed_dim=32,
        mask_in_chans=4,
        decoder_num_heads=2,
        decoder_mlp_dim=64,
        iou_head_hidden_dim=32,
    ),
}


class Sam(nn.Module):
    """Segment Anything: image encoder + prompt encoder + mask decoder."""

    mask_threshold: float = 0.0  # logits above it are foreground
    image_format: str = "RGB"

    def __init__(
        self,
        image_encoder: ImageEncoderViT,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: tuple[float, ...] = (123.675, 116.28, 103.53),
        pixel_std: tuple[float, ...] = (58.395, 57.12, 57.375),
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        # not persistent: the official checkpoints do not carry them
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a ``3 x H x W`` 0-255 RGB image (longest side already resized to ``img_size``) and
        zero-pad it at the bottom/right to ``img_size`` x ``img_size``."""
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        size = self.image_encoder.img_size
        return F.pad(x, (0, size - w, 0, size - h))

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: tuple[int, ...], original_size: tuple[int, ...]
    ) -> torch.Tensor:
        """Low-res logits ``B x M x 4H x 4W`` -> logits at ``original_size`` (H, W): upscale to the padded
        input, crop the padding (``input_size`` is the resized image's (H, W)), resize to the original."""
        size = self.image_encoder.img_size
        masks = F.interpolate(masks, (size, size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def forward(self, batched_input: list[dict[str, Any]], multimask_output: bool) -> list[dict[str, torch.Tensor]]:
        """End-to-end prediction with the official batched-input convention.

        Each record holds ``image`` (3 x H x W, 0-255 RGB, resized so the longest side is ``img_size``),
        ``original_size`` (H, W), and optionally ``point_coords`` (B x N x 2, XY pixels of the resized
        image), ``point_labels`` (B x N), ``boxes`` (B x 4 XYXY) and ``mask_inputs`` (B x 1 x 4h x 4w).
        Returns per record ``masks`` (bool, B x M x H x W), ``iou_predictions`` and ``low_res_logits``.
        """
        input_images = torch.stack([self.preprocess(x["image"]) for x in batched_input], dim=0)
        image_embeddings = self.image_encoder(input_images)
        outputs = []
        for record, embedding in zip(batched_input, image_embeddings, strict=True):
            points = (record["point_coords"], record["point_labels"]) if "point_coords" in record else None
            sparse, dense = self.prompt_encoder(
                points=points, boxes=record.get("boxes"), masks=record.get("mask_inputs")
            )
            low_res_masks, iou_predictions = self.mask_decoder(
                image_embeddings=embedding.unsqueeze(0),
                image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
            masks = self.postprocess_masks(low_res_masks, record["image"].shape[-2:], record["original_size"])
            outputs.append(
                {
                    "masks": masks > self.mask_threshold,
                    "iou_predictions": iou_predictions,
                    "low_res_logits": low_res_masks,
                }
            )
        return outputs


def build_sam(cfg: SamConfig) -> Sam:
    """Build a randomly initialised SAM (in eval mode) for ``cfg``; the wiring of every variant."""
    grid = cfg.image_embedding_size
    image_encoder = ImageEncoderViT(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.encoder_embed_dim,
        depth=cfg.encoder_depth,
        num_heads=cfg.encoder_num_heads,
        mlp_ratio=4.0,
        out_chans=cfg.prompt_embed_dim,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=cfg.window_size,
        global_attn_indexes=cfg.encoder_global_attn_indexes,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=cfg.prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(cfg.image_size, cfg.image_size),
        mask_in_chans=cfg.mask_in_chans,
    )
    mask_decoder = MaskDecoder(
        transformer_dim=cfg.prompt_embed_dim,
        transformer=TwoWayTransformer(
            depth=cfg.decoder_depth,
            embedding_dim=cfg.prompt_embed_dim,
            num_heads=cfg.decoder_num_heads,
            mlp_dim=cfg.decoder_mlp_dim,
        ),
        num_multimask_outputs=cfg.num_multimask_outputs,
        iou_head_depth=cfg.iou_head_depth,
        iou_head_hidden_dim=cfg.iou_head_hidden_dim,
    )
    sam = Sam(image_encoder, prompt_encoder, mask_decoder, pixel_mean=cfg.pixel_mean, pixel_std=cfg.pixel_std)
    return sam.eval()


def resolve_sam_config(variant: str | SamConfig) -> SamConfig:
    """A :class:`SamConfig` from a registry name or a config; unknown names raise :class:`CheckpointError`."""
    if isinstance(variant, SamConfig):
        return variant
    if variant not in SAM_CONFIGS:
        raise CheckpointError(
            f"Unknown SAM variant '{variant}'. Known variants: {', '.join(SAM_CONFIGS)}; pass one of them "
            "(e.g. --variant vit_b) or a SamConfig."
        )
    return SAM_CONFIGS[variant]


def guess_sam_variant(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Name of the registered variant whose image encoder matches the checkpoint's shapes, if exactly one.

    The width comes from ``image_encoder.patch_embed.proj.weight`` (768 vit_b, 1024 vit_l, 1280 vit_h),
    the patch size from its kernel, the depth from the highest block index.
    """
    proj = state_dict.get("image_encoder.patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        return None
    blocks = [k.split(".")[2] for k in state_dict if k.startswith("image_encoder.blocks.")]
    depth = 1 + max((int(b) for b in blocks if b.isdigit()), default=-1)
    matches = [
        name
        for name, cfg in SAM_CONFIGS.items()
        if (cfg.encoder_embed_dim, cfg.encoder_depth, cfg.patch_size) == (proj.shape[0], depth, proj.shape[-1])
    ]
    return matches[0] if len(matches) == 1 else None


def sam_variant_hint(cfg: SamConfig) -> HintFn:
    """A ``hint`` for :func:`~edgefm.models.checkpoint.check_state_dict` when loading into ``cfg``'s model:
    names the registered variant the checkpoint looks like, if that is another one."""

    def hint(state_dict: Mapping[str, torch.Tensor]) -> str | None:
        proj = state_dict.get("image_encoder.patch_embed.proj.weight")
        if proj is None:
            return (
                "It has no 'image_encoder.patch_embed.proj.weight', so it does not look like a Segment "
                "Anything (v1) checkpoint; pass an official sam_vit_*.pth file or a state dict of Sam."
            )
        name = guess_sam_variant(state_dict)
        if name is not None and SAM_CONFIGS[name] != cfg:
            return f"This looks like a {name} checkpoint; pass --variant {name} (load_sam(path, '{name}'))."
        if name is None:
            return (
                f"Its image encoder has width {proj.shape[0]}, which matches no registered variant "
                f"({', '.join(SAM_CONFIGS)}); describe it with a SamConfig and pass that as the variant."
            )
        return None

    return hint


def load_sam(path: str | os.PathLike[str], variant: str | SamConfig) -> Sam:
    """Build the ``variant`` model and load a SAM state dict (``.pth`` or ``.safetensors``) strictly.

    Returns the model in eval mode on the CPU. Raises :class:`CheckpointError` for an unknown variant,
    an unreadable file, or keys/shapes that do not fit (suggesting the variant the file looks like).
    """
    cfg = resolve_sam_config(variant)
    state_dict = read_state_dict(path)
    with torch.device("meta"):  # check keys and shapes before allocating and initialising the real model
        skeleton = build_sam(cfg)
    name = f"the SAM {variant} model" if isinstance(variant, str) else "the SAM model of the given SamConfig"
    check_state_dict(skeleton, state_dict, os.fspath(path), hint=sam_variant_hint(cfg), model_name=name)
    model = build_sam(cfg)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
