"""Reconstructive neuron pruning: the unlearned copy, the recovered masks, pruning the original."""

from __future__ import annotations

import keras
import numpy as np
from factories import bn_and_plain_conv, random_images

from fineprune.reconstructive_pruning import (
    ReconstructivePruningSettings,
    reconstructive_prune,
    recover_masks,
    unlearn,
)

LOSS = keras.losses.SparseCategoricalCrossentropy()
FAST = ReconstructivePruningSettings(batch_size=16, unlearning_epochs=6, recovery_epochs=3)


def _loss(model: keras.Model, data) -> float:
    return float(keras.ops.convert_to_numpy(LOSS(data.y, model.predict(data.x, verbose=0))))


def test_unlearning_raises_the_clean_loss_of_a_copy_and_leaves_the_model_alone():
    model, data = bn_and_plain_conv(), random_images()
    before = [w.copy() for w in model.get_weights()]
    unlearning = unlearn(model, data, LOSS, FAST)
    assert unlearning.model is not model
    assert 1 <= unlearning.epochs <= FAST.unlearning_epochs
    assert _loss(unlearning.model, data) > _loss(model, data) + 0.1
    for old, new in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)


def test_unlearning_stops_as_soon_as_clean_accuracy_is_below_the_threshold():
    model, data = bn_and_plain_conv(), random_images()
    # Ascent ends with every input in one class: on three classes, a quarter of the data.
    settings = ReconstructivePruningSettings(
        batch_size=16, unlearning_rate=0.5, clean_threshold=0.3
    )
    unlearning = unlearn(model, data, LOSS, settings)
    assert unlearning.clean_accuracy < 0.3, "twenty epochs of ascent left the data classified"
    assert unlearning.epochs < 20


def test_recovered_masks_lie_in_the_unit_interval_and_train_no_weight():
    model, data = bn_and_plain_conv(), random_images()
    before = [w.copy() for w in model.get_weights()]
    groups, masks = recover_masks(model, data, LOSS, FAST)
    assert [g.layer for g in groups] == ["bn", "plain_conv"]
    assert [m.shape for m in masks] == [(4,), (6,)]
    assert all(((m >= 0) & (m <= 1)).all() for m in masks)
    assert any((m < 1).any() for m in masks), "three epochs of recovery moved no mask"
    for old, new in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)


def test_pruning_zeroes_the_neurons_of_the_delivered_model_within_the_accuracy_rule():
    model, data = bn_and_plain_conv(), random_images()
    settings = ReconstructivePruningSettings(
        batch_size=16,
        unlearning_epochs=6,
        recovery_epochs=3,
        threshold=1.01,
        max_accuracy_drop=100.0,
    )
    kernel_before = keras.ops.convert_to_numpy(model.get_layer("plain_conv").kernel).copy()
    _, result = reconstructive_prune(model, data, data, LOSS, settings)
    assert result.candidates == 10  # every mask is below a threshold above 1
    assert result.pruned_count == 10  # and any accuracy is allowed
    assert not keras.ops.convert_to_numpy(model.get_layer("bn").gamma).any()
    assert not keras.ops.convert_to_numpy(model.get_layer("plain_conv").kernel).any()
    assert kernel_before.any()
