"""A job's state machine, shared by the API and the workers.

Every transition happens under the record's lock and never leaves a final state, so a late
worker write cannot resurrect a cancelled job, and a redelivered task cannot finish a job twice.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from jobs.records import ArtifactInfo, JobRecord, RecordNotFound, RecordStore, now
from jobs.storage import ArtifactStore
from schemas.jobs import JobError, JobProgress, JobState, JobSummary

log = logging.getLogger(__name__)

# Share of the whole job each engine stage stands for, in order, for `progress.percent`.
STAGE_WEIGHTS: dict[str, float] = {
    "load": 5.0,
    "profile": 35.0,
    "cut": 5.0,
    "fine-tune": 50.0,
    "report": 5.0,
}
OUTPUT_NAMES: tuple[str, ...] = ("sanitized.keras", "report.json", "report.html", "report.png")


def overall_percent(stage: str, fraction: float) -> float:
    """Percent of the whole job done when `stage` is `fraction` done."""
    done = 0.0
    for name, weight in STAGE_WEIGHTS.items():
        if name == stage:
            return round(min(100.0, done + weight * max(0.0, min(1.0, fraction))), 1)
        done += weight
    return round(min(100.0, done), 1)


class StillRunning(Exception):
    """Another worker's heartbeat on the job is fresh: this delivery must wait, not run it."""

    def __init__(self, job_id: str, wait: float) -> None:
        super().__init__(f"job {job_id} is running elsewhere; look again in {wait:.0f} s")
        self.wait = wait


def seconds_since_heartbeat(record: JobRecord, at: datetime | None = None) -> float:
    """Age of the last sign of life of the job's worker (its start when it never beat)."""
    last = record.heartbeat_at or record.started_at or record.updated_at
    return ((at or now()) - last).total_seconds()


def begin_attempt(
    records: RecordStore,
    store: ArtifactStore,
    job_id: str,
    max_attempts: int,
    stale_after: float | None = None,
) -> JobRecord | None:
    """Start a delivery of the job; the record when the worker should run it, else None.

    A final job is not run again (a redelivered message after success); a job that was
    delivered `max_attempts` times already has killed its worker every time and is failed
    instead of being retried forever. With `stale_after`, a running job whose worker beat
    less than that long ago is not started twice: `StillRunning` says when to look again.
    """
    with records.locked(job_id):
        record = records.get(job_id)
        if record is None:
            log.warning("job %s has no record; dropping its message", job_id)
            return None
        if record.state.final:
            log.info("job %s is already %s; not running it again", job_id, record.state)
            return None
        if stale_after is not None and record.state == JobState.running:
            age = seconds_since_heartbeat(record)
            if age < stale_after:
                raise StillRunning(job_id, stale_after - age)
        if records.cancel_requested(job_id):
            _cancel_locked(records, store, record, "cancelled before it ran")
            return None
        if record.attempts >= max_attempts:
            message = f"the job stopped its worker {record.attempts} times; it was not retried"
            records.update_locked(job_id, lambda r: _fail(r, "worker_lost", message))
            return None

        def start(r: JobRecord) -> bool:
            r.attempts += 1
            r.heartbeat_at = now()
            r.error = None
            r.progress = JobProgress(stage=None, percent=0.0)
            r.transition(JobState.running, f"attempt {r.attempts}")
            return True

        return records.update_locked(job_id, start)


def _fail(record: JobRecord, kind: str, message: str) -> bool:
    if record.state.final:
        return False
    record.error = JobError(kind=kind, message=message)
    record.transition(JobState.failed, kind)
    return True


def fail(records: RecordStore, job_id: str, kind: str, message: str) -> JobRecord | None:
    """Fail the job unless it is already final."""
    try:
        return records.update(job_id, lambda r: _fail(r, kind, message))
    except RecordNotFound:
        return None


def _cancel_locked(
    records: RecordStore, store: ArtifactStore, record: JobRecord, note: str
) -> JobRecord:
    store.delete_job(record.id)

    def mutate(r: JobRecord) -> bool:
        if not r.state.final:
            r.transition(JobState.cancelled, note)
        r.artifacts = {}
        r.artifacts_deleted_at = r.artifacts_deleted_at or now()
        return True

    return records.update_locked(record.id, mutate)


def mark_cancelled(records: RecordStore, store: ArtifactStore, job_id: str) -> JobRecord:
    """The worker saw the cancel marker: the job ends cancelled and its files go."""
    with records.locked(job_id):
        record = records.get(job_id)
        if record is None:
            raise RecordNotFound(job_id)
        return _cancel_locked(records, store, record, "cancelled while running")


def request_cancel(
    records: RecordStore, store: ArtifactStore, job_id: str
) -> tuple[JobRecord, bool]:
    """DELETE: (record, done now). A running job is only asked to stop; the worker finishes."""
    records.request_cancel(job_id)
    with records.locked(job_id):
        record = records.get(job_id)
        if record is None:
            raise RecordNotFound(job_id)
        if record.state == JobState.running:

            def ask(r: JobRecord) -> bool:
                r.cancel_requested_at = r.cancel_requested_at or now()
                return True

            return records.update_locked(job_id, ask), False
        return _cancel_locked(records, store, record, "cancelled while queued"), True


def publish_success(
    records: RecordStore,
    store: ArtifactStore,
    job_id: str,
    out_dir: Path,
    summary: JobSummary,
    timings: dict[str, float],
) -> JobRecord | None:
    """Store the results and mark the job succeeded, all under the lock; None if discarded."""
    with records.locked(job_id):
        record = records.get(job_id)
        if record is None or record.state.final:
            return None
        if records.cancel_requested(job_id):
            return _cancel_locked(records, store, record, "cancelled at the end")
        stored = {}
        try:
            for name in OUTPUT_NAMES:
                stored[name] = store.put_file(job_id, name, out_dir / name)
        except OSError:
            # All results or none: a model without its report is never left behind.
            for name in stored:
                store.delete(job_id, name)
            raise

        def succeed(r: JobRecord) -> bool:
            for name, artifact in stored.items():
                r.artifacts[name] = ArtifactInfo(sha256=artifact.sha256, bytes=artifact.bytes)
            r.summary = summary
            r.timings = timings
            r.progress = JobProgress(stage="report", percent=100.0)
            r.transition(JobState.succeeded)
            return True

        return records.update_locked(job_id, succeed)


class ProgressWriter:
    """The engine's progress callback, writing the record at most every `interval` seconds.

    Stage changes are always written; writes never touch a job that is no longer running.
    """

    def __init__(self, records: RecordStore, job_id: str, interval: float) -> None:
        self._records = records
        self._job_id = job_id
        self._interval = interval
        self._last_write = 0.0
        self._last_stage: str | None = None

    def __call__(self, stage: str, fraction: float) -> None:
        moment = time.monotonic()
        if stage == self._last_stage and moment - self._last_write < self._interval:
            return
        self._last_stage = stage
        self._last_write = moment
        percent = overall_percent(stage, fraction)

        def mutate(r: JobRecord) -> bool:
            if r.state != JobState.running:
                return False
            r.progress = JobProgress(stage=stage, percent=max(percent, r.progress.percent))
            return True

        try:
            self._records.update(self._job_id, mutate)
        except (OSError, SQLAlchemyError):
            log.warning("could not write progress of job %s", self._job_id, exc_info=True)


class Heartbeat:
    """Stamps `heartbeat_at` of a running job at most every `interval` seconds.

    The recovery sweep and duplicate deliveries read it: a job whose worker stopped beating
    is taken for lost and run again, a job that still beats is left alone.
    """

    def __init__(self, records: RecordStore, job_id: str, interval: float) -> None:
        self._records = records
        self._job_id = job_id
        self._interval = interval
        self._last_beat = time.monotonic()  # begin_attempt stamped the first one

    def __call__(self) -> None:
        moment = time.monotonic()
        if moment - self._last_beat < self._interval:
            return
        self._last_beat = moment

        def beat(r: JobRecord) -> bool:
            if r.state != JobState.running:
                return False
            r.heartbeat_at = now()
            return True

        try:
            self._records.update(self._job_id, beat)
        except (OSError, SQLAlchemyError, RecordNotFound):
            log.warning("could not write the heartbeat of job %s", self._job_id, exc_info=True)
