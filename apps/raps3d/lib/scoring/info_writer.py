"""Image infos written to MONAI Label's datastore a batch at a time, over what the server wrote meanwhile.

MONAI Label's local datastore (and its DICOMweb datastore, built on it) rewrites its whole index file on every
``update_image_info``: 0.14 s with 5,000 images, and the server reloads the file each time. A scoring process also
writes from its own copy of the index, read when it started, so each of its writes undid what the server had recorded
since (an annotator's hand-out, say). Here infos are kept and written together every ``FLUSH_SECONDS``, and each
write first re-reads the index, so that the server's records stay.
"""

from __future__ import annotations

import logging
import time

from monailabel.interfaces.datastore import Datastore

logger = logging.getLogger(__name__)

FLUSH_SECONDS = 5.0  # a score reaches the datastore at most this long after it is computed (plus one image's time)


class InfoWriter:
    def __init__(self, datastore: Datastore):
        self.datastore = datastore
        self.pending: dict[str, dict] = {}
        self.last_flush = time.monotonic()

    def add(self, image_id: str, info: dict) -> dict[str, str]:
        """Queues an image's info; returns {image id: why} for images that could not be written (removed from the
        datastore meanwhile), when this call wrote the queue."""
        self.pending[image_id] = info
        if time.monotonic() - self.last_flush >= FLUSH_SECONDS:
            return self.flush()
        return {}

    def flush(self) -> dict[str, str]:
        """Writes the queued infos; returns {image id: why} for those that could not be written."""
        pending, self.pending = self.pending, {}
        self.last_flush = time.monotonic()
        if not pending:
            return {}
        datastore = self.datastore
        if not all(hasattr(datastore, a) for a in ("_init_from_datastore_file", "_update_datastore_file",
                                                   "_datastore")):
            return self._one_by_one(pending)  # another datastore: its own update_image_info
        failed = {}
        datastore._init_from_datastore_file()  # what the server wrote since (hand-outs, labels, new images)
        objects = datastore._datastore.objects
        for image_id, info in pending.items():
            if image_id in objects:
                objects[image_id].image.info.update(info)
            else:
                failed[image_id] = "removed from the datastore meanwhile"
        try:
            datastore._update_datastore_file()
        except OSError as e:
            logger.warning(f"Raps-3D scoring: {len(pending)} scores could not be stored: {e}")
            failed.update({image_id: f"could not be stored: {e}" for image_id in pending})
        return failed

    def _one_by_one(self, pending: dict[str, dict]) -> dict[str, str]:
        failed = {}
        for image_id, info in pending.items():
            try:
                self.datastore.update_image_info(image_id, info)
            except Exception as e:  # noqa: BLE001 - datastores raise their own types for a removed image
                failed[image_id] = f"could not be stored (removed meanwhile?): {e}"
        return failed
