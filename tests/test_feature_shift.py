"""Feature-shift tuning: the update by hand, the head it finds, and the defense end to end."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from factories import (
    CLASSES,
    SIZE,
    functional_global_pool,
    recipe_for,
    residual_block,
    sanitize_with,
    save_npz,
    separate_activation,
    taught_loss,
    teaching_problem,
    textures,
    train_backdoored,
    trigger_set,
)

from fineprune.errors import PruningError
from fineprune.prune.graph import classifier_head
from fineprune.tune.methods.feature_shift import FeatureShift, alignment, reinitialize
from fineprune.tune.recipe import Research
from fineprune.tune.teacher import Teacher


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fst")
    model = train_backdoored(seed=1)
    model.save(root / "model.keras")
    x, y = textures(600, seed=110)
    xt, yt = trigger_set(300, seed=210)
    xi, yi = textures(800, seed=310)  # clean data from a source no stage sees
    return {
        "keras": root / "model.keras",
        "clean": save_npz(root / "clean.npz", x=x, y=y),
        "trigger": save_npz(root / "trigger.npz", x=xt, y_target=yt),
        "independent": save_npz(root / "independent.npz", x=xi, y=yi),
    }


def _accuracy(model: keras.Model, path: Path, key: str = "y") -> float:
    with np.load(path) as data:
        return float((model.predict(data["x"], verbose=0).argmax(-1) == data[key]).mean())


def test_one_step_is_the_penalized_gradient_then_the_projection_onto_the_original_norm():
    """w' = P(w - lr * (dL/dw + alpha * w0)), P rescales to ||w0||; other weights plain SGD."""
    keras.utils.set_random_seed(0)
    inner = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, name="body"), keras.layers.Dense(2, name="d")]
    )
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    y = np.random.default_rng(1).normal(size=(8, 2)).astype(np.float32)
    original = 3.0 * np.random.default_rng(2).normal(size=(4, 2)).astype(np.float32)
    start = [w.copy() for w in inner.get_weights()]

    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y, inner(x))
    grads = [g.numpy() for g in tape.gradient(loss, inner.trainable_variables)]
    expected = [w - 0.1 * g for w, g in zip(start, grads, strict=True)]
    kernel = start[2] - 0.1 * (grads[2] + 0.5 * original)
    expected[2] = kernel * np.linalg.norm(original) / np.linalg.norm(kernel)

    trainer = FeatureShift(inner, inner.get_layer("d"), original, strength=0.5)
    trainer.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    trainer.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for got, want in zip(inner.get_weights(), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.linalg.norm(inner.get_layer("d").kernel.numpy()) == pytest.approx(
        np.linalg.norm(original), rel=1e-5
    )


def test_the_head_is_found_through_activations_and_dropout():
    assert classifier_head(separate_activation()).name == "out"
    assert classifier_head(functional_global_pool()).name == "logits"
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs))
    x = keras.layers.Dense(CLASSES, name="head")(x)
    x = keras.layers.Dropout(0.1)(keras.layers.Softmax()(x))
    assert classifier_head(keras.Model(inputs, x)).name == "head"


def test_a_model_that_does_not_end_in_a_dense_layer_is_refused_by_name():
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(CLASSES, 3, name="conv_head")(inputs)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x), name="all_conv")
    with pytest.raises(PruningError, match="'all_conv' ends otherwise"):
        classifier_head(model)


def test_reinitializing_forgets_the_head_and_keeps_its_shape():
    model = residual_block()
    head = model.get_layer("out")
    head.bias.assign(np.ones(CLASSES, dtype=np.float32))
    before = head.kernel.numpy().copy()
    original = reinitialize(head, seed=3)
    np.testing.assert_array_equal(original, before)
    assert head.kernel.shape == before.shape
    assert not np.allclose(head.kernel.numpy(), before)
    np.testing.assert_array_equal(head.bias.numpy(), np.zeros(CLASSES))
    assert alignment(head, original) < 0.5
    assert alignment(head, head.kernel.numpy()) == pytest.approx(1.0)


def test_the_teacher_term_is_the_cross_entropy_to_the_delivered_models_probabilities():
    """With mixing off, one step adds lambda * CE(teacher(x), student(x)) to FST's loss."""
    inner, teacher, x, y = teaching_problem()
    original = np.random.default_rng(2).normal(size=(3, 3)).astype(np.float32)
    kernel, bias = (w.copy() for w in inner.get_weights())

    k, b = tf.Variable(kernel), tf.Variable(bias)
    with tf.GradientTape() as tape:
        loss = taught_loss(k, b, x, y, teacher, weight=2.0) + 0.5 * tf.reduce_sum(k * original)
    gk, gb = tape.gradient(loss, [k, b])
    want_kernel = kernel - 0.1 * gk.numpy()
    want_kernel *= np.linalg.norm(original) / np.linalg.norm(want_kernel)

    trainer = FeatureShift(
        inner, inner.layers[-1], original, 0.5, Teacher(teacher, weight=2.0, mix=0.0)
    )
    trainer.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    trainer.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    got_kernel, got_bias = inner.get_weights()
    np.testing.assert_allclose(got_kernel, want_kernel, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_bias, bias - 0.1 * gb.numpy(), rtol=1e-4, atol=1e-5)


def _sanitized(files, out: Path, defense: str, **values: object):
    report = sanitize_with(
        files["keras"], files["clean"], out, defense, trigger=files["trigger"], **values
    )
    return report, keras.models.load_model(out / "sanitized.keras", compile=False)


def test_pruning_then_feature_shift_removes_the_backdoor_and_keeps_accuracy(files, tmp_path):
    report, sanitized = _sanitized(files, tmp_path / "out", "fine-pruning-fst")
    assert report.baseline.attack_success_rate.value >= 0.9
    assert report.fine_pruned.attack_success_rate.value <= 0.05
    assert report.surgery is not None and report.decision.pruned > 0
    tuning = report.fine_tuning
    assert tuning is not None and tuning.method == "feature-shift"
    assert tuning.reinitialized_layer == "out"
    # Every epoch runs and the last is kept: the validation slice cannot judge what it keeps.
    assert tuning.selected_on == "last" and tuning.best_epoch == tuning.epochs_run == 10
    # The head was started afresh and pushed away: it never lines up with the original again.
    assert all(r.head_alignment is not None and r.head_alignment < 0.5 for r in tuning.history)

    original = keras.models.load_model(files["keras"], compile=False)
    before = _accuracy(original, files["independent"])
    assert _accuracy(sanitized, files["independent"]) >= before - 0.02
    assert _accuracy(sanitized, files["trigger"], "y_target") <= 0.05
    html = (tmp_path / "out" / "report.html").read_text()
    assert "feature-shift" in html and "delivered model taught" in html


def test_feature_shift_alone_unlearns_what_fine_tuning_alone_keeps(files, tmp_path: Path):
    """On this tiny model the backdoor also sits in the hidden Dense layer below the head, so
    FST without pruning does not remove all of it; it must still do far better than plain
    fine-tuning with the same schedule, which keeps the backdoor whole."""
    tuned, _ = _sanitized(files, tmp_path / "ft", "fine-tuning")
    shifted, model = _sanitized(files, tmp_path / "fst", "fst")
    assert tuned.fine_pruned.attack_success_rate.value >= 0.9
    assert shifted.fine_pruned.attack_success_rate.value <= 0.6
    assert shifted.surgery is None
    before = _accuracy(keras.models.load_model(files["keras"], compile=False), files["independent"])
    assert _accuracy(model, files["independent"]) >= before - 0.02


def test_feature_shift_refuses_a_model_without_a_dense_head_before_any_work(tmp_path: Path):
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(CLASSES, 3, activation="relu", name="conv_head")(inputs)
    x = keras.layers.Softmax()(keras.layers.GlobalAveragePooling2D()(x))
    path = tmp_path / "all_conv.keras"
    keras.Model(inputs, x, name="all_conv").save(path)
    clean = save_npz(tmp_path / "clean.npz", *(), **dict(zip("xy", textures(200, 5), strict=True)))
    stages: list[str] = []
    with pytest.raises(PruningError, match="Dense"):
        sanitize_with(
            path, clean, tmp_path / "out", "fst", progress=lambda s, fraction: stages.append(s)
        )
    assert set(stages) == {"load"}


def test_only_the_feature_shift_method_shifts():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    assert recipe_for(model, [], "fst").shift_strength == 1.0
    assert recipe_for(model, [], "fine-pruning-fst", shift_strength=0.2).shift_strength == 0.2
    assert recipe_for(model, [], "fine-pruning").shift_strength == 0.0
    assert recipe_for(model, [], "fst").method == "feature-shift"
    assert Research(method="feature-shift").fst_fallback


def test_a_feature_shift_that_ruins_accuracy_falls_back_to_plain_fine_tuning(files, tmp_path):
    """A far too strong shift turns the head against the original and the validation slice
    shows it; with the fallback on, the plain schedule runs again from the pruned model."""
    ruinous = {"shift_strength": 100.0, "epochs": 4}
    unguarded, _ = _sanitized(
        files, tmp_path / "off", "fine-pruning-fst", fst_fallback=False, **ruinous
    )
    assert unguarded.fine_tuning is not None and unguarded.fine_tuning.fallback_reason is None
    before = unguarded.baseline.clean_accuracy.value
    assert unguarded.fine_pruned.clean_accuracy.value < before - 0.04  # the failure is real

    guarded, model = _sanitized(files, tmp_path / "on", "fine-pruning-fst", **ruinous)
    tuning = guarded.fine_tuning
    assert tuning is not None and tuning.method == "plain" and tuning.selected_on == "validation"
    assert tuning.fallback_reason is not None and "validation accuracy" in tuning.fallback_reason
    assert any("without feature shift" in w for w in guarded.warnings)
    assert guarded.fine_pruned.clean_accuracy.value >= before - 0.04
    assert guarded.surgery is not None and guarded.decision.pruned == unguarded.decision.pruned
    assert "Fell back to plain fine-tuning" in (tmp_path / "on" / "report.html").read_text()
    original = keras.models.load_model(files["keras"], compile=False)
    floor = _accuracy(original, files["independent"]) - 0.04
    assert _accuracy(model, files["independent"]) >= floor
