"""CLIP runtime without torch: tokenizer, preprocessing, ``ClipModel`` (embeddings, zero-shot), index.

Names are imported on first use so that ``import edgefm.runtime.clip`` stays cheap (no OpenCV, ftfy or
regex until a tokenizer or preprocessing function is asked for). The single-image function is imported
from its module, ``from edgefm.runtime.clip.preprocess import preprocess``: as a package attribute its
name would be shadowed by the submodule ``preprocess`` once that is imported.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "ClipModel": "model",
    "ImageIndex": "index",
    "imagenet_classnames": "zero_shot",
    "resolve_templates": "zero_shot",
    "ClipTokenizer": "tokenizer",
    "clean_text": "tokenizer",
    "OPENAI_CLIP_MEAN": "preprocess",
    "OPENAI_CLIP_STD": "preprocess",
    "preprocess_batch": "preprocess",
    "resize_center_crop": "preprocess",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
