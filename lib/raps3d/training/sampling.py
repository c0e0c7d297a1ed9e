"""Training samples: a frame (zoom-out: the whole volume; zoom-in: a crop around the structure with random margin,
shift and some truncation; optionally the predictor's intermediate view, a cube around the structure), its image,
the structure's mask on the decoder's grid, and a first prompt."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..geometry import Box, Frame, HU_WINDOW, resample_box
from ..modeling import BOX_MAX, BOX_MIN, POSITIVE, ModelConfig
from ..roi import mid_zoom_size, min_size
from .clicks import random_interior_point, slice_box
from .data import Case, Structure


# Intensity augmentation: the HU window's centre moves by up to this many HU, its width scales within this range.
WINDOW_SHIFT_HU = 30.0
WINDOW_SCALE = (0.9, 1.1)
# Share of zoom-in crops moved further off the structure, so that part of it falls outside (an edit will have to
# grow the region).
TRUNCATE_FRACTION = 0.15


def shifted_window(shift: float, scale: float) -> tuple[float, float]:
    """The HU window with its centre moved by ``shift`` HU and its width scaled by ``scale``."""
    centre = (HU_WINDOW[0] + HU_WINDOW[1]) / 2
    half = (HU_WINDOW[1] - HU_WINDOW[0]) / 2 * scale
    return centre - half + shift, centre + half + shift


def augmented_hu_range() -> tuple[float, float]:
    """The HU range that any augmented window can see: every window clips values beyond it."""
    return (shifted_window(-WINDOW_SHIFT_HU, WINDOW_SCALE[1])[0], shifted_window(WINDOW_SHIFT_HU, WINDOW_SCALE[1])[1])


def compact_volume(volume: np.ndarray) -> np.ndarray:
    """``volume`` as int16 where it is held in a wider type (int32, float32): values beyond the HU range that any
    augmented window sees are clipped (every window clips them anyway) and the rest rounded to whole HU (half an HU
    at most, far below CT noise).
    A train task keeps every labelled CT in memory, and 2 bytes a voxel is what a CT's own data type needs."""
    if volume.dtype.itemsize <= 2 and volume.dtype.kind in "iu":
        return volume
    lo, hi = augmented_hu_range()
    clipped = np.clip(volume, int(np.floor(lo)), int(np.ceil(hi)))  # whole-number bounds keep the volume's type
    if clipped.dtype.kind == "f":
        np.rint(clipped, out=clipped)
    return clipped.astype(np.int16)


@dataclass
class Sample:
    image: np.ndarray  # (D, H, W) in [0, 1]
    target: np.ndarray  # (mask D, H, W) bool: the structure on the decoder's grid
    coords: np.ndarray  # (N, 3) first-prompt points in network input coordinates
    labels: np.ndarray  # (N,)
    multimask: bool


def zoom_in_box(structure: Structure, spacing, rng: np.random.Generator) -> Box:
    bounds = structure.box
    low, high = np.array(bounds.start, float), np.array(bounds.stop, float) - 1
    extent = high - low + 1
    margin = extent * rng.uniform(0.05, 0.5, 3) + rng.uniform(1, 6, 3)
    shift = extent * rng.uniform(-0.15, 0.15, 3)
    if rng.random() < TRUNCATE_FRACTION:
        shift += extent * rng.uniform(-0.35, 0.35, 3)
    return Box.from_extent(low + shift, high + shift, margin, min_size(np.asarray(spacing), structure.shape),
                           structure.shape)


def mid_zoom_box(structure: Structure, spacing, rng: np.random.Generator) -> Box:
    """The predictor's intermediate view: a cube of MID_ZOOM_MM around a voxel of the structure, moved by up to a
    quarter of its side (the prompt is not always at the structure's centre)."""
    size = mid_zoom_size(spacing, structure.shape)
    idx = structure.voxels()
    centre = idx[rng.integers(len(idx))] + size * rng.uniform(-0.25, 0.25, 3)
    return Box.from_extent(centre, centre, np.zeros(3), size, structure.shape)


def make_sample(case: Case, name: str, config: ModelConfig, rng: np.random.Generator,
                zoom_out_fraction: float = 0.35, box_fraction: float = 0.5, mid_zoom_fraction: float = 0.0
                ) -> Sample | None:
    structure = case.structures[name]
    shape = case.volume.shape
    draw = rng.random()  # one draw picks the view, so mid_zoom_fraction=0 keeps earlier runs' sample streams
    if draw < zoom_out_fraction:
        box = Box((0, 0, 0), shape)
    elif draw < zoom_out_fraction + mid_zoom_fraction:
        box = mid_zoom_box(structure, case.spacing, rng)
    else:
        box = zoom_in_box(structure, case.spacing, rng)
    frame = Frame(box, config.input_shape)
    # Prompts are drawn from the part of the structure's bounding box inside the frame (the rest of the frame holds
    # none of it): the same prompts as from the whole frame, without a frame-sized mask (a zoom-out's is the CT's).
    inside = structure.within(box)
    if inside is None:
        return None
    crop = structure.part(inside)
    offset = np.subtract(inside.start, box.start)  # of ``crop`` in the frame's box
    if crop.sum() < 4:
        return None
    volume = case.volume
    window = HU_WINDOW
    if rng.random() < 0.5:  # intensity augmentation: shift/scale of the HU window
        window = shifted_window(rng.uniform(-WINDOW_SHIFT_HU, WINDOW_SHIFT_HU), rng.uniform(*WINDOW_SCALE))
    image = resample_box(volume, box, config.input_shape, window=window)
    target = structure.resample(box, config.mask_shape) > 0.5
    if not target.any():
        return None
    if rng.random() < box_fraction:
        zs = np.nonzero(crop.reshape(crop.shape[0], -1).any(1))[0]
        z = int(rng.choice(zs))
        (y0, x0), (y1, x1) = slice_box(crop[z])
        z, y0, x0, y1, x1 = z + offset[0], y0 + offset[1], x0 + offset[2], y1 + offset[1], x1 + offset[2]
        h, w = y1 - y0 + 1, x1 - x0 + 1
        jitter = rng.normal(0, 0.07, 4) * np.array([h, w, h, w])
        y0, x0, y1, x1 = np.array([y0, x0, y1, x1]) + jitter
        corners = np.array([[z, min(y0, y1), min(x0, x1)], [z, max(y0, y1), max(x0, x1)]]) + np.array(box.start)
        coords, labels, multimask = frame.to_frame(corners), np.array([BOX_MIN, BOX_MAX]), False
    else:
        point = random_interior_point(crop, rng) + offset + np.array(box.start)
        coords, labels, multimask = frame.to_frame(point[None]), np.array([POSITIVE]), True
    image, target, coords = _flip(image, target, coords, labels, config, rng)
    return Sample(image, target, coords, labels, multimask)


def _flip(image, target, coords, labels, config: ModelConfig, rng):
    coords = coords.copy()
    for axis in (2,):  # left-right flips only: the other axes keep their anatomical order
        if rng.random() < 0.5:
            image = np.flip(image, axis)
            target = np.flip(target, axis)
            coords[:, axis] = config.input_shape[axis] - 1 - coords[:, axis]
            # A box's typed corners must stay the low and the high one, as the predictor always gives them.
            low, high = labels == BOX_MIN, labels == BOX_MAX
            if low.any():
                coords[low, axis], coords[high, axis] = coords[high, axis], coords[low, axis]
    return np.ascontiguousarray(image), np.ascontiguousarray(target), coords
