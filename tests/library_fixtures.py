"""Shared helpers of the library tests: small models with known behaviour and the real CT folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from raps3d import Engine, ImageState
from raps3d.modeling import build_model
from raps3d.training.data import data_root, read_zyx


SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "model" / "raps3d_lite.pt"


def untrained_engine(seed: int = 0) -> Engine:
    torch.manual_seed(seed)
    return Engine(build_model("lite"))


def empty_mask_engine() -> Engine:
    """A model whose masks are empty everywhere (the last hypernetwork layers are zero): the ROI then comes only
    from the prompts, which makes the zoom-in region predictable."""
    engine = untrained_engine()
    with torch.no_grad():
        for mlp in engine.model.mask_decoder.hypernetworks:
            mlp.layers[-1].weight.zero_()
            mlp.layers[-1].bias.zero_()
    return engine


def real_ct(relative: str) -> tuple[np.ndarray, tuple]:
    path = data_root() / relative
    if not path.exists():
        pytest.skip(f"real CT not found at {path} (set RAPS3D_DATA to the data folder)")
    return read_zyx(path)


def synthetic_volume(shape=(40, 70, 90), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 1500, size=shape).astype(np.int16)


def open_image(engine: Engine, volume, spacing=(2.5, 0.8, 0.8)) -> ImageState:
    return ImageState(engine, volume, spacing)
