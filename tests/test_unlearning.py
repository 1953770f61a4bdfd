"""Adversarial unlearning: the perturbation it finds, the step it takes, the defense end to end."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from factories import backdoor_inputs, recipe_for, sanitize_with, train_backdoored

from fineprune.data.labelled import perturbation_radius
from fineprune.tune.methods.unlearning import AdversarialUnlearning


def _tiny(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)]
    )


def _batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(16, 6)).astype(np.float32), rng.integers(0, 3, 16)


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def test_the_radius_follows_the_inputs_scale():
    x = np.random.default_rng(0).random((50, 8, 8, 3)).astype(np.float32)
    norm = float(np.linalg.norm(x.reshape(50, -1), axis=1).mean())
    assert perturbation_radius(x, 0.2) == pytest.approx(0.2 * norm)
    assert perturbation_radius(255 * x, 0.2) == pytest.approx(255 * perturbation_radius(x, 0.2))


def test_the_worst_perturbation_is_one_shift_inside_the_ball_that_raises_the_loss():
    model = _tiny()
    x, y = _batch()
    trainer = AdversarialUnlearning(model, LOSS, radius=0.5)
    delta = trainer.worst_perturbation(tf.constant(x), tf.constant(y)).numpy()
    assert delta.shape == (1, 6)  # one perturbation for the whole batch: universal
    assert np.linalg.norm(delta) <= 0.5 + 1e-5
    clean = float(LOSS(y, model(x)))
    assert float(LOSS(y, model(x + delta))) > clean
    # A random shift of the same size raises it less: the ascent found a worst case.
    random = np.random.default_rng(1).normal(size=(1, 6)).astype(np.float32)
    random *= np.linalg.norm(delta) / np.linalg.norm(random)
    assert float(LOSS(y, model(x + delta))) > float(LOSS(y, model(x + random)))


def test_one_step_descends_the_clean_loss_plus_the_loss_at_the_worst_shift():
    model = _tiny()
    x, y = _batch()
    trainer = AdversarialUnlearning(model, LOSS, radius=0.5)
    delta = trainer.worst_perturbation(tf.constant(x), tf.constant(y))
    start = [w.copy() for w in model.get_weights()]
    with tf.GradientTape() as tape:
        total = LOSS(y, model(x)) + LOSS(y, model(x + delta))
    grads = tape.gradient(total, model.trainable_variables)
    expected = [w - 0.1 * g.numpy() for w, g in zip(start, grads, strict=True)]

    trainer.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    trainer.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for got, want in zip(model.get_weights(), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return backdoor_inputs(tmp_path_factory.mktemp("bau"), train_backdoored(seed=1), seed=110)


def test_the_unlearning_defenses_are_reported_as_such(files, tmp_path: Path):
    out = tmp_path / "out"
    report = sanitize_with(
        files["keras"], files["clean"], out, "fine-pruning-bau", trigger=files["trigger"], epochs=3
    )
    tuning = report.fine_tuning
    assert tuning is not None and tuning.method == "adversarial-unlearning"
    assert report.decision.pruned > 0 and tuning.epochs_run == 3
    assert report.fine_pruned.attack_success_rate is not None
    html = (out / "report.html").read_text()
    assert "adversarial unlearning" in html and "delivered model taught" in html


def test_only_the_unlearning_method_unlearns():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    assert recipe_for(model, [], "bau").unlearning_radius == 0.2
    assert recipe_for(model, [], "fine-pruning-bau", unlearning_radius=0.3).unlearning_radius == 0.3
    assert recipe_for(model, [], "fine-pruning").unlearning_radius == 0.0
    assert recipe_for(model, [], "bau").distillation == 1.0
