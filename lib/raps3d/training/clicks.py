"""Simulated annotator: first prompts from a reference mask, and corrective clicks at the largest error."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def centre_point(mask: np.ndarray) -> np.ndarray:
    """The voxel deepest inside ``mask`` (maximum of the distance transform): a click at a structure's centre.

    The transform runs over the mask's bounding box padded by one empty voxel: the nearest background voxel is never
    farther than that border, so the result is exact, and the first maximum in raster order is the same.
    """
    bounds = ndimage.find_objects(mask.astype(np.uint8))[0]
    crop = np.pad(mask[bounds], 1)
    dist = ndimage.distance_transform_edt(crop)[1:-1, 1:-1, 1:-1]
    offset = np.array([s.start for s in bounds])
    return np.array(np.unravel_index(int(np.argmax(dist)), dist.shape), dtype=np.float64) + offset


def largest_slice_box(mask: np.ndarray) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """The tight 2D box of ``mask`` on its largest slice: (z, (y0, x0), (y1, x1)), inclusive."""
    z = int(np.argmax(mask.reshape(mask.shape[0], -1).sum(1)))
    return (z, *slice_box(mask[z]))


def slice_box(plane: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]]:
    ys, xs = np.nonzero(plane)
    return (int(ys.min()), int(xs.min())), (int(ys.max()), int(xs.max()))


def corrective_click(prediction: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, bool] | None:
    """The centre of the largest error region: positive where the structure was missed, negative where the
    prediction is wrong. None when there is no error."""
    errors = prediction != reference
    if not errors.any():
        return None
    components, n = ndimage.label(errors)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    point = centre_point(components == int(np.argmax(sizes)))
    return point, bool(reference[tuple(point.astype(int))])


def random_interior_point(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random voxel of ``mask``, biased away from the border (training variety for point prompts)."""
    eroded = ndimage.binary_erosion(mask)
    pool = np.argwhere(eroded if eroded.any() else mask)
    return pool[rng.integers(len(pool))].astype(np.float64)
