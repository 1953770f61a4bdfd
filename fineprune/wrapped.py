"""A model that trains another model's variables with its own train step.

The defenses that change the loss or the update (sharpness-aware minimization, feature-shift
tuning) wrap the model being sanitized rather than subclass it: the wrapped model keeps its own
class and config, so what is saved is exactly the architecture that was uploaded.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from fineprune.distillation import Teacher


class TrainingWrapper(keras.Model):
    """Shares `inner`'s variables; subclasses write `train_step` with the helpers below."""

    def __init__(self, inner: keras.Model, suffix: str, teacher: Teacher | None = None) -> None:
        super().__init__(name=f"{inner.name}_{suffix}")
        self.inner = inner
        self.teacher = teacher
        if teacher is not None:
            teacher.model.trainable = False

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
