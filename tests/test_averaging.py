"""Averaged fine-tunes: the mean by hand, every run from one start, and the option's limits."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from factories import recipe_for, residual_block, sequential_bn_flatten, textures, tuning_recipe

from fineprune.data.labelled import LabelledData
from fineprune.prune.graph import ModelGraph
from fineprune.tune.averaging import average_weights, extrapolate, fine_tune_averaged
from fineprune.tune.loop import FineTuneResult, fine_tune
from fineprune.tune.recipe import AVERAGED_EXTRAPOLATION, AVERAGED_RUNS, Research


def test_average_weights_is_the_element_wise_mean_in_the_runs_dtype():
    a = [np.array([[1.0, 2.0]], np.float32), np.array([0], np.int64)]
    b = [np.array([[3.0, 6.0]], np.float32), np.array([4], np.int64)]
    mean = average_weights([a, b])
    np.testing.assert_array_equal(mean[0], [[2.0, 4.0]])
    assert mean[0].dtype == np.float32 and mean[1].dtype == np.int64 and mean[1][0] == 2
    # What every run left alone stays bit for bit (a float32 mean of three would round).
    frozen = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    np.testing.assert_array_equal(average_weights([[frozen]] * 3)[0], frozen)
    with pytest.raises(ValueError, match="one architecture"):
        average_weights([a, [np.zeros((2, 1), np.float32), b[1]]])
    with pytest.raises(ValueError, match="nothing to average"):
        average_weights([])


def test_extrapolate_steps_the_movable_weights_and_keeps_the_statistics():
    start = [np.array([1.0, 2.0], np.float32), np.array([4.0], np.float32), np.ones(3, np.float32)]
    end = [np.array([3.0, 2.0], np.float32), np.array([1.0], np.float32), np.ones(3, np.float32)]
    stepped = extrapolate(start, end, 1.5, [True, False, True])
    np.testing.assert_array_equal(stepped[0], [4.0, 2.0])  # 1 + 1.5 * 2, and 2 unchanged
    np.testing.assert_array_equal(stepped[1], [1.0])  # a statistic: the average, not 4 - 4.5
    np.testing.assert_array_equal(stepped[2], start[2])
    assert stepped[0].dtype == np.float32
    assert all(a is b for a, b in zip(extrapolate(start, end, 1.0, [True] * 3), end, strict=True))
    with pytest.raises(ValueError, match="same weights"):
        extrapolate(start, end[:2], 1.5, [True] * 3)


@pytest.mark.parametrize("step", [1.0, 1.25])
def test_every_run_starts_from_the_model_and_the_model_ends_as_their_mean(step: float):
    x, y = textures(160, seed=1)
    train, validation = LabelledData(x[:128], y[:128]), LabelledData(x[128:], y[128:])
    model = sequential_bn_flatten(seed=3)
    start = model.get_weights()
    starts: list[list[np.ndarray]] = []
    ends: list[list[np.ndarray]] = []
    seeds: list[int] = []

    def tune_once(target: keras.Model, run: int, seed: int) -> FineTuneResult:
        assert run == len(seeds)
        seeds.append(seed)
        starts.append(target.get_weights())
        # BatchNorm trains, so its moving statistics move too (and must not be stepped).
        settings = tuning_recipe(
            epochs=2, learning_rate=1e-2, patience=5, freeze_batchnorm=False, seed=seed
        )
        result = fine_tune(target, train, validation, settings, "probabilities")
        ends.append(target.get_weights())
        return result

    results = fine_tune_averaged(model, 3, 7, tune_once, extrapolation=step)
    assert seeds == [7, 1007, 2007] and [r.recipe.seed for r in results] == seeds
    for weights in starts:
        for got, want in zip(weights, start, strict=True):
            np.testing.assert_array_equal(got, want)
    # The runs differ (their own shuffles); the model holds their mean, stepped `step` times
    # its change from the start for what trains, and the plain mean for the statistics.
    assert not np.allclose(ends[0][0], ends[1][0])
    statistics = 0
    for i, (got, variable) in enumerate(zip(model.get_weights(), model.weights, strict=True)):
        mean = np.mean([e[i] for e in ends], axis=0)
        if "moving" in variable.path:
            statistics += 1
            assert not np.array_equal(mean, start[i])
        else:
            mean = start[i] + step * (mean - start[i])
        np.testing.assert_allclose(got, mean, rtol=1e-6, atol=1e-6)
    assert statistics == 4


def test_one_run_is_plain_fine_tuning_of_the_model_itself():
    model = sequential_bn_flatten(seed=3)
    trained: list[keras.Model] = []

    def tune_once(target: keras.Model, run: int, seed: int) -> FineTuneResult:
        trained.append(target)
        return FineTuneResult(model=target, recipe=tuning_recipe(seed=seed))

    assert [r.recipe.seed for r in fine_tune_averaged(model, 1, 4, tune_once)] == [4]
    assert trained == [model]
    with pytest.raises(ValueError, match="at least 1"):
        fine_tune_averaged(model, 0, 4, tune_once)


def test_auto_averages_fine_pruning_with_a_frozen_head_only():
    model = sequential_bn_flatten()
    head = ModelGraph(model).downstream_layers("conv2")
    assert recipe_for(model, head).averaged_runs == AVERAGED_RUNS > 1
    for defense in ("fine-tuning", "ft-sam", "fine-pruning-sam", "bau", "fine-pruning-fst"):
        assert recipe_for(model, head, defense=defense).averaged_runs == 1
    assert recipe_for(model, head, averaged_runs=2).averaged_runs == 2
    assert recipe_for(model, head, defense="ft-sam", averaged_runs=4).averaged_runs == 4
    # The step past the average comes with averaging under a frozen head, unless asked for.
    assert recipe_for(model, head).extrapolation == AVERAGED_EXTRAPOLATION
    assert recipe_for(model, head, averaged_runs=1).extrapolation == 1.0
    sam = recipe_for(model, head, defense="ft-sam", averaged_runs=4)
    assert sam.extrapolation == 1.0  # its head trains
    assert recipe_for(model, head, defense="bau").extrapolation == 1.0
    assert recipe_for(model, head, averaged_runs=1, extrapolation=1.5).extrapolation == 1.5


def test_a_model_that_pools_globally_runs_once_and_is_not_stepped_unless_asked():
    model = residual_block()
    head = ModelGraph(model).downstream_layers("res_conv")
    recipe = recipe_for(model, head)
    assert not recipe.frozen_layers and recipe.averaged_runs == 1 and recipe.extrapolation == 1.0
    recipe = recipe_for(model, head, averaged_runs=3)
    assert recipe.averaged_runs == 3 and recipe.extrapolation == 1.0
    recipe = recipe_for(model, head, averaged_runs=3, extrapolation=1.25)
    assert recipe.extrapolation == 1.25


@pytest.mark.parametrize(
    "bad",
    [{"averaged_runs": 0}, {"averaged_runs": 17}, {"extrapolation": 0.0}, {"extrapolation": 4.5}],
)
def test_research_settings_refuse_runs_out_of_range(bad: dict):
    with pytest.raises(ValueError, match=next(iter(bad))):
        Research(**bad)


@pytest.mark.parametrize(
    ("defense", "bad"),
    [("fst", {"averaged_runs": 2}), ("fine-pruning-fst", {"extrapolation": 1.5})],
)
def test_feature_shift_refuses_runs_that_cannot_be_averaged(defense: str, bad: dict):
    model = sequential_bn_flatten()
    head = ModelGraph(model).downstream_layers("conv2")
    with pytest.raises(ValueError, match="one run"):
        recipe_for(model, head, defense=defense, **bad)
