"""Clean, test and trigger data: read .npz safely, check it against the model, split it.

Data arrives from users as .npz files. They are read without pickle, checked member by member
before numpy expands them, and every mismatch with the model is reported in words.
"""

from __future__ import annotations

import io
import math
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fineprune.errors import InvalidDataError

MAX_MEMBER_BYTES = 4 * 1024**3
MAX_EXPANSION_RATIO = 1000
MAX_MEMBERS = 1000
MAX_NPY_HEADER_BYTES = 64 * 1024
"""numpy itself refuses headers over 10,000 bytes, but only after reading them whole."""
_NPY_MAGIC = b"\x93NUMPY"
_READABLE_COMPRESSION = frozenset(
    {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
)
# What reading a hostile zip member can raise besides our own checks: corrupt headers
# (BadZipFile), corrupt deflate streams (zlib.error), short members (EOFError, ValueError).
_READ_ERRORS = (
    ValueError,
    OSError,
    EOFError,
    RuntimeError,
    NotImplementedError,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
)


@dataclass(frozen=True)
class LabelledData:
    """Inputs as the model consumes them, with integer labels.

    `groups`, when the data has them, names the source of each sample (a video, a physical
    sign photographed thirty times): near-copies that a split must keep on one side.
    """

    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.x)

    def take(self, rows: np.ndarray) -> LabelledData:
        groups = None if self.groups is None else self.groups[rows]
        return LabelledData(self.x[rows], self.y[rows], groups)


@dataclass(frozen=True)
class ModelSignature:
    """What the data must look like: per-sample input shape (None = any) and class count."""

    input_shape: tuple[int | None, ...]
    classes: int


def check_npz_container(path: Path, role: str) -> list[str]:
    """Member names of an .npz, after refusing bombs and non-archives. Cheap: reads no array.

    Every member is checked, wanted or not: zipfile would happily start decompressing an
    encrypted, exotic or bomb member if numpy asked for it.
    """
    if not path.exists() or path.stat().st_size == 0:
        raise InvalidDataError(f"{role} data file is empty or missing")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except _READ_ERRORS as exc:
        raise InvalidDataError(
            f"{role} data is not an .npz file (not a readable zip archive: {_one_line(exc)})"
        ) from None
    if len(infos) > MAX_MEMBERS:
        raise InvalidDataError(
            f"{role} data has {len(infos)} members; an .npz needs a few arrays, refused"
        )
    names = []
    for info in infos:
        shown = _short(info.filename)
        if info.file_size > MAX_MEMBER_BYTES:
            raise InvalidDataError(
                f"{role} data member {shown} expands to {info.file_size} bytes, "
                f"over the {MAX_MEMBER_BYTES} byte limit"
            )
        if info.file_size / max(info.compress_size, 1) > MAX_EXPANSION_RATIO:
            ratio = info.file_size // max(info.compress_size, 1)
            raise InvalidDataError(
                f"{role} data member {shown} expands {ratio}-fold: refused as a compression bomb"
            )
        if info.flag_bits & 0x1:
            raise InvalidDataError(f"{role} data member {shown} is encrypted; refused")
        if info.compress_type not in _READABLE_COMPRESSION:
            raise InvalidDataError(
                f"{role} data member {shown} uses zip compression method {info.compress_type}, "
                "which cannot be read; save the data with numpy.savez or savez_compressed"
            )
        name = info.filename.removesuffix(".npy")
        if name in names:  # 'x' and 'x.npy', or 'x.npy' twice: the check and numpy could differ
            raise InvalidDataError(f"{role} data has array {_short(name)} twice; refused")
        names.append(name)
    return names


@dataclass(frozen=True)
class ArrayHeader:
    """What a member's .npy header declares, read without reading the array."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_npz_headers(path: Path, role: str, wanted: set[str]) -> dict[str, ArrayHeader]:
    """Shapes and dtypes of the wanted members, from their .npy headers only.

    Refuses what numpy must not be asked to load: object arrays (unpickling runs code) and
    headers declaring more data than the member holds (numpy would allocate the declared
    size before finding out).
    """
    return _headers(path, role, check_npz_container(path, role), wanted)


def _headers(path: Path, role: str, names: list[str], wanted: set[str]) -> dict[str, ArrayHeader]:
    headers: dict[str, ArrayHeader] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
            for name in names:
                if name in wanted and name not in headers:
                    headers[name] = _member_header(archive, members[name], role, name)
    except InvalidDataError:
        raise
    except _READ_ERRORS as exc:
        raise InvalidDataError(f"{role} data could not be read: {_one_line(exc)}") from None
    return headers


def _member_header(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, role: str, name: str
) -> ArrayHeader:
    """Parse one member's .npy header, reading at most MAX_NPY_HEADER_BYTES of it."""
    with archive.open(info) as fp:
        head = fp.read(12)
        if not head.startswith(_NPY_MAGIC) or len(head) < 10:
            raise InvalidDataError(f"{role} data member {name!r} is not a .npy array")
        version = (head[6], head[7])
        if version == (1, 0):
            start, length = 10, struct.unpack("<H", head[8:10])[0]
        elif version == (2, 0) and len(head) == 12:
            start, length = 12, struct.unpack("<I", head[8:12])[0]
        else:
            raise InvalidDataError(
                f"{role} data member {name!r} has .npy format version {version[0]}.{version[1]};"
                " save it with numpy.savez"
            )
        if length > MAX_NPY_HEADER_BYTES:
            raise InvalidDataError(
                f"{role} data member {name!r} has a {length}-byte .npy header; refused"
            )
        raw = head + fp.read(start + length - len(head))
    reader = (
        np.lib.format.read_array_header_1_0 if start == 10 else np.lib.format.read_array_header_2_0
    )
    try:
        buffer = io.BytesIO(raw)
        buffer.seek(8)
        shape, _, dtype = reader(buffer)
    except (ValueError, SyntaxError, TypeError, EOFError) as exc:
        raise InvalidDataError(
            f"{role} data member {name!r} is not a .npy array: {_one_line(exc)}"
        ) from None
    if dtype.hasobject:
        raise InvalidDataError(
            f"{role} data member {name!r} holds object arrays (pickled Python objects); refused"
        )
    if any(d < 0 for d in shape):
        raise InvalidDataError(f"{role} data member {name!r} declares a negative shape {shape}")
    header = ArrayHeader(tuple(int(d) for d in shape), dtype)
    held = info.file_size - start - length
    if header.nbytes > held:
        raise InvalidDataError(
            f"{role} data member {name!r} declares shape {header.shape} ({header.nbytes} bytes)"
            f" but holds {max(held, 0)} bytes of data: truncated, or its header lies; refused"
        )
    return header


def read_npz(path: Path, role: str, required: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays of an .npz, never unpickling anything, headers checked before loading."""
    names = check_npz_container(path, role)
    missing = [k for k in required if k not in names]
    if missing:
        raise InvalidDataError(
            f"{role} data lacks {', '.join(repr(m) for m in missing)} "
            f"(it holds {', '.join(repr(n) for n in names) or 'nothing'})"
        )
    headers = _headers(path, role, names, {*required, "y_target", "target", "groups"})
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for key in headers:
                arrays[key] = npz[key]
    except _READ_ERRORS as exc:
        raise InvalidDataError(f"{role} data could not be read: {_one_line(exc)}") from None
    return arrays


def prepare_inputs(
    x: np.ndarray, signature: ModelSignature, role: str, rescale: float | None
) -> np.ndarray:
    """Check `x` against the model's input shape, rescale, and refuse non-finite values."""
    if x.dtype.kind not in "uif":
        raise InvalidDataError(f"{role} x has dtype {x.dtype}; expected numbers")
    expected = signature.input_shape
    got = tuple(x.shape[1:])
    fits = len(got) == len(expected) and all(
        e is None or e == g for e, g in zip(expected, got, strict=True)
    )
    if x.ndim < 1 or not fits:
        shown = tuple("any" if e is None else e for e in expected)
        raise InvalidDataError(
            f"{role} x has shape {tuple(x.shape)}, i.e. samples of shape {got}, "
            f"but the model expects samples of shape {shown}"
        )
    if len(x) == 0:
        raise InvalidDataError(f"{role} x holds no samples")
    values = x.astype(np.float32)
    if rescale is not None:
        with np.errstate(over="ignore"):
            values *= np.float32(rescale)
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).reshape(len(values), -1).any(axis=1).sum())
        raise InvalidDataError(f"{role} x has NaN or infinite values in {bad} sample(s)")
    return values


def prepare_labels(y: np.ndarray, n: int, signature: ModelSignature, role: str) -> np.ndarray:
    """Integer labels from integer or one-hot `y`, checked against the model's classes."""
    classes = max(signature.classes, 2)
    if len(y) != n:
        raise InvalidDataError(f"{role} has {n} samples in x but {len(y)} labels in y")
    if y.ndim == 2 and y.shape[1] == classes:
        if not (np.isin(y, (0, 1)).all() and (y.sum(axis=1) == 1).all()):
            raise InvalidDataError(f"{role} y is 2-D but its rows are not one-hot")
        return y.argmax(axis=1).astype(np.int64)
    if y.ndim == 2:
        raise InvalidDataError(
            f"{role} y is one-hot with {y.shape[1]} columns but the model has {classes} outputs"
        )
    if y.ndim != 1:
        raise InvalidDataError(f"{role} y has shape {tuple(y.shape)}; expected (samples,)")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or not (y == np.round(y)).all():
            raise InvalidDataError(f"{role} y holds non-integer labels")
    elif y.dtype.kind not in "iu":
        raise InvalidDataError(f"{role} y has dtype {y.dtype}; expected integer labels")
    labels = y.astype(np.int64)
    if labels.min() < 0 or labels.max() >= classes:
        raise InvalidDataError(
            f"{role} y has labels from {labels.min()} to {labels.max()}, but the model has "
            f"{classes} classes (0..{classes - 1})"
        )
    return labels


def load_labelled(
    path: Path, signature: ModelSignature, role: str, rescale: float | None
) -> LabelledData:
    arrays = read_npz(path, role, ("x", "y"))
    x = prepare_inputs(arrays["x"], signature, role, rescale)
    y = prepare_labels(arrays["y"], len(x), signature, role)
    groups = arrays.get("groups")
    if groups is not None:
        check_groups(groups.dtype, groups.shape, len(x), role)
    return LabelledData(x, y, groups)


def load_clean(path: Path, signature: ModelSignature, rescale: float | None) -> LabelledData:
    """The defender's clean data; enough of it, and more than one class."""
    data = load_labelled(path, signature, "clean", rescale)
    check_clean_classes(data.y)
    return data


def check_groups(dtype: np.dtype, shape: tuple[int, ...], n: int, role: str) -> None:
    """One integer or string per sample: what a split needs to keep near-copies together."""
    if dtype.kind not in "iuUS":
        raise InvalidDataError(
            f"{role} groups have dtype {dtype}; expected integers or strings, one per sample "
            "(e.g. the video or track each image came from)"
        )
    if len(shape) != 1 or shape[0] != n:
        raise InvalidDataError(
            f"{role} groups have shape {tuple(shape)}; expected ({n},), one per sample in x"
        )


def check_clean_classes(labels: np.ndarray) -> None:
    """More than one class, and enough samples to split every class into tune and holdout."""
    present = np.unique(labels)
    if len(present) < 2:
        raise InvalidDataError(
            f"clean data has only class {present[0]}: accuracy on one class measures nothing"
        )
    if len(labels) < max(20, 2 * len(present)):
        raise InvalidDataError(
            f"clean data has {len(labels)} samples for {len(present)} classes; need at least "
            f"{max(20, 2 * len(present))} to split into tuning and held-out parts"
        )


def trigger_targets(target: np.ndarray, n: int) -> np.ndarray:
    """One target per triggered sample: a single `target` (or a one-element `y_target`) repeats.

    Repeated as it is, not through int(): a NaN target must reach the label checks.
    """
    if target.ndim == 0 or target.size == 1:
        return np.repeat(target.reshape(1), n)
    return target


def load_trigger(path: Path, signature: ModelSignature, rescale: float | None) -> LabelledData:
    """Triggered samples and the class the attacker wants for each (`y_target` or `target`)."""
    names = check_npz_container(path, "trigger")
    target_key = "y_target" if "y_target" in names else "target"
    arrays = read_npz(path, "trigger", ("x", target_key))
    x = prepare_inputs(arrays["x"], signature, "trigger", rescale)
    y = prepare_labels(trigger_targets(arrays[target_key], len(x)), len(x), signature, "trigger")
    return LabelledData(x, y)


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (kept, split off): `fraction` of every class split off, seeded.

    With `groups`, whole groups move: a split that puts frames of one sign on both sides
    measures memory of that sign, not accuracy (GTSRB's holdout frames read 99-100 % where
    new signs read 80-90 %).
    """
    if groups is not None:
        return _grouped_split(labels, groups, fraction, seed)
    rng = np.random.default_rng(seed)
    kept, off = [], []
    for cls in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == cls))
        n_off = round(fraction * len(rows))
        n_off = min(max(n_off, 1), len(rows) - 1) if len(rows) >= 2 else 0
        off.append(rows[:n_off])
        kept.append(rows[n_off:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(off))


def _grouped_split(
    labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Whole groups split off, each counted for its most frequent class, until every class
    is as near `fraction` as whole groups allow: one group of every class that has three or
    more, never a class's last group (a group can be a third of a class)."""
    rng = np.random.default_rng(seed)
    ids, group_of_row = np.unique(groups, return_inverse=True)
    classes, class_of_row = np.unique(labels, return_inverse=True)
    counts = np.zeros((len(ids), len(classes)), dtype=np.int64)
    np.add.at(counts, (group_of_row, class_of_row), 1)
    majority, size = counts.argmax(axis=1), counts.sum(axis=1)
    target = fraction * counts.sum(axis=0)
    taken = np.zeros(len(classes))
    kept_groups = np.bincount(majority, minlength=len(classes))
    off = np.zeros(len(ids), dtype=bool)
    for group in rng.permutation(len(ids)):
        cls = majority[group]
        if kept_groups[cls] < 2:
            continue
        closer = abs(taken[cls] + size[group] - target[cls]) < abs(taken[cls] - target[cls])
        if (taken[cls] == 0 and kept_groups[cls] >= 3) or closer:
            off[group] = True
            taken[cls] += size[group]
            kept_groups[cls] -= 1
    split_off = off[group_of_row]
    return np.flatnonzero(~split_off), np.flatnonzero(split_off)


def _short(name: str, limit: int = 80) -> str:
    """A member name from the file, quoted and cut so it cannot flood a message."""
    return repr(name if len(name) <= limit else name[: limit - 3] + "...")


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
