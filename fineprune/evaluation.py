"""Predictions and the two rates the report quotes: clean accuracy and attack success."""

from __future__ import annotations

from typing import Literal

import keras
import numpy as np

from fineprune.data import LabelledData
from fineprune.sweep import predicted_classes

OutputKind = Literal["probabilities", "logits"]


def predict(model: keras.Model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return np.asarray(model.predict(x, batch_size=batch_size, verbose=0))


def rate(model: keras.Model, data: LabelledData, batch_size: int = 256) -> float:
    """Fraction of samples classified as their label (for trigger data: as the target)."""
    if len(data) == 0:
        return float("nan")
    return float((predicted_classes(predict(model, data.x, batch_size)) == data.y).mean())


def output_kind(outputs: np.ndarray) -> OutputKind:
    """Whether a classifier ends in softmax/sigmoid or gives raw logits, from what it outputs."""
    if outputs.min() < 0.0 or outputs.max() > 1.0:
        return "logits"
    if outputs.shape[-1] > 1 and not np.allclose(outputs.sum(axis=-1), 1.0, atol=1e-3):
        return "logits"
    return "probabilities"
