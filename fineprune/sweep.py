"""Profile a layer's channels and evaluate the model with every number of them pruned.

The layers before the pruned one run once. When the first layer that mixes the channels is
linear in them (Dense after Flatten or global pooling, a convolution), each channel's
contribution to its pre-activation is subtracted as channels go, so the whole curve costs about
one forward pass over the data. Other mixers (Add in a residual block) re-run from their input
with the channel zeroed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from fineprune.channels import ChannelPath, Mixer, class_name
from fineprune.graph import TensorKey, batched

Progress = Callable[[float], None]
FRONTIER_BUDGET_BYTES = 2 * 1024**3


@dataclass
class Profile:
    """Mean activation of each channel, and the order in which channels are pruned."""

    per_sample: np.ndarray  # (samples, channels): each sample's mean over spatial positions
    order: np.ndarray  # channel indices, least active first

    def mean_over(self, rows: np.ndarray) -> np.ndarray:
        return self.per_sample[rows].mean(axis=0)


@dataclass
class Sweep:
    """Predicted class of every sample with the first k channels of `order` pruned, every k."""

    order: np.ndarray
    predictions: np.ndarray  # (channels + 1, samples), int

    def accuracy(self, rows: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Fraction of `rows` predicted as `labels`, for each k."""
        if len(rows) == 0:
            return np.full(len(self.predictions), np.nan)
        return (self.predictions[:, rows] == labels[None, :]).mean(axis=1)


def predicted_classes(outputs: Any) -> np.ndarray:
    values = np.asarray(outputs)
    if values.ndim == 2 and values.shape[1] == 1:
        return (values[:, 0] > _binary_threshold(values)).astype(np.int64)
    return values.argmax(axis=-1)


def _binary_threshold(values: np.ndarray) -> float:
    # A single sigmoid unit gives probabilities; a single linear unit gives logits.
    return 0.5 if values.min() >= 0.0 and values.max() <= 1.0 else 0.0


class ChannelSweeper:
    """Runs the prefix of the model once and the cheap tail once per k."""

    def __init__(self, path: ChannelPath, batch_size: int = 256) -> None:
        self.path = path
        self.graph = path.graph
        self.batch_size = batch_size
        self.input_key = id(self.graph.inputs[0])
        early = [m for m in path.mixers if m.input_key in path.clean_keys]
        # Mixers whose input merges with another mixer's output are re-run in the tail and
        # masked there; the others start from values the prefix computed once.
        self.late = [m for m in path.mixers if m.input_key not in path.clean_keys]
        self.linear = [m for m in early if m.linear]
        self.other = [m for m in early if not m.linear]
        self.masked_keys: list[TensorKey] = sorted({m.input_key for m in self.other})
        self.mixer_input_keys: list[TensorKey] = sorted({m.input_key for m in early})
        downstream = self._downstream_nodes(early)
        produced = {k for n in downstream for k in n.output_keys()}
        linear_nodes = {id(m.node) for m in self.linear}
        self.outside_keys: list[TensorKey] = sorted(
            {
                k
                for n in downstream
                if id(n) not in linear_nodes
                for k in n.input_keys()
                if k not in produced and k not in self.masked_keys
            }
        )
        self._tensor = {id(t): t for n in self.graph.nodes for t in (*n.inputs, *n.outputs)}
        self._tensor.update({id(t): t for t in self.graph.inputs})

    def _downstream_nodes(self, mixers: list[Mixer]) -> list[Any]:
        mixer_nodes = {id(m.node) for m in mixers}
        tainted: set[TensorKey] = set()
        found = []
        for gnode in self.graph.nodes:
            if id(gnode) in mixer_nodes or any(k in tainted for k in gnode.input_keys()):
                found.append(gnode)
                tainted.update(gnode.output_keys())
        return found

    # -- prefix: everything up to the mixers, once -------------------------------------------

    def _prefix(self, x: np.ndarray) -> tuple[np.ndarray, dict[TensorKey, np.ndarray]]:
        keys = [self.path.profile_key, *sorted({*self.mixer_input_keys, *self.outside_keys})]
        wanted = [self._tensor[k] for k in keys]
        values = self.graph.run({self.input_key: x}, wanted)
        profile = np.asarray(values[0], dtype=np.float64)
        per_sample = profile.reshape(len(x), -1, profile.shape[-1]).mean(axis=1)
        arrays = {k: np.asarray(v) for k, v in zip(keys[1:], values[1:], strict=True)}
        return per_sample, arrays

    def profile_and_sweep(
        self,
        x: np.ndarray,
        profile_rows: np.ndarray,
        progress: Progress | None = None,
    ) -> tuple[Profile, Sweep]:
        """Profile on `profile_rows`, then predict every sample of `x` for every k."""
        chunks = list(batched([x], self.batch_size))
        per_sample_parts: list[np.ndarray] = []
        stored: list[dict[TensorKey, np.ndarray]] | None = []
        used = 0
        for i, (chunk,) in enumerate(chunks):
            per_sample, arrays = self._prefix(chunk)
            per_sample_parts.append(per_sample)
            if stored is not None:
                used += sum(a.nbytes for a in arrays.values())
                stored = [*stored, arrays] if used <= FRONTIER_BUDGET_BYTES else None
            if progress:
                progress(0.5 * (i + 1) / len(chunks))
        per_sample = np.concatenate(per_sample_parts)
        order = np.argsort(per_sample[profile_rows].mean(axis=0), kind="stable")
        profile = Profile(per_sample=per_sample, order=order)

        predictions = np.empty((self.path.channels + 1, len(x)), dtype=np.int64)
        start = 0
        for i, (chunk,) in enumerate(chunks):
            arrays = stored[i] if stored is not None else self._prefix(chunk)[1]
            rows = slice(start, start + len(chunk))
            predictions[:, rows] = self._sweep_chunk(arrays, order)
            start += len(chunk)
            if progress:
                progress(0.5 + 0.5 * (i + 1) / len(chunks))
        return profile, Sweep(order=order, predictions=predictions)

    # -- tail: the mixers and what follows, once per k ----------------------------------------

    def _sweep_chunk(self, arrays: dict[TensorKey, np.ndarray], order: np.ndarray) -> np.ndarray:
        # From everything pruned back to nothing pruned: the fully pruned point, where the
        # outputs are nearly tied, is then exact, and rounding grows only as channels return.
        pruned_all = np.asarray(order)
        masked = {}
        for key in self.masked_keys:
            values = arrays[key].copy()
            values[..., np.isin(self.path.feature_maps[key], pruned_all)] = 0.0
            masked[key] = values
        outside = {k: arrays[k] for k in self.outside_keys}
        samples = len(next(iter(arrays.values())))
        out = np.empty((len(order) + 1, samples), dtype=np.int64)
        pre: dict[int, np.ndarray] = {}
        for k in range(len(order), -1, -1):
            if k < len(order):
                channel = order[k]
                for m in self.linear:
                    features = m.feature_map == channel
                    pre[id(m.node)] += self._contribution(m, arrays[m.input_key], features)
                for key in self.masked_keys:
                    back = self.path.feature_maps[key] == channel
                    masked[key][..., back] = arrays[key][..., back]
            else:
                for m in self.linear:
                    # Features from outside the pruned layer (Concatenate) never go.
                    others = m.feature_map < 0
                    if not others.any():
                        others = m.feature_map == order[-1]
                        base = 0.0 * self._contribution(m, arrays[m.input_key], others)
                    else:
                        base = self._contribution(m, arrays[m.input_key], others)
                    pre[id(m.node)] = base + self._bias(m)
            out[k] = self._tail(pre, masked, outside, order[:k])
        return out

    def _tail(
        self,
        pre: dict[int, np.ndarray],
        masked: dict[TensorKey, np.ndarray],
        outside: dict[TensorKey, np.ndarray],
        pruned: np.ndarray,
    ) -> np.ndarray:
        feed: dict[TensorKey, Any] = {**outside, **masked}
        for m in self.linear:
            activation = m.node.layer.activation
            feed[id(m.node.outputs[0])] = activation(pre[id(m.node)].astype(np.float32))
        transform = masking_transform(self.path, pruned, self.late) if self.late else None
        (outputs,) = self.graph.run(feed, self.graph.outputs[:1], transform)
        return predicted_classes(keras.ops.convert_to_numpy(outputs))

    def _bias(self, mixer: Mixer) -> np.ndarray:
        layer = mixer.node.layer
        if not layer.use_bias:
            return np.zeros(int(layer.kernel.shape[-1]))
        return np.asarray(keras.ops.convert_to_numpy(layer.bias), dtype=np.float64)

    def _contribution(self, mixer: Mixer, x: np.ndarray, features: np.ndarray) -> np.ndarray:
        """The mixer's kernel product over the selected input features only."""
        index = np.flatnonzero(features)
        kernel = keras.ops.convert_to_numpy(mixer.node.layer.kernel)[..., index, :]
        return np.asarray(_linear_op(mixer.node.layer, x[..., index], kernel), np.float64)


def _linear_op(layer: Any, x: np.ndarray, kernel: Any) -> np.ndarray:
    """The layer's kernel product without bias or activation, on a subset of input features."""
    if class_name(layer) == "Dense":
        return np.tensordot(x, keras.ops.convert_to_numpy(kernel), axes=([-1], [0]))
    result = keras.ops.conv(
        x,
        kernel,
        strides=layer.strides,
        padding=layer.padding,
        data_format="channels_last",
        dilation_rate=layer.dilation_rate,
    )
    return keras.ops.convert_to_numpy(result)


def naive_sweep(path: ChannelPath, x: np.ndarray, order: np.ndarray, batch_size: int = 256):
    """The whole model re-run for every k, channels zeroed at the mixers' inputs.

    The reference the fast sweep is checked against, and the baseline of the benchmark.
    """
    graph = path.graph
    predictions = np.empty((path.channels + 1, len(x)), dtype=np.int64)
    for k in range(path.channels + 1):
        transform = masking_transform(path, order[:k])
        parts = []
        for (chunk,) in batched([x], batch_size):
            (out,) = graph.run({id(graph.inputs[0]): chunk}, graph.outputs[:1], transform)
            parts.append(predicted_classes(keras.ops.convert_to_numpy(out)))
        predictions[k] = np.concatenate(parts)
    return Sweep(order=order, predictions=predictions)


def masking_transform(path: ChannelPath, pruned: np.ndarray, mixers: list[Mixer] | None = None):
    """A graph transform that zeroes the pruned channels where they enter each mixer."""
    by_node: dict[int, list[Mixer]] = {}
    for m in path.mixers if mixers is None else mixers:
        by_node.setdefault(id(m.node), []).append(m)

    def transform(gnode: Any, values: list[Any]) -> list[Any]:
        mixers = by_node.get(id(gnode))
        if not mixers or len(pruned) == 0:
            return values
        values = list(values)
        for m in mixers:
            i = gnode.input_keys().index(m.input_key)
            keep = np.isin(m.feature_map, pruned, invert=True).astype(np.float32)
            values[i] = values[i] * keep
        return values

    return transform


def masked_predict(path: ChannelPath, x: np.ndarray, pruned: np.ndarray) -> np.ndarray:
    """Raw outputs of the model with `pruned` channels zeroed at the mixers' inputs."""
    graph = path.graph
    transform = masking_transform(path, pruned)
    (out,) = graph.run({id(graph.inputs[0]): x}, graph.outputs[:1], transform)
    return keras.ops.convert_to_numpy(out)
