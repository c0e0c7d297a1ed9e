"""MONAI Label's datastore uploads and removals, with image ids, label tags and labels checked first.

MONAI Label 0.8.5's local datastore joins ids and tags into file paths unchecked: ``PUT /datastore/label?tag=../../x``
writes the uploaded file outside the datastore, under a name the client picks; ``PUT /datastore/image?image=../x`` an
image; an upload named ``x/..`` without ``image`` registers the id ``..``, and removing that image removes the folder
above the datastore. Here ids and tags must be plain names (400 otherwise), a label must be for an image of the
datastore (404, where MONAI Label answered 500) and a label map that training can read on that image's grid (422: MONAI
Label stored any file, and the image then counted as done, until a training run skipped it), an image must read as a CT
volume that requests can segment (422), and a refused request's upload is removed at once. The saving and removing
itself is MONAI Label's (``add_image``, ``save_label``, ``remove_image``, ``remove_label``), with the same parameters
and roles.
"""

import asyncio
import contextlib
import logging
import os
import pathlib
import shutil
import tempfile
from typing import Optional

import numpy as np
from fastapi import BackgroundTasks, Depends, File, Form, HTTPException, UploadFile
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.endpoints.datastore import (add_image, remove_image, remove_label, save_label, update_image_info,
                                            update_label_info)
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import ImageNotFoundException
from monailabel.interfaces.utils.app import app_instance
from raps3d import ImageError, check_volume

from . import datastore_index
from .images import ImageReadError, read_geometry, read_image, read_label_on_grid, same_grid
from .routes import check_plain_name, check_tag, parse_params, put_first, remove_uploads

logger = logging.getLogger(__name__)

ROUTE_PREFIX = "raps3d_datastore_checked"
# Checking an upload reads all of it (an image up to 1 GiB, twice that while it is read): uploads arriving together
# take turns beyond this many, waiting on the event loop rather than each holding a volume and a worker thread.
_UPLOAD_CHECKS = asyncio.Semaphore(2)


def uploaded_image_id(filename: str | None) -> str:
    """The id MONAI Label gives an image uploaded without one: the file's name without its suffixes ("" without a
    name: it then makes one up)."""
    if not filename:
        return ""
    return os.path.basename(filename).replace("".join(pathlib.Path(filename).suffixes), "")


async def raps3d_add_image(  # on the event loop, as MONAI Label's route
    background_tasks: BackgroundTasks,
    image: Optional[str] = None,
    params: str = Form("{}"),
    file: UploadFile = File(...),
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)),
):
    image_id = image or uploaded_image_id(file.filename)
    if image_id:
        check_plain_name(image_id, "the image id" if image else "the image id (the uploaded file's name)")
    parse_params(params)
    store = app_instance().datastore()
    # MONAI Label replaces an image of the same id but leaves its labels' files, which come back at the next reload
    # as the new image's (trained on, and the image never handed out): a different image needs its own id.
    existing = _stored_image(store, image_id)
    async with _UPLOAD_CHECKS:
        same = await run_in_threadpool(check_image, file, existing)  # reads whole volumes: off the event loop
    if same:  # the image as stored (a viewer that uploads before it segments): kept as it is, with its labels
        return {"image": image_id}
    if existing:
        raise HTTPException(status_code=409, detail=(
            f"the datastore already holds another image with the id {image_id[:200]!r}: upload this one under "
            "another id, or remove that image first (DELETE /datastore/image, which removes its labels too)"))
    # Looked up again, with no await until it is added: another upload of this id may have come first meanwhile.
    if _stored_image(store, image_id):
        raise HTTPException(status_code=409, detail=(
            f"another upload added an image with the id {image_id[:200]!r} while this one was checked: send it "
            "again (the same image is then accepted as it is)"))
    try:
        return add_image(background_tasks, image, params, file, user.username)
    except BaseException:
        remove_uploads(background_tasks)
        raise


def _stored_image(store, image_id: str) -> str:
    """The file of a local datastore's image ``image_id`` ("" when there is none, or the store is DICOMweb)."""
    return "" if not image_id or isinstance(store, DICOMWebDatastore) else store.get_image_uri(image_id)


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
        check_tag(tag, "the label tag")
    parse_params(params)
    store = app_instance().datastore()
    # Over DICOMweb the datastore checks the label when it writes it as DICOM SEG (it fetches the series for that):
    # checking it here would fetch the series before the request's other checks.
    image_path = "" if isinstance(store, DICOMWebDatastore) else store.get_image_uri(image)
    if image_path:
        async with _UPLOAD_CHECKS:
            await run_in_threadpool(check_label, label, image_path)
    try:
        saved = save_label(background_tasks, image, params, tag, label, user.username)
        if image_path:
            remove_other_label_files(store.get_label_uri(image, tag or DefaultLabelTag.FINAL.value), image)
        return saved
    except ImageNotFoundException:
        remove_uploads(background_tasks)
        raise HTTPException(status_code=404, detail=f"image {image[:200]!r} is not in the datastore") from None
    except BaseException:
        remove_uploads(background_tasks)
        raise


def remove_other_label_files(saved: str, image_id: str) -> None:
    """Removes the image's earlier label of that tag saved as another file type: MONAI Label keeps it beside the new
    one, and brings it back once the new one is removed."""
    folder, name = os.path.split(saved)
    for pattern in settings.MONAI_LABEL_DATASTORE_FILE_EXT:
        other = image_id + pattern.replace("*", "")
        if other != name and os.path.isfile(os.path.join(folder, other)):
            logger.info(f"Raps-3D: label {other!r} replaced by {name!r}")
            os.remove(os.path.join(folder, other))


async def raps3d_remove_image(id: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
    check_plain_name(id, "the image id")
    return remove_image(id, user.username)


async def raps3d_remove_label(id: str, tag: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
    check_plain_name(id, "the image id")
    check_tag(tag, "the label tag")
    removed = remove_label(id, tag, user.username)
    store = app_instance().datastore()
    if isinstance(store, LocalDatastore) and not isinstance(store, DICOMWebDatastore):
        # MONAI Label leaves the index to its file watcher, which watches only the tag folders there were at start:
        # a label of a tag made since (an infer request's label_tag) stayed listed once its file was gone.
        datastore_index.refresh(store)  # the label file is gone already: a failed refresh must not make this a 500
    return removed


# Image info the server writes: active learning's hand-out records and the uncertainty scores. Written by a client,
# they would decide (or stop) what every annotator is handed next.
SERVER_INFO_KEYS = ("strategy", "raps3d_uncertainty", "raps3d_uncertainty_details")


def _client_info(info: str, image: str) -> dict:
    values = parse_params(info, "info")
    reserved = sorted(k for k in values if k in SERVER_INFO_KEYS)
    if reserved:
        raise HTTPException(status_code=400, detail=f"info keys {reserved} are written by the server only")
    if image not in app_instance().datastore().list_images():  # MONAI Label: 500
        raise HTTPException(status_code=404, detail=f"image {image[:200]!r} is not in the datastore")
    return values


async def raps3d_update_image_info(image: str, info: str = Form("{}"),
                                   user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))):
    check_plain_name(image, "the image id")
    _client_info(info, image)
    return update_image_info(image, info, user.username)


async def raps3d_update_label_info(label: str, tag: str, info: str = Form("{}"),
                                   user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))):
    check_plain_name(label, "the image id")
    check_tag(tag, "the label tag")
    _client_info(info, label)
    if tag not in app_instance().datastore().get_labels_by_image_id(label):
        raise HTTPException(status_code=404, detail=f"image {label[:200]!r} has no label tagged {tag[:80]!r}")
    return update_label_info(label, tag, info, user.username)


@contextlib.contextmanager
def upload_copy(upload: UploadFile, default_name: str):
    """A copy of an upload in a temporary folder, under a name that keeps the upload's suffixes (its file type, as
    MONAI Label takes it; ``default_name`` where it has none), and the client's name for it, for messages. The upload
    is left as it came, for MONAI Label to save."""
    name = pathlib.Path(upload.filename).name if upload.filename else default_name
    suffixes = "".join(pathlib.Path(name).suffixes).replace("\0", "")[-32:]
    with tempfile.TemporaryDirectory() as folder:
        copy = os.path.join(folder, "upload" + suffixes)
        with open(copy, "wb") as out:
            shutil.copyfileobj(upload.file, out)
        upload.file.seek(0)
        yield copy, name


def _refused(error: ImageReadError, copy: str, name: str, what: str) -> HTTPException:
    reason = str(error).replace(repr(os.path.basename(copy)), repr(name[:200]))
    return HTTPException(status_code=422, detail=f"{what}: {reason}")


def check_label(label: UploadFile, image_path: str) -> None:
    """A 422 unless the upload reads as a 3D label map on the image's grid (as training reads it)."""
    with upload_copy(label, "label.nii.gz") as (copy, name):
        try:
            read_label_on_grid(copy, read_geometry(image_path))
        except ImageReadError as e:
            raise _refused(e, copy, name, "the label cannot be saved") from None


def check_image(image: UploadFile, existing: str = "") -> bool:
    """A 422 unless the upload reads as a CT volume the model can segment (the checks of every request on it), so
    that an annotator never gets a file no request can open as the next image to label. Returns whether it is the
    image of the file ``existing`` (the same voxels on the same grid, whatever the file type)."""
    with upload_copy(image, "image.nii.gz") as (copy, name):
        try:
            volume, geometry = read_image(copy)
            check_volume(volume, geometry.spacing[::-1])
        except (ImageReadError, ImageError) as e:
            raise _refused(e, copy, name, "the image cannot be added") from None
    if not existing:
        return False
    try:  # the grid first, from the header: the stored voxels are read only when it matches
        return same_grid(geometry, read_geometry(existing)) and np.array_equal(volume, read_image(existing)[0])
    except ImageReadError:
        return False  # the stored file no longer reads: not the same image


def install(fastapi_app=None) -> bool:
    """Puts the checked datastore routes before MONAI Label's; False when they are there already."""
    api = f"{settings.MONAI_LABEL_API_STR}/datastore"
    routes = [("/label", raps3d_save_label, "PUT", "Save Finished Label"),
              ("/label", raps3d_remove_label, "DELETE", "Remove Label"),
              ("/image", raps3d_remove_image, "DELETE", "Remove Image and corresponding labels"),
              ("/", raps3d_remove_image, "DELETE", "Remove Image and corresponding labels"),  # MONAI Label serves both
              ("/image", raps3d_add_image, "PUT", "Upload new Image"),
              ("/", raps3d_add_image, "PUT", "Upload new Image"),
              ("/image/info", raps3d_update_image_info, "PUT", "Update Image Info"),
              ("/label/info", raps3d_update_label_info, "PUT", "Update Label Info")]
    installed = [put_first(APIRoute(f"{api}{path}", endpoint, methods=[method], summary=f"{summary} (checked)",
                                    name=f"{ROUTE_PREFIX}_{method}_{path}"), fastapi_app)
                 for path, endpoint, method, summary in routes]
    if all(installed):
        logger.info("Raps-3D: image ids, label tags and labels of the datastore's uploads are checked")
    return all(installed)
