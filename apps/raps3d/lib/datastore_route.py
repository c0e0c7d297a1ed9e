"""MONAI Label's image and label uploads, with the image id and the label tag checked first.

MONAI Label 0.8.5's local datastore joins both into file paths unchecked: ``PUT /datastore/label?tag=../../x`` writes
the uploaded file outside the datastore, under a name the client picks, and ``PUT /datastore/image?image=../x`` an
image. Here they must be plain names (400 otherwise), a label must be for an image of the datastore (404, where MONAI
Label answered 500) and a label map that training can read on that image's grid (422: MONAI Label stored any file,
and the image then counted as done, until a training run skipped it), and a refused request's upload is removed at
once. The saving itself is MONAI Label's (``add_image``, ``save_label``), with the same parameters and roles.
"""

import logging
import pathlib
import shutil
import tempfile
from typing import Optional

from fastapi import BackgroundTasks, Depends, File, Form, HTTPException, UploadFile
from fastapi.routing import APIRoute
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.endpoints.datastore import add_image, save_label
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import ImageNotFoundException
from monailabel.interfaces.utils.app import app_instance

from .images import ImageReadError, read_geometry, read_label_on_grid
from .routes import check_plain_name, put_first, remove_uploads

logger = logging.getLogger(__name__)

ADD_IMAGE_ROUTE = "raps3d_add_image_checked"
SAVE_LABEL_ROUTE = "raps3d_save_label_checked"


async def raps3d_add_image(  # on the event loop, as MONAI Label's route
    background_tasks: BackgroundTasks,
    image: Optional[str] = None,
    params: str = Form("{}"),
    file: UploadFile = File(...),
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)),
):
    if image:  # without one, MONAI Label names the image after the uploaded file's own name (its last part)
        check_plain_name(image, "the image id")
    try:
        return add_image(background_tasks, image, params, file, user.username)
    except BaseException:
        remove_uploads(background_tasks)
        raise


async def raps3d_save_label(
    background_tasks: BackgroundTasks,
    image: str,
    params: str = Form("{}"),
    tag: str = DefaultLabelTag.FINAL.value,
    label: UploadFile = File(...),
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)),
):
    check_plain_name(image, "the image id")
    if tag:  # empty: MONAI Label's default tag, final
        check_plain_name(tag, "the label tag")
    store = app_instance().datastore()
    # Over DICOMweb the label becomes a DICOM SEG, whose conversion checks it; reading the image's geometry here
    # would download the series.
    image_path = "" if isinstance(store, DICOMWebDatastore) else store.get_image_uri(image)
    if image_path:
        check_label(label, image_path)
    try:
        return save_label(background_tasks, image, params, tag, label, user.username)
    except ImageNotFoundException:
        remove_uploads(background_tasks)
        raise HTTPException(status_code=404, detail=f"image {image[:200]!r} is not in the datastore") from None
    except BaseException:
        remove_uploads(background_tasks)
        raise


def check_label(label: UploadFile, image_path: str) -> None:
    """A 422 unless the upload reads as a 3D label map on the image's grid (as training reads it); the upload is
    left as it came, for MONAI Label to save."""
    # The upload's file type is in its name's suffixes, as MONAI Label takes it (.nii.gz where it has no name).
    suffixes = "".join(pathlib.Path(label.filename).suffixes) if label.filename else ".nii.gz"
    with tempfile.TemporaryDirectory() as folder:
        copy = pathlib.Path(folder) / ("label" + suffixes.replace("\0", "")[-32:])
        with open(copy, "wb") as out:
            shutil.copyfileobj(label.file, out)
        label.file.seek(0)
        try:
            read_label_on_grid(str(copy), read_geometry(image_path))
        except ImageReadError as e:
            raise HTTPException(status_code=422, detail=f"the label cannot be saved: {e}") from None


def install(fastapi_app=None) -> bool:
    """Puts the checked upload routes before MONAI Label's; False when they are there already."""
    api = settings.MONAI_LABEL_API_STR
    routes = [APIRoute(f"{api}/datastore/label", raps3d_save_label, methods=["PUT"], name=SAVE_LABEL_ROUTE,
                       summary="Save Finished Label (image id and tag checked)")]
    for i, path in enumerate(("/datastore/", "/datastore/image")):  # MONAI Label serves both
        routes.append(APIRoute(f"{api}{path}", raps3d_add_image, methods=["PUT"], name=f"{ADD_IMAGE_ROUTE}_{i}",
                               summary="Upload new Image (image id checked)"))
    installed = [put_first(route, fastapi_app) for route in routes]
    if all(installed):
        logger.info("Raps-3D: image ids and label tags of uploads are checked")
    return all(installed)
