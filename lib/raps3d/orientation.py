"""The anatomical orientation the model sees volumes in, and the reorientation that brings a stored volume into it.

A CT file stores the same anatomy in different voxel orders: DICOM series are usually read with the slices from
inferior to superior, NIfTI files written in RAS with rows and columns reversed, OpenKBP's CT with the slices from
superior to inferior, and a reformatted series as coronal or sagittal slices. The network sees voxels only, and the
order changes what it sees: on 8 OpenKBP validation patients the first 2D box scored Dice 0.64 in the model's
orientation, 0.54 with the slices reversed, 0.51 with the rows reversed, and 0.34-0.35 stored as coronal or sagittal
slices (on 60 lung nodules: 0.79, and 0.50-0.52 as coronal or sagittal slices). So every volume is brought into one
orientation before the model, prompts with it, and masks back; the model's orientation is that of its head-and-neck
training CT (OpenKBP, the data drawn most):

- array axis 0 (z, the slice) runs towards the patient's feet (slice 0 the most superior),
- axis 1 (y, the row) towards the back (row 0 anterior),
- axis 2 (x, the column) towards the patient's left (column 0 on the right: the radiological view).

Each stored array axis becomes the model axis of the physical axis it mostly follows (given by the image's
direction matrix; an oblique series keeps its order where two assignments follow the axes equally well), reversed
where it runs the other way. Only axes are reordered and reversed: voxels are never resampled.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import ImageError

# Where the model's axes point, along each LPS axis (x: left, y: posterior, z: superior): left, posterior, inferior.
MODEL_SIGNS_LPS = (1.0, 1.0, -1.0)
# The model axis (0 = z, 1 = y, 2 = x) that follows each LPS axis.
MODEL_AXIS_OF_LPS = (2, 1, 0)
IDENTITY = (0, 1, 2)


@dataclass(frozen=True)
class Reorientation:
    """How a stored (z, y, x) array becomes the model's: model axis ``a`` is stored axis ``order[a]``, reversed where
    ``a`` is in ``flips``. ``*_back`` methods map the other way. Shapes passed in are always the stored array's."""

    order: tuple[int, int, int] = IDENTITY
    flips: tuple[int, ...] = ()

    @classmethod
    def from_direction(cls, direction: Sequence[float]) -> "Reorientation":
        """From an ITK direction matrix (9 numbers, row-major; column c is the direction of index axis c = i, j, k
        in LPS). Index axis i is array axis x (2), j is y (1), k is z (0)."""
        signed = np.asarray(direction, dtype=np.float64).reshape(3, 3)
        if not np.isfinite(signed).all() or not (np.abs(signed).max(axis=0) > 0).all():
            raise ImageError(f"the image's direction matrix {signed.ravel().tolist()} has an axis without a "
                             "direction: its orientation is unknown")
        # The LPS axis each array axis follows: the assignment that follows the axes best, the stored order first so
        # that a tie (a 45-degree oblique series) keeps it. Array axis a is the matrix's column 2 - a.
        stored = (2, 1, 0)  # array z follows LPS z (2), y follows y, x follows x
        candidates = [stored] + [p for p in itertools.permutations(range(3)) if p != stored]
        scores = [sum(abs(signed[lps, 2 - a]) for a, lps in enumerate(p)) for p in candidates]
        best = candidates[int(np.argmax(np.asarray(scores) > max(scores) - 1e-9))]
        order = [0, 0, 0]
        flips = []
        for array_axis, lps in enumerate(best):
            model_axis = MODEL_AXIS_OF_LPS[lps]
            order[model_axis] = array_axis
            if signed[lps, 2 - array_axis] * MODEL_SIGNS_LPS[lps] < 0:
                flips.append(model_axis)
        return cls(tuple(order), tuple(sorted(flips)))

    def __bool__(self) -> bool:
        return self.order != IDENTITY or bool(self.flips)

    @property
    def keeps_slices(self) -> bool:
        """Whether the stored slices are the model's (axial) slices, whatever happens within them."""
        return self.order[0] == 0

    def shape(self, stored_shape: Sequence[int]) -> tuple[int, int, int]:
        return tuple(int(stored_shape[s]) for s in self.order)

    def spacing(self, stored_spacing: Sequence[float]) -> tuple[float, float, float]:
        """(z, y, x) spacing of the model's axes from the stored array's."""
        return tuple(float(stored_spacing[s]) for s in self.order)

    def volume(self, array: np.ndarray) -> np.ndarray:
        """A stored (z, y, x) array in the model's orientation; a contiguous copy when anything changes, the array
        itself otherwise."""
        if not self:
            return array
        return np.ascontiguousarray(np.flip(array.transpose(self.order), self.flips))

    def volume_back(self, array: np.ndarray) -> np.ndarray:
        """An array in the model's orientation (a whole volume, or a mask of a region) in the stored order."""
        if not self:
            return array
        return np.ascontiguousarray(np.flip(array, self.flips).transpose(np.argsort(self.order)))

    def point(self, zyx: Sequence[float], stored_shape: Sequence[int]) -> tuple[float, ...]:
        """A stored voxel position (z, y, x; fractional allowed) in the model's orientation."""
        return tuple(self._flip(a, float(zyx[s]), stored_shape) for a, s in enumerate(self.order))

    def point_back(self, zyx: Sequence[float], stored_shape: Sequence[int]) -> tuple[float, ...]:
        """A position of the model's orientation in the stored array."""
        stored = [0.0, 0.0, 0.0]
        for a, s in enumerate(self.order):
            stored[s] = self._flip(a, float(zyx[a]), stored_shape)
        return tuple(stored)

    def box(self, start: Sequence[int], stop: Sequence[int], stored_shape: Sequence[int]) -> tuple[tuple, tuple]:
        """A stored half-open box (start, stop) in the model's orientation."""
        pairs = [self._flip_range(a, start[s], stop[s], stored_shape) for a, s in enumerate(self.order)]
        return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)

    def box_back(self, start: Sequence[int], stop: Sequence[int], stored_shape: Sequence[int]) -> tuple[tuple, tuple]:
        """A half-open box of the model's orientation in the stored array."""
        new_start, new_stop = [0, 0, 0], [0, 0, 0]
        for a, s in enumerate(self.order):
            new_start[s], new_stop[s] = self._flip_range(a, start[a], stop[a], stored_shape)
        return tuple(new_start), tuple(new_stop)

    def _flip(self, model_axis: int, c: float, stored_shape) -> float:
        return float(stored_shape[self.order[model_axis]] - 1 - c) if model_axis in self.flips else c

    def _flip_range(self, model_axis: int, a: int, b: int, stored_shape) -> tuple[int, int]:
        if model_axis in self.flips:
            n = stored_shape[self.order[model_axis]]
            a, b = n - b, n - a
        return int(a), int(b)
