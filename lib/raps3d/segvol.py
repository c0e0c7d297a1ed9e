"""Import SegVol's pretrained ViT into the ``segvol`` configuration's image encoder.

SegVol released its encoder in two layouts: ``ViT_pretrain.ckpt`` (a Lightning checkpoint, keys under
``state_dict`` with the prefix ``model.encoder.``) and ``SegVol_v1.pth`` (keys under ``model`` with the prefix
``module.image_encoder.``). Both hold the 137 tensors of MONAI's ViT-B; newer MONAI adds cross-attention norms that
SegVol never had, which are the only keys allowed to stay missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import CheckpointError
from .modeling import Raps3D

LAYOUTS = (("state_dict", "model.encoder."), ("model", "module.image_encoder."))
ALLOWED_MISSING = "norm_cross_attn."


def read_segvol_encoder(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ViT tensors of a SegVol checkpoint, with the layout's prefix removed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no SegVol checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path} as a SegVol checkpoint: {e}") from e
    for container, prefix in LAYOUTS:
        state = payload.get(container) if isinstance(payload, dict) else None
        if isinstance(state, dict):
            found = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if found:
                return found
    raise CheckpointError(f"{path} has neither SegVol layout: expected keys '<{LAYOUTS[0][0]}>/{LAYOUTS[0][1]}...' "
                          f"or '<{LAYOUTS[1][0]}>/{LAYOUTS[1][1]}...'")


def load_segvol_encoder(model: Raps3D, path: str | os.PathLike) -> dict:
    """Copy SegVol's ViT weights into ``model.image_encoder.vit``; every key and shape is checked first.

    Returns a report {"loaded": n, "missing_allowed": [...]}; raises CheckpointError naming what did not match.
    """
    weights = read_segvol_encoder(path)
    target = model.image_encoder.vit.state_dict()
    unexpected = sorted(set(weights) - set(target))
    missing = sorted(set(target) - set(weights))
    bad_missing = [k for k in missing if ALLOWED_MISSING not in k]
    mismatched = [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(target[k].shape)}"
                  for k in sorted(set(weights) & set(target)) if weights[k].shape != target[k].shape]
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
    if bad_missing:
        problems.append(f"{len(bad_missing)} missing keys, e.g. {bad_missing[:3]}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches, e.g. {mismatched[:3]}")
    if problems:
        raise CheckpointError(f"{path} does not fit the {model.config.name!r} encoder: " + "; ".join(problems))
    model.image_encoder.vit.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    return {"loaded": len(weights), "missing_allowed": missing}
