"""How the attacker trains its victims: a competent trainer, so the defense meets real models."""

from __future__ import annotations

import keras
import numpy as np


def train(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    seed: int,
    learning_rate: float = 1e-3,
) -> keras.Model:
    """Adam, then BatchNorm statistics recomputed on the training set.

    A few hundred steps at momentum 0.99 leave BatchNorm's moving averages far from the data
    (train-mode accuracy 99 %, inference 55 %). No trainer would deliver such a model, so the
    population statistics are measured, layer by layer, before the model is handed over.
    """
    keras.utils.set_random_seed(seed)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x, y, epochs=epochs, batch_size=64, verbose=0, shuffle=True)
    recalibrate_batchnorm(model, x)
    return model


def recalibrate_batchnorm(model: keras.Model, x: np.ndarray, batch_size: int = 256) -> None:
    for layer in model.layers:
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        features = keras.Model(model.inputs, layer.input).predict(x, batch_size, verbose=0)
        axes = tuple(range(features.ndim - 1))
        weights = layer.get_weights()
        weights[-2] = features.mean(axis=axes)
        weights[-1] = features.var(axis=axes)
        layer.set_weights(weights)
