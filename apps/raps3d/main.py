"""Raps-3D served by MONAI Label: interactive 3D CT segmentation for OHIF, 3D Slicer and MITK.

    monailabel start_server --app apps/raps3d --studies <folder of CT volumes or DICOMweb URL> \
        [--conf model_path <checkpoint>] [--conf device cuda] ...

Options are listed in README.md in this folder. The constructor stays cheap: MONAI Label rebuilds the app in every
train and scoring subprocess; the model is loaded on first use (and warmed up when the server starts).
"""

from __future__ import annotations

import logging
import os

import torch

from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.utils.async_tasks.utils import tasks

from lib import activelearning_route, datastore_route, dicomweb, infer_route, ohif, session_route, train_route
from lib.activelearning.uncertain import MostUncertain
from lib.configs.raps3d import Raps3DConfig
from lib.options import AppOptions, yes_no
from lib.routes import check_tag
from lib.trainers.raps3d import Raps3DTrain

logger = logging.getLogger(__name__)

MODEL_NAME = "raps3d"
DESCRIPTION = "Raps-3D: interactive 3D CT segmentation from points and 2D boxes, with edit caching"


class Raps3DApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.options = AppOptions.from_conf(conf)
        self.task = Raps3DConfig()
        self.task.init(MODEL_NAME, os.path.join(app_dir, "model"), conf, None, options=self.options)
        logger.info(f"Raps-3D options: {self.options}")
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="Raps-3D", description=DESCRIPTION,
                         version="1.0", labels=list(self.options.labels))

    def init_infers(self) -> dict[str, InferTask]:
        return {MODEL_NAME: self.task.infer()}

    def init_trainers(self) -> dict[str, TrainTask]:
        # Publishes to options.trained_model_path, which is then served; the infer task reloads it when it changes.
        return {MODEL_NAME: Raps3DTrain(self.options)}

    def init_strategies(self) -> dict[str, Strategy]:
        return {**self.task.strategy(), "random": Random(), "first": First()}

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        return dict(self.task.scoring_method())

    def info(self):
        meta = super().info()
        warning = self.task.service.expected_status().warning
        if warning:
            meta["description"] = f"{warning} {DESCRIPTION}"
        return meta

    def init_remote_datastore(self) -> Datastore:
        # DICOMweb: MONAI Label's datastore, with series retrieved as stored (decoded here) and no dcmqi download.
        if settings.MONAI_LABEL_DATASTORE.lower() in ("xnat", "dsa") or "googleapis.com" in self.studies:
            return super().init_remote_datastore()
        logger.info(f"Raps-3D: DICOMweb studies {self.studies}")
        return dicomweb.make_datastore(self.studies)

    def infer(self, request, datastore=None):
        # MONAI Label replaces the image id by its path (or by "" when unknown): keep the id for messages.
        request = dict(request)
        request["image_id"] = request.get("image")
        try:  # MONAI Label tests it as it comes: the text "false" would save the result (over a label of that tag)
            request["save_label"] = yes_no(request.get("save_label", False), "save_label")
        except ValueError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None
        if request["save_label"]:  # MONAI Label then saves the result under labels/<label_tag>/
            check_tag(request.get("label_tag", "original"), "label_tag")
        store = datastore or self.datastore()
        image = request.get("image")
        if isinstance(store, DICOMWebDatastore) and isinstance(image, str) and image and not os.path.exists(image):
            dicomweb.fetch_series(store, image)  # fetched and converted once; errors as clear HTTP errors
        result = super().infer(request, datastore)
        if (request.get("save_label") and isinstance(image, str) and image and not os.path.exists(image)
                and not isinstance(store, DICOMWebDatastore)):  # MONAI Label saved it as the reply's file type
            saved = store.get_label_uri(image, request.get("label_tag", "original"))
            if saved:
                datastore_route.remove_other_label_files(saved, image)
        return result

    def infer_wsi(self, request, datastore=None):
        # MONAI Label's whole-slide routes (/infer/wsi, /infer/wsi_v2) would pass any path or params to the infer
        # task unchecked; a CT model has no use for them. (The app's routes refuse them first; this is the backstop.)
        raise HTTPException(status_code=400,
                            detail=infer_route.WHOLE_SLIDE_REFUSAL.format(model=request.get("model", MODEL_NAME)))

    def batch_infer(self, request, datastore=None):
        request = dict(request)
        request.pop(infer_route.UPLOADED_PARAM, None)  # the infer route's to set, for an upload; a batch has none
        # MONAI Label opens any path listed in "images" (a file elsewhere on the server): only the datastore's ids.
        images = request.get("images")
        if images is not None and not isinstance(images, (str, list)):  # MONAI Label would take a dict's keys
            raise HTTPException(status_code=400, detail="images must be 'all', 'labeled', 'unlabeled' or a list of "
                                                        "image ids")
        if isinstance(images, list):
            known = set((datastore or self.datastore()).list_images())
            unknown = [i for i in images if not isinstance(i, str) or i not in known]
            if unknown:
                raise HTTPException(status_code=404, detail=f"not in the datastore: {unknown[:5]!r}"
                                                            + (f" and {len(unknown) - 5} more" if len(unknown) > 5
                                                               else ""))
        if not torch.cuda.is_available():  # MONAI Label spreads images over the GPUs: none here divides by zero
            request.setdefault("multi_gpu", False)
            request.setdefault("device", "cpu")
        return super().batch_infer(request, datastore)

    def next_sample(self, request):
        # MONAI Label's next_sample, except that an image the strategy picks but that cannot be fetched (a DICOMweb
        # series that cannot be converted, or is gone) is set aside and the next one tried, instead of a bare 500
        # on every request for the same first image.
        strategy = self._strategies.get(request.get("strategy") or "random")
        if not isinstance(strategy, MostUncertain):
            return super().next_sample(request)
        result = strategy.next_fetchable(request, self.datastore())
        if result and self._auto_update_scoring:
            self.async_scoring(None)  # over DICOMweb the series is now cached, and scorable
        return result

    def async_scoring(self, method, params=None):
        if self._server_mode and any(t.get("status") == "SUBMITTED" for t in tasks("scoring")):
            # MONAI Label queues a pass on every hand-out; a queued pass scores whatever changed before it starts,
            # and each loads the model: one waiting is enough.
            logger.info("Raps-3D: a scoring pass is already queued")
            return {}
        if not self._server_mode and method is None:
            # In a train process, after a model is published: MONAI Label asks the server for each method's pass,
            # which answers 429 while another pass runs, and the new model's scores would wait for the next
            # hand-out. The server's all-methods route queues instead.
            return self._local_request("/scoring/", params, "Scoring")
        return super().async_scoring(method, params)

    def cleanup_sessions(self):
        # Run at start and every 5 minutes by MONAI Label, whose own cleanup skipped sessions made before a restart.
        if self._sessions is not None:
            count = session_route.remove_expired_sessions(self._sessions)
            if count:
                logger.info(f"Raps-3D: {count} expired session(s) removed")

    def on_init_complete(self):
        super().on_init_complete()
        try:
            ohif.install_routes()  # OHIF's nested files, and its DICOMweb proxy requests with their Accept header
        except Exception:
            logger.exception("Raps-3D: could not install the OHIF routes; left to MONAI Label")
        try:
            infer_route.install()  # one user's long request no longer holds up everyone else's
            activelearning_route.install()  # nor does fetching the next series over DICOMweb
        except Exception:
            logger.exception("Raps-3D: could not install the threaded infer or next-sample route; left to MONAI "
                             "Label")
        try:
            datastore_route.install()  # an uploaded label or image stays inside the datastore
            session_route.install()  # and so does an uploaded archive
        except Exception:
            logger.exception("Raps-3D: could not install the checked upload routes; left to MONAI Label")
        try:
            # A mistyped training option: a 400 at once, not a run that fails later.
            train_route.install({k: t for k, t in self._trainers.items() if isinstance(t, Raps3DTrain)})
        except Exception:
            logger.exception("Raps-3D: could not install the checked train route; left to MONAI Label")
        try:
            self.task.service.warm_up()  # server start only: the first click should not pay for loading
        except Exception:
            logger.exception("Raps-3D: warm-up failed; the model loads on the first request instead")
