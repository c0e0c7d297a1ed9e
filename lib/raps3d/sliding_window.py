"""SegVol-style zoom-in, kept only as the benchmark's baseline: slide a window of the network's input size over the
region of interest at native resolution (many encoder passes) instead of resizing the region into one."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from .geometry import Box, Frame, logits_to_box
from .predictor import InteractiveObject, Prompts


def _starts(lo: int, hi: int, window: int, overlap: float, size: int) -> list[int]:
    if hi - lo <= window:
        return [max(0, min(lo, size - window))]  # a whole window inside the volume, where the volume holds one
    step = max(int(window * (1 - overlap)), 1)
    starts = list(range(lo, hi - window, step)) + [hi - window]
    return sorted(set(starts))


def sliding_window_zoom_in(obj: InteractiveObject, prompts: Prompts, roi: Box, overlap: float = 0.25) -> np.ndarray:
    """Mask (uint8, over ``roi``) from windows at native resolution, moved inside the volume where it holds them
    (windows larger than the volume are clipped)."""
    engine, image = obj.engine, obj.image
    window = engine.config.input_shape
    coords, labels = prompts.coords_labels()
    acc = torch.zeros(roi.size)
    count = torch.zeros(roi.size)
    ranges = [_starts(a, b, w, overlap, n) for a, b, w, n in zip(roi.start, roi.stop, window, image.shape)]
    for start in itertools.product(*ranges):
        stop = tuple(min(s + w, n) for s, w, n in zip(start, window, image.shape))
        box = Box(tuple(start), stop)
        frame = Frame(box, window)
        feats = engine.encode(image.volume, frame)
        logits, _ = engine.decode(feats, frame.to_frame(coords), labels, None, prompts.ambiguous)
        part = logits_to_box(logits, box.size)
        # Keep the part of the window that lies inside the ROI.
        lo = [max(s, r) for s, r in zip(box.start, roi.start)]
        hi = [min(e, r) for e, r in zip(box.stop, roi.stop)]
        src = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, box.start))
        dst = tuple(slice(a - r, b - r) for a, b, r in zip(lo, hi, roi.start))
        acc[dst] += part[src]
        count[dst] += 1
    return ((acc / count.clamp(min=1)) > engine.mask_threshold).numpy().astype(np.uint8)
