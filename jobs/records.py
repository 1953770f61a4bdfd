"""The service's own job records: the single truth about a job, never Celery's guess.

Celery reports PENDING for a task it has never heard of, so state cannot be inferred from it.
Each job has a row in the records database (`jobs/database.py`: SQLite by default, PostgreSQL
for several hosts) holding its record as JSON, changed only under the job's lock, so the API
and workers never lose each other's writes and records survive restarts of either. Works
identically with and without Redis. Cancellation is a separate column: asking to cancel never
writes the record a worker is updating.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field
from sqlalchemy import Connection, Engine, and_, case, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from jobs.database import (
    create_schema,
    idempotency_table,
    jobs_table,
    make_engine,
    sqlite_url,
    stage_seconds_table,
)
from jobs.settings import Settings
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
_jobs, _idem, _stages = jobs_table, idempotency_table, stage_seconds_table


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
    return JobLinks.model_construct(
        self=base,
        report=f"{base}/report",
        report_html=f"{base}/report.html",
        report_png=f"{base}/report.png",
        model=f"{base}/model",
    )


def to_resource(record: JobRecord, prefix: str = "") -> JobResource:
    """The public view of a record: no owner, no hashes of keys, no internal log.

    Built without validation: every part comes from a record validated when it was read, and
    validating it again was a tenth of a status poll's time.
    """
    return JobResource.model_construct(
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
        conclusion=report.verdict.conclusion if report.verdict else None,
        suspect=report.verdict.before.suspect if report.verdict else None,
    )


@dataclass(frozen=True)
class IdempotencyEntry:
    job_id: str
    payload_hash: str


def hash_idempotency_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class RecordNotFound(KeyError):
    pass


class RecordStore:
    """Job records in a SQL database; safe across processes (and hosts, on PostgreSQL).

    Every read-modify-write of a record happens under `locked(job_id)`: on PostgreSQL a row
    lock held by a transaction the store's calls inside the block share; on SQLite a per-job
    file lock in `lock_dir` (SQLite is one host's database), each statement its own short
    transaction, so a slow step under one job's lock never holds up the others.
    """

    def __init__(self, engine: Engine, lock_dir: Path | None = None) -> None:
        self.engine = engine
        self._sqlite = engine.dialect.name == "sqlite"
        if self._sqlite:
            if lock_dir is None:
                raise ValueError("a SQLite record store needs a folder for its locks")
            lock_dir.mkdir(parents=True, exist_ok=True)
        self._locks = lock_dir
        self._held: ContextVar[Connection | None] = ContextVar(f"held-{id(self)}", default=None)

    @classmethod
    def sqlite(cls, state_dir: Path) -> RecordStore:
        """The embedded default: `state_dir/jobs.sqlite`, schema created if missing."""
        engine = make_engine(sqlite_url(Path(state_dir) / "jobs.sqlite"))
        create_schema(engine)
        return cls(engine, Path(state_dir) / "locks")

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Connection]:
        """The lock's transaction when inside `locked`, else a short one of its own."""
        held = self._held.get()
        if held is not None:
            yield held
            return
        with self.engine.begin() as conn:
            yield conn

    # -- reading ----------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        if not is_job_id(job_id):
            return None
        with self._connection() as conn:
            raw = conn.execute(select(_jobs.c.record).where(_jobs.c.id == job_id)).scalar()
        return None if raw is None else JobRecord.model_validate_json(raw)

    def list_owner(
        self, owner: str, cursor: str | None, limit: int
    ) -> tuple[list[JobRecord], str | None]:
        """The owner's jobs, newest first, after `cursor`; and the cursor of the next page."""
        if cursor is not None and not _CURSOR.match(cursor):
            raise ValueError("invalid cursor")
        _check_owner(owner)
        query = select(_jobs.c.record).where(_jobs.c.owner == owner)
        if cursor is not None:
            stamp, job_id = int(cursor[:20]), cursor[21:]
            query = query.where(
                or_(
                    _jobs.c.created_us < stamp,
                    and_(_jobs.c.created_us == stamp, _jobs.c.id < job_id),
                )
            )
        query = query.order_by(_jobs.c.created_us.desc(), _jobs.c.id.desc()).limit(limit + 1)
        with self._connection() as conn:
            rows = conn.execute(query).scalars().all()
        items = [JobRecord.model_validate_json(raw) for raw in rows[:limit]]
        more = len(rows) > limit
        return items, (_index_name(items[-1]) if more and items else None)

    def count_by_state(self) -> dict[JobState, int]:
        """Jobs per state, from the state index."""
        query = select(_jobs.c.state, func.count()).group_by(_jobs.c.state)
        with self._connection() as conn:
            rows = conn.execute(query).all()
        return {JobState(state): int(count) for state, count in rows if state in _STATES}

    def stage_histogram(
        self, buckets: tuple[float, ...]
    ) -> dict[str, tuple[list[int], int, float]]:
        """Per stage of succeeded jobs: cumulative count at or below each bucket, count, sum."""
        seconds = _stages.c.seconds
        columns = [func.sum(case((seconds <= b, 1), else_=0)) for b in buckets]
        query = select(_stages.c.stage, func.count(), func.sum(seconds), *columns).group_by(
            _stages.c.stage
        )
        with self._connection() as conn:
            rows = conn.execute(query).all()
        return {
            stage: ([int(v or 0) for v in below], int(count), float(total or 0.0))
            for stage, count, total, *below in rows
        }

    def in_states(self, states: Iterable[JobState]) -> list[JobRecord]:
        """Records in these states (recovery looks at queued and running ones only)."""
        query = select(_jobs.c.record).where(_jobs.c.state.in_([s.value for s in states]))
        with self._connection() as conn:
            return [JobRecord.model_validate_json(raw) for raw in conn.execute(query).scalars()]

    def expired(self, cutoff: datetime) -> list[JobRecord]:
        """Final jobs finished at or before `cutoff` whose artifacts are still there."""
        query = select(_jobs.c.record).where(
            _jobs.c.finished_us <= _micros(cutoff),
            _jobs.c.artifacts_deleted.is_(False),
            _jobs.c.state.in_([s.value for s in JobState if s.final]),
        )
        with self._connection() as conn:
            return [JobRecord.model_validate_json(raw) for raw in conn.execute(query).scalars()]

    # -- writing ----------------------------------------------------------------------------

    def insert(self, record: JobRecord) -> None:
        """Store a new record; FileExistsError when its id is taken."""
        if not is_job_id(record.id):
            raise RecordNotFound(record.id)
        _check_owner(record.owner)
        try:
            with self._connection() as conn:
                conn.execute(insert(_jobs).values(**_columns(record), created_us=_stamp(record)))
                self._write_stages(conn, record)
        except IntegrityError:
            raise FileExistsError(record.id) from None

    def remove(self, record: JobRecord) -> None:
        """Forget a record entirely (only for a job that was never queued)."""
        with self._connection() as conn:
            conn.execute(delete(_stages).where(_stages.c.job_id == record.id))
            conn.execute(delete(_jobs).where(_jobs.c.id == record.id))

    @contextlib.contextmanager
    def locked(self, job_id: str) -> Iterator[None]:
        """Hold the job's lock: serialises every read-modify-write of one record."""
        if not is_job_id(job_id):
            raise RecordNotFound(job_id)
        if self._held.get() is not None:
            raise RuntimeError("a job's lock is already held in this context")
        if self._sqlite:
            assert self._locks is not None
            fd = os.open(self._locks / f"{job_id}.lock", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            return
        with self.engine.begin() as conn:
            conn.execute(select(_jobs.c.id).where(_jobs.c.id == job_id).with_for_update())
            token = self._held.set(conn)
            try:
                yield
            finally:
                self._held.reset(token)

    def update(self, job_id: str, mutate: Callable[[JobRecord], bool]) -> JobRecord:
        """Apply `mutate` under the lock; it returns True when the record should be written."""
        with self.locked(job_id):
            return self.update_locked(job_id, mutate)

    def update_locked(self, job_id: str, mutate: Callable[[JobRecord], bool]) -> JobRecord:
        """As `update`, for a caller already holding `locked(job_id)`."""
        record = self.get(job_id)
        if record is None:
            raise RecordNotFound(job_id)
        before = record.state
        if mutate(record):
            record.updated_at = now()
            with self._connection() as conn:
                conn.execute(update(_jobs).where(_jobs.c.id == job_id).values(**_columns(record)))
                if before != JobState.succeeded:
                    self._write_stages(conn, record)
        return record

    def _write_stages(self, conn: Connection, record: JobRecord) -> None:
        """A succeeded job's stage seconds, for the metrics' histogram."""
        if record.state != JobState.succeeded or not record.timings:
            return
        conn.execute(delete(_stages).where(_stages.c.job_id == record.id))
        conn.execute(
            insert(_stages),
            [
                {"job_id": record.id, "stage": stage[:32], "seconds": float(seconds)}
                for stage, seconds in record.timings.items()
            ],
        )

    # -- cancellation -----------------------------------------------------------------------

    def request_cancel(self, job_id: str) -> None:
        """Mark the job for cancelling without touching its record (a worker may be writing)."""
        if is_job_id(job_id):
            with self._connection() as conn:
                conn.execute(
                    update(_jobs).where(_jobs.c.id == job_id).values(cancel_requested=True)
                )

    def cancel_requested(self, job_id: str) -> bool:
        if not is_job_id(job_id):
            return False
        query = select(_jobs.c.cancel_requested).where(_jobs.c.id == job_id)
        with self._connection() as conn:
            return bool(conn.execute(query).scalar())

    # -- idempotency ------------------------------------------------------------------------

    def find_idempotent(self, owner: str, key_hash: str) -> IdempotencyEntry | None:
        """The job an earlier request with this key made, if it still exists."""
        _check_owner(owner)
        query = (
            select(_idem.c.job_id, _idem.c.payload_hash)
            .join(_jobs, _jobs.c.id == _idem.c.job_id)
            .where(_idem.c.owner == owner, _idem.c.key_hash == key_hash)
        )
        with self._connection() as conn:
            row = conn.execute(query).first()
        return None if row is None else IdempotencyEntry(row.job_id, row.payload_hash)

    def claim_idempotent(
        self, owner: str, key_hash: str, entry: IdempotencyEntry
    ) -> IdempotencyEntry | None:
        """Bind the key to `entry` unless another request won; return the winner if so."""
        _check_owner(owner)
        row = {"owner": owner, "key_hash": key_hash}
        for _ in range(2):
            try:
                with self._connection() as conn:
                    conn.execute(
                        insert(_idem).values(
                            **row, job_id=entry.job_id, payload_hash=entry.payload_hash
                        )
                    )
                return None
            except IntegrityError:
                existing = self.find_idempotent(owner, key_hash)
                if existing is not None:
                    return existing
                with self._connection() as conn:  # points at a job that no longer exists
                    conn.execute(
                        delete(_idem).where(_idem.c.owner == owner, _idem.c.key_hash == key_hash)
                    )
        raise RuntimeError("could not claim the idempotency key")


_STATES = {s.value for s in JobState}


def _check_owner(owner: str) -> None:
    if not _OWNER.match(owner):
        raise ValueError("bad owner")


def _micros(at: datetime) -> int:
    return int(at.timestamp() * 1_000_000)


def _stamp(record: JobRecord) -> int:
    return _micros(record.created_at)


def _columns(record: JobRecord) -> dict[str, object]:
    """What the row's indexed columns say, always derived from the record itself."""
    return {
        "id": record.id,
        "owner": record.owner,
        "state": record.state.value,
        "finished_us": _micros(record.finished_at) if record.finished_at else None,
        "artifacts_deleted": record.artifacts_deleted_at is not None,
        "record": record.model_dump_json(),
    }


def _index_name(record: JobRecord) -> str:
    """A listing cursor: creation time and id, so pages are stable under inserts."""
    return f"{_stamp(record):020d}-{record.id}"


def open_records(settings: Settings) -> RecordStore:
    """The deployment's record store: `database_url`, else SQLite in the state folder.

    Creates missing tables, and imports the JSON record files of an artifacts folder written
    before records moved into a database (`jobs/migration.py`), so upgrading loses no job.
    """
    from jobs.migration import import_file_records

    url = settings.records_url
    engine = make_engine(url)
    create_schema(engine)
    store = RecordStore(engine, settings.state_dir / "locks")
    import_file_records(store, settings.state_dir)
    return store
