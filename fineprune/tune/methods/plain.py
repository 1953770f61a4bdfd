"""Plain fine-tuning: the model's own train step; with the delivered model teaching; or
anchored to the weights it starts from (L2-SP: Li, Grandvalet and Davoine, ICML 2018)."""

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
    suffix = "plain"

    def __init__(self, inner: keras.Model, teacher=None, anchor: float = 0.0) -> None:
        super().__init__(inner, teacher)
        self.anchor = anchor
        # L2-SP's reference: the weights fine-tuning starts from, one constant per variable.
        self._start = [tf.constant(v) for v in inner.trainable_variables] if anchor else []

    @classmethod
    def prepare(cls, model: keras.Model, setup: Setup) -> keras.Model:
        anchor = setup.recipe.anchor
        if setup.teacher is None and not anchor:
            return model  # Keras's own train step, exactly
        return cls(model, setup.teacher, anchor)

    def train_step(self, data: tuple[tf.Tensor, tf.Tensor]) -> dict[str, tf.Tensor]:
        x, y = data
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            y_pred, loss, total = self.taught_losses(x, y)
            if self.anchor:
                pairs = zip(variables, self._start, strict=True)
                moved = tf.add_n([tf.reduce_sum(tf.square(v - s)) for v, s in pairs])
                total = total + 0.5 * self.anchor * moved
        self.apply_gradients(tape.gradient(total, variables), variables)
        return self.metrics_after(loss, y, y_pred)
