"""The app's settings: ``--conf key value`` pairs (always strings), else ``RAPS3D_<KEY>`` environment variables,
else defaults. Parsed once, when the app object is built, so a typo fails at start with a clear message."""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

# apps/raps3d/lib/options.py -> the repository root is three folders up from lib/.
REPO_ROOT = Path(__file__).resolve().parents[3]
APP_DIR = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_PATH = REPO_ROOT / "model" / "raps3d_lite.pt"
# The train task publishes here, never over the base checkpoint: the shipped file stays as released, and removing
# the fine-tuned one serves the base again. MONAI Label keeps an app's own models in its model/ folder.
DEFAULT_TRAINED_MODEL_PATH = APP_DIR / "model" / "raps3d_finetuned.pt"
# Names offered to viewers; the model is class-agnostic, so a name only names the output.
DEFAULT_LABELS = ("liver", "spleen", "right_kidney", "left_kidney", "aorta")

ENV_PREFIX = "RAPS3D_"
YES, NO = ("1", "true", "yes", "on"), ("0", "false", "no", "off")

logger = logging.getLogger(__name__)


def yes_no(value, what: str) -> bool:
    """A yes/no value as settings, forms and viewers send it: a JSON boolean or 0/1, or a word ('true', 'no', ...).
    Anything else is a ValueError: read as "no" (or, for any non-empty text, as "yes") it could save a label over
    an annotator's work or reset an object no one meant to reset."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in YES + NO:
        return value.strip().lower() in YES
    raise ValueError(f"{what} must be true or false, got {repr(value)[:80]}")


@dataclass(frozen=True)
class AppOptions:
    model_path: Path = DEFAULT_MODEL_PATH
    trained_model_path: Path = DEFAULT_TRAINED_MODEL_PATH
    device: str = "auto"  # auto: cuda when available, else cpu
    bf16: bool = False
    torch_threads: int = 0  # 0: leave torch's default
    max_images: int = 4
    max_objects: int = 64
    idle_seconds: float = 3600.0
    labels: tuple[str, ...] = DEFAULT_LABELS
    result_dir: str = ""  # where reply labels are written before sending; "" = the system temp folder
    reserve_seconds: float = 600.0  # active learning: do not hand out an image served this recently

    @property
    def served_model_path(self) -> Path:
        """The checkpoint to serve: the site's fine-tuned one once the train task has published it, else the base."""
        return self.trained_model_path if self.trained_model_path.exists() else self.model_path

    @staticmethod
    def from_conf(conf: dict | None, environ: dict | None = None) -> "AppOptions":
        conf = dict(conf or {})
        environ = os.environ if environ is None else environ
        known = {f.name for f in fields(AppOptions)}
        for key in sorted(set(conf) - known):  # a typo would otherwise be ignored without a word
            logger.warning(f"Raps-3D: --conf {key!r} is not one of the app's options ({', '.join(sorted(known))}); "
                           "the app ignores it (MONAI Label may read it)")

        def raw(key: str) -> str | None:
            if key in conf and conf[key] is not None and str(conf[key]) != "":
                return str(conf[key])
            value = environ.get(ENV_PREFIX + key.upper())
            return value if value not in (None, "") else None

        def number(key: str, kind, default, minimum):
            value = raw(key)
            if value is None:
                return default
            try:
                parsed = kind(value)
            except ValueError:
                raise ValueError(f"option {key!r} must be a {kind.__name__}, got {value!r}") from None
            if not math.isfinite(parsed) or parsed < minimum:
                raise ValueError(f"option {key!r} must be >= {minimum}, got {value!r}")
            return parsed

        def flag(key: str, default: bool) -> bool:
            value = raw(key)
            if value is None:
                return default
            return yes_no(value, f"option {key!r}")

        device = _checked_device((raw("device") or "auto").lower())
        result_dir = raw("result_dir") or ""
        if result_dir and not (os.path.isdir(result_dir) and os.access(result_dir, os.W_OK)):
            raise ValueError(f"option 'result_dir' must be a writable folder, got {result_dir!r}")
        labels = raw("labels")
        return AppOptions(
            model_path=Path(raw("model_path") or DEFAULT_MODEL_PATH).expanduser(),
            trained_model_path=Path(raw("trained_model_path") or DEFAULT_TRAINED_MODEL_PATH).expanduser(),
            device=device,
            bf16=flag("bf16", False),
            torch_threads=number("torch_threads", int, 0, 0),
            max_images=number("max_images", int, 4, 1),
            max_objects=number("max_objects", int, 64, 1),
            idle_seconds=number("idle_seconds", float, 3600.0, 1.0),
            labels=tuple(s.strip() for s in labels.split(",") if s.strip()) if labels else DEFAULT_LABELS,
            result_dir=result_dir,
            reserve_seconds=number("reserve_seconds", float, 600.0, 0.0),
        )


def _checked_device(device: str) -> str:
    """``device`` if this machine has it (a GPU asked for must be there: otherwise every request would fail)."""
    match = re.fullmatch(r"auto|cpu|cuda(?::(\d+))?", device)
    if match is None:
        raise ValueError(f"option 'device' must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"option 'device' is {device!r}, but torch finds no CUDA GPU here; use cpu or auto")
        index = int(match.group(1) or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"option 'device' is {device!r}, but this machine has {torch.cuda.device_count()} "
                             "CUDA GPU(s)")
    return device
