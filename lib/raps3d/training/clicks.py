"""Simulated annotator: first prompts from a reference mask, and corrective clicks at the largest error."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def centre_point(mask: np.ndarray, spacing=None) -> np.ndarray:
    """The voxel deepest inside ``mask`` (maximum of the distance transform, in mm when ``spacing`` is given, else
    in voxels): a click at a structure's centre. Of several equally deep voxels (thin structures have many), the
    one nearest the mask's centroid, so a tube is clicked in its middle, not at an end.

    The transform runs over the mask's bounding box padded by one empty voxel: the nearest background voxel is never
    farther than that border, so the result is exact.
    """
    bounds = ndimage.find_objects(mask.astype(np.uint8))[0]
    crop = np.pad(mask[bounds], 1)
    dist = ndimage.distance_transform_edt(crop, sampling=spacing)[1:-1, 1:-1, 1:-1]
    deepest = np.argwhere(dist >= dist.max() * (1 - 1e-9))
    scale = np.ones(3) if spacing is None else np.asarray(spacing, dtype=np.float64)
    centroid = np.argwhere(crop[1:-1, 1:-1, 1:-1]).mean(0)
    best = deepest[int(np.argmin((((deepest - centroid) * scale) ** 2).sum(1)))]
    return best.astype(np.float64) + np.array([s.start for s in bounds])


def largest_slice_box(mask: np.ndarray) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """The tight 2D box of ``mask`` on its largest slice: (z, (y0, x0), (y1, x1)), inclusive."""
    z = int(np.argmax(mask.reshape(mask.shape[0], -1).sum(1)))
    return (z, *slice_box(mask[z]))


def slice_box(plane: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]]:
    ys, xs = np.nonzero(plane)
    return (int(ys.min()), int(xs.min())), (int(ys.max()), int(xs.max()))


def corrective_click(prediction: np.ndarray, reference: np.ndarray, spacing=None
                     ) -> tuple[np.ndarray, bool] | None:
    """The centre of the largest error region: positive in a region the prediction missed, negative in a region it
    wrongly added (the two kinds are separate regions, also where they touch). None when there is no error."""
    prediction, reference = prediction.astype(bool), reference.astype(bool)
    best, best_size, positive = None, 0, False
    for errors, is_missed in ((reference & ~prediction, True), (prediction & ~reference, False)):
        if not errors.any():
            continue
        components, _ = ndimage.label(errors)
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        label = int(np.argmax(sizes))
        if sizes[label] > best_size:
            best, best_size, positive = components == label, int(sizes[label]), is_missed
    if best is None:
        return None
    return centre_point(best, spacing), positive


def random_interior_point(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random voxel of ``mask``, biased away from the border (training variety for point prompts)."""
    eroded = ndimage.binary_erosion(mask)
    pool = np.argwhere(eroded if eroded.any() else mask)
    return pool[rng.integers(len(pool))].astype(np.float64)
