"""The fine-tuning recipe: every choice made concrete for one model before training starts.

Two inputs decide it. `SanitizeOptions` holds what a user sets (epochs, rate, batch size,
seed). `Research` holds what only the project's experiments vary: they set it directly
(`study/`); it is neither an API nor a CLI option, and its defaults are the product's.
Each `auto` is read off the model's shape; docs/defaults.md gives every rule with its evidence.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import keras
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from fineprune.prune.graph import leaf_layers
from schemas.options import SanitizeOptions

Method = Literal["plain", "sharpness-aware", "feature-shift", "adversarial-unlearning"]
EpochChoice = Literal["latest-best", "lowest-loss", "last"]
Auto = Literal["auto"]

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


# Ranges of the research settings that may also be "auto" (a bound on a union reads badly).
_RANGES = {
    "synthetic_triggers": (0.0, 1.0),
    "proxy_triggers": (0.0, 1.0),
    "sharpness_radius": (0.0, 10.0),
    "distillation": (0.0, 100.0),
    "averaged_runs": (1, 16),
    "extrapolation": (1e-9, 4.0),
}


class Research(BaseModel):
    """Settings the experiments vary; the defaults are the product's recipe."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    method: Method = "plain"
    validation_fraction: float = Field(0.15, gt=0.0, lt=0.5)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    optimizer: Literal["adam", "sgd"] = "adam"
    augment: bool = False
    patience: int = Field(10, ge=1)
    freeze_batchnorm: bool = True
    freeze_head: bool | Auto = "auto"
    synthetic_triggers: float | Auto = "auto"
    proxy_triggers: float | Auto = "auto"
    epoch_choice: EpochChoice | Auto = "auto"
    sharpness_radius: float | Auto = "auto"
    shift_strength: float = Field(1.0, gt=0.0)
    unlearning_radius: float = Field(0.2, gt=0.0)
    distillation: float | Auto = "auto"
    anchor: float = Field(0.0, ge=0.0)  # L2-SP: weight of the pull back to the starting weights
    fst_fallback: bool = True
    averaged_runs: int | Auto = "auto"
    extrapolation: float | Auto = "auto"

    @field_validator(*_RANGES)
    @classmethod
    def _in_range(cls, value: float | str, info: ValidationInfo) -> float | str:
        low, high = _RANGES[info.field_name]
        if value != "auto" and not low <= value <= high:
            raise ValueError(f"{info.field_name} must be 'auto' or in [{low:g}, {high:g}]")
        return value

    def changed(self) -> dict[str, object]:
        """The settings that differ from the product's: what a report records of them."""
        return self.model_dump(exclude_defaults=True)


@dataclass(frozen=True)
class Recipe:
    """Fine-tuning with nothing left open: what the loop runs and the report describes."""

    epochs: int
    learning_rate: float
    batch_size: int
    seed: int
    method: Method = "plain"
    optimizer: str = "adam"
    lr_schedule: str = "cosine"
    augment: bool = False
    patience: int = 10
    freeze_batchnorm: bool = True
    epoch_choice: EpochChoice = "lowest-loss"
    synthetic_triggers: float = 0.0  # share of each batch stamped with a random patch or blend
    frozen_layers: tuple[str, ...] = ()  # kept as delivered: the classifier head, when frozen
    proxy_share: float = 0.0  # share of each batch shifted by the scan's proxy trigger
    sharpness_radius: float = 0.0  # >0: adaptive SAM steps of this relative radius
    shift_strength: float = 0.0  # >0: feature-shift tuning with this penalty
    unlearning_radius: float = 0.0  # >0: adversarial unlearning, radius relative to input norm
    distillation: float = 0.0  # weight of the delivered model's teaching
    anchor: float = 0.0  # L2-SP: weight of the squared distance to the starting weights
    fst_fallback: bool = False  # feature shift only: a plain fine-tune replaces a failed one
    averaged_runs: int = 1
    extrapolation: float = 1.0

    def without_feature_shift(self, epoch_choice: EpochChoice = "lowest-loss") -> Recipe:
        """The plain fine-tune that replaces a feature-shift run that lost accuracy."""
        return replace(
            self,
            method="plain",
            shift_strength=0.0,
            distillation=0.0,
            fst_fallback=False,
            epoch_choice=epoch_choice,
        )


def pools_globally(model: keras.Model) -> bool:
    return any(isinstance(layer, _GLOBAL_POOLING) for layer in leaf_layers(model))


def resolve_recipe(
    options: SanitizeOptions,
    research: Research,
    model: keras.Model,
    head: list[str],
    proxy_found: bool = True,
) -> Recipe:
    """Every `auto` made concrete for `model` (the one to be tuned).

    `head`: the layers after the pruned one (empty when nothing is pruned). `proxy_found`:
    False once the trigger scan found nothing to unlearn, so that the rules that depend on
    a proxy take their other branch.
    """
    pools = pools_globally(model)
    method = research.method
    fine_pruning = options.defense == "fine-pruning" and method == "plain"
    freeze = research.freeze_head
    if freeze == "auto":
        freeze = bool(head) and not pools and fine_pruning
    elif freeze and not (options.prunes and head):
        raise ValueError("freeze_head needs a defense that prunes and fine-tunes")
    frozen = tuple(head) if freeze else ()
    share = research.synthetic_triggers
    if share == "auto":
        share = AUTOMATIC_SHARE if pools or frozen else 0.0
    proxy = research.proxy_triggers
    if proxy == "auto":
        classes = int(model.outputs[0].shape[-1])
        proxy = PROXY_SHARE if fine_pruning and classes > 1 else 0.0
    if not proxy_found:
        proxy = 0.0
    rate = options.learning_rate
    if rate == "auto":
        # The higher frozen-head rate was there to unlearn; the proxy unlearns at 1e-3.
        rate = FROZEN_HEAD_RATE if frozen and not proxy else AUTOMATIC_RATE
    epochs = options.epochs
    if epochs == "auto":
        epochs = POOLED_EPOCHS if pools and fine_pruning else AUTOMATIC_EPOCHS
    runs = research.averaged_runs
    if runs == "auto":
        runs = AVERAGED_RUNS if fine_pruning and frozen else 1
    step = research.extrapolation
    if step == "auto":
        step = AVERAGED_EXTRAPOLATION if runs > 1 and frozen else 1.0
    feature_shift = method == "feature-shift"
    if feature_shift and (frozen or runs != 1 or step != 1.0):
        raise ValueError("feature-shift tuning re-initializes the head: no frozen head, one run")
    choice = research.epoch_choice
    if choice == "auto":
        choice = "last" if pools and fine_pruning and not frozen else "lowest-loss"
    radius = research.sharpness_radius
    sharpness = method == "sharpness-aware"
    if radius == "auto":
        pooled_recipe = pools and fine_pruning and not frozen
        radius = SAM_RADIUS if sharpness else POOLED_SHARPNESS if pooled_recipe else 0.0
    elif not (sharpness or fine_pruning):
        radius = 0.0  # the other methods change the loss or the update their own way
    if sharpness and not radius:
        raise ValueError("sharpness-aware fine-tuning needs a sharpness_radius above 0")
    teaches = research.distillation
    if teaches == "auto":
        teaches = 1.0 if method in ("feature-shift", "adversarial-unlearning") else 0.0
    return Recipe(
        epochs=epochs,
        learning_rate=rate,
        batch_size=options.batch_size,
        seed=options.seed,
        method="sharpness-aware" if radius and method == "plain" else method,
        optimizer=research.optimizer,
        lr_schedule=research.lr_schedule,
        augment=research.augment,
        patience=research.patience,
        freeze_batchnorm=research.freeze_batchnorm,
        epoch_choice="last" if feature_shift else choice,
        synthetic_triggers=share,
        frozen_layers=frozen,
        proxy_share=proxy,
        sharpness_radius=radius,
        shift_strength=research.shift_strength if feature_shift else 0.0,
        unlearning_radius=research.unlearning_radius if method == "adversarial-unlearning" else 0.0,
        distillation=float(teaches),
        anchor=research.anchor if method == "plain" else 0.0,
        fst_fallback=feature_shift and research.fst_fallback,
        averaged_runs=runs,
        extrapolation=step,
    )
