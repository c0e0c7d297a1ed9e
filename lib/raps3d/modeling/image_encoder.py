"""ViT image encoder: MONAI's ViT (SegVol-compatible layout) plus a SAM-style neck to the prompt dimension."""

from typing import Sequence

import torch
from monai.networks.nets import ViT
from torch import nn

from .common import LayerNorm3d


class ImageEncoder(nn.Module):
    def __init__(self, input_shape: Sequence[int], patch_size: Sequence[int], width: int, depth: int, heads: int,
                 mlp_dim: int, out_dim: int):
        super().__init__()
        self.grid_shape = tuple(s // p for s, p in zip(input_shape, patch_size))
        # proj_type/pos_embed_type as below reproduce SegVol's (MONAI 0.9 'perceptron') parameter names.
        self.vit = ViT(in_channels=1, img_size=tuple(input_shape), patch_size=tuple(patch_size), hidden_size=width,
                       mlp_dim=mlp_dim, num_layers=depth, num_heads=heads, proj_type="perceptron",
                       pos_embed_type="learnable", classification=False)
        for block in self.vit.blocks:
            # Same outputs, ~1.6x faster on CPU (PyTorch's fused attention).
            block.attn.use_flash_attention = True
        self.neck = nn.Sequential(
            nn.Conv3d(width, out_dim, 1, bias=False), LayerNorm3d(out_dim),
            nn.Conv3d(out_dim, out_dim, 3, padding=1, bias=False), LayerNorm3d(out_dim),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) in [0, 1] -> features (B, out_dim, D/pd, H/ph, W/pw)."""
        tokens, _ = self.vit(image)
        b, n, c = tokens.shape
        # MONAI's perceptron patch embedding orders tokens D-major over (D, H, W).
        grid = tokens.transpose(1, 2).reshape(b, c, *self.grid_shape)
        return self.neck(grid)
