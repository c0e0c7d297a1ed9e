"""The Raps-3D network: image encoder + prompt encoder + mask decoder, and its named configurations."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from .detail_encoder import DetailEncoder
from .image_encoder import ImageEncoder
from .mask_decoder import MaskDecoder, upscale_channels
from .prompt_encoder import PromptEncoder


@dataclass(frozen=True)
class ModelConfig:
    name: str
    input_shape: tuple[int, int, int]  # (D, H, W) = (slices, rows, columns)
    patch_size: tuple[int, int, int]
    width: int
    depth: int
    heads: int
    mlp_dim: int
    prompt_dim: int
    decoder_depth: int
    decoder_heads: int
    decoder_mlp_dim: int
    mask_upscale: tuple[tuple[int, int, int], ...] = field(default=((2, 2, 2), (2, 2, 2)))
    # How many of the decoder's last upscaling stages receive image detail features (0: none, as in checkpoints
    # made before the detail path existed).
    detail_levels: int = 0

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        return tuple(s // p for s, p in zip(self.input_shape, self.patch_size))

    @property
    def upscale_shapes(self) -> list[tuple[int, int, int]]:
        """The decoder's grid after each upscaling stage; the last is the mask grid."""
        shapes, shape = [], self.grid_shape
        for factor in self.mask_upscale:
            shape = tuple(s * f for s, f in zip(shape, factor))
            shapes.append(shape)
        return shapes

    @property
    def mask_shape(self) -> tuple[int, int, int]:
        return self.upscale_shapes[-1]

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "ModelConfig":
        d = dict(d)
        d["input_shape"] = tuple(d["input_shape"])
        d["patch_size"] = tuple(d["patch_size"])
        d["mask_upscale"] = tuple(tuple(f) for f in d["mask_upscale"])
        return ModelConfig(**d)


CONFIGS = {
    # The paper's encoder: SegVol's ViT-B on (32, 256, 256) with (4, 16, 16) patches, 2048 tokens.
    "segvol": ModelConfig("segvol", (32, 256, 256), (4, 16, 16), 768, 12, 12, 3072,
                          prompt_dim=256, decoder_depth=2, decoder_heads=8, decoder_mlp_dim=2048,
                          mask_upscale=((2, 2, 2), (2, 2, 2))),
    # CPU default: 512 tokens on (32, 128, 128); chosen so two encoder passes fit a 1 s first prediction on
    # 2 CPU cores (see bench/bench_predictor.py).
    "lite": ModelConfig("lite", (32, 128, 128), (4, 16, 16), 256, 6, 8, 1024,
                        prompt_dim=128, decoder_depth=2, decoder_heads=4, decoder_mlp_dim=512,
                        mask_upscale=((2, 2, 2), (2, 2, 2), (1, 2, 2)), detail_levels=2),
}


@dataclass(frozen=True)
class ImageFeatures:
    """What the encoder computes once per frame and every decode reuses: the patch embedding (B, C, *grid_shape)
    and the detail features of the decoder's last stages (coarse to fine; empty without a detail path)."""

    embedding: torch.Tensor
    detail: tuple[torch.Tensor, ...] = ()

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "ImageFeatures":
        """The same features with ``fn`` applied to every tensor (select items, detach, move, cast)."""
        return ImageFeatures(fn(self.embedding), tuple(fn(d) for d in self.detail))


class Raps3D(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoder(config.input_shape, config.patch_size, config.width, config.depth,
                                          config.heads, config.mlp_dim, config.prompt_dim)
        self.prompt_encoder = PromptEncoder(config.prompt_dim, config.input_shape, config.grid_shape,
                                            config.mask_shape)
        self.mask_decoder = MaskDecoder(config.prompt_dim, config.decoder_depth, config.decoder_heads,
                                        config.decoder_mlp_dim, config.mask_upscale)
        stages, levels = len(config.mask_upscale), config.detail_levels
        if not 0 <= levels <= stages:
            raise ValueError(f"detail_levels must be 0..{stages}, got {levels}")
        self.detail_encoder = DetailEncoder(
            config.input_shape, config.upscale_shapes[stages - levels:],
            upscale_channels(config.prompt_dim, stages)[stages - levels:],
        ) if levels else None
        # The logit above which a voxel belongs to the mask. 0 after training; a calibration on training cases
        # (raps3d.training.calibrate) may lower it for a model that under-segments. Saved with the weights.
        self.register_buffer("mask_threshold", torch.zeros(()))

    def encode(self, image: torch.Tensor) -> ImageFeatures:
        """(B, 1, *input_shape) in [0, 1] -> image features: embedding (B, prompt_dim, *grid_shape) and detail."""
        detail = self.detail_encoder(image) if self.detail_encoder is not None else ()
        return ImageFeatures(self.image_encoder(image), detail)

    def decode(self, features: ImageFeatures, coords: torch.Tensor, labels: torch.Tensor,
               mask_logits: torch.Tensor | None = None, multimask: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits (B, M, *mask_shape) and predicted IoU (B, M) for prompts in frame coordinates.

        ``features`` may have batch 1 and be shared by B prompt sets.
        """
        sparse, dense = self.prompt_encoder(coords, labels, mask_logits)
        return self.mask_decoder(features.embedding, self.prompt_encoder.dense_pe(), sparse, dense, multimask,
                                 features.detail)

    def forward(self, image, coords, labels, mask_logits=None, multimask=False):
        return self.decode(self.encode(image), coords, labels, mask_logits, multimask)


def build_model(config: str | ModelConfig = "lite") -> Raps3D:
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"unknown model configuration {config!r}; choose one of {sorted(CONFIGS)}")
        config = CONFIGS[config]
    return Raps3D(config)
