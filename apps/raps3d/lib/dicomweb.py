"""DICOMweb studies (``--studies https://pacs/dicom-web``): what the app changes in MONAI Label's DICOMweb datastore.

- Series are retrieved in the transfer syntax they are stored in (JPEG 2000, JPEG-LS, JPEG, RLE, deflate, ...) and
  decoded here by GDCM (through SimpleITK, when MONAI Label converts the series to NIfTI). MONAI Label's client asks
  for uncompressed Explicit VR Little Endian, which makes the server transcode; servers that cannot (Orthanc without
  its GDCM plugin cannot transcode JPEG 2000) then answer 500 and the image never opens.
- Nothing is downloaded at start: MONAI Label fetches dcmqi (used to write DICOM SEG) from the internet when
  ``itkimage2segimage`` is not on PATH. The ``dcmqi`` Python package provides it; its folder is put on PATH here.
- A newly fetched series (or final label) is answered with its cached NIfTI beside the DICOM folder, where the series
  checks find it, and the temporary conversion, a copy of the patient's images, is removed whether or not the rest
  of the request succeeds (fetching and converting are MONAI Label's; the order of the steps is redone here for that).
- Image ids must be DICOM UIDs: they name folders of the cache, which a path in their place would leave.
- Fetch and save errors become clear HTTP errors (404 unknown series, 502 server error, 422 series that cannot be
  converted or a label that cannot be written as SEG, 507 or 500 when this server cannot write its cache) instead of
  MONAI Label's bare 500; so does saving an empty ``final`` label (400).

- A ``final`` label is checked as the local datastore checks labels (outside the series, not a label map: 422) and,
  where it has its own grid, resampled onto the series' grid first: the DICOM SEG writer takes the label's grid as
  it comes, so its frames would lie on no slice of the series.

Everything else (listing series, caching, writing ``final`` labels back as DICOM SEG) is MONAI Label's own
``DICOMWebDatastore``, configured by its usual settings (``MONAI_LABEL_DICOMWEB_*``, ``MONAI_LABEL_*_PREFIX``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import sys
import tempfile

import numpy as np
import requests
import SimpleITK as sitk
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.convert import dicom_to_nifti
from monailabel.datastore.utils.dicom import dicom_web_download_series
from monailabel.interfaces.datastore import DefaultLabelTag

from . import datastore_index
from .images import (ImageReadError, check_header, check_label_values, label_values, read_geometry, read_label_on_grid,
                     same_grid)

logger = logging.getLogger(__name__)

SEG_TOOL = "itkimage2segimage"
# Failures of this server's own storage: 507 (Insufficient Storage) when full, 500 when the cache cannot be written.
STORAGE_ERRORS = {errno.ENOSPC: 507, errno.EDQUOT: 507, errno.EACCES: 500, errno.EPERM: 500, errno.EROFS: 500}
AS_STORED = (("application/dicom", "*"),)  # any transfer syntax: the one the server stores
# A series UID as archives hold them: digits and dots by the standard; letters, '_' and '-' are let through for the
# archives that break it. What matters here is that it names one folder of the cache.
DICOM_UID = re.compile(r"[0-9A-Za-z_-]+(\.[0-9A-Za-z_-]+)*")


def check_uid(uid) -> None:
    """HTTPException 404 unless ``uid`` can be a series UID (no path: no '/', no '..'; at most 64 characters)."""
    if not isinstance(uid, str) or len(uid) > 64 or not DICOM_UID.fullmatch(uid):
        raise HTTPException(status_code=404, detail=f"{str(uid)[:80]!r} is not a DICOM series UID")


class StoredSyntaxClient(DICOMwebClientX):
    """MONAI Label's DICOMweb client, retrieving whole series as stored instead of transcoded."""

    def retrieve_series(self, study_instance_uid, series_instance_uid, media_types=None, additional_params=None):
        return super().retrieve_series(study_instance_uid, series_instance_uid,
                                       media_types=media_types or AS_STORED, additional_params=additional_params)


class Raps3DDICOMWebDatastore(DICOMWebDatastore):
    """MONAI Label's DICOMweb datastore; a ``final`` label without any labelled voxel is refused (400) instead of
    failing inside the DICOM SEG writer (a bare 500), one that does not fit the series is refused (422) or put on its
    grid, and other failures to save one are clear HTTP errors."""

    def get_image_uri(self, image_id: str) -> str:
        # The server and its scoring subprocess may fetch the same series at once: one at a time here, or one would
        # convert the other's half-written folder. A failed download leaves no partial folder behind.
        check_uid(image_id)
        image_dir = os.path.realpath(os.path.join(self._datastore.image_path(), image_id))
        with series_lock(image_dir):
            fresh = not os.path.isdir(image_dir) or not os.listdir(image_dir)
            try:
                if fresh:
                    dicom_web_download_series(None, image_id, image_dir, self._client, self._fetch_by_frame)
                if not self._convert_to_nifti:
                    return image_dir
                cached = self._cached_image(image_id)
                if not os.path.exists(cached):
                    with _converted(image_dir) as converted:
                        # add_image writes this process's copy of the index: re-read it first, or a scoring
                        # process would undo what the server recorded since it started (a hand-out).
                        datastore_index.reload(self)
                        LocalDatastore.add_image(self, image_id, converted, self._dicom_info(image_id))
                return cached
            except BaseException:
                if fresh:
                    shutil.rmtree(image_dir, ignore_errors=True)
                raise

    def get_unlabeled_images(self, label_tag=None, labels=None):
        # MONAI Label keeps the server's list of labelled series for hours (MONAI_LABEL_DICOMWEB_CACHE_EXPIRY): a
        # series whose final label was saved through this server since would be handed out again. This server's
        # own record of saved final labels is current.
        saved_here = set(LocalDatastore.get_labeled_images(self))
        return [i for i in super().get_unlabeled_images(label_tag, labels) if i not in saved_here]

    def is_cached(self, image_id: str) -> bool:
        """Whether the series was fetched and converted already: reading it downloads nothing."""
        return os.path.isfile(self._cached_image(image_id))

    def _cached_image(self, image_id: str) -> str:
        """Where MONAI Label keeps a fetched series converted to NIfTI, beside its DICOM folder."""
        return os.path.realpath(os.path.join(self._datastore.image_path(), f"{image_id}.nii.gz"))

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        if label_tag != DefaultLabelTag.FINAL:
            return super().get_label_uri(label_id, label_tag, image_id)
        check_uid(label_id)
        label_dir = os.path.realpath(os.path.join(self._datastore.label_path(label_tag), label_id))
        if not os.path.isdir(label_dir) or not os.listdir(label_dir):
            dicom_web_download_series(None, label_id, label_dir, self._client, self._fetch_by_frame)
        if not self._convert_to_nifti:
            return label_dir
        saved = LocalDatastore.get_label_uri(self, image_id, label_tag)  # converted by an earlier call
        if saved and os.path.isfile(saved):
            return saved
        with _converted(label_dir, is_seg=True) as converted:
            if not converted:
                return ""  # not a segmentation MONAI Label can convert
            LocalDatastore.save_label(self, image_id, converted, label_tag, self._dicom_info(label_id))
        return LocalDatastore.get_label_uri(self, image_id, label_tag)

    def save_label(self, image_id, label_filename, label_tag, label_info, label_id=""):
        check_uid(image_id)
        if label_tag != DefaultLabelTag.FINAL:
            with http_errors(image_id, "store the label of series", "the label cannot be saved"):
                return super().save_label(image_id, label_filename, label_tag, label_info, label_id)
        if _is_empty(label_filename):
            raise HTTPException(status_code=400, detail="the label is empty: a final label is saved as DICOM SEG, "
                                                        "which needs at least one labelled voxel")
        series = fetch_series(self, image_id)  # MONAI Label's writing fetches it anyway
        with http_errors(image_id, "store the label of series", "the label cannot be written as DICOM SEG"), \
                _on_series_grid(label_filename, series) as on_grid:
            try:
                return super().save_label(image_id, on_grid, label_tag, label_info, label_id)
            except FileNotFoundError as e:
                if not str(e.filename or "").endswith(".dcm"):
                    raise
                # MONAI Label goes on to send the SEG file dcmqi did not write; dcmqi's reason is in the log.
                raise HTTPException(status_code=422, detail=(
                    f"the label cannot be written as DICOM SEG: {SEG_TOOL} wrote none for series {image_id!r} (its "
                    "reason is in the server's log). It needs every instance of the series to hold its SOP Class, "
                    "SOP Instance and Series Instance UIDs, and a Frame of Reference UID that is not empty, which "
                    "some anonymisers blank")) from None


@contextlib.contextmanager
def _converted(folder: str, is_seg: bool = False):
    """MONAI Label's conversion of a DICOM folder to a temporary NIfTI (readable by this account only), removed on
    leaving, whatever happened meanwhile: it is a copy of the patient's images."""
    path = dicom_to_nifti(folder, is_seg=is_seg)
    try:
        if path:
            os.chmod(path, 0o600)
        yield path
    finally:
        if path and os.path.isfile(path):
            os.remove(path)


@contextlib.contextmanager
def _on_series_grid(label_file: str, series: str):
    """The label file, or a temporary copy resampled onto the series' voxel grid where it has its own: the DICOM SEG
    writer takes the label's grid as it is, so a label on another grid became frames that match no slice of the
    series (a label that lost its position, an orphan segmentation in the archive). A label the local datastore
    would refuse (outside the series, partly or wholly; not a label map) is 422, as there."""
    if label_file.endswith(".bin"):  # OHIF's raw voxels: MONAI Label puts them on the series' grid itself
        yield label_file
        return
    try:
        geometry = read_geometry(series)
        on_grid = read_label_on_grid(label_file, geometry)
        same = same_grid(read_geometry(label_file, "a label map"), geometry)
        if not same:
            # The SEG writer names segments by their order: a structure smaller than a voxel of the series, gone in
            # the resampling, would give the next one its name.
            original = sitk.ReadImage(label_file)  # kept: the array view below reads its buffer
            voxels = sitk.GetArrayViewFromImage(original)
            check_label_values(voxels, os.path.basename(label_file))
            lost = sorted(label_values(voxels) - label_values(on_grid))
            if lost:
                raise ImageReadError(f"the label's structures {lost[:10]} vanish on the series' grid (smaller than "
                                     "its voxels): draw them on the series' own grid")
    except ImageReadError as e:
        raise HTTPException(status_code=422, detail=f"the label cannot be saved: {_unnamed(e, label_file)}") from None
    if same:
        yield label_file
        return
    with tempfile.TemporaryDirectory() as folder:  # private to this account: it holds a patient's label
        resampled = os.path.join(folder, "label.nii.gz")
        sitk.WriteImage(geometry.apply_to(sitk.GetImageFromArray(on_grid)), resampled, useCompression=True)
        yield resampled


@contextlib.contextmanager
def series_lock(image_dir: str):
    """An exclusive lock, across the processes of this machine, on one series' cache folder. Lock files live in a
    folder of the cache that only this account can enter (in a shared temporary folder, anyone could take them)."""
    digest = hashlib.sha1(image_dir.encode()).hexdigest()[:20]
    locks = os.path.join(os.path.dirname(image_dir), ".raps3d-locks")
    os.makedirs(locks, mode=0o700, exist_ok=True)
    with open(os.path.join(locks, f"series-{digest}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _unnamed(error: ImageReadError, label_file: str) -> str:
    """The reason, with "the label" for the name of MONAI Label's temporary copy of it (which tells a client
    nothing)."""
    name = repr(os.path.basename(label_file))
    return str(error).replace(f"the label {name}", "the label").replace(name, "the label")


def _is_empty(label_file: str) -> bool:
    """Whether a label file has no labelled voxel (an ITK-readable image, or OHIF's raw uint8 ``.bin``)."""
    if label_file.endswith(".bin"):
        return not np.fromfile(label_file, dtype=np.uint8).any()
    try:
        check_header(label_file, "a label map")
    except ImageReadError as e:
        raise HTTPException(status_code=422, detail=f"the label cannot be saved: {_unnamed(e, label_file)}") from None
    try:
        stats = sitk.StatisticsImageFilter()
        stats.Execute(sitk.Cast(sitk.ReadImage(label_file), sitk.sitkFloat32))
        return stats.GetMaximum() == 0 and stats.GetMinimum() == 0
    except RuntimeError:
        return False  # not readable here: left to MONAI Label


def is_dicomweb(studies: str) -> bool:
    return isinstance(studies, str) and studies.startswith(("http://", "https://"))


def expose_dcmqi_tools() -> str | None:
    """Puts the folder holding ``itkimage2segimage`` (the ``dcmqi`` package's, or this Python's scripts folder) on
    PATH when it is not there yet; returns the tool's path, or None when it is not installed."""
    found = shutil.which(SEG_TOOL)
    if found:
        return found
    folders = [os.path.dirname(sys.executable)]
    try:
        import dcmqi  # the wheel keeps its executables in dcmqi/bin

        folders.append(os.path.join(os.path.dirname(dcmqi.__file__), "bin"))
    except ImportError:
        pass
    for folder in folders:
        tool = os.path.join(folder, SEG_TOOL)
        if os.path.isfile(tool) and os.access(tool, os.X_OK):
            os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")
            return tool
    return None


PACS_ATTEMPTS = 2  # tries of each DICOMweb request


def make_datastore(studies: str) -> DICOMWebDatastore:
    """MONAI Label's DICOMweb datastore over ``studies``, with the same settings MONAI Label reads, and a client that
    retrieves series as stored. Downloads nothing."""
    if not expose_dcmqi_tools():
        logger.warning(f"Raps-3D: {SEG_TOOL} (pip package dcmqi) is not installed: saving 'final' labels as DICOM SEG "
                       "will fail")
    session = None
    if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
        from dicomweb_client.session_utils import create_session_from_user_pass

        session = create_session_from_user_pass(settings.MONAI_LABEL_DICOMWEB_USERNAME,
                                                settings.MONAI_LABEL_DICOMWEB_PASSWORD)
    client = StoredSyntaxClient(url=studies, session=session, qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                                wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                                stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
    # dicomweb-client retries every failed request 5 times, waiting 2, 4, 8 and 16 s: a click on a series while the
    # PACS is down waited 30 s for its 502. One retry after half a second still rides out a dropped connection.
    client.set_http_retry_params(retry=True, max_attempts=PACS_ATTEMPTS, wait_exponential_multiplier=250)
    cache_path = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip()
    return Raps3DDICOMWebDatastore(client=client, search_filter=settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER,
                                   cache_path=cache_path or None,
                                   fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
                                   convert_to_nifti=settings.MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI)


def fetch_series(datastore: DICOMWebDatastore, series_uid: str) -> str:
    """The local file (or folder) of a series, fetched and converted on first use; errors as HTTPExceptions."""
    with http_errors(series_uid, "send series", f"series {series_uid!r} cannot be converted to a volume (unsupported "
                     "encoding or not an image series)"):
        return datastore.get_image_uri(series_uid)


@contextlib.contextmanager
def http_errors(series_uid: str, server_action: str, unprocessable: str):
    """MONAI Label's DICOMweb failures as clear HTTP errors: 404 for a series the server does not have, 502 when
    the server fails (``server_action``: what it failed to do) or cannot be reached, 422 (``unprocessable``: what
    could not be done, with the tool's reason) when a conversion fails."""
    try:
        yield
    except HTTPException:
        raise
    except IndexError:  # MONAI Label's lookup of the series' study found nothing
        raise HTTPException(status_code=404, detail=f"series {series_uid!r} is not on the DICOMweb server") from None
    except requests.HTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 404:
            raise HTTPException(status_code=404,
                                detail=f"series {series_uid!r} is not on the DICOMweb server") from None
        raise HTTPException(status_code=502, detail=f"the DICOMweb server failed to {server_action} "
                                                    f"{series_uid!r}: HTTP {status}") from None
    except requests.RequestException as e:
        raise HTTPException(status_code=502, detail=f"the DICOMweb server cannot be reached: "
                                                    f"{type(e).__name__}") from None
    except (RuntimeError, ValueError, OSError) as e:  # SimpleITK/GDCM or dcmqi could not convert
        if isinstance(e, OSError) and e.errno in STORAGE_ERRORS:  # this server's disk, not the series
            raise HTTPException(status_code=STORAGE_ERRORS[e.errno], detail=f"the server cannot write its DICOMweb "
                                f"cache for {series_uid!r}: {e.strerror}; nothing is wrong with the series") from None
        text = str(e).strip().splitlines()
        reason = text[-1] if text else type(e).__name__
        raise HTTPException(status_code=422, detail=f"{unprocessable}: {reason}") from None
