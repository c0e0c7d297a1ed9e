"""Voxel boxes, frames (crop-and-resize of a box to the network input) and the resampling they need.

Axis order inside the library is (z, y, x): slice, row, column, i.e. the transpose of the (i, j, k) index order in
which viewers send points. A frame maps a box of the volume onto a grid of ``shape`` samples with the same
convention as ``torch.nn.functional.interpolate(..., align_corners=False)``:

    frame = (voxel - start + 0.5) * shape / size - 0.5

so resampling an image into a frame, mapping prompts into it, and pasting a frame's output back are exact inverses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Outside a frame, logits are "certainly background".
LOGIT_FLOOR = -20.0

HU_WINDOW = (-500.0, 1000.0)


def voxel_index(c: float) -> int:
    """The voxel holding position ``c``: voxel n spans n - 0.5 to n + 0.5 (halves go up, not to the even
    neighbour, as ``Box.contains`` counts them)."""
    return int(math.floor(c + 0.5))


@dataclass(frozen=True)
class Box:
    """A half-open box of voxels: start <= index < stop on each of the (z, y, x) axes."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    def __post_init__(self):
        if any(b <= a for a, b in zip(self.start, self.stop)):
            raise ValueError(f"empty box {self.start} -> {self.stop}")

    @property
    def size(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.start, self.stop))

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))

    def contains(self, point_zyx: Sequence[float]) -> bool:
        """Whether the voxel holding the point (voxel i spans i - 0.5 to i + 0.5) lies in the box."""
        return all(a <= np.floor(p + 0.5) < b for p, a, b in zip(point_zyx, self.start, self.stop))

    def union(self, other: "Box") -> "Box":
        return Box(tuple(map(min, self.start, other.start)), tuple(map(max, self.stop, other.stop)))

    def contains_box(self, other: "Box") -> bool:
        return all(a <= c and d <= b for a, b, c, d in zip(self.start, self.stop, other.start, other.stop))

    @staticmethod
    def from_extent(low: Sequence[float], high: Sequence[float], margin: Sequence[float],
                    min_size: Sequence[int], shape: Sequence[int]) -> "Box":
        """The box holding voxels ``low..high`` (inclusive) plus ``margin``, grown to ``min_size`` around its centre
        and clipped to a volume of ``shape``."""
        start, stop = [], []
        for lo, hi, m, mn, n in zip(low, high, margin, min_size, shape):
            a, b = np.floor(lo - m), np.ceil(hi + m) + 1
            if b - a < mn:
                c = (lo + hi + 1) / 2.0
                a, b = np.floor(c - mn / 2.0), np.floor(c - mn / 2.0) + mn
            # Shift a box that pokes out of the volume back in before clipping, so it keeps its size where possible.
            if a < 0:
                b, a = b - a, 0
            if b > n:
                a, b = max(0, a - (b - n)), n
            start.append(int(a))
            stop.append(int(b))
        return Box(tuple(start), tuple(stop))

    def as_list(self) -> list[list[int]]:
        return [list(self.start), list(self.stop)]


@dataclass(frozen=True)
class Frame:
    """A box of the volume resized to ``shape`` samples."""

    box: Box
    shape: tuple[int, int, int]

    @property
    def scale(self) -> np.ndarray:
        return np.asarray(self.shape, dtype=np.float64) / np.asarray(self.box.size, dtype=np.float64)

    def to_frame(self, points_zyx: np.ndarray) -> np.ndarray:
        """Voxel coordinates (N, 3) of the volume -> continuous coordinates of this frame."""
        p = np.asarray(points_zyx, dtype=np.float64)
        return (p - np.asarray(self.box.start) + 0.5) * self.scale - 0.5

    def to_volume(self, points_frame: np.ndarray) -> np.ndarray:
        """Continuous frame coordinates (N, 3) -> voxel coordinates of the volume."""
        p = np.asarray(points_frame, dtype=np.float64)
        return (p + 0.5) / self.scale - 0.5 + np.asarray(self.box.start)


def _linear_taps(start: int, size: int, out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of linear resampling of ``size`` samples from ``start`` onto ``out`` samples."""
    src = (np.arange(out, dtype=np.float64) + 0.5) * (size / out) - 0.5
    src = np.clip(src, 0.0, size - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, size - 1)
    return lo + start, hi + start, (src - lo).astype(np.float32)


def resample_box(volume: np.ndarray, box: Box, shape: Sequence[int], window: tuple[float, float] | None = None
                 ) -> np.ndarray:
    """Trilinear resampling of ``volume[box]`` onto ``shape`` samples (torch's align_corners=False convention).

    Only the 8 * prod(shape) source voxels that the output needs are read, so the cost does not grow with the
    volume. With ``window`` the values are clipped to it and scaled to [0, 1] before interpolation.
    """
    index, weights = box_taps(box, shape)
    block = volume[np.ix_(*index)].astype(np.float32)
    if window is not None:
        lo_v, hi_v = window
        np.clip(block, lo_v, hi_v, out=block)
        block -= lo_v
        block *= 1.0 / (hi_v - lo_v)
    return interpolate_taps(block, weights)


def box_taps(box: Box, shape: Sequence[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per axis, the voxel indices that resampling ``box`` onto ``shape`` reads (the lower taps, then the upper
    ones) and the weights of the upper taps."""
    taps = [_linear_taps(a, n, m) for a, n, m in zip(box.start, box.size, shape)]
    return [np.concatenate([lo, hi]) for lo, hi, _ in taps], [w for _, _, w in taps]


def interpolate_taps(block: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    """The resampled values from the ``block`` of float32 samples read at ``box_taps``' indices."""
    for axis, w in enumerate(weights):
        m = len(w)
        a = np.take(block, np.arange(m), axis=axis)
        b = np.take(block, np.arange(m, 2 * m), axis=axis)
        shape_w = [1, 1, 1]
        shape_w[axis] = m
        block = a + (b - a) * w.reshape(shape_w)
    return np.ascontiguousarray(block, dtype=np.float32)


def frame_image(volume: np.ndarray, frame: Frame) -> np.ndarray:
    """The CT image of ``frame``, windowed to [-500, 1000] HU and scaled to [0, 1]."""
    return resample_box(volume, frame.box, frame.shape, window=HU_WINDOW)


def _interp_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of linear resampling with torch's align_corners=False convention."""
    lo, hi, w = _linear_taps(0, n_in, n_out)
    m = torch.zeros(n_out, n_in)
    rows = torch.arange(n_out)
    m[rows, torch.from_numpy(lo)] += torch.from_numpy(1 - w)
    m[rows, torch.from_numpy(hi)] += torch.from_numpy(w)
    return m


def logits_to_box(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Low-resolution logits (D, H, W) of a frame -> logits on every voxel of the frame's box.

    Trilinear interpolation done as three small matrix products (separable), which is several times faster on a
    CPU than a direct trilinear kernel when the box is large, and gives the same values.
    """
    d, h, w = logits.shape
    mz, my, mx = (_interp_matrix(n, m) for n, m in zip(logits.shape, size))
    x = logits.float() @ mx.T                                   # (d, h, X)
    x = (my @ x)                                                # (d, Y, X)
    return (mz @ x.reshape(d, -1)).reshape(len(mz), len(my), len(mx))


def logits_to_mask(logits: torch.Tensor, size: Sequence[int], slab: int = 32, threshold: float = 0.0
                   ) -> np.ndarray:
    """``logits_to_box(logits, size) > threshold`` as uint8, computed a few output slices at a time so the float
    intermediate stays small (the mask of a large region is the hot path of every edit).

    Only the output block that can be positive is computed: interpolation weights are non-negative and sum to 1, so
    a voxel whose taps along some axis all read low-resolution slices without a logit above the threshold cannot be
    above it.
    """
    out = np.zeros(tuple(int(n) for n in size), np.uint8)
    positive = logits > threshold
    if not bool(positive.any()):
        return out
    block = []
    for axis, (n_in, n_out) in enumerate(zip(logits.shape, size)):
        m = _interp_matrix(n_in, n_out)
        reads_positive = positive.any(dim=[a for a in range(3) if a != axis])
        rows = torch.nonzero((m[:, reads_positive] > 0).any(1)).flatten()
        if len(rows) == 0:  # a small output skips some low-resolution slices: here, every positive one
            return out
        start, stop = int(rows[0]), int(rows[-1]) + 1
        block.append((m[start:stop], slice(start, stop)))
    (mz, sz), (my, sy), (mx, sx) = block
    d = logits.shape[0]
    plane = (my @ (logits.float() @ mx.T)).reshape(d, -1)  # (d, Y * X): in-plane first, it is the small side
    part = torch.empty((len(mz), plane.shape[1]), dtype=torch.bool)
    for z in range(0, len(mz), slab):
        torch.gt(mz[z:z + slab] @ plane, threshold, out=part[z:z + slab])
    out[sz, sy, sx] = part.numpy().reshape(len(mz), len(my), len(mx))
    return out


def remap_logits(logits: torch.Tensor, src: Frame, dst: Frame) -> torch.Tensor:
    """Low-resolution logits of frame ``src`` resampled onto the same-sized grid of frame ``dst``.

    Both frames use ``logits.shape`` samples over their boxes; what ``dst`` sees outside ``src`` is LOGIT_FLOOR.
    """
    shape = tuple(logits.shape)
    src_f = Frame(src.box, shape)
    dst_f = Frame(dst.box, shape)
    axes = []
    for ax in range(3):
        f = np.arange(shape[ax], dtype=np.float64)
        grid = np.zeros((shape[ax], 3))
        grid[:, ax] = f
        vox = dst_f.to_volume(grid)[:, ax]
        g = src_f.to_frame(np.stack([vox] * 3, 1))[:, ax]
        axes.append(torch.as_tensor((2 * g + 1) / shape[ax] - 1, dtype=torch.float32))
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    grid = torch.stack([xx, yy, zz], -1)[None]  # grid_sample wants (x, y, z) order
    shifted = (logits.float() - LOGIT_FLOOR)[None, None]
    out = F.grid_sample(shifted, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0, 0] + LOGIT_FLOOR
