"""An automatic first click for scoring images without a user: the centre of the brightest soft-tissue blob.

Enhanced parenchyma (liver, spleen, kidneys) is the brightest soft tissue in a CT, and the largest thing a user is
likely to click first. The volume is looked at on a coarse grid (~64 samples per axis), so this costs milliseconds.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

SOFT_TISSUE_HU = (0.0, 250.0)
BLOB_MM = 20.0  # size of the neighbourhood averaged when looking for the blob
GRID = 64


def soft_tissue_seed(volume_zyx: np.ndarray, spacing_zyx) -> tuple[int, int, int]:
    """A voxel (z, y, x) inside soft tissue where the surrounding soft tissue is brightest; the volume's centre
    when there is no soft tissue at all."""
    shape = np.asarray(volume_zyx.shape)
    step = np.maximum(np.ceil(shape / GRID).astype(int), 1)
    coarse = volume_zyx[::step[0], ::step[1], ::step[2]].astype(np.float32)
    lo, hi = SOFT_TISSUE_HU
    tissue = (coarse >= lo) & (coarse <= hi)
    if not tissue.any():
        return tuple(int(n // 2) for n in shape)
    coarse_spacing = np.asarray(spacing_zyx, dtype=np.float64) * step
    size = np.maximum(np.round(BLOB_MM / coarse_spacing).astype(int), 1)
    brightness = ndimage.uniform_filter(np.where(tissue, coarse - lo, 0.0).astype(np.float32), size=size)
    brightness[~tissue] = -1.0  # the click itself must land on soft tissue
    best = np.unravel_index(int(np.argmax(brightness)), brightness.shape)
    full = np.minimum(np.asarray(best) * step + step // 2, shape - 1)
    return tuple(int(v) for v in full)
