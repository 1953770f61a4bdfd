"""The sanitize options a user sets: one contract for the CLI, the API and the workers.

Each field is declared here once; the CLI's flags and the API's `options` object are made from
it. Settings that only the project's experiments vary are not options (`fineprune.tune.recipe`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Defense = Literal["fine-pruning", "pruning", "fine-tuning", "none"]


class SanitizeOptions(BaseModel):
    """How to sanitize one model. The defaults are the product's recommended settings."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    defense: Defense = Field(
        "fine-pruning",
        description="fine-pruning (prune the least active channels, then fine-tune), or one "
        "half of it: pruning alone or fine-tuning alone; none: change nothing, only look for "
        "a backdoor's signature (the verdict alone).",
        json_schema_extra={"advanced": True},
    )
    layer: str | None = Field(
        None,
        description="The layer whose channels are pruned; default: the last convolution.",
        examples=["conv2d_2"],
        json_schema_extra={"metavar": "NAME"},
    )
    max_accuracy_drop: float = Field(
        4.0,
        ge=0.0,
        le=100.0,
        description="Prune the most channels whose clean accuracy stays within this many "
        "percentage points of the unpruned model's.",
        json_schema_extra={"metavar": "POINTS"},
    )
    prune_fraction: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Prune exactly this fraction of the layer's channels instead.",
        json_schema_extra={"advanced": True, "metavar": "FRACTION"},
    )
    rescale: float | None = Field(
        None,
        gt=0.0,
        description="Multiply every input by this factor first (1/255 for uint8 images).",
        examples=[0.00392156862745098],
        json_schema_extra={"metavar": "FACTOR"},
    )
    holdout_fraction: float = Field(
        0.25,
        gt=0.0,
        lt=0.9,
        description="Share of the clean data held out to report accuracy on (whole groups "
        "when the data names them); unused with separate test data.",
        json_schema_extra={"advanced": True, "metavar": "FRACTION"},
    )
    epochs: int | Literal["auto"] = Field(
        "auto",
        description="Fine-tuning epochs; auto: chosen for the model (docs/defaults.md).",
        json_schema_extra={"advanced": True, "metavar": "N|auto"},
    )
    learning_rate: float | Literal["auto"] = Field(
        "auto",
        description="Fine-tuning learning rate; auto: chosen for the model (docs/defaults.md).",
        json_schema_extra={"advanced": True, "metavar": "RATE|auto"},
    )
    batch_size: int = Field(
        32,
        ge=1,
        le=4096,
        description="Fine-tuning batch size.",
        json_schema_extra={"advanced": True, "metavar": "N"},
    )
    seed: int = Field(
        0,
        ge=0,
        le=2**32 - 1,
        description="Seed for splits, shuffling and stamps.",
        json_schema_extra={"advanced": True, "metavar": "N"},
    )

    # Range checks of the options that may also be "auto": field validators, so that an
    # error names its field (the API's 422 points at options.epochs, not at options).
    @field_validator("epochs")
    @classmethod
    def _epochs_range(cls, value: int | str) -> int | str:
        if value != "auto" and not 0 <= value <= 1000:
            raise ValueError("epochs must be 'auto' or a count in [0, 1000]")
        return value

    @field_validator("learning_rate")
    @classmethod
    def _rate_range(cls, value: float | str) -> float | str:
        if value != "auto" and not 0.0 < value <= 1.0:
            raise ValueError("learning_rate must be 'auto' or a rate in (0, 1]")
        return value

    @model_validator(mode="after")
    def _defense_needs(self) -> SanitizeOptions:
        if not self.prunes and self.prune_fraction not in (None, 0.0):
            raise ValueError(f"prune_fraction makes no sense with defense {self.defense!r}")
        return self

    @property
    def prunes(self) -> bool:
        return self.defense in ("fine-pruning", "pruning")

    @property
    def fine_tunes(self) -> bool:
        return self.defense in ("fine-pruning", "fine-tuning") and self.epochs != 0

    @property
    def changes_the_model(self) -> bool:
        return self.prunes or self.fine_tunes
