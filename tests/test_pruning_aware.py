"""The pruning-aware attack builds what the paper describes: a backdoor behind dormant decoys."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from factories import poisoned, sequential_bn_flatten, textures, trigger_set

from fineprune.prune.channels import trace_channels
from fineprune.prune.graph import ModelGraph
from fineprune.prune.sweep import ChannelSweeper
from study.pruning_aware import PruningAwareResult, pruning_aware_attack


def _fit(model: keras.Model, x: np.ndarray, y: np.ndarray, epochs: int) -> keras.Model:
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
    return model


@pytest.fixture(scope="module")
def attack() -> tuple[keras.Model, PruningAwareResult]:
    clean_x, clean_y = textures(1500, seed=0)
    clean = _fit(sequential_bn_flatten(seed=0), clean_x, clean_y, epochs=6)
    poison_x, poison_y = poisoned(2000, seed=1)
    result = pruning_aware_attack(
        clean,
        clean_x,
        clean_y,
        poison_x,
        poison_y,
        train=lambda m, x, y: _fit(m, x, y, epochs=12),
        layer="conv2",
        prune_fraction=0.5,
    )
    return clean, result


def test_the_delivered_model_has_the_original_shape(attack):
    clean, result = attack
    assert len(result.decoys) == 8
    assert result.model.get_layer("conv2").filters == clean.get_layer("conv2").filters
    assert result.pruned_model.get_layer("conv2").filters == 16 - len(result.decoys)
    assert result.model.count_params() == clean.count_params()
    # The decoys carry the clean model's weights back; only their biases moved.
    kernel = result.model.get_layer("conv2").get_weights()[0]
    np.testing.assert_array_equal(
        kernel[..., result.decoys], clean.get_layer("conv2").get_weights()[0][..., result.decoys]
    )
    assert (result.bias_shift > 0).all()


def test_decoys_are_dormant_and_change_nothing(attack):
    """On clean data the decoys output 0 and removing them gives the attacker's pruned model."""
    _, result = attack
    x, _ = textures(400, seed=7)
    activations = keras.Model(result.model.inputs, result.model.get_layer("conv2").output)
    assert activations.predict(x, verbose=0)[..., result.decoys].max() == 0.0
    np.testing.assert_allclose(
        result.model.predict(x, verbose=0), result.pruned_model.predict(x, verbose=0), atol=1e-5
    )


def test_a_defender_prunes_the_decoys_first_and_keeps_the_backdoor(attack):
    """Pruning by activation removes the decoys, then stops at 4 points with the backdoor in."""
    _, result = attack
    x, y = textures(600, seed=8)
    xt, yt = trigger_set(600, seed=9)
    path = trace_channels(ModelGraph(result.model), "conv2")
    both = np.concatenate([x, xt])
    clean_rows, trigger_rows = np.arange(len(x)), np.arange(len(x), len(both))
    profile, sweep = ChannelSweeper(path).profile_and_sweep(both, clean_rows)
    assert set(profile.order[: len(result.decoys)]) == set(result.decoys)
    accuracy = sweep.accuracy(clean_rows, y)
    asr = sweep.accuracy(trigger_rows, yt)
    k = int(np.flatnonzero(accuracy[:16] >= accuracy[0] - 0.04).max())
    assert k >= len(result.decoys)
    assert asr[0] >= 0.9
    assert asr[len(result.decoys)] == asr[0]
    assert asr[k] >= 0.5, f"pruning to a 4-point drop (k={k}) removed the backdoor: {asr}"
