"""Tiny CLIPs with seeded random weights, their open_clip twins, and exported bundles (built once per run)."""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from pathlib import Path

import numpy as np

QUICK_GELU = {"tiny-vit": True, "tiny-rn": False}


def reference_for(config, quick_gelu: bool | None = None):
    """open_clip's CLIP with the shapes of ``config`` and its activation (or ``quick_gelu`` when given)."""
    import open_clip

    if config.is_vit:
        vision = dict(image_size=config.image_size, layers=config.vision_layers, width=config.vision_width,
                      patch_size=config.vision_patch_size)
    else:
        vision = dict(image_size=config.image_size, layers=list(config.vision_layers),
                      width=config.vision_width)
    text = dict(context_length=config.context_length, vocab_size=config.vocab_size, width=config.text_width,
                heads=config.text_heads, layers=config.text_layers)
    quick_gelu = config.quick_gelu if quick_gelu is None else quick_gelu
    return open_clip.model.CLIP(config.embed_dim, vision, text, quick_gelu=quick_gelu).eval()


def randomize_all_(model, seed: int, logit_scale: bool = False):
    """Every float tensor random (open_clip zero-inits some; BatchNorm statistics made non-trivial); the
    temperature ``logit_scale`` too only when asked (exported bundles keep a realistic one)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point() or (name.endswith("logit_scale") and not logit_scale):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * (0.05 if t.dim() > 1 else 0.2))
    return model


@functools.cache
def tiny_pair(name: str):
    """``(ours, open_clip reference)`` holding the same random weights."""
    from edgefm.models.clip import CLIP_CONFIGS, build_clip

    config = dataclasses.replace(CLIP_CONFIGS[name], quick_gelu=QUICK_GELU[name])
    ref = randomize_all_(reference_for(config), seed=1)
    ours = build_clip(config)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours.eval(), ref


_BUNDLES = tempfile.TemporaryDirectory(prefix="edgefm-clip-")  # removed when the test process exits


def tiny_bundle(name: str, precision: str = "fp32", attention: str = "plain") -> Path:
    return _tiny_bundle(name, precision, attention)  # one cache entry however the defaults were passed


@functools.cache
def _tiny_bundle(name: str, precision: str, attention: str) -> Path:
    from edgefm.export.clip import export_clip

    out = Path(_BUNDLES.name) / f"{name}-{precision}-{attention}"
    return export_clip(tiny_pair(name)[0], out, precision=precision, attention=attention)


def picture(seed: int, h: int = 90, w: int = 120) -> np.ndarray:
    """A smooth colourful HWC uint8 RGB picture (gradients + blobs), different per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    chans = []
    for _ in range(3):
        fx, fy, ph = rng.uniform(0.01, 0.1, 2).tolist() + [rng.uniform(0, 6.3)]
        chans.append(127.5 + 127.5 * np.sin(fx * x + fy * y + ph))
    return np.clip(np.stack(chans, axis=-1), 0, 255).astype(np.uint8)
