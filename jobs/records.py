"""The service's own job records: the single truth about a job, never Celery's guess.

Celery reports PENDING for a task it has never heard of, so state cannot be inferred from it.
Each job has a JSON record under `state/records/`, replaced atomically and changed only under
a per-job file lock, so the API and workers never lose each other's writes and records survive
restarts of either. Works identically with and without Redis. Cancellation is a separate marker
file: asking to cancel never writes the record a worker is updating.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from schemas.jobs import (
    InputFile,
    JobError,
    JobLinks,
    JobProgress,
    JobResource,
    JobState,
    JobSummary,
)
from schemas.options import SanitizeOptions
from schemas.report import SanitizeReport

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_CURSOR = re.compile(r"^\d{20}-[0-9a-f]{32}$")
_OWNER = re.compile(r"^(open|[0-9a-f]{64})$")


def now() -> datetime:
    return datetime.now(UTC)


def new_job_id() -> str:
    return uuid.uuid4().hex


def is_job_id(value: str) -> bool:
    return bool(_JOB_ID.match(value))


class JobEvent(BaseModel):
    """One state transition, kept so 'ran once' and 'retried twice' can be proven afterwards."""

    at: datetime
    state: JobState
    attempt: int
    note: str | None = None


class ArtifactInfo(BaseModel):
    sha256: str
    bytes: int


class CallbackStatus(BaseModel):
    url: str
    attempts: int = 0
    delivered_at: datetime | None = None
    last_error: str | None = None


class JobRecord(BaseModel):
    """Everything the service knows about a job; `JobResource` is its public face."""

    id: str
    owner: str
    state: JobState = JobState.queued
    progress: JobProgress = JobProgress()
    error: JobError | None = None
    attempts: int = 0
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    options: SanitizeOptions
    inputs: list[InputFile] = []
    input_names: dict[str, str] = Field(
        default_factory=dict, description="Form field (role) -> stored artifact name."
    )
    artifacts: dict[str, ArtifactInfo] = Field(
        default_factory=dict, description="Stored name -> hash and size, inputs and outputs."
    )
    summary: JobSummary | None = None
    timings: dict[str, float] = {}
    queue: str
    idempotency_key: str | None = Field(None, description="sha256 of the client's key.")
    payload_hash: str
    callback: CallbackStatus | None = None
    cancel_requested_at: datetime | None = None
    sent_at: datetime | None = Field(None, description="When its message went to the broker.")
    heartbeat_at: datetime | None = Field(
        None, description="Last sign of life of the worker running it."
    )
    resent_at: datetime | None = Field(
        None, description="When the recovery sweep last sent it again (its worker was lost)."
    )
    artifacts_deleted_at: datetime | None = None
    events: list[JobEvent] = []

    def transition(self, state: JobState, note: str | None = None) -> None:
        """Move to `state`, stamping times and the event log."""
        at = now()
        self.state = state
        self.updated_at = at
        if state == JobState.running and self.started_at is None:
            self.started_at = at
        if state.final:
            self.finished_at = at
        self.events.append(JobEvent(at=at, state=state, attempt=self.attempts, note=note))


def links_for(job_id: str, prefix: str = "") -> JobLinks:
    base = f"{prefix}/v1/jobs/{job_id}"
    return JobLinks(
        self=base,
        report=f"{base}/report",
        report_html=f"{base}/report.html",
        report_png=f"{base}/report.png",
        model=f"{base}/model",
    )


def to_resource(record: JobRecord, prefix: str = "") -> JobResource:
    """The public view of a record: no owner, no hashes of keys, no internal log."""
    return JobResource(
        id=record.id,
        state=record.state,
        progress=record.progress,
        error=record.error,
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        attempts=record.attempts,
        options=record.options,
        inputs=record.inputs,
        summary=record.summary,
        links=links_for(record.id, prefix),
        cancel_requested=record.cancel_requested_at is not None,
        artifacts_deleted=record.artifacts_deleted_at is not None,
    )


def summary_from_report(report: SanitizeReport) -> JobSummary:
    """The headline numbers a client wants without downloading the report."""
    before, after = report.baseline, report.fine_pruned
    return JobSummary(
        clean_accuracy_before=before.clean_accuracy.value,
        clean_accuracy_after=after.clean_accuracy.value,
        accuracy_split=before.clean_accuracy.split,
        attack_success_before=before.attack_success_rate.value
        if before.attack_success_rate
        else None,
        attack_success_after=after.attack_success_rate.value if after.attack_success_rate else None,
        channels_pruned=report.decision.pruned,
        parameters_before=report.input_model.parameters,
        parameters_after=report.output_model.parameters,
    )


@dataclass(frozen=True)
class IdempotencyEntry:
    job_id: str
    payload_hash: str


def hash_idempotency_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class RecordNotFound(KeyError):
    pass


class FileRecordStore:
    """Job records as JSON files; safe across processes on one host (flock + rename)."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir)
        self._records = self.root / "records"
        self._locks = self.root / "locks"
        self._cancel = self.root / "cancel"
        self._owners = self.root / "owners"
        self._idem = self.root / "idempotency"
        for folder in (self._records, self._locks, self._cancel, self._owners, self._idem):
            folder.mkdir(parents=True, exist_ok=True)

    # -- reading ----------------------------------------------------------------------------

    def _record_path(self, job_id: str) -> Path:
        if not is_job_id(job_id):
            raise RecordNotFound(job_id)
        return self._records / f"{job_id}.json"

    def get(self, job_id: str) -> JobRecord | None:
        try:
            raw = self._record_path(job_id).read_bytes()
        except (FileNotFoundError, RecordNotFound):
            return None
        return JobRecord.model_validate_json(raw)

    def list_owner(
        self, owner: str, cursor: str | None, limit: int
    ) -> tuple[list[JobRecord], str | None]:
        """The owner's jobs, newest first, after `cursor`; and the cursor of the next page."""
        if cursor is not None and not _CURSOR.match(cursor):
            raise ValueError("invalid cursor")
        folder = self._owner_dir(owner)
        names = sorted((n for n in _listdir(folder) if _CURSOR.match(n)), reverse=True)
        if cursor is not None:
            names = [n for n in names if n < cursor]
        items: list[JobRecord] = []
        last: str | None = None
        for name in names:
            if len(items) == limit:
                return items, last
            record = self.get(name.split("-", 1)[1])
            if record is not None:
                items.append(record)
                last = name
        return items, None

    def iter_all(self) -> Iterator[JobRecord]:
        """Every record (metrics, retention); unreadable ones are skipped."""
        for name in _listdir(self._records):
            if name.endswith(".json"):
                with contextlib.suppress(OSError, ValidationError):
                    yield JobRecord.model_validate_json((self._records / name).read_bytes())

    # -- writing ----------------------------------------------------------------------------

    def insert(self, record: JobRecord) -> None:
        """Store a new record and index it under its owner."""
        path = self._record_path(record.id)
        if path.exists():
            raise FileExistsError(record.id)
        _atomic_write(path, record.model_dump_json().encode())
        index = self._owner_dir(record.owner) / _index_name(record)
        index.parent.mkdir(parents=True, exist_ok=True)
        index.touch()

    def remove(self, record: JobRecord) -> None:
        """Forget a record entirely (only for a job that was never queued)."""
        (self._owner_dir(record.owner) / _index_name(record)).unlink(missing_ok=True)
        self._record_path(record.id).unlink(missing_ok=True)
        (self._locks / f"{record.id}.lock").unlink(missing_ok=True)

    @contextlib.contextmanager
    def locked(self, job_id: str) -> Iterator[None]:
        """Hold the job's lock: serialises every read-modify-write of one record."""
        if not is_job_id(job_id):
            raise RecordNotFound(job_id)
        fd = os.open(self._locks / f"{job_id}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def update(self, job_id: str, mutate: Callable[[JobRecord], bool]) -> JobRecord:
        """Apply `mutate` under the lock; it returns True when the record should be written."""
        with self.locked(job_id):
            return self.update_locked(job_id, mutate)

    def update_locked(self, job_id: str, mutate: Callable[[JobRecord], bool]) -> JobRecord:
        """As `update`, for a caller already holding `locked(job_id)`."""
        record = self.get(job_id)
        if record is None:
            raise RecordNotFound(job_id)
        if mutate(record):
            record.updated_at = now()
            _atomic_write(self._record_path(job_id), record.model_dump_json().encode())
        return record

    # -- cancellation -----------------------------------------------------------------------

    def request_cancel(self, job_id: str) -> None:
        if is_job_id(job_id):
            (self._cancel / job_id).touch()

    def cancel_requested(self, job_id: str) -> bool:
        return is_job_id(job_id) and (self._cancel / job_id).exists()

    # -- idempotency ------------------------------------------------------------------------

    def _idem_path(self, owner: str, key_hash: str) -> Path:
        return self._owner_dir(owner, self._idem) / f"{key_hash}.json"

    def find_idempotent(self, owner: str, key_hash: str) -> IdempotencyEntry | None:
        """The job an earlier request with this key made, if it still exists."""
        path = self._idem_path(owner, key_hash)
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        entry = IdempotencyEntry(data["job_id"], data["payload_hash"])
        return entry if self.get(entry.job_id) is not None else None

    def claim_idempotent(
        self, owner: str, key_hash: str, entry: IdempotencyEntry
    ) -> IdempotencyEntry | None:
        """Bind the key to `entry` unless another request won; return the winner if so."""
        path = self._idem_path(owner, key_hash)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"job_id": entry.job_id, "payload_hash": entry.payload_hash})
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                existing = self.find_idempotent(owner, key_hash)
                if existing is not None:
                    return existing
                path.unlink(missing_ok=True)  # points at a job that no longer exists
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(body)
            return None
        raise RuntimeError("could not claim the idempotency key")

    def _owner_dir(self, owner: str, base: Path | None = None) -> Path:
        if not _OWNER.match(owner):
            raise ValueError("bad owner")
        return (base or self._owners) / owner


def _index_name(record: JobRecord) -> str:
    stamp = int(record.created_at.timestamp() * 1_000_000)
    return f"{stamp:020d}-{record.id}"


def _listdir(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def _atomic_write(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a full disk must not keep the half-written copy
            tmp.unlink(missing_ok=True)
        raise
