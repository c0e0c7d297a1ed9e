"""MONAI Label's datastore index (its ``datastore_v2.json``), re-read before this process writes it.

MONAI Label's local datastore (and its DICOMweb datastore, built on it) keeps the index in memory and rewrites the
whole file on every change: 0.14 s with 5,000 images, and the server reloads it each time. A scoring process writes
from the copy it read when it started, so each of its writes (a score, a series it converted) undid what the server
had recorded since, such as an annotator's hand-out. Here the file is re-read under the datastore's lock, the change
applied to what was read, and the file written before the lock is let go: what others wrote stays.
"""

from __future__ import annotations

import logging
import os
import time

from filelock import FileLock
from monailabel.interfaces.datastore import Datastore

logger = logging.getLogger(__name__)

_PARTS = ("_lock_file", "_datastore_config_path", "_datastore_path", "_datastore", "_update_datastore_file")
FLUSH_SECONDS = 5.0  # a queued info reaches the file at most this long after it was queued (plus one image's time)


def _has_index(datastore) -> bool:
    return all(hasattr(datastore, part) for part in _PARTS)


def _read(datastore) -> None:
    """The in-memory index replaced by the file's (the caller holds the lock)."""
    from monailabel.datastore.local import LocalDatastoreModel

    path = datastore._datastore_config_path
    if os.path.exists(path):
        with open(path) as f:
            index = LocalDatastoreModel.model_validate_json(f.read())
        index.base_path = datastore._datastore_path
        datastore._datastore = index
        datastore._config_ts = os.stat(path).st_mtime


def reload(datastore: Datastore) -> None:
    """Re-reads the index file (a datastore without one is left as it is)."""
    if _has_index(datastore):
        with FileLock(datastore._lock_file):
            _read(datastore)


REFRESH_ATTEMPTS = 5


def refresh(datastore: Datastore) -> None:
    """MONAI Label's reconciliation of the index with the files on disk. Its file watcher runs the same in a thread of
    its own, on the same dictionaries and with no lock, so the two can meet ("dictionary changed size during
    iteration"): tried again a few times, then left to the watcher, with a warning."""
    for attempt in range(REFRESH_ATTEMPTS):
        try:
            datastore.refresh()
            return
        except RuntimeError as e:
            if attempt == REFRESH_ATTEMPTS - 1:
                logger.warning(f"Raps-3D: the datastore index could not be refreshed ({e}); its file watcher will")
            else:
                time.sleep(0.05 * (attempt + 1))


def write_infos(datastore: Datastore, infos: dict[str, dict]) -> dict[str, str]:
    """Adds ``infos`` ({image id: info}) to the images' infos in one write; returns {image id: why} for those that
    could not be written (removed from the datastore meanwhile, or the file could not be written)."""
    if not _has_index(datastore):
        return _one_by_one(datastore, infos)
    failed = {}
    with FileLock(datastore._lock_file):
        before = datastore._datastore
        _read(datastore)
        objects = datastore._datastore.objects
        for image_id, info in infos.items():
            if image_id in objects:
                objects[image_id].image.info.update(info)
            else:
                failed[image_id] = "removed from the datastore meanwhile"
        try:
            datastore._update_datastore_file(lock=False)
        except OSError as e:
            datastore._datastore = before  # nothing half-applied stays in memory
            failed.update({image_id: f"could not be written: {e}" for image_id in infos})
    return failed


def _one_by_one(datastore: Datastore, infos: dict[str, dict]) -> dict[str, str]:
    failed = {}
    for image_id, info in infos.items():
        try:
            datastore.update_image_info(image_id, info)
        except Exception as e:  # noqa: BLE001 - datastores raise their own types for a removed image
            failed[image_id] = f"could not be written (removed meanwhile?): {e}"
    return failed


class InfoWriter:
    """Infos queued and written together (``write_infos``) every ``FLUSH_SECONDS``."""

    def __init__(self, datastore: Datastore):
        self.datastore = datastore
        self.pending: dict[str, dict] = {}
        self.last_flush = time.monotonic()

    def add(self, image_id: str, info: dict) -> dict[str, str]:
        """Queues an image's info; {image id: why} of those that could not be written, when this call wrote."""
        self.pending[image_id] = info
        if time.monotonic() - self.last_flush >= FLUSH_SECONDS:
            return self.flush()
        return {}

    def flush(self) -> dict[str, str]:
        pending, self.pending = self.pending, {}
        self.last_flush = time.monotonic()
        if not pending:
            return {}
        failed = write_infos(self.datastore, pending)
        if failed:
            logger.warning(f"Raps-3D: {len(failed)} of {len(pending)} image infos not written: {failed}")
        return failed
