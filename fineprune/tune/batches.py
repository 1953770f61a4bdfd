"""The fine-tuning batches: shuffled clean data, optionally jittered, stamped, or proxied."""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from fineprune.data.labelled import LabelledData
from fineprune.tune.recipe import Recipe
from fineprune.tune.synthetic_triggers import SyntheticTriggers


def image_like(x: np.ndarray) -> bool:
    return x.ndim == 4 and x.shape[-1] in (1, 3)


def augmenter(seed: int) -> keras.Sequential:
    # Small geometric changes only: flips would turn "keep left" into "keep right".
    return keras.Sequential(
        [
            keras.layers.RandomTranslation(0.1, 0.1, fill_mode="nearest", seed=seed),
            keras.layers.RandomZoom(0.1, fill_mode="nearest", seed=seed + 1),
        ]
    )


def even_batches(samples: int, batch_size: int) -> tuple[int, int]:
    """The batch size and the samples an epoch uses so that no batch is of odd size (an odd
    batch can crash TensorFlow: `fineprune.load.model.even_rows`). An odd batch size is
    rounded up; when the last batch would be odd, an epoch leaves out one sample, a different
    one each epoch as the order reshuffles."""
    size = batch_size + batch_size % 2
    used = samples - (samples % size) % 2
    return size, max(used, min(samples, 2))


def batches(data: LabelledData, recipe: Recipe, proxy: np.ndarray | None = None) -> tf.data.Dataset:
    """Each epoch a new shuffle; then the recipe's jitter, synthetic stamps and proxy shift."""
    images = image_like(data.x)
    size, used = even_batches(len(data), recipe.batch_size)
    ds = tf.data.Dataset.from_tensor_slices((data.x, data.y))
    ds = ds.shuffle(len(data), seed=recipe.seed, reshuffle_each_iteration=True).take(used)
    ds = ds.batch(size)
    if recipe.augment and images:
        jitter = augmenter(recipe.seed)
        ds = ds.map(lambda x, y: (jitter(x, training=True), y), num_parallel_calls=2)
    if recipe.synthetic_triggers and images:
        stamp = SyntheticTriggers(recipe.synthetic_triggers, data.x, recipe.seed)
        ds = ds.enumerate().map(lambda step, xy: (stamp(xy[0], step), xy[1]))
    if proxy is not None and recipe.proxy_share:
        shift = proxy_shift(proxy, recipe.proxy_share, data.x, recipe.seed)
        ds = ds.enumerate().map(lambda step, xy: (shift(xy[0], step), xy[1]))
    return ds.prefetch(2)


def proxy_shift(
    pattern: np.ndarray, share: float, reference: np.ndarray, seed: int
) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """Adds `pattern` to `share` of a batch's rows, drawn per step, kept in the inputs' range:
    the scan's perturbation with the true label, so the shortcut it rides on is unlearned."""
    low, high = float(np.min(reference)), float(np.max(reference))
    stacked = tf.constant(pattern[None].astype(np.float32))

    def shift(x: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
        pick = tf.random.stateless_uniform(
            tf.concat([tf.shape(x)[:1], tf.ones([len(pattern.shape)], tf.int32)], 0),
            tf.stack([tf.constant(seed * 100 + 77, tf.int64), step]),
        )
        shifted = tf.clip_by_value(x + tf.cast(stacked, x.dtype), low, high)
        return tf.where(pick < share, shifted, x)

    return shift
