"""Plain fine-tuning: the model's own train step, or with the delivered model teaching."""

from __future__ import annotations

import keras
import tensorflow as tf

from fineprune.tune.methods.base import Method, Setup, register


@register
class Plain(Method):
    """Trains on the labels and, with a teacher, on the delivered model's outputs for mixed
    images: a small clean set forgets what it does not show, and the teacher covers more of
    the input space (it also re-teaches a backdoor, so no default uses it)."""

    key = "plain"
    suffix = "distilled"

    @classmethod
    def prepare(cls, model: keras.Model, setup: Setup) -> keras.Model:
        return model if setup.teacher is None else cls(model, setup.teacher)

    def train_step(self, data: tuple[tf.Tensor, tf.Tensor]) -> dict[str, tf.Tensor]:
        x, y = data
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            y_pred, loss, total = self.taught_losses(x, y)
        self.apply_gradients(tape.gradient(total, variables), variables)
        return self.metrics_after(loss, y, y_pred)
