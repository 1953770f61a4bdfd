"""Channel surgery on Keras 3 models: physically remove pruned channels, or zero them exactly.

The model is cloned with the pruned layer narrowed (fewer filters or units); Keras infers every
other shape when the clone is called, and the weights are copied over, sliced where a layer
carries the pruned channels (the layer itself, per-channel layers after it, the input rows of
each mixer). When a channel also feeds a layer we cannot narrow (an Add shared with another
branch), the layer keeps its width and the channel's weights are set to zero instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from fineprune.errors import PruningError
from fineprune.prune.channels import ChannelPath, class_name, weighted_chain_layers


@dataclass
class CutResult:
    model: keras.Model
    mode: str  # "removed" | "zeroed" | "none"
    reason: str
    adjusted_layers: list[str]
    zeroed_weights: list[tuple[str, int, np.ndarray]]  # (layer, weight index, mask of zeros)


def cut(model: keras.Model, path: ChannelPath, pruned: np.ndarray) -> CutResult:
    """A new model equal to `model` with the `pruned` channels of the path's layer gone."""
    pruned = np.asarray(pruned, dtype=np.int64)
    if len(pruned) == 0:
        return CutResult(copy_model(model), "none", "no channel pruned", [], [])
    if len(pruned) >= path.channels and path.removable:
        raise PruningError(
            f"cannot remove all {path.channels} channels of {path.layer.name!r}; keep at least one"
        )
    if path.removable:
        return _remove(model, path, pruned)
    if not path.zero_safe:
        raise PruningError(
            f"channels of {path.layer.name!r} reach {', '.join(path.barriers)} through an "
            "activation with f(0) != 0, so they can be neither removed nor zeroed exactly"
        )
    return _zero(model, path, pruned)


def copy_model(model: keras.Model) -> keras.Model:
    """An independent model with the same graph and weights: training one leaves the other."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def _remove(model: keras.Model, path: ChannelPath, pruned: np.ndarray) -> CutResult:
    target = path.layer.name
    kept_channels = np.setdiff1d(np.arange(path.channels), pruned)
    width_key = "units" if class_name(path.layer) == "Dense" else "filters"

    def clone_layer(layer: Any) -> Any:
        config = layer.get_config()
        if layer.name == target:
            config[width_key] = len(kept_channels)
        return layer.__class__.from_config(config)

    clone = keras.models.clone_model(model, clone_function=clone_layer)

    slicers: dict[str, Any] = {target: lambda ws: _slice_output(ws, kept_channels)}
    for gnode, fmap in weighted_chain_layers(path):
        keep = path.keep_mask(fmap, pruned)
        slicers[gnode.name] = _per_channel_slicer(gnode.layer, keep)
    for mixer in path.mixers:
        keep = path.keep_mask(mixer.feature_map, pruned)
        slicers[mixer.node.name] = lambda ws, keep=keep: _slice_inputs(ws, keep)

    _transfer(model, clone, slicers)
    adjusted = [name for name in slicers if name != target]
    reason = (
        f"{len(pruned)} of {path.channels} channels removed from {target!r}; "
        f"{len(adjusted)} downstream layer(s) narrowed to match"
    )
    return CutResult(clone, "removed", reason, adjusted, [])


def _zero(model: keras.Model, path: ChannelPath, pruned: np.ndarray) -> CutResult:
    clone = copy_model(model)
    zeroed: list[tuple[str, int, np.ndarray]] = []

    def zero(layer_name: str, index: int, mask: np.ndarray) -> None:
        layer = clone.get_layer(layer_name)
        weights = layer.get_weights()
        weights[index] = np.where(mask, 0.0, weights[index]).astype(weights[index].dtype)
        layer.set_weights(weights)
        zeroed.append((layer_name, index, mask))

    target = path.layer
    pruned_mask = np.isin(np.arange(path.channels), pruned)
    for i, w in enumerate(target.get_weights()):
        zero(target.name, i, np.broadcast_to(pruned_mask, w.shape))
    for gnode, fmap in weighted_chain_layers(path):
        hit = np.isin(fmap, pruned)
        layer = gnode.layer
        for i, w in enumerate(layer.get_weights()):
            if class_name(layer) == "BatchNormalization" and i >= _affine_count(layer):
                continue  # moving statistics stay; gamma = beta = 0 already gives 0
            zero(gnode.name, i, _channel_mask(layer, w.shape, hit))
    reason = (
        f"channels of {target.name!r} also feed {', '.join(path.barriers)}, which needs the "
        f"full width; {len(pruned)} of {path.channels} channels were zeroed exactly instead "
        "of removed (the layer keeps its shape and its parameter count)"
    )
    adjusted = [g.name for g, _ in weighted_chain_layers(path)]
    return CutResult(clone, "zeroed", reason, adjusted, zeroed)


def _affine_count(layer: Any) -> int:
    return int(bool(getattr(layer, "scale", True))) + int(bool(getattr(layer, "center", True)))


def _channel_mask(layer: Any, shape: tuple[int, ...], hit: np.ndarray) -> np.ndarray:
    if class_name(layer).startswith("DepthwiseConv") and len(shape) > 1:
        return np.broadcast_to(hit[:, None], shape)  # kernel (..., channels, multiplier)
    return np.broadcast_to(hit, shape)


def _slice_output(weights: list[np.ndarray], kept: np.ndarray) -> list[np.ndarray]:
    return [w[..., kept] for w in weights]


def _slice_inputs(weights: list[np.ndarray], keep: np.ndarray) -> list[np.ndarray]:
    # Dense kernel (features, units) and Conv kernel (..., in, out): inputs on axis -2.
    kernel, *rest = weights
    return [np.compress(keep, kernel, axis=kernel.ndim - 2), *rest]


def _per_channel_slicer(layer: Any, keep: np.ndarray):
    depthwise = class_name(layer).startswith("DepthwiseConv")

    def slicer(weights: list[np.ndarray]) -> list[np.ndarray]:
        out = []
        for w in weights:
            if depthwise and w.ndim > 1:
                out.append(np.compress(keep, w, axis=w.ndim - 2))
            elif w.shape and w.shape[-1] == len(keep):
                out.append(np.compress(keep, w, axis=w.ndim - 1))
            else:
                out.append(w)  # shared parameters (PReLU with shared axes)
        return out

    return slicer


def _transfer(source: keras.Model, target: keras.Model, slicers: dict[str, Any]) -> None:
    for old, new in zip(_flat_layers(source), _flat_layers(target), strict=True):
        weights = old.get_weights()
        if old.name in slicers:
            weights = slicers[old.name](weights)
        expected = [tuple(w.shape) for w in new.get_weights()]
        got = [tuple(w.shape) for w in weights]
        if expected != got:
            raise PruningError(
                f"surgery produced weights of shape {got} for layer {old.name!r}, "
                f"which expects {expected}"
            )
        new.set_weights(weights)


def _flat_layers(model: keras.Model) -> list[Any]:
    return list(model.layers)
