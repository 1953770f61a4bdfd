"""The zoo's data: who sees which images, disjoint by source.

GTSRB (all 43 classes): every class's tracks (about 30 frames of one physical sign each) are
dealt to the attacker (70 %), the defender's pool (15 %) and an evaluation set (15 %); no sign
appears in two of them. The official test set is a fourth source. MNIST: the attacker trains
on MNIST's first 50,000 training digits, the defender draws from the last 10,000 (the same
writers), and accuracy is read on the test set, whose writers neither has seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from study import mnist

GTSRB = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gtsrb_32.npz"
SHARES = {"attacker": 0.7, "defender": 0.15, "evaluation": 0.15}


@dataclass(frozen=True)
class Part:
    x: np.ndarray  # float32 in 0..1, (n, h, w, c)
    y: np.ndarray  # int64
    groups: np.ndarray | None = None  # GTSRB track ids; None for MNIST


@dataclass(frozen=True)
class Dataset:
    name: str
    classes: int
    attacker: Part
    defender: Part  # the pool the defender's uploads are drawn from
    evaluation: Part  # other sources than the defender's: other tracks, other writers
    test: Part  # the official test set


def gtsrb(path: Path = GTSRB, seed: int = 0) -> Dataset:
    with np.load(path, allow_pickle=False) as data:
        x = data["x_train"].astype(np.float32) / 255.0
        y = data["y_train"].astype(np.int64)
        tracks = data["train_track_id"].astype(np.int64)
        test = Part(data["x_test"].astype(np.float32) / 255.0, data["y_test"].astype(np.int64))
    rng = np.random.default_rng(seed)
    owner = np.empty(len(y), dtype=object)
    for cls in np.unique(y):
        ids = rng.permutation(np.unique(tracks[y == cls]))
        cut_a = max(1, round(SHARES["attacker"] * len(ids)))
        cut_d = cut_a + max(1, round(SHARES["defender"] * len(ids)))
        for name, chosen in (
            ("attacker", ids[:cut_a]),
            ("defender", ids[cut_a:cut_d]),
            ("evaluation", ids[cut_d:]),
        ):
            owner[np.isin(tracks, chosen)] = name
    parts = {n: Part(x[owner == n], y[owner == n], tracks[owner == n]) for n in SHARES}
    return Dataset("gtsrb", 43, test=test, **parts)


def mnist_digits(cache: Path) -> Dataset:
    digits = mnist.load(cache)
    train, validation, test = digits.train, digits.validation, digits.test
    return Dataset(
        "mnist",
        10,
        attacker=Part(train.x, train.y),
        defender=Part(validation.x, validation.y),
        evaluation=Part(test.x, test.y),
        test=Part(test.x, test.y),
    )


def defender_sample(pool: Part, count: int, seed: int) -> Part:
    """`count` images of the defender's pool, as even across classes as the pool allows."""
    rng = np.random.default_rng(seed)
    classes = np.unique(pool.y)
    share = -(-count // len(classes))
    rows = np.concatenate([rng.permutation(np.flatnonzero(pool.y == c))[:share] for c in classes])
    rows = rng.permutation(rows)[:count]
    if len(rows) < count:  # small classes ran out: the rest from anywhere in the pool
        others = rng.permutation(np.setdiff1d(np.arange(len(pool.y)), rows))
        rows = np.concatenate([rows, others[: count - len(rows)]])
    groups = None if pool.groups is None else pool.groups[rows]
    return Part(pool.x[rows], pool.y[rows], groups)
