"""The weights a model config declares, worked out from the config alone (no Keras).

Keras allocates every variable when it builds a layer, before it reads a single weight, so a
69 KB archive whose Dense declares 56,000 x 56,000 asks for 12 GiB before any weights file
could disagree. Shapes come from each layer's `build_config` (Keras 3 writes one for every
built layer) or, in legacy configs, from the input shape carried through the graph. Layers
whose weights this module cannot work out are named in `unknown`; the job's process measures
those exactly before it builds anything (`fineprune.load.loading`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from fineprune.load.inspection.objects import MODEL_CLASSES, LayerEntry
from fineprune.text import quoted

Shape = tuple[int | None, ...]
"""A tensor's shape with its batch dimension, None where unknown."""

_SAME_SHAPE = frozenset(
    {
        "Activation", "ActivityRegularization", "AlphaDropout", "AutoContrast",
        "BatchNormalization", "Dropout", "ELU", "Equalization", "GaussianDropout",
        "GaussianNoise", "GroupNormalization", "Identity", "LayerNormalization", "LeakyReLU",
        "Masking", "Normalization", "PReLU", "RMSNormalization", "RandomBrightness",
        "RandomColorDegeneration", "RandomColorJitter", "RandomContrast", "RandomFlip",
        "RandomGaussianBlur", "RandomGrayscale", "RandomHue", "RandomInvert",
        "RandomPerspective", "RandomPosterization", "RandomRotation", "RandomSaturation",
        "RandomSharpness", "RandomShear", "RandomTranslation", "RandomZoom", "ReLU",
        "Rescaling", "Softmax", "Solarization", "SpatialDropout1D", "SpatialDropout2D",
        "SpatialDropout3D", "UnitNormalization", "AugMix", "RandAugment", "RandomErasing",
        "RandomElasticTransform", "CutMix", "MixUp",
    }
)  # fmt: skip
_MERGE = frozenset({"Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum"})
# Layers with no weights, or only ones sized by the config's own (bounded) literals.
_WEIGHTLESS = (
    _SAME_SHAPE - {"BatchNormalization", "GroupNormalization", "LayerNormalization"}
    - {"Normalization", "PReLU", "RMSNormalization"}
) | _MERGE | frozenset(
    {
        "InputLayer", "Flatten", "Reshape", "Permute", "RepeatVector", "Concatenate", "Dot",
        "Attention", "AdditiveAttention", "CategoryEncoding", "Hashing", "HashedCrossing",
        "Discretization", "IntegerLookup", "StringLookup", "TextVectorization", "Resizing",
        "CenterCrop", "RandomCrop", "MaxNumBoundingBoxes", "MelSpectrogram",
        "ContrastLimitedAdaptiveHistogramEqualization",
        "Cropping1D", "Cropping2D", "Cropping3D", "ZeroPadding1D", "ZeroPadding2D",
        "ZeroPadding3D", "UpSampling1D", "UpSampling2D", "UpSampling3D",
        "AdaptiveAveragePooling1D", "AdaptiveAveragePooling2D", "AdaptiveAveragePooling3D",
        "AdaptiveMaxPooling1D", "AdaptiveMaxPooling2D", "AdaptiveMaxPooling3D",
        "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D", "AveragePooling2D",
        "AveragePooling3D", "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D",
        "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D",
    }
)  # fmt: skip
_ALIASES = {
    "Convolution1D": "Conv1D", "Convolution2D": "Conv2D", "Convolution3D": "Conv3D",
    "Convolution1DTranspose": "Conv1DTranspose", "Convolution2DTranspose": "Conv2DTranspose",
    "Convolution3DTranspose": "Conv3DTranspose", "SeparableConvolution1D": "SeparableConv1D",
    "SeparableConvolution2D": "SeparableConv2D", "AvgPool1D": "AveragePooling1D",
    "AvgPool2D": "AveragePooling2D", "AvgPool3D": "AveragePooling3D",
    "MaxPool1D": "MaxPooling1D", "MaxPool2D": "MaxPooling2D", "MaxPool3D": "MaxPooling3D",
    "GlobalAvgPool1D": "GlobalAveragePooling1D", "GlobalAvgPool2D": "GlobalAveragePooling2D",
    "GlobalAvgPool3D": "GlobalAveragePooling3D", "GlobalMaxPool1D": "GlobalMaxPooling1D",
    "GlobalMaxPool2D": "GlobalMaxPooling2D", "GlobalMaxPool3D": "GlobalMaxPooling3D",
    "GroupedQueryAttention": "GroupQueryAttention",
}  # fmt: skip
_RANK = re.compile(r"(\d)D")
_BYTES_PER_DTYPE = {"float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "uint8": 1}


@dataclass
class WeightEstimate:
    """Parameters and bytes of the weights the config declares, as far as they could be told."""

    parameters: int = 0
    bytes: int = 0
    largest: tuple[str, int] | None = None
    """The layer holding the most bytes, and how many."""
    unknown: list[str] = field(default_factory=list)
    """Layers whose weights depend on shapes this module could not work out."""

    def add(self, label: str, counts: list[int], itemsize: int) -> None:
        parameters = sum(counts)
        nbytes = parameters * itemsize
        self.parameters += parameters
        self.bytes += nbytes
        if self.largest is None or nbytes > self.largest[1]:
            self.largest = (label, nbytes)


def estimate(root: LayerEntry) -> WeightEstimate:
    """The weights of the model `root`, every nested model and wrapped layer included."""
    found = WeightEstimate()
    _Estimator(found).model(root, None)
    return found


class _Estimator:
    def __init__(self, found: WeightEstimate) -> None:
        self.found = found

    def model(self, entry: LayerEntry, given: Any) -> Any:
        """Weights of a nested or top model; returns its output shape when it can be told."""
        if entry.class_name == "Sequential":
            shape = _as_shape(entry.config.get("build_input_shape")) or _built_shape(entry)
            shape = shape or given
            for child in entry.children:
                shape = self.layer(child, shape)
            return shape
        return self.functional(entry)

    def functional(self, entry: LayerEntry) -> Any:
        outputs: dict[str, list[Any]] = {}
        for child in entry.children:
            inbound = _inbound(child.node)
            given: Any = None
            if inbound:
                shapes = [_lookup(outputs, ref) for ref in inbound[0]]
                given = shapes[0] if len(shapes) == 1 else shapes
                if any(s is None for s in shapes):
                    given = None
            shape = self.layer(child, given)
            produced = [shape]
            for node in inbound[1:]:  # a shared layer: weights once, an output per call
                shapes = [_lookup(outputs, ref) for ref in node]
                again = shapes[0] if len(shapes) == 1 else shapes
                produced.append(_output_shape(child, again) if None not in shapes else None)
            if child.name is not None:
                outputs[child.name] = produced
        refs = _refs(entry.config.get("output_layers"))
        shapes = [_lookup(outputs, ref) for ref in refs]
        return shapes[0] if len(shapes) == 1 else None

    def layer(self, entry: LayerEntry, given: Any) -> Any:
        """Add a layer's weights; return its output shape (None when unknown)."""
        kind = _ALIASES.get(entry.class_name, entry.class_name)
        shape = _built_shape(entry) or given
        if kind in MODEL_CLASSES:
            return self.model(entry, shape)
        label = quoted(entry.name) if entry.name else f"of class {quoted(entry.class_name)}"
        if kind in ("Bidirectional", "TimeDistributed", "SpectralNormalization", "RNN"):
            return self.wrapper(entry, kind, shape, label)
        if kind == "StackedRNNCells":
            size = _last(shape)
            for cell in entry.children:
                self.layer(cell, (None, size) if size else None)
                size = _int(cell.config.get("units")) or None
            return None
        counts = _weights(kind, entry.config, shape, entry.node)
        if counts is None:
            if kind not in _WEIGHTLESS:
                self.found.unknown.append(label)
        else:
            self.found.add(label, counts, _itemsize(entry.config))
        return _output_shape(entry, shape)

    def wrapper(self, entry: LayerEntry, kind: str, shape: Any, label: str) -> Any:
        inner = entry.children
        if not inner:
            self.found.unknown.append(label)
            return None
        if kind == "TimeDistributed":
            step = (shape[0], *shape[2:]) if isinstance(shape, tuple) and len(shape) > 2 else None
            out = self.layer(inner[0], step)
            if isinstance(out, tuple) and isinstance(shape, tuple):
                return (out[0], shape[1], *out[1:])
            return None
        if kind == "RNN":
            size = _last(shape)
            self.layer(inner[0], (None, size) if size else None)
            return _rnn_output(entry.config, shape, _int(inner[0].config.get("units")))
        out = None
        for layer in inner:  # Bidirectional: forward (and backward) layers; SpectralNorm: one
            out = self.layer(layer, shape)
        if kind == "Bidirectional" and len(inner) == 1:
            self.layer(inner[0], shape)  # the backward copy Keras makes of the forward layer
        concat = entry.config.get("merge_mode", "concat") == "concat"
        if kind == "Bidirectional" and concat and isinstance(out, tuple) and out[-1] is not None:
            return (*out[:-1], 2 * out[-1])
        return out


# --------------------------------------------------------------------------- weights


def _weights(kind: str, c: dict[str, Any], shape: Any, node: dict[str, Any]) -> list[int] | None:
    """Element counts of each weight of one layer, or None when they cannot be told."""
    if kind == "Embedding":
        return _product(c.get("input_dim"), c.get("output_dim"))
    if kind == "ReversibleEmbedding":
        table = _product(c.get("input_dim"), c.get("output_dim"))
        if table is None:
            return None
        return table * (1 if c.get("tie_weights", True) else 2)
    if kind == "STFTSpectrogram":
        frame = _int(c.get("frame_length"))
        fft = _int(c.get("fft_length")) or frame
        return None if not frame or not fft else [frame * (fft // 2 + 1) * 2]
    if kind == "MultiHeadAttention":
        return _attention(c, node)
    if kind in _WEIGHTLESS or not isinstance(shape, tuple):
        return None
    bias = bool(c.get("use_bias", True))
    if kind == "Dense":
        return _dense(_last(shape), _int(c.get("units")), bias)
    if kind.startswith(("Conv", "SeparableConv", "DepthwiseConv")) and "LSTM" not in kind:
        return _conv(kind, c, shape, bias)
    if kind in ("BatchNormalization", "LayerNormalization", "GroupNormalization"):
        size = _axis_size(shape, c.get("axis", -1))
        if size is None:
            return None
        copies = {"BatchNormalization": 2, "LayerNormalization": 0, "GroupNormalization": 0}[kind]
        copies += bool(c.get("scale", True)) + bool(c.get("center", True))
        return [size] * copies
    if kind in ("RMSNormalization", "Normalization"):
        size = _axis_size(shape, c.get("axis", -1))
        return None if size is None else ([size] if kind == "RMSNormalization" else [size, size, 1])
    if kind == "PReLU":
        shared = c.get("shared_axes") or []
        shared = [shared] if isinstance(shared, int) else shared
        dims = [1 if i + 1 in shared else d for i, d in enumerate(shape[1:])]
        return _product(*dims)
    if kind in ("SimpleRNN", "GRU", "LSTM", "SimpleRNNCell", "GRUCell", "LSTMCell"):
        return _recurrent(kind, _last(shape), _int(c.get("units")), bias, c)
    if kind.startswith("ConvLSTM"):
        return _conv_lstm(c, shape, bias)
    return None


def _dense(inputs: int | None, units: int | None, bias: bool) -> list[int] | None:
    if not inputs or not units:
        return None
    return [inputs * units, units if bias else 0]


def _conv(kind: str, c: dict[str, Any], shape: Shape, bias: bool) -> list[int] | None:
    digits = _RANK.search(kind)
    if digits is None:
        return None
    rank = int(digits.group(1))
    kernel = _ints(c.get("kernel_size"), rank)
    channels = _channels(c, shape)
    if kernel is None or channels is None:
        return None
    window = math.prod(kernel)
    if kind.startswith("DepthwiseConv"):
        multiplier = _int(c.get("depth_multiplier")) or 1
        return [window * channels * multiplier, channels * multiplier if bias else 0]
    filters = _int(c.get("filters"))
    if not filters:
        return None
    if kind.startswith("SeparableConv"):
        multiplier = _int(c.get("depth_multiplier")) or 1
        depthwise = window * channels * multiplier
        return [depthwise, channels * multiplier * filters, filters if bias else 0]
    groups = _int(c.get("groups")) or 1
    return [window * max(channels // groups, 1) * filters, filters if bias else 0]


def _recurrent(
    kind: str, inputs: int | None, units: int | None, bias: bool, c: dict[str, Any]
) -> list[int] | None:
    if not inputs or not units:
        return None
    gates = 4 if kind.startswith("LSTM") else 3 if kind.startswith("GRU") else 1
    biases = gates * units * (2 if gates == 3 and c.get("reset_after", True) else 1)
    return [inputs * gates * units, units * gates * units, biases if bias else 0]


def _conv_lstm(c: dict[str, Any], shape: Shape, bias: bool) -> list[int] | None:
    rank = len(shape) - 3
    kernel = _ints(c.get("kernel_size"), max(rank, 1))
    filters = _int(c.get("filters"))
    channels = _channels(c, shape)
    if kernel is None or not filters or channels is None:
        return None
    window = math.prod(kernel)
    return [window * channels * 4 * filters, window * filters * 4 * filters, 4 * filters * bias]


def _attention(c: dict[str, Any], node: dict[str, Any]) -> list[int] | None:
    build = node.get("build_config")
    shapes = build.get("shapes_dict") if isinstance(build, dict) else None
    if not isinstance(shapes, dict):
        return None
    query = _last(_as_shape(shapes.get("query_shape")))
    value = _last(_as_shape(shapes.get("value_shape")))
    key = _last(_as_shape(shapes.get("key_shape"))) or value
    heads, key_dim = _int(c.get("num_heads")), _int(c.get("key_dim"))
    value_dim = _int(c.get("value_dim")) or key_dim
    if not (query and value and key and heads and key_dim and value_dim):
        return None
    out = _last(_as_shape(c.get("output_shape"))) if c.get("output_shape") else query
    bias = bool(c.get("use_bias", True))
    counts = [
        query * heads * key_dim, key * heads * key_dim, value * heads * value_dim,
        heads * value_dim * (out or query),
    ]  # fmt: skip
    if bias:
        counts += [heads * key_dim, heads * key_dim, heads * value_dim, out or query]
    return counts


def _itemsize(c: dict[str, Any]) -> int:
    """Bytes per weight under the layer's dtype policy (mixed precision keeps float32)."""
    dtype = c.get("dtype")
    if isinstance(dtype, dict):
        inner = dtype.get("config")
        dtype = inner.get("name") if isinstance(inner, dict) else None
    if not isinstance(dtype, str) or dtype.startswith("mixed_"):
        return 4
    return _BYTES_PER_DTYPE.get(dtype, 4)


# --------------------------------------------------------------------------- shapes


def _output_shape(entry: LayerEntry, shape: Any) -> Any:
    """The layer's output shape for a known input shape, for the common layers; else None."""
    kind = _ALIASES.get(entry.class_name, entry.class_name)
    c = entry.config
    if kind == "InputLayer":
        return _as_shape(c.get("batch_shape")) or _as_shape(c.get("batch_input_shape"))
    if kind == "Embedding":
        return (*shape, _int(c.get("output_dim"))) if isinstance(shape, tuple) else None
    if kind in _MERGE:
        return shape[0] if isinstance(shape, list) and shape else shape
    if kind == "Concatenate":
        return _concatenate(shape, _int(c.get("axis")) if c.get("axis") is not None else -1)
    if not isinstance(shape, tuple):
        return None
    if kind in _SAME_SHAPE:
        return shape
    if kind == "Dense":
        return (*shape[:-1], _int(c.get("units")))
    if kind == "Flatten":
        rest = shape[1:]
        return (shape[0], math.prod(rest)) if None not in rest else (shape[0], None)
    if kind == "Reshape":
        return _reshape(shape, c.get("target_shape"))
    if kind == "RepeatVector":
        return (shape[0], _int(c.get("n")), *shape[1:])
    if kind == "Permute":
        dims = c.get("dims")
        if isinstance(dims, list) and sorted(dims) == list(range(1, len(shape))):
            return (shape[0], *(shape[d] for d in dims))
        return None
    if kind.startswith(("Conv", "SeparableConv", "DepthwiseConv")) and "LSTM" not in kind:
        return _conv_output(kind, c, shape)
    if kind.startswith(("MaxPooling", "AveragePooling")):
        return _pool_output(c, shape)
    if kind.startswith(("GlobalMaxPooling", "GlobalAveragePooling")):
        channels = _channels(c, shape)
        if c.get("keepdims"):
            return None
        return (shape[0], channels)
    if kind in ("SimpleRNN", "GRU", "LSTM"):
        return _rnn_output(c, shape, _int(c.get("units")))
    if kind.startswith(("ZeroPadding", "Cropping", "UpSampling")):
        return _resample(kind, c, shape)
    return None


def _conv_output(kind: str, c: dict[str, Any], shape: Shape) -> Shape | None:
    rank = len(shape) - 2
    if rank < 1:
        return None
    kernel = _ints(c.get("kernel_size"), rank)
    strides = _ints(c.get("strides", 1), rank)
    dilation = _ints(c.get("dilation_rate", 1), rank)
    if kernel is None or strides is None or dilation is None:
        return None
    first = c.get("data_format") == "channels_first"
    spatial = shape[2:] if first else shape[1:-1]
    padding = c.get("padding", "valid")
    out_spatial = []
    for size, k, s, d in zip(spatial, kernel, strides, dilation, strict=True):
        if size is None:
            out_spatial.append(None)
        elif "Transpose" in kind:
            out_spatial.append(size * s if padding == "same" else (size - 1) * s + d * (k - 1) + 1)
        elif padding == "same":
            out_spatial.append(-(-size // s))
        else:
            out_spatial.append(max((size - d * (k - 1) - 1) // s + 1, 0))
    channels = _channels(c, shape)
    if kind.startswith("DepthwiseConv"):
        width = None if channels is None else channels * (_int(c.get("depth_multiplier")) or 1)
    else:
        width = _int(c.get("filters"))
    return (shape[0], width, *out_spatial) if first else (shape[0], *out_spatial, width)


def _pool_output(c: dict[str, Any], shape: Shape) -> Shape | None:
    rank = len(shape) - 2
    pool = _ints(c.get("pool_size", 2), rank)
    strides = _ints(c.get("strides") or c.get("pool_size", 2), rank)
    if pool is None or strides is None:
        return None
    first = c.get("data_format") == "channels_first"
    spatial = shape[2:] if first else shape[1:-1]
    same = c.get("padding", "valid") == "same"
    out = [
        None if n is None else (-(-n // s) if same else max((n - p) // s + 1, 0))
        for n, p, s in zip(spatial, pool, strides, strict=True)
    ]
    return (shape[0], shape[1], *out) if first else (shape[0], *out, shape[-1])


def _resample(kind: str, c: dict[str, Any], shape: Shape) -> Shape | None:
    rank = len(shape) - 2
    if rank < 1 or c.get("data_format") == "channels_first":
        return None
    spatial = list(shape[1:-1])
    if kind.startswith("UpSampling"):
        factors = _ints(c.get("size", 2), rank)
        if factors is None:
            return None
        spatial = [None if n is None else n * f for n, f in zip(spatial, factors, strict=True)]
        return (shape[0], *spatial, shape[-1])
    key = "padding" if kind.startswith("ZeroPadding") else "cropping"
    sign = 1 if key == "padding" else -1
    amounts = c.get(key, 1)
    for axis in range(rank):
        value = amounts[axis] if isinstance(amounts, list) and len(amounts) == rank else amounts
        pair = value if isinstance(value, list) else [value, value]
        total = sum(_int(v) or 0 for v in pair) if isinstance(pair, list) else 0
        if spatial[axis] is not None:
            spatial[axis] = max(spatial[axis] + sign * total, 0)
    return (shape[0], *spatial, shape[-1])


def _rnn_output(c: dict[str, Any], shape: Any, units: int | None) -> Shape | None:
    if not isinstance(shape, tuple) or len(shape) < 3:
        return None
    return (shape[0], shape[1], units) if c.get("return_sequences") else (shape[0], units)


def _concatenate(shapes: Any, axis: int) -> Shape | None:
    if not isinstance(shapes, list) or not all(isinstance(s, tuple) for s in shapes):
        return None
    rank = len(shapes[0])
    if any(len(s) != rank for s in shapes) or not -rank <= axis < rank:
        return None
    axis %= rank
    sizes = [s[axis] for s in shapes]
    total = None if None in sizes else sum(int(n) for n in sizes if n is not None)
    return (*shapes[0][:axis], total, *shapes[0][axis + 1 :])


def _reshape(shape: Shape, target: Any) -> Shape | None:
    dims = _as_shape(target)
    if dims is None:
        return None
    known = list(shape[1:])
    if None in known or (dims.count(-1) > 1):
        return (shape[0], *(None if d == -1 else d for d in dims))
    if -1 in dims:
        rest = math.prod(d for d in dims if d not in (-1, None))
        missing = math.prod(int(d) for d in known if d is not None) // max(rest, 1)
        dims = tuple(missing if d == -1 else d for d in dims)
    return (shape[0], *dims)


def _channels(c: dict[str, Any], shape: Any) -> int | None:
    if not isinstance(shape, tuple) or len(shape) < 2:
        return None
    value = shape[1] if c.get("data_format") == "channels_first" else shape[-1]
    return value if isinstance(value, int) and value > 0 else None


def _axis_size(shape: Any, axis: Any) -> int | None:
    if not isinstance(shape, tuple):
        return None
    axes = axis if isinstance(axis, list) else [axis]
    sizes = []
    for a in axes:
        if not isinstance(a, int) or not -len(shape) <= a < len(shape):
            return None
        sizes.append(shape[a])
    if any(not isinstance(s, int) for s in sizes):
        return None
    return math.prod(sizes)


# --------------------------------------------------------------------------- config reading


def _built_shape(entry: LayerEntry) -> Any:
    """The input shape in the layer's build_config: one shape, or a list of them."""
    build = entry.node.get("build_config")
    value = build.get("input_shape") if isinstance(build, dict) else None
    shape = _as_shape(value)
    if shape is not None:
        return shape
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        shapes = [_as_shape(v) for v in value]
        return shapes if all(s is not None for s in shapes) else None
    return None


def _inbound(node: dict[str, Any]) -> list[list[tuple[str, int, int]]]:
    """Each call of a Functional layer as the (layer, node, tensor) it takes, Keras 3 or 2."""
    calls = node.get("inbound_nodes")
    if not isinstance(calls, list):
        return []
    found = []
    for call in calls:
        if isinstance(call, dict):  # Keras 3: {"args": [...tensors...], "kwargs": {...}}
            refs: list[tuple[str, int, int]] = []
            _tensor_refs(call.get("args"), refs, 0)
            found.append(refs)
        elif isinstance(call, list):  # Keras 2: [[name, node, tensor, kwargs], ...]
            found.append(_refs(call))
    return found


def _tensor_refs(value: Any, refs: list[tuple[str, int, int]], depth: int) -> None:
    if depth > 8:
        return
    if isinstance(value, list):
        for item in value:
            _tensor_refs(item, refs, depth + 1)
    elif isinstance(value, dict) and value.get("class_name") == "__keras_tensor__":
        config = value.get("config")
        history = config.get("keras_history") if isinstance(config, dict) else None
        refs.extend(_refs([history]))


def _refs(value: Any) -> list[tuple[str, int, int]]:
    """[name, node, tensor] triples from a list of them (or one), skipping anything else."""
    if isinstance(value, list) and len(value) >= 3 and isinstance(value[0], str):
        value = [value]
    found = []
    for item in value if isinstance(value, list) else []:
        if (
            isinstance(item, list)
            and len(item) >= 3
            and isinstance(item[0], str)
            and isinstance(item[1], int)
            and isinstance(item[2], int)
        ):
            found.append((item[0], item[1], item[2]))
    return found


def _lookup(outputs: dict[str, list[Any]], ref: tuple[str, int, int]) -> Any:
    name, node, tensor = ref
    produced = outputs.get(name)
    if produced is None or not 0 <= node < len(produced):
        return None
    shape = produced[node]
    if isinstance(shape, list):
        return shape[tensor] if 0 <= tensor < len(shape) else None
    return shape if tensor == 0 else None


def _as_shape(value: Any) -> Shape | None:
    if not isinstance(value, list) or not value:
        return None
    if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in value):
        return None
    return tuple(value)


def _ints(value: Any, rank: int) -> list[int] | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return [value] * rank
    if isinstance(value, list) and len(value) == rank:
        ints = [_int(v) for v in value]
        return None if any(v is None or v <= 0 for v in ints) else ints  # type: ignore[misc]
    return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _last(shape: Any) -> int | None:
    if isinstance(shape, tuple) and shape and isinstance(shape[-1], int) and shape[-1] > 0:
        return shape[-1]
    return None


def _product(*values: Any) -> list[int] | None:
    ints = [_int(v) for v in values]
    if any(v is None or v < 0 for v in ints):
        return None
    return [math.prod(v for v in ints if v is not None)]
