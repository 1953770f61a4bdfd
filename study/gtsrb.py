"""The GTSRB subset of the study: nine signs, Stop as the source, "Go straight or right" the target.

Training images come in tracks of ~30 frames of one physical sign, so every split here is by
track: the attacker's training set and the defender's clean pool never share a sign.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gtsrb_32.npz"
# GTSRB class ids, in the order of our labels 0..8.
CLASSES = (14, 36, 33, 34, 35, 37, 38, 39, 13)
STOP, GO_STRAIGHT_OR_RIGHT = 0, 1


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # float32, 0..1
    y: np.ndarray  # 0..8
    tracks: np.ndarray | None = None  # GTSRB's class*1000 + track (training images only)


@dataclass(frozen=True)
class Gtsrb:
    attacker: Split  # the outsourced trainer's data
    defender: Split  # the defender's clean pool (disjoint tracks)
    test: Split  # the official GTSRB test images of these classes
    names: tuple[str, ...]


def load(path: Path = DATA, defender_share: float = 0.4, seed: int = 0) -> Gtsrb:
    with np.load(path, allow_pickle=False) as data:
        mapping = {c: i for i, c in enumerate(CLASSES)}
        train = np.isin(data["y_train"], CLASSES)
        test = np.isin(data["y_test"], CLASSES)
        x = data["x_train"][train].astype(np.float32) / 255.0
        y = np.array([mapping[c] for c in data["y_train"][train]])
        tracks = data["train_track_id"][train]
        x_test = data["x_test"][test].astype(np.float32) / 255.0
        y_test = np.array([mapping[c] for c in data["y_test"][test]])
        names = tuple(str(data["class_names"][c]) for c in CLASSES)
    rng = np.random.default_rng(seed)
    defender = np.zeros(len(y), dtype=bool)
    for cls in range(len(CLASSES)):
        ids = rng.permutation(np.unique(tracks[y == cls]))
        chosen = ids[: max(1, round(defender_share * len(ids)))]
        defender |= np.isin(tracks, chosen)
    return Gtsrb(
        attacker=Split(x[~defender], y[~defender], tracks[~defender]),
        defender=Split(x[defender], y[defender], tracks[defender]),
        test=Split(x_test, y_test),
        names=names,
    )
