"""Segment Anything (v1) in PyTorch, faithful to segment-anything so that ``sam_vit_{b,l,h}_*.pth`` load
strictly. Build with ``build_sam(SAM_CONFIGS["vit_b"])`` or load with ``load_sam(path, "vit_b")``."""

from .build import (
    SAM_CONFIGS,
    Sam,
    SamConfig,
    build_sam,
    guess_sam_variant,
    load_sam,
    resolve_sam_config,
    sam_variant_hint,
)
from .common import LayerNorm2d, MLPBlock
from .image_encoder import ImageEncoderViT
from .mask_decoder import MLP, MaskDecoder
from .prompt_encoder import PositionEmbeddingRandom, PromptEncoder
from .transformer import TwoWayAttentionBlock, TwoWayTransformer

__all__ = [
    "SAM_CONFIGS",
    "ImageEncoderViT",
    "LayerNorm2d",
    "MLP",
    "MLPBlock",
    "MaskDecoder",
    "PositionEmbeddingRandom",
    "PromptEncoder",
    "Sam",
    "SamConfig",
    "TwoWayAttentionBlock",
    "TwoWayTransformer",
    "build_sam",
    "guess_sam_variant",
    "load_sam",
    "resolve_sam_config",
    "sam_variant_hint",
]
