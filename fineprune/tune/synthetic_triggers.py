"""Random synthetic triggers stamped on clean fine-tuning images, their labels kept.

A backdoor is a shortcut from a small, input-independent pattern to one class. Fine-tuning on
clean images never shows such a pattern, so nothing in it pushes the shortcut out; here part of
every batch carries a random one — a square of random pixels at a random place (BadNets-like),
or a random image mixed in at a low ratio (blend-like) — with the true label. The model is
taught that patterns of these families say nothing about the class. The defender needs no
knowledge of the real trigger, only of the families triggers come from; a trigger outside them
(image warping, a semantic feature) is not covered.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


class SyntheticTriggers:
    """Stamps `share` of a batch: half with a random square patch, half with a random blend."""

    def __init__(
        self,
        share: float,
        reference: np.ndarray,
        seed: int = 0,
        patch_sizes: tuple[float, float] = (1 / 16, 1 / 4),  # of the smaller image side
        blend_ratios: tuple[float, float] = (0.05, 0.3),
    ) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share must be in [0, 1], got {share}")
        if reference.ndim != 4:
            raise ValueError("synthetic triggers need images (batch, height, width, channels)")
        self.share = share
        self.low = float(np.min(reference))  # the input range the patterns are drawn in
        self.high = float(np.max(reference))
        side = min(reference.shape[1:3])
        self.sizes = (max(1, round(patch_sizes[0] * side)), max(2, round(patch_sizes[1] * side)))
        self.ratios = blend_ratios
        self.seed = seed

    def __call__(self, x: tf.Tensor, step: tf.Tensor | int = 0) -> tf.Tensor:
        """The batch `x`, stamped; the same seed and step always stamp the same way."""
        x = tf.convert_to_tensor(x)
        shape = tf.shape(x)
        batch, height, width = shape[0], shape[1], shape[2]
        step = tf.cast(step, tf.int64)

        def seed(op: int) -> tf.Tensor:
            return tf.stack([tf.constant(self.seed * 100 + op, tf.int64), step])

        def uniform(dims: list, op: int, low: float = 0.0, high: float = 1.0) -> tf.Tensor:
            return tf.random.stateless_uniform(dims, seed(op), low, high, dtype=x.dtype)

        pick = uniform([batch], 1)
        patched_rows = pick < self.share / 2
        blended_rows = (pick >= self.share / 2) & (pick < self.share)

        # Patches: per image a size, a place, random pixels, half of them black-and-white.
        size = tf.random.stateless_uniform(
            [batch], seed(2), self.sizes[0], self.sizes[1] + 1, dtype=tf.int32
        )
        top = tf.cast(uniform([batch], 3) * tf.cast(height - size + 1, x.dtype), tf.int32)
        left = tf.cast(uniform([batch], 4) * tf.cast(width - size + 1, x.dtype), tf.int32)
        rows = tf.range(height)[None, :, None]
        cols = tf.range(width)[None, None, :]
        inside = (
            (rows >= top[:, None, None])
            & (rows < (top + size)[:, None, None])
            & (cols >= left[:, None, None])
            & (cols < (left + size)[:, None, None])
        )[..., None]
        pixels = uniform(tf.shape(x), 5)
        binary = uniform([batch, 1, 1, 1], 6) < 0.5
        pixels = tf.where(binary, tf.round(pixels), pixels)
        pixels = self.low + (self.high - self.low) * pixels
        patched = tf.where(inside, pixels, x)

        # Blends: random noise, or another image of the batch, mixed in at a low ratio.
        noise = self.low + (self.high - self.low) * uniform(tf.shape(x), 7)
        other = tf.gather(x, tf.argsort(uniform([batch], 8)))  # a random permutation
        pattern = tf.where(uniform([batch, 1, 1, 1], 9) < 0.5, noise, other)
        ratio = uniform([batch, 1, 1, 1], 10, *self.ratios)
        blended = (1.0 - ratio) * x + ratio * pattern

        out = tf.where(patched_rows[:, None, None, None], patched, x)
        return tf.where(blended_rows[:, None, None, None], blended, out)
