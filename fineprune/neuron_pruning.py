"""Adversarial neuron pruning (ANP: Wu & Wang, NeurIPS 2021).

A backdoored network is fragile at its backdoor neurons: small multiplicative perturbations of
those neurons are enough to send clean inputs to the target class. ANP learns one mask value per
neuron that keeps the clean loss low while every neuron is being perturbed adversarially; the
masks of backdoor neurons fall. Pruning them sets their scale to zero and trains no weight, so
nothing the small clean set does not cover is forgotten (fine-tuning forgets unseen sign tracks).

A neuron is an output channel with a scale of its own: the gamma of a BatchNormalization layer,
or the kernel slice of a convolution or dense layer that no BatchNormalization directly follows.
As in the paper a pruned neuron keeps its bias; the output layer's units are classes, not
neurons, and are never masked. The forward pass with masks is the model's own `stateless_call`
with scaled variables, so any Keras 3 architecture runs unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from fineprune.data import LabelledData
from fineprune.errors import PruningError
from fineprune.graph import ModelGraph
from fineprune.sweep import predicted_classes

_SCALED = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D, keras.layers.Dense)


@dataclass(frozen=True)
class NeuronGroup:
    """The neurons of one layer: a scale per output channel and, if the layer has one, a bias."""

    layer: str
    scale: keras.Variable
    bias: keras.Variable | None

    @property
    def size(self) -> int:
        return int(self.scale.shape[-1])


@dataclass(frozen=True)
class NeuronPruningSettings:
    perturbation: float = 0.4  # epsilon: the largest relative change of a neuron's scale
    clean_weight: float = 0.2  # alpha: clean loss vs. perturbed loss in the mask objective
    steps: int = 400  # mask updates (the paper ran 2,000 at batch 128 on a GPU)
    batch_size: int = 64
    learning_rate: float = 0.2  # of the masks: SGD, momentum 0.9
    threshold: float = 0.2  # neurons whose mask ends below this are pruning candidates
    max_accuracy_drop: float = 4.0  # points of validation accuracy pruning may cost
    seed: int = 0


@dataclass
class NeuronPruningResult:
    groups: list[NeuronGroup]
    masks: list[np.ndarray]  # the learned mask values, one array per group
    pruned: dict[str, list[int]] = field(default_factory=dict)  # layer -> channels
    candidates: int = 0  # neurons whose mask fell below the threshold
    validation_accuracy_before: float = 0.0
    validation_accuracy_after: float = 0.0

    @property
    def pruned_count(self) -> int:
        return sum(len(channels) for channels in self.pruned.values())

    @property
    def neurons(self) -> int:
        return sum(group.size for group in self.groups)


def neuron_groups(model: keras.Model) -> list[NeuronGroup]:
    """Every maskable layer of a flat model, in graph order."""
    graph = ModelGraph(model)
    heads = _output_layers(graph)
    groups: list[NeuronGroup] = []
    seen: set[str] = set()
    for gnode in graph.nodes:
        layer = gnode.layer
        if layer.name in seen or layer.name in heads:
            continue
        if isinstance(layer, keras.layers.BatchNormalization):
            if layer.gamma is None:
                continue  # scale=False: its input layer carries the scale
            groups.append(NeuronGroup(layer.name, layer.gamma, layer.beta))
        elif isinstance(layer, _SCALED):
            consumers = [c for key in gnode.output_keys() for c in graph.consumers.get(key, [])]
            normalized = consumers and all(
                isinstance(c.layer, keras.layers.BatchNormalization) and c.layer.gamma is not None
                for c in consumers
            )
            if normalized:
                continue
            groups.append(NeuronGroup(layer.name, layer.kernel, getattr(layer, "bias", None)))
        else:
            continue
        seen.add(layer.name)
    if not groups:
        raise PruningError("the model has no neurons to mask (no convolution, dense or BN layer)")
    return groups


def _output_layers(graph: ModelGraph) -> set[str]:
    """Layers whose weights compute an output directly (nothing weighted in between)."""
    found: set[str] = set()
    stack = [graph.producer[id(t)] for t in graph.outputs]
    while stack:
        gnode = stack.pop()
        if gnode.layer.weights:
            found.add(gnode.name)
            continue
        stack.extend(graph.producer[k] for k in gnode.input_keys() if k in graph.producer)
    return found


class MaskedForward:
    """The model's forward pass: each scale times (mask + noise), each bias times (1 + noise)."""

    def __init__(self, model: keras.Model, groups: list[NeuronGroup]) -> None:
        self.model = model
        self.groups = groups
        self._trainable = list(model.trainable_variables)
        self._frozen = list(model.non_trainable_variables)
        where: dict[int, tuple[int, int]] = {}
        for i, v in enumerate(self._trainable):
            where[id(v)] = (0, i)
        for i, v in enumerate(self._frozen):
            where[id(v)] = (1, i)
        self._scale_at = [where[id(g.scale)] for g in groups]
        self._bias_at = [None if g.bias is None else where[id(g.bias)] for g in groups]

    def __call__(
        self,
        x: tf.Tensor,
        masks: list[tf.Tensor],
        scale_noise: list[tf.Tensor] | None = None,
        bias_noise: list[tf.Tensor] | None = None,
        training: bool = False,
    ) -> tf.Tensor:
        values = [
            [v.value for v in self._trainable],
            [v.value for v in self._frozen],
        ]
        for g, (kind, i) in enumerate(self._scale_at):
            factor = masks[g] if scale_noise is None else masks[g] + scale_noise[g]
            values[kind][i] = values[kind][i] * factor
            at = self._bias_at[g]
            if at is not None and bias_noise is not None:
                values[at[0]][at[1]] = values[at[0]][at[1]] * (1.0 + bias_noise[g])
        # In training mode BatchNormalization normalizes by the batch; its statistics stay put.
        outputs, _ = self.model.stateless_call(values[0], values[1], x, training=training)
        return outputs


def learn_masks(
    model: keras.Model,
    data: LabelledData,
    loss: keras.losses.Loss,
    settings: NeuronPruningSettings,
    groups: list[NeuronGroup] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[list[NeuronGroup], list[np.ndarray], list[dict[str, float]]]:
    """ANP's min-max: masks that keep the clean loss low under the worst neuron perturbation."""
    groups = groups if groups is not None else neuron_groups(model)
    forward = MaskedForward(model, groups)
    dtype = model.trainable_variables[0].dtype if model.trainable_variables else "float32"
    masks = [tf.Variable(tf.ones([g.size], dtype)) for g in groups]
    velocity = [tf.Variable(tf.zeros([g.size], dtype)) for g in groups]
    eps, alpha = settings.perturbation, settings.clean_weight
    rng = tf.random.Generator.from_seed(settings.seed)
    labels = data.y.astype(np.float32)[:, None] if _binary(model) else data.y

    @tf.function(reduce_retracing=True)
    def step(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        current = [tf.identity(m) for m in masks]
        noise = [rng.uniform([g.size], -eps, eps, dtype) for g in groups]
        bias_noise = [rng.uniform([g.size], -eps, eps, dtype) for g in groups]
        with tf.GradientTape() as tape:  # one signed ascent step on the perturbation (as ANP)
            tape.watch(noise + bias_noise)
            ascent = loss(y, forward(x, current, noise, bias_noise))
        grads = tape.gradient(ascent, noise + bias_noise)
        signs = [
            tf.zeros_like(v) if g is None else tf.sign(g)
            for g, v in zip(grads, noise + bias_noise, strict=True)
        ]
        count = len(groups)
        noise = [
            tf.clip_by_value(n + eps * g, -eps, eps)
            for n, g in zip(noise, signs[:count], strict=True)
        ]
        bias_noise = [
            tf.clip_by_value(n + eps * g, -eps, eps)
            for n, g in zip(bias_noise, signs[count:], strict=True)
        ]
        with tf.GradientTape() as tape:
            tape.watch(current)
            robust = loss(y, forward(x, current, noise, bias_noise))
            natural = loss(y, forward(x, current))
            objective = alpha * natural + (1.0 - alpha) * robust
        mask_grads = tape.gradient(objective, current)
        for m, v, g in zip(masks, velocity, mask_grads, strict=True):
            g = tf.zeros_like(m) if g is None else g
            v.assign(0.9 * v + g)
            m.assign(tf.clip_by_value(m - settings.learning_rate * v, 0.0, 1.0))
        return objective

    batches = (
        tf.data.Dataset.from_tensor_slices((data.x, labels))
        .shuffle(len(data), seed=settings.seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(settings.batch_size, drop_remainder=len(data) >= settings.batch_size)
        .take(settings.steps)
    )
    history: list[dict[str, float]] = []
    running = 0.0
    for index, (x, y) in enumerate(batches, start=1):
        if should_stop is not None and should_stop():
            break
        value = float(step(x, y))
        running += value
        if index % 50 == 0 or index == settings.steps:
            below = sum(int((m.numpy() < settings.threshold).sum()) for m in masks)
            history.append({"step": index, "loss": running / min(50, index), "below": below})
            running = 0.0
        if on_step is not None:
            on_step(index, value)
    return groups, [m.numpy() for m in masks], history


def prune_by_masks(
    model: keras.Model,
    groups: list[NeuronGroup],
    masks: list[np.ndarray],
    validation: LabelledData,
    settings: NeuronPruningSettings,
) -> NeuronPruningResult:
    """Prune the lowest-mask neurons below the threshold, as many as the accuracy rule allows.

    Candidates are taken in increasing mask order; the largest prefix whose validation accuracy
    stays within `max_accuracy_drop` points of the unpruned model is pruned in place.
    """
    forward = MaskedForward(model, groups)
    flat = np.concatenate(masks)
    owner = np.concatenate([np.full(g.size, i) for i, g in enumerate(groups)])
    channel = np.concatenate([np.arange(g.size) for g in groups])
    order = np.argsort(flat, kind="stable")
    candidates = int((flat < settings.threshold).sum())

    def accuracy(k: int) -> float:
        keep = np.ones_like(flat)
        keep[order[:k]] = 0.0
        split = np.split(keep, np.cumsum([g.size for g in groups])[:-1])
        hard = [tf.constant(s, dtype=g.scale.dtype) for s, g in zip(split, groups, strict=True)]
        hits = 0
        for start in range(0, len(validation), 256):
            rows = slice(start, start + 256)
            out = np.asarray(forward(tf.constant(validation.x[rows]), hard))
            hits += int((predicted_classes(out) == validation.y[rows]).sum())
        return 100.0 * hits / max(len(validation), 1)

    before = accuracy(0)
    chosen, after = 0, before
    # Every prefix for a few candidates, an even grid (plus the end) for many.
    grid = sorted(set(np.linspace(0, candidates, min(candidates, 100) + 1).astype(int).tolist()))
    for k in grid[1:]:
        value = accuracy(k)
        if before - value <= settings.max_accuracy_drop:
            chosen, after = k, value
    result = NeuronPruningResult(
        groups,
        masks,
        candidates=candidates,
        validation_accuracy_before=before / 100.0,
        validation_accuracy_after=after / 100.0,
    )
    for index in order[:chosen]:
        group = groups[int(owner[index])]
        result.pruned.setdefault(group.layer, []).append(int(channel[index]))
    for group in groups:
        channels = sorted(result.pruned.get(group.layer, []))
        if channels:
            result.pruned[group.layer] = channels
            value = keras.ops.convert_to_numpy(group.scale).copy()
            value[..., channels] = 0.0
            group.scale.assign(value)
    return result


def _binary(model: keras.Model) -> bool:
    return int(model.outputs[0].shape[-1]) == 1
