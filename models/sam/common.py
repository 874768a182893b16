"""Small layers shared by the SAM image encoder, prompt encoder and mask decoder.

Parameter names (``lin1``, ``lin2``, ``weight``, ``bias``) equal the keys of the official
segment-anything checkpoints, so these modules load ``sam_vit_*.pth`` with strict checks.
"""

from __future__ import annotations

import torch
from torch import nn


class MLPBlock(nn.Module):
    """Transformer feed-forward block: Linear -> activation -> Linear, acting on the last dimension."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dimension of an NCHW tensor (normalises each pixel's C-vector).

    Written out with mean/var rather than permuting to NHWC and calling ``F.layer_norm`` so that the
    arithmetic is the same as the official model's (parity tests compare to ~1e-6) and exports to
    plain ONNX ops.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)  # biased variance, as nn.LayerNorm
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]
