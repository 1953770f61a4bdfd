"""Where uploads and results live: a small interface and the local-disk implementation.

Routes and tasks only see `ArtifactStore`, so an S3 (or other object store) implementation can
replace `LocalArtifactStore` without touching them: writes are streamed through a writer that
hashes as it goes and only becomes visible on `commit`, like an S3 multipart upload.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CHUNK = 1024 * 1024
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


class ArtifactTooLarge(Exception):
    """A write went past the cap given to the writer."""

    def __init__(self, name: str, limit: int) -> None:
        super().__init__(f"{name} is larger than {limit} bytes")
        self.name = name
        self.limit = limit


class StorageError(OSError):
    """A write to the store failed (disk full, read-only, a name taken): which one and why.

    An OSError still, errno kept, so callers that handle OSError keep working; its text is a
    sentence a job's error or an API answer can show as it is.
    """

    def __init__(self, name: str, cause: OSError) -> None:
        self.reason = cause.strerror or str(cause) or type(cause).__name__
        super().__init__(cause.errno, f"could not store {name}: {self.reason}")
        self.name = name

    def __str__(self) -> str:
        return str(self.strerror)


@dataclass(frozen=True)
class StoredArtifact:
    """What a committed write produced: enough for ETags and idempotency hashes."""

    name: str
    sha256: str
    bytes: int


class ArtifactWriter(ABC):
    """An in-progress write: invisible to readers until `commit`, gone after `abort`."""

    @abstractmethod
    def write(self, data: bytes) -> None: ...

    @abstractmethod
    def commit(self) -> StoredArtifact: ...

    @abstractmethod
    def abort(self) -> None: ...


class ArtifactStore(ABC):
    """Artifacts addressed by `job_id/name`; names are fixed by the service, never by users."""

    @abstractmethod
    def writer(self, job_id: str, name: str, limit: int | None = None) -> ArtifactWriter: ...

    @abstractmethod
    def open(self, job_id: str, name: str) -> BinaryIO:
        """Open for reading; FileNotFoundError when absent."""

    @abstractmethod
    def exists(self, job_id: str, name: str) -> bool: ...

    @abstractmethod
    def size(self, job_id: str, name: str) -> int: ...

    @abstractmethod
    def delete_job(self, job_id: str) -> None:
        """Remove every artifact of the job; a no-op when there are none."""

    @abstractmethod
    def delete(self, job_id: str, name: str) -> None:
        """Remove one artifact; a no-op when it is absent."""

    @abstractmethod
    def check_writable(self) -> None:
        """Raise OSError when a write would fail (readiness probe)."""

    def write(self, job_id: str, name: str, chunks: Iterable[bytes]) -> StoredArtifact:
        """Write a stream of chunks as one artifact."""
        out = self.writer(job_id, name)
        try:
            for chunk in chunks:
                out.write(chunk)
        except BaseException:
            out.abort()
            raise
        return out.commit()

    def put_file(self, job_id: str, name: str, path: Path) -> StoredArtifact:
        """Copy a local file in (a worker's results)."""
        with path.open("rb") as fh:
            return self.write(job_id, name, iter(lambda: fh.read(CHUNK), b""))

    def iter_chunks(self, job_id: str, name: str, chunk: int = CHUNK) -> Iterator[bytes]:
        """The artifact's bytes, for streaming responses."""
        with self.open(job_id, name) as fh:
            while data := fh.read(chunk):
                yield data

    @contextmanager
    def local_path(self, job_id: str, name: str) -> Iterator[Path]:
        """A local file with the artifact's bytes, for code that needs a path (the engine)."""
        with tempfile.TemporaryDirectory(prefix="fineprune-fetch-") as tmp:
            dst = Path(tmp) / name
            with self.open(job_id, name) as src, dst.open("wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
            yield dst


def check_key(job_id: str, name: str) -> None:
    """Refuse anything that could escape the job's folder."""
    if not _JOB_ID.match(job_id):
        raise ValueError(f"bad job id {job_id!r}")
    if not _NAME.match(name):
        raise ValueError(f"bad artifact name {name!r}")


class _LocalWriter(ArtifactWriter):
    """Writes `.name.<uuid>.part` beside the final file and renames it on commit.

    Whatever fails (no space, read-only disk, the name taken by a directory), the temporary
    file is removed and the final name keeps what it had: a reader never sees half a file.
    """

    def __init__(self, final: Path, limit: int | None) -> None:
        self._final = final
        self._tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.part")
        self._hash = hashlib.sha256()
        self._bytes = 0
        self._limit = limit
        self._fh: BinaryIO | None = None
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self._tmp.open("xb")
        except OSError as exc:
            raise StorageError(final.name, exc) from exc

    def write(self, data: bytes) -> None:
        assert self._fh is not None, "write after commit or abort"
        self._bytes += len(data)
        if self._limit is not None and self._bytes > self._limit:
            self.abort()
            raise ArtifactTooLarge(self._final.name, self._limit)
        self._hash.update(data)
        try:
            self._fh.write(data)
        except OSError as exc:
            self.abort()
            raise StorageError(self._final.name, exc) from exc

    def commit(self) -> StoredArtifact:
        assert self._fh is not None, "commit after commit or abort"
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
            os.replace(self._tmp, self._final)
        except OSError as exc:
            self.abort()
            raise StorageError(self._final.name, exc) from exc
        return StoredArtifact(self._final.name, self._hash.hexdigest(), self._bytes)

    def abort(self) -> None:
        """Drop the temporary file; never raises (it runs while another error is raised)."""
        if self._fh is not None:
            fh, self._fh = self._fh, None
            with contextlib.suppress(OSError):
                fh.close()  # flushing a full disk's buffer fails again: the file goes anyway
        with contextlib.suppress(OSError):
            self._tmp.unlink(missing_ok=True)


class LocalArtifactStore(ArtifactStore):
    """Artifacts as files under `root/<job_id>/<name>` on a disk the API and workers share."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, job_id: str, name: str) -> Path:
        check_key(job_id, name)
        return self.root / job_id / name

    def writer(self, job_id: str, name: str, limit: int | None = None) -> ArtifactWriter:
        return _LocalWriter(self._path(job_id, name), limit)

    def open(self, job_id: str, name: str) -> BinaryIO:
        return self._path(job_id, name).open("rb")

    def exists(self, job_id: str, name: str) -> bool:
        return self._path(job_id, name).is_file()

    def size(self, job_id: str, name: str) -> int:
        return self._path(job_id, name).stat().st_size

    def delete(self, job_id: str, name: str) -> None:
        self._path(job_id, name).unlink(missing_ok=True)

    def delete_job(self, job_id: str) -> None:
        check_key(job_id, "x")
        folder = self.root / job_id
        if not folder.exists():
            return
        # Rename first so readers never see a half-deleted folder, then remove.
        doomed = self.root / f".deleted-{job_id}-{uuid.uuid4().hex}"
        try:
            folder.rename(doomed)
        except FileNotFoundError:
            return
        shutil.rmtree(doomed, ignore_errors=True)

    def check_writable(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        probe = self.root / f".probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()

    @contextmanager
    def local_path(self, job_id: str, name: str) -> Iterator[Path]:
        """The file itself: no copy on local disk."""
        path = self._path(job_id, name)
        if not path.is_file():
            raise FileNotFoundError(path)
        yield path

    def job_names(self, job_id: str) -> list[str]:
        """Committed artifact names of a job (tests and retention)."""
        folder = self.root / job_id
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
