"""The delivered model as a teacher while the defenses that move it far train.

A defense that re-initializes the classifier (FST) or trains on perturbed inputs (adversarial
unlearning) costs clean accuracy when the clean set is small: the model learns the defender's
few sign tracks and forgets the rest. The delivered model is trustworthy on inputs without a
trigger, so on mixtures of two clean images the student matches its class probabilities at
temperature 1. Mixtures cover more of the input space than the images themselves. A higher
temperature would also copy the tiny probabilities the backdoor leaves on clean inputs
(measured: at temperature 2 or 4 a blended-trigger backdoor came back, 19-28 % attack success
against 0.4 % at 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import tensorflow as tf


@dataclass(frozen=True)
class Teacher:
    """The delivered model; its outputs on mixed clean images are the student's targets."""

    model: keras.Model
    weight: float  # of the distillation loss, next to the cross-entropy's 1
    mix: float = 0.5  # each image is mixed with another at a ratio drawn from [0, mix)
    from_logits: bool = False

    def loss(self, student: keras.Model, x: tf.Tensor) -> tf.Tensor:
        """Weighted cross-entropy between the teacher's and the student's outputs on mixtures."""
        batch = tf.shape(x)[0]
        partner = tf.gather(x, tf.random.shuffle(tf.range(batch)))
        ratio_shape = tf.concat([[batch], tf.ones([tf.rank(x) - 1], tf.int32)], 0)
        ratio = tf.random.uniform(ratio_shape, 0.0, self.mix, dtype=x.dtype)
        mixed = (1.0 - ratio) * x + ratio * partner
        target = self.model(mixed, training=False)
        binary = int(target.shape[-1]) == 1
        if self.from_logits:
            target = tf.sigmoid(target) if binary else tf.nn.softmax(target)
        cross_entropy = (
            keras.losses.BinaryCrossentropy(from_logits=self.from_logits)
            if binary
            else keras.losses.CategoricalCrossentropy(from_logits=self.from_logits)
        )
        return self.weight * cross_entropy(tf.stop_gradient(target), student(mixed, training=True))
