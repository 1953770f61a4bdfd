"""Errors the engine raises on purpose; every one carries a message meant for the user."""

from __future__ import annotations


class FinePruneError(Exception):
    """Base class: a problem with the user's input or request, never a bug in fineprune."""

    kind = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnsafeModelError(FinePruneError):
    """The model file asks to run code of its own (Lambda, custom objects, foreign modules)."""

    kind = "unsafe_model"


class InvalidModelError(FinePruneError):
    """The file is not a model we can read (wrong format, truncated, malformed structure)."""

    kind = "invalid_model"


class InvalidDataError(FinePruneError):
    """The clean, test or trigger data does not fit the model or is malformed."""

    kind = "invalid_data"


class PruningError(FinePruneError):
    """The requested layer cannot be pruned (wrong type, unsupported graph around it)."""

    kind = "pruning"


class CancelledError(FinePruneError):
    """The caller asked to stop between two stages."""

    kind = "cancelled"


class TrackingError(FinePruneError):
    """The run could not be logged to the experiment tracker (MLflow)."""

    kind = "tracking"
