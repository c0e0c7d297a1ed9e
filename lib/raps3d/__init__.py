"""Raps-3D: a 3D promptable CT segmentation model (points and 2D slice boxes as prompts) with zoom-out-zoom-in
inference and edit caching. A plain library: it knows nothing of any server or viewer."""

from .checkpoint import load_model, save_model
from .engine import Engine
from .errors import CheckpointError, ImageError, PromptError, Raps3DError, SessionError
from .geometry import Box, Frame
from .orientation import Reorientation
from .predictor import ImageState, InteractiveObject, Prompts, Result, SliceBox, check_volume
from .sessions import SessionStore

__all__ = ["Box", "CheckpointError", "Engine", "Frame", "ImageError", "ImageState", "InteractiveObject",
           "PromptError", "Prompts", "Raps3DError", "Reorientation", "Result", "SessionError", "SessionStore",
           "SliceBox", "check_volume", "load_model", "save_model"]
