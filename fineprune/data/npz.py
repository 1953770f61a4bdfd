"""Reading .npz files from users: never unpickling, every member checked before numpy expands it.

Used by the API's cheap checks (no TensorFlow there) and by the engine alike.
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
from fineprune.load.inspection.archive import declared_entries
from fineprune.text import one_line, quoted

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


def check_npz_container(path: Path, role: str) -> list[str]:
    """Member names of an .npz, after refusing bombs and non-archives. Cheap: reads no array.

    Every member is checked, wanted or not: zipfile would happily start decompressing an
    encrypted, exotic or bomb member if numpy asked for it.
    """
    if not path.exists() or path.stat().st_size == 0:
        raise InvalidDataError(f"{role} data file is empty or missing")
    try:
        entries = declared_entries(path)  # before zipfile builds an object for each
        if entries is not None and entries > MAX_MEMBERS:
            raise InvalidDataError(
                f"{role} data declares {entries} members; an .npz needs a few arrays, refused"
            )
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except InvalidDataError:
        raise
    except _READ_ERRORS as exc:
        raise InvalidDataError(
            f"{role} data is not an .npz file (not a readable zip archive: {one_line(exc)})"
        ) from None
    if len(infos) > MAX_MEMBERS:
        raise InvalidDataError(
            f"{role} data has {len(infos)} members; an .npz needs a few arrays, refused"
        )
    names = []
    for info in infos:
        shown = quoted(info.filename)
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
            raise InvalidDataError(f"{role} data has array {quoted(name)} twice; refused")
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
        raise InvalidDataError(f"{role} data could not be read: {one_line(exc)}") from None
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
            f"{role} data member {name!r} is not a .npy array: {one_line(exc)}"
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
        raise InvalidDataError(f"{role} data could not be read: {one_line(exc)}") from None
    return arrays
