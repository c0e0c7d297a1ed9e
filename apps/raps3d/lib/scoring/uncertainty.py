"""Scoring for active learning: how unsure the current model is on each unlabeled image.

Each image gets one automatic click (the brightest soft-tissue blob, see ``auto_prompt``); the model's own
predicted IoU of its mask tells how sure it is: uncertainty = 1 - predicted IoU. The score is stored in the image's
info in the datastore (``datastore.update_image_info``), with the weights and file it was computed for, so an image
is scored again only when the model, the file or the way of scoring (``SCORING_VERSION``) changed. MONAI Label runs
this in a subprocess by default (at start, after training, after each next-sample request) or in the server with
``run_sync``. Over DICOMweb it scores only series already fetched into the cache, unless the request says ``fetch``.
"""

from __future__ import annotations

import logging
import os
import time

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

import raps3d

from ..auto_prompt import soft_tissue_seed
from ..images import ImageReadError, image_key, read_for_model
from ..datastore_index import InfoWriter
from ..model_service import ModelService

logger = logging.getLogger(__name__)

SCORE_KEY = "raps3d_uncertainty"
DETAILS_KEY = "raps3d_uncertainty_details"
# How scores are computed; a stored score of another version is computed again. 2: the image in the model's
# orientation (``raps3d.orientation``; version 1 showed the model a DICOM series upside down); 3: a volume stored as
# coronal or sagittal slices reordered into it too.
SCORING_VERSION = 3


def unlabeled_images(datastore: Datastore, request: dict) -> list[str]:
    """The datastore's unlabeled image ids. MONAI Label's local datastore lists them by iterating its dict, which
    an image added meanwhile (the folder watcher, an upload) changes under it: listed again then."""
    for attempt in range(3):
        try:
            return datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        except RuntimeError as e:  # "dictionary changed size during iteration"
            if attempt == 2 or "changed size" not in str(e):
                raise
            logger.info(f"the datastore changed while its images were listed ({e}): listed again")
    return []


def _up_to_date(details: dict, weights: str, file_id: str, rescore: bool) -> bool:
    """Whether a stored score is of these weights, this file and this way of scoring (and no rescore is asked)."""
    return (not rescore and details.get("weights") == weights and details.get("file") == file_id
            and details.get("version") == SCORING_VERSION)


def _asked(request: dict, key: str) -> bool:
    return str(request.get(key, "false")).lower() in ("1", "true", "yes")


def _file_id(path: str) -> str:
    return ":".join(str(part) for part in image_key(path)[1:])


class Raps3DUncertainty(ScoringMethod):
    def __init__(self, service: ModelService):
        super().__init__("Raps-3D uncertainty (1 - predicted IoU after an automatic soft-tissue click) of every "
                         f"unlabeled image, stored as image info '{SCORE_KEY}'")
        self.service = service

    def __call__(self, request, datastore: Datastore):
        summary = {"scored": {}, "unchanged": [], "failed": {}, "not_fetched": []}
        writer = InfoWriter(datastore)
        try:
            self._pass(request, datastore, writer, summary)
        finally:  # what was scored before an unexpected error is kept
            self._unstored(summary, writer.flush())
        return summary

    def _pass(self, request, datastore: Datastore, writer: InfoWriter, summary: dict) -> None:
        # The model is loaded only once an image needs scoring: most passes find every score up to date, and on a GPU
        # each pass runs in its own process beside the server's model.
        engine = None
        weights = self.service.expected_status().weights
        rescore = _asked(request, "rescore")
        # Over DICOMweb, only series a viewer has opened (already in the cache) are scored unless asked: scoring
        # at start would otherwise download every CT series of the hospital's server.
        fetch = _asked(request, "fetch")
        is_cached = getattr(datastore, "is_cached", None)
        images = sorted(unlabeled_images(datastore, request))
        for image_id in images:
            if is_cached is not None and not fetch and not is_cached(image_id):
                summary["not_fetched"].append(image_id)
                continue
            try:  # over DICOMweb this fetches and converts the series: one that fails must not stop the pass
                path = datastore.get_image_uri(image_id)
            except Exception as e:  # noqa: BLE001
                # Not recorded (the datastore keeps info only for converted series): a server that is down now may
                # answer next time.
                detail = getattr(e, "detail", None) or f"{type(e).__name__}: {e}"
                logger.warning(f"Raps-3D scoring: {image_id} cannot be fetched: {detail}")
                summary["failed"][image_id] = f"cannot be fetched: {detail}"
                continue
            if not path or not os.path.exists(path):
                summary["failed"][image_id] = "its file is gone"  # removed from the folder meanwhile
                continue
            file_id = _file_id(path)
            details = datastore.get_image_info(image_id).get(DETAILS_KEY) or {}
            if not _up_to_date(details, weights, file_id, rescore) and engine is None:
                engine = self.service.engine()
                weights = self.service.status().weights  # what loaded (the base, should a fine-tuned file fail)
            if _up_to_date(details, weights, file_id, rescore):
                summary["unchanged"].append(image_id)
                continue
            start = time.perf_counter()
            try:
                score, seed = self._score(engine, path)
            except (ImageReadError, raps3d.ImageError) as e:
                # The file itself is refused: remembered, so the strategy skips it and it is not retried until the
                # file changes.
                logger.warning(f"Raps-3D scoring: {image_id}: {e}")
                summary["failed"][image_id] = str(e)
                self._unstored(summary, writer.add(image_id, {SCORE_KEY: None, DETAILS_KEY: {
                    "weights": weights, "file": file_id, "version": SCORING_VERSION, "error": str(e),
                    "ts": int(time.time())}}))
                continue
            except Exception as e:  # noqa: BLE001 - one image must not stop the pass over the others
                # Not the file's fault (out of memory while the server works on the same GPU, ...): tried again on
                # the next pass, and meanwhile still handed out.
                logger.exception(f"Raps-3D scoring: {image_id} failed")
                summary["failed"][image_id] = f"{type(e).__name__}: {e}"
                continue
            summary["scored"][image_id] = score
            logger.info(f"Raps-3D scoring: {image_id}: uncertainty {score:.4f}")
            self._unstored(summary, writer.add(image_id, {SCORE_KEY: score, DETAILS_KEY: {
                "weights": weights, "file": file_id, "version": SCORING_VERSION, "seed_ijk": list(seed[::-1]),
                "ts": int(time.time()), "seconds": round(time.perf_counter() - start, 3)}}))

    @staticmethod
    def _unstored(summary: dict, failed: dict[str, str]) -> None:
        """Images whose score could not be written (removed while they were scored): failed; the pass goes on."""
        for image_id, why in failed.items():
            logger.warning(f"Raps-3D scoring: {image_id}: the score was not stored: {why}")
            summary["scored"].pop(image_id, None)
            summary["failed"][image_id] = f"the score was not stored: {why}"

    @staticmethod
    def _score(engine: raps3d.Engine, path: str) -> tuple[float, tuple]:
        volume, geometry, orientation = read_for_model(path)
        image = raps3d.ImageState(engine, volume, geometry.model_spacing)  # not the viewers' session store
        seed = soft_tissue_seed(volume, geometry.model_spacing)
        result = raps3d.InteractiveObject(image).interact(points=[(seed, True)])
        stored_seed = tuple(int(c) for c in orientation.point_back(seed, geometry.shape_zyx))  # the file's voxel order
        return round(min(max(1.0 - float(result.iou), 0.0), 1.0), 6), stored_seed
