"""MONAI Label's infer route, run in a worker thread instead of on the server's event loop.

MONAI Label 0.8.5 declares ``POST /infer/{model}`` as a coroutine that runs the whole request inline: while one
image is opened, segmented and its label written, the event loop serves nothing else, so another annotator's edit,
``/info`` and OHIF's proxied image requests all wait behind it. The same endpoint declared as a plain function is run
by FastAPI in its thread pool. The app's sessions are thread safe and the model's forward passes take turns (the
engine's lock), so other requests are served while one runs.
The request handling itself is MONAI Label's (``run_inference``), with the same parameters and roles; a refused
request's uploaded files are removed at once (MONAI Label would leave them in the temporary folder).
"""

import logging
from typing import Optional

from fastapi import BackgroundTasks, Depends, File, Form, UploadFile
from fastapi.routing import APIRoute
from monailabel.config import settings
from monailabel.endpoints.infer import ResultType, remove_file, run_inference
from monailabel.endpoints.user.auth import RBAC, User

from .routes import put_first

logger = logging.getLogger(__name__)

ROUTE_NAME = "raps3d_infer_threaded"


def raps3d_infer(
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    params: str = Form("{}"),
    file: UploadFile = File(None),
    label: UploadFile = File(None),
    output: Optional[ResultType] = None,
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
):
    try:
        return run_inference(background_tasks, model, image, session_id, params, file, label, output)
    except BaseException:
        # MONAI Label queues the removal of uploaded files as background tasks, which run only after a response
        # was sent: a refused request's uploads (a whole CT, say) would stay in the temporary folder for good.
        for task in background_tasks.tasks:
            if task.func is remove_file:
                try:
                    task.func(*task.args, **task.kwargs)
                except OSError as e:  # the client still gets the request's own error
                    logger.warning(f"could not remove an upload of a refused request: {e}")
        raise


def install(fastapi_app=None) -> bool:
    """Puts the threaded infer route before MONAI Label's; False when it is there already."""
    route = APIRoute(f"{settings.MONAI_LABEL_API_STR}/infer/{{model}}", raps3d_infer, methods=["POST"],
                     name=ROUTE_NAME, summary="Run Inference for supported model (in a worker thread)")
    if not put_first(route, fastapi_app):
        return False
    logger.info("Raps-3D: infer requests run in worker threads")
    return True
