"""Streaming multipart uploads: each file part goes to storage in chunks while it is hashed.

`request.form()` would spool whole files to temporary storage before we could refuse them;
this parser refuses an oversized request from its Content-Length before reading it, an
oversized part as soon as it passes its cap, and removes whatever was written.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath

import anyio
from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from jobs.settings import Settings
from jobs.storage import ArtifactStore, ArtifactTooLarge, ArtifactWriter, StorageError
from service.errors import ApiError

log = logging.getLogger(__name__)

FILE_FIELDS: dict[str, str] = {
    "model": "the untrusted model, .keras or .h5",
    "data": "clean labelled data, .npz with arrays x and y (and optional groups)",
    "trigger_data": "optional triggered samples, .npz with x and y_target (or target)",
    "test_data": "optional separate clean test data, .npz with x and y",
}
TEXT_FIELDS: dict[str, str] = {
    "options": "optional SanitizeOptions as one JSON object",
    "callback_url": "optional URL to POST the finished job to (signed)",
}
DRAIN_LIMIT = 16 * 1024**2
"""After refusing a part, read and drop up to this much more so the client sees our answer."""
HOP_BYTES = 4 * 1024**2
"""Body bytes gathered before one hop to a worker thread parses, hashes and writes them: the
server hands over 64 KiB at a time, and a hop per 64 KiB cost uploads a third of disk speed."""


@dataclass
class ReceivedFile:
    field: str
    filename: str
    stored_name: str
    sha256: str
    bytes: int


@dataclass
class Upload:
    files: dict[str, ReceivedFile] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)


def stored_name(field_name: str, filename: str) -> str:
    """Service-chosen names; only the model keeps a hint of its format (.keras or .h5)."""
    if field_name == "model":
        return (
            "input_model.h5"
            if filename.lower().endswith((".h5", ".hdf5"))
            else ("input_model.keras")
        )
    return f"input_{field_name}.npz"


def _client_filename(raw: bytes | None, field_name: str) -> str:
    """The base name the client sent, for display only, cut to a sane length."""
    if not raw:
        return field_name
    text = raw.decode("utf-8", "replace")
    base = PureWindowsPath(PurePosixPath(text).name).name
    clean = "".join(ch for ch in base if ch.isprintable())[:200]
    return clean or field_name


class _Sink:
    """python-multipart callbacks writing into the store (runs in a worker thread)."""

    def __init__(self, store: ArtifactStore, job_id: str, settings: Settings) -> None:
        self.store = store
        self.job_id = job_id
        self.settings = settings
        self.upload = Upload()
        self.ended = False
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._filename = ""
        self._writer: ArtifactWriter | None = None
        self._text: bytearray | None = None
        self._seen: set[str] = set()

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field_data,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._name = None

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition"))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if name not in FILE_FIELDS and name not in TEXT_FIELDS:
            expected = ", ".join([*FILE_FIELDS, *TEXT_FIELDS])
            raise ApiError(
                422,
                "unknown_field",
                f"unknown form field {name[:50]!r}; expected {expected}",
                [{"loc": ["body", name[:50]], "msg": "unknown field", "type": "unknown_field"}],
            )
        if name in self._seen:
            raise ApiError(
                422,
                "duplicate_field",
                f"form field {name!r} was sent twice",
                [{"loc": ["body", name], "msg": "sent twice", "type": "duplicate_field"}],
            )
        self._seen.add(name)
        self._name = name
        if name in FILE_FIELDS:
            self._filename = _client_filename(params.get(b"filename"), name)
            limit = (
                self.settings.max_model_bytes if name == "model" else self.settings.max_data_bytes
            )
            self._writer = self.store.writer(
                self.job_id, stored_name(name, self._filename), limit=limit
            )
        else:
            self._text = bytearray()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._writer is not None:
            self._writer.write(data[start:end])
        elif self._text is not None:
            self._text += data[start:end]
            if len(self._text) > self.settings.max_field_bytes:
                raise ArtifactTooLarge(self._name or "field", self.settings.max_field_bytes)

    def _part_end(self) -> None:
        if self._name is None:
            raise ApiError(400, "bad_request", "a multipart part ended before its headers")
        if self._writer is not None:
            stored = self._writer.commit()
            self._writer = None
            self.upload.files[self._name] = ReceivedFile(
                self._name, self._filename, stored.name, stored.sha256, stored.bytes
            )
        elif self._text is not None:
            try:
                self.upload.fields[self._name] = self._text.decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError(
                    422, "validation_error", f"form field {self._name!r} is not UTF-8 text"
                ) from None
            self._text = None

    def _end(self) -> None:
        self.ended = True

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


def _boundary(request: Request) -> bytes:
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data":
        raise ApiError(
            415,
            "unsupported_media_type",
            "send the job as multipart/form-data (fields: model, data, ...)",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_request", "multipart/form-data without a boundary")
    return boundary


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    """Read and drop some of the rest, so clients that send before reading get our answer."""
    dropped = 0
    try:
        async for chunk in chunks:
            dropped += len(chunk)
            if dropped > DRAIN_LIMIT:
                return
    except (ClientDisconnect, RuntimeError):
        return


async def receive_upload(
    request: Request, store: ArtifactStore, job_id: str, settings: Settings
) -> Upload:
    """Parse the body into the store under `job_id`; on any error nothing stays stored."""
    total_cap = settings.max_request_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "bad_request", "Content-Length is not a number")
        if int(declared) > total_cap:
            raise ApiError(
                413, "too_large", f"the request is {declared} bytes; the limit is {total_cap}"
            )
    boundary = _boundary(request)
    sink = _Sink(store, job_id, settings)
    chunks = request.stream()
    received = 0
    pending = bytearray()
    try:
        parser = MultipartParser(boundary, sink.callbacks())  # type: ignore[arg-type]
        async for chunk in chunks:
            received += len(chunk)
            if received > total_cap:
                raise ApiError(413, "too_large", f"the request is over {total_cap} bytes")
            pending += chunk
            if len(pending) >= HOP_BYTES:
                await anyio.to_thread.run_sync(parser.write, bytes(pending))
                pending.clear()
        if pending:
            await anyio.to_thread.run_sync(parser.write, bytes(pending))
            pending.clear()
        if not sink.ended:
            raise ApiError(400, "bad_request", "the multipart body ends before its last boundary")
    except BaseException as exc:
        sink.abort()
        with anyio.CancelScope(shield=True):  # clean up even when the request is cancelled
            await anyio.to_thread.run_sync(_forget, store, job_id)
        if isinstance(exc, OSError):  # the store cannot take the upload: full, read-only...
            log.warning("upload of job %s could not be stored: %s", job_id, exc)
            await _drain(chunks)
            reason = exc.reason if isinstance(exc, StorageError) else (exc.strerror or str(exc))
            raise ApiError(
                503,
                "storage_unavailable",
                f"the service cannot store uploads right now ({reason}); try again later",
            ) from None
        if isinstance(exc, ClientDisconnect):
            raise ApiError(400, "bad_request", "the client went away during the upload") from None
        if isinstance(exc, FormParserError):
            raise ApiError(400, "bad_request", f"malformed multipart body: {exc}") from None
        if isinstance(exc, ArtifactTooLarge):
            await _drain(chunks)
            raise ApiError(
                413,
                "too_large",
                f"form field {_field_of(exc.name)!r} is larger than its limit of {exc.limit} bytes",
                [{"loc": ["body", _field_of(exc.name)], "msg": "too large", "type": "too_large"}],
            ) from None
        if isinstance(exc, ApiError):
            await _drain(chunks)
        raise
    return sink.upload


def _forget(store: ArtifactStore, job_id: str) -> None:
    """Remove a refused upload's files; a store that cannot even delete is logged, not raised.

    It runs while another error is on its way to the client, which must not become a 500.
    """
    try:
        store.delete_job(job_id)
    except OSError:
        log.warning("could not remove the files of refused upload %s", job_id, exc_info=True)


def _field_of(name: str) -> str:
    """Stored name back to its form field, for error locations."""
    for field_name in FILE_FIELDS:
        if name.startswith(f"input_{field_name}"):
            return field_name
    return name
