"""What a model config says plainly about the model: layer names, input shape, class count.

Read from the config as data, for the API's checks of the uploaded data and options; each
answer is None when the config does not say it plainly, so no caller refuses on a guess.
"""

from __future__ import annotations

from typing import Any

MAX_DEPTH = 200
_MODEL_CLASSES = frozenset({"Functional", "Model", "Sequential"})


def layer_index(config: dict[str, Any]) -> dict[str, str]:
    """Layer name -> class name for every layer, nested models included, from the config."""
    found: dict[str, str] = {}
    for layer in _layer_dicts(config):
        name, kind = _name_of(layer), layer.get("class_name")
        if isinstance(name, str) and isinstance(kind, str):
            found[name] = kind
        if kind in ("Sequential", "Functional", "Model"):
            found.update(layer_index(layer))
    return found


def _layer_dicts(model: dict[str, Any]) -> list[dict[str, Any]]:
    config = model.get("config")
    layers = config.get("layers") if isinstance(config, dict) else None
    if not isinstance(layers, list):
        return []
    return [item for item in layers if isinstance(item, dict)]


def _name_of(layer: dict[str, Any]) -> Any:
    if "name" in layer:
        return layer["name"]
    config = layer.get("config")
    return config.get("name") if isinstance(config, dict) else None


def _as_shape(value: Any) -> tuple[int | None, ...] | None:
    if not isinstance(value, list) or not value:
        return None
    if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in value):
        return None
    return tuple(value)


def _input_layer_shape(layer: dict[str, Any]) -> tuple[int | None, ...] | None:
    config = layer.get("config")
    if not isinstance(config, dict):
        return None
    for key in ("batch_shape", "batch_input_shape"):
        shape = _as_shape(config.get(key))
        if shape is not None:
            return shape
    return None


def _first_input_name(model: dict[str, Any]) -> Any:
    """First name in Functional `input_layers`: [name, 0, 0], [[name, 0, 0], ...] or a dict."""
    config = model.get("config")
    entry = config.get("input_layers") if isinstance(config, dict) else None
    if isinstance(entry, dict):
        entry = next(iter(entry.values()), None)
    while isinstance(entry, list) and entry and isinstance(entry[0], list):
        entry = entry[0]
    if isinstance(entry, list) and entry and isinstance(entry[0], str):
        return entry[0]
    return None


def first_input_shape(model: dict[str, Any]) -> tuple[int | None, ...] | None:
    layers = _layer_dicts(model)
    first = _first_input_name(model)
    if first is not None:
        for layer in layers:
            if _name_of(layer) == first:
                return _input_layer_shape(layer)
    for layer in layers:  # Sequential: an InputLayer, or shape on the first layer (Keras 2)
        shape = _input_layer_shape(layer)
        if shape is not None:
            return shape
        if layer.get("class_name") != "InputLayer":
            break
    config = model.get("config")
    return _as_shape(config.get("build_input_shape")) if isinstance(config, dict) else None


# Layers whose output is as wide as their input: the class count passes through them.
_SAME_WIDTH_LAYERS = frozenset(
    {
        "Activation", "ActivityRegularization", "AlphaDropout", "BatchNormalization", "Dropout",
        "ELU", "GaussianDropout", "GaussianNoise", "Identity", "LayerNormalization", "LeakyReLU",
        "PReLU", "RMSNormalization", "ReLU", "Softmax", "UnitNormalization",
    }
)  # fmt: skip


def output_units(model: dict[str, Any], depth: int = 0) -> int | None:
    """The class count the config states plainly: `units` of the Dense making the output.

    Followed back from the (single) output through activations, dropout and normalization,
    into nested models; None for anything else, so callers never refuse on a guess.
    """
    if depth > MAX_DEPTH:
        return None
    layers = _layer_dicts(model)
    if model.get("class_name") == "Sequential":
        for layer in reversed(layers):
            kind = layer.get("class_name")
            if kind in _SAME_WIDTH_LAYERS:
                continue
            return _units_of(layer, depth)
        return None
    by_name = {_name_of(layer): layer for layer in layers if isinstance(_name_of(layer), str)}
    name = _single_output_name(model)
    for _ in range(len(by_name) + 1):
        layer = by_name.get(name) if isinstance(name, str) else None
        if layer is None:
            return None
        if layer.get("class_name") not in _SAME_WIDTH_LAYERS:
            return _units_of(layer, depth)
        name = _first_inbound_name(layer)
    return None


def _units_of(layer: dict[str, Any], depth: int) -> int | None:
    kind = layer.get("class_name")
    if kind in _MODEL_CLASSES:
        return output_units(layer, depth + 1)
    if kind != "Dense":
        return None
    config = layer.get("config")
    units = config.get("units") if isinstance(config, dict) else None
    return units if isinstance(units, int) and not isinstance(units, bool) else None


def _single_output_name(model: dict[str, Any]) -> Any:
    """The output layer's name when the model has exactly one output: [name, 0, 0] or [[...]]."""
    config = model.get("config")
    entry = config.get("output_layers") if isinstance(config, dict) else None
    if isinstance(entry, list) and len(entry) == 1 and isinstance(entry[0], list):
        entry = entry[0]
    if isinstance(entry, list) and entry and isinstance(entry[0], str):
        return entry[0]
    return None


def _first_inbound_name(layer: dict[str, Any]) -> Any:
    """Name of the layer feeding this one's first input, Keras 3 or legacy Keras 2 config."""
    nodes = layer.get("inbound_nodes")
    if not isinstance(nodes, list) or len(nodes) != 1:
        return None
    node = nodes[0]
    if isinstance(node, dict):  # Keras 3: {"args": [{"config": {"keras_history": [...]}}]}
        args = node.get("args")
        first = args[0] if isinstance(args, list) and args else None
        config = first.get("config") if isinstance(first, dict) else None
        history = config.get("keras_history") if isinstance(config, dict) else None
        return history[0] if isinstance(history, list) and history else None
    if isinstance(node, list) and node and isinstance(node[0], list) and node[0]:
        return node[0][0]  # Keras 2: [[name, node_index, tensor_index, kwargs]]
    return None
