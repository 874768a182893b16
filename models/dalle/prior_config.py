"""Sizes of the DALL·E prior: :class:`PriorConfig`, the named sizes, the paper's sparse attention layout and
masks, and reading a config from a name or a JSON file (as checkpoints carry it beside them)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from edgefm.runtime.errors import InputError

ATTENTION_PATTERNS = ("dense", "row", "column", "conv")
CLIP_TEXT_VOCAB = 49408  # ids of the CLIP BPE tokenizer the runtime uses for prompts


@dataclass(frozen=True)
class PriorConfig:
    """Sizes of a prior. ``attention`` names each layer's mask; empty means all "dense"."""

    text_vocab: int = CLIP_TEXT_VOCAB + 1  # tokenizer ids + the padding id (the last one)
    text_len: int = 16
    image_vocab: int = 64
    image_grid: int = 8
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    attention: tuple[str, ...] = ()
    conv_kernel: int = 11  # side of the causal neighbourhood of the "conv" mask (odd)
    # Sampling default, not a size: the classifier-free guidance scale s (image logits = u + s·(c − u), c
    # conditioned on the prompt, u on the empty prompt). 1 = no guidance, the only sensible value for a prior
    # never trained on empty captions.
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")
        if self.attention and len(self.attention) != self.n_layers:
            raise ValueError(f"attention names {len(self.attention)} layers, the model has {self.n_layers}")
        unknown = sorted(set(self.attention) - set(ATTENTION_PATTERNS))
        if unknown:
            raise ValueError(f"unknown attention pattern(s) {unknown}; known: {ATTENTION_PATTERNS}")
        if self.conv_kernel % 2 != 1:
            raise ValueError(f"conv_kernel must be odd, got {self.conv_kernel}")
        if not self.guidance_scale >= 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")

    @property
    def image_len(self) -> int:
        return self.image_grid**2

    @property
    def context_len(self) -> int:
        return self.text_len + self.image_len - 1

    @property
    def pad_id(self) -> int:
        return self.text_vocab - 1

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def layer_patterns(self) -> tuple[str, ...]:
        return self.attention or ("dense",) * self.n_layers


def paper_attention(n_layers: int) -> tuple[str, ...]:
    """The paper's layout: column attention where (i - 2) % 4 == 0 (i counted from 1), row attention
    elsewhere, convolutional attention in the last layer."""
    patterns = ["column" if (i - 2) % 4 == 0 else "row" for i in range(1, n_layers + 1)]
    patterns[-1] = "conv"
    return tuple(patterns)


PRIOR_CONFIGS: dict[str, PriorConfig] = {
    # tests and the demo; pairs with the "tiny" dVAE (64 codes, 8×8 grid -> 64² images)
    "tiny": PriorConfig(),
    "tiny_sparse": PriorConfig(attention=("row", "column"), conv_kernel=3),
    # pairs with the official dVAE (8192 codes, 32×32 grid -> 256² images)
    "small": PriorConfig(
        text_len=64, image_vocab=8192, image_grid=32, d_model=256, n_layers=4, n_heads=8,
        attention=paper_attention(4),
    ),
}


def attention_mask(config: PriorConfig, pattern: str) -> torch.Tensor:
    """Bool ``[context_len, context_len]``; entry (q, k) says whether position q may attend to k.

    For an image query at grid index j (row j // g, column j % g, g = image_grid) and an earlier image key
    j' <= j, the patterns allow (following the Sparse Transformer's strided pair the paper builds on):
    "dense": all; "row": the last g positions, j - j' < g; "column": the same column, (j - j') % g == 0;
    "conv": a causal ``conv_kernel``² neighbourhood, |row - row'| and |col - col'| <= conv_kernel // 2.
    """
    n, t, g = config.context_len, config.text_len, config.image_grid
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    qi, ki = q - t, k - t  # image indices; negative on text positions
    if pattern == "dense":
        image_ok = torch.ones(n, n, dtype=torch.bool)
    elif pattern == "row":
        image_ok = (qi - ki) < g
    elif pattern == "column":
        image_ok = (qi - ki) % g == 0
    elif pattern == "conv":
        r = config.conv_kernel // 2
        image_ok = ((qi.div(g, rounding_mode="floor") - ki.div(g, rounding_mode="floor")).abs() <= r) & (
            (qi % g - ki % g).abs() <= r
        )
    else:
        raise ValueError(f"unknown attention pattern {pattern!r}; known: {ATTENTION_PATTERNS}")
    return (k <= q) & ((k < t) | image_ok)


def prior_config_from_json(path: Path) -> tuple[str, PriorConfig]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"prior config {str(path)!r} cannot be read as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise InputError(f"prior config {str(path)!r} must be a JSON object of PriorConfig fields")
    name = str(data.pop("name", path.stem))
    known = {f.name for f in dataclasses.fields(PriorConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"prior config {str(path)!r} has unknown fields {unknown}; known: {sorted(known)}")
    if "attention" in data:
        data["attention"] = tuple(data["attention"])
    try:
        return name, PriorConfig(**data)
    except (TypeError, ValueError) as exc:
        raise InputError(f"prior config {str(path)!r} is invalid: {exc}") from exc


def resolve_prior_config(
    config: str | PriorConfig | Path | None, checkpoint: Path | None = None
) -> tuple[str, PriorConfig]:
    """(name, config) from a ``PRIOR_CONFIGS`` name, a config, a JSON file, or ``<checkpoint stem>.json``."""
    if isinstance(config, PriorConfig):
        return next((k for k, v in PRIOR_CONFIGS.items() if v == config), "custom"), config
    if config is None:
        beside = checkpoint.with_suffix(".json") if checkpoint is not None else None
        if beside is None or not beside.is_file():
            raise InputError(
                f"the sizes of the prior {str(checkpoint)!r} are unknown: pass --prior-config with a name "
                f"({', '.join(PRIOR_CONFIGS)}) or a JSON file of PriorConfig fields, or put "
                f"{beside.name if beside else '<stem>.json'} beside the checkpoint"
            )
        return prior_config_from_json(beside)
    if str(config) in PRIOR_CONFIGS:
        return str(config), PRIOR_CONFIGS[str(config)]
    if Path(config).suffix == ".json" or Path(config).is_file():
        if not Path(config).is_file():
            raise InputError(f"--prior-config {str(config)!r} does not exist")
        return prior_config_from_json(Path(config))
    raise InputError(
        f"--prior-config {str(config)!r} is neither a known prior size ({', '.join(PRIOR_CONFIGS)}) "
        "nor a JSON file of PriorConfig fields"
    )
