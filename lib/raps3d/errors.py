"""Errors raised for bad input. Each is a ValueError/KeyError subclass so callers can map them to 4xx replies."""


class Raps3DError(Exception):
    """Base class of every error this library raises on purpose."""


class ImageError(Raps3DError, ValueError):
    """The image cannot be segmented (wrong dimensionality, single slice, NaNs, ...)."""


class PromptError(Raps3DError, ValueError):
    """A prompt is malformed or lies outside the image."""


class SessionError(Raps3DError, KeyError):
    """An interaction refers to a session or object that does not exist (or has expired)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class CheckpointError(Raps3DError, ValueError):
    """A checkpoint does not match the model it is loaded into."""
