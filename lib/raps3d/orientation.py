"""The anatomical orientation the model sees volumes in, and the axis flips that bring a stored volume into it.

A CT file stores the same anatomy in different voxel orders: DICOM series are usually read with the slices from
inferior to superior, NIfTI files written in RAS with rows and columns reversed, OpenKBP's CT with the slices from
superior to inferior. The network sees voxels only, and a flip changes what it sees: on 8 OpenKBP validation patients
the first 2D box scored Dice 0.64 as stored, 0.54 with the slices reversed and 0.51 with the rows reversed (lung
nodules hardly change). So every volume is flipped into one orientation before the model, prompts with it, and
masks back; the model's orientation is that of its head-and-neck training CT (OpenKBP, the data drawn most):

- array axis 0 (z, the slice) runs towards the patient's feet (slice 0 the most superior),
- axis 1 (y, the row) towards the back (row 0 anterior),
- axis 2 (x, the column) towards the patient's left (column 0 on the right: the radiological view).

Each array axis is flipped, or not, by the physical axis it mostly follows, given by the image's direction matrix.
Axes are never swapped: a volume stored as sagittal slices stays so (a 2D box is drawn on the stored slices).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

# Where the model's axes point, along each LPS axis (x: left, y: posterior, z: superior): left, posterior, inferior.
MODEL_SIGNS_LPS = (1.0, 1.0, -1.0)


@dataclass(frozen=True)
class AxisFlips:
    """Array axes (0 = z, 1 = y, 2 = x) reversed between a stored volume and the model's orientation. A flip is its
    own inverse: the same calls map stored -> model and model -> stored."""

    axes: tuple[int, ...] = ()

    @classmethod
    def from_direction(cls, direction: Sequence[float]) -> "AxisFlips":
        """From an ITK direction matrix (9 numbers, row-major; column c is the direction of index axis c = i, j, k
        in LPS). Index axis i is array axis x (2), j is y (1), k is z (0)."""
        matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)
        axes = []
        for array_axis, column in ((0, 2), (1, 1), (2, 0)):
            vector = matrix[:, column]
            physical = int(np.argmax(np.abs(vector)))
            if vector[physical] * MODEL_SIGNS_LPS[physical] < 0:
                axes.append(array_axis)
        return cls(tuple(axes))

    def __bool__(self) -> bool:
        return bool(self.axes)

    def volume(self, array: np.ndarray) -> np.ndarray:
        """The array (z, y, x) flipped; a contiguous copy when anything is flipped, the array itself otherwise."""
        if not self.axes:
            return array
        return np.ascontiguousarray(np.flip(array, self.axes))

    def point(self, zyx: Sequence[float], shape: Sequence[int]) -> tuple[float, ...]:
        """A voxel position (z, y, x; fractional allowed) in a volume of ``shape`` (the same either way)."""
        return tuple(float(n - 1 - p) if axis in self.axes else float(p)
                     for axis, (p, n) in enumerate(zip(zyx, shape)))

    def box(self, start: Sequence[int], stop: Sequence[int], shape: Sequence[int]) -> tuple[tuple, tuple]:
        """A half-open box (start, stop) in a volume of ``shape``."""
        new_start, new_stop = [], []
        for axis, (a, b, n) in enumerate(zip(start, stop, shape)):
            if axis in self.axes:
                a, b = n - b, n - a
            new_start.append(int(a))
            new_stop.append(int(b))
        return tuple(new_start), tuple(new_stop)
