"""The two rates every stage is measured by, each on a named split with its sample count and
a 95 % Wilson interval (97 % read on 375 images: 94.7-98.3 %; on 100: 91.5-99.0 %)."""

from __future__ import annotations

import math

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
        attack = measurement(asr, "trigger", len(splits.trigger))
    return StageMetrics(
        clean_accuracy=measurement(accuracy, splits.evaluation_name, len(splits.evaluation)),
        attack_success_rate=attack,
    )


def measurement(value: float, split: str, samples: int) -> Measurement:
    low, high = wilson(value, samples)
    return Measurement(value=value, split=split, samples=samples, low=low, high=high)


def wilson(rate: float, samples: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95 % Wilson score interval of a rate measured on `samples` (Wilson 1927): honest at
    0 % and 100 %, where the normal approximation claims an interval of width zero."""
    if samples <= 0 or not math.isfinite(rate):
        return 0.0, 1.0
    denominator = 1 + z * z / samples
    centre = (rate + z * z / (2 * samples)) / denominator
    half = z * math.sqrt(rate * (1 - rate) / samples + z * z / (4 * samples**2)) / denominator
    return round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)
