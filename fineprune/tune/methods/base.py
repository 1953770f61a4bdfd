"""The base of every fine-tuning method, and the registry that looks methods up by name.

A method that changes the loss or the update wraps the model being sanitized rather than
subclassing it: the wrapped model keeps its own class and config, so what is saved is exactly
the architecture that was uploaded. `Method.prepare` returns what the loop compiles and fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import keras
import numpy as np
import tensorflow as tf

from fineprune.tune.recipe import Recipe
from fineprune.tune.teacher import Teacher

_METHODS: dict[str, type[Method]] = {}


@dataclass(frozen=True)
class Setup:
    """What a method may need to build its trainer."""

    recipe: Recipe
    train_x: np.ndarray  # the inputs fine-tuning trains on
    loss: keras.losses.Loss  # the compiled loss
    teacher: Teacher | None  # the delivered model, where the recipe distills


def register(cls: type[Method]) -> type[Method]:
    _METHODS[cls.key] = cls
    return cls


def get(name: str) -> type[Method]:
    """The method class registered under `name` (as `keras.optimizers.get` looks one up)."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"no fine-tuning method {name!r}; known: {', '.join(_METHODS)}") from None


class Method(keras.Model):
    """Shares `inner`'s variables; subclasses write `train_step` with the helpers below."""

    key: ClassVar[str]  # the name the recipe gives
    suffix: ClassVar[str]

    def __init__(self, inner: keras.Model, teacher: Teacher | None = None) -> None:
        super().__init__(name=f"{inner.name}_{self.suffix}")
        self.inner = inner
        self.teacher = teacher
        if teacher is not None:
            teacher.model.trainable = False

    @classmethod
    def prepare(cls, model: keras.Model, setup: Setup) -> keras.Model:
        """The model the loop trains: `model` itself, or a method wrapping it."""
        raise NotImplementedError

    @property
    def reinitialized_layer(self) -> str | None:
        """The layer this method started from scratch, if any."""
        return None

    def notes(self) -> dict[str, float]:
        """What this method adds to each epoch's record."""
        return {}

    def teaching(self, x: tf.Tensor) -> tf.Tensor | float:
        """The teacher's weighted loss on mixtures of `x`; 0 without a teacher."""
        if self.teacher is None or not self.teacher.weight:
            return 0.0
        return self.teacher.loss(self, x)

    def taught_losses(self, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Predictions, the compiled loss, and that loss plus the teacher's; inside a tape."""
        y_pred = self(x, training=True)
        loss = self.compute_loss(x=x, y=y, y_pred=y_pred)
        return y_pred, loss, loss + self.teaching(x)

    def call(self, inputs: tf.Tensor, training: bool = False) -> tf.Tensor:
        return self.inner(inputs, training=training)

    def apply_gradients(self, grads: list, variables: list) -> None:
        """One optimizer step; a variable the loss does not reach gets a zero gradient."""
        self.optimizer.apply(
            [tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables, strict=True)],
            variables,
        )

    def metrics_after(
        self, loss: tf.Tensor, y: tf.Tensor, y_pred: tf.Tensor
    ) -> dict[str, tf.Tensor]:
        """Update the compiled metrics as the built-in train step would, and return them."""
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(y, y_pred)
        return self.get_metrics_result()
