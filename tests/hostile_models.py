"""Builders of tiny good and hostile model files for the loading tests.

Every payload only touches a marker file, so a test can tell whether it ran. Building a
model with a payload layer runs the payload once (Keras traces it), so builders delete the
marker after saving: only a run at load time can bring it back.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import h5py
import keras
import numpy as np

ZipEdit = bytes | None
H5Attack = Literal[
    "external_link", "soft_link", "virtual_dataset", "external_storage", "huge_dataset"
]


def tiny_model(seed: int = 0, classes: int = 10, channels: int = 1) -> keras.Model:
    """About 2,000 parameters on 16x16 inputs: big enough to be a real CNN, fast to save."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((16, 16, channels), name="image"),
            keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
            keras.layers.MaxPooling2D(2, name="pool"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(classes, activation="softmax", name="dense"),
        ],
        name="tiny",
    )


def sample_inputs(n: int = 4) -> np.ndarray:
    return np.random.default_rng(0).random((n, 16, 16, 1), dtype=np.float32)


def payload_function(marker: Path) -> Callable[[Any], Any]:
    """A Python lambda that touches `marker` and passes its input through.

    Made with eval so the path is a constant in the code object: the lambda needs nothing
    but builtins once Keras unmarshals it in another module.
    """
    source = f"lambda x: (__import__('pathlib').Path({str(marker)!r}).touch(), x)[1]"
    return eval(source)


def payload_lambda_layer(marker: Path, name: str = "lambda_1") -> keras.layers.Lambda:
    return keras.layers.Lambda(payload_function(marker), name=name)


def save_lambda_model(
    path: Path,
    marker: Path,
    hiding: Literal["top", "nested_sequential", "time_distributed"] = "top",
) -> Path:
    """Save a model whose Lambda layer touches `marker`, at top level or hidden deeper."""
    inp = keras.Input((16, 16, 1), name="image")
    if hiding == "time_distributed":
        x = keras.layers.TimeDistributed(payload_lambda_layer(marker), name="per_row")(inp)
        x = keras.layers.Flatten(name="flatten")(x)
    else:
        x = keras.layers.Flatten(name="flatten")(inp)
        x = keras.layers.Dense(16, name="hidden")(x)
        if hiding == "top":
            x = payload_lambda_layer(marker)(x)
        else:
            inner = keras.Sequential(
                [keras.Input((16,)), keras.layers.Dense(16), payload_lambda_layer(marker)],
                name="inner",
            )
            x = inner(x)
    out = keras.layers.Dense(10, activation="softmax", name="dense")(x)
    _save_and_forget(keras.Model(inp, out, name="hostile"), path, marker)
    return path


@keras.saving.register_keras_serializable(package="hostile")
class HostileDense(keras.layers.Dense):
    """A registered custom layer: Keras would run its from_config for any file naming it."""

    def __init__(self, *args: Any, marker: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.marker = marker

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "marker": self.marker}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> HostileDense:
        Path(config["marker"]).touch()
        return super().from_config(config)


def save_custom_layer_model(
    path: Path, marker: Path, hiding: Literal["top", "nested_sequential"] = "top"
) -> Path:
    """A model with the registered HostileDense, at top level or inside a nested Sequential."""
    layer = HostileDense(10, marker=str(marker), name="my_layer")
    if hiding == "nested_sequential":
        layer = keras.Sequential([keras.Input((256,)), layer], name="inner")
    model = keras.Sequential([keras.Input((16, 16, 1)), keras.layers.Flatten(), layer])
    _save_and_forget(model, path, marker)
    return path


def save_nested_model(path: Path) -> Path:
    """A plain model with a nested Sequential 'inner' holding Dense 'inner_dense'.

    Hostile variants replace 'inner_dense' in the saved config (`replace_layer`), so the
    checks must walk into nested models to find them.
    """
    keras.utils.set_random_seed(0)
    inner = keras.Sequential(
        [keras.Input((16,)), keras.layers.Dense(16, name="inner_dense")], name="inner"
    )
    inp = keras.Input((16, 16, 1), name="image")
    x = keras.layers.Flatten(name="flatten")(inp)
    x = keras.layers.Dense(16, name="hidden")(x)
    out = keras.layers.Dense(10, activation="softmax", name="dense")(inner(x))
    keras.Model(inp, out, name="nested").save(path)
    return path


def find_layer(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The layer dict called `name` anywhere in a model config, nested models included."""
    for layer in config["config"]["layers"]:
        if layer["config"].get("name") == name:
            return layer
        if layer["class_name"] in ("Sequential", "Functional", "Model"):
            try:
                return find_layer(layer, name)
            except KeyError:
                pass
    raise KeyError(name)


def replace_layer(name: str, **fields: Any) -> Callable[[dict[str, Any]], None]:
    """A config edit that overwrites fields of layer `name` (found at any depth)."""

    def edit(config: dict[str, Any]) -> None:
        find_layer(config, name).update(fields)

    return edit


def tfsm_layer(name: str, filepath: Path) -> dict[str, Any]:
    """The serialized form of a TFSMLayer that would load and run a SavedModel."""
    return {
        "module": "keras.layers",
        "class_name": "TFSMLayer",
        "config": {"name": name, "filepath": str(filepath), "call_endpoint": "serve"},
        "registered_name": None,
    }


def _save_and_forget(model: keras.Model, path: Path, marker: Path) -> None:
    model.save(path)
    marker.unlink(missing_ok=True)


# --------------------------------------------------------------------------- zip surgery


def rewrite_zip(
    src: Path,
    dst: Path,
    replace: dict[str, ZipEdit] | None = None,
    extra: list[tuple[str, bytes]] | None = None,
) -> Path:
    """Copy a .keras archive, replacing (bytes) or dropping (None) members and adding others.

    `extra` is written verbatim with ZipInfo, so it can hold names zipfile would never
    produce on its own, like '../evil' or a second 'config.json'.
    """
    replace = replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = replace.get(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Duplicate name"
            for name, data in extra or []:
                zout.writestr(zipfile.ZipInfo(name), data)
    return dst


def edit_keras_config(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """Copy a .keras archive with its config.json changed in place by `edit`."""
    with zipfile.ZipFile(src) as zf:
        config = json.loads(zf.read("config.json"))
    edit(config)
    return rewrite_zip(src, dst, replace={"config.json": json.dumps(config).encode()})


def layer_config(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The layer dict called `name` in a (Sequential or Functional) model config."""
    for layer in config["config"]["layers"]:
        if layer["config"].get("name") == name:
            return layer
    raise KeyError(name)


def zip_bomb(src: Path, dst: Path, megabytes: int = 300) -> Path:
    """A .keras archive whose weights member is `megabytes` of zeros deflated to ~0.1%.

    Streamed through zipfile's writer, so building it never holds the zeros in memory.
    """
    zeros = bytes(1024**2)
    with zipfile.ZipFile(src) as zin:
        config = zin.read("config.json")
        metadata = zin.read("metadata.json")
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        zout.writestr("config.json", config)
        zout.writestr("metadata.json", metadata)
        with zout.open("model.weights.h5", "w", force_zip64=True) as member:
            for _ in range(megabytes):
                member.write(zeros)
    return dst


def keras_with_weights_attack(src: Path, dst: Path, attack: H5Attack) -> Path:
    """A .keras archive whose model.weights.h5 carries an HDF5 `attack`."""
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "model.weights.h5"
        with zipfile.ZipFile(src) as zf:
            weights.write_bytes(zf.read("model.weights.h5"))
        add_h5_attack(weights, attack)
        return rewrite_zip(src, dst, replace={"model.weights.h5": weights.read_bytes()})


# --------------------------------------------------------------------------- HDF5 surgery


def add_h5_attack(path: Path, attack: H5Attack) -> Path:
    """Swap the file's first weight dataset for an HDF5 feature that reaches outside it.

    The foreign data lives next to `path` (secret.h5 / secret.raw), as a thief would hope
    to find /etc/passwd or another user's model.
    """
    secret_h5 = path.with_name("secret.h5")
    secret_raw = path.with_name("secret.raw")
    with h5py.File(path, "a") as f:
        victim = _first_dataset(f)
        shape, dtype = f[victim].shape, f[victim].dtype
        nbytes = int(np.prod(shape)) * dtype.itemsize
        with h5py.File(secret_h5, "w") as s:
            s.create_dataset("data", data=np.ones(shape, dtype))
        secret_raw.write_bytes(bytes(nbytes))
        if attack == "huge_dataset":
            # Chunked and never written: 4 GiB declared, a few bytes on disk.
            f.create_dataset("huge", shape=(2**30,), dtype="float32", chunks=(1024,))
            return path
        other = _other_dataset(f, victim)
        del f[victim]
        if attack == "external_link":
            f[victim] = h5py.ExternalLink(str(secret_h5), "/data")
        elif attack == "soft_link":
            f[victim] = h5py.SoftLink("/" + other)
        elif attack == "virtual_dataset":
            layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
            layout[...] = h5py.VirtualSource(str(secret_h5), "data", shape=shape)
            f.create_virtual_dataset(victim, layout)
        elif attack == "external_storage":
            f.create_dataset(victim, shape=shape, dtype=dtype, external=[(secret_raw, 0, nbytes)])
        else:
            raise ValueError(attack)
    return path


def _datasets(f: h5py.File) -> list[str]:
    found: list[str] = []
    f.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) else None)
    return found


def _first_dataset(f: h5py.File) -> str:
    return _datasets(f)[0]


def _other_dataset(f: h5py.File, not_this: str) -> str:
    return next(name for name in _datasets(f) if name != not_this)


def weights_only_h5(model: keras.Model, path: Path) -> Path:
    """An HDF5 file with weights and no model_config, as `save_weights` writes."""
    model.save_weights(path.with_name(path.stem + ".weights.h5"))
    shutil.move(path.with_name(path.stem + ".weights.h5"), path)
    return path


def evil_module(directory: Path, name: str, marker: Path) -> Path:
    """A Python module that touches `marker` when imported, with a class Keras could load."""
    source = (
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).touch()\n"
        "import keras\n"
        "class EvilDense(keras.layers.Dense):\n"
        "    pass\n"
        "class EvilInit(keras.initializers.Zeros):\n"
        "    pass\n"
    )
    module = directory / f"{name}.py"
    module.write_text(source)
    return module


# --------------------------------------------------------------------------- broken files


def truncated(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    """The first `fraction` of a file, as an interrupted upload leaves it."""
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def random_bytes(dst: Path, n: int = 4096, seed: int = 0) -> Path:
    dst.write_bytes(np.random.default_rng(seed).bytes(n))
    return dst


def corrupt_member_stream(src: Path, dst: Path, member: str) -> Path:
    """Deflate every member of a zip, then garble `member`'s compressed bytes.

    The directory stays valid, so only decompressing the member finds out (zlib.error).
    """
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    data = bytearray(dst.read_bytes())
    with zipfile.ZipFile(dst) as zf:
        info = zf.getinfo(member)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for i in range(start, start + min(64, info.compress_size)):
        data[i] ^= 0xFF
    dst.write_bytes(bytes(data))
    return dst


def patch_zip_headers(
    src: Path, dst: Path, flag_bits: int = 0, compress_type: int | None = None
) -> Path:
    """Set flag bits (0x1: encrypted) or the compression method in every header of a zip.

    Written by hand because zipfile cannot write encrypted or Deflate64 members; the
    member data stays as it was, so only the headers lie.
    """
    data = bytearray(src.read_bytes())
    for signature, flags_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        at = data.find(signature)
        while at != -1:
            flags = struct.unpack_from("<H", data, at + flags_at)[0] | flag_bits
            struct.pack_into("<H", data, at + flags_at, flags)
            if compress_type is not None:
                struct.pack_into("<H", data, at + method_at, compress_type)
            at = data.find(signature, at + 4)
    dst.write_bytes(bytes(data))
    return dst


# --------------------------------------------------------------------------- hostile .npz


class PicklePayload:
    """An object whose unpickling touches `marker`: what an object array in an .npz can hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = Path(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def npz_with_pickles(path: Path, marker: Path, n: int = 40, key: str = "x") -> Path:
    """An .npz whose `key` is an object array of payloads (and a plain `y`)."""
    objects = np.empty(n, dtype=object)
    objects[:] = [PicklePayload(marker) for _ in range(n)]
    arrays = {"x": np.zeros((n, 16, 16, 3), np.float32), "y": np.arange(n) % 4}
    arrays[key] = objects
    np.savez(path, **arrays)
    return path


def npz_bomb(path: Path, megabytes: int = 64) -> Path:
    """An .npz whose x.npy is `megabytes` of zeros deflated about a thousandfold."""
    header = io.BytesIO()
    shape = (megabytes * 1024**2 // (16 * 16 * 3 * 4), 16, 16, 3)
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": shape}
    )
    chunk = bytes(1024**2)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            member.write(header.getvalue())
            for _ in range(megabytes):
                member.write(chunk)
        y = io.BytesIO()
        np.save(y, np.arange(shape[0]) % 4)
        archive.writestr("y.npy", y.getvalue())
    return path


def npz_lying_header(path: Path, shape: tuple[int, ...], n_labels: int = 40) -> Path:
    """An .npz whose x.npy header declares `shape` (float32) over a few KiB of data.

    numpy allocates what the header declares before it reads the data.
    """
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        member, {"descr": "<f4", "fortran_order": False, "shape": shape}
    )
    member.write(bytes(4096))
    y = io.BytesIO()
    np.save(y, np.arange(n_labels) % 4)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", member.getvalue())
        archive.writestr("y.npy", y.getvalue())
    return path
