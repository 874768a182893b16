"""SAM prompt encoder: points, boxes and a low-resolution mask -> sparse and dense prompt embeddings.

Conventions:
- point coordinates are ``B x N x 2``, (X, Y) in pixels of the resized (not padded) model input,
  i.e. in the ``input_image_size`` frame (1024 x 1024 officially);
- point labels are ``B x N``: 1 foreground, 0 background, -1 padding ("not a point"), and, as in the
  official ONNX model, 2 / 3 for the top-left / bottom-right corner of a box;
- boxes are ``B x 4`` XYXY in the same pixel frame;
- the mask prompt is ``B x 1 x 4H x 4W`` logits (256 x 256 officially), H x W the image embedding grid.

Positions are encoded with random Fourier features (a fixed Gaussian matrix stored in the checkpoint).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import LayerNorm2d


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier feature encoding of (x, y) in [0, 1]^2 -> ``2 * num_pos_feats`` channels (sin | cos)."""

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        # a persistent buffer: it is part of the official state dict and must be loaded, not re-drawn
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats)))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """``... x 2`` coords in [0, 1] -> ``... x C`` features."""
        coords = 2 * coords - 1  # to [-1, 1]
        coords = coords @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of the centres of an (H, W) grid: ``C x H x W``."""
        h, w = size
        grid = torch.ones((h, w), device=self.positional_encoding_gaussian_matrix.device, dtype=torch.float32)
        y_embed = (grid.cumsum(dim=0) - 0.5) / h
        x_embed = (grid.cumsum(dim=1) - 0.5) / w
        pe = self._pe_encoding(torch.stack([x_embed, y_embed], dim=-1))
        return pe.permute(2, 0, 1)  # H W C -> C H W

    def forward_with_coords(self, coords_input: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Encode ``B x N x 2`` (X, Y) pixel coords in an image of (H, W) = ``image_size``: ``B x N x C``."""
        coords = coords_input.clone()
        coords[:, :, 0] = coords[:, :, 0] / image_size[1]
        coords[:, :, 1] = coords[:, :, 1] / image_size[0]
        return self._pe_encoding(coords.to(torch.float))


class PromptEncoder(nn.Module):
    """Encodes prompts for the mask decoder.

    ``point_embeddings`` holds four learned type vectors: [0] background point, [1] foreground point,
    [2] box top-left corner, [3] box bottom-right corner.
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        """
        Args:
            embed_dim: prompt embedding width (256 officially).
            image_embedding_size: (H, W) of the image embedding grid (64 x 64).
            input_image_size: (H, W) of the padded model input (1024 x 1024).
            mask_in_chans: hidden channels of the mask downscaler (16).
        """
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)

        self.num_point_embeddings: int = 4  # background, foreground, box corner 1, box corner 2
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)

        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        # two stride-2 convs bring the 4H x 4W mask to the H x W embedding grid
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid: ``1 x embed_dim x H x W``."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        points = points + 0.5  # pixel index -> pixel centre
        if pad:
            # without a box, one "not a point" token keeps the token count the decoder was trained with
            padding_point = torch.zeros((points.shape[0], 1, 2), device=points.device)
            padding_label = -torch.ones((labels.shape[0], 1), device=labels.device)
            points = torch.cat([points, padding_point], dim=1)
            labels = torch.cat([labels, padding_label], dim=1)
        point_embedding = self.pe_layer.forward_with_coords(points, self.input_image_size)
        # branch-free masking (same values as the official boolean-index assignments) so that the
        # module traces to ONNX; label i in 0..3 adds type vector i, -1 replaces the encoding
        labels = labels[..., None]
        point_embedding = torch.where(labels == -1, self.not_a_point_embed.weight, point_embedding)
        for i in range(self.num_point_embeddings):
            point_embedding = point_embedding + self.point_embeddings[i].weight * (labels == i)
        return point_embedding

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        boxes = boxes + 0.5  # pixel index -> pixel centre
        coords = boxes.reshape(-1, 2, 2)  # B x 4 -> B x 2 corners x (X, Y)
        corner_embedding = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        corner_embedding[:, 0, :] += self.point_embeddings[2].weight
        corner_embedding[:, 1, :] += self.point_embeddings[3].weight
        return corner_embedding

    def _embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        return self.mask_downscaling(masks)

    @staticmethod
    def _get_batch_size(
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> int:
        if points is not None:
            return points[0].shape[0]
        if boxes is not None:
            return boxes.shape[0]
        if masks is not None:
            return masks.shape[0]
        return 1

    def _get_device(self) -> torch.device:
        return self.point_embeddings[0].weight.device

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed any combination of prompts.

        Args:
            points: (coords ``B x N x 2`` XY pixels, labels ``B x N``) or None.
            boxes: ``B x 4`` XYXY pixels or None.
            masks: ``B x 1 x 4H x 4W`` mask logits or None.

        Returns:
            sparse embeddings ``B x T x embed_dim`` (T = N points [+1 pad when no box] + 2 per box) and
            dense embeddings ``B x embed_dim x H x W``.
        """
        bs = self._get_batch_size(points, boxes, masks)
        sparse_embeddings = torch.empty((bs, 0, self.embed_dim), device=self._get_device())
        if points is not None:
            coords, labels = points
            point_embeddings = self._embed_points(coords, labels, pad=boxes is None)
            sparse_embeddings = torch.cat([sparse_embeddings, point_embeddings], dim=1)
        if boxes is not None:
            box_embeddings = self._embed_boxes(boxes)
            sparse_embeddings = torch.cat([sparse_embeddings, box_embeddings], dim=1)

        if masks is not None:
            dense_embeddings = self._embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense_embeddings = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(bs, -1, h, w)
        return sparse_embeddings, dense_embeddings
