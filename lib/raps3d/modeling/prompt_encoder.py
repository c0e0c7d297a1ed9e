"""Prompt encoder: points, a 2D box drawn on one slice, and a dense mask prompt (previous low-resolution logits)."""

from typing import Sequence

import torch
from monai.networks.nets.vista3d import PositionEmbeddingRandom
from torch import nn

from .common import LayerNorm3d

# Point labels. A box is two corner points on one slice with their own types, so the model knows the depth extent
# is open (SAM uses the same idea for the two corners of a 2D box).
PAD, NEGATIVE, POSITIVE, BOX_MIN, BOX_MAX = -1, 0, 1, 2, 3


class PromptEncoder(nn.Module):
    def __init__(self, dim: int, input_shape: Sequence[int], grid_shape: Sequence[int], mask_shape: Sequence[int]):
        super().__init__()
        self.dim = dim
        self.input_shape = tuple(input_shape)
        self.grid_shape = tuple(grid_shape)
        self.mask_shape = tuple(mask_shape)
        self.pe_layer = PositionEmbeddingRandom(dim // 2)
        self.point_embeddings = nn.Embedding(4, dim)
        self.not_a_point = nn.Embedding(1, dim)
        ratio = tuple(m // g for m, g in zip(mask_shape, grid_shape))
        hidden = max(dim // 4, 8)
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, hidden, kernel_size=ratio, stride=ratio), LayerNorm3d(hidden), nn.GELU(),
            nn.Conv3d(hidden, dim, kernel_size=1),
        )
        self.no_mask = nn.Embedding(1, dim)

    def dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image feature grid, (1, dim, *grid_shape)."""
        return self.pe_layer(self.grid_shape)[None]

    def forward(self, coords: torch.Tensor, labels: torch.Tensor, mask_logits: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """coords (B, N, 3) continuous (d, h, w) frame coordinates, labels (B, N); mask_logits (B, 1, *mask_shape).

        Returns sparse (B, N + 1, dim) and dense (B, dim, *grid_shape) embeddings.
        """
        b = coords.shape[0]
        # One padding point, as SAM adds when there is no box: keeps the token count >= 2 and the model calibrated.
        coords = torch.cat([coords, torch.zeros(b, 1, 3, dtype=coords.dtype, device=coords.device)], 1)
        labels = torch.cat([labels, torch.full((b, 1), PAD, dtype=labels.dtype, device=labels.device)], 1)
        sparse = self.pe_layer.forward_with_coords(coords.float() + 0.5, self.input_shape)
        pad = (labels == PAD)[..., None]
        typed = self.point_embeddings(labels.clamp(min=0))
        sparse = torch.where(pad, self.not_a_point.weight.expand_as(sparse), sparse + typed)
        if mask_logits is None:
            dense = self.no_mask.weight.reshape(1, -1, 1, 1, 1).expand(b, -1, *self.grid_shape)
        else:
            dense = self.mask_downscaling(mask_logits.float())
        return sparse, dense
