"""Tiny seeded DALL·E models and their exported bundle, shared by the export and runtime tests.

Imported by test modules (not a conftest): ``tiny_models()`` builds the same weights on every call and
``tiny_bundle(tmp_path_factory)`` exports them once per test session.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

_BUNDLE: dict[str, Path] = {}


def seeded_(module, seed: int, std: float = 0.1):
    """Give every bias (``.b`` in the dVAE, ``.bias`` elsewhere) and LayerNorm scale a seeded random value,
    so that a bias or norm wired wrongly in an exported graph cannot hide behind an init of zeros/ones."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("b", "bias"):
                p.copy_(std * torch.randn(p.shape, generator=g))
            elif leaf == "weight" and (".ln_" in name or name.startswith("ln_")):
                p.copy_(1 + std * torch.randn(p.shape, generator=g))
    return module.eval()


def tiny_models(prior_config: str = "tiny", seed: int = 0):
    """(decoder, encoder, prior): the tiny dVAE (64 codes, 8×8 grid, 64² images) and a tiny prior."""
    import torch
    from edgefm.models.dalle import build_decoder, build_encoder, build_prior

    torch.manual_seed(seed)
    decoder, encoder, prior = build_decoder("tiny"), build_encoder("tiny"), build_prior(prior_config)
    return seeded_(decoder, seed + 1), seeded_(encoder, seed + 2), seeded_(prior, seed + 3)


def tiny_bundle(tmp_path_factory) -> Path:
    """The fp32 bundle of :func:`tiny_models` with all four components (exported once per session)."""
    if "tiny" not in _BUNDLE:
        from edgefm.export.dalle import export_dalle

        decoder, encoder, prior = tiny_models()
        _BUNDLE["tiny"] = export_dalle(tmp_path_factory.mktemp("dalle") / "tiny", decoder, encoder, prior)
    return _BUNDLE["tiny"]


def smooth_picture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """HWC uint8 RGB made of low-frequency sinusoids (dVAE argmaxes on it are not near-tied)."""
    from edgefm.export.dalle import smooth_images

    rng = np.random.default_rng(seed)
    image = smooth_images(1, max(h, w), seed=int(rng.integers(1 << 30)))[0, :, :h, :w]
    return np.ascontiguousarray((image.transpose(1, 2, 0) * 255).round().astype(np.uint8))


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models run faster on the 2 shared cores without intra-op threading contention (autouse in every
    test module that imports it)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
