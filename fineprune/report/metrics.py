"""The two rates every stage is measured by, each on a named split with its sample count."""

from __future__ import annotations

import keras

from fineprune.data.splits import Splits
from fineprune.load.model import rate
from schemas.report import Measurement, StageMetrics


def measure(model: keras.Model, splits: Splits) -> StageMetrics:
    """Clean accuracy on the evaluation split, and attack success on the trigger data if any."""
    asr = None
    if splits.trigger is not None:
        asr = rate(model, splits.trigger.x, splits.trigger.y)
    return stage_metrics(rate(model, splits.evaluation.x, splits.evaluation.y), asr, splits)


def stage_metrics(accuracy: float, asr: float | None, splits: Splits) -> StageMetrics:
    """Rates measured elsewhere (the sweep's k = 0), named by the splits they came from."""
    attack = None
    if splits.trigger is not None and asr is not None:
        attack = Measurement(value=asr, split="trigger", samples=len(splits.trigger))
    return StageMetrics(
        clean_accuracy=Measurement(
            value=accuracy, split=splits.evaluation_name, samples=len(splits.evaluation)
        ),
        attack_success_rate=attack,
    )
