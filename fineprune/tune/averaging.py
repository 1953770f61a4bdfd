"""Averaging several fine-tunes of one pruned model, then stepping past the average.

Fine-tuning a pruned model on ~1,000 clean images lands somewhere different with every shuffle:
one seed CNN cut, fine-tuned four times with the product's recipe, read 94.2-96.8 % on the
GTSRB test signs while every run read 98-100 % on the validation slice, so no pick by
validation finds the good run (README, "Averaging fine-tunes"). Fine-tunes of one start share
a basin (Wortsman et al., ICML 2022), and the average of their weights keeps what they agree on:
it read as well as the best of them. But the average also undoes part of each run's own way
of breaking the backdoor (a blended one came back from 0.4-1.2 % to 1.7-2.4 %), so the
sanitized weights step past it, along the change the runs agree on: pruned + t (average -
pruned), t = `extrapolation` (model extrapolation, as in Zheng et al. 2024's ExPO).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import numpy as np

from fineprune.prune.surgery import copy_model
from fineprune.tune.loop import FineTuneResult

Weights = list[np.ndarray]
RUN_SEED_STRIDE = 1000  # run i is seeded seed + 1000 i: apart from any seed a user picks nearby
TuneOnce = Callable[[keras.Model, int, int], FineTuneResult]  # (model, run index, seed)


def average_weights(runs: Sequence[Weights]) -> Weights:
    """The element-wise mean of weight lists from models of one architecture."""
    if not runs:
        raise ValueError("nothing to average: no weights given")
    shapes = [tuple(w.shape for w in weights) for weights in runs]
    if any(s != shapes[0] for s in shapes[1:]):
        raise ValueError("weights to average must come from models of one architecture")
    # Summed in float64: a weight every run left alone (a frozen head) comes back bit for bit.
    return [
        np.mean(np.stack(layer), axis=0, dtype=np.float64).astype(layer[0].dtype)
        for layer in zip(*runs, strict=True)
    ]


def extrapolate(start: Weights, end: Weights, step: float, movable: Sequence[bool]) -> Weights:
    """`start + step * (end - start)` for the movable weights, `end` for the others.

    Statistics (BatchNorm's moving mean and variance) are not moved: a variance stepped past
    its average could turn negative; they keep the average the runs measured. A weight that
    no run changed stays bit for bit.
    """
    if not len(start) == len(end) == len(movable):
        raise ValueError("start, end and movable must list the same weights")
    moved = []
    for a, b, move in zip(start, end, movable, strict=True):
        if move and step != 1.0:
            wide = a.astype(np.float64)
            moved.append((wide + step * (b.astype(np.float64) - wide)).astype(b.dtype))
        else:
            moved.append(b)
    return moved


def run_seed(seed: int, run: int) -> int:
    return seed + RUN_SEED_STRIDE * run


def fine_tune_averaged(
    model: keras.Model, runs: int, seed: int, tune_once: TuneOnce, extrapolation: float = 1.0
) -> list[FineTuneResult]:
    """Fine-tune `model` `runs` times from where it starts; leave it holding their average,
    stepped `extrapolation` times the average's change from the start.

    Run 0 trains `model` itself with `seed`, so one run at step 1 is exactly plain fine-tuning;
    the others train copies of the starting model. Returns every run's result, run 0 first.
    """
    if runs < 1:
        raise ValueError(f"runs must be at least 1, not {runs}")
    if not extrapolation > 0:
        raise ValueError(f"extrapolation must be positive, not {extrapolation}")
    start = copy_model(model) if runs > 1 or extrapolation != 1.0 else None
    results = [tune_once(model, 0, seed)]
    weights = [model.get_weights()]
    for run in range(1, runs):
        keras.utils.set_random_seed(run_seed(seed, run))
        candidate = copy_model(start)
        results.append(tune_once(candidate, run, run_seed(seed, run)))
        weights.append(candidate.get_weights())
    if start is not None:
        # Which weights train is read off the fresh copy: fine-tuning freezes some on the way.
        movable = [variable.trainable for variable in start.weights]
        end = average_weights(weights)
        model.set_weights(extrapolate(start.get_weights(), end, extrapolation, movable))
    return results
