"""Zoom-in region of interest: from the zoom-out mask and the prompts, and its expansion for edits."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .geometry import Box, Frame

# Regions are read from the model's own decision boundary (logit 0), not the calibrated mask threshold the shown mask
# uses: the threshold moves the boundary by a voxel or two, well inside the margin, and gave no gain on regions.

# Margin around the structure: a fraction of its extent plus a few voxels, so the zoom-in sees its boundary.
MARGIN_FRACTION = 0.15
MARGIN_MM = 6.0
# The zoom-in never looks at less than this (mm), so small targets keep some context.
MIN_SIZE_MM = 40.0
MIN_SIZE_VOXELS = 8
# A box prompt's zoom-in reaches at most this many times half the box's in-plane size above and below its slice.
BOX_DEPTH_LIMIT = 2.0
# When the zoom-out mask misses the prompt (a structure too small to show in the whole-volume view), one more pass
# looks at a cube of this side (mm) around the prompt, and its mask sets the zoom-in region instead.
MID_ZOOM_MM = 96.0


def margins(extent: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    return MARGIN_FRACTION * extent + MARGIN_MM / spacing


def min_size(spacing: np.ndarray, shape) -> np.ndarray:
    return np.minimum(np.maximum(np.ceil(MIN_SIZE_MM / spacing), MIN_SIZE_VOXELS), shape).astype(int)


def mid_zoom_size(spacing, shape) -> np.ndarray:
    """Voxels per axis of the intermediate view: MID_ZOOM_MM, fewer where the volume is smaller."""
    return np.minimum(np.ceil(MID_ZOOM_MM / np.asarray(spacing, dtype=np.float64)), shape).astype(int)


def mask_covers(logits: np.ndarray, frame: Frame, seeds_zyx: np.ndarray) -> bool:
    """Whether the mask of low-resolution ``logits`` over ``frame`` is positive at any of ``seeds_zyx`` (voxels)."""
    fg = logits > 0
    grid = Frame(frame.box, fg.shape)
    seeds = np.clip(np.rint(grid.to_frame(seeds_zyx)).astype(int), 0, np.asarray(fg.shape) - 1)
    return bool(fg[tuple(seeds.T)].any())


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


def roi_for_box(logits: np.ndarray, frame: Frame, z: int, low_yx, high_yx, spacing, shape) -> Box:
    """The zoom-in box for a 2D box prompt on slice ``z``: in-plane, the drawn box (it says exactly where the
    structure is); in depth, the run of slices around ``z`` on which the zoom-out mask overlaps the drawn box,
    at least half the box's larger in-plane size (mm) above and below, and at most twice that. The bound keeps a
    coarse zoom-out mask from stretching the region (and so losing zoom-in resolution) along the slice axis."""
    spacing = np.asarray(spacing, dtype=np.float64)
    (y0, x0), (y1, x1) = low_yx, high_yx
    half = max((y1 - y0 + 1) * spacing[1], (x1 - x0 + 1) * spacing[2]) / 2.0 / spacing[0]
    z_low, z_high = z - half, z + half
    fg = logits > 0
    grid = Frame(frame.box, fg.shape)
    a, b = np.rint(grid.to_frame(np.array([[z, y0, x0], [z, y1, x1]], float))).astype(int)
    a, b = np.clip(a, 0, np.asarray(fg.shape) - 1), np.clip(b, 0, np.asarray(fg.shape) - 1)
    on = fg[:, a[1]:b[1] + 1, a[2]:b[2] + 1].any(axis=(1, 2))
    if on[a[0]]:
        top, bottom = a[0], a[0]
        while top > 0 and on[top - 1]:
            top -= 1
        while bottom < len(on) - 1 and on[bottom + 1]:
            bottom += 1
        run_low = grid.to_volume(np.array([[top - 0.5, 0, 0]]))[0, 0]
        run_high = grid.to_volume(np.array([[bottom + 0.5, 0, 0]]))[0, 0]
        z_low = max(min(z_low, run_low), z - BOX_DEPTH_LIMIT * half)
        z_high = min(max(z_high, run_high), z + BOX_DEPTH_LIMIT * half)
    low, high = np.array([z_low, y0, x0], float), np.array([z_high, y1, x1], float)
    return Box.from_extent(low, high, margins(high - low, spacing), min_size(spacing, shape), shape)
