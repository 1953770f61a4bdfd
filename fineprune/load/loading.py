"""Loading untrusted models only after `inspection` has cleared them, and saving atomically.

Three checks stand between an upload and the model the engine works on: the static inspection
(no Keras; container, allowlist, declared sizes), an exact measure of the weights Keras would
allocate, taken by building the model once with allocation deferred, and, after the real load,
the classes of every layer it holds. `save_model` checks what it writes the same way, so a
returned model holds built-in classes only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np

# Internal Keras API (keras is pinned to 3.15.x): the public API cannot force safe mode, defer
# allocation while measuring, or build a legacy config the way the .h5 loader does.
from keras.src.backend.common import global_state
from keras.src.backend.common.stateless_scope import StatelessScope
from keras.src.legacy.saving import json_utils, saving_options, saving_utils
from keras.src.saving.serialization_lib import (
    ObjectSharingScope,
    SafeModeScope,
    deserialize_keras_object,
)

from fineprune.errors import FinePruneError, InvalidModelError, UnsafeModelError
from fineprune.load.inspection import (
    Limits,
    ModelFileInfo,
    detect_format,
)
from fineprune.load.inspection.allowlist import CLASSES
from fineprune.load.inspection.isolated import inspect_bounded
from fineprune.text import one_line, quoted
from fineprune.text import readable_bytes as size

__all__ = [
    "check_builtin_layers",
    "inspect_bounded",
    "load_untrusted_model",
    "measure_weight_bytes",
    "save_model",
    "sha256_file",
]

_SUFFIXES: dict[str, tuple[str, ...]] = {"keras": (".keras",), "h5": (".h5", ".hdf5")}


def load_untrusted_model(
    path: str | os.PathLike[str], limits: Limits | None = None
) -> tuple[keras.Model, ModelFileInfo]:
    """Inspect the file, measure its weights, then let Keras build it in safe mode, uncompiled.

    `limits` default to the budget of the memory this process may use (its RLIMIT_DATA, which
    a job's process sets to FINEPRUNE_JOB_MEMORY_BYTES, else the machine's memory).
    Keras picks the reader by file suffix while we pick it by content, so a file whose name
    disagrees with its content is copied to a private name that agrees; the copy is also
    what gets inspected, so the bytes checked are the bytes loaded.
    """
    limits = limits or Limits.for_this_process()
    src = Path(path)
    fmt = detect_format(src)
    suffixes = _SUFFIXES[fmt]
    if str(src).endswith(suffixes):
        return _inspect_and_load(src, limits)
    with tempfile.TemporaryDirectory(prefix="fineprune-load-") as tmp:
        local = Path(tmp) / f"model{suffixes[0]}"
        try:
            shutil.copyfile(src, local)
        except OSError as exc:
            raise InvalidModelError(f"cannot read model file {src.name}: {exc.strerror}") from None
        return _inspect_and_load(local, limits)


def _inspect_and_load(path: Path, limits: Limits) -> tuple[keras.Model, ModelFileInfo]:
    info = inspect_bounded(path, limits)
    try:
        measured = measure_weight_bytes(info)
    except FinePruneError:
        raise
    except Exception as exc:  # the config does not build: Keras would have failed the same way
        raise InvalidModelError(f"Keras could not load the model: {one_line(exc)}") from exc
    if measured > limits.weight_bytes:
        raise UnsafeModelError(
            f"the model would hold {size(measured)} of weights once built, over the weight"
            f" budget of {size(limits.weight_bytes)}; refused"
        )
    try:
        # Keras lets a process-wide `enable_unsafe_deserialization()` override the
        # `safe_mode` argument; the scope pins safe mode for this load whatever was set.
        with SafeModeScope(True):
            model = keras.models.load_model(path, compile=False, safe_mode=True)
    except FinePruneError:
        raise
    except Exception as exc:  # Keras raises anything from ValueError to KeyError here
        raise InvalidModelError(f"Keras could not load the model: {one_line(exc)}") from exc
    if not isinstance(model, keras.Model):
        raise InvalidModelError(f"the file holds a {type(model).__name__}, not a Keras model")
    check_builtin_layers(model)
    return model, info


def measure_weight_bytes(info: ModelFileInfo) -> int:
    """Bytes of every variable Keras creates while it builds the model, from Keras's own build
    with allocation deferred: the variables get their shapes but no memory, and are dropped.

    Every variable counts, those of layers the graph never uses too (Keras builds them all),
    so this catches what the static estimate cannot work out before a weight is allocated.
    """
    with _deferred_variables() as created, SafeModeScope(True):
        if info.format == "keras":
            config = {**info.config, "compile_config": None}
            with ObjectSharingScope():
                deserialize_keras_object(config, safe_mode=True)
        else:
            config = json_utils.decode(json.dumps(info.config))
            with saving_options.keras_option_scope(use_legacy_config=True):
                saving_utils.model_from_config(config)
        return sum(
            math.prod(int(d) for d in v.shape) * np.dtype(v.dtype).itemsize for v in created()
        )


@contextlib.contextmanager
def _deferred_variables() -> Iterator[Callable[[], list[Any]]]:
    """Variables created inside get shapes but no values; none of them outlives the block.
    Yields what reads the variables created so far."""

    def created() -> list[Any]:
        return list(global_state.get_global_attribute("uninitialized_variables", []) or [])

    global_state.set_global_attribute("uninitialized_variables", [])
    try:
        with StatelessScope(initialize_variables=False):
            yield created
    finally:
        global_state.set_global_attribute("uninitialized_variables", [])


def _builtin_layer_types() -> frozenset[type]:
    """The classes the allowlist names, as this Keras has them."""
    namespaces: dict[str, Any] = {
        "keras": keras,
        "keras.layers": keras.layers,
        "keras.models": keras.models,
        "keras.src.models.functional": keras.src.models.functional,
    }
    found: set[type] = set()
    for kind in ("layer", "activation"):
        for module, names in CLASSES[kind].items():
            namespace = namespaces.get(module)
            for name in names:
                cls = getattr(namespace, name, None)
                if isinstance(cls, type):
                    found.add(cls)
    return frozenset(found)


def check_builtin_layers(model: keras.Model) -> None:
    """Refuse a model holding any layer whose class is not a built-in the allowlist names.

    Run on what Keras built, so an object that reached the model some way the static checks
    did not foresee (a shared object resolved to another class) is still caught.
    """
    allowed = _builtin_layer_types()
    for layer in model._flatten_layers(include_self=True, recursive=True):
        cls = type(layer)
        if cls not in allowed:
            raise UnsafeModelError(
                f"the model holds layer {quoted(layer.name)} of class"
                f" {quoted(f'{cls.__module__}.{cls.__qualname__}')}, which is not a built-in"
                " Keras layer; refused"
            )


def save_model(model: keras.Model, path: str | os.PathLike[str]) -> None:
    """Save so that `path` holds either the previous file or the complete new one.

    The model's layers are checked before saving and the written file is inspected like an
    upload before it replaces `path`: what fineprune returns holds built-in classes only.
    Written to a hidden temporary file in the same directory (same filesystem), then
    renamed over `path`. `.h5`/`.hdf5` names get the legacy HDF5 format, anything else
    the .keras zip format (readers go by content, not name).
    """
    check_builtin_layers(model)
    dest = Path(path)
    suffix = ".h5" if dest.suffix.lower() in (".h5", ".hdf5") else ".keras"
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{dest.name}.", suffix=f".tmp{suffix}", dir=dest.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        model.save(tmp, overwrite=True)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        inspect_bounded(tmp, Limits.for_this_process())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1024**2) -> str:
    """Hex SHA-256 of a file, read in chunks so big models do not fill memory."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
