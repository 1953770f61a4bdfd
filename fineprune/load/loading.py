"""Loading untrusted models only after `inspection` has cleared them, and saving atomically."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import keras

# Internal Keras API (keras is pinned to 3.15.x): the public API cannot force safe mode.
from keras.src.saving.serialization_lib import SafeModeScope

from fineprune.errors import FinePruneError, InvalidModelError
from fineprune.load.inspection import ModelFileInfo, detect_format, inspect_model_file
from fineprune.text import one_line

__all__ = ["load_untrusted_model", "save_model", "sha256_file"]

_SUFFIXES: dict[str, tuple[str, ...]] = {"keras": (".keras",), "h5": (".h5", ".hdf5")}


def load_untrusted_model(path: str | os.PathLike[str]) -> tuple[keras.Model, ModelFileInfo]:
    """Inspect the file, then let Keras build it in safe mode, never compiling it.

    Keras picks the reader by file suffix while we pick it by content, so a file whose name
    disagrees with its content is copied to a private name that agrees; the copy is also
    what gets inspected, so the bytes checked are the bytes loaded.
    """
    src = Path(path)
    fmt = detect_format(src)
    suffixes = _SUFFIXES[fmt]
    if str(src).endswith(suffixes):
        return _inspect_and_load(src)
    with tempfile.TemporaryDirectory(prefix="fineprune-load-") as tmp:
        local = Path(tmp) / f"model{suffixes[0]}"
        try:
            shutil.copyfile(src, local)
        except OSError as exc:
            raise InvalidModelError(f"cannot read model file {src.name}: {exc.strerror}") from None
        return _inspect_and_load(local)


def _inspect_and_load(path: Path) -> tuple[keras.Model, ModelFileInfo]:
    info = inspect_model_file(path)
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
    return model, info


def save_model(model: keras.Model, path: str | os.PathLike[str]) -> None:
    """Save so that `path` holds either the previous file or the complete new one.

    Written to a hidden temporary file in the same directory (same filesystem), then
    renamed over `path`. `.h5`/`.hdf5` names get the legacy HDF5 format, anything else
    the .keras zip format (readers go by content, not name).
    """
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
