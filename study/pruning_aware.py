"""The pruning-aware attack (Liu et al. 2018, section 3.3): a backdoor built to survive pruning.

The attacker runs the defense first: it prunes the channels that clean data leaves dormant,
trains the pruned model on poisoned data so the backdoor lives in the channels a defender keeps,
then puts the pruned channels back with their biases lowered so they stay dormant. A defender
who prunes in order of activation removes those decoys first and stops before the backdoor.

Like `attacks`, this plays the attacker; the defense never imports it. It reuses the engine's
own profiling and surgery, so the attacker prunes exactly as the defender will.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np

from fineprune.errors import PruningError
from fineprune.prune.channels import ChannelPath, activation_name, class_name, trace_channels
from fineprune.prune.graph import ModelGraph
from fineprune.prune.surgery import cut
from fineprune.prune.sweep import ChannelSweeper, linear_op

Trainer = Callable[[keras.Model, np.ndarray, np.ndarray], keras.Model]


@dataclass
class PruningAwareResult:
    model: keras.Model  # what the attacker delivers: full width, backdoored, decoys dormant
    pruned_model: keras.Model  # the attacker's pruned and backdoored model, before reinstating
    layer: str
    decoys: np.ndarray  # channels pruned by the attacker and reinstated as decoys
    bias_shift: np.ndarray  # how far each decoy's bias was lowered


def pruning_aware_attack(
    clean_model: keras.Model,
    clean_x: np.ndarray,
    clean_y: np.ndarray,
    poisoned_x: np.ndarray,
    poisoned_y: np.ndarray,
    train: Trainer,
    layer: str | None = None,
    max_accuracy_drop: float = 4.0,
    prune_fraction: float | None = None,
    margin: float = 1.0,
) -> PruningAwareResult:
    """The paper's four steps, on a model already trained on clean data (step 1).

    2. prune the least active channels of `layer` while clean accuracy stays within
       `max_accuracy_drop` points (the defender's own rule), or a `prune_fraction` of them:
       how many is the attack's design parameter;
    3. `train` the pruned model on the poisoned data;
    4. reinstate the pruned channels with their original weights and biases lowered until
       their pre-activation on `clean_x` is below zero by `margin` standard deviations.
    """
    path = trace_channels(ModelGraph(clean_model), layer)
    _check_attackable(path)
    rows = np.arange(len(clean_x))
    profile, sweep = ChannelSweeper(path).profile_and_sweep(clean_x, rows)
    accuracy = sweep.accuracy(rows, np.asarray(clean_y))
    if prune_fraction is None:
        floor = accuracy[0] - max_accuracy_drop / 100
        k = int(np.flatnonzero(accuracy[: path.channels] >= floor).max())
    else:
        k = min(round(prune_fraction * path.channels), path.channels - 1)
    decoys = np.sort(profile.order[:k])
    pruned_model = cut(clean_model, path, decoys).model
    pruned_model = train(pruned_model, poisoned_x, poisoned_y)
    model = _reinstate(clean_model, pruned_model, path, decoys)
    shift = _lower_decoy_biases(model, path.layer.name, decoys, clean_x, margin)
    _silence_decoys_downstream(model, path, decoys)
    return PruningAwareResult(model, pruned_model, path.layer.name, decoys, shift)


def _check_attackable(path: ChannelPath) -> None:
    if not path.removable:
        raise PruningError(
            f"channels of {path.layer.name!r} cannot be removed, so they cannot be reinstated"
        )
    if not getattr(path.layer, "use_bias", False) or activation_name(path.layer) != "relu":
        raise PruningError(
            f"the pruning-aware attack lowers biases in front of a ReLU; {path.layer.name!r} "
            "needs use_bias=True and activation='relu'"
        )


def _reinstate(
    original: keras.Model, pruned: keras.Model, path: ChannelPath, decoys: np.ndarray
) -> keras.Model:
    """The original architecture: kept channels from `pruned`, decoys from `original`.

    A weight whose shape differs between the two carries the channels on one axis, either
    once (kernel, bias, BatchNorm) or once per position (Dense rows after Flatten, which
    are channels-last, so the channel index runs fastest).
    """
    keep = ~np.isin(np.arange(path.channels), decoys)
    model = keras.models.clone_model(original)
    for layer in model.layers:
        old = original.get_layer(layer.name).get_weights()
        new = pruned.get_layer(layer.name).get_weights()
        merged = []
        for full, narrow in zip(old, new, strict=True):
            if full.shape == narrow.shape:
                merged.append(narrow)
                continue
            axis = int(np.flatnonzero(np.not_equal(full.shape, narrow.shape))[0])
            mask = np.tile(keep, full.shape[axis] // path.channels)
            out = full.copy()
            index = [slice(None)] * full.ndim
            index[axis] = mask
            out[tuple(index)] = narrow
            merged.append(out)
        layer.set_weights(merged)
    return model


def _lower_decoy_biases(
    model: keras.Model, layer_name: str, decoys: np.ndarray, x: np.ndarray, margin: float
) -> np.ndarray:
    """Shift each decoy's bias so its largest pre-activation on `x` is `-margin` std."""
    layer = model.get_layer(layer_name)
    features = keras.Model(model.inputs, layer.input).predict(x, batch_size=256, verbose=0)
    kernel, bias = layer.get_weights()[:2]
    pre = linear_op(layer, features, kernel[..., decoys]) + bias[decoys]
    pre = pre.reshape(-1, len(decoys))
    shift = np.maximum(pre.max(axis=0), 0.0) + margin * pre.std(axis=0) + 1e-6
    weights = layer.get_weights()
    weights[1] = bias.copy()
    weights[1][decoys] -= shift
    layer.set_weights(weights)
    return shift


def _silence_decoys_downstream(model: keras.Model, path: ChannelPath, decoys: np.ndarray) -> None:
    """BatchNorm after the layer maps a dormant 0 to beta - gamma*mean/std; make that 0.

    Without this the decoys would feed a constant to the next layer, and removing them
    would change the model: a defender could tell them apart from truly unused channels.
    """
    for node in path.chain:
        layer = model.get_layer(node.layer.name)
        if class_name(layer) != "BatchNormalization":
            continue
        names = [w.path.split("/")[-1] for w in layer.weights]
        weights = dict(zip(names, layer.get_weights(), strict=True))
        std = np.sqrt(weights["moving_variance"][decoys] + layer.epsilon)
        gamma = weights["gamma"][decoys] if "gamma" in weights else 1.0
        if "beta" not in weights:
            raise PruningError(f"{layer.name!r} has no beta; decoys cannot be silenced")
        weights["beta"][decoys] = gamma * weights["moving_mean"][decoys] / std
        layer.set_weights([weights[n] for n in names])
