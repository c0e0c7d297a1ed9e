"""The model, its inference engine and the interaction sessions, shared by the infer task and the scoring method.

Nothing is loaded until first needed (the app object is rebuilt in every train/scoring subprocess, where most of it
is never used). The checkpoint is checked on each use and reloaded when it changes (a training run
replaces it atomically); sessions are dropped then, since their cached features came from the old weights.
Without a checkpoint the service runs an untrained 'lite' model, so the app still starts, and says so loudly.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

import raps3d
from raps3d.modeling import build_model

from .options import AppOptions

logger = logging.getLogger(__name__)

UNTRAINED_CONFIG = "lite"
UNTRAINED_SEED = 0  # random weights, but the same ones on every start: replies stay reproducible
UNTRAINED_WEIGHTS = f"untrained-{UNTRAINED_CONFIG}-seed{UNTRAINED_SEED}"


@dataclass(frozen=True)
class ModelStatus:
    path: str
    trained: bool
    weights: str  # identifies the weights in use (the checkpoint's mtime and size, or the untrained seed)
    config: str
    warning: str | None = None


def _checkpoint_signature(path) -> str | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{os.path.basename(path)}:{st.st_mtime_ns}:{st.st_size}"


def untrained_warning(path) -> str:
    return (f"WARNING: no usable Raps-3D checkpoint at {os.path.basename(str(path))!r}: running an UNTRAINED "
            f"'{UNTRAINED_CONFIG}' model with random weights. Masks are meaningless until a trained checkpoint is "
            "installed (it is picked up without a restart).")


def checkpoint_summary(meta: dict) -> str:
    """A checkpoint's provenance in one short log line (its training history stays in the file)."""
    state = meta.get("train_state") or {}
    parts = [f"{key}: {meta[key]}" for key in ("command", "data", "fine_tune") if meta.get(key)]
    if state.get("step") is not None:
        parts.append(f"step {state['step']}")
    if (meta.get("calibration") or {}).get("mask_threshold") is not None:
        parts.append(f"mask threshold {meta['calibration']['mask_threshold']}")
    return "; ".join(parts)


def without_folders(text: str, *paths) -> str:
    """``text`` with each of ``paths`` shortened to its file name: clients see these messages, not server folders."""
    for path in paths:
        text = text.replace(str(path), Path(path).name)
    return text


def fallback_warning(options: AppOptions, reason: str) -> str:
    return (f"WARNING: the fine-tuned checkpoint {options.trained_model_path.name!r} cannot be loaded ({reason}); "
            f"serving the base model {options.model_path.name!r} instead. Replace or remove the fine-tuned file (a "
            "training run that publishes replaces it).")


def load_served(options: AppOptions) -> tuple[raps3d.modeling.Raps3D, dict, Path, str | None]:
    """(model, metadata, path, reason) of the checkpoint to serve: the site's fine-tuned one when it loads, else the
    base one, with the reason the fine-tuned one did not load (a fine-tuned file that cannot be read must not leave
    random weights serving while a good base checkpoint is there: see ``fallback_warning``). CheckpointError when the
    one to serve cannot be loaded."""
    path, base = options.served_model_path, options.model_path
    try:
        model, meta = raps3d.load_model(path)
        return model, meta, path, None
    except raps3d.CheckpointError as e:
        if path == base or not base.exists():
            raise
        reason = without_folders(str(e), path, base)
    try:
        model, meta = raps3d.load_model(base)
    except raps3d.CheckpointError as e:
        raise raps3d.CheckpointError(f"{reason}; and the base checkpoint: {without_folders(str(e), path, base)}") \
            from None
    return model, meta, base, reason


def _release_free_memory() -> None:
    """Asks glibc to return freed memory to the system (elsewhere: nothing)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _sweep(service_ref: "weakref.ref[ModelService]", interval: float) -> None:
    while True:
        time.sleep(interval)
        service = service_ref()
        if service is None:
            return
        store, service = service._store, None
        if store is not None and store.expire():
            _release_free_memory()
        store = None  # a store the service has dropped (a new model) is not kept alive while sleeping


class ModelService:
    def __init__(self, options: AppOptions):
        self.options = options
        self._lock = threading.Lock()
        self._checked_signature: tuple | None = None  # the checkpoint files the weights in use were chosen for
        self._status: ModelStatus | None = None
        self._engine: raps3d.Engine | None = None
        self._store: raps3d.SessionStore | None = None
        self._sweeper: threading.Thread | None = None

    def expected_status(self) -> ModelStatus:
        """What the service runs, or would run if it loaded now. Only looks at the file: cheap enough for /info."""
        path = self.options.served_model_path
        sig = _checkpoint_signature(path)
        if self._status is not None and self._watched() == self._checked_signature:
            return self._status
        if sig is None:
            return ModelStatus(str(path), False, UNTRAINED_WEIGHTS, UNTRAINED_CONFIG, untrained_warning(path))
        return ModelStatus(str(path), True, sig, "(not loaded yet)")

    def _untrained(self, path, warning: str) -> tuple[raps3d.modeling.Raps3D, ModelStatus]:
        banner = "!" * 100
        logger.warning(f"\n{banner}\n{warning}\n{banner}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(UNTRAINED_SEED)
            model = build_model(UNTRAINED_CONFIG)
        return model, ModelStatus(str(path), False, UNTRAINED_WEIGHTS, UNTRAINED_CONFIG, warning)

    def _choose_model(self, path, watched: tuple):
        """The model to run for the checkpoint files in state ``watched`` (see ``_watched``; ``path`` is the one to
        serve), or None to keep the one in use."""
        sig, base_sig = watched
        base, status = self.options.model_path, self._status
        serving_trained = self._engine is not None and status is not None and status.trained
        if sig is None:
            if self._engine is not None:
                logger.warning(f"Raps-3D: checkpoint {path} disappeared; keeping the model in use")
                return None
            return self._untrained(path, untrained_warning(path))
        if serving_trained and status.path == str(path) and status.weights == sig:
            # What serves is the file to serve, as it was: only the other one changed, and no warning applies (the
            # broken fine-tuned file that made the base serve is gone, say).
            self._status = replace(status, warning=None)
            return None
        try:
            model, meta, loaded, failure = load_served(self.options)
        except raps3d.CheckpointError as e:
            reason = without_folders(str(e), path, base)
            if serving_trained:
                return self._keep(watched, reason)
            return self._untrained(path, f"{untrained_warning(path)} Loading it failed: {reason}")
        if failure and serving_trained and (status.path == str(path) or
                                            (status.path == str(base) and status.weights == base_sig)):
            # The served file changed into one that does not load (most likely a copy still being written), and
            # what serves is its earlier state, or the unchanged base: keep it, and the sessions.
            return self._keep(watched, failure)
        warning = fallback_warning(self.options, failure) if failure else None
        if warning:
            logger.error(f"Raps-3D: {warning}")
        logger.info(f"Raps-3D: loaded checkpoint {loaded} ({model.config.name}); {checkpoint_summary(meta)}")
        return model, ModelStatus(str(loaded), True, _checkpoint_signature(loaded), model.config.name, warning)

    def _keep(self, watched: tuple, reason: str) -> None:
        """Keeps the trained model in use (returns None for ``_choose_model``), saying in the status why."""
        checked = self._checked_signature or (None, None)
        changed = self.options.model_path if watched[0] == checked[0] else self.options.served_model_path
        logger.error(f"Raps-3D: the checkpoint {changed} changed and cannot be loaded ({reason}); keeping the model "
                     "in use")
        self._status = replace(self._status, warning=(
            f"WARNING: the checkpoint {changed.name!r} changed and cannot be loaded ({reason}); the model loaded "
            "before serves until it can."))
        return None

    def _watched(self) -> tuple:
        """The state of both checkpoint files: the base may be what serves (as the fallback), or become it."""
        return (_checkpoint_signature(self.options.served_model_path),
                _checkpoint_signature(self.options.model_path))

    def _ensure(self) -> None:
        path = self.options.served_model_path
        watched = self._watched()
        if self._engine is not None and watched == self._checked_signature:
            return
        with self._lock:
            watched = self._watched()
            if self._engine is not None and watched == self._checked_signature:
                return
            if self._engine is None and self.options.torch_threads > 0:
                torch.set_num_threads(self.options.torch_threads)
            chosen = self._choose_model(path, watched)
            if chosen is None:
                self._checked_signature = watched  # a file that failed to load is not retried until it changes
                return
            model, status = chosen
            engine = raps3d.Engine(model, resolve_device(self.options.device), bf16=self.options.bf16)
            if self._store is not None:
                logger.info("Raps-3D: model changed; open interaction sessions are dropped")
            self._engine, self._status = engine, status
            self._store = raps3d.SessionStore(engine, self.options.max_images, self.options.max_objects,
                                              self.options.idle_seconds)
            self._start_sweeper()
            # Last: the unlocked check above then sees the new state whole, and a failure before this (no memory
            # for the new engine) is tried again on the next request.
            self._checked_signature = watched

    def _start_sweeper(self) -> None:
        """A daemon thread that expires idle sessions while no request comes, and hands the freed memory back to
        the system (the C allocator keeps it otherwise). It holds the service weakly, and ends when it is gone."""
        if self._sweeper is not None:
            return
        interval = min(60.0, self.options.idle_seconds / 4)
        self._sweeper = threading.Thread(target=_sweep, args=(weakref.ref(self), interval),
                                         name="raps3d-session-sweeper", daemon=True)
        self._sweeper.start()

    def status(self) -> ModelStatus:
        self._ensure()
        return self._status

    def engine(self) -> raps3d.Engine:
        self._ensure()
        return self._engine

    def store(self) -> raps3d.SessionStore:
        self._ensure()
        return self._store

    def serving(self) -> tuple[raps3d.SessionStore, ModelStatus]:
        """The session store and the status of the model behind it, read together."""
        self._ensure()
        with self._lock:
            return self._store, self._status

    def warm_up(self) -> None:
        """Load the model and run one encoder pass, so that the first click pays for neither."""
        engine = self.engine()
        shape = tuple(engine.config.input_shape)
        frame = raps3d.Frame(raps3d.Box((0, 0, 0), shape), shape)
        engine.encode(np.zeros(shape, dtype=np.int16), frame)
