"""What the `auto` fine-tuning options stand for, read off the model's classifier head.

Measured (README, "How strong the defaults are"): fine-pruning on a model whose head pools
globally (the small ResNet) leaves a backdoor that half of each batch stamped with synthetic
triggers removes, while accuracy rises. On a model whose dense head sees every position (the
seed CNN) the same stamps cost 3-8 points: retrained on 1,500 images, that head learns the
invariance position by position and forgets the sign tracks it is not shown. With that head
kept as delivered, the stamps cost nothing there, and a higher rate lets the convolutions,
the only part still learning, unlearn the backdoor. A model that pools globally kept
unlearning in a second ten epochs at no cost in accuracy, so it gets twenty. With the trigger
scan's proxy on part of each batch the proxy does the unlearning, and the frozen head's higher
rate only cost accuracy (README, "The proxy's accuracy cost"): 1e-3 then. What accuracy those
runs still lost was the luck of one fine-tune: with the head frozen, fine-pruning averages three
and steps a quarter past their average (README, "Averaging fine-tunes"). A model that pools
globally keeps its last epoch: the validation pick's earlier epochs were its accuracy misses.
It also takes sharpness-aware steps at a small radius: on held-out small ResNets the plain steps
lost accuracy that these kept (README, "Sharpness-aware steps for the pooled recipe").
"""

from __future__ import annotations

from dataclasses import dataclass

import keras

from fineprune.graph import leaf_layers
from schemas.options import SHARPNESS_DEFENSES, SanitizeOptions

AUTOMATIC_EPOCHS = 10
POOLED_EPOCHS = 20
AUTOMATIC_RATE = 1e-3
FROZEN_HEAD_RATE = 2.5e-3
AUTOMATIC_SHARE = 0.5
PROXY_SHARE = 0.25
AVERAGED_RUNS = 3
AVERAGED_EXTRAPOLATION = 1.25
SAM_RADIUS = 2.0  # FT-SAM's (Zhu et al., ICCV 2023)
POOLED_SHARPNESS = 0.2
_GLOBAL_POOLING = (
    keras.layers.GlobalAveragePooling1D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalAveragePooling3D,
    keras.layers.GlobalMaxPooling1D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.GlobalMaxPooling3D,
)


def pools_globally(model: keras.Model) -> bool:
    return any(isinstance(layer, _GLOBAL_POOLING) for layer in leaf_layers(model))


@dataclass(frozen=True)
class Recipe:
    """The fine-tuning choices `auto` leaves open, resolved for one model."""

    epochs: int
    learning_rate: float
    synthetic_triggers: float
    frozen_layers: tuple[str, ...]
    proxy_triggers: float = 0.0
    averaged_runs: int = 1
    extrapolation: float = 1.0
    epoch_choice: str = "lowest-loss"
    sharpness_radius: float = 0.0


def resolve_recipe(options: SanitizeOptions, model: keras.Model, head: list[str]) -> Recipe:
    """`options` with every `auto` made concrete for `model`.

    `head`: the layers after the pruned one (empty when nothing is pruned); frozen when asked,
    or under `auto` for plain fine-pruning of a model that does not pool globally. Only plain
    fine-pruning was measured that way: SAM at the higher rate lost a tiny test model's
    accuracy (100 % -> 50-81 %), so the other defenses keep their head and rate unless asked.
    """
    pools = pools_globally(model)
    plain_fine_pruning = options.defense == "fine-pruning"
    freeze = options.freeze_head
    if freeze == "auto":
        freeze = bool(head) and not pools and plain_fine_pruning
    frozen = tuple(head) if freeze else ()
    share = options.synthetic_triggers
    if share == "auto":
        share = AUTOMATIC_SHARE if pools or frozen else 0.0
    proxy = options.proxy_triggers
    if proxy == "auto":
        classes = int(model.outputs[0].shape[-1])
        proxy = PROXY_SHARE if plain_fine_pruning and classes > 1 else 0.0
    rate = options.learning_rate
    if rate == "auto":
        # The higher frozen-head rate was there to unlearn; the proxy unlearns at 1e-3.
        rate = FROZEN_HEAD_RATE if frozen and not proxy else AUTOMATIC_RATE
    epochs = options.epochs
    if epochs == "auto":
        epochs = POOLED_EPOCHS if pools and plain_fine_pruning else AUTOMATIC_EPOCHS
    # Measured with the head frozen: a model that pools globally and trains whole gained
    # nothing from three runs, and the step past their average cost it (README).
    runs = options.averaged_runs
    if runs == "auto":
        runs = AVERAGED_RUNS if plain_fine_pruning and frozen else 1
    step = options.extrapolation
    if step == "auto":
        step = AVERAGED_EXTRAPOLATION if runs > 1 and frozen else 1.0
    # The pooled recipe's twenty cosine epochs end where the rate is zero, and its validation
    # slice (frames of the tuning images' own tracks) reads 100 % for most of them: an earlier
    # pick was the ResNet's accuracy misses (README, "Splitting by track").
    choice = options.epoch_choice
    if choice == "auto":
        choice = "last" if pools and plain_fine_pruning and not frozen else "lowest-loss"
    radius = options.sharpness_radius
    sam_defense = options.defense in SHARPNESS_DEFENSES
    if radius == "auto":
        pooled_recipe = pools and plain_fine_pruning and not frozen
        radius = SAM_RADIUS if sam_defense else POOLED_SHARPNESS if pooled_recipe else 0.0
    elif not (sam_defense or plain_fine_pruning):
        radius = 0.0  # the other defenses change the loss or the update their own way
    return Recipe(
        sharpness_radius=radius,
        epoch_choice=choice,
        averaged_runs=runs,
        extrapolation=step,
        epochs=epochs,
        learning_rate=rate,
        synthetic_triggers=share,
        frozen_layers=frozen,
        proxy_triggers=proxy,
    )
