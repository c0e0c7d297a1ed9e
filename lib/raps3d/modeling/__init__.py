"""Raps-3D network modules (one small file each, like segment-anything's modeling/)."""

from .prompt_encoder import BOX_MAX, BOX_MIN, NEGATIVE, PAD, POSITIVE
from .raps3d import CONFIGS, ImageFeatures, ModelConfig, Raps3D, build_model

__all__ = ["CONFIGS", "ImageFeatures", "ModelConfig", "Raps3D", "build_model", "PAD", "NEGATIVE", "POSITIVE",
           "BOX_MIN", "BOX_MAX"]
