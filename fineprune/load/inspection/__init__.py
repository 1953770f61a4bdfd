"""Static checks of an untrusted model file, done before Keras is allowed to read it.

Keras rebuilds a model by importing and calling whatever classes the file names, and
allocates every weight its config declares before it reads any, so the only safe moment to
refuse a hostile file is before `load_model` runs. This package reads the container (zip or
HDF5) and the model config as plain data, within fixed bounds (`Limits`), and refuses
anything that could make Keras run code, read files that are not part of the model, or take
more memory than the budget allows.

It must not import keras or tensorflow: the API calls it (in a bounded process of its own,
`bounded`) before a job is queued, and importing TensorFlow there would cost seconds and
gigabytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fineprune.errors import FinePruneError, InvalidModelError, UnsafeModelError
from fineprune.load.inspection import archive, budget, hdf5
from fineprune.load.inspection.allowlist import CLASSES
from fineprune.load.inspection.limits import Limits
from fineprune.load.inspection.objects import (
    MODEL_CLASSES,
    LayerEntry,
    check_config,
    layer_classes,
)
from fineprune.load.inspection.summary import first_input_shape, layer_index, output_units
from fineprune.text import one_line
from fineprune.text import readable_bytes as size

__all__ = [
    "ALLOWED_LAYER_CLASSES",
    "Limits",
    "ModelFileInfo",
    "ModelFormat",
    "check_model_config",
    "detect_format",
    "inspect_model_file",
    "layer_index",
]

ModelFormat = Literal["keras", "h5"]

ZIP_MAGIC = b"PK\x03\x04"
HDF5_MAGIC = archive.HDF5_MAGIC
FIT_SLACK_BYTES = 16 * 1024**2
ALLOWED_LAYER_CLASSES: frozenset[str] = CLASSES["layer"]["keras.layers"] | MODEL_CLASSES
"""Built-in layer classes (and aliases) a model may contain, the models included."""


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
    parameters: int = 0
    """Parameters the config declares, in the layers whose weights it states plainly."""
    weight_bytes: int = 0
    """Bytes of weights Keras would allocate or read: the most the config or the weights file
    declares."""
    unmeasured: tuple[str, ...] = ()
    """Layers whose weights depend on shapes the config does not state: measured by the job."""


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


def inspect_model_file(path: str | os.PathLike[str], limits: Limits | None = None) -> ModelFileInfo:
    """Check the container, the config and the declared sizes, and return what they say.

    Raises UnsafeModelError when the file would make Keras run or read anything that is not
    part of a plain built-in model, or declares more than `limits` allow (default: the budget
    of an 8 GiB job), and InvalidModelError when it is not a readable model.
    """
    limits = limits or Limits()
    fmt = detect_format(path)
    if fmt == "keras":
        config, root, file_bytes = _inspect_keras_zip(Path(path), limits)
    else:
        config, root, file_bytes = _inspect_legacy_h5(Path(path), limits)
    declared = budget.estimate(root)
    _check_budget(declared, limits)
    _check_fit(declared, file_bytes)
    return ModelFileInfo(
        format=fmt,
        config=config,
        layer_classes=layer_classes(root),
        input_shape=first_input_shape(config),
        output_units=output_units(config),
        parameters=declared.parameters,
        weight_bytes=max(declared.bytes, file_bytes),
        unmeasured=tuple(declared.unknown),
    )


def inspect_request(request: dict[str, Any], stage: Callable[[str], None]) -> dict[str, Any]:
    """`inspect_model_file` as a bounded process runs it (`bounded`): JSON in, JSON out."""
    stage("model")
    try:
        info = inspect_model_file(request["path"], Limits(**request["limits"]))
    except FinePruneError as exc:
        return {"error": {"kind": exc.kind, "message": exc.message}}
    except MemoryError:
        message = "checking the model needed more memory than the check may use; refused"
        return {"error": {"kind": UnsafeModelError.kind, "message": message}}
    return {"info": dataclasses.asdict(info)}


def info_from_json(data: dict[str, Any]) -> ModelFileInfo:
    """The ModelFileInfo `inspect_request` answered, tuples restored."""
    shape = data["input_shape"]
    return ModelFileInfo(
        **{
            **data,
            "input_shape": None if shape is None else tuple(shape),
            "unmeasured": tuple(data["unmeasured"]),
        }
    )


def check_model_config(config: dict[str, Any], limits: Limits | None = None) -> list[str]:
    """Walk a model config and refuse anything outside plain built-in Keras.

    Returns the class names of all layers, nested ones included, in config order.
    """
    return layer_classes(check_config(config, limits or Limits()))


def _check_budget(declared: budget.WeightEstimate, limits: Limits) -> None:
    if declared.bytes <= limits.weight_bytes:
        return
    largest = ""
    if declared.largest is not None:
        label, nbytes = declared.largest
        largest = f"; layer {label} alone takes {size(nbytes)}"
    raise UnsafeModelError(
        f"the model's config declares {declared.parameters:,} parameters"
        f" ({size(declared.bytes)} of weights{largest}), over the weight budget of"
        f" {size(limits.weight_bytes)}; refused"
    )


def _check_fit(declared: budget.WeightEstimate, file_bytes: int) -> None:
    """A weights file far bigger than the layers it is for is there to be read, not used.

    An optimizer's state (two slots per weight, a few counters) may ride along, so up to four
    times the config's weights pass; only a config whose weights are all known is compared.
    """
    allowed = 4 * declared.bytes + FIT_SLACK_BYTES
    if declared.unknown or file_bytes <= allowed:
        return
    raise UnsafeModelError(
        f"the weights file declares {size(file_bytes)} of data, but the model's layers hold"
        f" {size(declared.bytes)}: the weights do not fit the config; refused"
    )


# --------------------------------------------------------------------------- containers


def _inspect_keras_zip(path: Path, limits: Limits) -> tuple[dict[str, Any], LayerEntry, int]:
    """Check a .keras archive's members, config and weights file; the weights' declared bytes."""
    try:
        entries = archive.declared_entries(path)
        if entries is not None and entries > limits.zip_members:
            raise UnsafeModelError(
                f".keras archive declares {entries} members, over the {limits.zip_members} a"
                f" model with at most {limits.asset_members} assets has; refused"
            )
        with zipfile.ZipFile(path) as zf:
            facts = archive.check_members(zf.infolist(), limits)
            config = _parse_config_json(archive.read_config(zf, limits), archive.KERAS_CONFIG)
            root = check_config(config, limits)
            with archive.weights_file(path, zf, facts.weights) as fh:
                h5 = hdf5.open_hdf5(fh, f"{archive.KERAS_WEIGHTS} in the archive")
                with h5:
                    weights = hdf5.walk(h5, archive.KERAS_WEIGHTS, limits)
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
    return config, root, weights.declared_bytes


def _inspect_legacy_h5(path: Path, limits: Limits) -> tuple[dict[str, Any], LayerEntry, int]:
    """Check a legacy HDF5 model: its structure, its `model_config`, the weights Keras reads."""
    where = "HDF5 file"
    h5 = hdf5.open_hdf5(path, where)
    with h5:
        facts = hdf5.walk(h5, where, limits)
        try:
            raw = hdf5.read_strings(
                h5.id,
                "model_config",
                f"the {where}",
                max_items=1,
                max_chars=limits.config_bytes,
                scalar=True,
            )
        except (OSError, TypeError, ValueError) as exc:
            raise InvalidModelError(f"cannot read the HDF5 model_config: {one_line(exc)}") from None
        if not raw:
            raise InvalidModelError(
                "HDF5 file has no model_config: weights-only files are not full models"
            )
        config = _parse_config_json(
            raw[0].encode("utf-8", "surrogatepass"), "the HDF5 model_config"
        )
        root = check_config(config, limits)
        try:
            read = hdf5.legacy_weight_bytes(h5, facts, limits)
        except (UnsafeModelError, InvalidModelError):
            raise
        except Exception as exc:
            raise InvalidModelError(f"{where} is corrupt: {one_line(exc)}") from None
    return config, root, max(read, facts.declared_bytes)


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
