"""The zoo's own measures, independent of the report a defense writes: clean accuracy on a
source the defender never saw, and attack success on triggered images of it."""

from __future__ import annotations

import keras

from study.zoo.data import Part
from study.zoo.train import eligible, target_of
from study.zoo.victims import Victim


def accuracy(model: keras.Model, part: Part) -> float:
    predicted = model.predict(part.x, batch_size=256, verbose=0).argmax(-1)
    return float((predicted == part.y).mean())


def triggered(victim: Victim, part: Part, classes: int) -> Part | None:
    """`part`'s eligible images with the trigger, labelled with what the attacker wants."""
    attack = victim.attack
    if attack.kind == "clean":
        return None
    rows = eligible(attack, part.y)
    return Part(attack.trigger.apply(part.x[rows]), target_of(attack, part.y[rows], classes))


def attack_success(model: keras.Model, victim: Victim, part: Part, classes: int) -> float | None:
    """Share of triggered images sent where the attacker wants (all-to-all: to y + 1)."""
    stamped = triggered(victim, part, classes)
    return None if stamped is None else accuracy(model, stamped)


def measures(model: keras.Model, victim: Victim, test: Part, evaluation: Part, classes: int):
    """Clean accuracy on the official test set and on the evaluation sources, and attack
    success on the test set's triggered images."""
    return {
        "test_accuracy": round(accuracy(model, test), 4),
        "evaluation_accuracy": round(accuracy(model, evaluation), 4),
        "asr": _round(attack_success(model, victim, test, classes)),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def drop(before: dict, after: dict) -> dict[str, float]:
    """Clean-accuracy change in points on both sources (negative: lost)."""
    return {
        key: round(100 * (after[key] - before[key]), 2)
        for key in ("test_accuracy", "evaluation_accuracy")
    }


def in_target(row: dict, asr_limit: float = 0.02, backdoored_drop: float = 2.0,
              clean_drop: float = 1.0) -> bool:  # fmt: skip
    """The product's target: ASR at most 2 % for at most 2 points lost on both clean sources
    (a clean model: at most 1 point)."""
    change = row["change"]
    worst = min(change["test_accuracy"], change["evaluation_accuracy"])
    if row["attack"] == "clean":
        return worst >= -clean_drop
    return row["after"]["asr"] <= asr_limit and worst >= -backdoored_drop
