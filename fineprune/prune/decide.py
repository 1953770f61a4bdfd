"""Profile, sweep and choose: the tradeoff curve over k, and the k the options ask for.

Every split the report measures (tune, evaluation, trigger) goes through the sweep in one
stacked pass; k = 0 of the curve is the unpruned model, so its accuracy needs no second pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np

from fineprune.data.splits import Splits
from fineprune.load.model import predict
from fineprune.prune.channels import ChannelPath, trace_channels
from fineprune.prune.graph import ModelGraph
from fineprune.prune.surgery import CutResult
from fineprune.prune.sweep import ChannelSweeper, Profile, Sweep, masked_predict
from schemas.options import SanitizeOptions
from schemas.report import CurvePoint, PruneDecision

SURGERY_TOLERANCE = 1e-4


@dataclass
class Pruning:
    """What profiling found and chose: the traced layer, the curve, k and the channels."""

    path: ChannelPath
    profile: Profile
    rows: dict[str, np.ndarray]  # where each split sits in the stacked samples
    curve: list[CurvePoint]
    decision: PruneDecision
    channels: np.ndarray  # the pruned channels, sorted

    @property
    def mean_activations(self) -> list[float]:
        return [float(v) for v in self.profile.mean_over(self.rows["tune"])]


def profile_and_choose(
    model: keras.Model,
    splits: Splits,
    options: SanitizeOptions,
    progress: Callable[[float], None],
) -> Pruning:
    """Trace the layer, sweep every k once, and choose k by the options' rule."""
    path = trace_channels(ModelGraph(model), options.layer)
    samples, rows = _stack(splits)
    profile, sweep = ChannelSweeper(path).profile_and_sweep(samples, rows["tune"], progress)
    curve = _curve(sweep, rows, splits, path.channels)
    decision = _decide(curve, path, options)
    return Pruning(path, profile, rows, curve, decision, np.sort(sweep.order[: decision.pruned]))


def check_cut(pruning: Pruning, result: CutResult, x: np.ndarray) -> str | None:
    """The cut model must compute what the curve measured (the masked original), or a warning."""
    expected = masked_predict(pruning.path, x, pruning.channels)
    got = predict(result.model, x)
    gap = float(np.max(np.abs(expected - got))) if len(x) else 0.0
    if gap > SURGERY_TOLERANCE:
        return f"cut model differs from the masked model by up to {gap:.2e} on held-out inputs"
    return None


def _stack(splits: Splits) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """All samples the sweep evaluates, in one array, and where each split sits in it."""
    parts = [splits.tune.x, splits.evaluation.x]
    if splits.trigger is not None:
        parts.append(splits.trigger.x)
    bounds = np.cumsum([0, *[len(p) for p in parts]])
    names = ["tune", "evaluation", "trigger"][: len(parts)]
    rows = {n: np.arange(bounds[i], bounds[i + 1]) for i, n in enumerate(names)}
    return np.concatenate(parts), rows


def _curve(
    sweep: Sweep, rows: dict[str, np.ndarray], splits: Splits, channels: int
) -> list[CurvePoint]:
    tune = sweep.accuracy(rows["tune"], splits.tune.y)
    evaluation = sweep.accuracy(rows["evaluation"], splits.evaluation.y)
    asr = sweep.accuracy(rows["trigger"], splits.trigger.y) if splits.trigger else None
    return [
        CurvePoint(
            pruned=k,
            fraction=k / channels,
            tune_accuracy=float(tune[k]),
            evaluation_accuracy=float(evaluation[k]),
            attack_success_rate=None if asr is None else float(asr[k]),
        )
        for k in range(channels + 1)
    ]


def _decide(curve: list[CurvePoint], path: ChannelPath, options: SanitizeOptions) -> PruneDecision:
    limit = path.channels - 1 if path.removable else path.channels
    if options.prune_fraction is not None:
        k = min(round(options.prune_fraction * path.channels), limit)
        return PruneDecision(
            rule="prune_fraction",
            pruned=k,
            reason=f"prune_fraction {options.prune_fraction:g} of {path.channels} channels "
            f"gives k = {k}",
        )
    base = curve[0].tune_accuracy
    floor = base - options.max_accuracy_drop / 100.0
    within = [p.pruned for p in curve if p.tune_accuracy >= floor - 1e-12 and p.pruned <= limit]
    k = max(within)
    return PruneDecision(
        rule="max_accuracy_drop",
        pruned=k,
        reason=f"largest k whose tune accuracy ({curve[k].tune_accuracy:.2%}) stays within "
        f"{options.max_accuracy_drop:g} points of the unpruned {base:.2%}",
    )
