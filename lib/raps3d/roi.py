"""Zoom-in region of interest: from the zoom-out mask and the prompts, and its expansion for edits."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .geometry import Box, Frame

# Margin around the structure: a fraction of its extent plus a few voxels, so the zoom-in sees its boundary.
MARGIN_FRACTION = 0.15
MARGIN_MM = 6.0
# The zoom-in never looks at less than this (mm), so small targets keep some context.
MIN_SIZE_MM = 40.0
MIN_SIZE_VOXELS = 8


def margins(extent: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    return MARGIN_FRACTION * extent + MARGIN_MM / spacing


def min_size(spacing: np.ndarray, shape) -> np.ndarray:
    return np.minimum(np.maximum(np.ceil(MIN_SIZE_MM / spacing), MIN_SIZE_VOXELS), shape).astype(int)


def roi_from_mask(logits: np.ndarray, frame: Frame, prompt_low: np.ndarray, prompt_high: np.ndarray,
                  seeds_zyx: np.ndarray, spacing, shape) -> Box:
    """The zoom-in box: the components of the zoom-out mask that touch a prompt, joined with the prompts' extent
    (``prompt_low..prompt_high``, voxels), plus a margin, at least a minimum size, clipped to the volume.

    ``logits`` are the zoom-out low-resolution logits over ``frame``; ``seeds_zyx`` (N, 3) are voxels that a kept
    component must touch (positive points, the box's slice area).
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    low, high = np.asarray(prompt_low, float), np.asarray(prompt_high, float)
    fg = logits > 0
    if fg.any():
        grid = Frame(frame.box, fg.shape)
        components, _ = ndimage.label(fg)
        seeds = np.rint(grid.to_frame(seeds_zyx)).astype(int)
        seeds = np.clip(seeds, 0, np.asarray(fg.shape) - 1)
        touched = set(components[tuple(seeds.T)].tolist()) - {0}
        if touched:
            where = np.argwhere(np.isin(components, list(touched)))
            lo = grid.to_volume(where.min(0) - 0.5)
            hi = grid.to_volume(where.max(0) + 0.5)
            low, high = np.minimum(low, lo), np.maximum(high, hi)
    return Box.from_extent(low, high, margins(high - low, spacing), min_size(spacing, shape), shape)


def expand_roi(roi: Box, points_zyx: np.ndarray, spacing, shape) -> Box:
    """``roi`` grown to take in ``points_zyx`` plus a margin (an edit outside the zoom-in)."""
    spacing = np.asarray(spacing, dtype=np.float64)
    pts = np.asarray(points_zyx, dtype=np.float64).reshape(-1, 3)
    extent = np.asarray(roi.size, float)
    grown = Box.from_extent(pts.min(0), pts.max(0), margins(extent, spacing), (1, 1, 1), shape)
    return roi.union(grown)
