"""Prompts as viewers send them, converted to the library's (z, y, x) voxel order in the model's orientation.

Viewers send voxel indices ``[i, j, k]`` (x, y, z; ``k`` is the slice) of the image as MONAI's ITK reader loads
it. The model sees the image with its axes reordered and reversed (``raps3d.orientation``): coordinates are mapped
there before anything is rounded, so that a box with fractional corners, or a thick roi's middle slice, lands on the
same voxels however the file stores the image. Accepted request parameters:

- ``foreground``, ``background``: lists of points ``[i, j, k]`` (every click of the current object, each time).
- ``box``: ``{"slice": k, "corners": [[i0, j0], [i1, j1]]}``, a 2D box drawn on slice ``k``; corners inclusive,
  in any order. The model takes boxes on its axial slices only: refused on a CT stored as coronal or sagittal slices.
- ``roi``: ``[i_min, i_max, j_min, j_max, k_min, k_max]`` (3D Slicer's ROI; inclusive; a pair may come reversed).
  An ROI one slice thick (along the axis that is the model's slices: ``k`` for an axial CT) is a 2D box on that
  slice. A thicker ROI is reduced to a 2D box on its middle slice along that axis, counted in the model's
  orientation, with the same in-plane corners: the model takes 2D boxes only, and a box on the middle slice lets the
  model find the object's extent in depth itself. The reply says which slice was used. An ROI flat across the axial
  plane (drawn on a coronal or sagittal view) is refused.

``box`` and ``roi`` are exclusive. Bounds (a point outside the image, an empty box) are checked here in the request's
``[i, j, k]`` terms and again by the library.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import raps3d
from raps3d.geometry import voxel_index
from raps3d.orientation import Reorientation
from raps3d.predictor import MAX_POINTS


class PromptFormatError(ValueError):
    """The request's prompts are malformed."""


Point = tuple[tuple[float, float, float], bool]  # ((z, y, x), positive)


@dataclass(frozen=True)
class BoxPrompt:
    """A 2D box on slice k with inclusive corners (i0, j0)..(i1, j1), already sorted and clipped to the image (in
    the model's orientation; ``as_reply`` gives it in the file's)."""

    k: int
    i0: int
    j0: int
    i1: int
    j1: int
    source: str  # "box", "roi" (one slice thick) or "roi_middle_slice"

    def to_library(self) -> tuple:
        return self.k, (self.j0, self.i0), (self.j1, self.i1)

    def same_as(self, box: raps3d.SliceBox | None) -> bool:
        return box is not None and (box.z, box.y0, box.x0, box.y1, box.x1) == (self.k, self.j0, self.i0, self.j1,
                                                                                self.i1)

    def as_reply(self, orientation: Reorientation, stored_shape) -> dict:
        """The box in the file's voxel indices: on its slice ``k``, or, where the file's slices are not the model's
        (a volume stored as coronal or sagittal slices), as the one voxel thick roi ``[i0, i1, j0, j1, k0, k1]``."""
        start, stop = orientation.box_back((self.k, self.j0, self.i0), (self.k + 1, self.j1 + 1, self.i1 + 1),
                                           stored_shape)
        (k0, j0, i0), (k1, j1, i1) = start, [c - 1 for c in stop]
        if not orientation.keeps_slices:
            return {"roi": [i0, i1, j0, j1, k0, k1], "source": self.source}
        return {"slice": k0, "corners": [[i0, j0], [i1, j1]], "source": self.source}


@dataclass(frozen=True)
class PromptSet:
    points: tuple[Point, ...] = ()
    box: BoxPrompt | None = None

    @property
    def empty(self) -> bool:
        return not self.points and self.box is None

    def point_counts(self) -> Counter:
        return Counter(self.points)

    def matches(self, prompts: raps3d.Prompts) -> bool:
        """Whether the library object's prompts are exactly these (points as a multiset: viewers send foreground
        and background lists separately, so their interleaving is not known)."""
        same_box = (self.box is None and prompts.box is None) or (self.box is not None and self.box.same_as(
            prompts.box))
        return same_box and Counter(prompts.points) == self.point_counts()


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PromptFormatError(f"{what} must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits (JSON allows it)
        number = math.inf
    if not math.isfinite(number):
        raise PromptFormatError(f"{what} must be finite, got {str(value)[:20]}")
    return number


def _inside(c: float, size: int) -> bool:
    """Whether position ``c`` lies within an axis of ``size`` voxels: -0.5 < c < size - 0.5 (both ends open, so that
    the answer is the same along a reversed axis)."""
    return -0.5 < c < size - 0.5


def _to_model(ijk, size_ijk, orientation: Reorientation) -> tuple[float, ...]:
    """Position [i, j, k] of the file as (z, y, x) in the model's orientation."""
    return orientation.point(ijk[::-1], size_ijk[::-1])


def _points(params: dict, name: str, positive: bool, size_ijk, orientation: Reorientation) -> list[Point]:
    raw = params.get(name)
    if raw is None or raw == "":
        return []
    if not isinstance(raw, (list, tuple)):
        raise PromptFormatError(f"'{name}' must be a list of points [i, j, k], got {raw!r}")
    model_shape = orientation.shape(size_ijk[::-1])
    points = []
    for n, p in enumerate(raw):
        if not isinstance(p, (list, tuple)) or len(p) != 3:
            raise PromptFormatError(f"{name} point {n} must be three numbers [i, j, k], got {p!r}")
        ijk = [_number(c, f"{name} point {n} coordinate") for c in p]
        if any(not _inside(c, s) for c, s in zip(ijk, size_ijk)):
            raise PromptFormatError(f"{name} point {n} [i, j, k] = {p!r} lies outside the image of size "
                                    f"{list(size_ijk)} (voxel indices 0..size-1; a position counts in the "
                                    "voxel that holds it, -0.5 < c < size - 0.5)")
        # A click in the outer half of an edge voxel (a viewer sending fractional indices): that voxel's centre side.
        zyx = tuple(min(max(c, 0.0), s - 1.0) for c, s in zip(_to_model(ijk, size_ijk, orientation), model_shape))
        points.append((zyx, positive))
    return points


def _model_box(ranges_ijk, size_ijk, orientation: Reorientation, source: str) -> BoxPrompt:
    """A 2D box on a slice of the model's orientation from ranges along the file's i, j, k (each pair in any order):
    the slice is the middle of its range and the corners are clipped to the slice, both rounded in the model's
    orientation. Bounds are checked, and reported, in the request's terms."""
    axes = [2 - s for s in orientation.order]  # the request's axis (0 = i, 1 = j, 2 = k) along each model axis
    names = ["ijk"[a] for a in axes]
    (z0, z1), (y0, y1), (x0, x1) = [sorted(ranges_ijk[a]) for a in axes]
    nz, ny, nx = [size_ijk[a] for a in axes]
    if z1 <= -0.5 or z0 >= nz - 0.5:
        raise PromptFormatError(f"the roi's slices {names[0]} {z0:g}..{z1:g} lie outside the image's {nz} slices")
    in_plane = f"{names[2]} {x0:g}..{x1:g}, {names[1]} {y0:g}..{y1:g}"
    if x1 <= -0.5 or y1 <= -0.5 or x0 >= nx - 0.5 or y0 >= ny - 0.5:
        raise PromptFormatError(f"the box ({in_plane}) lies outside the slice of {nx} x {ny} voxels")
    low = _to_model([r[0] for r in ranges_ijk], size_ijk, orientation)
    high = _to_model([r[1] for r in ranges_ijk], size_ijk, orientation)
    (mz0, mz1), (my0, my1), (mx0, mx1) = [sorted(pair) for pair in zip(low, high)]
    k0, k1 = max(voxel_index(mz0), 0), min(voxel_index(mz1), nz - 1)
    i0, i1 = voxel_index(max(mx0, 0)), voxel_index(min(mx1, nx - 1))
    j0, j1 = voxel_index(max(my0, 0)), voxel_index(min(my1, ny - 1))
    if i1 <= i0 or j1 <= j0:
        hint = ""
        if k1 > k0 and min(mx1 - mx0, my1 - my0) < 1:  # thick across the slices, flat within: drawn on a coronal
            # or sagittal view (not a wide box that only the image's edge cut down)
            hint = (f" (this roi spans {names[0]} {z0:g}..{z1:g} but is flat within the axial plane, as one drawn "
                    "on a coronal or sagittal view: draw it on an axial view)")
        raise PromptFormatError(f"the box ({in_plane}) has no area; draw a box at least two voxels wide and high"
                                + hint)
    if k0 == k1:
        return BoxPrompt(int(k0), int(i0), int(j0), int(i1), int(j1), source)
    return BoxPrompt(int((k0 + k1) // 2), int(i0), int(j0), int(i1), int(j1), "roi_middle_slice")


def _box(params: dict, size_ijk, orientation: Reorientation) -> BoxPrompt | None:
    box, roi = params.get("box"), params.get("roi")
    box = None if box in (None, "", [], {}) else box
    roi = None if roi in (None, "", [], {}) else roi
    if box is not None and roi is not None:
        raise PromptFormatError("send either 'box' or 'roi', not both")
    if box is not None:
        if not isinstance(box, dict) or "slice" not in box or "corners" not in box:
            raise PromptFormatError(f"'box' must be {{\"slice\": k, \"corners\": [[i0, j0], [i1, j1]]}}, got {box!r}")
        corners = box["corners"]
        if (not isinstance(corners, (list, tuple)) or len(corners) != 2
                or not all(isinstance(c, (list, tuple)) and len(c) == 2 for c in corners)):
            raise PromptFormatError(f"box corners must be [[i0, j0], [i1, j1]], got {corners!r}")
        k = _number(box["slice"], "the box's slice")
        (ia, ja), (ib, jb) = [[_number(v, "a box corner coordinate") for v in c] for c in corners]
        nk = size_ijk[2]
        if not _inside(k, nk):
            raise PromptFormatError(f"the box's slice k = {k:g} lies outside the image's {nk} slices")
        if not orientation.keeps_slices:
            plane = "coronal" if orientation.order.index(0) == 1 else "sagittal"
            raise PromptFormatError(f"this image is stored as {plane} slices, and the model takes boxes on axial "
                                    "slices only: send the box as an 'roi' [i_min, i_max, j_min, j_max, k_min, "
                                    "k_max] drawn on an axial view, or click points")
        return _model_box(((ia, ib), (ja, jb), (k, k)), size_ijk, orientation, "box")
    if roi is not None:
        if not isinstance(roi, (list, tuple)) or len(roi) != 6:
            raise PromptFormatError(f"'roi' must be [i_min, i_max, j_min, j_max, k_min, k_max], got {roi!r}")
        ia, ib, ja, jb, ka, kb = [_number(v, "an roi coordinate") for v in roi]
        return _model_box(((ia, ib), (ja, jb), (ka, kb)), size_ijk, orientation, "roi")
    return None


def parse_prompts(params: dict, size_ijk, orientation: Reorientation = Reorientation()) -> PromptSet:
    """The prompts of a request, for an image of ``size_ijk`` voxels, in the model's orientation
    (``orientation``)."""
    count = sum(len(params[k]) for k in ("foreground", "background") if isinstance(params.get(k), (list, tuple)))
    if count > MAX_POINTS:
        raise PromptFormatError(f"at most {MAX_POINTS} points per object, got {count}")
    points = (_points(params, "foreground", True, size_ijk, orientation)
              + _points(params, "background", False, size_ijk, orientation))
    return PromptSet(tuple(points), _box(params, size_ijk, orientation))
