"""What a model takes and gives, as data must match it: no Keras here, the API reads it too."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSignature:
    """What the data must look like: per-sample input shape (None = any) and class count."""

    input_shape: tuple[int | None, ...]
    classes: int
