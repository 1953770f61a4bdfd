"""The fine-tune stage: the recipe's runs from the cut, averaged, and feature shift's fallback.

The delivered model teaches where the recipe distills; it is trained in place only when
nothing was cut, so then the teacher is a copy. A feature-shift run whose validation accuracy
ends more than the accuracy budget below the delivered model's is replaced by a plain fine-tune
from the same start: FST's failure is visible (clean accuracy), a backdoor's is not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import keras
import numpy as np

from fineprune.data.splits import Splits
from fineprune.errors import CancelledError
from fineprune.load.model import OutputKind, rate
from fineprune.prune.surgery import copy_model
from fineprune.tune.averaging import fine_tune_averaged
from fineprune.tune.loop import FineTuneResult, ZeroMask, fine_tune
from fineprune.tune.recipe import Recipe


@dataclass
class Tuning:
    """Every fine-tune the stage ran, the first (or the fallback) being the one it reports."""

    result: FineTuneResult
    runs: list[FineTuneResult] = field(default_factory=list)  # when several were averaged
    averaged_validation_accuracy: float | None = None
    fallback_reason: str | None = None


def tune_stage(
    delivered: keras.Model,
    pruned: keras.Model,
    splits: Splits,
    recipe: Recipe,
    kind: OutputKind,
    proxy: np.ndarray | None,
    zero_masks: list[ZeroMask],
    max_accuracy_drop: float,
    progress: Callable[[float], None],
    should_cancel: Callable[[], bool],
) -> tuple[keras.Model, Tuning]:
    """Fine-tune `pruned` by `recipe`; the model it returns is the sanitized one."""
    teacher = None
    if recipe.distillation:
        teacher = copy_model(delivered) if pruned is delivered else delivered
    untuned, delivered_accuracy = None, 0.0
    if recipe.fst_fallback:
        untuned = copy_model(pruned)
        delivered_accuracy = rate(delivered, splits.validation.x, splits.validation.y)
    total = recipe.averaged_runs * recipe.epochs

    def once(target: keras.Model, recipe: Recipe, index: int = 0) -> FineTuneResult:
        done = index * recipe.epochs
        tuned = fine_tune(
            target,
            splits.train,
            splits.validation,
            recipe,
            kind,
            proxy=proxy,
            zero_masks=zero_masks,
            trigger=splits.trigger,
            on_epoch=lambda record: progress((done + record["epoch"]) / max(total, 1)),
            should_stop=should_cancel,
            teacher=teacher,
        )
        if should_cancel():
            raise CancelledError("cancelled during fine-tuning")
        return tuned

    runs = fine_tune_averaged(
        pruned,
        recipe.averaged_runs,
        recipe.seed,
        lambda target, index, seed: once(target, replace(recipe, seed=seed), index),
        recipe.extrapolation,
    )
    tuning = Tuning(runs[0])
    reason = _feature_shift_failed(delivered_accuracy, tuning.result, max_accuracy_drop)
    if untuned is not None and reason is not None:
        pruned = untuned
        tuning = Tuning(once(pruned, recipe.without_feature_shift()), fallback_reason=reason)
    elif len(runs) > 1:
        tuning.runs = runs
        tuning.averaged_validation_accuracy = rate(pruned, splits.validation.x, splits.validation.y)
    return pruned, tuning


def _feature_shift_failed(before: float, tuning: FineTuneResult, budget: float) -> str | None:
    """Why a feature-shift result is not acceptable, judged on the validation slice."""
    if not (tuning.recipe.fst_fallback and tuning.history):
        return None
    after = tuning.history[-1]["val_accuracy"]
    if 100 * (before - after) <= budget:
        return None
    return (
        f"feature-shift tuning ended at {100 * after:.1f} % validation accuracy, "
        f"{100 * (before - after):.1f} points below the delivered model's {100 * before:.1f} % "
        f"(more than max_accuracy_drop, {budget:g}); fine-tuned again without feature shift"
    )
