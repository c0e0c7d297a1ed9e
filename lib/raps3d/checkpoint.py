"""The project's checkpoint format: {"format", "config", "state_dict" (fp16 where it helps), "meta"}.

Writing goes to a temporary file in the same folder and is moved into place, so a reader never sees half a file and
a run killed while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import glob
import os
import tempfile
from dataclasses import fields
from pathlib import Path

import torch

from .errors import CheckpointError
from .modeling import ModelConfig, Raps3D, build_model

FORMAT = "raps3d-checkpoint-v1"


def save_model(model: Raps3D, path: str | os.PathLike, meta: dict | None = None, half: bool = True) -> Path:
    state = {k: (v.half() if half and v.is_floating_point() else v).cpu() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "config": model.config.to_dict(), "state_dict": state, "meta": meta or {}}
    return save_atomic(payload, path)


def save_atomic(payload: dict, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file beside ``path``, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a served model must be readable by the server's user
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def remove_stale_writes(path: str | os.PathLike) -> int:
    """Removes the temporary files that writes of ``path`` (``save_atomic``) left when their process was killed;
    call it where no other process writes ``path``. Returns how many were removed."""
    path = Path(path)
    prefix = f".{path.name}."
    # Only this file's: the random part of a temporary name has no dot, while ``.lite.pt.resume.x.tmp`` is another
    # file's (``lite.pt.resume``) write, perhaps in progress.
    stale = [p for p in path.parent.glob(f"{glob.escape(prefix)}*.tmp") if "." not in p.name[len(prefix):-len(".tmp")]]
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return len(stale)


def read_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no model checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file
        raise CheckpointError(f"{path} is not a readable Raps-3D checkpoint: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a Raps-3D checkpoint (format {FORMAT!r} expected)")
    return payload


def _load_weights(model: Raps3D, payload: dict, path, may_lack: tuple[str, ...] = ()) -> list[str]:
    """Load a checkpoint's weights into ``model``; returns the parameters it lacked, which may only be the mask
    threshold (older checkpoints: the default, 0) or names starting with ``may_lack``."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{path} does not match the configuration: shapes differ for {wrong[:5]}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    absent = [k for k in missing if k != "mask_threshold" and not k.startswith(may_lack)]
    if absent or unexpected:
        raise CheckpointError(f"{path} does not match its configuration: missing {absent[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return [k for k in missing if k != "mask_threshold"]


def load_model(path: str | os.PathLike) -> tuple[Raps3D, dict]:
    """The model stored at ``path`` (fp32) and its metadata."""
    payload = read_checkpoint(path)
    model = Raps3D(ModelConfig.from_dict(payload["config"]))
    _load_weights(model, payload, path)
    return model, payload.get("meta", {})


def init_model(path: str | os.PathLike, config: str | ModelConfig) -> tuple[Raps3D, list[str]]:
    """A model of ``config`` that starts from the weights at ``path``, whose configuration may lack the detail
    path (its layers then start as built: they change no output until trained). Returns the model and the names
    of the parameters the checkpoint did not have (they are new: a caller may train them faster)."""
    payload = read_checkpoint(path)
    model = build_model(config)
    # Settings that change no weight's shape (attention heads) would load silently into the wrong model.
    stored, target = ModelConfig.from_dict(payload["config"]), model.config
    differ = [f.name for f in fields(target)
              if f.name != "detail_levels" and getattr(stored, f.name) != getattr(target, f.name)]
    if differ:
        raise CheckpointError(f"{path} holds a model whose configuration differs from {target.name!r} in "
                              f"{', '.join(differ)}; only the detail path can be added to a checkpoint")
    fresh = _load_weights(model, payload, path, may_lack=("detail_encoder.",))
    return model, fresh
