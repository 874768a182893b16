"""Drawing image tokens from the prior's logits: temperature, top-k, top-p (nucleus) and classifier-free guidance,
in numpy (float64), as :class:`~edgefm.runtime.dalle.generator.DalleGenerator` uses them."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InputError


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, guidance: float = 1.0) -> None:
    """Raise InputError for a temperature < 0, top_k < 1, top_p outside (0, 1] or a guidance scale < 0."""
    def number(x: Any) -> bool:
        return isinstance(x, (int, float, np.number)) and not isinstance(x, bool)

    if not number(guidance) or not np.isfinite(guidance) or guidance < 0:
        raise InputError(f"guidance (the classifier-free guidance scale) must be >= 0 (1 = none), got {guidance}")

    if not number(temperature) or not np.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not number(top_k) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise InputError(f"top_k must be a whole number >= 1 (or None for no top-k), got {top_k}")
    if top_p is not None and (not number(top_p) or not 0 < top_p <= 1):
        raise InputError(f"top_p must be in (0, 1] (or None for no nucleus filtering), got {top_p}")


def filter_logits(logits: np.ndarray, top_k: int | None = None, top_p: float | None = None) -> np.ndarray:
    """float64 copy of logits ``[B, V]`` with the tokens top-k / top-p remove set to -inf."""
    x = np.array(logits, dtype=np.float64)
    if top_k is not None and top_k < x.shape[-1]:
        kth = -np.partition(-x, top_k - 1, axis=-1)[:, top_k - 1 : top_k]
        x[x < kth] = -np.inf
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-x, axis=-1, kind="stable")
        probs = softmax(np.take_along_axis(x, order, axis=-1))
        mass_before = np.cumsum(probs, axis=-1) - probs
        # A token stays while the more likely ones hold less than p; the most likely always stays.
        drop = mass_before >= top_p
        drop[:, 0] = False
        np.put_along_axis(x, order, np.where(drop, -np.inf, np.take_along_axis(x, order, axis=-1)), axis=-1)
    return x


def guided_logits(conditional: np.ndarray, unconditional: np.ndarray, scale: float) -> np.ndarray:
    """Classifier-free guidance: ``u + scale · (c - u)`` (float64); scale 1 gives ``c``, 0 gives ``u``."""
    c, u = np.asarray(conditional, np.float64), np.asarray(unconditional, np.float64)
    return u + scale * (c - u)


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float64; -inf entries get probability 0."""
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def token_probabilities(
    logits: np.ndarray, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> np.ndarray:
    """The distribution :func:`sample_tokens` draws from, ``[B, V]`` float64 (temperature > 0)."""
    return softmax(filter_logits(np.asarray(logits, np.float64) / temperature, top_k, top_p))


def sample_tokens(
    logits: np.ndarray,
    rng: np.random.Generator,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> np.ndarray:
    """One token per row of ``logits [B, V]`` -> int64 ``[B]``; ``temperature=0`` takes the argmax."""
    if temperature == 0:
        return np.argmax(logits, axis=-1).astype(np.int64)
    cdf = np.cumsum(token_probabilities(logits, temperature, top_k, top_p), axis=-1)
    u = rng.random(cdf.shape[0])[:, None] * cdf[:, -1:]
    # The first index whose CDF exceeds u; removed tokens add no mass, so they are never chosen.
    return np.minimum((cdf <= u).sum(axis=-1), cdf.shape[-1] - 1).astype(np.int64)
