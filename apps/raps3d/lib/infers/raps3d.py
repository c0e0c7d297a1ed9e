"""The interactive infer task: viewers' clicks and boxes in, a label with the image's geometry out.

It replaces MONAI Label's transform pipeline (reload the file, transform, invert, re-encode the whole label on every
click) with: images opened once and kept by the session store, prompts applied to a cached per-object session, and
the reply written directly in the format asked for. MONAI Label sends the returned file and deletes it afterwards.

Errors are raised as ``fastapi.HTTPException``: MONAI Label turns any other exception into a bare 500, while an
HTTPException raised here reaches the client with its status and message (``{"detail": ...}``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Any, Hashable

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

import raps3d

from .. import interaction
from ..images import GeometryCache, ImageReadError, image_key, read_for_model
from ..infer_route import UPLOADED_PARAM
from ..label_writers import LabelFormat, LabelFormatError, write_label
from ..model_service import ModelService, ModelStatus
from ..options import yes_no
from ..prompts import PromptFormatError, PromptSet, parse_prompts

logger = logging.getLogger(__name__)

DEFAULT_CLIENT = "default"
DEFAULT_LABEL = "object"
UNNAMED = "unnamed object"  # the first part of the session key of an object that a client does not name
MAX_REMEMBERED_CLIENTS = 1024  # (client, image) pairs whose unnamed objects are remembered
MAX_UNNAMED_OBJECTS = 8  # unnamed objects kept per client and image
LABEL_VALUE = 1  # the library's masks are 0/1; label_names maps the label's name to 1

DESCRIPTION = ("Raps-3D interactive 3D CT segmentation (class-agnostic): foreground/background points [i, j, k], "
               "a 2D box {\"slice\": k, \"corners\": [[i0, j0], [i1, j1]]} or a Slicer roi; edits reuse the "
               "session of (client_id, image, label).")


def _flag(request: dict, name: str) -> bool:
    try:
        return yes_no(request.get(name, False), f"'{name}'")
    except ValueError as e:
        raise PromptFormatError(str(e)) from None


MAX_NAME_LENGTH = 200  # characters of a client id or a label; cut, two long names would share one object


def _checked_name(value, what: str) -> str:
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise PromptFormatError(f"'{what}' must be a name, got {repr(value)[:80]}")
    name = str(value).strip()
    if len(name) > MAX_NAME_LENGTH:
        raise PromptFormatError(f"'{what}' must be at most {MAX_NAME_LENGTH} characters, got {len(name)}")
    return name


def client_of(request: dict) -> str:
    """Who is annotating: the ``client_id`` parameter (MONAI Label's clients send it), else a ``session`` parameter
    (a string, or MONAI Label's session record), else one shared default. MONAI Label 0.8.5 does not pass the
    authenticated user to infer tasks."""
    client = request.get("client_id")
    if client is not None and client != "":  # a malformed id must not make the client the shared default
        return _checked_name(client, "client_id") or DEFAULT_CLIENT
    value = request.get("session")
    if isinstance(value, dict):
        value = value.get("name") or value.get("session_id")
    if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
        return str(value).strip()[:MAX_NAME_LENGTH]
    return DEFAULT_CLIENT


def label_named(request: dict) -> bool:
    """Whether the request names its object (3D Slicer sends the segment's name; OHIF's point prompts do not)."""
    label = request.get("label")
    return label is not None and str(label).strip() != ""


def label_of(request: dict) -> str:
    label = request.get("label")
    if label is None or label == "":
        return DEFAULT_LABEL
    return _checked_name(label, "label") or DEFAULT_LABEL


def roi_ijk(box: raps3d.Box) -> list[int]:
    """A (z, y, x) half-open box as [i_min, i_max, j_min, j_max, k_min, k_max], inclusive (Slicer's roi form)."""
    (z0, y0, x0), (z1, y1, x1) = box.start, box.stop
    return [x0, x1 - 1, y0, y1 - 1, z0, z1 - 1]


class Raps3DInfer(InferTask):
    def __init__(self, service: ModelService, labels, result_dir: str = ""):
        super().__init__(type=InferType.DEEPGROW, labels=list(labels), dimension=3, description=DESCRIPTION,
                         config={})
        self.service = service
        self.result_dir = result_dir
        self.geometries = GeometryCache()
        # (client, image) -> the session keys of its unnamed objects, latest last
        self._unnamed: OrderedDict[tuple, OrderedDict] = OrderedDict()
        self._unnamed_lock = threading.Lock()

    def is_valid(self) -> bool:
        return True  # without a checkpoint an untrained model runs (and /info says so)

    def info(self) -> dict[str, Any]:
        status = self.service.expected_status()
        info = super().info()
        if status.warning:
            info["description"] = f"{status.warning} {DESCRIPTION}"
        info["model_trained"] = status.trained
        return info

    # -- request handling ------------------------------------------------------------------------------------------
    def __call__(self, request):
        begin = time.perf_counter()
        try:
            return self._run(request, begin)
        except HTTPException:
            raise
        except (PromptFormatError, LabelFormatError, raps3d.PromptError) as e:
            raise HTTPException(status_code=400, detail=str(e)) from None
        except raps3d.SessionError as e:
            raise HTTPException(status_code=409, detail=str(e)) from None
        except (ImageReadError, raps3d.ImageError) as e:
            path = request.get("image")
            detail = str(e)
            if request.get(UPLOADED_PARAM) is True and isinstance(path, str):  # named by its temporary file
                detail = detail.replace(repr(os.path.basename(path)), "the uploaded file")
            raise HTTPException(status_code=422, detail=detail) from None

    def _unnamed_object(self, store: raps3d.SessionStore, client: str, image: Hashable, prompts: PromptSet,
                        latest: bool) -> tuple:
        """The session key of a request that names no object (OHIF's point prompts send each segment's clicks, and
        no label). Such an object is known by its first prompt, which a segment's clicks always start with:
        switching between segments then edits each one's session instead of rebuilding it. ``latest``: an undo or a
        reset without prompts, which go to the client's latest such object on the image. A client keeps at most
        MAX_UNNAMED_OBJECTS of them per image (the oldest is dropped), so that one annotator clicking afresh again
        and again does not push other annotators' sessions out of the store."""
        first = (prompts.box.to_library() if prompts.box is not None
                 else next((p for p in prompts.points if p[1]), None))
        with self._unnamed_lock:
            keys = self._unnamed.get((client, image))
            if latest or first is None:  # (a request without a first prompt is refused)
                return next(reversed(keys)) if keys else (UNNAMED, None)  # none: an undo finds no session
            if keys is None:
                keys = self._unnamed[(client, image)] = OrderedDict()
                while len(self._unnamed) > MAX_REMEMBERED_CLIENTS:
                    self._unnamed.popitem(last=False)
            self._unnamed.move_to_end((client, image))
            key = (UNNAMED, repr(first))  # a tuple: no label a client names (a string) can be the same key
            keys[key] = None
            keys.move_to_end(key)
            dropped = []
            while len(keys) > MAX_UNNAMED_OBJECTS:
                dropped.append(keys.popitem(last=False)[0])
        for old in dropped:
            store.drop_object((client, image, old))
        return key

    def _open(self, store: raps3d.SessionStore, path: str, uploaded: bool):
        key = image_key(path, by_content=uploaded)

        def load():
            volume, geometry, _ = read_for_model(path)
            self.geometries.put(key, geometry)
            return volume, geometry.model_spacing

        was_open = store.is_open(key)
        state = store.image(key, load)
        return key, state, self.geometries.get(key, path), was_open

    def _run(self, request: dict, begin: float):
        path = request.get("image")
        name = request.get("image_id") or path
        if not isinstance(path, str) or not path or not os.path.exists(path):
            raise HTTPException(status_code=404, detail=f"image {name!r} is not in the datastore")
        fmt = LabelFormat.from_params(request)
        label, client = label_of(request), client_of(request)
        do_reset, do_undo = _flag(request, "reset"), _flag(request, "undo")
        if do_reset and do_undo:
            raise PromptFormatError("send either 'reset' or 'undo', not both")

        store, status = self.service.serving()  # together: a model reload may come between two calls
        t_open = time.perf_counter()
        image_key_, state, geometry, was_open = self._open(store, path, request.get(UPLOADED_PARAM) is True)
        # The session's image is in the model's orientation; prompts are mapped there, replies back to the file's.
        orientation = geometry.orientation
        prompts = parse_prompts(request, geometry.size, orientation)  # checked before anything changes
        key = (client, image_key_, label if label_named(request) else
               self._unnamed_object(store, client, image_key_, prompts, do_undo or (do_reset and prompts.empty)))
        if not do_undo and not prompts.empty and prompts.box is None and not any(pos for _, pos in prompts.points):
            # Every request carries all of an object's prompts, so this one could never start it: refused before a
            # reset or anything else changes.
            raise PromptFormatError("background points alone cannot make an object: send a 'foreground' point or "
                                    "a box with them")

        t_interact = time.perf_counter()
        if do_undo:
            try:
                outcome = interaction.undo(store, key, state, name=label)
            except raps3d.PromptError as e:
                raise HTTPException(status_code=409, detail=str(e)) from None
        elif do_reset:
            outcome = interaction.reset(store, key)
            if not prompts.empty:
                outcome = interaction.apply_prompts(store, key, state, prompts)
        elif prompts.empty:
            raise PromptFormatError("no prompt: send 'foreground' points [i, j, k], a 'box' or an 'roi' "
                                    "(or 'reset' / 'undo')")
        else:
            outcome = interaction.apply_prompts(store, key, state, prompts)

        t_write = time.perf_counter()
        result = outcome.result
        roi = None
        if result is None:
            label_file = write_label(fmt, None, None, None, geometry, self.result_dir)
        else:
            roi = raps3d.Box(*orientation.box_back(result.roi.start, result.roi.stop, geometry.shape_zyx))
            label_file = write_label(fmt, orientation.volume_back(result.mask_roi), roi.start, roi.stop, geometry,
                                     self.result_dir)
        end = time.perf_counter()

        box = prompts.box.as_reply(orientation, geometry.shape_zyx) if prompts.box is not None else None
        params = self._reply(outcome, status, roi, box, label, client, was_open,
                             {"open_image": t_interact - t_open, "interact": t_write - t_interact,
                              "write": end - t_write, "total": end - begin})
        logger.info(f"Raps-3D: client {client!r} label {label!r}: {outcome.mode}, cache_hit {outcome.features_reused}, "
                    f"total {end - begin:.3f} s")
        return label_file, params

    def _reply(self, outcome: interaction.Outcome, status: ModelStatus, roi: raps3d.Box | None, box: dict | None,
               label: str, client: str, was_open: bool, timings: dict) -> dict:
        """``roi`` and ``box`` in the file's voxel order; ``status``: of the model that answered."""
        result = outcome.result
        model_timings = {}
        if result is not None and outcome.mode in ("new_object", "edit"):
            model_timings = outcome.timings if outcome.timings is not None else result.timings
        rounded = {k: round(v, 4) for k, v in timings.items()}
        return {
            "label_names": {label: LABEL_VALUE},
            "label": label,
            "client_id": client,
            "cache": outcome.mode,
            "cache_hit": outcome.features_reused,
            "image_cached": was_open,
            "roi": roi_ijk(roi) if roi is not None else None,
            "box": box,
            "prompts": {"foreground": sum(1 for _, pos in outcome.prompts.points if pos),
                        "background": sum(1 for _, pos in outcome.prompts.points if not pos)},
            "predicted_iou": round(result.iou, 4) if result is not None else None,
            "timings": {**rounded, **{f"model_{k}": (round(v, 4) if isinstance(v, float) else v)
                                      for k, v in model_timings.items()}},
            # MONAI Label's usual fields, for clients that show them
            "latencies": {"pre": rounded["open_image"], "infer": rounded["interact"], "invert": 0.0, "post": 0.0,
                          "write": rounded["write"], "total": rounded["total"], "transform": None},
            "centroids": {},
            "model": {"checkpoint": os.path.basename(status.path), "trained": status.trained, "config": status.config,
                      "warning": status.warning},
        }
