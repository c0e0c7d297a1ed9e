"""MONAI Label's infer route, run in a worker thread instead of on the server's event loop, and only on the
datastore's images.

MONAI Label 0.8.5 declares ``POST /infer/{model}`` as a coroutine that runs the whole request inline: while one
image is opened, segmented and its label written, the event loop serves nothing else, so another annotator's edit,
``/info`` and OHIF's proxied image requests all wait behind it. The same endpoint declared as a plain function is run
by FastAPI in its thread pool. The app's sessions are thread safe and the model's forward passes take turns (the
engine's lock), so other requests are served while one runs.

MONAI Label also takes an ``image`` that names an existing path on the server (``/etc/...``, a folder of someone
else's DICOM) as that file, and lets ``params`` replace the image; both are refused here, so a client reads only the
datastore's images and its own uploads (a file, or a session's image: MONAI Label's sessions, as 3D Slicer uses them).

The request handling itself is MONAI Label's (``run_inference``), with the same parameters and roles; a refused
request's uploaded files are removed at once (MONAI Label would leave them in the temporary folder). The reply is
gzip-encoded on the wire for clients that accept it (``reply_encoding``).
"""

import json
import logging
import os
from typing import Optional

from fastapi import BackgroundTasks, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.routing import APIRoute
from monailabel.config import settings
from monailabel.endpoints.infer import ResultType, run_inference
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.utils.app import app_instance

from .reply_encoding import encode_reply
from .routes import check_known, check_plain_name, parse_params, put_first, remove_uploads

logger = logging.getLogger(__name__)

ROUTE_NAME = "raps3d_infer_threaded"
# Set by this route (never by the client) when the request uploads its image: the infer task then knows the image
# by its content, as MONAI Label writes each upload to a new temporary file.
UPLOADED_PARAM = "raps3d_uploaded_image"


def check_image_id(image: str, known_ids) -> None:
    """A 404 when ``image`` is not one of the datastore's ids but MONAI Label would open it as a path. ``known_ids``
    (a callable) is asked only then: plain ids that name no file are left to the infer task."""
    if image and ("/" in image or "\\" in image or os.path.exists(image)) and image not in known_ids():
        raise HTTPException(status_code=404, detail=f"image {image[:200]!r} is not in the datastore")


def live_session(session_id: str) -> bool:
    """Whether ``session_id`` names one of MONAI Label's sessions (3D Slicer's uploads of an image to segment)."""
    if not session_id:
        return False
    try:
        check_plain_name(session_id, "session_id")  # MONAI Label joins it into a path
    except HTTPException:
        return False
    sessions = app_instance().sessions()
    return sessions is not None and sessions.get_session(session_id, update_ts=False) is not None


def checked_params(params: str, image: str, uploaded: bool) -> str:
    """``params`` as passed on, with UPLOADED_PARAM set when the request uploads its image (and only then); a 400
    for ``params`` that are not a JSON object, or that name another image than the request's (MONAI Label lets them
    replace it)."""
    values = parse_params(params)
    if "image" in values and (uploaded or values["image"] != image):
        raise HTTPException(status_code=400, detail="the image goes in the request's 'image' (or as an uploaded "
                                                    "file), not in params")
    values.pop(UPLOADED_PARAM, None)
    if uploaded:
        values[UPLOADED_PARAM] = True
    return json.dumps(values)


def raps3d_infer(
    request: Request,
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
    if label is not None:  # MONAI Label would name the object after its temporary copy (and keep a .bin's image)
        raise HTTPException(status_code=400, detail="Raps-3D takes no 'label' upload: its prompts are clicks and "
                                                    "boxes in params; save a label with PUT /datastore/label")
    if output == ResultType.dicom_seg:  # MONAI Label writes the SEG after inference and never removes it or the label
        raise HTTPException(status_code=400, detail="output 'dicom_seg' is not offered: ask for 'image', 'json' or "
                                                    "'all'; a label saved as final (PUT /datastore/label) is stored "
                                                    "on the DICOMweb server as DICOM SEG")
    check_known("model", model, app_instance()._infers)
    session = live_session(session_id)
    if not image and file is None and not session:  # MONAI Label: a bare 500
        raise HTTPException(status_code=400, detail=(
            f"no image: name one of the datastore's images (?image=<id>), upload one (a 'file' field), or give a "
            f"live 'session_id'" + (f" (session {session_id[:100]!r} is not one)" if session_id else "")))
    # With a live session MONAI Label segments the session's image, even when a file comes too.
    params = checked_params(params, image, file is not None and not session)
    if file is None:
        if session:
            # The session's image replaces the request's; should the session end meanwhile, MONAI Label would
            # fall back to the request's, unchecked: it is not passed on.
            image = ""
        else:
            check_image_id(image, lambda: set(app_instance().datastore().list_images()))
    try:
        response = run_inference(background_tasks, model, image, session_id, params, file, label, output)
    except BaseException:
        remove_uploads(background_tasks)
        raise
    return encode_reply(response, request.headers.get("accept-encoding"))


WHOLE_SLIDE_REFUSAL = "Raps-3D segments CT volumes; whole-slide inference is not offered: use POST /infer/{model}"


def refuse_whole_slide(model: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
    """MONAI Label's whole-slide routes pass any path or parameter to the infer task unchecked (and keep an uploaded
    file when they fail): refused before the request's body is read."""
    raise HTTPException(status_code=400, detail=WHOLE_SLIDE_REFUSAL.format(model=model[:100]))


def install(fastapi_app=None) -> bool:
    """Puts the threaded infer route before MONAI Label's, and refuses its whole-slide routes; False when they are
    there already."""
    for path in ("wsi", "wsi_v2"):
        put_first(APIRoute(f"{settings.MONAI_LABEL_API_STR}/infer/{path}/{{model}}", refuse_whole_slide,
                           methods=["POST"], name=f"raps3d_refuse_{path}", summary="Whole-slide inference: refused"),
                  fastapi_app)
    route = APIRoute(f"{settings.MONAI_LABEL_API_STR}/infer/{{model}}", raps3d_infer, methods=["POST"],
                     name=ROUTE_NAME, summary="Run Inference for supported model (in a worker thread)")
    if not put_first(route, fastapi_app):
        return False
    logger.info("Raps-3D: infer requests run in worker threads")
    return True
