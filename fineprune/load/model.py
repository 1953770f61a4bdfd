"""What a loaded classifier takes and gives: its signature, its predictions, its classes."""

from __future__ import annotations

from typing import Any, Literal

import keras
import numpy as np

from fineprune.errors import InvalidModelError
from fineprune.load.signature import ModelSignature

OutputKind = Literal["probabilities", "logits"]


def model_signature(model: keras.Model) -> ModelSignature:
    """The one input and one (batch, classes) output fineprune sanitizes, or a clear refusal."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise InvalidModelError(
            f"model has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
            "fineprune sanitizes classifiers with one input and one output"
        )
    shape = tuple(None if d is None else int(d) for d in model.inputs[0].shape[1:])
    classes = int(model.outputs[0].shape[-1])
    if len(model.outputs[0].shape) != 2:
        raise InvalidModelError(
            f"model output has shape {tuple(model.outputs[0].shape)}; expected (batch, classes)"
        )
    return ModelSignature(shape, classes)


def predict(model: keras.Model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return np.asarray(model.predict(x, batch_size=batch_size, verbose=0))


def predicted_classes(outputs: Any) -> np.ndarray:
    """Class per row: argmax, or a single unit's threshold (0.5 on probabilities, 0 on logits)."""
    values = np.asarray(outputs)
    if values.ndim == 2 and values.shape[1] == 1:
        threshold = 0.5 if values.min() >= 0.0 and values.max() <= 1.0 else 0.0
        return (values[:, 0] > threshold).astype(np.int64)
    return values.argmax(axis=-1)


def rate(model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
    """Fraction of samples classified as their label (for trigger data: as the target)."""
    if len(x) == 0:
        return float("nan")
    return float((predicted_classes(predict(model, x, batch_size)) == y).mean())


def output_kind(outputs: np.ndarray) -> OutputKind:
    """Whether a classifier ends in softmax/sigmoid or gives raw logits, from what it outputs."""
    if outputs.min() < 0.0 or outputs.max() > 1.0:
        return "logits"
    if outputs.shape[-1] > 1 and not np.allclose(outputs.sum(axis=-1), 1.0, atol=1e-3):
        return "logits"
    return "probabilities"


def even_rows(x: np.ndarray) -> np.ndarray:
    """`x` with an even number of rows, for a pass that takes gradients through a model.

    TensorFlow 2.21's oneDNN kernels corrupt the heap (the process dies) when an odd batch
    goes back through a narrow strided 1x1 convolution, as a small ResNet's projection
    shortcut is (docs/defaults.md): one row is left out, or a single row is taken twice.
    """
    if len(x) % 2 == 0:
        return x
    return x[:-1] if len(x) > 1 else np.concatenate([x, x])
