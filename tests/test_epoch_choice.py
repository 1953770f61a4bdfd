"""Which fine-tuning epoch is kept: ties on validation accuracy, and early stopping."""

from __future__ import annotations

import numpy as np
import pytest
from factories import recipe_for, sequential_bn_flatten, textures, tuning_recipe

from fineprune.data.labelled import LabelledData
from fineprune.tune.loop import FineTuneResult, fine_tune
from fineprune.tune.recipe import Research


def _tune(choice: str, epochs: int = 8, patience: int = 20) -> tuple[FineTuneResult, list]:
    x, y = textures(176, seed=2)
    # A 16-image validation slice with two labels it cannot learn: its accuracy ties from
    # epoch 4 on, while its loss grows as the model grows sure of its two mistakes.
    wrong = y[160:].copy()
    wrong[:2] = (wrong[:2] + 1) % (y.max() + 1)
    train, validation = LabelledData(x[:160], y[:160]), LabelledData(x[160:], wrong)
    model = sequential_bn_flatten(seed=4)
    settings = tuning_recipe(
        epochs=epochs, learning_rate=3e-2, patience=patience, seed=5, epoch_choice=choice
    )
    result = fine_tune(model, train, validation, settings, "probabilities")
    kept = (model.predict(validation.x, verbose=0).argmax(-1) == validation.y).mean()
    return result, [float(kept)]


def test_latest_best_keeps_the_last_epoch_at_the_best_accuracy_and_lowest_loss_the_least_loss():
    latest, latest_kept = _tune("latest-best")
    lowest, lowest_kept = _tune("lowest-loss")
    accuracy = [e["val_accuracy"] for e in latest.history]
    # The choice changes what is kept, never how training runs.
    assert accuracy == [e["val_accuracy"] for e in lowest.history]
    top = max(accuracy)
    at_top = [e["epoch"] for e in latest.history if e["val_accuracy"] == top]
    assert len(at_top) >= 2, "the problem must tie, or this test shows nothing"
    assert latest.best_epoch == at_top[-1]
    by_loss = max(lowest.history, key=lambda e: (e["val_accuracy"], -e["val_loss"]))
    assert lowest.best_epoch == by_loss["epoch"]
    assert latest.best_epoch != lowest.best_epoch  # this problem's tie is not the latest epoch
    # Both keep that epoch's weights: the model scores the kept epoch's accuracy.
    assert latest_kept == lowest_kept == [pytest.approx(top)]


def test_ties_do_not_hold_off_early_stopping():
    stopped, _ = _tune("latest-best", epochs=30, patience=2)
    assert len(stopped.history) < 30
    progress = [(e["val_accuracy"], -e["val_loss"]) for e in stopped.history]
    best_at = int(np.argmax([p == max(progress) for p in progress]))
    assert len(stopped.history) == best_at + 1 + 2  # two epochs without progress, then stop


def test_last_runs_every_epoch_and_keeps_the_last():
    # The problem `latest-best` stops early on, with patience 2: `last` runs all 12 epochs.
    last, last_kept = _tune("last", epochs=12, patience=2)
    assert [e["epoch"] for e in last.history] == list(range(1, 13))
    assert last.best_epoch == 12 and last.recipe.epoch_choice == "last"
    assert last_kept == [pytest.approx(last.history[-1]["val_accuracy"])]
    best = max(last.history, key=lambda e: (e["val_accuracy"], -e["val_loss"]))
    assert best["epoch"] != 12  # the validation pick would have kept another


def test_the_setting_reaches_the_recipe():
    model = sequential_bn_flatten(seed=0)
    for choice in ("latest-best", "lowest-loss", "last"):
        assert recipe_for(model, [], epoch_choice=choice).epoch_choice == choice
    # `auto` keeps the validation pick for a model that does not pool globally
    # (tests/test_sanitize.py follows it to `last` on one that does).
    assert recipe_for(model, []).epoch_choice == "lowest-loss"
    with pytest.raises(ValueError, match="epoch_choice"):
        Research(epoch_choice="best")
