"""The probe behind FST's distillation settings (temperature, weight, mixing), outside the engine.

Trains one tuning victim (the seed CNN of `study.tune_defaults`, training seed 0) with FST's
loss plus the delivered model's teaching, written out by hand, on 1,275 of the defender's 1,500
images for 10 epochs (Adam 1e-3, cosine, BatchNorm frozen), and prints GTSRB test accuracy and
attack success after epochs 3, 6 and 10. Each config is "alpha,lambda,T,lr,mix": FST strength,
distillation weight, temperature, learning rate, largest mixing ratio. Results of the runs that
chose the defaults: docs/experiments/distillation-probe.txt.

    .venv/bin/python -m study.probe_distillation patch 1,1,1,1e-3,0.5 1,0,4,1e-3,0
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import tensorflow as tf

from fineprune.attacks import BlendedTrigger, PatchTrigger, triggered
from fineprune.feature_shift import classifier_head, reinitialize
from study.gtsrb import GO_STRAIGHT_OR_RIGHT, load
from study.tune_defaults import victim

TRIGGERS = {"patch": PatchTrigger(size=4), "blended": BlendedTrigger(alpha=0.15)}


def probe(trigger: str, configs: list[str]) -> None:
    data = load()
    rows = np.random.default_rng(0).choice(len(data.defender.y), size=1500, replace=False)
    x_train, y_train = data.defender.x[rows][:1275], data.defender.y[rows][:1275]
    xt, yt = triggered(data.test.x, data.test.y, TRIGGERS[trigger], GO_STRAIGHT_OR_RIGHT)
    path = victim("seed_cnn", trigger, 0, 10)

    def measure(model: keras.Model) -> tuple[float, float]:
        accuracy = (model.predict(data.test.x, verbose=0).argmax(-1) == data.test.y).mean()
        success = (model.predict(xt, verbose=0).argmax(-1) == yt).mean()
        return round(100 * float(accuracy), 1), round(100 * float(success), 1)

    teacher = keras.models.load_model(path, compile=False)
    print("before", measure(teacher), flush=True)
    for config in configs:
        alpha, weight, temperature, rate, mix = (float(v) for v in config.split(","))
        started = time.time()
        history = _train(
            path, teacher, x_train, y_train, measure, alpha, weight, temperature, rate, mix
        )
        print(config, history, round(time.time() - started), flush=True)


def _train(
    path: Path,
    teacher: keras.Model,
    x_train: np.ndarray,
    y_train: np.ndarray,
    measure: Callable[[keras.Model], tuple[float, float]],
    alpha: float,
    weight: float,
    temperature: float,
    rate: float,
    mix: float,
) -> list[tuple[float, float]]:
    """One config, 10 epochs; (test accuracy, attack success) after epochs 3, 6 and 10."""
    keras.utils.set_random_seed(0)
    model = keras.models.load_model(path, compile=False)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    head = classifier_head(model)
    original = reinitialize(head, 0) if alpha > 0 else head.kernel.numpy()
    norm, original_t = float(np.linalg.norm(original)), tf.constant(original)
    steps = 10 * int(np.ceil(len(x_train) / 32))
    optimizer = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(rate, steps))
    dataset = tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(2000, seed=0)
    variables = model.trainable_variables

    @tf.function
    def step(xb: tf.Tensor, yb: tf.Tensor) -> None:
        if mix > 0:
            partner = tf.gather(xb, tf.random.shuffle(tf.range(tf.shape(xb)[0])))
            ratio = tf.random.uniform([tf.shape(xb)[0], 1, 1, 1], 0, mix)
            mixed = (1 - ratio) * xb + ratio * partner
        else:
            mixed = xb
        target = teacher(mixed, training=False)
        with tf.GradientTape() as tape:
            p = model(xb, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(yb, p))
            if weight > 0:
                ps = model(mixed, training=True) if mix > 0 else p
                soft = tf.nn.softmax(tf.math.log(target + 1e-12) / temperature)
                log_student = tf.nn.log_softmax(tf.math.log(ps + 1e-12) / temperature)
                distill = -tf.reduce_sum(soft * log_student, -1)
                loss += weight * temperature**2 * tf.reduce_mean(distill)
            if alpha > 0:
                loss += alpha * tf.reduce_sum(head.kernel * original_t)
        optimizer.apply(tape.gradient(loss, variables), variables)
        if alpha > 0:
            head.kernel.assign(head.kernel * norm / tf.norm(head.kernel))

    history = []
    for epoch in range(10):
        for xb, yb in dataset.batch(32):
            step(xb, yb)
        if epoch in (2, 5, 9):
            history.append(measure(model))
    return history


if __name__ == "__main__":
    probe(sys.argv[1], sys.argv[2:])
