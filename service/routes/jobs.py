"""The job resource: submit, poll, list, download, cancel. Thin: the work is in `jobs/`."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from jobs import lifecycle, recovery
from jobs.callbacks import CallbackRefused, check_url_syntax
from jobs.checks import InputRejected, check_inputs
from jobs.records import (
    ArtifactInfo,
    CallbackStatus,
    IdempotencyEntry,
    JobRecord,
    RecordNotFound,
    hash_idempotency_key,
    new_job_id,
    now,
    to_resource,
)
from jobs.storage import CHUNK
from schemas.jobs import InputFile, JobPage, JobResource, JobState
from schemas.options import SanitizeOptions
from schemas.report import SanitizeReport
from service.deps import OwnerDep, QueueDep, RecordsDep, SettingsDep, StoreDep
from service.errors import ApiError, error_responses, field_errors, summarize
from service.uploads import FILE_FIELDS, TEXT_FIELDS, Upload, receive_upload

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=error_responses(401, 422))

_OPTIONS_EXAMPLE = {"defense": "fine-pruning", "max_accuracy_drop": 4.0, "epochs": 20}
UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The job's files, streamed to storage as they arrive. "
        "`options` is one JSON object with the fields of the SanitizeOptions schema "
        "(every field optional; defaults are the recommended settings).",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["model", "data"],
                    # The parser refuses any other part (422 unknown_field): say so.
                    "additionalProperties": False,
                    "properties": {
                        **{
                            name: {"type": "string", "format": "binary", "description": text}
                            for name, text in FILE_FIELDS.items()
                        },
                        # One JSON-encoded part (see `encoding`): the object schema lets clients
                        # and fuzzers build valid options instead of guessing at a string.
                        "options": {
                            "$ref": "#/components/schemas/SanitizeOptions",
                            "description": TEXT_FIELDS["options"],
                            "examples": [_OPTIONS_EXAMPLE],
                        },
                        "callback_url": {
                            "type": "string",
                            "format": "uri",
                            "description": TEXT_FIELDS["callback_url"]
                            + ": X-Fineprune-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "
                            "'<t>.<body>'>",
                            "example": "https://example.com/hooks/fineprune",
                        },
                    },
                },
                "encoding": {"options": {"contentType": "application/json"}},
            }
        },
    }
}
_LOCATION = {
    "description": "The job's URL: /v1/jobs/{id}.",
    "required": True,
    "schema": {"type": "string"},
}
_ETAG = {
    "description": "The model's sha256, quoted.",
    "required": True,
    "schema": {"type": "string"},
}
_DISPOSITION = {
    "description": 'attachment; filename="sanitized-{id}.keras"',
    "required": True,
    "schema": {"type": "string"},
}
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=255,
        description="Retry-safe submits: the same key with the same files and options returns "
        "the job made first; the same key with a different payload is refused (422).",
    ),
]


def _job_or_404(records: RecordsDep, owner: str, job_id: str) -> JobRecord:
    """The caller's job; other owners' jobs are indistinguishable from missing ones."""
    record = records.get(job_id)
    if record is None or record.owner != owner:
        raise ApiError(404, "not_found", f"no job {job_id[:64]!r}")
    return record


def _json(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A resource as its JSON, serialized once by pydantic (no response-model re-validation)."""
    return Response(model.model_dump_json(), status, headers, media_type="application/json")


def _created(record: JobRecord, status: int) -> Response:
    resource = to_resource(record)
    return _json(resource, status, {"Location": resource.links.self})


def _finite(text: str) -> float:
    """Python reads NaN, Infinity and 1e999 as floats that no JSON encoder writes back: such a
    job used to be queued, and then its 202 answer failed as a 500."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is not a finite number")
    return value


def _not_json(constant: str) -> float:
    raise ValueError(f"{constant} is not JSON")


def _parse_options(raw: str | None) -> SanitizeOptions:
    if raw is None or not raw.strip():
        return SanitizeOptions()
    try:
        data = json.loads(raw, parse_float=_finite, parse_constant=_not_json)
    except (ValueError, RecursionError) as exc:
        raise ApiError(
            422,
            "validation_error",
            f"options is not valid JSON: {exc}",
            [{"loc": ["body", "options"], "msg": "invalid JSON", "type": "json_invalid"}],
        ) from None
    if not isinstance(data, dict):
        raise ApiError(422, "validation_error", "options must be a JSON object")
    try:
        return SanitizeOptions.model_validate(data)
    except ValidationError as exc:
        detail = field_errors(list(exc.errors()), ("body", "options"))
        raise ApiError(422, "validation_error", summarize(detail), detail) from None


def _payload_hash(upload: Upload, options: SanitizeOptions, callback_url: str | None) -> str:
    """Identity of a submission: every part's content hash, the options and the callback."""
    payload = {
        "files": {name: part.sha256 for name, part in sorted(upload.files.items())},
        "options": options.model_dump(mode="json"),
        "callback_url": callback_url,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _replay(records: RecordsDep, entry: IdempotencyEntry, payload_hash: str) -> Response:
    if entry.payload_hash != payload_hash:
        raise ApiError(
            422,
            "idempotency_mismatch",
            "this Idempotency-Key was used with different files or options; use a new key",
        )
    record = records.get(entry.job_id)
    assert record is not None
    return _created(record, 200)


def _create(
    upload: Upload,
    job_id: str,
    owner: str,
    idempotency_key: str | None,
    settings: SettingsDep,
    store: StoreDep,
    records: RecordsDep,
    queue: QueueDep,
) -> Response:
    """Validate, record and queue one uploaded job (blocking; runs in a thread)."""
    for required in ("model", "data"):
        if required not in upload.files:
            raise ApiError(
                422,
                "missing_field",
                f"form field {required!r} is required ({FILE_FIELDS[required]})",
                [{"loc": ["body", required], "msg": "Field required", "type": "missing"}],
            )
    options = _parse_options(upload.fields.get("options"))
    callback_url = upload.fields.get("callback_url") or None
    if callback_url is not None:
        if not settings.callback_secret:
            raise ApiError(
                422,
                "callbacks_disabled",
                "this server has no callback secret, so it cannot sign callbacks; "
                "poll the job instead",
            )
        try:
            check_url_syntax(callback_url)
        except CallbackRefused as exc:
            raise ApiError(422, "validation_error", str(exc)) from None

    payload_hash = _payload_hash(upload, options, callback_url)
    key_hash = hash_idempotency_key(idempotency_key) if idempotency_key else None
    if key_hash is not None:
        existing = records.find_idempotent(owner, key_hash)
        if existing is not None:
            store.delete_job(job_id)
            return _replay(records, existing, payload_hash)

    try:
        with _input_paths(store, job_id, upload) as paths:
            check_inputs(paths, options)
    except InputRejected as exc:
        raise ApiError(
            422,
            exc.kind,
            exc.message,
            [{"loc": ["body", exc.field], "msg": exc.message, "type": exc.kind}],
        ) from None

    created = now()
    record = JobRecord(
        id=job_id,
        owner=owner,
        created_at=created,
        updated_at=created,
        options=options,
        inputs=[
            InputFile(role=part.field, filename=part.filename, sha256=part.sha256, bytes=part.bytes)
            for part in upload.files.values()
        ],
        input_names={part.field: part.stored_name for part in upload.files.values()},
        queue=settings.submit_queue,
        idempotency_key=key_hash,
        payload_hash=payload_hash,
        callback=CallbackStatus(url=callback_url) if callback_url else None,
    )
    record.artifacts = {
        part.stored_name: ArtifactInfo(sha256=part.sha256, bytes=part.bytes)
        for part in upload.files.values()
    }
    record.transition(JobState.queued)
    records.insert(record)
    if key_hash is not None:
        winner = records.claim_idempotent(owner, key_hash, IdempotencyEntry(job_id, payload_hash))
        if winner is not None:  # a concurrent request with the same key got there first
            records.remove(record)
            store.delete_job(job_id)
            return _replay(records, winner, payload_hash)
    try:
        queue.send(job_id, record.queue)
    except Exception as exc:
        store.delete_job(job_id)
        lifecycle.fail(records, job_id, "broker_unavailable", f"could not queue the job: {exc}")
        raise ApiError(503, "unavailable", "the job queue is unavailable; try again") from None
    recovery.mark_sent(records, job_id)  # else the recovery sweep sends it after unsent_after
    return _created(record, 202)


@contextmanager
def _input_paths(store: StoreDep, job_id: str, upload: Upload) -> Iterator[dict[str, Path]]:
    """Local paths of the uploaded parts, by form field, for the cheap checks."""
    with ExitStack() as stack:
        yield {
            name: stack.enter_context(store.local_path(job_id, part.stored_name))
            for name, part in upload.files.items()
        }


@router.post(
    "",
    status_code=202,
    response_model=JobResource,
    summary="Submit a model to sanitize",
    description="Uploads are checked at once (format, layer allowlist, data members and shapes "
    "from the .npy headers); a bad upload is refused with 4xx before anything is queued. "
    "Answers 202 with `Location: /v1/jobs/{id}`; 200 when an Idempotency-Key replays a "
    "submission.",
    openapi_extra=UPLOAD_BODY,
    responses={
        202: {"headers": {"Location": _LOCATION}},
        200: {
            "model": JobResource,
            "description": "Idempotent replay: the job made first.",
            "headers": {"Location": _LOCATION},
        },
        **error_responses(400, 401, 413, 415, 422, 503),
    },
)
async def create_job(
    request: Request,
    settings: SettingsDep,
    store: StoreDep,
    records: RecordsDep,
    queue: QueueDep,
    owner: OwnerDep,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    job_id = new_job_id()
    upload = await receive_upload(request, store, job_id, settings)
    try:
        return await run_in_threadpool(
            _create, upload, job_id, owner, idempotency_key, settings, store, records, queue
        )
    except Exception:
        if records.get(job_id) is None:  # refused before it became a job: keep nothing
            await run_in_threadpool(store.delete_job, job_id)
        raise


@router.get(
    "",
    response_model=JobPage,
    summary="List your jobs, newest first",
    responses=error_responses(401, 422),
)
def list_jobs(  # sync: the query runs in the threadpool, off the event loop
    records: RecordsDep,
    owner: OwnerDep,
    cursor: Annotated[
        str | None, Query(max_length=64, description="next_cursor of the previous page")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> Response:
    try:
        items, next_cursor = records.list_owner(owner, cursor, limit)
    except ValueError:
        raise ApiError(
            422,
            "validation_error",
            "cursor is not one this API gave out",
            [{"loc": ["query", "cursor"], "msg": "invalid cursor", "type": "value_error"}],
        ) from None
    return _json(
        JobPage.model_construct(items=[to_resource(r) for r in items], next_cursor=next_cursor)
    )


@router.get(
    "/{job_id}",
    response_model=JobResource,
    summary="A job's state, progress and summary",
    responses=error_responses(401, 404),
)
def get_job(job_id: str, records: RecordsDep, owner: OwnerDep) -> Response:
    """The poll path: async dependencies, one threadpool hop (this read), one serialization."""
    return _json(to_resource(_job_or_404(records, owner, job_id)))


@router.delete(
    "/{job_id}",
    response_model=JobResource,
    summary="Cancel a job and delete its files",
    description="A queued job is cancelled at once (200). A running job is asked to stop and "
    "answers 202: the worker stops at the next stage boundary, marks it cancelled and deletes "
    "its files. A finished job keeps its record but loses its files (200).",
    responses={202: {"model": JobResource, "description": "Cancellation requested."}}
    | error_responses(401, 404),
)
def delete_job(job_id: str, records: RecordsDep, store: StoreDep, owner: OwnerDep) -> Response:
    _job_or_404(records, owner, job_id)
    try:
        record, done = lifecycle.request_cancel(records, store, job_id)
    except RecordNotFound:
        raise ApiError(404, "not_found", f"no job {job_id!r}") from None
    return _json(to_resource(record), 200 if done else 202)


def _finished(records: RecordsDep, owner: str, job_id: str, name: str) -> JobRecord:
    record = _job_or_404(records, owner, job_id)
    if record.state != JobState.succeeded:
        raise ApiError(
            409,
            "not_succeeded",
            f"the job is {record.state.value}; its results exist only once it has succeeded",
        )
    if name not in record.artifacts:
        raise ApiError(410, "gone", "the job's files were deleted")
    return record


def _read(store: StoreDep, job_id: str, name: str) -> bytes:
    try:
        with store.open(job_id, name) as fh:
            return fh.read()
    except FileNotFoundError:
        raise ApiError(410, "gone", "the job's files were deleted") from None


@router.get(
    "/{job_id}/report",
    summary="The full sanitize report (JSON)",
    response_model=SanitizeReport,
    responses=error_responses(401, 404, 409, 410),
)
def get_report(job_id: str, records: RecordsDep, store: StoreDep, owner: OwnerDep) -> Response:
    _finished(records, owner, job_id, "report.json")
    return Response(_read(store, job_id, "report.json"), media_type="application/json")


@router.get(
    "/{job_id}/report.html",
    summary="The report as a self-contained HTML page",
    response_class=Response,
    responses={200: {"content": {"text/html": {}}}} | error_responses(401, 404, 409, 410),
)
def get_report_html(job_id: str, records: RecordsDep, store: StoreDep, owner: OwnerDep) -> Response:
    _finished(records, owner, job_id, "report.html")
    return Response(
        _read(store, job_id, "report.html"),
        media_type="text/html; charset=utf-8",
        # The page shows names from an untrusted model: it may run nothing, load nothing.
        headers={
            "Content-Security-Policy": "default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'; frame-ancestors 'none'",
        },
    )


@router.get(
    "/{job_id}/report.png",
    summary="The pruning curve",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}} | error_responses(401, 404, 409, 410),
)
def get_report_png(job_id: str, records: RecordsDep, store: StoreDep, owner: OwnerDep) -> Response:
    _finished(records, owner, job_id, "report.png")
    return Response(_read(store, job_id, "report.png"), media_type="image/png")


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    if header.strip() == "*":
        return True
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return etag in tags


@router.get(
    "/{job_id}/model",
    summary="Download the sanitized model (.keras)",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"application/octet-stream": {}},
            "headers": {"ETag": _ETAG, "Content-Disposition": _DISPOSITION},
        },
        304: {"description": "If-None-Match matched the ETag.", "headers": {"ETag": _ETAG}},
    }
    | error_responses(401, 404, 409, 410),
)
def get_model(
    job_id: str,
    records: RecordsDep,
    store: StoreDep,
    owner: OwnerDep,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match")] = None,
) -> Response:
    record = _finished(records, owner, job_id, "sanitized.keras")
    etag = f'"{record.artifacts["sanitized.keras"].sha256}"'
    if _etag_matches(if_none_match, etag):
        return Response(status_code=304, headers={"ETag": etag})
    try:
        fh = store.open(job_id, "sanitized.keras")
        size = store.size(job_id, "sanitized.keras")
    except FileNotFoundError:
        raise ApiError(410, "gone", "the job's files were deleted") from None

    def chunks() -> Iterator[bytes]:
        with fh:
            while data := fh.read(CHUNK):
                yield data

    return StreamingResponse(
        chunks(),
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="sanitized-{job_id}.keras"',
            "ETag": etag,
            "Content-Length": str(size),
        },
    )
