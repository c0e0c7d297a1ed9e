"""MONAI Label's session upload (``PUT /session/``, what 3D Slicer uses to segment an image it holds), with archives
checked before they are unpacked.

With ``uncompress=true`` MONAI Label 0.8.5 unpacks an uploaded tar archive with ``shutil.unpack_archive`` and no
extraction filter: a member named ``../../x`` or ``/x``, or a link, would be written outside the session's folder,
anywhere the server may write. Such an archive is refused here (400) before anything is unpacked. The session itself
is MONAI Label's (``create_session``), with the same parameters and role. (Zip archives are unpacked by ``zipfile``,
which keeps every member inside the target folder.)

Expired sessions are removed here too (``remove_expired_sessions``, which the app runs where MONAI Label runs its
own cleanup): MONAI Label's skipped those made before the server's last start.
"""

import logging
import os
import pathlib
import shutil
import tarfile
import time
import zipfile
from typing import List

from fastapi import BackgroundTasks, Depends, File, HTTPException, UploadFile
from fastapi.routing import APIRoute
from monailabel.config import settings
from monailabel.endpoints.session import create_session
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.utils.others.generic import get_basename

from .routes import put_first

logger = logging.getLogger(__name__)

ROUTE_NAME = "raps3d_create_session_checked"


def check_archive(upload: UploadFile) -> None:
    """A 400 when the upload is a tar archive with a member that would be unpacked outside its folder: an absolute
    name, a name with ``..``, a link or a device."""
    f = upload.file
    try:
        f.seek(0)
        if not tarfile.is_tarfile(f):
            return
        f.seek(0)
        with tarfile.open(fileobj=f) as archive:
            for member in archive:
                path = pathlib.PurePosixPath(member.name)
                if path.is_absolute() or ".." in path.parts or not (member.isfile() or member.isdir()):
                    raise HTTPException(status_code=400, detail=f"the archive {upload.filename!r} holds "
                                                                f"{member.name[:200]!r}, which would be unpacked "
                                                                "outside its folder (or is a link); not unpacked")
    except tarfile.TarError as e:
        raise HTTPException(status_code=400, detail=f"the archive {upload.filename!r} cannot be read: {e}") from None
    finally:
        f.seek(0)


def check_unpackable(upload: UploadFile) -> None:
    """A 400 unless the upload is an archive ``shutil.unpack_archive`` can unpack: named as one (it goes by the name)
    and holding one. MONAI Label fails on anything else with a bare 500, leaving the upload and two folders in the
    temporary folder."""
    name = get_basename(upload.filename) if upload.filename else ""
    kinds = [kind for kind, extensions, _ in shutil.get_unpack_formats() if name.endswith(tuple(extensions))]
    if not kinds:
        known = ", ".join(sorted(e for _, extensions, _ in shutil.get_unpack_formats() for e in extensions))
        raise HTTPException(status_code=400, detail=f"uncompress=true takes an archive ({known}); {name[:200]!r} is "
                                                    "not named as one (the suffix in lower case)")
    f = upload.file
    try:
        f.seek(0)
        readable = zipfile.is_zipfile(f) if kinds[0] == "zip" else tarfile.is_tarfile(f)
    finally:
        f.seek(0)
    if not readable:
        raise HTTPException(status_code=400, detail=f"{name[:200]!r} cannot be read as a {kinds[0]} archive")


async def raps3d_create_session(  # on the event loop, as MONAI Label's route
    background_tasks: BackgroundTasks,
    uncompress: bool = False,
    expiry: int = 0,
    files: List[UploadFile] = File(...),
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
):
    for upload in files:
        # MONAI Label writes each upload under its name's last part: "..", "." or "x/.." would name a folder (500).
        if upload.filename and get_basename(upload.filename) in (".", ".."):
            raise HTTPException(status_code=400, detail=f"the file name {upload.filename[:200]!r} names a folder, "
                                                        "not a file")
        if uncompress:
            if len(files) == 1:  # MONAI Label unpacks a single upload only
                check_unpackable(upload)
            check_archive(upload)
    return create_session(background_tasks, uncompress, expiry, files)


def remove_expired_sessions(sessions, now: float | None = None) -> int:
    """Removes MONAI Label's sessions (3D Slicer's uploaded images: patients' CT) that have expired, whether or not
    this process has seen them; returns how many. MONAI Label's own cleanup does nothing while it holds no session
    in memory, so after a restart the sessions made before it stayed on disk for good, and it stops at the first
    folder without a record. A folder without one is removed only when it is older than the longest expiry: it may
    be a session being made."""
    store = sessions.store_path
    if not os.path.isdir(store):
        return 0
    now = time.time() if now is None else now
    removed = 0
    for session_id in os.listdir(store):
        folder = os.path.join(store, session_id)
        if not os.path.isdir(folder):
            continue
        try:
            info = sessions.get_session(session_id, update_ts=False, fetch_cache=False)
        except (OSError, ValueError) as e:  # a record that cannot be read is no record
            logger.warning(f"Raps-3D: session {session_id!r} has an unreadable record: {e}")
            info = None
        if not os.path.isdir(folder):  # its image was gone: MONAI Label's reading removed it
            removed += 1
            continue
        if info is None:
            expired = os.path.getmtime(folder) + sessions.expiry < now
        else:
            expired = info.expiry > 0 and info.last_access_ts + info.expiry < now
        if expired:
            sessions.remove_session(session_id)
            removed += 1
    return removed


def install(fastapi_app=None) -> bool:
    """Puts the checked session upload before MONAI Label's; False when it is there already."""
    route = APIRoute(f"{settings.MONAI_LABEL_API_STR}/session/", raps3d_create_session, methods=["PUT"],
                     name=ROUTE_NAME, summary="Create new session with Image (archives checked)")
    return put_first(route, fastapi_app)
