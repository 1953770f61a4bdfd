"""Reconstructive neuron pruning (RNP: Li et al., ICML 2023).

Unlearn, then recover, then prune. A copy of the model is first trained to *raise* its loss on
the clean set until it no longer classifies it; clean features are what this destroys, while
the backdoor, which clean data never exercises, survives (the unlearned model sends everything
to the target class). Masks on the unlearned copy's neurons are then learned to bring the clean
loss back down: the neurons whose masks fall are those that pull toward the backdoor, and they
are pruned from the delivered model, whose weights are otherwise left as they were.

The masks and the masked forward pass are those of adversarial neuron pruning
(`fineprune.neuron_pruning`): the scale of every neuron (BatchNormalization gamma, or the kernel
of a layer no BatchNormalization follows), never the output layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from fineprune.data import LabelledData
from fineprune.neuron_pruning import (
    MaskedForward,
    NeuronGroup,
    NeuronPruningResult,
    NeuronPruningSettings,
    neuron_groups,
    prune_by_masks,
)
from fineprune.sweep import predicted_classes


@dataclass(frozen=True)
class ReconstructivePruningSettings:
    unlearning_rate: float = 0.01  # SGD, momentum 0.9, weight decay 5e-4, as the paper
    unlearning_epochs: int = 20  # at most; the rate drops tenfold after half of them
    clean_threshold: float = 0.2  # stop unlearning once clean accuracy is below this
    recovery_rate: float = 0.2  # of the masks: SGD, momentum 0.9
    recovery_epochs: int = 20
    recovery_loss_weight: float = 0.2  # the paper's alpha: scales the recovery loss
    recovery_training_mode: bool = True  # BatchNormalization by the batch while recovering
    batch_size: int = 128
    threshold: float = 0.2  # neurons whose mask ends below this are pruning candidates
    max_accuracy_drop: float = 4.0  # points of validation accuracy pruning may cost
    seed: int = 0


@dataclass
class Unlearning:
    model: keras.Model
    epochs: int
    clean_accuracy: float  # on the defender's data, inference mode, when unlearning stopped


def unlearn(
    model: keras.Model,
    data: LabelledData,
    loss: keras.losses.Loss,
    settings: ReconstructivePruningSettings,
    should_stop: Callable[[], bool] | None = None,
) -> Unlearning:
    """A copy of `model` trained by gradient ascent on the clean loss until it fails the data."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    steps_per_epoch = max(1, -(-len(data) // settings.batch_size))
    half = max(1, settings.unlearning_epochs // 2) * steps_per_epoch
    rate = keras.optimizers.schedules.PiecewiseConstantDecay(
        [half], [settings.unlearning_rate, settings.unlearning_rate / 10]
    )
    copy.compile(
        optimizer=keras.optimizers.SGD(rate, momentum=0.9, weight_decay=5e-4, global_clipnorm=20),
        loss=lambda y, p: -loss(y, p),
    )
    labels = _labels(model, data)
    accuracy, epochs = _accuracy(copy, data), 0
    for epoch in range(1, settings.unlearning_epochs + 1):
        if should_stop is not None and should_stop():
            break
        copy.fit(
            data.x,
            labels,
            batch_size=settings.batch_size,
            epochs=1,
            shuffle=True,
            verbose=0,
        )
        accuracy, epochs = _accuracy(copy, data), epoch
        if accuracy < settings.clean_threshold:
            break
    return Unlearning(copy, epochs, accuracy)


def recover_masks(
    unlearned: keras.Model,
    data: LabelledData,
    loss: keras.losses.Loss,
    settings: ReconstructivePruningSettings,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[list[NeuronGroup], list[np.ndarray]]:
    """Neuron masks in [0, 1] that bring the unlearned copy's clean loss back down."""
    groups = neuron_groups(unlearned)
    forward = MaskedForward(unlearned, groups)
    dtype = groups[0].scale.dtype
    masks = [tf.Variable(tf.ones([g.size], dtype)) for g in groups]
    velocity = [tf.Variable(tf.zeros([g.size], dtype)) for g in groups]
    weight, rate = settings.recovery_loss_weight, settings.recovery_rate
    training = settings.recovery_training_mode

    @tf.function(reduce_retracing=True)
    def step(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        current = [tf.identity(m) for m in masks]
        with tf.GradientTape() as tape:
            tape.watch(current)
            value = weight * loss(y, forward(x, current, training=training))
        grads = tape.gradient(value, current)
        for m, v, g in zip(masks, velocity, grads, strict=True):
            g = tf.zeros_like(m) if g is None else g
            v.assign(0.9 * v + g)
            m.assign(tf.clip_by_value(m - rate * v, 0.0, 1.0))
        return value

    batches = (
        tf.data.Dataset.from_tensor_slices((data.x, _labels(unlearned, data)))
        .shuffle(len(data), seed=settings.seed, reshuffle_each_iteration=True)
        .batch(settings.batch_size)
    )
    for _ in range(settings.recovery_epochs):
        if should_stop is not None and should_stop():
            break
        for x, y in batches:
            step(x, y)
    return groups, [m.numpy() for m in masks]


def reconstructive_prune(
    model: keras.Model,
    train: LabelledData,
    validation: LabelledData,
    loss: keras.losses.Loss,
    settings: ReconstructivePruningSettings,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[Unlearning, NeuronPruningResult]:
    """Unlearn a copy, recover its masks, prune `model` in place by them under the accuracy rule."""
    unlearning = unlearn(model, train, loss, settings, should_stop)
    _, masks = recover_masks(unlearning.model, train, loss, settings, should_stop)
    rule = NeuronPruningSettings(
        threshold=settings.threshold, max_accuracy_drop=settings.max_accuracy_drop
    )
    # The copy keeps the model's layer names and graph, so its groups come in the same order.
    result = prune_by_masks(model, neuron_groups(model), masks, validation, rule)
    return unlearning, result


def _labels(model: keras.Model, data: LabelledData) -> np.ndarray:
    return data.y.astype(np.float32)[:, None] if int(model.outputs[0].shape[-1]) == 1 else data.y


def _accuracy(model: keras.Model, data: LabelledData) -> float:
    outputs = model.predict(data.x, batch_size=256, verbose=0)
    return float((predicted_classes(outputs) == data.y).mean())
