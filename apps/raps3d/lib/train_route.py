"""MONAI Label's train route, with the Raps-3D train task's options checked before the run is started.

MONAI Label answers ``POST /train/{model}`` with 200 as soon as the training subprocess is started; a mistyped option
(``lr: "fast"``, ``publish: "yes"``) then only shows up later, as a failed run in ``/info``. Checked here, it is a
400 with the option's name; a model folder the run could not write (read-only, a file, too little free space), a
503. The run itself is started by MONAI Label (``run_model``), with the same parameters and role.
"""

from typing import Optional

from fastapi import Depends, HTTPException
from fastapi.routing import APIRoute
from monailabel.config import settings
from monailabel.endpoints.train import run_model
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.utils.async_tasks.utils import tasks

from .routes import check_known, put_first
from .trainers.raps3d import Raps3DTrain, training_options

ROUTE_NAME = "raps3d_train_checked"


def install(trainers: dict[str, Raps3DTrain], fastapi_app=None) -> bool:
    """Puts the checked train route before MONAI Label's, checking the options of the ``trainers`` given (model name
    -> task; a request for another model is a 404); False when it is there already."""

    async def raps3d_train(  # on the event loop, as MONAI Label's route: its task bookkeeping is not thread safe
        model: str,
        params: Optional[dict] = None,
        run_sync: Optional[bool] = False,
        enqueue: Optional[bool] = False,
        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN)),
    ):
        task = trainers.get(model)
        check_known("train task", model, trainers)  # MONAI Label would start a run that fails, holding off others
        if run_sync:  # in the server's event loop: every annotator's request would wait for the whole run
            raise HTTPException(status_code=400, detail="training runs in the background only: leave run_sync out "
                                                        "and follow the run in /train/ or /info/")
        active = any(t.get("status") in ("SUBMITTED", "RUNNING") for t in tasks("train"))
        if active and not enqueue:
            # MONAI Label counts a run only once its process started: a second click came through before that
            raise HTTPException(status_code=429, detail="a training run is already submitted or running; send "
                                                        "enqueue=true to queue this one after it")
        if not active and task.run_in_progress():  # started by this server before a restart, and still ending
            raise HTTPException(status_code=409, detail="a training run started before the server restarted is "
                                                        "still ending (see /info/); try again once it has")
        try:
            training_options(params or {}, task.config())
        except ValueError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None
        try:
            task.check_can_publish()  # a read-only or full model folder: say so now, not in a dead run
        except OSError as e:
            raise HTTPException(status_code=503, detail=str(e)) from None
        return run_model(model, params, run_sync, enqueue)

    route = APIRoute(f"{settings.MONAI_LABEL_API_STR}/train/{{model}}", raps3d_train, methods=["POST"],
                     name=ROUTE_NAME, summary="Run Training Task for specific model (options checked first)")
    return put_first(route, fastapi_app)
