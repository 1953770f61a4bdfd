"""What `auto` resolves to: the head above the pruned layer, frozen or not, and the rate."""

from __future__ import annotations

import pytest
from factories import functional_global_pool, residual_block, sequential_bn_flatten
from pydantic import ValidationError

from fineprune.graph import ModelGraph
from fineprune.recipe import (
    AUTOMATIC_EPOCHS,
    AUTOMATIC_RATE,
    AUTOMATIC_SHARE,
    FROZEN_HEAD_RATE,
    POOLED_EPOCHS,
    pools_globally,
    resolve_recipe,
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
    recipe = resolve_recipe(SanitizeOptions(proxy_triggers=0.0), model, head)
    assert not pools_globally(model)
    assert recipe.frozen_layers == tuple(head)
    assert recipe.synthetic_triggers == AUTOMATIC_SHARE
    assert recipe.learning_rate == FROZEN_HEAD_RATE > AUTOMATIC_RATE
    assert recipe.epochs == AUTOMATIC_EPOCHS
    proxied = resolve_recipe(SanitizeOptions(), model, head)
    assert proxied.proxy_triggers > 0 and proxied.learning_rate == AUTOMATIC_RATE
    assert proxied.frozen_layers == tuple(head)


def test_auto_trains_a_pooled_head_and_stamps_at_the_usual_rate():
    for model in (residual_block(), functional_global_pool()):
        assert pools_globally(model)
        recipe = resolve_recipe(SanitizeOptions(), model, ["out"])
        assert recipe.frozen_layers == ()
        assert recipe.synthetic_triggers == AUTOMATIC_SHARE
        assert recipe.learning_rate == AUTOMATIC_RATE
        assert recipe.epochs == POOLED_EPOCHS > AUTOMATIC_EPOCHS


def test_explicit_choices_win_over_auto():
    model = sequential_bn_flatten()
    head = ModelGraph(model).downstream_layers("conv2")
    trained = resolve_recipe(SanitizeOptions(freeze_head=False), model, head)
    assert trained.frozen_layers == ()
    assert trained.synthetic_triggers == 0.0  # a trained flatten head is not stamped
    assert trained.learning_rate == AUTOMATIC_RATE
    chosen = resolve_recipe(
        SanitizeOptions(learning_rate=5e-4, synthetic_triggers=0.2), model, head
    )
    assert (chosen.learning_rate, chosen.synthetic_triggers) == (5e-4, 0.2)
    assert chosen.frozen_layers == tuple(head)
    assert resolve_recipe(SanitizeOptions(epochs=3), residual_block(), ["out"]).epochs == 3
    other = resolve_recipe(SanitizeOptions(defense="fine-pruning-sam"), residual_block(), ["out"])
    assert other.epochs == AUTOMATIC_EPOCHS  # only plain fine-pruning was measured at 20
    pooled = resolve_recipe(
        SanitizeOptions(freeze_head=True, proxy_triggers=0.0), residual_block(), ["gap", "out"]
    )
    assert pooled.frozen_layers == ("gap", "out")
    assert pooled.learning_rate == FROZEN_HEAD_RATE


def test_defenses_that_do_not_keep_the_head_never_freeze_it():
    model = sequential_bn_flatten()
    head = ModelGraph(model).downstream_layers("conv2")
    for defense in ("fine-tuning", "ft-sam", "fst"):
        recipe = resolve_recipe(SanitizeOptions(defense=defense), model, [])
        assert recipe.frozen_layers == () and recipe.learning_rate == AUTOMATIC_RATE
    for defense in ("fine-pruning-fst", "fine-pruning-sam", "fine-pruning-bau"):
        recipe = resolve_recipe(SanitizeOptions(defense=defense), model, head)
        assert recipe.frozen_layers == () and recipe.learning_rate == AUTOMATIC_RATE
        assert recipe.synthetic_triggers == 0.0
    asked = resolve_recipe(
        SanitizeOptions(defense="fine-pruning-sam", freeze_head=True), model, head
    )
    assert asked.frozen_layers == tuple(head)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"defense": "fine-tuning", "freeze_head": True}, "prunes and fine-tunes"),
        ({"defense": "pruning", "freeze_head": True}, "prunes and fine-tunes"),
        ({"defense": "fine-pruning-fst", "freeze_head": True}, "feature-shift"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"learning_rate": 2.0}, "learning_rate"),
        ({"epochs": -1}, "epochs"),
        ({"epochs": 1001}, "epochs"),
    ],
)
def test_options_refuse_a_head_or_rate_the_defense_cannot_use(options: dict, message: str):
    with pytest.raises(ValueError, match=message):
        SanitizeOptions(**options)


@pytest.mark.parametrize(
    ("field", "value"), [("epochs", -1), ("learning_rate", 2.0), ("synthetic_triggers", 1.5)]
)
def test_an_out_of_range_auto_option_is_blamed_on_its_own_field(field: str, value: float):
    with pytest.raises(ValidationError) as refused:
        SanitizeOptions(**{field: value})
    assert refused.value.errors()[0]["loc"] == (field,)
