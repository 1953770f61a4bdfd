"""Sharpness-aware fine-tuning (adaptive SAM, as FT-SAM uses it: Zhu et al., ICCV 2023).

A backdoor sits in a sharp minimum that plain fine-tuning on a little clean data does not
leave. Each step first climbs to the worst weights within the radius and takes its gradient
there: the perturbation pushes the weights that carry the backdoor, and only those that matter
for clean data are pulled back.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from fineprune.tune.methods.base import Method, Setup, register
from fineprune.tune.teacher import Teacher


@register
class SharpnessAware(Method):
    """ASAM (Kwon et al. 2021): the ascent step is rho * T^2 g / ||T g|| with T = |w|, so the
    radius is relative to each weight's size and one rho suits every layer."""

    key = "sharpness-aware"
    suffix = "sam"

    def __init__(self, inner: keras.Model, radius: float, teacher: Teacher | None = None) -> None:
        super().__init__(inner, teacher)
        self.radius = radius

    @classmethod
    def prepare(cls, model: keras.Model, setup: Setup) -> keras.Model:
        return cls(model, setup.recipe.sharpness_radius, setup.teacher)

    def train_step(self, data: tuple[tf.Tensor, tf.Tensor]) -> dict[str, tf.Tensor]:
        x, y = data
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            y_pred, loss, total = self.taught_losses(x, y)
        grads = tape.gradient(total, variables)
        scaled = [
            tf.zeros_like(v) if g is None else g * tf.abs(v)
            for g, v in zip(grads, variables, strict=True)
        ]
        norm = tf.linalg.global_norm(scaled) + 1e-12
        steps = [self.radius * s * tf.abs(v) / norm for s, v in zip(scaled, variables, strict=True)]
        for variable, step in zip(variables, steps, strict=True):
            variable.assign_add(step)
        with tf.GradientTape() as tape:
            _, _, sharp_loss = self.taught_losses(x, y)
        sharp_grads = tape.gradient(sharp_loss, variables)
        for variable, step in zip(variables, steps, strict=True):
            variable.assign_sub(step)
        self.apply_gradients(sharp_grads, variables)
        return self.metrics_after(loss, y, y_pred)
