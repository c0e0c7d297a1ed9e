"""Interactive prediction: set an image once, add prompts, get the mask; zoom-out-zoom-in with edit caching.

All coordinates here are voxel indices in array order (z, y, x) = (slice, row, column) of the volume as given.

A first prompt runs the zoom-out pass (the whole volume resized to the network input), derives a region of interest
from its mask, and runs the zoom-in pass on that region. When the zoom-out mask misses the prompt (a structure too
small for the whole-volume view), an intermediate pass on a cube around the prompt sets the region instead. Each
later point is an edit: it is decoded together with all earlier prompts and the current mask. An edit inside the
zoom-in region reuses that region's image features (decoder only); a positive point outside grows the region,
encodes once more, and continues from the current mask. A negative point outside the region is kept but changes
nothing: the mask is zero there already.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .engine import Engine
from .errors import ImageError, PromptError
from .geometry import Box, Frame, logits_to_mask, remap_logits, voxel_index
from .modeling import BOX_MAX, BOX_MIN, NEGATIVE, POSITIVE, ImageFeatures
from .roi import expand_roi, mask_covers, mid_zoom_size, roi_for_box, roi_from_mask

# Image features kept per object: the current zoom-in region and the one before it (so undo stays cheap).
FEATURE_CACHE_SIZE = 2
# Interactions an object can undo. The history keeps prompts, region and low-resolution logits per step (the mask
# is rebuilt from them on undo: a full-resolution mask of a large region is tens of MB).
UNDO_STEPS = 32
# A point's zoom-in region is tightened once when its mask fills less than this fraction of it (by box volume).
TIGHTEN_RATIO = 0.35
# Points one object may hold. Far more than an annotator clicks; the decoder's attention grows with the square of the
# prompt count (thousands of points would take gigabytes).
MAX_POINTS = 128


def check_volume(volume, spacing=(1.0, 1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """The volume (z, y, x) and its spacing (mm, z, y, x) as arrays, or ImageError saying why Raps-3D cannot
    segment it (nor train on it)."""
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ImageError(f"expected a 3D volume, got an array of shape {volume.shape}")
    if min(volume.shape) < 2:
        raise ImageError(f"a volume of shape {volume.shape} has a single slice or row; Raps-3D needs 3D images")
    if volume.dtype.kind not in "iuf":
        raise ImageError(f"unsupported image data type {volume.dtype}")
    if volume.dtype.kind == "f" and not np.isfinite(volume).all():
        raise ImageError("the image contains NaN or infinite values")
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (3,) or not (np.isfinite(spacing).all() and (spacing > 0).all()):
        raise ImageError(f"invalid voxel spacing {spacing.tolist()}")
    return volume, spacing


class ImageState:
    """A volume, validated once, with its zoom-out features shared by every object segmented on it."""

    def __init__(self, engine: Engine, volume: np.ndarray, spacing=(1.0, 1.0, 1.0)):
        volume, spacing = check_volume(volume, spacing)
        self.engine = engine
        self.volume = volume
        self.shape = tuple(volume.shape)
        self.spacing = spacing
        self.frame = Frame(Box((0, 0, 0), self.shape), engine.config.input_shape)
        self._features: ImageFeatures | None = None
        self._lock = threading.Lock()
        self.last_used = time.monotonic()

    def zoom_out_features(self) -> tuple[ImageFeatures, bool]:
        """Features of the whole volume at network input size, computed once; and whether they were cached."""
        with self._lock:
            if self._features is not None:
                return self._features, True
            self._features = self.engine.encode(self.volume, self.frame)
            return self._features, False

    @property
    def nbytes(self) -> int:
        return self.volume.nbytes


@dataclass(frozen=True)
class SliceBox:
    """A 2D box drawn on slice ``z``: corners (y0, x0) and (y1, x1), inclusive voxel indices."""

    z: int
    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def corners(self) -> np.ndarray:
        return np.array([[self.z, self.y0, self.x0], [self.z, self.y1, self.x1]], dtype=np.float64)


@dataclass(frozen=True)
class Prompts:
    points: tuple = ()  # ((z, y, x), positive: bool) in voxel coordinates
    box: SliceBox | None = None

    def coords_labels(self) -> tuple[np.ndarray, np.ndarray]:
        coords = [p for p, _ in self.points]
        labels = [POSITIVE if pos else NEGATIVE for _, pos in self.points]
        if self.box is not None:
            coords = list(self.box.corners) + coords
            labels = [BOX_MIN, BOX_MAX] + labels
        return np.asarray(coords, dtype=np.float64).reshape(-1, 3), np.asarray(labels, dtype=np.int64)

    def in_frame(self, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
        """The decoder's input for ``frame``: coordinates in the frame and labels. Negative points outside the frame
        are left out: the mask is zero there anyway, and the network never saw a point outside its view."""
        coords, labels = self.coords_labels()
        keep = np.array([label != NEGATIVE or frame.box.contains(c) for c, label in zip(coords, labels)], dtype=bool)
        return frame.to_frame(coords[keep].reshape(-1, 3)), labels[keep]

    @property
    def ambiguous(self) -> bool:
        """One point alone is ambiguous (part or whole?): the decoder then returns several masks."""
        return self.box is None and len(self.points) == 1


@dataclass
class Result:
    """The outcome of one interaction. The object's mask is zero outside ``roi``."""

    mask_roi: np.ndarray  # uint8 (z, y, x) over roi
    roi: Box
    changed: Box  # every voxel whose value may differ from the previous result lies in this box
    shape: tuple
    cache_hit: bool
    iou: float
    timings: dict = field(default_factory=dict)

    def full_mask(self, out: np.ndarray | None = None) -> np.ndarray:
        """The mask over the whole volume (uint8, (z, y, x)); ``out`` is reused when given."""
        if out is None:
            out = np.zeros(self.shape, dtype=np.uint8)
        else:
            out[...] = 0
        out[self.roi.slices] = self.mask_roi
        return out

    def update(self, out: np.ndarray) -> np.ndarray:
        """Bring ``out``, which holds this object's previous mask, up to date: only the changed box is written."""
        out[self.changed.slices] = 0
        out[self.roi.slices] = self.mask_roi
        return out


@dataclass(frozen=True)
class _State:
    prompts: Prompts
    frame: Frame | None
    logits: torch.Tensor | None
    result: Result | None  # None in the undo history, which keeps only its iou
    iou: float = 0.0

    def without_mask(self) -> "_State":
        return replace(self, result=None, iou=self.result.iou if self.result is not None else 0.0)


class InteractiveObject:
    """The interaction state of one object on one image: its prompts, zoom-in region, logits and undo history."""

    def __init__(self, image: ImageState, use_cache: bool = True):
        self.image = image
        self.engine = image.engine
        self.use_cache = use_cache
        self._state = _State(Prompts(), None, None, None)
        self._history: deque[_State] = deque(maxlen=UNDO_STEPS)
        self._features: dict[Box, ImageFeatures] = {}
        self.lock = threading.RLock()
        self.last_used = time.monotonic()

    # -- public API -----------------------------------------------------------------------------------------------
    @property
    def prompts(self) -> Prompts:
        return self._state.prompts

    @property
    def result(self) -> Result | None:
        return self._state.result

    @property
    def previous_prompts(self) -> Prompts | None:
        """The prompts that ``undo`` goes back to (None when there is nothing to undo)."""
        with self.lock:
            return self._history[-1].prompts if self._history else None

    def add_point(self, zyx, positive: bool = True) -> Result:
        return self.interact(points=[(zyx, positive)])

    def add_box(self, z: int, corner_a_yx, corner_b_yx) -> Result:
        return self.interact(box=(z, corner_a_yx, corner_b_yx))

    def interact(self, points=(), box=None) -> Result:
        """Add points ``[((z, y, x), positive), ...]`` and/or a slice box ``(z, (y, x), (y, x))`` in one step."""
        with self.lock:
            self.last_used = time.monotonic()
            new_points = tuple(self._check_point(p, pos, i) for i, (p, pos) in enumerate(points))
            new_box = self._check_box(box) if box is not None else None
            if not new_points and new_box is None:
                raise PromptError("no prompt given: add a point or a box")
            old = self._state
            if new_box is not None and old.prompts.box is not None:
                raise PromptError("this object already has a box; reset it or start a new object for another box")
            if len(old.prompts.points) + len(new_points) > MAX_POINTS:
                raise PromptError(f"an object takes at most {MAX_POINTS} points; start a new object or undo")
            prompts = Prompts(old.prompts.points + new_points, new_box or old.prompts.box)
            if old.logits is None or new_box is not None:
                if new_box is None and not any(pos for _, pos in prompts.points):
                    raise PromptError("the first prompt of an object must be a positive point or a box")
                state = self._first_prediction(prompts)
            else:
                state = self._edit(old, prompts, new_points)
            self._history.append(old.without_mask())
            self._state = state
            # Idle time counts from the end of an interaction: a slow first prediction is not idle time.
            self.last_used = self.image.last_used = time.monotonic()
            return state.result

    @contextlib.contextmanager
    def all_or_nothing(self):
        """Interactions made inside either all stay, or (when one raises) none does: the state and the undo history
        are put back as they were (undoing the steps would not bring back what a full history dropped)."""
        with self.lock:
            state, history = self._state, list(self._history)
            try:
                yield self
            except BaseException:
                self._state = state
                self._history = deque(history, maxlen=UNDO_STEPS)
                raise

    def undo(self) -> Result | None:
        """Back to the state before the last interaction; returns its result (None when nothing is left)."""
        with self.lock:
            if not self._history:
                raise PromptError("nothing to undo")
            current = self._state
            state = self._history[-1]
            result = None
            if state.logits is not None:
                changed = state.frame.box if current.result is None else current.result.roi.union(state.frame.box)
                result = self._result(state.frame, state.logits, state.iou, changed, cache_hit=True)
            self._history.pop()  # only now: a failure above (out of memory) leaves the step to undo again
            self._state = replace(state, result=result)
            return result

    def reset(self) -> None:
        with self.lock:
            self._state = _State(Prompts(), None, None, None)
            self._history.clear()
            self._features.clear()

    # -- validation ---------------------------------------------------------------------------------------------
    def _check_point(self, zyx, positive, index) -> tuple:
        try:
            p = np.asarray(zyx, dtype=np.float64).reshape(3)
        except (TypeError, ValueError):
            raise PromptError(f"point {index} must be three numbers (z, y, x), got {zyx!r}") from None
        if not np.isfinite(p).all():
            raise PromptError(f"point {index} has a non-finite coordinate: {p.tolist()}")
        shape = np.asarray(self.image.shape)
        if (p < 0).any() or (p > shape - 1).any():
            raise PromptError(f"point {index} at (z, y, x) = {p.tolist()} lies outside the volume of shape "
                              f"{tuple(shape.tolist())}")
        return tuple(p.tolist()), bool(positive)

    def _check_box(self, box) -> SliceBox:
        try:
            z, a, b = box
            z = float(z)
            (ya, xa), (yb, xb) = (np.asarray(a, dtype=np.float64).reshape(2), np.asarray(b, dtype=np.float64).reshape(2))
        except (TypeError, ValueError):
            raise PromptError(f"a box is (slice, (y0, x0), (y1, x1)), got {box!r}") from None
        if not np.isfinite([z, ya, xa, yb, xb]).all():
            raise PromptError("the box has a non-finite coordinate")
        nz, ny, nx = self.image.shape
        if not 0 <= z <= nz - 1:
            raise PromptError(f"the box's slice {z:g} lies outside the volume's {nz} slices")
        # Corners may come in any order (viewers map them from world coordinates): sort them.
        y0, y1 = sorted((ya, yb))
        x0, x1 = sorted((xa, xb))
        if y1 < 0 or x1 < 0 or y0 > ny - 1 or x0 > nx - 1:
            raise PromptError(f"the box (y {y0:g}..{y1:g}, x {x0:g}..{x1:g}) lies outside the slice of "
                              f"{ny} x {nx} voxels")
        # A box that pokes out of the slice is clipped to it.
        y0, y1 = max(y0, 0), min(y1, ny - 1)
        x0, x1 = max(x0, 0), min(x1, nx - 1)
        z, y0, x0, y1, x1 = (voxel_index(c) for c in (z, y0, x0, y1, x1))
        if y1 <= y0 or x1 <= x0:
            raise PromptError(f"the box (y {y0:g}..{y1:g}, x {x0:g}..{x1:g}) has no area; draw a box at least "
                              "two voxels wide and high")
        return SliceBox(z, y0, x0, y1, x1)

    # -- passes -------------------------------------------------------------------------------------------------
    def _roi_features(self, frame: Frame) -> tuple[ImageFeatures, bool]:
        feats = self._features.get(frame.box) if self.use_cache else None
        if feats is not None:
            return feats, True
        feats = self.engine.encode(self.image.volume, frame)
        self._features[frame.box] = feats
        while len(self._features) > FEATURE_CACHE_SIZE:
            self._features.pop(next(iter(self._features)))
        return feats, False

    def _first_prediction(self, prompts: Prompts) -> _State:
        t0 = time.perf_counter()
        image = self.image
        coords, labels = prompts.coords_labels()
        feats, zoom_out_cached = image.zoom_out_features()
        t1 = time.perf_counter()
        coarse_frame = image.frame
        coarse, _ = self.engine.decode(feats, *prompts.in_frame(coarse_frame), None, prompts.ambiguous)
        positive = coords[labels != NEGATIVE]
        seeds = positive
        if prompts.box is not None:
            b = prompts.box
            ys, xs = np.meshgrid(np.linspace(b.y0, b.y1, 5), np.linspace(b.x0, b.x1, 5), indexing="ij")
            seeds = np.concatenate([positive, np.stack([np.full(ys.size, b.z), ys.ravel(), xs.ravel()], 1)])
        t2 = time.perf_counter()
        mid_frame = None if mask_covers(coarse.numpy(), coarse_frame, seeds) else self._mid_frame(seeds)
        if mid_frame is not None:
            mid_feats = self.engine.encode(image.volume, mid_frame)
            coarse, _ = self.engine.decode(mid_feats, *prompts.in_frame(mid_frame), None, prompts.ambiguous)
            coarse_frame = mid_frame
        t3 = time.perf_counter()
        if prompts.box is not None and len(prompts.points) == 0:
            b = prompts.box
            roi = roi_for_box(coarse.numpy(), coarse_frame, b.z, (b.y0, b.x0), (b.y1, b.x1), image.spacing,
                              image.shape)
        else:
            roi = roi_from_mask(coarse.numpy(), coarse_frame, positive.min(0), positive.max(0), seeds,
                                image.spacing, image.shape)
            if prompts.box is not None:
                roi = roi.union(self._box_depth_extent(prompts.box))
        frame = Frame(roi, self.engine.config.input_shape)
        self._features.clear()
        feats_in, _ = self._roi_features(frame)
        t4 = time.perf_counter()
        logits, iou = self.engine.decode(feats_in, *prompts.in_frame(frame), None, prompts.ambiguous)
        if prompts.box is None:
            # A point says nothing of size: when the zoom-in mask fills only a small part of a region found by a
            # coarse zoom-out mask, look once more, closer (the region shrinks to that mask plus its margin).
            tight = roi_from_mask(logits.numpy(), frame, positive.min(0), positive.max(0), positive,
                                  image.spacing, image.shape)
            if np.prod(tight.size) < TIGHTEN_RATIO * np.prod(roi.size) and frame.box.contains_box(tight):
                roi, frame = tight, Frame(tight, self.engine.config.input_shape)
                feats_in, _ = self._roi_features(frame)
                logits, iou = self.engine.decode(feats_in, *prompts.in_frame(frame), None, prompts.ambiguous)
        result = self._result(frame, logits, iou, changed=roi if self._state.frame is None
                              else roi.union(self._state.frame.box), cache_hit=False)
        t5 = time.perf_counter()
        result.timings = {"zoom_out_encode": t1 - t0, "zoom_out_cached": zoom_out_cached, "zoom_out_decode": t2 - t1,
                          "mid_zoom": t3 - t2, "zoom_in_encode": t4 - t3, "zoom_in_decode_paste": t5 - t4,
                          "total": t5 - t0}
        return _State(prompts, frame, logits, result)

    def _mid_frame(self, seeds: np.ndarray) -> Frame | None:
        """The intermediate view around the prompts' seeds (None when it would be the whole volume again)."""
        image = self.image
        size = mid_zoom_size(image.spacing, image.shape)  # grown where the seeds lie farther apart
        box = Box.from_extent(seeds.min(0), seeds.max(0), np.zeros(3), size, image.shape)
        if box == image.frame.box:
            return None
        return Frame(box, self.engine.config.input_shape)

    def _box_depth_extent(self, box: SliceBox) -> Box:
        """A slice box says nothing of depth: look at least half its larger in-plane size (mm) above and below."""
        sz, sy, sx = self.image.spacing
        half = max((box.y1 - box.y0) * sy, (box.x1 - box.x0) * sx) / 2.0
        dz = int(np.ceil(half / sz))
        nz = self.image.shape[0]
        return Box((max(box.z - dz, 0), box.y0, box.x0), (min(box.z + dz + 1, nz), box.y1 + 1, box.x1 + 1))

    def _edit(self, old: _State, prompts: Prompts, new_points: tuple) -> _State:
        t0 = time.perf_counter()
        frame = old.frame
        prev_logits = old.logits
        if not any(pos or frame.box.contains(p) for p, pos in new_points):
            # Only background clicks where the mask is zero already: nothing to decode, and growing the region for
            # them would trade resolution for nothing.
            result = self._result(frame, prev_logits, old.result.iou, changed=frame.box, cache_hit=True)
            result.timings = {"encode": 0.0, "decode_paste": time.perf_counter() - t0,
                              "total": time.perf_counter() - t0}
            return _State(prompts, frame, prev_logits, result)
        outside = np.array([p for p, pos in new_points if pos and not frame.box.contains(p)]).reshape(-1, 3)
        if len(outside):
            roi = expand_roi(frame.box, outside, self.image.spacing, self.image.shape)
            new_frame = Frame(roi, frame.shape)
            prev_logits = remap_logits(prev_logits, frame, new_frame)
            frame = new_frame
        feats, cache_hit = self._roi_features(frame)
        t1 = time.perf_counter()
        logits, iou = self.engine.decode(feats, *prompts.in_frame(frame), prev_logits, False)
        result = self._result(frame, logits, iou, changed=frame.box.union(old.frame.box), cache_hit=cache_hit)
        t2 = time.perf_counter()
        result.timings = {"encode": t1 - t0, "decode_paste": t2 - t1, "total": t2 - t0}
        return _State(prompts, frame, logits, result)

    def _result(self, frame: Frame, logits: torch.Tensor, iou: float, changed: Box, cache_hit: bool) -> Result:
        mask = logits_to_mask(logits, frame.box.size, threshold=self.engine.mask_threshold)
        return Result(mask, frame.box, changed, self.image.shape, cache_hit, iou)
