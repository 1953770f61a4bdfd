"""The .keras zip container: members checked from the directory, the weights read in place.

Nothing is decompressed before the directory says it is safe to, and a stored (uncompressed)
weights file, which is what Keras writes, is handed to h5py as a window onto the archive
instead of being copied out of it.
"""

from __future__ import annotations

import io
import re
import struct
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from fineprune.errors import InvalidModelError, UnsafeModelError
from fineprune.load.inspection.limits import Limits
from fineprune.text import quoted
from fineprune.text import readable_bytes as size

KERAS_CONFIG = "config.json"
KERAS_METADATA = "metadata.json"
KERAS_WEIGHTS = "model.weights.h5"
KERAS_ASSETS_DIR = "assets/"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ALLOWED_COMPRESSION = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})
_DRIVE_PATH = re.compile(r"^[A-Za-z]:")
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... name length, extra length
_EOCD = struct.Struct("<4s4xH2xLLH")  # signature, entries this disk(skip), total, size, offset
_EOCD_SIGNATURE = b"PK\x05\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_EOCD = struct.Struct("<4sQ2H2L2Q")


@dataclass(frozen=True)
class ArchiveFacts:
    """What the directory says about a .keras archive that passed its checks."""

    members: int
    asset_members: int
    asset_bytes: int
    weights: zipfile.ZipInfo


def declared_entries(path: Path) -> int | None:
    """Entries the end of a zip's central directory declares, without reading the directory.

    zipfile builds an object per entry before anyone can count them, so a small archive with a
    huge directory would cost memory first; None when the end record is not found (zipfile
    will then say why the archive is unreadable).
    """
    with path.open("rb") as fh:
        fh.seek(0, io.SEEK_END)
        end = fh.tell()
        tail_start = max(0, end - (1 << 16) - _EOCD.size)
        fh.seek(tail_start)
        tail = fh.read()
        at = tail.rfind(_EOCD_SIGNATURE)
        if at < 0 or len(tail) - at < _EOCD.size:
            return None
        _, entries, _, _, _ = _EOCD.unpack_from(tail, at)
        locator = at - 20
        if entries == 0xFFFF and locator >= 0 and tail[locator : locator + 4] == _ZIP64_LOCATOR:
            (record,) = struct.unpack_from("<Q", tail, locator + 8)
            if record + _ZIP64_EOCD.size <= end:
                fh.seek(record)
                head = fh.read(_ZIP64_EOCD.size)
                if head[:4] == b"PK\x06\x06" and len(head) == _ZIP64_EOCD.size:
                    return int(_ZIP64_EOCD.unpack(head)[6])
        return int(entries)


def check_members(infos: list[zipfile.ZipInfo], limits: Limits) -> ArchiveFacts:
    """Refuse path tricks, smuggled files, bombs and too many assets before anything is read."""
    if len(infos) > limits.zip_members:
        raise UnsafeModelError(f".keras archive has {len(infos)} members; refused")
    seen: dict[str, zipfile.ZipInfo] = {}
    total = assets = asset_bytes = 0
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
        seen[name] = info
        if info.flag_bits & 0x1:
            raise UnsafeModelError(f".keras archive member {shown} is encrypted; refused")
        if info.compress_type not in _ALLOWED_COMPRESSION:
            raise InvalidModelError(
                f".keras archive member {shown} uses an unsupported compression method"
            )
        total += info.file_size
        if (
            info.file_size > limits.ratio_floor_bytes
            and info.file_size > limits.compression_ratio * max(info.compress_size, 1)
        ):
            raise UnsafeModelError(
                f".keras archive member {shown} would expand from {size(info.compress_size)}"
                f" to {size(info.file_size)}: a decompression bomb; refused"
            )
        if name.startswith(KERAS_ASSETS_DIR):
            assets += 1
            asset_bytes += info.file_size
    if total > limits.uncompressed_bytes:
        raise UnsafeModelError(
            f".keras archive declares {size(total)} uncompressed, over the"
            f" {size(limits.uncompressed_bytes)} limit; refused"
        )
    for required in (KERAS_CONFIG, KERAS_WEIGHTS):
        if required not in seen:
            raise InvalidModelError(
                f"not a Keras model archive: {required} is missing"
                f" (members: {quoted(', '.join(sorted(seen)), 120)})"
            )
    for name in seen:
        if name in (KERAS_CONFIG, KERAS_METADATA, KERAS_WEIGHTS):
            continue
        if name.startswith(KERAS_ASSETS_DIR):
            continue
        raise UnsafeModelError(
            f".keras archive has unexpected member {quoted(name)}; only {KERAS_CONFIG},"
            f" {KERAS_METADATA}, {KERAS_WEIGHTS} and {KERAS_ASSETS_DIR}... are allowed;"
            " refused"
        )
    if assets > 2 * limits.asset_members:  # files and their folders
        raise UnsafeModelError(
            f".keras archive has {assets} members under {KERAS_ASSETS_DIR}, over the"
            f" {limits.asset_members} asset limit; refused"
        )
    if asset_bytes > limits.asset_bytes:
        raise UnsafeModelError(
            f".keras archive's assets take {size(asset_bytes)} uncompressed, over the"
            f" {size(limits.asset_bytes)} limit; refused"
        )
    weights = seen[KERAS_WEIGHTS]
    if weights.file_size > limits.weights_file_bytes:
        raise UnsafeModelError(
            f"{KERAS_WEIGHTS} takes {size(weights.file_size)}, over the"
            f" {size(limits.weights_file_bytes)} the weight budget allows; refused"
        )
    return ArchiveFacts(len(infos), assets, asset_bytes, weights)


def read_config(zf: zipfile.ZipFile, limits: Limits) -> bytes:
    """config.json's bytes, read with a cap whatever size its header claims."""
    if zf.getinfo(KERAS_CONFIG).file_size > limits.config_bytes:
        raise InvalidModelError(f"{KERAS_CONFIG} is larger than {size(limits.config_bytes)}")
    with zf.open(KERAS_CONFIG) as fh:
        raw = fh.read(limits.config_bytes + 1)
    if len(raw) > limits.config_bytes:
        raise InvalidModelError(f"{KERAS_CONFIG} is larger than {size(limits.config_bytes)}")
    return raw


@contextmanager
def weights_file(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Iterator[IO[bytes]]:
    """The weights member as a seekable file: a window onto the archive when it is stored,
    else a private capped copy (seeking backwards in a deflated member re-reads it)."""
    if info.compress_type == zipfile.ZIP_STORED:
        with path.open("rb") as raw:
            offset = _data_offset(raw, info)
            window = _Window(raw, offset, info.file_size)
            if window.read(8) != HDF5_MAGIC:
                raise InvalidModelError(f"{KERAS_WEIGHTS} in the archive is not an HDF5 file")
            window.seek(0)
            yield window
        return
    with zf.open(info) as member:
        if member.read(8) != HDF5_MAGIC:
            raise InvalidModelError(f"{KERAS_WEIGHTS} in the archive is not an HDF5 file")
    with tempfile.TemporaryFile(prefix="fineprune-weights-") as tmp:
        with zf.open(info) as member:
            _copy_capped(member, tmp, info.file_size)
        tmp.seek(0)
        yield tmp


def _data_offset(raw: IO[bytes], info: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes start, from its local header (checked against the
    directory as zipfile does, so the bytes checked are the bytes Keras will read)."""
    raw.seek(info.header_offset)
    head = raw.read(_LOCAL_HEADER.size)
    if len(head) < _LOCAL_HEADER.size:
        raise InvalidModelError("not a valid .keras (zip) archive: a local header is cut off")
    signature, name_length, extra_length = _LOCAL_HEADER.unpack(head)
    if signature != b"PK\x03\x04":
        raise InvalidModelError("not a valid .keras (zip) archive: bad local header")
    name = raw.read(name_length)
    expected = info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
    if name != expected:
        raise UnsafeModelError(
            f"the .keras archive's directory and local header name {KERAS_WEIGHTS} differently;"
            " refused"
        )
    offset = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
    raw.seek(0, io.SEEK_END)
    if info.compress_size != info.file_size or offset + info.file_size > raw.tell():
        raise InvalidModelError(f"{KERAS_WEIGHTS} in the archive is cut off or lies about its size")
    return offset


def _copy_capped(src: IO[bytes], dst: IO[bytes], cap: int) -> None:
    """Copy at most `cap` bytes; a member that yields more lied about its size."""
    copied = 0
    while chunk := src.read(1024**2):
        copied += len(chunk)
        if copied > cap:
            raise UnsafeModelError(f"{KERAS_WEIGHTS} expands beyond {size(cap)}; refused")
        dst.write(chunk)


class _Window(io.RawIOBase):
    """Read-only view of `length` bytes of `raw` from `offset`, as h5py's file object."""

    def __init__(self, raw: IO[bytes], offset: int, length: int) -> None:
        super().__init__()
        self._raw, self._offset, self._length, self._pos = raw, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._length - self._pos))
        if n == 0:
            return 0
        self._raw.seek(self._offset + self._pos)
        got = self._raw.readinto(view[:n])  # type: ignore[attr-defined]
        self._pos += got or 0
        return got or 0

    def write(self, data: Any) -> int:
        raise io.UnsupportedOperation("the weights window is read-only")
