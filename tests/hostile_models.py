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
from dataclasses import dataclass
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
    compression: int = zipfile.ZIP_STORED,
) -> Path:
    """Copy a .keras archive, replacing (bytes) or dropping (None) members and adding others.

    `extra` is written verbatim with ZipInfo, so it can hold names zipfile would never
    produce on its own, like '../evil' or a second 'config.json'.
    """
    replace = replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        for info in zin.infolist():
            data = replace.get(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Duplicate name"
            for name, data in extra or []:
                zout.writestr(zipfile.ZipInfo(name), data)
    return dst


def edit_keras_config(
    src: Path,
    dst: Path,
    edit: Callable[[dict[str, Any]], None],
    compression: int = zipfile.ZIP_STORED,
) -> Path:
    """Copy a .keras archive with its config.json changed in place by `edit`."""
    with zipfile.ZipFile(src) as zf:
        config = json.loads(zf.read("config.json"))
    edit(config)
    return rewrite_zip(
        src, dst, replace={"config.json": json.dumps(config).encode()}, compression=compression
    )


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


# --------------------------------------------------------------------------- small files, big asks
# Found by trying the checks as an attacker would (issue 28): none of these runs code, each
# makes a small upload ask for memory, time or disk out of all proportion to its size.


def tiny_functional(path: Path, classes: int = 10, channels: int = 1) -> Path:
    """The tiny CNN as a Functional model: its config lists layers that need not be connected."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, channels), name="image")
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inp)
    x = keras.layers.Flatten(name="flatten")(keras.layers.MaxPooling2D(2, name="pool")(x))
    out = keras.layers.Dense(classes, activation="softmax", name="dense")(x)
    keras.Model(inp, out, name="tiny_functional").save(path)
    return path


def add_unconnected(*layers: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """A config edit putting layers with no inbound node first in a Functional model: Keras
    still builds each one (from its build_config), before the layers of the graph."""

    def edit(config: dict[str, Any]) -> None:
        for layer in reversed(layers):
            name = layer["config"]["name"]
            config["config"]["layers"].insert(0, {"name": name, "inbound_nodes": [], **layer})

    return edit


def serialized(class_name: str, module: str = "keras.layers", **config: Any) -> dict[str, Any]:
    return {"module": module, "class_name": class_name, "config": config, "registered_name": None}


def huge_dense(units: int = 56_000, inputs: int = 56_000, name: str = "huge") -> dict[str, Any]:
    """A Dense declaring an `inputs` x `units` kernel (56,000 x 56,000 float32: 11.7 GiB)."""
    layer = serialized("Dense", name=name, units=units)
    return {**layer, "build_config": {"input_shape": [None, inputs]}}


def identity_towers(towers: int = 48, depth: int = 900) -> list[dict[str, Any]]:
    """Unconnected Sequentials of Identity layers: Keras rebuilds each as it grows."""
    found = []
    for t in range(towers):
        inner = [serialized("Identity", name=f"id_{t}_{i}") for i in range(depth)]
        found.append(
            {
                **serialized("Sequential", module="keras", name=f"tower_{t}", layers=inner),
                "build_config": {"input_shape": [None, 4]},
            }
        )
    return found


GADGET_MODULE = "keras.src.saving.saving_lib_test"
"""A Keras test module: importing it registers custom classes (MyDense...) process-wide."""


def gadget_object(shared_id: int | None = None) -> dict[str, Any]:
    """MyDense from Keras's own test module, which Keras would import to resolve it."""
    obj = {
        "module": GADGET_MODULE,
        "class_name": "MyDense",
        "config": {"units": 2, "name": "gadget"},
        "registered_name": "my_custom_package>MyDense",
    }
    return obj if shared_id is None else {**obj, "shared_object_id": shared_id}


def text_vectorization(name: str = "text", **slots: Any) -> dict[str, Any]:
    """A TextVectorization layer whose `standardize`/`split` slots hold what is given."""
    config = keras.layers.TextVectorization(name=name).get_config()
    return serialized("TextVectorization", **{**config, **slots})


def claim_shared(name: str, shared_id: int) -> Callable[[dict[str, Any]], None]:
    """A config edit making layer `name` (which claims its own class) share object `shared_id`:
    Keras hands it whatever an earlier entry with that id built."""

    def edit(config: dict[str, Any]) -> None:
        find_layer(config, name)["shared_object_id"] = shared_id

    return edit


def chain(*edits: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def edit(config: dict[str, Any]) -> None:
        for one in edits:
            one(config)

    return edit


def vlen_config_bomb(src: Path, dst: Path, elements: int = 16_384, heap: int = 1024**2) -> Path:
    """A legacy .h5 whose model_config is `elements` strings that all point at one `heap`-byte
    heap object: 1.7 MB on disk, 16 GiB for whoever reads the attribute."""
    return vlen_attribute_bomb(src, dst, "/", "model_config", elements, heap)


def vlen_attribute_bomb(
    src: Path, dst: Path, group: str, name: str, elements: int, heap: int
) -> Path:
    """Copy a legacy .h5 with attribute `name` of `group` made `elements` strings that all
    point at one `heap`-byte heap object.

    h5py writes one heap object per string, so the file is patched: every element's record
    (u32 length, u64 heap collection, u32 index) is made a copy of the first one's. Written in
    HDF5's newest format, which keeps an attribute this large outside the object header.
    """
    with h5py.File(src) as old, h5py.File(dst, "w", libver="latest") as new:
        for key in old:
            old.copy(key, new)
        for key, value in old.attrs.items():
            new.attrs[key] = value
        target = new[group]
        if name in target.attrs:
            del target.attrs[name]
        strings = np.array(["A" * heap] + ["b"] * (elements - 1), dtype=object)
        target.attrs.create(name, strings, dtype=h5py.string_dtype())
    data = bytearray(dst.read_bytes())
    first = _first_vlen_record(data, heap, len(data))
    record = bytes(data[first : first + 16])
    for i in range(1, elements):
        data[first + 16 * i : first + 16 * (i + 1)] = record
    dst.write_bytes(bytes(data))
    return dst


def slow_layer_names(src: Path, dst: Path, elements: int = 2_000, heap: int = 3 * 1024**2) -> Path:
    """A legacy .h5 whose layer_names list is within every count bound, yet reading it means
    copying one 3 MiB heap object 2,000 times (6 GiB): only a deadline bounds the check."""
    return vlen_attribute_bomb(src, dst, "model_weights", "layer_names", elements, heap)


def _first_vlen_record(data: bytearray, length: int, file_size: int) -> int:
    """Where the records of a vlen string array start: a `length` record followed by ones of
    length 1 pointing inside the file."""
    needle = struct.pack("<I", length)
    at = data.find(needle)
    while at >= 0:
        following = [struct.unpack_from("<IQ", data, at + 16 * k) for k in range(1, 5)]
        if all(n == 1 and 0 < address < file_size for n, address in following):
            return at
        at = data.find(needle, at + 1)
    raise AssertionError("the vlen records were not found")


def deep_groups(path: Path, depth: int = 8_000) -> Path:
    """Add a chain of `depth` nested groups to an HDF5 file (h5py's visit slows with depth).

    Written in HDF5's newest format, whose compact groups keep 8,000 of them near 1 MB."""
    with h5py.File(path, "a", libver="latest") as f:
        group: h5py.Group = f
        for _ in range(depth):
            group = group.create_group("g")
    return path


def keras_with_weights(src: Path, dst: Path, edit: Callable[[Path], Any]) -> Path:
    """A .keras archive whose model.weights.h5 went through `edit(path)`."""
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "model.weights.h5"
        with zipfile.ZipFile(src) as zf:
            weights.write_bytes(zf.read("model.weights.h5"))
        edit(weights)
        return rewrite_zip(src, dst, replace={"model.weights.h5": weights.read_bytes()})


def fill_value_kernel(path: Path, shape: tuple[int, ...] = (22_500, 22_500)) -> Path:
    """Swap the first weight dataset for one declaring `shape` float32 and never written: the
    file stays small, reading it takes the declared 1.9 GiB."""
    with h5py.File(path, "a") as f:
        victim = _first_dataset(f)
        del f[victim]
        f.create_dataset(victim, shape=shape, dtype="float32")
    return path


def repeated_weight_names(path: Path, times: int = 256, megabytes: int = 64) -> Path:
    """A legacy .h5 whose first layer lists one `megabytes` dataset `times` over in its
    weight_names: Keras reads it once per listing (16 GiB for 64 MiB x 256)."""
    with h5py.File(path, "a") as f:
        weights = f["model_weights"]
        layer = next(name for name in weights if len(weights[name].attrs["weight_names"]))
        group = weights[layer]
        group.create_dataset("big", shape=(megabytes * 1024**2 // 4,), dtype="float32")
        group.attrs["weight_names"] = np.array(["big"] * times, dtype=h5py.string_dtype())
    return path


def many_assets(src: Path, dst: Path, count: int = 2_000, each: int = 1024**2 - 1) -> Path:
    """An archive with `count` assets/ members of `each` zeros, deflated: just under the size
    where the ratio check starts, so each looks too small to be a bomb."""
    zeros = bytes(each)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info, zin.read(info.filename))
        for i in range(count):
            zout.writestr(f"assets/junk/{i}.bin", zeros)
    return dst


def rename_layer(name: str, new: str) -> Callable[[dict[str, Any]], None]:
    """A config edit renaming layer `name` (Sequential: no graph refers to it by name)."""

    def edit(config: dict[str, Any]) -> None:
        find_layer(config, name)["config"]["name"] = new

    return edit


def edit_h5_config(path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """Change a legacy .h5's model_config in place."""
    with h5py.File(path, "a") as f:
        config = json.loads(f.attrs["model_config"])
        edit(config)
        f.attrs["model_config"] = json.dumps(config)
    return path


# --------------------------------------------------------------------------- the issue-28 corpus


@dataclass(frozen=True)
class Attack:
    """One small file asking for too much, and how it must be refused.

    `in_worker`: only the job's process can tell (Keras's own shape inference), so the API
    accepts it and the job must fail; everything else is refused before anything is queued.
    """

    build: Callable[[AttackBase, Path], Path]
    kind: str
    fragments: tuple[str, ...]
    in_worker: bool = False


@dataclass(frozen=True)
class AttackBase:
    """The tiny models the attacks are made from (16x16x`channels`, `classes` outputs)."""

    keras: Path
    h5: Path
    functional: Path

    @classmethod
    def build(cls, root: Path, classes: int, channels: int) -> AttackBase:
        root.mkdir(parents=True, exist_ok=True)
        keras_path, h5_path = root / "base.keras", root / "base.h5"
        tiny_model(classes=classes, channels=channels).save(keras_path)
        tiny_model(classes=classes, channels=channels).save(h5_path)
        functional = tiny_functional(root / "base_functional.keras", classes, channels)
        return cls(keras_path, h5_path, functional)

    def h5_copy(self, dst: Path) -> Path:
        dst.write_bytes(self.h5.read_bytes())
        return dst


def _nested(levels: int) -> dict[str, Any]:
    layer: dict[str, Any] = serialized("Dense", name="innermost", units=2)
    for level in range(levels):
        layer = serialized("Sequential", module="keras", name=f"level_{level}", layers=[layer])
    return layer


def _einsum(units: int = 56_000) -> dict[str, Any]:
    """A layer whose weights only Keras's shape inference tells: the job's process measures."""
    layer = serialized("EinsumDense", name="wide", equation="ab,bc->ac", output_shape=units)
    return {**layer, "build_config": {"input_shape": [None, units]}}


def _units(name: str, units: int) -> Callable[[dict[str, Any]], None]:
    return lambda config: find_layer(config, name)["config"].update(units=units)


ATTACKS: dict[str, Attack] = {
    "vlen_config_bomb.h5": Attack(
        lambda b, p: vlen_config_bomb(b.h5, p), "unsafe_model", ("lists 16384 strings",)
    ),
    "slow_layer_names.h5": Attack(
        lambda b, p: slow_layer_names(b.h5, p), "unsafe_model", ("'layer_names'",)
    ),
    "deep_groups.h5": Attack(
        lambda b, p: deep_groups(b.h5_copy(p)), "unsafe_model", ("nests groups more than 32",)
    ),
    "deep_groups.keras": Attack(
        lambda b, p: keras_with_weights(b.keras, p, deep_groups),
        "unsafe_model",
        ("model.weights.h5 nests groups more than 32",),
    ),
    "gadget_standardize.keras": Attack(
        lambda b, p: edit_keras_config(
            b.functional, p, add_unconnected(text_vectorization(standardize=gadget_object()))
        ),
        "unsafe_model",
        ("'standardize' of class 'MyDense'", GADGET_MODULE),
    ),
    "gadget_split.keras": Attack(
        lambda b, p: edit_keras_config(
            b.functional, p, add_unconnected(text_vectorization(split=gadget_object()))
        ),
        "unsafe_model",
        ("'split' of class 'MyDense'",),
    ),
    "gadget_claimed_by_dense.keras": Attack(
        lambda b, p: edit_keras_config(
            b.functional,
            p,
            chain(
                add_unconnected(text_vectorization(standardize=gadget_object(7))),
                claim_shared("dense", 7),
            ),
        ),
        "unsafe_model",
        ("'standardize' of class 'MyDense'",),
    ),
    "shared_object_of_another_class.keras": Attack(
        lambda b, p: edit_keras_config(
            b.functional,
            p,
            chain(
                add_unconnected(
                    {**serialized("Dropout", name="drop", rate=0.5), "shared_object_id": 9}
                ),
                claim_shared("dense", 9),
            ),
        ),
        "unsafe_model",
        ("shares object 9",),
    ),
    "huge_dense.keras": Attack(
        lambda b, p: edit_keras_config(b.functional, p, add_unconnected(huge_dense())),
        "unsafe_model",
        ("layer 'huge' alone takes 11.7 GiB", "weight budget"),
    ),
    "huge_dense.h5": Attack(
        lambda b, p: edit_h5_config(b.h5_copy(p), _units("dense", 10_000_000)),
        "unsafe_model",
        ("layer 'dense' alone takes 7.3 GiB",),
    ),
    "fill_value_kernel.keras": Attack(
        lambda b, p: keras_with_weights(b.keras, p, fill_value_kernel),
        "unsafe_model",
        ("declares 1.9 GiB of data",),
    ),
    "repeated_weight_names.h5": Attack(
        lambda b, p: repeated_weight_names(b.h5_copy(p)),
        "unsafe_model",
        ("of weights to read", "weight_names of 'conv'"),
    ),
    "identity_towers.keras": Attack(
        lambda b, p: edit_keras_config(
            b.functional, p, add_unconnected(*identity_towers()), zipfile.ZIP_DEFLATED
        ),
        "unsafe_model",
        ("more than 2000 layers",),
    ),
    "nested_too_deep.keras": Attack(
        lambda b, p: edit_keras_config(b.functional, p, add_unconnected(_nested(10))),
        "unsafe_model",
        ("over the 8 allowed",),
    ),
    "many_assets.keras": Attack(
        lambda b, p: many_assets(b.keras, p), "unsafe_model", ("2003 members",)
    ),
    "big_assets.keras": Attack(
        lambda b, p: many_assets(b.keras, p, count=80),
        "unsafe_model",
        ("assets take 80.0 MiB uncompressed",),
    ),
    "angle_bracket_name.keras": Attack(
        lambda b, p: edit_keras_config(b.keras, p, rename_layer("conv", "conv<1>")),
        "unsafe_model",
        ("layer name 'conv<1>' is not one TensorFlow accepts",),
    ),
    "measured_in_the_job.keras": Attack(
        lambda b, p: edit_keras_config(b.functional, p, add_unconnected(_einsum())),
        "unsafe_model",
        ("would hold 11.7 GiB of weights once built",),
        in_worker=True,
    ),
}


def build_attacks(root: Path, classes: int = 4, channels: int = 3) -> dict[str, Path]:
    """Every file of `ATTACKS` under `root`, made from tiny models that fit the given data."""
    base = AttackBase.build(root / "base", classes, channels)
    return {name: attack.build(base, root / name) for name, attack in ATTACKS.items()}


def npz_many_members(path: Path, count: int = 1_500) -> Path:
    """An .npz whose directory lists `count` empty members: zipfile would build an object for
    each before anyone could count them (refused from the directory's end record)."""
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(count):
            archive.writestr(f"a{i}.npy", b"")
    return path
