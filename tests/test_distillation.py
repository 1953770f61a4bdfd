"""The delivered model teaching plain fine-tuning: the step it takes and when it is on."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from factories import (
    backdoor_inputs,
    recipe_for,
    settings,
    taught_loss,
    teaching_problem,
    train_backdoored,
)
from pydantic import ValidationError

from fineprune.pipeline import sanitize
from fineprune.tune.methods.plain import Plain
from fineprune.tune.recipe import Research
from fineprune.tune.teacher import Teacher


def test_a_distilled_step_adds_the_teachers_cross_entropy_to_the_labels():
    """With mixing off, one SGD step on CE(y, p) + w * CE(teacher(x), p), by hand."""
    inner, teacher, x, y = teaching_problem()
    kernel, bias = (w.copy() for w in inner.get_weights())
    k, b = tf.Variable(kernel), tf.Variable(bias)
    with tf.GradientTape() as tape:
        loss = taught_loss(k, b, x, y, teacher, weight=3.0)
    gk, gb = tape.gradient(loss, [k, b])

    trainer = Plain(inner, Teacher(teacher, weight=3.0, mix=0.0))
    trainer.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    trainer.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    got_kernel, got_bias = inner.get_weights()
    np.testing.assert_allclose(got_kernel, kernel - 0.1 * gk.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_bias, bias - 0.1 * gb.numpy(), rtol=1e-4, atol=1e-5)
    assert not teacher.trainable


@pytest.mark.parametrize(
    ("defense", "distillation", "weight"),
    [
        ("fine-pruning", "auto", 0.0),
        ("fine-pruning", 2.0, 2.0),
        ("fine-pruning-sam", 0.5, 0.5),
        ("fst", "auto", 1.0),
        ("fine-pruning-bau", "auto", 1.0),
        ("bau", 0.0, 0.0),
    ],
)
def test_auto_teaches_the_methods_that_move_far_and_a_weight_teaches_any(
    defense: str, distillation: float | str, weight: float
):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    assert recipe_for(model, [], defense, distillation=distillation).distillation == weight


def test_a_distillation_weight_out_of_range_names_the_setting():
    with pytest.raises(ValidationError, match="distillation must be 'auto' or in"):
        Research(distillation=-1.0)
    with pytest.raises(ValidationError, match="distillation"):
        Research(distillation="often")


def test_fine_pruning_with_a_teacher_says_so_and_removes_the_backdoor(tmp_path: Path):
    files = backdoor_inputs(tmp_path, train_backdoored(seed=3), seed=41)
    options, research = settings(epochs=3, distillation=1.0)
    report = sanitize(
        files["keras"],
        files["clean"],
        tmp_path / "out",
        options,
        trigger_data=files["trigger"],
        research=research,
    )
    assert report.baseline.attack_success_rate.value >= 0.9
    assert report.fine_tuning is not None and report.fine_tuning.method == "plain"
    assert report.fine_pruned.attack_success_rate.value <= 0.1
    assert report.fine_pruned.clean_accuracy.value >= report.baseline.clean_accuracy.value - 0.1
    assert "delivered model taught" in (tmp_path / "out" / "report.html").read_text()
