"""L2-SP: fine-tuning pulled back to the weights it started from, one step checked by hand."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from factories import recipe_for

from fineprune.tune.methods.plain import Plain


def test_an_anchored_step_adds_alpha_times_the_distance_to_the_start():
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    y = np.random.default_rng(1).normal(size=(8, 2)).astype(np.float32)
    trainer = Plain(inner, anchor=0.5)  # the start is recorded here
    start = [w.copy() for w in inner.get_weights()]
    moved = [w + 0.3 for w in start]  # as if earlier steps had moved the weights
    inner.set_weights(moved)
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y, inner(x))
    grads = [g.numpy() for g in tape.gradient(loss, inner.trainable_variables)]
    expected = [w - 0.1 * (g + 0.5 * (w - s)) for w, g, s in zip(moved, grads, start, strict=True)]

    trainer.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    trainer.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for got, want in zip(inner.get_weights(), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_the_anchor_is_a_research_setting_of_plain_fine_tuning_only():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    assert recipe_for(model, [], anchor=0.01).anchor == 0.01
    assert recipe_for(model, [], "fst", anchor=0.01).anchor == 0.0
    assert recipe_for(model, []).anchor == 0.0
