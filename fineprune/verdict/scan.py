"""A trigger-free scan for a planted shortcut, and the proxy trigger it recovers.

A backdoor is a small, input-independent change that sends every input to one class, so the
backdoored class is the one that an unusually small universal perturbation reaches (Neural
Cleanse: Wang et al., S&P 2019). Neural Cleanse searches a mask and a pattern per class; here
each class gets the one L2-bounded perturbation that sends the most of the defender's images
of the other classes there, which fits patches and blends alike and needs no trigger shape;
its success is read on images held apart from that search. The scan's radius is relative to
the images' mean norm; it shrinks while the median class is reached from most images, or
grows while no class is, so that a model that is easy to push everywhere (a blend makes one
so) still shows which class is easiest; a class whose success stands out from the median by
more than `ANOMALY_THRESHOLD` robust deviations is the suspect.

The suspect's perturbation, taken on the delivered model where the backdoor is intact, is a
proxy of the trigger: fine-tuning that stamps it on clean images with their true labels
unlearns the shortcut it rides on (Neural Cleanse's unlearning).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from fineprune.data.labelled import perturbation_radius
from fineprune.load.model import even_rows, output_kind, predict

SCAN_IMAGES = 64  # of the other classes, per class scanned
SCAN_STEPS = 10
CHECK_IMAGES = 256  # of the other classes, held apart from the search: where success is read
PROXY_IMAGES = 256  # the suspect's perturbation is then searched again on more images
PROXY_STEPS = 20
START_RADIUS = 0.05  # relative to the images' mean L2 norm
RADIUS_FACTOR = 2**0.5  # one rung of the radius ladder
RADIUS_CHANGES = 5  # rungs up or down, at most
ANOMALY_THRESHOLD = 2.0  # Neural Cleanse's anomaly index cut-off
MAD_SCALE = 1.4826  # a median absolute deviation, scaled to a normal standard deviation


@dataclass(frozen=True)
class ScanResult:
    radius: float  # relative to the images' mean L2 norm: the rung the scores are from
    success: tuple[float, ...]  # per class: share of other classes' images sent there
    anomaly: tuple[float, ...]  # per class: robust z-score of its success
    suspect: int | None  # the class that stands out, if one does
    perturbation: np.ndarray | None  # the suspect's universal perturbation (input-shaped)
    seconds: float = 0.0  # what the scan cost


class _Descent:
    """Normalized gradient steps on one perturbation, traced once per model and image shape."""

    def __init__(self, model: keras.Model, from_logits: bool) -> None:
        self.model = model
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)

        @tf.function(reduce_retracing=True)
        def step(
            delta: tf.Tensor,
            images: tf.Tensor,
            labels: tf.Tensor,
            radius: tf.Tensor,
            size: tf.Tensor,
        ) -> tf.Tensor:
            with tf.GradientTape() as tape:
                tape.watch(delta)
                value = loss(labels, model(images + delta, training=False))
            grad = tape.gradient(value, delta)
            delta = delta - size * grad / (tf.norm(grad) + 1e-12)
            return delta * tf.minimum(1.0, radius / (tf.norm(delta) + 1e-12))

        self._step = step

    def __call__(
        self,
        x: np.ndarray,
        target: int,
        radius: float,
        steps: int,
        start: np.ndarray | None = None,
    ) -> tuple[np.ndarray, float]:
        """The descent from `start` (default: zero): the perturbation found and the share of
        `x` it sends to `target`."""
        images = tf.constant(even_rows(x), tf.float32)
        labels = tf.fill([int(images.shape[0])], target)
        size = tf.constant(2.5 * radius / steps)  # PGD's usual step: the ball is crossed twice
        bound = tf.constant(radius, tf.float32)
        delta = tf.zeros_like(images[:1]) if start is None else tf.constant(start[None], tf.float32)
        for _ in range(steps):
            delta = self._step(delta, images, labels, bound, size)
        found = keras.ops.convert_to_numpy(delta)[0]
        return found, self.success(found, x, target)

    def success(self, delta: np.ndarray, x: np.ndarray, target: int) -> float:
        """The share of `x` that `delta` sends to `target`."""
        outputs = predict(self.model, (x + delta[None]).astype(np.float32))
        return float((outputs.argmax(-1) == target).mean())


def universal_perturbation(
    model: keras.Model,
    x: np.ndarray,
    target: int,
    radius: float,
    steps: int = SCAN_STEPS,
    from_logits: bool = False,
    start: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """The perturbation within `radius` (absolute L2) that sends most of `x` to `target`,
    and the share of `x` it sends there; the descent starts from `start` (default: zero)."""
    return _Descent(model, from_logits)(x, target, radius, steps, start)


def scan(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    seed: int = 0,
    images: int = SCAN_IMAGES,
    steps: int = SCAN_STEPS,
    from_logits: bool | None = None,
    check_images: int = CHECK_IMAGES,
) -> ScanResult:
    """Score every class; name the suspect and keep its perturbation (see the module doc).

    `from_logits`: whether the model ends without softmax; None reads it off its outputs.
    `check_images`: success is read on up to this many images held apart from the ones each
    perturbation is searched on (0: on those same images). A trigger's shortcut carries over
    to new images; a perturbation fitted to a class's look on 64 images carries over less,
    and the count is four times larger: on 24 scans of four seed CNN victims the target's
    robust z-score was 2.31-14.0 held apart against 1.6-10.8 on the search images
    (`docs/experiments/scan-steadiness.jsonl`).
    """
    started = time.perf_counter()
    classes = int(model.outputs[0].shape[-1])
    if classes < 2:
        raise ValueError("the trigger scan needs a classifier with two or more outputs")
    if from_logits is None:
        from_logits = output_kind(predict(model, x[:256])) == "logits"
    rng = np.random.default_rng(seed)
    pools = {c: rng.permutation(np.flatnonzero(y != c))[:images] for c in range(classes)}
    checks = None
    if check_images:  # (the draw above stays, so that recorded scans replay exactly)
        order = rng.permutation(len(y))
        fit, held = order[: len(y) // 2], order[len(y) // 2 :]
        pools = {c: fit[y[fit] != c][:images] for c in range(classes)}
        checks = {c: held[y[held] != c][:check_images] for c in range(classes)}
    if any(len(pool) == 0 for pool in [*pools.values(), *(checks or {}).values()]):
        raise ValueError("the trigger scan needs clean images of at least two classes")
    descend = _Descent(model, from_logits)
    relative, direction = START_RADIUS, 0
    previous: tuple[float, list, np.ndarray] | None = None
    for rung in range(RADIUS_CHANGES + 1):
        radius = perturbation_radius(x, relative)
        found = [descend(x[pools[c]], c, radius, steps) for c in range(classes)]
        if checks is not None:
            found = [(d, descend.success(d, x[checks[c]], c)) for c, (d, _) in enumerate(found)]
        success = np.array([s for _, s in found])
        # Too wide, every class is reached; too narrow, none is: only in between does one
        # class stand out. Move one way only, so that the ladder cannot swing; when it
        # overshoots into "every class", the rung below it is the one that tells.
        step = -1 if np.median(success) > 0.5 else (1 if success.max() < 0.5 else 0)
        if direction == 1 and step == -1 and previous is not None:
            relative, found, success = previous
            break
        if step == 0 or step == -direction or rung == RADIUS_CHANGES:
            break
        previous = (relative, found, success)
        direction = step
        relative *= RADIUS_FACTOR**step
    anomaly = _robust_z(success)
    top = int(np.argmax(anomaly))
    suspect = top if anomaly[top] > ANOMALY_THRESHOLD else None
    proxy = None
    if suspect is not None:
        others = rng.permutation(np.flatnonzero(y != suspect))[:PROXY_IMAGES]
        proxy, _ = descend(x[others], suspect, perturbation_radius(x, relative), PROXY_STEPS)
    return ScanResult(
        radius=relative,
        success=tuple(round(float(s), 4) for s in success),
        anomaly=tuple(round(float(a), 2) for a in anomaly),
        suspect=suspect,
        perturbation=proxy,
        seconds=round(time.perf_counter() - started, 2),
    )


def _robust_z(values: np.ndarray) -> np.ndarray:
    median = np.median(values)
    spread = MAD_SCALE * np.median(np.abs(values - median))
    return (values - median) / max(spread, 1e-3)
