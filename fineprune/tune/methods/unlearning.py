"""Backdoor adversarial unlearning (the min-max of I-BAU: Zeng et al., ICLR 2022).

A trigger is a small input change that sends every input to one class: a universal adversarial
perturbation the attacker planted. The defender cannot see it but can search for its like:
for each batch, find the one perturbation within a small L2 ball that most raises the clean
loss (the backdoor is the easiest way to raise it), then train the model to classify the
perturbed batch correctly. Repeating this unlearns the shortcut without knowing the trigger.

I-BAU solves the min-max with an implicit hypergradient; here the two sides simply alternate
(a few normalized gradient-ascent steps on the perturbation, then one descent step on the
weights), which is cheaper to write and to run but not what the paper measured. The
perturbation's radius is relative to the clean inputs' mean L2 norm, so one setting suits
0..1 and 0..255 images alike.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from fineprune.data.labelled import perturbation_radius
from fineprune.tune.methods.base import Method, Setup, register
from fineprune.tune.teacher import Teacher

ASCENT_STEPS = 5  # I-BAU's inner iterations


@register
class AdversarialUnlearning(Method):
    """Trains `inner` (sharing its variables) on each batch and on its worst shifted copy.

    Loss: cross-entropy on the batch + cross-entropy on the batch shifted by the batch's
    worst universal perturbation (+ the teacher's distillation loss).
    """

    def __init__(
        self,
        inner: keras.Model,
        loss: keras.losses.Loss,
        radius: float,
        teacher: Teacher | None = None,
    ) -> None:
        super().__init__(inner, teacher)
        self.radius = radius
        self._ascent_loss = loss

    key = "adversarial-unlearning"
    suffix = "unlearn"

    @classmethod
    def prepare(cls, model: keras.Model, setup: Setup) -> keras.Model:
        radius = perturbation_radius(setup.train_x, setup.recipe.unlearning_radius)
        return cls(model, setup.loss, radius, setup.teacher)

    def worst_perturbation(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """One perturbation for the whole batch, within the radius, that most raises the loss."""
        delta = tf.zeros_like(x[:1])
        step = 2.5 * self.radius / ASCENT_STEPS  # PGD's usual step: the ball is crossed twice
        for _ in range(ASCENT_STEPS):
            with tf.GradientTape() as tape:
                tape.watch(delta)
                loss = self._ascent_loss(y, self(x + delta, training=False))
            grad = tape.gradient(loss, delta)
            delta = delta + step * grad / (tf.norm(grad) + 1e-12)
            delta = delta * tf.minimum(1.0, self.radius / (tf.norm(delta) + 1e-12))
        return tf.stop_gradient(delta)

    def train_step(self, data: tuple[tf.Tensor, tf.Tensor]) -> dict[str, tf.Tensor]:
        x, y = data
        delta = self.worst_perturbation(x, y)
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred)
            shifted = self._ascent_loss(y, self(x + delta, training=True))
            total = loss + shifted + self.teaching(x)
        grads = tape.gradient(total, variables)
        self.apply_gradients(grads, variables)
        return self.metrics_after(loss, y, y_pred)
