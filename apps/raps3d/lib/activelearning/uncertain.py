"""Active learning: the unlabeled image on which the model is least certain.

Reads the scores the scoring method stored in the images' info. Images handed out by this strategy within the last
``reserve_seconds`` come after the others, so two annotators asking at the same time get different images; when all
are out, the one handed out longest ago comes first. MONAI Label records each hand-out in the image's info, to the
second, and a scoring process writing the datastore at the same moment can undo that record; so the strategy also
keeps its own hand-out times, exact, in memory. Images that could not be read are skipped, and so are, for an hour,
images that could not be fetched when handed out (``set_aside``: over DICOMweb, a series that cannot be converted
would otherwise come first again on every request) or whose file is gone. With no scores yet (the scoring has not
run), the first unlabeled image by name is returned.
"""

from __future__ import annotations

import logging
import math
import os
import time

from fastapi import HTTPException
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from ..dicomweb import http_errors
from ..scoring.uncertainty import DETAILS_KEY, SCORE_KEY, unlabeled_images

logger = logging.getLogger(__name__)

SET_ASIDE_SECONDS = 3600
MAX_SET_ASIDE_PER_REQUEST = 5


def _handed_out_at(info: dict, strategy: str) -> float:
    """When MONAI Label recorded handing the image out (0 if never). Image info can be written by any client
    (``PUT /datastore/image/info``): one malformed record must not stop every annotator's next-sample request."""
    record = info.get("strategy")
    record = record.get(strategy) if isinstance(record, dict) else None
    ts = record.get("ts") if isinstance(record, dict) else None
    try:
        ts = float(ts or 0)
    except (TypeError, ValueError, OverflowError):
        return 0.0
    return ts if math.isfinite(ts) else 0.0


class MostUncertain(Strategy):
    def __init__(self, reserve_seconds: float = 600.0):
        super().__init__(f"Unlabeled image with the highest Raps-3D uncertainty ('{SCORE_KEY}'); first by name "
                         "while no scores exist")
        self.reserve_seconds = reserve_seconds
        self._set_aside: dict[str, float] = {}  # image id -> when it could not be fetched
        self._handed_out: dict[str, float] = {}  # image id -> when this strategy last handed it out

    def set_aside(self, image_id: str, reason: str) -> None:
        """Skip an image that could not be fetched for the next ``SET_ASIDE_SECONDS`` (kept in memory: a restarted
        server tries it once more)."""
        logger.warning(f"active learning: {image_id} set aside for {SET_ASIDE_SECONDS} s: {reason}")
        self._set_aside[image_id] = time.time()

    def next_fetchable(self, request, datastore: Datastore) -> dict:
        """The next image, as ``__call__`` picks it, with its local ``path``; one that cannot be fetched (404, 422) is
        set aside and the next one tried. Other failures (the server is down, this disk is full) are not the image's
        fault: they are raised as they are."""
        for _ in range(MAX_SET_ASIDE_PER_REQUEST):
            result = self(request, datastore)
            if not result or not result.get("id"):
                return {}
            try:
                with http_errors(result["id"], "send series", "the series cannot be converted to a volume"):
                    result["path"] = datastore.get_image_uri(result["id"])
            except HTTPException as e:
                if e.status_code not in (404, 422):
                    raise
                self.set_aside(result["id"], str(e.detail))
                continue
            if not result["path"] or not os.path.exists(result["path"]):  # removed while the datastore was not told
                self.set_aside(result["id"], "its file is gone")
                continue
            self._handed_out[result["id"]] = time.time()
            return result
        raise HTTPException(status_code=502, detail=f"{MAX_SET_ASIDE_PER_REQUEST} images in a row could not be "
                                                    "fetched; see the server log")

    def __call__(self, request, datastore: Datastore):
        strategy = request.get("strategy", "")
        now = time.time()
        candidates = []
        for image_id in unlabeled_images(datastore, request):
            if now - self._set_aside.get(image_id, -SET_ASIDE_SECONDS) < SET_ASIDE_SECONDS:
                continue
            info = datastore.get_image_info(image_id)
            details = info.get(DETAILS_KEY)
            if isinstance(details, dict) and details.get("error"):
                continue
            served = max(_handed_out_at(info, strategy), self._handed_out.get(image_id, 0.0))
            score = info.get(SCORE_KEY)
            score = float(score) if isinstance(score, (int, float)) and math.isfinite(score) else None
            recently_served = now - served < self.reserve_seconds
            # When every image is out, the one handed out longest ago: more annotators than images then still
            # spread over the images instead of all getting the most uncertain one.
            candidates.append((recently_served, served if recently_served else 0.0, score is None, -(score or 0.0),
                               image_id, score))
        if not candidates:
            return None
        recently_served, _, unscored, _, image_id, score = min(candidates)
        reason = "first unscored unlabeled image by name" if unscored else "highest uncertainty"
        if recently_served:
            reason += "; every candidate was handed out recently"
        logger.info(f"{strategy}: {image_id} ({reason}; score {score})")
        return {"id": image_id, SCORE_KEY: score, "reason": reason}
