"""The layer-relative learning rate: each layer's scale, and Adam's first step under it."""

from __future__ import annotations

import keras
import numpy as np

from fineprune.relative_rate import LayerScaledAdam, layer_scales


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    x = keras.layers.Dense(5, activation="relu", name="small")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    outputs = keras.layers.Dense(3, name="large")(x)
    model = keras.Model(inputs, outputs)
    model.get_layer("small").kernel.assign(np.full((6, 5), 0.01, np.float32))
    model.get_layer("large").kernel.assign(np.full((5, 3), -0.5, np.float32))
    return model


def test_each_variable_takes_its_layers_kernel_rms():
    model = _model()
    scales = layer_scales(model)
    assert scales["small/kernel"] == scales["small/bias"]
    np.testing.assert_allclose(scales["small/kernel"], 0.01, rtol=1e-6)
    assert scales["large/kernel"] == scales["large/bias"] == 0.5
    assert abs(scales["bn/gamma"] - 1.0) < 1e-6  # no kernel: its largest weight, gamma (ones)


def test_adams_first_step_moves_each_layer_by_the_rate_times_its_scale():
    model = _model()
    optimizer = LayerScaledAdam(1e-2, layer_scales(model))
    variables = model.trainable_variables
    before = [keras.ops.convert_to_numpy(v).copy() for v in variables]
    grads = [np.ones(v.shape, np.float32) for v in variables]
    optimizer.apply_gradients(zip(grads, variables, strict=True))
    moved = {
        v.path: float(np.abs(keras.ops.convert_to_numpy(v) - b).max())
        for v, b in zip(variables, before, strict=True)
    }
    # Adam's first step is the rate times sign(gradient) (up to its epsilon).
    np.testing.assert_allclose(moved["small/kernel"], 1e-2 * 0.01, rtol=1e-3)
    np.testing.assert_allclose(moved["large/kernel"], 1e-2 * 0.5, rtol=1e-3)
    np.testing.assert_allclose(moved["large/bias"], 1e-2 * 0.5, rtol=1e-3)
