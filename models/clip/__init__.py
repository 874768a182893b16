"""CLIP in PyTorch: OpenAI-faithful model definitions and checkpoint loading."""

from .checkpoint import clip_from_state_dict, load_clip, read_torchscript_weights, variant_name
from .model import (
    CLIP,
    CLIP_CONFIGS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ClipConfig,
    build_clip,
    config_from_state_dict,
)

__all__ = [
    "CLIP",
    "CLIP_CONFIGS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ClipConfig",
    "build_clip",
    "clip_from_state_dict",
    "config_from_state_dict",
    "load_clip",
    "read_torchscript_weights",
    "variant_name",
]
