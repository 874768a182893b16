"""Zero-shot classification data and math: prompt templates, ImageNet class names, prompt ensembling.

Templates contain ``{}`` where the label goes. The shipped sets (``assets/templates.json``) are OpenAI's 80
ImageNet templates (``"imagenet80"``), the 7 of OpenAI's reduced set (``"imagenet_simple"``) and
``"simple"`` (``"a photo of a {}."``). Ensembling follows the CLIP paper's notebook: the text embeddings of
all templates of one label are L2-normalized, averaged, and the mean renormalized.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..errors import InputError

ASSETS = Path(__file__).parent / "assets"


@functools.lru_cache(maxsize=1)
def _templates() -> dict[str, list[str]]:
    return json.loads((ASSETS / "templates.json").read_text(encoding="utf-8"))["templates"]


@functools.lru_cache(maxsize=1)
def imagenet_classnames() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in class-index order (OpenAI's cleaned names)."""
    data = json.loads((ASSETS / "imagenet_classnames.json").read_text(encoding="utf-8"))
    return tuple(data["classnames"])


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """A named template set, or a list of templates each holding one ``{}``."""
    if isinstance(templates, str):
        named = _templates()
        if templates not in named:
            raise InputError(
                f"templates={templates!r} is not a known template set; choose one of {sorted(named)} "
                "or pass a list of strings each containing '{}' where the label goes."
            )
        return tuple(named[templates])
    out = tuple(templates)
    if not out:
        raise InputError("templates is an empty list; pass at least one template such as 'a photo of a {}.'")
    bad = [t for t in out if not isinstance(t, str) or t.count("{}") != 1]
    if bad:
        raise InputError(
            f"templates must each contain '{{}}' exactly once (where the label goes); got {bad[:3]}"
        )
    return out


def check_labels(labels: Sequence[str]) -> tuple[str, ...]:
    labels = tuple(labels)
    if not labels:
        raise InputError("The label list is empty: pass at least one label, e.g. --labels 'cat,dog'.")
    bad = [lab for lab in labels if not isinstance(lab, str) or not lab.strip()]
    if bad:
        raise InputError(f"Labels must be non-empty strings; got {bad[:3]} among {list(labels)[:10]}")
    return labels


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), np.float32(1e-12))


def ensemble_label_embeddings(
    encode_texts: Callable[[list[str]], np.ndarray], labels: Sequence[str], templates: Sequence[str]
) -> np.ndarray:
    """``(len(labels), D)`` unit vectors: per label, the renormalized mean of its normalized prompt
    embeddings. ``encode_texts`` returns normalized embeddings; all prompts go through it in one call."""
    prompts = [t.format(label) for label in labels for t in templates]
    emb = encode_texts(prompts).reshape(len(labels), len(templates), -1)
    return l2_normalize(l2_normalize(emb).mean(axis=1))


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def zero_shot_probs(image_embeds: np.ndarray, label_embeds: np.ndarray, logit_scale: float) -> np.ndarray:
    """softmax(logit_scale * cos) over labels; both inputs are unit vectors. Returns ``(N, L)`` float32."""
    logits = np.float32(logit_scale) * (image_embeds @ label_embeds.T)
    return softmax(logits.astype(np.float32), axis=-1).astype(np.float32)
