"""Averaging several fine-tunes of one pruned model (a uniform "model soup").

Fine-tuning a pruned model on ~1,000 clean images lands somewhere different with every shuffle:
one seed CNN cut, fine-tuned four times with the product's recipe, read 94.2-96.8 % on the
GTSRB test signs while every run read 98-100 % on the validation slice, so no pick by
validation finds the good run (README, "Averaging fine-tunes"). Fine-tunes of one start share
a basin (Wortsman et al., ICML 2022), and the average of their weights keeps what they agree on:
it read as well as the best of them. Averaging cannot remove a backdoor the runs left behind
(it averages it), so it comes after the proxy trigger that does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import numpy as np

from fineprune.finetune import FineTuneResult
from fineprune.surgery import copy_model

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


def run_seed(seed: int, run: int) -> int:
    return seed + RUN_SEED_STRIDE * run


def fine_tune_averaged(
    model: keras.Model, runs: int, seed: int, tune_once: TuneOnce
) -> list[FineTuneResult]:
    """Fine-tune `model` `runs` times from where it starts; leave it holding their average.

    Run 0 trains `model` itself with `seed`, so one run is exactly plain fine-tuning; the others
    train copies of the starting model. Returns every run's result, run 0 first.
    """
    if runs < 1:
        raise ValueError(f"runs must be at least 1, not {runs}")
    start = copy_model(model) if runs > 1 else None
    results = [tune_once(model, 0, seed)]
    weights = [model.get_weights()]
    for run in range(1, runs):
        keras.utils.set_random_seed(run_seed(seed, run))
        candidate = copy_model(start)
        results.append(tune_once(candidate, run, run_seed(seed, run)))
        weights.append(candidate.get_weights())
    if runs > 1:
        model.set_weights(average_weights(weights))
    return results
