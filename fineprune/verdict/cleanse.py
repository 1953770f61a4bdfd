"""Trigger reconstruction by mask and pattern (Neural Cleanse: Wang et al., S&P 2019), with the
classes scheduled K-Arm's way (Shen et al., ICML 2021): every class gets a few steps, and only
the most promising half goes on, round after round.

For each class c a mask m and a pattern p are learned so that (1 - m) x + m p sends clean
images of the other classes to c, while the mask's area is pushed down. A backdoor's target
needs a far smaller mask than any other class: the trigger is a shortcut. The anomaly of a
class is how many robust deviations its mask area lies below the median area (NC's index).
Trying every class for the whole budget costs a pass per class per step; the halving spends it
on the classes whose masks are smallest so far, as K-Arm's bandit does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from fineprune.load.model import even_rows, output_kind, predict

IMAGES = 24  # of the other classes, per class, per step (even: see even_rows)
ROUND_STEPS = 25  # steps every class still in the race takes per round
TOTAL_STEPS = 200  # steps a finalist (or, without halving, every class) takes in all
KEEP = 0.5  # share of the classes that go on after a round
FINALISTS = 3
CONTROLS = 6  # dropped classes trained to the end beside the finalists, as a reference
START_COST = 1e-3  # weight of the mask's area; NC adapts it to keep success high
SUCCESS_GOAL = 0.9
RATE = 0.05
COST_PATIENCE = 5  # steps between two adjustments of the mask's cost
MAD_SCALE = 1.4826


@dataclass(frozen=True)
class Reconstruction:
    area: tuple[float, ...]  # per class: the smallest working mask's area (share of pixels)
    success: tuple[float, ...]  # per class: share of held-apart images that mask sends there
    steps: tuple[int, ...]  # per class: steps spent on it
    anomaly: tuple[float, ...]  # per class: robust deviations below the median area
    seconds: float

    @property
    def top(self) -> int:
        return int(np.argmax(self.anomaly))


class _Masks:
    """Masks and patterns of several classes at once, trained in one batched step."""

    def __init__(self, model: keras.Model, shape: tuple[int, ...], low: float, high: float,
                 from_logits: bool, seed: int) -> None:  # fmt: skip
        self.model = model
        self.shape = shape
        self.low, self.high = low, high
        self.loss = keras.losses.SparseCategoricalCrossentropy(
            from_logits=from_logits, reduction="none"
        )
        self.rng = np.random.default_rng(seed)

        @tf.function(reduce_retracing=True)
        def step(mask_logits, pattern_logits, images, labels, cost):
            with tf.GradientTape() as tape:
                mask, pattern = self._materialize(mask_logits, pattern_logits)
                stamped = self._stamp(images, mask, pattern)
                outputs = model(stamped, training=False)
                per_image = tf.reshape(self.loss(labels, outputs), [tf.shape(mask)[0], -1])
                area = tf.reduce_mean(mask, axis=[1, 2, 3])
                pixels = tf.reduce_sum(mask, axis=[1, 2, 3])  # NC's L1 norm, which its cost scales
                total = tf.reduce_sum(tf.reduce_mean(per_image, axis=1) + cost * pixels)
            hits = tf.cast(tf.equal(tf.argmax(outputs, -1), labels), tf.float32)
            success = tf.reduce_mean(tf.reshape(hits, [tf.shape(mask)[0], -1]), axis=1)
            return tape.gradient(total, [mask_logits, pattern_logits]), area, success

        self._step = step

    def _materialize(self, mask_logits: tf.Tensor, pattern_logits: tf.Tensor):
        mask = tf.sigmoid(mask_logits)
        pattern = self.low + (self.high - self.low) * tf.sigmoid(pattern_logits)
        return mask, pattern

    @staticmethod
    def _stamp(images: tf.Tensor, mask: tf.Tensor, pattern: tf.Tensor) -> tf.Tensor:
        """(K, n, ...) stamped images, flattened to (K * n, ...)."""
        stamped = (1.0 - mask[:, None]) * images + mask[:, None] * pattern[:, None]
        return tf.reshape(stamped, tf.concat([[-1], tf.shape(images)[2:]], 0))

    def train(self, classes: list[int], pools: dict[int, np.ndarray], x: np.ndarray,
              steps: int, state: dict) -> None:  # fmt: skip
        """`steps` Adam steps on the masks of `classes`, NC's cost adapted per class."""
        mask_logits = tf.Variable(np.stack([state[c]["mask"] for c in classes]))
        pattern_logits = tf.Variable(np.stack([state[c]["pattern"] for c in classes]))
        optimizer = keras.optimizers.Adam(RATE)
        cost = np.array([state[c]["cost"] for c in classes], np.float32)
        reached_sum = np.zeros(len(classes))
        for step in range(1, steps + 1):
            rows = [
                self.rng.choice(pools[c], IMAGES, replace=len(pools[c]) < IMAGES) for c in classes
            ]
            images = tf.constant(np.stack([x[r] for r in rows]), tf.float32)
            labels = tf.constant(np.repeat(classes, IMAGES), tf.int64)
            grads, area, reached = self._step(
                mask_logits, pattern_logits, images, labels, tf.constant(cost)
            )
            optimizer.apply(grads, [mask_logits, pattern_logits])
            reached = keras.ops.convert_to_numpy(reached)
            reached_sum += reached
            for i, c in enumerate(classes):
                entry = state[c]
                entry["steps"] += 1
                if reached[i] >= SUCCESS_GOAL and float(area[i]) < entry["area"]:
                    entry["area"] = float(area[i])
                    entry["best"] = (
                        keras.ops.convert_to_numpy(mask_logits[i]),
                        keras.ops.convert_to_numpy(pattern_logits[i]),
                    )
            if step % COST_PATIENCE == 0:  # NC: up while the trigger works, down while not
                working = reached_sum / COST_PATIENCE >= SUCCESS_GOAL
                cost = np.where(working, cost * 2.0, cost / 2.0).astype(np.float32)
                reached_sum[:] = 0.0
        for i, c in enumerate(classes):
            state[c]["mask"] = keras.ops.convert_to_numpy(mask_logits[i])
            state[c]["pattern"] = keras.ops.convert_to_numpy(pattern_logits[i])
            state[c]["cost"] = float(cost[i])

    def success_of(self, mask_logits, pattern_logits, images, classes) -> np.ndarray:
        mask, pattern = self._materialize(mask_logits, pattern_logits)
        outputs = predict(
            self.model, keras.ops.convert_to_numpy(self._stamp(images, mask, pattern))
        )
        hits = outputs.argmax(-1).reshape(len(classes), -1) == np.array(classes)[:, None]
        return hits.mean(axis=1)

    def held_apart_success(self, c: int, entry: dict, x: np.ndarray) -> float:
        if entry["best"] is None or not len(x):
            return 0.0
        mask_logits, pattern_logits = (tf.constant(v[None]) for v in entry["best"])
        images = tf.constant(x[None], tf.float32)
        return float(self.success_of(mask_logits, pattern_logits, images, [c])[0])


def reconstruct(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    seed: int = 0,
    from_logits: bool | None = None,
    halving: bool = True,
    budget: int | None = None,
) -> Reconstruction:
    """Every class's smallest mask-and-pattern trigger; `halving` schedules K-Arm's way, else
    every class gets `budget` steps (Neural Cleanse as published, at this budget)."""
    started = time.perf_counter()
    classes = int(model.outputs[0].shape[-1])
    if classes < 2:
        raise ValueError("trigger reconstruction needs a classifier with two or more outputs")
    if from_logits is None:
        from_logits = output_kind(predict(model, x[:256])) == "logits"
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    fit, held = order[: len(y) // 2], order[len(y) // 2 :]
    pools = {c: fit[y[fit] != c] for c in range(classes)}
    if any(len(p) == 0 for p in pools.values()):
        raise ValueError("trigger reconstruction needs clean images of at least two classes")
    shape = tuple(x.shape[1:])
    masks = _Masks(model, shape, float(x.min()), float(x.max()), from_logits, seed)
    state = {
        c: {
            "mask": np.full((*shape[:-1], 1), -3.0, np.float32),
            "pattern": rng.normal(0, 1, shape).astype(np.float32),
            "cost": START_COST,
            "area": float("inf"),
            "best": None,
            "steps": 0,
        }
        for c in range(classes)
    }
    racing = list(range(classes))
    if halving and classes > FINALISTS + CONTROLS:
        while len(racing) > FINALISTS:
            masks.train(racing, pools, x, ROUND_STEPS, state)
            racing = sorted(racing, key=lambda c: state[c]["area"])
            racing = racing[: max(FINALISTS, int(np.ceil(KEEP * len(racing))))]
        # Controls: classes the race dropped, trained as long as the finalists, so that the
        # anomaly compares masks that had the same budget.
        dropped = [c for c in range(classes) if c not in racing]
        controls = [int(c) for c in rng.choice(dropped, CONTROLS, replace=False)]
        for c in controls:
            state[c]["area"], state[c]["best"] = float("inf"), None
        compared = racing + controls
        masks.train(compared, pools, x, TOTAL_STEPS - ROUND_STEPS, state)
    else:
        compared = racing
        masks.train(racing, pools, x, budget or TOTAL_STEPS, state)
    area = np.array([min(state[c]["area"], 1.0) for c in range(classes)])
    success = [
        masks.held_apart_success(c, state[c], even_rows(x[held[y[held] != c]][:256]))
        for c in range(classes)
    ]
    return Reconstruction(
        area=tuple(round(float(a), 5) for a in area),
        success=tuple(round(s, 4) for s in success),
        steps=tuple(state[c]["steps"] for c in range(classes)),
        anomaly=tuple(round(float(a), 2) for a in _below_median(area, compared)),
        seconds=round(time.perf_counter() - started, 2),
    )


def _below_median(area: np.ndarray, compared: list[int]) -> np.ndarray:
    """NC's anomaly index: robust deviations below the median of the classes that had the
    whole budget (0 at or above it, and for the classes the race dropped)."""
    reference = area[compared]
    median = np.median(reference)
    spread = MAD_SCALE * np.median(np.abs(reference - median))
    anomaly = np.maximum(median - area, 0.0) / max(spread, 1e-6)
    dropped = np.ones(len(area), bool)
    dropped[compared] = False
    anomaly[dropped] = 0.0
    return anomaly
