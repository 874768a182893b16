"""The discrete VAE of DALL·E (OpenAI's released ``dall_e`` encoder and decoder).

Conventions:
- images are float32 NCHW RGB in [0, 1]; the encoder expects them *mapped* with :func:`map_pixels`
  (x -> (1 - 2·eps)·x + eps, eps = 0.1, the logit-Laplace range) and the decoder's statistics are turned
  back into pixels with ``unmap_pixels(sigmoid(stats[:, :3]))`` (see :meth:`Decoder.decode_to_image`);
- the encoder downsamples by 8: a 256² image gives a 32×32 grid of logits over ``vocab_size`` codes
  (``[B, vocab, H/8, W/8]``); token ids are ``int64 [B, H/8, W/8]``;
- the decoder output has ``2 * output_channels`` channels: the first 3 are the logits of the logit-Laplace
  mean, the last 3 its log-scale.

Module and parameter names (``blocks.group_1.block_1.res_path.conv_1.w`` ...) equal the keys of the
``dall_e`` modules, so the official weights load with strict checks (see :mod:`.pickle_loader`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LOGIT_LAPLACE_EPS = 0.1
# Four resolution groups whose widths are these multiples of n_hid (encoder order; the decoder reverses).
GROUP_WIDTHS = (1, 2, 4, 8)


@dataclass(frozen=True)
class DvaeConfig:
    """Sizes of a dVAE; ``official`` is the released 8192-code model."""

    n_hid: int = 256
    n_init: int = 128  # decoder only: width of the embedding of the codes
    n_blk_per_group: int = 2
    input_channels: int = 3
    output_channels: int = 3
    vocab_size: int = 8192

    @property
    def n_layers(self) -> int:
        """Residual blocks in the whole network; sets the residual gain 1 / n_layers²."""
        return len(GROUP_WIDTHS) * self.n_blk_per_group

    @property
    def downsample(self) -> int:
        """Image side / grid side (three 2× poolings)."""
        return 2 ** (len(GROUP_WIDTHS) - 1)


DVAE_CONFIGS: dict[str, DvaeConfig] = {
    "official": DvaeConfig(),
    "tiny": DvaeConfig(n_hid=16, n_init=8, n_blk_per_group=1, vocab_size=64),
}


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """[0, 1] pixels -> [eps, 1 - eps], the support the logit-Laplace likelihood was trained on."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """Inverse of :func:`map_pixels`, clamped to [0, 1]."""
    return torch.clamp((x - eps) / (1 - 2 * eps), 0, 1)


class Conv2d(nn.Module):
    """'Same' convolution with odd kernel ``kw`` whose parameters are called ``w`` and ``b`` (as in dall_e).

    Initialised like the original: N(0, 1/fan_in) weights, zero bias. Always computes in the dtype of
    its weights (the original's CUDA float16 switch is left to export-time precision choices).
    """

    def __init__(self, n_in: int, n_out: int, kw: int) -> None:
        super().__init__()
        if kw % 2 != 1:
            raise ValueError(f"kernel width must be odd, got {kw}")
        self.kw = kw
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw * kw))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


class ResidualBlock(nn.Module):
    """x -> id_path(x) + res_path(x) / n_layers², with a 4× bottleneck in the residual path.

    The encoder uses kernels (3, 3, 3, 1) and the decoder (1, 3, 3, 3); the identity path is a 1×1
    convolution only where the width changes (otherwise it has no parameters, as in the original).
    """

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]) -> None:
        super().__init__()
        if n_out % 4 != 0:
            raise ValueError(f"block width must be a multiple of 4, got {n_out}")
        n_mid = n_out // 4
        self.post_gain = 1 / (n_layers**2)
        self.id_path: nn.Module = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = (n_in, n_mid, n_mid, n_mid, n_out)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, kw in enumerate(kernels):
            # ReLU comes *before* each conv (pre-activation), so the block output itself is not rectified.
            layers[f"relu_{i + 1}"] = nn.ReLU()
            layers[f"conv_{i + 1}"] = Conv2d(widths[i], widths[i + 1], kw)
        self.res_path = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _group(
    blocks: list[tuple[int, int]],
    n_layers: int,
    kernels: tuple[int, int, int, int],
    resample: tuple[str, nn.Module] | None,
) -> nn.Sequential:
    """One resolution group: ``block_1..block_n`` then an optional pool/upsample layer."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        (f"block_{i + 1}", ResidualBlock(n_in, n_out, n_layers, kernels))
        for i, (n_in, n_out) in enumerate(blocks)
    )
    if resample is not None:
        layers[resample[0]] = resample[1]
    return nn.Sequential(layers)


class Encoder(nn.Module):
    """Mapped image ``[B, 3, H, W]`` -> code logits ``[B, vocab_size, H/8, W/8]``."""

    def __init__(self, config: DvaeConfig) -> None:
        super().__init__()
        self.config = config
        c, n = config, config.n_blk_per_group
        layers: OrderedDict[str, nn.Module] = OrderedDict(input=Conv2d(c.input_channels, c.n_hid, 7))
        width = c.n_hid
        for g, mult in enumerate(GROUP_WIDTHS):
            out = mult * c.n_hid
            blocks = [(width if i == 0 else out, out) for i in range(n)]
            last = g == len(GROUP_WIDTHS) - 1
            pool = None if last else ("pool", nn.MaxPool2d(kernel_size=2))
            layers[f"group_{g + 1}"] = _group(blocks, c.n_layers, (3, 3, 3, 1), pool)
            width = out
        layers["output"] = nn.Sequential(
            OrderedDict(relu=nn.ReLU(), conv=Conv2d(width, c.vocab_size, 1))
        )
        self.blocks = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def encode_ids(self, image: torch.Tensor) -> torch.Tensor:
        """Image in [0, 1] ``[B, 3, H, W]`` -> most likely codes ``int64 [B, H/8, W/8]``."""
        return torch.argmax(self(map_pixels(image)), dim=1)


class Decoder(nn.Module):
    """One-hot codes ``[B, vocab_size, h, w]`` -> statistics ``[B, 2 * output_channels, 8h, 8w]``."""

    def __init__(self, config: DvaeConfig) -> None:
        super().__init__()
        self.config = config
        c, n = config, config.n_blk_per_group
        layers: OrderedDict[str, nn.Module] = OrderedDict(input=Conv2d(c.vocab_size, c.n_init, 1))
        width = c.n_init
        widths = tuple(reversed(GROUP_WIDTHS))
        for g, mult in enumerate(widths):
            out = mult * c.n_hid
            blocks = [(width if i == 0 else out, out) for i in range(n)]
            last = g == len(widths) - 1
            up = None if last else ("upsample", nn.Upsample(scale_factor=2, mode="nearest"))
            layers[f"group_{g + 1}"] = _group(blocks, c.n_layers, (1, 3, 3, 3), up)
            width = out
        layers["output"] = nn.Sequential(
            OrderedDict(relu=nn.ReLU(), conv=Conv2d(width, 2 * c.output_channels, 1))
        )
        self.blocks = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def forward_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Codes ``int64 [B, h, w]`` -> the same statistics as ``self(one_hot(ids))``.

        The input layer is a 1×1 convolution over a one-hot vector, i.e. a column lookup in its weight;
        gathering instead of convolving avoids materialising the 8192-channel one-hot (and exports as
        a Gather).
        """
        table = self.blocks.input.w[:, :, 0, 0].t()  # [vocab, n_init]
        x = F.embedding(ids, table) + self.blocks.input.b  # [B, h, w, n_init]
        x = x.permute(0, 3, 1, 2)
        for name, layer in self.blocks.named_children():
            if name != "input":
                x = layer(x)
        return x

    def decode_to_image(self, ids: torch.Tensor) -> torch.Tensor:
        """Codes ``int64 [B, h, w]`` -> RGB image in [0, 1], ``float32 [B, 3, 8h, 8w]``."""
        stats = self.forward_ids(ids)
        return unmap_pixels(torch.sigmoid(stats[:, :3]))


class DecoderFromIds(nn.Module):
    """Export wrapper: token ids -> image in [0, 1] (embedding lookup, sigmoid and unmap in the graph)."""

    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.decode_to_image(ids)


class EncoderToIds(nn.Module):
    """Export wrapper: image in [0, 1] ``[B, 3, H, W]`` -> codes ``int64 [B, H/8, W/8]`` (map + argmax)."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode_ids(image)


def build_encoder(name_or_config: str | DvaeConfig = "official") -> Encoder:
    """Encoder for a named size (``DVAE_CONFIGS``) or an explicit config, randomly initialised."""
    return Encoder(_config(name_or_config))


def build_decoder(name_or_config: str | DvaeConfig = "official") -> Decoder:
    """Decoder for a named size (``DVAE_CONFIGS``) or an explicit config, randomly initialised."""
    return Decoder(_config(name_or_config))


def infer_dvae_config(state_dict: dict[str, torch.Tensor], kind: str) -> DvaeConfig:
    """Sizes of a dVAE ``kind`` ("encoder" | "decoder") read off its state-dict shapes.

    Raises KeyError when a key every dVAE has is absent (callers turn that into a CheckpointError).
    """
    n_blk = sum(1 for k in state_dict if k.startswith("blocks.group_1.") and k.endswith(".res_path.conv_1.w"))
    first, last = state_dict["blocks.input.w"], state_dict["blocks.output.conv.w"]
    if kind == "encoder":
        return DvaeConfig(
            n_hid=first.shape[0],
            n_blk_per_group=n_blk,
            input_channels=first.shape[1],
            vocab_size=last.shape[0],
        )
    return DvaeConfig(
        n_hid=last.shape[1],
        n_init=first.shape[0],
        n_blk_per_group=n_blk,
        output_channels=last.shape[0] // 2,
        vocab_size=first.shape[1],
    )


def _config(name_or_config: str | DvaeConfig) -> DvaeConfig:
    if isinstance(name_or_config, DvaeConfig):
        return name_or_config
    if name_or_config not in DVAE_CONFIGS:
        raise ValueError(f"unknown dVAE size {name_or_config!r}; known: {', '.join(DVAE_CONFIGS)}")
    return DVAE_CONFIGS[name_or_config]
