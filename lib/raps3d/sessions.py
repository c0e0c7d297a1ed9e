"""Interaction sessions of many users: keyed by (client, image, object), bounded, expiring, thread safe.

Objects on the same image share one ImageState (the volume and its zoom-out features). Memory is bounded by the
number of open images (the large part) and of objects; the least recently used are evicted first, and anything idle
for longer than ``idle_seconds`` is dropped.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from typing import Callable, Hashable

import numpy as np

from .engine import Engine
from .errors import SessionError
from .predictor import ImageState, InteractiveObject

ObjectKey = tuple[Hashable, Hashable, Hashable]  # (client, image, object)


class SessionStore:
    def __init__(self, engine: Engine, max_images: int = 4, max_objects: int = 64, idle_seconds: float = 3600.0):
        self.engine = engine
        self.max_images = max_images
        self.max_objects = max_objects
        self.idle_seconds = idle_seconds
        self._images: OrderedDict[Hashable, ImageState] = OrderedDict()
        self._objects: OrderedDict[ObjectKey, InteractiveObject] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[Hashable, threading.Lock] = {}
        self._key_locks: dict[ObjectKey, list] = {}  # key -> [lock, number of holders and waiters]

    # -- images ---------------------------------------------------------------------------------------------------
    def image(self, image_key: Hashable, loader: Callable[[], tuple[np.ndarray, tuple]] | None = None) -> ImageState:
        """The open image ``image_key``; ``loader() -> (volume_zyx, spacing_zyx)`` opens it when it is not open."""
        with self._lock:
            self._expire()
            state = self._images.get(image_key)
            if state is not None:
                self._images.move_to_end(image_key)
                state.last_used = time.monotonic()
                return state
            if loader is None:
                raise SessionError(f"image {image_key!r} is not open")
            load_lock = self._loading.setdefault(image_key, threading.Lock())
        # Load outside the store lock (slow I/O), once per image even under concurrent first requests.
        try:
            with load_lock:
                with self._lock:
                    state = self._images.get(image_key)
                if state is None:
                    # Room is made after a successful load (while it loads, max_images + 1 volumes are in memory):
                    # an image that fails to load must not push out another user's.
                    volume, spacing = loader()
                    state = ImageState(self.engine, volume, spacing)
                    with self._lock:
                        self._images[image_key] = state
                        self._evict()
        finally:  # also when the loader fails (unreadable file): no lock left behind per bad image
            with self._lock:
                self._loading.pop(image_key, None)
        return state

    def is_open(self, image_key: Hashable) -> bool:
        with self._lock:
            return image_key in self._images

    # -- objects --------------------------------------------------------------------------------------------------
    def new_object(self, key: ObjectKey, image: ImageState) -> InteractiveObject:
        """A new object on ``image``, kept as ``key``'s session while the image is open. When other requests have
        evicted the image since this one opened it, the object still answers this request but is not kept: a
        session would hold the evicted volume beyond ``max_images``."""
        return self.keep_object(key, InteractiveObject(image))

    def keep_object(self, key: ObjectKey, obj: InteractiveObject) -> InteractiveObject:
        """Keeps ``obj`` (made on one of the store's images) as ``key``'s session, replacing any other, as
        ``new_object`` does. An object built first and kept only once its prompts succeeded leaves the session it
        replaces untouched when they fail."""
        image = obj.image
        with self._lock:
            if any(state is image for state in self._images.values()):
                self._objects[key] = obj
                self._objects.move_to_end(key)
                self._evict()
            else:
                self._objects.pop(key, None)
        return obj

    @contextlib.contextmanager
    def key_lock(self, key: ObjectKey):
        """Serialises what requests do to one key: a request that arrives while another builds the key's object waits
        for it (and can then edit it) instead of building a second one."""
        with self._lock:
            entry = self._key_locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[1] == 0:
                    self._key_locks.pop(key, None)

    def get_object(self, key: ObjectKey) -> InteractiveObject:
        with self._lock:
            self._expire()
            obj = self._objects.get(key)
            if obj is None:
                raise SessionError(f"no interaction session for client {key[0]!r}, image {key[1]!r}, object "
                                   f"{key[2]!r}: it never existed or has expired; start with a first prompt")
            self._objects.move_to_end(key)
            # Editing an object uses its image: neither may expire, nor be evicted first, while the other is in use.
            obj.image.last_used = obj.last_used = time.monotonic()
            for image_key, state in self._images.items():
                if state is obj.image:
                    self._images.move_to_end(image_key)
                    break
            return obj

    def find_object(self, key: ObjectKey) -> InteractiveObject | None:
        try:
            return self.get_object(key)
        except SessionError:
            return None

    def drop_object(self, key: ObjectKey, obj: InteractiveObject | None = None) -> None:
        """Forgets ``key``'s session; with ``obj``, only if that is still the session (another request may have
        replaced it meanwhile)."""
        with self._lock:
            if obj is None or self._objects.get(key) is obj:
                self._objects.pop(key, None)

    def expire(self) -> int:
        """Drops the images and objects idle for longer than ``idle_seconds`` (every access does this too; a server
        that nobody uses calls it to give the memory back). Returns how many images and objects were dropped."""
        with self._lock:
            before = len(self._images) + len(self._objects)
            self._expire()
            return before - len(self._images) - len(self._objects)

    def stats(self) -> dict:
        with self._lock:
            return {"images": len(self._images), "objects": len(self._objects),
                    "image_bytes": sum(s.nbytes for s in self._images.values())}

    # -- bounds (called with the lock held) ------------------------------------------------------------------------
    def _evict(self) -> None:
        while len(self._objects) > self.max_objects:
            self._objects.popitem(last=False)
        while len(self._images) > self.max_images:
            key, state = self._images.popitem(last=False)
            self._drop_objects_of(state)

    def _expire(self) -> None:
        limit = time.monotonic() - self.idle_seconds
        for key in [k for k, o in self._objects.items() if o.last_used < limit]:
            del self._objects[key]
        for key in [k for k, s in self._images.items() if s.last_used < limit]:
            self._drop_objects_of(self._images.pop(key))

    def _drop_objects_of(self, state: ImageState) -> None:
        for key in [k for k, o in self._objects.items() if o.image is state]:
            del self._objects[key]
