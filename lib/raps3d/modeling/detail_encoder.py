"""Image detail for the mask decoder: a small strided CNN on the input image whose features join the decoder's last
upscaling stages (as SAM 2 feeds its high-resolution features to the upscaling).

Why: a patch token (16 x 16 x 4 input voxels) alone must describe a block of 8 x 8 x 4 mask voxels, so masks cannot
follow an edge finer than a patch. Features computed from the image at the mask's own resolution can. Each level's
projection starts at zero: a model given this path starts with the exact outputs of the model it was made from.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def strides_between(coarse: Sequence[int], fine: Sequence[int]) -> tuple[int, ...]:
    """Per-axis stride from grid ``fine`` to grid ``coarse``; each must be 1 or 2 and divide exactly."""
    strides = tuple(f // c for f, c in zip(fine, coarse))
    if any(s not in (1, 2) or c * s != f for s, c, f in zip(strides, coarse, fine)):
        raise ValueError(f"a detail level of shape {tuple(coarse)} cannot follow one of shape {tuple(fine)} "
                         "(each axis must halve or stay)")
    return strides


class DetailEncoder(nn.Module):
    """(B, 1, *input_shape) -> one feature map per level, in the order the decoder's stages visit them (coarse to
    fine); level ``i`` has ``channels[i]`` channels on grid ``shapes[i]``."""

    def __init__(self, input_shape: Sequence[int], shapes: Sequence[Sequence[int]], channels: Sequence[int]):
        super().__init__()
        convs, projections, previous, ch_in = [], [], tuple(input_shape), 1
        for shape, ch in zip(reversed(list(shapes)), reversed(list(channels))):  # the finest level comes first
            stride = strides_between(shape, previous)
            convs.append(nn.Conv3d(ch_in, ch, kernel_size=3, stride=stride, padding=1))
            projection = nn.Conv3d(ch, ch, kernel_size=1)
            nn.init.zeros_(projection.weight)
            nn.init.zeros_(projection.bias)
            projections.append(projection)
            previous, ch_in = shape, ch
        self.convs = nn.ModuleList(convs)
        self.projections = nn.ModuleList(projections)
        self.act = nn.GELU()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, out = image, []
        for conv, projection in zip(self.convs, self.projections):
            x = self.act(conv(x))
            out.append(projection(x))
        return tuple(reversed(out))
