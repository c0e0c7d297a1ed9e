"""Two-way-transformer mask decoder with several mask outputs and a predicted-IoU head (SAM's design in 3D)."""

from typing import Sequence

import torch
from monai.networks.nets.vista3d import MLP, TwoWayTransformer
from torch import nn

from .common import LayerNorm3d


def upscale_channels(dim: int, stages: int) -> list[int]:
    """Channels after each upscaling stage of a decoder of width ``dim``."""
    return [max(dim // (4 * 2 ** min(i, 1)), 8) for i in range(stages)]


class MaskDecoder(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, mlp_dim: int, upscale: Sequence[Sequence[int]],
                 num_multimask: int = 3):
        super().__init__()
        self.num_multimask = num_multimask
        self.num_masks = num_multimask + 1  # token 0 is the single-mask output for unambiguous prompts
        self.transformer = TwoWayTransformer(depth=depth, embedding_dim=dim, num_heads=heads, mlp_dim=mlp_dim)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_masks, dim)
        layers, ch = [], dim
        for i, (factor, out) in enumerate(zip(upscale, upscale_channels(dim, len(upscale)))):
            layers.append(nn.ConvTranspose3d(ch, out, kernel_size=tuple(factor), stride=tuple(factor)))
            if i < len(upscale) - 1:
                layers.append(LayerNorm3d(out))
            layers.append(nn.GELU())
            ch = out
        self.output_upscaling = nn.Sequential(*layers)
        self.hypernetworks = nn.ModuleList(MLP(dim, dim, ch, 3) for _ in range(self.num_masks))
        self.iou_head = MLP(dim, dim, self.num_masks, 3)

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                dense: torch.Tensor, multimask: bool, detail: Sequence[torch.Tensor] = ()
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns mask logits (B, M, *mask_shape) and predicted IoU (B, M); M = 3 if multimask else 1.

        ``detail`` holds image features for the last ``len(detail)`` upscaling stages (coarse to fine), each added to
        its stage's output before the stage's norm and activation.
        """
        b = sparse.shape[0]
        tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], 0).unsqueeze(0).expand(b, -1, -1)
        tokens = torch.cat([tokens, sparse], 1)
        src = image_embeddings.expand(b, -1, -1, -1, -1) + dense
        pos = image_pe.expand(b, -1, -1, -1, -1)
        grid = src.shape[2:]
        hs, src = self.transformer(src, pos, tokens)
        iou_out, mask_out = hs[:, 0], hs[:, 1:1 + self.num_masks]
        src = src.transpose(1, 2).reshape(b, -1, *grid)
        up = self._upscale(src, detail)
        hyper = torch.stack([mlp(mask_out[:, i]) for i, mlp in enumerate(self.hypernetworks)], 1)
        masks = (hyper @ up.flatten(2)).reshape(b, self.num_masks, *up.shape[2:])
        iou = self.iou_head(iou_out)
        if multimask:
            return masks[:, 1:], iou[:, 1:]
        return masks[:, :1], iou[:, :1]

    def _upscale(self, x: torch.Tensor, detail: Sequence[torch.Tensor]) -> torch.Tensor:
        # One Sequential (its parameter names are those of checkpoints without detail); detail joins after the
        # transposed convolution of each of the last stages.
        stages = sum(isinstance(m, nn.ConvTranspose3d) for m in self.output_upscaling)
        first_with_detail, stage = stages - len(detail), 0
        for layer in self.output_upscaling:
            x = layer(x)
            if isinstance(layer, nn.ConvTranspose3d):
                if stage >= first_with_detail:
                    x = x + detail[stage - first_with_detail]
                stage += 1
        return x
