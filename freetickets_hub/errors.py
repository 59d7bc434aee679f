"""Errors raised by FreeTickets Hub.

Each class also derives from the built-in type a caller would naturally catch, as huggingface_hub's
errors do, so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "ConfigError",
    "DatasetError",
    "FreeTicketsError",
    "ImageError",
    "MissingDependencyError",
    "ModelNotFoundError",
    "OutputDirError",
    "RecipeError",
]


class FreeTicketsError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(FreeTicketsError, ValueError):
    """A ``config.json`` has a missing key, a wrong type or an impossible value."""


class ArtifactError(FreeTicketsError, ValueError):
    """A saved ensemble's weights do not match its config (missing, extra, mis-shaped or corrupt tensor)."""


class DatasetError(FreeTicketsError, ValueError):
    """A dataset cannot be evaluated on: unknown split, empty split, foreign labels or unconvertible images."""


class ImageError(FreeTicketsError, ValueError):
    """An image cannot be used: not an allowed format, undecodable, or dimensions over a limit."""


class RecipeError(FreeTicketsError, ValueError):
    """A training recipe has an unknown key, a wrong type or an impossible value."""


class MissingDependencyError(FreeTicketsError, ImportError):
    """An optional dependency needed for the requested feature is not installed."""


class ModelNotFoundError(FreeTicketsError, FileNotFoundError):
    """A model is neither a local folder nor a Hub repo that can be reached (or it is not cached while offline)."""


class OutputDirError(FreeTicketsError, OSError):
    """An output folder cannot be written, or already holds another model's files."""


class ExportError(FreeTicketsError, RuntimeError):
    """An exported graph failed its checks (ONNX checker, its interface, or agreement with PyTorch)."""
