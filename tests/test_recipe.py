"""What `auto` resolves to: the head above the pruned layer, frozen or not, and the rate."""

from __future__ import annotations

import pytest
from factories import functional_global_pool, recipe_for, residual_block, sequential_bn_flatten
from pydantic import ValidationError

from fineprune.prune.graph import ModelGraph
from fineprune.tune.recipe import (
    AUTOMATIC_EPOCHS,
    AUTOMATIC_RATE,
    AUTOMATIC_SHARE,
    FROZEN_HEAD_RATE,
    POOLED_EPOCHS,
    Research,
    pools_globally,
)
from schemas.options import SanitizeOptions


def test_the_head_is_everything_downstream_of_the_layer_and_nothing_beside_it():
    sequential = ModelGraph(sequential_bn_flatten())
    assert sequential.downstream_layers("conv2") == [
        "bn2",
        "pool2",
        "drop",
        "flatten",
        "dense1",
        "out",
    ]
    branched = ModelGraph(functional_global_pool())
    head = branched.downstream_layers("conv2")
    assert "conv1" not in head and "conv2" not in head
    assert set(head) == {
        "bn2",
        "pool2",
        "conv3",
        "gap_a",
        "gmp_b",
        "flat",
        "concat",
        "dense_gap",
        "dense_flat",
        "sum",
        "logits",
    }
    # In a residual block the shortcut's own layer is upstream, not part of the head.
    residual = ModelGraph(residual_block()).downstream_layers("res_conv")
    assert residual == ["res_bn", "res_relu", "res_add", "gap", "out"]
    assert ModelGraph(residual_block()).downstream_layers("out") == []


def test_auto_freezes_a_flatten_head_stamps_and_raises_the_rate_without_a_proxy():
    model = sequential_bn_flatten()
    head = ModelGraph(model).downstream_layers("conv2")
    recipe = recipe_for(model, head, proxy_triggers=0.0)
    assert not pools_globally(model)
    assert recipe.frozen_layers == tuple(head)
    assert recipe.synthetic_triggers == AUTOMATIC_SHARE
    assert recipe.learning_rate == FROZEN_HEAD_RATE > AUTOMATIC_RATE
    assert recipe.epochs == AUTOMATIC_EPOCHS
    proxied = recipe_for(model, head)
    assert proxied.proxy_share > 0 and proxied.learning_rate == AUTOMATIC_RATE
    assert proxied.frozen_layers == tuple(head)


def test_auto_trains_a_pooled_head_and_stamps_at_the_usual_rate():
    for model in (residual_block(), functional_global_pool()):
        assert pools_globally(model)
        recipe = recipe_for(model, ["out"])
        assert recipe.frozen_layers == ()
        assert recipe.synthetic_triggers == AUTOMATIC_SHARE
        assert recipe.learning_rate == AUTOMATIC_RATE
        assert recipe.epochs == POOLED_EPOCHS > AUTOMATIC_EPOCHS


def test_explicit_choices_win_over_auto():
    model = sequential_bn_flatten()
    head = ModelGraph(model).downstream_layers("conv2")
    trained = recipe_for(model, head, freeze_head=False)
    assert trained.frozen_layers == ()
    assert trained.synthetic_triggers == 0.0  # a trained flatten head is not stamped
    assert trained.learning_rate == AUTOMATIC_RATE
    chosen = recipe_for(model, head, learning_rate=5e-4, synthetic_triggers=0.2)
    assert (chosen.learning_rate, chosen.synthetic_triggers) == (5e-4, 0.2)
    assert chosen.frozen_layers == tuple(head)
    assert recipe_for(residual_block(), ["out"], epochs=3).epochs == 3
    other = recipe_for(residual_block(), ["out"], defense="fine-pruning-sam")
    assert other.epochs == AUTOMATIC_EPOCHS  # only plain fine-pruning was measured at 20
    pooled = recipe_for(residual_block(), ["gap", "out"], freeze_head=True, proxy_triggers=0.0)
    assert pooled.frozen_layers == ("gap", "out")
    assert pooled.learning_rate == FROZEN_HEAD_RATE


def test_defenses_that_do_not_keep_the_head_never_freeze_it():
    model = sequential_bn_flatten()
    head = ModelGraph(model).downstream_layers("conv2")
    for defense in ("fine-tuning", "ft-sam", "fst"):
        recipe = recipe_for(model, [], defense=defense)
        assert recipe.frozen_layers == () and recipe.learning_rate == AUTOMATIC_RATE
    for defense in ("fine-pruning-fst", "fine-pruning-sam", "fine-pruning-bau"):
        recipe = recipe_for(model, head, defense=defense)
        assert recipe.frozen_layers == () and recipe.learning_rate == AUTOMATIC_RATE
        assert recipe.synthetic_triggers == 0.0
    asked = recipe_for(model, head, defense="fine-pruning-sam", freeze_head=True)
    assert asked.frozen_layers == tuple(head)


@pytest.mark.parametrize(
    ("defense", "values", "message"),
    [
        ("fine-tuning", {"freeze_head": True}, "prunes and fine-tunes"),
        ("fine-pruning-fst", {"freeze_head": True}, "feature-shift"),
        ("fine-pruning-sam", {"sharpness_radius": 0.0}, "sharpness_radius above 0"),
    ],
)
def test_the_recipe_refuses_a_head_or_radius_the_method_cannot_use(
    defense: str, values: dict, message: str
):
    model = sequential_bn_flatten()
    head = ModelGraph(model).downstream_layers("conv2")
    with pytest.raises(ValueError, match=message):
        recipe_for(model, [] if defense == "fine-tuning" else head, defense, **values)


@pytest.mark.parametrize(
    "options", [{"learning_rate": 0.0}, {"learning_rate": 2.0}, {"epochs": -1}, {"epochs": 1001}]
)
def test_options_refuse_a_rate_or_epochs_out_of_range(options: dict):
    with pytest.raises(ValueError, match=next(iter(options))):
        SanitizeOptions(**options)


@pytest.mark.parametrize(
    ("model", "field", "value"),
    [
        (SanitizeOptions, "epochs", -1),
        (SanitizeOptions, "learning_rate", 2.0),
        (Research, "synthetic_triggers", 1.5),
        (Research, "averaged_runs", 0),
    ],
)
def test_an_out_of_range_auto_setting_is_blamed_on_its_own_field(model, field: str, value: float):
    with pytest.raises(ValidationError) as refused:
        model(**{field: value})
    assert refused.value.errors()[0]["loc"] == (field,)
