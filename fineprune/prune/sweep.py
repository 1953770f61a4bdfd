"""Profile a layer's channels and evaluate the model with every number of them pruned.

The layers before the pruned one run once. When the first layer that mixes the channels is
linear in them (Dense after Flatten or global pooling, a convolution), each channel's
contribution to its pre-activation is subtracted as channels go, so the whole curve costs about
one forward pass over the data. Other mixers (Add in a residual block) re-run from their input
with the channel zeroed.

When every such mixer is a Dense layer with the same number of features per channel (the
common CNN head), the per-k part runs as one compiled TensorFlow call per slice of samples:
all channels' contributions in one batched product, summed in float64 in the same order as
channels come back, and the tail over every k at once (`_DenseSweep`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from fineprune.load.model import predicted_classes
from fineprune.prune.channels import ChannelPath, Mixer, class_name
from fineprune.prune.graph import TensorKey, batched

Progress = Callable[[float], None]
FRONTIER_BUDGET_BYTES = 2 * 1024**3
SWEEP_CHUNK_BYTES = 512 * 1024**2
TAIL_GROUP_BYTES = 256 * 1024**2


def _size(tensor: Any) -> int:
    return int(np.prod([d or 1 for d in tensor.shape[1:]]))


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
        self._kernel = {
            id(m.node): keras.ops.convert_to_numpy(m.node.layer.kernel) for m in self.linear
        }
        self._tensor.update({id(t): t for t in self.graph.inputs})
        self._prefix_keys = sorted({*self.mixer_input_keys, *self.outside_keys})
        self._prefix_model = self._compile_prefix()
        self._tail_fn = self._compile_tail() if not self.late else None
        self._dense = _DenseSweep.build(self)

    def _compile_prefix(self) -> keras.Model:
        """One Keras model from the input to the profile means and the mixers' inputs."""
        profiled = self._tensor[self.path.profile_key]
        spatial = tuple(range(1, len(profiled.shape) - 1))
        means = keras.ops.mean(profiled, axis=spatial) if spatial else profiled
        outputs = [means, *(self._tensor[k] for k in self._prefix_keys)]
        return keras.Model(self.graph.inputs, outputs, name="fineprune_prefix")

    def _compile_tail(self) -> Any:
        """The mixers' activations and everything after them, traced once by TensorFlow."""
        fed = [*self.outside_keys, *self.masked_keys]
        linear = list(self.linear)

        @tf.function(reduce_retracing=True, autograph=False)
        def tail(values: list[Any], pre: list[Any]) -> Any:
            feed = dict(zip(fed, values, strict=True))
            for m, value in zip(linear, pre, strict=True):
                feed[id(m.node.outputs[0])] = m.node.layer.activation(value)
            (outputs,) = self.graph.run(feed, self.graph.outputs[:1])
            return outputs

        def run(
            pre: dict[int, np.ndarray],
            masked: dict[TensorKey, np.ndarray],
            outside: dict[TensorKey, np.ndarray],
        ) -> np.ndarray:
            arrays = [outside[k] for k in self.outside_keys] + [masked[k] for k in self.masked_keys]
            values = [tf.convert_to_tensor(a) for a in arrays]
            pres = [tf.convert_to_tensor(np.float32(pre[id(m.node)])) for m in linear]
            return keras.ops.convert_to_numpy(tail(values, pres))

        return run

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
        values = self._prefix_model.predict(x, batch_size=self.batch_size, verbose=0)
        values = values if isinstance(values, list) else [values]
        per_sample = np.asarray(values[0], dtype=np.float64)
        arrays = {k: np.asarray(v) for k, v in zip(self._prefix_keys, values[1:], strict=True)}
        return per_sample, arrays

    def _rows_per_chunk(self, total: int) -> int:
        """Samples swept together: as many as fit the budget, so the tail runs few times."""
        keys = {*self.mixer_input_keys, *self.outside_keys}
        per_sample = sum(4 * _size(self._tensor[k]) for k in keys)
        per_sample += sum(8 * _size(m.node.outputs[0]) for m in self.linear)
        return int(min(total, max(self.batch_size, SWEEP_CHUNK_BYTES // max(per_sample, 1))))

    def profile_and_sweep(
        self,
        x: np.ndarray,
        profile_rows: np.ndarray,
        progress: Progress | None = None,
    ) -> tuple[Profile, Sweep]:
        """Profile on `profile_rows`, then predict every sample of `x` for every k."""
        chunks = list(batched([x], self._rows_per_chunk(len(x))))
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
        if self._dense is not None:
            return self._dense.sweep(arrays, order)
        samples = len(next(iter(arrays.values())))
        out = np.empty((len(order) + 1, samples), dtype=np.int64)
        outside = {k: arrays[k] for k in self.outside_keys}
        group = self._group_size(samples)
        group = -(-(len(order) + 1) // -(-(len(order) + 1) // group))  # equal groups, one trace
        pending: list[tuple[int, dict[int, np.ndarray]]] = []
        for k, pre, masked in self._states(arrays, order):
            if group == 1:
                out[k] = self._tail(pre, masked, outside, order[:k])
                continue
            pending.append((k, {key: value.astype(np.float32) for key, value in pre.items()}))
            if len(pending) == group or k == 0:
                out[[k for k, _ in pending]] = self._tail_group(pending, outside, samples)
                pending = []
        return out

    def _states(self, arrays: dict[TensorKey, np.ndarray], order: np.ndarray):
        """(k, mixer pre-activations, masked inputs) for k from all channels pruned down to 0.

        Going from everything pruned back to nothing pruned makes the fully pruned point, where
        outputs are nearly tied, exact; rounding grows only as channels return.
        """
        masked = {}
        for key in self.masked_keys:
            values = arrays[key].copy()
            values[..., np.isin(self.path.feature_maps[key], order)] = 0.0
            masked[key] = values
        pre: dict[int, np.ndarray] = {}
        for m in self.linear:
            others = m.feature_map < 0  # features from outside the pruned layer never go
            base = self._contribution(m, arrays[m.input_key], others) if others.any() else 0.0
            shape = (len(arrays[m.input_key]), *m.node.outputs[0].shape[1:])
            pre[id(m.node)] = np.broadcast_to(base + self._bias(m), shape).astype(np.float64)
        yield len(order), pre, masked
        grouped = {
            id(m.node): _ChannelMajor(m, arrays[m.input_key], self._kernel[id(m.node)])
            for m in self.linear
            if class_name(m.node.layer) == "Dense"
        }
        for k in range(len(order) - 1, -1, -1):
            channel = order[k]
            for m in self.linear:
                if id(m.node) in grouped:
                    pre[id(m.node)] += grouped[id(m.node)].contribution(channel)
                    continue
                features = m.feature_map == channel
                pre[id(m.node)] += self._contribution(m, arrays[m.input_key], features)
            for key in self.masked_keys:
                back = self.path.feature_maps[key] == channel
                masked[key][..., back] = arrays[key][..., back]
            yield k, pre, masked

    def _group_size(self, samples: int) -> int:
        """How many values of k one call of the tail can take, stacked along the batch."""
        if self._tail_fn is None or self.masked_keys or not self.linear:
            return 1
        per_k = samples * sum(4 * _size(m.node.outputs[0]) for m in self.linear)
        per_k += samples * sum(4 * _size(self._tensor[k]) for k in self.outside_keys)
        return int(max(1, min(64, TAIL_GROUP_BYTES // max(per_k, 1))))

    def _tail_group(
        self,
        pending: list[tuple[int, dict[int, np.ndarray]]],
        outside: dict[TensorKey, np.ndarray],
        samples: int,
    ) -> np.ndarray:
        stacked = {
            id(m.node): np.concatenate([pre[id(m.node)] for _, pre in pending]) for m in self.linear
        }
        tiled = {k: np.concatenate([v] * len(pending)) for k, v in outside.items()}
        classes = predicted_classes(self._tail_fn(stacked, {}, tiled))
        return classes.reshape(len(pending), samples)

    def _tail(
        self,
        pre: dict[int, np.ndarray],
        masked: dict[TensorKey, np.ndarray],
        outside: dict[TensorKey, np.ndarray],
        pruned: np.ndarray,
    ) -> np.ndarray:
        if self._tail_fn is not None:
            return predicted_classes(self._tail_fn(pre, masked, outside))
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
        kernel = self._kernel[id(mixer.node)][..., index, :]
        return np.asarray(linear_op(mixer.node.layer, x[..., index], kernel), np.float64)


class _ChannelMajor:
    """A Dense mixer's input and kernel with each channel's features made contiguous.

    After Flatten a channel's features are strided (c, c + C, c + 2C, ...); gathering them once
    instead of once per k turns every contribution into a product of two plain slices.
    """

    def __init__(self, mixer: Mixer, x: np.ndarray, kernel: np.ndarray) -> None:
        order = np.argsort(mixer.feature_map, kind="stable")
        sorted_map = mixer.feature_map[order]
        flat = x.reshape(-1, x.shape[-1])
        self.shape = (*x.shape[:-1], kernel.shape[-1])
        self.x = np.ascontiguousarray(flat[:, order])
        self.kernel = np.ascontiguousarray(kernel[order])
        channels = int(sorted_map.max()) + 1 if len(sorted_map) else 0
        self.start = np.searchsorted(sorted_map, np.arange(channels), side="left")
        self.stop = np.searchsorted(sorted_map, np.arange(channels), side="right")

    def contribution(self, channel: int) -> np.ndarray:
        a, b = self.start[channel], self.stop[channel]
        return (self.x[:, a:b] @ self.kernel[a:b]).reshape(self.shape)


class _DenseSweep:
    """Every k at once for Dense mixers: one batched product, a float64 running sum, the tail.

    For channel order o, the pre-activation with the first k channels pruned is
    `base + c[o[C-1]] + ... + c[o[k]]`, where `c[j]` is channel j's share of the kernel product
    and `base` the bias plus features from outside the pruned layer. Per slice of samples, one
    compiled call makes every share in one batched product, sums them in float64 in exactly
    that order (so k = C, where outputs are nearly tied, is exact) and runs the tail once for
    every k. The sum is a `tf.while_loop` into a `TensorArray`: `tf.cumsum` along the first
    axis, `tf.scan` and a numpy loop (which must copy its result back into a tensor) were
    measured 3-13 times slower.
    """

    def __init__(self, sweeper: ChannelSweeper, features: list[np.ndarray]) -> None:
        self.sweeper = sweeper
        self.mixers = list(sweeper.linear)
        self.features = features  # per mixer: (channels, features per channel) input columns
        self.bias = [sweeper._bias(m) for m in self.mixers]
        self.others = [np.flatnonzero(m.feature_map < 0) for m in self.mixers]
        self.kernels = [sweeper._kernel[id(m.node)] for m in self.mixers]
        self.outside_keys = sweeper.outside_keys
        self._fn = self._compile()

    @classmethod
    def build(cls, sweeper: ChannelSweeper) -> _DenseSweep | None:
        """The fast path when it applies: Dense mixers on flat inputs, nothing masked or late."""
        if sweeper._tail_fn is None or sweeper.masked_keys or sweeper.late or not sweeper.linear:
            return None
        channels = sweeper.path.channels
        features = []
        for m in sweeper.linear:
            if class_name(m.node.layer) != "Dense" or len(m.node.inputs[0].shape) != 2:
                return None
            fmap = m.feature_map
            counts = np.bincount(fmap[fmap >= 0], minlength=channels)
            if len(counts) != channels or counts.min() == 0 or counts.min() != counts.max():
                return None
            by_channel = np.argsort(np.where(fmap < 0, channels, fmap), kind="stable")
            features.append(by_channel[: channels * counts[0]].reshape(channels, counts[0]))
        return cls(sweeper, features)

    def _compile(self) -> Any:
        graph = self.sweeper.graph
        mixers = self.mixers
        outside_keys = self.outside_keys

        # One trace for every call: sample counts vary between calls and slices.
        signature = [
            [tf.TensorSpec((None, int(m.node.inputs[0].shape[-1])), tf.float32) for m in mixers],
            [tf.TensorSpec((None, None), tf.int32) for _ in mixers],
            [tf.TensorSpec((None, None, int(k.shape[-1])), tf.float32) for k in self.kernels],
            [tf.TensorSpec((None, int(k.shape[-1])), tf.float64) for k in self.kernels],
            [
                tf.TensorSpec((None, *self.sweeper._tensor[k].shape[1:]), tf.float32)
                for k in outside_keys
            ],
        ]

        def tail(pres: list[Any], outside: list[Any]) -> Any:
            feed: dict[TensorKey, Any] = dict(zip(outside_keys, outside, strict=True))
            for m, pre in zip(mixers, pres, strict=True):
                feed[id(m.node.outputs[0])] = m.node.layer.activation(tf.cast(pre, tf.float32))
            (outputs,) = graph.run(feed, graph.outputs[:1])
            return outputs

        @tf.function(input_signature=signature, autograph=False)
        def sweep(
            xs: list[Any], cols: list[Any], ws: list[Any], bases: list[Any], outside: list[Any]
        ) -> Any:
            # x: (samples, features); col: (channels in prune order, f); w: (channels, f, units)
            shares = [
                tf.matmul(tf.transpose(tf.gather(x, col, axis=1), (1, 0, 2)), w)
                for x, col, w in zip(xs, cols, ws, strict=True)
            ]
            channels = tf.shape(ws[0])[0]
            rows = tf.TensorArray(tf.float32, size=channels + 1)
            rows = rows.write(channels, tail(bases, outside))

            def step(k: Any, sums: list[Any], rows: Any) -> tuple[Any, list[Any], Any]:
                sums = [
                    acc + tf.cast(s[k], tf.float64) for acc, s in zip(sums, shares, strict=True)
                ]
                return k - 1, sums, rows.write(k, tail(sums, outside))

            _, _, rows = tf.while_loop(
                lambda k, sums, rows: k >= 0, step, (channels - 1, bases, rows)
            )
            return rows.stack()  # (C + 1, samples, outputs)

        return sweep

    def _samples_per_call(self, samples: int, channels: int) -> int:
        """Samples per call: every channel's share (the largest tensor) within the budget."""
        per_sample = sum(4 * channels * int(k.shape[-1]) for k in self.kernels)
        per_sample += sum(4 * int(k.shape[0]) for k in self.kernels)
        return int(max(1, min(samples, TAIL_GROUP_BYTES // max(per_sample, 1))))

    def sweep(self, arrays: dict[TensorKey, np.ndarray], order: np.ndarray) -> np.ndarray:
        channels = len(order)
        samples = len(next(iter(arrays.values())))
        xs, cols, ws, bases = [], [], [], []
        for m, features, kernel, bias, others in zip(
            self.mixers, self.features, self.kernels, self.bias, self.others, strict=True
        ):
            ordered = features[order]  # (channels, f): input columns of each channel, in order
            cols.append(tf.constant(ordered, tf.int32))
            ws.append(tf.constant(np.ascontiguousarray(kernel[ordered]), tf.float32))
            x = np.asarray(arrays[m.input_key], np.float32)
            xs.append(x)
            base = np.zeros((samples, kernel.shape[-1])) + bias
            if len(others):
                base = base + np.tensordot(x[:, others], kernel[others], axes=([-1], [0]))
            bases.append(base)
        out = np.empty((channels + 1, samples), dtype=np.int64)
        step = self._samples_per_call(samples, channels)
        step = -(-samples // -(-samples // step))  # near-equal slices: at most two traces
        for start in range(0, samples, step):
            stop = min(samples, start + step)
            outputs = self._fn(
                [tf.constant(x[start:stop]) for x in xs],
                cols,
                ws,
                [tf.constant(base[start:stop], tf.float64) for base in bases],
                [tf.constant(arrays[k][start:stop], tf.float32) for k in self.outside_keys],
            )
            values = keras.ops.convert_to_numpy(outputs)
            classes = predicted_classes(values.reshape(-1, values.shape[-1]))
            out[:, start:stop] = classes.reshape(channels + 1, stop - start)
        return out


def linear_op(layer: Any, x: np.ndarray, kernel: Any) -> np.ndarray:
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
