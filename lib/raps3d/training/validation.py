"""A quick validation score for training progress: Dice of first-prompt predictions on fixed held-out samples."""

from __future__ import annotations

import numpy as np
import torch

from ..modeling import Raps3D
from .data import Case
from .sampling import Sample, make_sample


def fixed_samples(cases: list[Case], config, n: int, seed: int = 1234) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    pairs = [(c, s) for c in cases for s in sorted(c.structures)]
    order = rng.permutation(len(pairs))
    for i in order:
        if len(out) >= n:
            break
        sample = make_sample(*pairs[i], config, rng)
        if sample is not None:
            out.append(sample)
    return out


@torch.inference_mode()
def quick_dice(model: Raps3D, samples: list[Sample], threshold: float = 0.0) -> float:
    """Mean Dice of the masks the model is most sure of, keeping voxels whose logit is above ``threshold`` (training
    curves use 0, where the loss puts the boundary; a served model's score uses its own ``mask_threshold``)."""
    if not samples:
        raise ValueError("no validation sample: every structure was too small to draw one from")
    dices = []
    dev = next(model.parameters()).device
    for s in samples:
        image = torch.from_numpy(s.image)[None, None].to(dev)
        feats = model.encode(image)
        logits, iou = model.decode(feats, torch.from_numpy(s.coords[None]).float().to(dev),
                                   torch.from_numpy(s.labels[None]).to(dev), None, s.multimask)
        pred = (logits[0, int(iou[0].argmax())] > threshold).cpu().numpy()
        inter = (pred & s.target).sum()
        dices.append(2 * inter / max(pred.sum() + s.target.sum(), 1))
    return float(np.mean(dices))
