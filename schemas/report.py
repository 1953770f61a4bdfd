"""The sanitize report: what was done to a model and what it cost, versioned for machines."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.options import SanitizeOptions

REPORT_SCHEMA_VERSION = "2"

SplitName = Literal["tune", "validation", "holdout", "test", "trigger"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Measurement(_Strict):
    """A rate measured on a named split, so nobody mistakes tuning accuracy for test accuracy."""

    value: float = Field(description="Fraction in [0, 1].")
    split: SplitName
    samples: int
    low: float | None = Field(None, description="95 % Wilson interval's lower end.")
    high: float | None = Field(None, description="95 % Wilson interval's upper end.")


class StageMetrics(_Strict):
    clean_accuracy: Measurement
    attack_success_rate: Measurement | None = None


class ModelFile(_Strict):
    sha256: str
    format: Literal["keras", "h5"]
    bytes: int
    parameters: int


class DataFile(_Strict):
    sha256: str
    samples: int
    role: Literal["clean", "test", "trigger"]


class SplitSizes(_Strict):
    tune: int = Field(description="Used to profile, choose k and fine-tune.")
    validation: int = Field(description="Carved from tune, used only to pick the epoch.")
    evaluation: int = Field(description="Never trained on; every reported accuracy comes from it.")
    evaluation_split: Literal["holdout", "test"]
    trigger: int = 0
    groups: int = Field(
        0,
        description="Groups named in the clean data's `groups` (in tune), each kept whole on "
        "one side of the tune / holdout split (the validation slice is carved image by image); "
        "0: the clean data named none.",
    )
    near_copies: float | None = Field(
        None,
        description="Share of the evaluation samples (up to 512 checked) whose nearest tune "
        "sample correlates with it at 0.9 or more, value by value: near-copies (frames of one "
        "object) make the evaluation read higher than new data would. None: samples too small "
        "to tell.",
    )


class CurvePoint(_Strict):
    pruned: int = Field(description="Channels pruned (k).")
    fraction: float
    tune_accuracy: float
    evaluation_accuracy: float
    attack_success_rate: float | None = None


class PruneDecision(_Strict):
    rule: Literal["max_accuracy_drop", "prune_fraction", "none"]
    pruned: int
    reason: str


class SurgeryReport(_Strict):
    layer: str
    channels_before: int
    channels_after: int
    removed_channels: list[int] = Field(description="Indices in the original layer.")
    mode: Literal["removed", "zeroed", "none"]
    mode_reason: str
    adjusted_layers: list[str]
    mean_activations: list[float] = Field(description="Per channel, on the tune split.")
    profiled_at: str = Field(description="Layer whose output was profiled.")


class EpochRecord(_Strict):
    epoch: int
    loss: float
    accuracy: float
    val_loss: float
    val_accuracy: float
    attack_success_rate: float | None = None
    head_alignment: float | None = Field(
        None,
        description="Feature-shift tuning only: cosine similarity of the classifier's kernel "
        "with the one it replaced (1: unchanged, 0: orthogonal).",
    )


class TriggerScan(_Strict):
    """What the trigger-free scan of the delivered model found (proxy_triggers)."""

    radius: float = Field(description="Perturbation radius, relative to the images' L2 norm.")
    success: list[float] = Field(
        description="Per class: share of the other classes' images one perturbation sends there."
    )
    anomaly: list[float] = Field(description="Per class: robust z-score of its success.")
    suspect: int | None = Field(
        None, description="The class that stands out (anomaly above 2), if one does."
    )
    share: float = Field(description="Share of each batch shifted by the suspect's perturbation.")
    seconds: float = Field(0.0, description="What the scan took.")


class FineTuneRun(_Strict):
    """One of the fine-tunes whose weights were averaged (averaged_runs)."""

    seed: int = Field(description="The run's shuffling and stamping seed.")
    epochs_run: int
    best_epoch: int = Field(description="The epoch this run kept (1-based).")
    validation_accuracy: float = Field(description="At the kept epoch, on the validation slice.")
    attack_success_rate: float | None = Field(
        None, description="At the kept epoch, on the trigger data (when given)."
    )
    history: list[EpochRecord] = Field(default_factory=list, description="Every epoch of this run.")


class FineTuneReport(_Strict):
    method: Literal["plain", "sharpness-aware", "feature-shift", "adversarial-unlearning"] = "plain"
    reinitialized_layer: str | None = Field(
        None, description="The classifier head feature-shift tuning started from scratch."
    )
    fallback_reason: str | None = Field(
        None,
        description="Set when feature-shift tuning failed the validation check and this "
        "plain fine-tuning replaced it.",
    )
    learning_rate: float = Field(
        0.0, description="The rate fine-tuning started from ('auto' resolved)."
    )
    synthetic_triggers: float = Field(
        0.0, description="Share of each batch stamped with synthetic triggers ('auto' resolved)."
    )
    sharpness_radius: float = Field(
        0.0, description="Radius of the sharpness-aware steps ('auto' resolved); 0: plain steps."
    )
    unlearning_radius: float = Field(
        0.0,
        description="Adversarial unlearning only: the perturbations' L2 radius, relative to "
        "the clean inputs' mean norm.",
    )
    distillation: float = Field(
        0.0, description="Weight of the delivered model's teaching on mixed clean images; 0: none."
    )
    frozen_layers: list[str] = Field(
        default_factory=list,
        description="Layers kept as delivered while fine-tuning (the head, with freeze_head).",
    )
    trigger_scan: TriggerScan | None = None
    epochs_run: int
    best_epoch: int = Field(description="The epoch kept (1-based); 0 only when none ran.")
    history: list[EpochRecord]
    selected_on: Literal["validation", "last"] = Field(
        "validation",
        description="How the kept epoch was chosen: best on the validation slice, or the last.",
    )
    averaged_runs: list[FineTuneRun] = Field(
        default_factory=list,
        description="When more than one fine-tune was averaged: every run, the first being the "
        "one `history` and `best_epoch` describe. The sanitized model is their average; its "
        "accuracy is `fine_pruned`'s.",
    )
    averaged_validation_accuracy: float | None = Field(
        None,
        description="The sanitized weights' accuracy on the validation slice (averaged runs "
        "only): the average, stepped by `extrapolation`.",
    )
    extrapolation: float = Field(
        1.0,
        description="The sanitized weights are the pruned model's plus this many times the "
        "change the runs made on average ('auto' resolved; 1: the average itself).",
    )


class DetectorReading(_Strict):
    """What the backdoor detector read on one model."""

    method: str = Field(description="The detector: universal-perturbation (the trigger scan).")
    suspect: int | None = Field(description="The class whose signature stands out; None: none.")
    score: float = Field(description="The top class's anomaly (robust deviations).")
    threshold: float = Field(description="The anomaly above which a class is suspected.")
    seconds: float = 0.0


class Verdict(_Strict):
    """What a pipeline acts on; the report's first line."""

    conclusion: Literal["no-signature", "removed", "may-remain"] = Field(
        description="no-signature: nothing suspected in the delivered model (not a proof of "
        "health); removed: suspected and shown gone (by trigger data, or by a re-check the "
        "victim zoo vouches for); may-remain: anything else."
    )
    reason: str
    measured: bool = Field(description="Whether measured attack success on trigger data decided.")
    before: DetectorReading = Field(description="The detector on the delivered model.")
    after: DetectorReading | None = Field(
        None, description="The detector on the sanitized model (None: nothing was changed)."
    )


class SanitizeReport(_Strict):
    schema_version: Literal["2"] = REPORT_SCHEMA_VERSION
    created_at: datetime
    verdict: Verdict | None = Field(
        None, description="Whether a backdoor was suspected and shown gone (schema 2 onwards)."
    )
    input_model: ModelFile
    output_model: ModelFile
    data: list[DataFile]
    options: SanitizeOptions
    research: dict[str, Any] = Field(
        default_factory=dict,
        description="Experiment settings that differ from the product's (set by the project's "
        "own study only; empty for every job).",
    )
    splits: SplitSizes
    surgery: SurgeryReport | None
    curve: list[CurvePoint]
    decision: PruneDecision
    baseline: StageMetrics
    pruned: StageMetrics
    fine_pruned: StageMetrics
    fine_tuning: FineTuneReport | None
    timings: dict[str, float] = Field(description="Seconds per stage.")
    versions: dict[str, str]
    seed: int
    warnings: list[str] = []

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data: Any) -> Any:
        """Reports of schema 1 kept every setting in `options`: the ones that are no longer
        options move to `research`, the removed ones and their records are dropped."""
        if not isinstance(data, dict) or data.get("schema_version") != "1":
            return data
        return _upgrade_v1(data)


# Report schema 1 named each defense the study compares by one name; since, a defense is the
# engine's `defense` plus a research `method`. The study and the tests use the same names.
V1_DEFENSES: dict[str, tuple[str, str]] = {
    "fine-pruning-sam": ("fine-pruning", "sharpness-aware"),
    "ft-sam": ("fine-tuning", "sharpness-aware"),
    "fine-pruning-fst": ("fine-pruning", "feature-shift"),
    "fst": ("fine-tuning", "feature-shift"),
    "fine-pruning-bau": ("fine-pruning", "adversarial-unlearning"),
    "bau": ("fine-tuning", "adversarial-unlearning"),
}
_V1_REMOVED = {
    "proxy_scale",
    "proxy_directions",
    "proxy_refresh",
    "proxy_augment",
    "relative_learning_rate",
}
_V1_DEFAULTS: dict[str, Any] = {
    "validation_fraction": 0.15,
    "lr_schedule": "cosine",
    "optimizer": "adam",
    "augment": False,
    "patience": 10,
    "freeze_batchnorm": True,
    "shift_strength": 1.0,
    "unlearning_radius": 0.2,
    "fst_fallback": True,
}


def _upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    data = {**data, "schema_version": "2"}
    options = dict(data.get("options") or {})
    research: dict[str, Any] = {}
    defense, method = V1_DEFENSES.get(options.get("defense", ""), (None, None))
    if defense is not None:
        options["defense"], research["method"] = defense, method
    for name in list(options):
        if name in SanitizeOptions.model_fields:
            continue
        value = options.pop(name)
        if name not in _V1_REMOVED and value not in ("auto", _V1_DEFAULTS.get(name, "auto")):
            research[name] = value
    data["options"], data["research"] = options, research
    tuning = data.get("fine_tuning")
    if isinstance(tuning, dict):
        tuning = {**tuning}
        for record in tuning.get("history") or []:
            record.pop("proxy_success", None)
        if isinstance(tuning.get("trigger_scan"), dict):
            tuning["trigger_scan"] = {
                k: v for k, v in tuning["trigger_scan"].items() if k != "alternates"
            }
        data["fine_tuning"] = tuning
    return data
