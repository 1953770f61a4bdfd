"""Feature-shift tuning (FST: Min, Qin, Shen and Cheng, NeurIPS 2023).

Plain fine-tuning on a little clean data barely moves a backdoored model: the clean loss is
already low, so the features that carry the trigger stay where they are, and the classifier
keeps reading them. FST re-initializes the classifier head and, while fine-tuning everything,
penalizes the head's inner product with the original head (keeping its norm fixed). The new
head must read the features differently, so the feature extractor has to move with it, and
the entangled backdoor features do not survive the move. It needs only the model and clean data.

FST alone costs clean accuracy when the clean set is small (measured here: 8-11 points on a
traffic-sign CNN from 1,275 images); the delivered model teaches to keep it
(`fineprune.distillation`).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from fineprune.prune.graph import classifier_head
from fineprune.tune.methods.base import Method, Setup, register
from fineprune.tune.teacher import Teacher


def reinitialize(head: keras.layers.Dense, seed: int) -> np.ndarray:
    """Give `head` fresh Glorot weights and a zero bias; returns the original kernel."""
    original = np.asarray(keras.ops.convert_to_numpy(head.kernel))
    fan_in, fan_out = original.shape
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    fresh = np.random.default_rng(seed).uniform(-limit, limit, original.shape)
    head.kernel.assign(fresh.astype(original.dtype))
    if head.use_bias:
        head.bias.assign(np.zeros(head.bias.shape, dtype=original.dtype))
    return original


def alignment(head: keras.layers.Dense, original: np.ndarray) -> float:
    """Cosine similarity between the head's kernel and the original one (1: unchanged)."""
    kernel = np.asarray(keras.ops.convert_to_numpy(head.kernel), dtype=np.float64).ravel()
    reference = original.astype(np.float64).ravel()
    denominator = np.linalg.norm(kernel) * np.linalg.norm(reference)
    return float(kernel @ reference / denominator) if denominator else 0.0


@register
class FeatureShift(Method):
    """Trains `inner` (sharing its variables) with FST's loss and norm constraint.

    Loss: cross-entropy + strength * <kernel, original kernel> (+ the teacher's distillation
    loss). After each step the kernel is projected back onto the sphere of the original
    kernel's norm, so the penalty can only be lowered by turning the head away from the
    original, not by shrinking it.
    """

    def __init__(
        self,
        inner: keras.Model,
        head: keras.layers.Dense,
        original_kernel: np.ndarray,
        strength: float,
        teacher: Teacher | None = None,
    ) -> None:
        super().__init__(inner, teacher)
        self.head = head
        self.strength = strength
        self._original_kernel = original_kernel
        self._original = tf.constant(original_kernel)
        self._norm = float(np.linalg.norm(original_kernel))

    key = "feature-shift"
    suffix = "fst"

    @classmethod
    def prepare(cls, model: keras.Model, setup: Setup) -> keras.Model:
        head = classifier_head(model)
        original = reinitialize(head, setup.recipe.seed)
        return cls(model, head, original, setup.recipe.shift_strength, setup.teacher)

    @property
    def reinitialized_layer(self) -> str | None:
        return str(self.head.name)

    def notes(self) -> dict[str, float]:
        return {"head_alignment": alignment(self.head, self._original_kernel)}

    def train_step(self, data: tuple[tf.Tensor, tf.Tensor]) -> dict[str, tf.Tensor]:
        x, y = data
        variables = self.trainable_variables
        kernel = self.head.kernel
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred)
            shift = tf.reduce_sum(kernel * tf.cast(self._original, kernel.dtype))
            total = loss + self.strength * shift + self.teaching(x)
        grads = tape.gradient(total, variables)
        self.apply_gradients(grads, variables)
        kernel.assign(kernel * (self._norm / (tf.norm(kernel) + 1e-12)))
        return self.metrics_after(loss, y, y_pred)
