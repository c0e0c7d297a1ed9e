"""Active learning: the unlabeled image on which the model is least certain.

Reads the scores the scoring method stored in the images' info. Images handed out by this strategy within the last
``reserve_seconds`` (MONAI Label records each hand-out in the image's info) come after the others, so two
annotators asking at the same time get different images; when all are out, the one handed out longest ago comes
first. Images that could not be read are skipped. With no scores
yet (the scoring has not run), the first unlabeled image by name is returned.
"""

from __future__ import annotations

import logging
import time

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from ..scoring.uncertainty import DETAILS_KEY, SCORE_KEY

logger = logging.getLogger(__name__)


class MostUncertain(Strategy):
    def __init__(self, reserve_seconds: float = 600.0):
        super().__init__(f"Unlabeled image with the highest Raps-3D uncertainty ('{SCORE_KEY}'); first by name "
                         "while no scores exist")
        self.reserve_seconds = reserve_seconds

    def __call__(self, request, datastore: Datastore):
        strategy = request.get("strategy", "")
        now = time.time()
        candidates = []
        for image_id in datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels")):
            info = datastore.get_image_info(image_id)
            if (info.get(DETAILS_KEY) or {}).get("error"):
                continue
            served = (info.get("strategy") or {}).get(strategy, {}).get("ts", 0)
            score = info.get(SCORE_KEY)
            score = float(score) if isinstance(score, (int, float)) else None
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
