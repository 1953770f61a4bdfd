"""Where a pruned layer's channels go: through which per-channel layers, into which mixers.

A channel removed from a convolution disappears through the per-channel layers that follow it
(BatchNormalization, activations, pooling, dropout, Flatten) up to the first layer that mixes
channels. Pruning means zeroing the channel at those mixers' inputs. This module finds them and
keeps, for every tensor on the way, a *feature map*: for each index of the last axis, the pruned
layer's channel it carries (or -1 for features from elsewhere, e.g. the other half of a
Concatenate).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from fineprune.errors import PruningError
from fineprune.prune.graph import GraphNode, ModelGraph, TensorKey

PRUNABLE = ("Conv1D", "Conv2D", "Conv3D", "Dense")
CONVOLUTIONS = ("Conv1D", "Conv2D", "Conv3D")

# Per-channel layers: output channel i depends on input channel i only, last axis kept.
ELEMENTWISE = {
    "Activation",
    "ReLU",
    "LeakyReLU",
    "ELU",
    "PReLU",
    "Dropout",
    "SpatialDropout1D",
    "SpatialDropout2D",
    "SpatialDropout3D",
    "GaussianDropout",
    "GaussianNoise",
    "AlphaDropout",
    "ActivityRegularization",
    "Identity",
    "BatchNormalization",
}
SPATIAL = {
    "MaxPooling1D",
    "MaxPooling2D",
    "MaxPooling3D",
    "AveragePooling1D",
    "AveragePooling2D",
    "AveragePooling3D",
    "ZeroPadding1D",
    "ZeroPadding2D",
    "ZeroPadding3D",
    "Cropping1D",
    "Cropping2D",
    "Cropping3D",
    "UpSampling1D",
    "UpSampling2D",
    "UpSampling3D",
    "GlobalAveragePooling1D",
    "GlobalAveragePooling2D",
    "GlobalAveragePooling3D",
    "GlobalMaxPooling1D",
    "GlobalMaxPooling2D",
    "GlobalMaxPooling3D",
}
# Activations with f(0) == 0: a channel zeroed before them stays zero after them.
ZERO_PRESERVING = {
    "relu",
    "relu6",
    "leaky_relu",
    "elu",
    "selu",
    "gelu",
    "silu",
    "swish",
    "tanh",
    "linear",
    "prelu",
    "softsign",
    "mish",
    "hard_silu",
    "hard_swish",
    "celu",
    "sparse_plus",
    "squareplus",
    "tanh_shrink",
    "hard_tanh",
    "soft_shrink",
    "hard_shrink",
}
ACTIVATION_LAYERS = {"Activation", "ReLU", "LeakyReLU", "ELU", "PReLU"}
_LAYER_ACTIVATIONS = {"ReLU": "relu", "LeakyReLU": "leaky_relu", "ELU": "elu", "PReLU": "prelu"}


def class_name(layer: Any) -> str:
    return type(layer).__name__


def activation_name(layer: Any) -> str:
    """Name of the activation a layer applies last ('linear' when none)."""
    kind = class_name(layer)
    if kind in _LAYER_ACTIVATIONS:
        return _LAYER_ACTIVATIONS[kind]
    fn = getattr(layer, "activation", None)
    if fn is None:
        return "linear"
    return str(getattr(fn, "__name__", fn))


@dataclass
class Mixer:
    """A layer that combines the pruned channels with others; masking happens at its input."""

    node: GraphNode
    input_key: TensorKey
    feature_map: np.ndarray
    linear: bool  # Dense or Conv with groups=1: its pre-activation is a sum over channels
    removable: bool  # its weights can be sliced to drop the channels


@dataclass
class ChannelPath:
    """Everything between the pruned layer and the mixers that consume its channels."""

    graph: ModelGraph
    layer: Any
    node: GraphNode
    channels: int
    feature_maps: dict[TensorKey, np.ndarray]
    chain: list[GraphNode]
    mixers: list[Mixer]
    profile_key: TensorKey
    profile_layer: str
    zero_safe: bool
    barriers: list[str] = field(default_factory=list)
    # Chain tensors computable before any mixer runs (not merged with a mixer's output).
    clean_keys: set[TensorKey] = field(default_factory=set)

    @property
    def removable(self) -> bool:
        return not self.barriers and all(m.removable for m in self.mixers)

    def mixer_input_tensor(self, mixer: Mixer) -> Any:
        return next(t for t in mixer.node.inputs if id(t) == mixer.input_key)

    def keep_mask(self, feature_map: np.ndarray, pruned: np.ndarray) -> np.ndarray:
        """True for the features that survive when `pruned` channels are gone."""
        return ~np.isin(feature_map, pruned)


def default_layer(graph: ModelGraph) -> str:
    """The last convolution of the model, as the paper prunes."""
    convs = [n.name for n in graph.nodes if class_name(n.layer) in CONVOLUTIONS]
    if not convs:
        raise PruningError(
            "the model has no Conv1D/Conv2D/Conv3D layer to prune; name a Dense layer with --layer"
        )
    return convs[-1]


def trace_channels(graph: ModelGraph, layer_name: str | None) -> ChannelPath:
    """Follow the channels of `layer_name` forward to every layer that mixes them."""
    name = layer_name or default_layer(graph)
    nodes = graph.nodes_of(name)
    if not nodes:
        known = ", ".join(graph.layer_names()[:30])
        raise PruningError(f"no layer named {name!r} in the model (layers: {known})")
    if len(nodes) > 1:
        raise PruningError(f"layer {name!r} is shared (called {len(nodes)} times); cannot prune it")
    node = nodes[0]
    layer = node.layer
    kind = class_name(layer)
    if kind not in PRUNABLE:
        raise PruningError(
            f"layer {name!r} is a {kind}; only {', '.join(PRUNABLE)} layers can be pruned"
        )
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise PruningError(f"layer {name!r} is channels_first; only channels_last is supported")
    if getattr(layer, "groups", 1) != 1:
        raise PruningError(f"layer {name!r} is a grouped convolution; cannot prune it")
    if kind == "Dense" and activation_name(layer) == "softmax":
        raise PruningError(f"layer {name!r} is the softmax output; its units are the classes")
    if any(id(t) in {id(o) for o in graph.outputs} for t in node.outputs):
        raise PruningError(f"layer {name!r} is a model output; its channels are the predictions")

    channels = int(node.outputs[0].shape[-1])
    out_key = id(node.outputs[0])
    feature_maps: dict[TensorKey, np.ndarray] = {out_key: np.arange(channels)}
    # zero_ok[t]: with the channel's weights zeroed, is the channel exactly 0 in tensor t?
    zero_ok: dict[TensorKey, bool] = {out_key: activation_name(layer) in ZERO_PRESERVING}
    clean: set[TensorKey] = {out_key}
    tainted: set[TensorKey] = set()  # depends on the pruned layer through a mixer
    chain: list[GraphNode] = []
    mixers: list[Mixer] = []
    barriers: list[str] = []
    zero_safe = True
    profile_key = out_key
    profile_layer = name
    profile_candidate = activation_name(layer) == "linear"

    start = graph.nodes.index(node)
    for gnode in graph.nodes[start + 1 :]:
        tracked = [k for k in gnode.input_keys() if k in feature_maps]
        if not tracked:
            if any(k in tainted for k in gnode.input_keys()):
                tainted.update(gnode.output_keys())
            continue
        kind = class_name(gnode.layer)
        in_key = tracked[0]
        fmap = feature_maps[in_key]
        if kind == "Concatenate" and _last_axis(gnode.layer, gnode.inputs[0]):
            parts = [feature_maps.get(id(t), np.full(int(t.shape[-1]), -1)) for t in gnode.inputs]
            out = id(gnode.outputs[0])
            feature_maps[out] = np.concatenate(parts)
            zero_ok[out] = all(zero_ok.get(k, True) for k in tracked)
            if all(k in clean for k in tracked) and not tainted & set(gnode.input_keys()):
                clean.add(out)
            chain.append(gnode)
            continue
        if len(gnode.inputs) == 1 and _is_per_channel(gnode.layer, gnode.inputs[0]):
            out = id(gnode.outputs[0])
            feature_maps[out] = fmap
            zero_ok[out] = _zero_after(gnode.layer, zero_ok[in_key])
            if in_key in clean:
                clean.add(out)
            chain.append(gnode)
            if (
                profile_candidate
                and kind in ACTIVATION_LAYERS
                and np.array_equal(fmap, np.arange(channels))
            ):
                profile_key, profile_layer, profile_candidate = out, gnode.name, False
            continue
        if kind == "Flatten" and len(gnode.inputs) == 1:
            spatial = int(np.prod([int(d) for d in gnode.inputs[0].shape[1:-1]]))
            out = id(gnode.outputs[0])
            feature_maps[out] = np.tile(fmap, spatial)
            zero_ok[out] = zero_ok[in_key]
            if in_key in clean:
                clean.add(out)
            chain.append(gnode)
            continue
        if not zero_ok[in_key]:
            zero_safe = False
        tainted.update(gnode.output_keys())
        if kind == "Dense" or (
            kind in CONVOLUTIONS
            and getattr(gnode.layer, "groups", 1) == 1
            and getattr(gnode.layer, "data_format", "channels_last") == "channels_last"
        ):
            mixers.append(Mixer(gnode, in_key, fmap, linear=True, removable=True))
        else:
            mixers.append(Mixer(gnode, in_key, fmap, linear=False, removable=False))
            barriers.append(f"{gnode.name} ({kind})")

    if not mixers:
        raise PruningError(f"the channels of {name!r} reach no layer that uses them")
    return ChannelPath(
        graph=graph,
        layer=layer,
        node=node,
        channels=channels,
        feature_maps=feature_maps,
        chain=chain,
        mixers=mixers,
        profile_key=profile_key,
        profile_layer=profile_layer,
        zero_safe=zero_safe,
        barriers=barriers,
        clean_keys=clean,
    )


def _last_axis(layer: Any, tensor: Any) -> bool:
    axis = int(getattr(layer, "axis", -1))
    return axis in (-1, len(tensor.shape) - 1)


def _is_per_channel(layer: Any, tensor: Any) -> bool:
    kind = class_name(layer)
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return False
    if kind == "BatchNormalization":
        return _last_axis(layer, tensor)
    if kind == "Activation":
        return activation_name(layer) not in ("softmax", "log_softmax")
    if kind == "PReLU":
        return True
    if kind == "DepthwiseConv2D" or kind == "DepthwiseConv1D":
        return int(getattr(layer, "depth_multiplier", 1)) == 1
    return kind in ELEMENTWISE or kind in SPATIAL


def _zero_after(layer: Any, zero_before: bool) -> bool:
    kind = class_name(layer)
    if kind in ("BatchNormalization", "DepthwiseConv2D", "DepthwiseConv1D"):
        return True  # their per-channel weights get zeroed too
    if kind in ACTIVATION_LAYERS:
        return zero_before and activation_name(layer) in ZERO_PRESERVING
    return zero_before


def weighted_chain_layers(path: ChannelPath) -> list[tuple[GraphNode, np.ndarray]]:
    """Per-channel layers with weights on the path, with the feature map of their input."""
    found = []
    for gnode in path.chain:
        if gnode.layer.weights and class_name(gnode.layer) != "Concatenate":
            found.append((gnode, path.feature_maps[id(gnode.inputs[0])]))
    return found


def count_parameters(model: keras.Model) -> int:
    return int(sum(int(np.prod(w.shape)) for w in model.weights))
