"""Adversarial neuron pruning: which neurons it masks, the masked forward pass, the pruning rule."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from factories import bn_and_plain_conv, random_images

from fineprune.neuron_pruning import (
    MaskedForward,
    NeuronPruningSettings,
    learn_masks,
    neuron_groups,
    prune_by_masks,
)

LOSS = keras.losses.SparseCategoricalCrossentropy()


def test_neurons_are_batchnorm_scales_and_unnormalized_kernels_never_the_head():
    groups = neuron_groups(bn_and_plain_conv())
    assert [(g.layer, g.size) for g in groups] == [("bn", 4), ("plain_conv", 6)]
    assert groups[0].scale.path.endswith("gamma") and groups[1].scale.path.endswith("kernel")


def test_the_masked_forward_is_the_model_with_all_ones_and_a_pruned_model_with_zeros():
    model, data = bn_and_plain_conv(), random_images()
    groups = neuron_groups(model)
    forward = MaskedForward(model, groups)
    ones = [np.ones(g.size, np.float32) for g in groups]
    plain = model.predict(data.x, verbose=0)
    np.testing.assert_allclose(np.asarray(forward(data.x, ones)), plain, rtol=1e-5, atol=1e-6)

    masks = [np.ones(4, np.float32), np.array([1, 0, 1, 1, 0, 1], np.float32)]
    masked = np.asarray(forward(data.x, masks))
    kernel = model.get_layer("plain_conv").kernel
    kernel.assign(keras.ops.convert_to_numpy(kernel) * masks[1])
    np.testing.assert_allclose(masked, model.predict(data.x, verbose=0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(masked, plain)


def test_learned_masks_stay_in_the_unit_interval_and_leave_the_weights_alone():
    model, data = bn_and_plain_conv(), random_images()
    before = [w.copy() for w in model.get_weights()]
    settings = NeuronPruningSettings(steps=12, batch_size=16)
    _, masks, history = learn_masks(model, data, LOSS, settings)
    assert [m.shape for m in masks] == [(4,), (6,)]
    assert all(((m >= 0) & (m <= 1)).all() for m in masks)
    assert any((m < 1).any() for m in masks), "twelve mask steps moved nothing"
    assert history and history[-1]["step"] == 12
    for old, new in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)


@pytest.mark.parametrize("allowed, expect_pruned", [(100.0, 3), (0.0, None)])
def test_pruning_zeroes_the_lowest_masks_below_the_threshold_within_the_accuracy_rule(
    allowed: float, expect_pruned: int | None
):
    model, data = bn_and_plain_conv(), random_images()
    groups = neuron_groups(model)
    masks = [np.array([0.9, 0.05, 0.9, 0.9]), np.array([0.1, 0.9, 0.9, 0.15, 0.9, 0.9])]
    settings = NeuronPruningSettings(threshold=0.2, max_accuracy_drop=allowed)
    result = prune_by_masks(model, groups, masks, data, settings)
    assert result.candidates == 3
    if expect_pruned is not None:
        assert result.pruned == {"bn": [1], "plain_conv": [0, 3]}
    assert result.validation_accuracy_before - result.validation_accuracy_after <= allowed / 100
    gamma = keras.ops.convert_to_numpy(model.get_layer("bn").gamma)
    kernel = keras.ops.convert_to_numpy(model.get_layer("plain_conv").kernel)
    for channel in result.pruned.get("bn", []):
        assert gamma[channel] == 0
    zeroed = [c for c in range(6) if not kernel[..., c].any()]
    assert zeroed == result.pruned.get("plain_conv", [])
    assert result.pruned_count == len(result.pruned.get("bn", [])) + len(zeroed)
