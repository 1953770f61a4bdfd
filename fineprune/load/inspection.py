"""Static checks of an untrusted model file, done before Keras is allowed to read it.

Keras rebuilds a model by importing and calling whatever classes the file names, so the
only safe moment to refuse a hostile file is before `load_model` runs. This module reads
the container (zip or HDF5) and the model config as plain data and refuses anything that
could make Keras run code or read files that are not part of the model.

It must not import keras or tensorflow: the API process calls it for cheap checks before
a job is queued, and importing TensorFlow there would cost seconds and gigabytes.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import h5py

from fineprune.errors import InvalidModelError, UnsafeModelError
from fineprune.text import one_line, quoted
from fineprune.text import readable_bytes as size

__all__ = [
    "ALLOWED_LAYER_CLASSES",
    "ModelFileInfo",
    "ModelFormat",
    "check_model_config",
    "detect_format",
    "inspect_model_file",
]

ModelFormat = Literal["keras", "h5"]

ZIP_MAGIC = b"PK\x03\x04"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"

# Limits. Module-level so tests (and operators) can tighten them.
MAX_TOTAL_UNCOMPRESSED_BYTES = 2 * 1024**3
"""Sum of the declared uncompressed sizes of all zip members."""
MAX_COMPRESSION_RATIO = 200
"""Largest uncompressed/compressed ratio for one zip member (deflate tops out near 1030)."""
RATIO_CHECK_FLOOR_BYTES = 1024**2
"""Members smaller than this are too small to be a bomb, whatever their ratio."""
MAX_ZIP_MEMBERS = 10_000
MAX_CONFIG_BYTES = 16 * 1024**2
MAX_DATASET_BYTES = 2 * 1024**3
"""Largest declared size of one HDF5 dataset, and of all of them together."""
MAX_CONFIG_DEPTH = 200
MAX_HDF5_LINKS = 100_000

_KERAS_CONFIG = "config.json"
_KERAS_METADATA = "metadata.json"
_KERAS_WEIGHTS = "model.weights.h5"
_KERAS_ASSETS_DIR = "assets/"
_ALLOWED_COMPRESSION = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})

# Built-in layer classes a model may contain: the public `keras.layers` Layer subclasses of
# Keras 3.15, generated once with
#   sorted(n for n in dir(keras.layers) if isinstance(getattr(keras.layers, n), type)
#          and issubclass(getattr(keras.layers, n), keras.layers.Layer))
# minus the classes that run foreign code (see _CODE_RUNNING_LAYERS) and the abstract bases
# `Layer` and `Wrapper`, plus the model classes. Hard-coded because keras cannot be imported.
ALLOWED_LAYER_CLASSES: frozenset[str] = frozenset(
    {
        # models
        "Functional", "Model", "Sequential",
        # layers
        "Activation", "ActivityRegularization", "AdaptiveAveragePooling1D",
        "AdaptiveAveragePooling2D", "AdaptiveAveragePooling3D", "AdaptiveMaxPooling1D",
        "AdaptiveMaxPooling2D", "AdaptiveMaxPooling3D", "Add", "AdditiveAttention",
        "AlphaDropout", "Attention", "AugMix", "AutoContrast", "Average", "AveragePooling1D",
        "AveragePooling2D", "AveragePooling3D", "AvgPool1D", "AvgPool2D", "AvgPool3D",
        "BatchNormalization", "Bidirectional", "CategoryEncoding", "CenterCrop", "Concatenate",
        "ContrastLimitedAdaptiveHistogramEqualization", "Conv1D", "Conv1DTranspose", "Conv2D",
        "Conv2DTranspose", "Conv3D", "Conv3DTranspose", "ConvLSTM1D", "ConvLSTM2D",
        "ConvLSTM3D", "Convolution1D", "Convolution1DTranspose", "Convolution2D",
        "Convolution2DTranspose", "Convolution3D", "Convolution3DTranspose", "Cropping1D",
        "Cropping2D", "Cropping3D", "CutMix", "Dense", "DepthwiseConv1D", "DepthwiseConv2D",
        "Discretization", "Dot", "Dropout", "ELU", "EinsumDense", "Embedding", "Equalization",
        "Flatten", "GRU", "GRUCell", "GaussianDropout", "GaussianNoise",
        "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D",
        "GlobalAvgPool1D", "GlobalAvgPool2D", "GlobalAvgPool3D", "GlobalMaxPool1D",
        "GlobalMaxPool2D", "GlobalMaxPool3D", "GlobalMaxPooling1D", "GlobalMaxPooling2D",
        "GlobalMaxPooling3D", "GroupNormalization", "GroupQueryAttention", "HashedCrossing",
        "Hashing", "Identity", "InputLayer", "IntegerLookup", "LSTM", "LSTMCell",
        "LayerNormalization", "LeakyReLU", "Masking", "MaxNumBoundingBoxes", "MaxPool1D",
        "MaxPool2D", "MaxPool3D", "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "Maximum",
        "MelSpectrogram", "Minimum", "MixUp", "MultiHeadAttention", "Multiply",
        "Normalization", "PReLU", "Permute", "Pipeline", "RMSNormalization", "RNN",
        "RandAugment", "RandomBrightness", "RandomColorDegeneration", "RandomColorJitter",
        "RandomContrast", "RandomCrop", "RandomElasticTransform", "RandomErasing",
        "RandomFlip", "RandomGaussianBlur", "RandomGrayscale", "RandomHue", "RandomInvert",
        "RandomPerspective", "RandomPosterization", "RandomRotation", "RandomSaturation",
        "RandomSharpness", "RandomShear", "RandomTranslation", "RandomZoom", "ReLU",
        "RepeatVector", "Rescaling", "Reshape", "Resizing", "ReversibleEmbedding",
        "STFTSpectrogram", "SeparableConv1D", "SeparableConv2D", "SeparableConvolution1D",
        "SeparableConvolution2D", "SimpleRNN", "SimpleRNNCell", "Softmax", "Solarization",
        "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "SpectralNormalization",
        "StackedRNNCells", "StringLookup", "Subtract", "TextVectorization", "TimeDistributed",
        "UnitNormalization", "UpSampling1D", "UpSampling2D", "UpSampling3D", "ZeroPadding1D",
        "ZeroPadding2D", "ZeroPadding3D",
    }
)  # fmt: skip

_MODEL_CLASSES = frozenset({"Functional", "Model", "Sequential"})

# Built-in Keras classes that exist to run code the file brings along; refused anywhere.
_CODE_RUNNING_LAYERS: dict[str, str] = {
    "Lambda": "is a Lambda layer: it would run code from the file",
    "TFSMLayer": "is a TFSMLayer: it would load and run an external TensorFlow SavedModel",
    "TorchModuleWrapper": "is a TorchModuleWrapper: it would unpickle a PyTorch module",
    "JaxLayer": "is a JaxLayer: it wraps arbitrary JAX functions",
    "FlaxLayer": "is a FlaxLayer: it wraps an arbitrary Flax module",
    "TFOpLambda": "is a TFOpLambda layer: it would call a TensorFlow function named by the file",
    "SlicingOpLambda": "is a SlicingOpLambda layer: it would call code named by the file",
}

# Markers Keras writes for plain values (tensors, tuples, shapes...); they carry no code.
_VALUE_MARKERS = frozenset(
    {
        "__keras_tensor__", "__tensor__", "__numpy__", "__bytes__", "__ellipsis__",
        "__slice__", "__tuple__", "TensorShape",
    }
)  # fmt: skip

# Config keys whose class objects are layers (wrappers, RNN cells, nested models).
_LAYER_SLOT_KEYS = frozenset(
    {"layers", "layer", "backward_layer", "forward_layer", "cell", "cells"}
)

_DRIVE_PATH = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class ModelFileInfo:
    """What could be learnt about a model file without letting Keras read it."""

    format: ModelFormat
    config: dict[str, Any] = field(repr=False)
    """The model config: the whole config.json, or the legacy HDF5 `model_config` attribute."""
    layer_classes: list[str]
    """Class names of every layer in config order, nested ones included, the model excluded."""
    input_shape: tuple[int | None, ...] | None
    """Shape of the first input, batch dimension included (like `keras.Model.input_shape`)."""
    output_units: int | None
    """Classes of the output: `units` of the Dense that makes it (through activations, dropout
    and normalization), when the config says so plainly; else None."""


def detect_format(path: str | os.PathLike[str]) -> ModelFormat:
    """Tell .keras from .h5 by content: names of uploaded files cannot be trusted."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            head = fh.read(8)
    except FileNotFoundError:
        raise InvalidModelError(f"model file not found: {p.name}") from None
    except IsADirectoryError:
        raise InvalidModelError(f"model path is a directory, not a file: {p.name}") from None
    except OSError as exc:
        raise InvalidModelError(f"cannot read model file {p.name}: {exc.strerror}") from None
    if not head:
        raise InvalidModelError("model file is empty")
    if head.startswith(ZIP_MAGIC):
        return "keras"
    if head == HDF5_MAGIC:
        return "h5"
    raise InvalidModelError(
        f"not a .keras (zip) or .h5 (HDF5) file: starts with {head!r}"
        + (" (file is shorter than a header)" if len(head) < 8 else "")
    )


def inspect_model_file(path: str | os.PathLike[str]) -> ModelFileInfo:
    """Check the container and the config, and return what they say, without running Keras.

    Raises UnsafeModelError when the file would make Keras run or read anything that is not
    part of a plain built-in model, and InvalidModelError when it is not a readable model.
    """
    fmt = detect_format(path)
    config = _inspect_keras_zip(Path(path)) if fmt == "keras" else _inspect_legacy_h5(Path(path))
    layer_classes = check_model_config(config)
    return ModelFileInfo(
        format=fmt,
        config=config,
        layer_classes=layer_classes,
        input_shape=_first_input_shape(config),
        output_units=_output_units(config),
    )


# --------------------------------------------------------------------------- containers


def _inspect_keras_zip(path: Path) -> dict[str, Any]:
    """Check a .keras archive's members, then parse its config and check its weights file."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            _check_zip_members(infos)
            config = _read_zip_config(zf)
            _check_zip_weights(zf)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise InvalidModelError(f"not a valid .keras (zip) archive: {one_line(exc)}") from None
    except zlib.error as exc:  # a member whose deflate stream is corrupt
        raise InvalidModelError(
            f"the .keras archive is corrupt: a member does not decompress ({one_line(exc)})"
        ) from None
    except (NotImplementedError, RuntimeError) as exc:  # unsupported method, encryption
        raise InvalidModelError(f"cannot read the .keras archive: {one_line(exc)}") from None
    except OSError as exc:
        raise InvalidModelError(f"cannot read the .keras archive: {one_line(exc)}") from None
    return config


def _check_zip_members(infos: list[zipfile.ZipInfo]) -> None:
    """Refuse path tricks, smuggled files and decompression bombs before anything is read."""
    if len(infos) > MAX_ZIP_MEMBERS:
        raise UnsafeModelError(f".keras archive has {len(infos)} members; refused")
    seen: set[str] = set()
    total = 0
    for info in infos:
        name = info.filename
        shown = quoted(name)
        if (
            "\x00" in name
            or "\\" in name
            or name.startswith("/")
            or _DRIVE_PATH.match(name)
            or ".." in name.split("/")
        ):
            raise UnsafeModelError(
                f".keras archive member {shown} points outside the archive; refused"
            )
        if name in seen:
            raise UnsafeModelError(f".keras archive has member {shown} twice; refused")
        seen.add(name)
        if info.flag_bits & 0x1:
            raise UnsafeModelError(f".keras archive member {shown} is encrypted; refused")
        if info.compress_type not in _ALLOWED_COMPRESSION:
            raise InvalidModelError(
                f".keras archive member {shown} uses an unsupported compression method"
            )
        total += info.file_size
        if (
            info.file_size > RATIO_CHECK_FLOOR_BYTES
            and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1)
        ):
            raise UnsafeModelError(
                f".keras archive member {shown} would expand from {size(info.compress_size)}"
                f" to {size(info.file_size)}: a decompression bomb; refused"
            )
    if total > MAX_TOTAL_UNCOMPRESSED_BYTES:
        raise UnsafeModelError(
            f".keras archive declares {size(total)} uncompressed, over the"
            f" {size(MAX_TOTAL_UNCOMPRESSED_BYTES)} limit; refused"
        )
    for required in (_KERAS_CONFIG, _KERAS_WEIGHTS):
        if required not in seen:
            raise InvalidModelError(
                f"not a Keras model archive: {required} is missing"
                f" (members: {quoted(', '.join(sorted(seen)), 120)})"
            )
    for name in seen:
        if name in (_KERAS_CONFIG, _KERAS_METADATA, _KERAS_WEIGHTS):
            continue
        if name.startswith(_KERAS_ASSETS_DIR):
            continue
        raise UnsafeModelError(
            f".keras archive has unexpected member {quoted(name)}; only {_KERAS_CONFIG},"
            f" {_KERAS_METADATA}, {_KERAS_WEIGHTS} and {_KERAS_ASSETS_DIR}... are allowed;"
            " refused"
        )


def _read_zip_config(zf: zipfile.ZipFile) -> dict[str, Any]:
    """Read config.json with a size cap, whatever size its header claims."""
    if zf.getinfo(_KERAS_CONFIG).file_size > MAX_CONFIG_BYTES:
        raise InvalidModelError(f"{_KERAS_CONFIG} is larger than {size(MAX_CONFIG_BYTES)}")
    with zf.open(_KERAS_CONFIG) as fh:
        raw = fh.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise InvalidModelError(f"{_KERAS_CONFIG} is larger than {size(MAX_CONFIG_BYTES)}")
    return _parse_config_json(raw, _KERAS_CONFIG)


def _check_zip_weights(zf: zipfile.ZipFile) -> None:
    """Check the archive's HDF5 weights like a legacy .h5 file, from a private copy."""
    with zf.open(_KERAS_WEIGHTS) as member:
        if member.read(8) != HDF5_MAGIC:
            raise InvalidModelError(f"{_KERAS_WEIGHTS} in the archive is not an HDF5 file")
    # A seekable private copy: seeking backwards in a zip member re-reads it from the start.
    with tempfile.TemporaryFile(prefix="fineprune-weights-") as tmp:
        with zf.open(_KERAS_WEIGHTS) as member:
            _copy_capped(member, tmp, MAX_TOTAL_UNCOMPRESSED_BYTES)
        tmp.seek(0)
        try:
            h5 = h5py.File(tmp, "r")
        except OSError as exc:
            raise InvalidModelError(
                f"{_KERAS_WEIGHTS} in the archive is not a readable HDF5 file: {one_line(exc)}"
            ) from None
        with h5:
            _check_hdf5_tree(h5, _KERAS_WEIGHTS)


def _copy_capped(src: IO[bytes], dst: IO[bytes], cap: int) -> None:
    """Copy at most `cap` bytes; a member that yields more lied about its size."""
    copied = 0
    while chunk := src.read(1024**2):
        copied += len(chunk)
        if copied > cap:
            raise UnsafeModelError(f"{_KERAS_WEIGHTS} expands beyond {size(cap)}; refused")
        dst.write(chunk)


def _inspect_legacy_h5(path: Path) -> dict[str, Any]:
    """Check a legacy HDF5 model and return its `model_config` attribute, parsed."""
    try:
        h5 = h5py.File(path, "r", locking=False)
    except OSError as exc:
        raise InvalidModelError(
            f"not a readable HDF5 file (truncated or corrupt?): {one_line(exc)}"
        ) from None
    with h5:
        try:
            raw = h5.attrs.get("model_config")
        except (OSError, TypeError, ValueError) as exc:
            raise InvalidModelError(f"cannot read the HDF5 model_config: {one_line(exc)}") from None
        if raw is None:
            raise InvalidModelError(
                "HDF5 file has no model_config: weights-only files are not full models"
            )
        _check_hdf5_tree(h5, "HDF5 file")
    if isinstance(raw, bytes):
        data = raw
    elif isinstance(raw, str):
        data = raw.encode("utf-8", "surrogatepass")
    else:
        raise InvalidModelError("the HDF5 model_config attribute is not a string")
    if len(data) > MAX_CONFIG_BYTES:
        raise InvalidModelError(f"the HDF5 model_config is larger than {size(MAX_CONFIG_BYTES)}")
    return _parse_config_json(data, "the HDF5 model_config")


def _check_hdf5_tree(h5: h5py.File, where: str) -> None:
    """Refuse HDF5 features that read outside the file or declare absurd amounts of data.

    Links are listed without being followed, so an external link is refused before h5py
    would open the file it names. (h5py mangles exceptions raised inside visit callbacks,
    so the callback only records links and the checks run afterwards.)
    """
    links: list[tuple[str, object]] = []

    def record(name: str, link: object) -> bool | None:
        links.append((name, link))
        return True if len(links) > MAX_HDF5_LINKS else None  # True stops the visit

    try:
        h5.visititems_links(record)
        if len(links) > MAX_HDF5_LINKS:
            raise UnsafeModelError(f"{where} has more than {MAX_HDF5_LINKS} objects; refused")
        total = 0
        for name, link in links:
            total += _check_hdf5_link(h5, where, name, link)
            if total > MAX_DATASET_BYTES:
                raise UnsafeModelError(
                    f"{where} declares more than {size(MAX_DATASET_BYTES)} of data; refused"
                )
    except (UnsafeModelError, InvalidModelError):
        raise
    except Exception as exc:  # h5py raises many types on corrupt metadata
        raise InvalidModelError(f"{where} is corrupt: {one_line(exc)}") from None


def _check_hdf5_link(h5: h5py.File, where: str, name: str, link: object) -> int:
    """Check one link; return the bytes its dataset declares (0 for groups)."""
    shown = quoted(name)
    if isinstance(link, h5py.ExternalLink):
        raise UnsafeModelError(
            f"{where} has an external link {shown} to file {quoted(link.filename)}; refused"
        )
    if isinstance(link, h5py.SoftLink):
        raise UnsafeModelError(f"{where} has a soft link {shown} -> {quoted(link.path)}; refused")
    if not isinstance(link, h5py.HardLink):
        raise UnsafeModelError(f"{where} has an unknown kind of link {shown}; refused")
    obj = h5.get(name)
    if not isinstance(obj, h5py.Dataset):
        return 0
    if obj.is_virtual:
        raise UnsafeModelError(f"{where} has a virtual dataset {shown}; refused")
    if obj.external:
        raise UnsafeModelError(f"{where} dataset {shown} keeps its data in external files; refused")
    declared = int(obj.size or 0) * int(obj.dtype.itemsize)
    if declared > MAX_DATASET_BYTES:
        raise UnsafeModelError(
            f"{where} dataset {shown} declares {size(declared)} of data; refused"
        )
    return declared


def _parse_config_json(raw: bytes, where: str) -> dict[str, Any]:
    try:
        config = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidModelError(f"{where} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise InvalidModelError(f"{where} is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidModelError(f"{where} is nested too deeply") from None
    if not isinstance(config, dict):
        raise InvalidModelError(f"{where} is not a JSON object")
    return config


# --------------------------------------------------------------------------- config walk


def check_model_config(config: dict[str, Any]) -> list[str]:
    """Walk a model config and refuse anything outside plain built-in Keras.

    Returns the class names of all layers, nested ones included, in config order.
    """
    class_name = config.get("class_name")
    if not isinstance(class_name, str) or not isinstance(config.get("config"), dict):
        raise InvalidModelError("the model config has no class_name/config: not a Keras model")
    if class_name not in _MODEL_CLASSES:
        if class_name in ALLOWED_LAYER_CLASSES:
            raise InvalidModelError(f"the file holds a single {class_name!r} layer, not a model")
        module = config.get("module")
        origin = f" from module {quoted(module)}" if isinstance(module, str) else ""
        raise UnsafeModelError(
            f"model has class {quoted(class_name)}{origin}, which is not a built-in Keras"
            " model (Sequential or Functional); refused"
        )
    layers: list[str] = []
    _walk(config, key=None, layer=None, in_layer_slot=True, layers=layers, depth=0)
    return layers[1:]  # the first one is the model itself


def _walk(
    node: Any,
    key: str | None,
    layer: str | None,
    in_layer_slot: bool,
    layers: list[str],
    depth: int,
) -> None:
    """Visit every value; `layer` names the enclosing layer, for error messages."""
    if depth > MAX_CONFIG_DEPTH:
        raise InvalidModelError("the model config is nested too deeply")
    if isinstance(node, list):
        for item in node:
            _walk(item, key, layer, in_layer_slot, layers, depth + 1)
        return
    if not isinstance(node, dict):
        return
    if "class_name" in node:
        layer = _check_object(node, key, layer, in_layer_slot, layers)
    for child_key, value in node.items():
        if not isinstance(value, dict | list):
            continue
        slot = child_key in _LAYER_SLOT_KEYS
        # Inside an object's "config", keys name its arguments: keep them for messages.
        name_key = key if child_key == "config" else child_key
        _walk(value, name_key, layer, slot, layers, depth + 1)


def _check_object(
    obj: dict[str, Any], key: str | None, layer: str | None, is_layer: bool, layers: list[str]
) -> str | None:
    """Check one serialized object; return the layer name to use for its children."""
    class_name = obj["class_name"]
    if not isinstance(class_name, str):
        raise InvalidModelError(f"{_where(layer)} has a class_name that is not a string")
    module = obj.get("module")
    registered = obj.get("registered_name")

    if is_layer:
        layer = _layer_name(obj)
        subject = f"layer {layer} has"
    else:
        subject = f"{_where(layer)} has {quoted(key or 'a value')} of"

    if class_name in _CODE_RUNNING_LAYERS:
        who = f"layer {_layer_name(obj)}" if is_layer else f"{_where(layer)} holds a layer that"
        raise UnsafeModelError(f"{who} {_CODE_RUNNING_LAYERS[class_name]}; refused")
    if class_name == "__lambda__" or class_name == "__typespec__":
        raise UnsafeModelError(
            f"{subject} serialized Python code ({class_name}): it would run code from the"
            " file; refused"
        )
    if class_name in ("TypeSpec", "CompositeTensor") or (
        class_name.startswith("__") and class_name not in _VALUE_MARKERS
    ):
        raise UnsafeModelError(
            f"{subject} a serialized object of kind {quoted(class_name)} that is not supported;"
            " refused"
        )
    if "module" in obj and not _is_keras_module(module):
        origin = f"module {quoted(module)}" if isinstance(module, str) else "no module (custom)"
        what = "a built-in Keras layer" if is_layer else "part of Keras"
        raise UnsafeModelError(
            f"{subject} class {quoted(class_name)} from {origin}, which is not {what}; refused"
        )
    if registered is not None and not _registered_name_ok(obj, class_name, registered):
        raise UnsafeModelError(
            f"{subject} class {quoted(class_name)} registered as {quoted(registered)}:"
            " a registered custom object; refused"
        )
    if is_layer:
        if class_name not in ALLOWED_LAYER_CLASSES:
            origin = f" from module {quoted(module)}" if isinstance(module, str) else ""
            raise UnsafeModelError(
                f"layer {layer} has class {quoted(class_name)}{origin}, which is not a built-in"
                " Keras layer; refused"
            )
        if not isinstance(obj.get("config"), dict):
            raise InvalidModelError(f"layer {layer} has no config")
        layers.append(class_name)
    return layer


def _is_keras_module(module: Any) -> bool:
    return isinstance(module, str) and (module == "keras" or module.startswith("keras."))


def _registered_name_ok(obj: dict[str, Any], class_name: str, registered: Any) -> bool:
    """Built-ins carry no registered name, their class name, or (functions) their own name."""
    if not isinstance(registered, str) or ">" in registered:
        return False
    if registered == class_name:
        return True
    return class_name == "function" and registered == obj.get("config")


def _layer_name(obj: dict[str, Any]) -> str:
    config = obj.get("config")
    name = obj.get("name")
    if not isinstance(name, str) and isinstance(config, dict):
        name = config.get("name")
    if isinstance(name, str):
        return quoted(name)
    class_name = obj.get("class_name")
    return f"of class {quoted(class_name if isinstance(class_name, str) else '?')}"


def _where(layer: str | None) -> str:
    return f"layer {layer}" if layer is not None else "the model config"


# --------------------------------------------------------------------------- summaries


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


def _first_input_shape(model: dict[str, Any]) -> tuple[int | None, ...] | None:
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


def _output_units(model: dict[str, Any], depth: int = 0) -> int | None:
    """The class count the config states plainly: `units` of the Dense making the output.

    Followed back from the (single) output through activations, dropout and normalization,
    into nested models; None for anything else, so callers never refuse on a guess.
    """
    if depth > MAX_CONFIG_DEPTH:
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
        return _output_units(layer, depth + 1)
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


# --------------------------------------------------------------------------- helpers
