"""Jobs whose message was lost, found from their records and sent again.

Two ways a job can be left with no message that will ever run it:

- its worker died while running it, in embedded mode: the SQLite broker marks a message
  delivered when a worker takes it and never gives it back (Redis does, after the worker's
  connection drops or the visibility timeout passes, so this case is embedded-only);
- the API stopped between writing the record and sending the message (any broker).

Both are visible in the records: a running job whose heartbeat stopped, a queued job never
sent. Sending again is safe: `begin_attempt` runs a final job never, and a job whose heartbeat
is fresh only after it goes stale.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.exc import SQLAlchemyError

from jobs.lifecycle import seconds_since_heartbeat
from jobs.records import JobEvent, JobRecord, RecordNotFound, RecordStore, now
from schemas.jobs import JobState

log = logging.getLogger(__name__)

Send = Callable[[str, str], None]  # (job id, queue)


@dataclass(frozen=True)
class Recovered:
    job_id: str
    reason: str


def _lost_reason(
    record: JobRecord, at: datetime, stale_after: float, unsent_after: float, redelivers: bool
) -> str | None:
    """Why the job needs its message again, or None."""
    if record.state == JobState.queued and record.sent_at is None:
        age = (at - record.created_at).total_seconds()
        if age >= unsent_after:
            return f"queued {age:.0f} s ago and never sent"
    if record.state == JobState.running and not redelivers:
        age = seconds_since_heartbeat(record, at)
        resent = record.resent_at and (at - record.resent_at).total_seconds() < stale_after
        if age >= stale_after and not resent:
            return f"no heartbeat from its worker for {age:.0f} s"
    return None


def recover_lost_jobs(
    records: RecordStore,
    send: Send,
    *,
    stale_after: float,
    unsent_after: float,
    redelivers: bool,
    at: datetime | None = None,
) -> list[Recovered]:
    """Send again every job that lost its message; what was sent.

    `redelivers`: the broker hands a dead worker's jobs to another by itself (Redis), so only
    never-sent jobs are this sweep's business.
    """
    at = at or now()
    recovered: list[Recovered] = []
    for candidate in records.in_states((JobState.queued, JobState.running)):
        if _lost_reason(candidate, at, stale_after, unsent_after, redelivers) is None:
            continue
        with records.locked(candidate.id):
            record = records.get(candidate.id)  # re-read: a worker may have moved it on
            if record is None:
                continue
            reason = _lost_reason(record, at, stale_after, unsent_after, redelivers)
            if reason is None:
                continue
            if record.state == JobState.running:
                _claim_locked(records, record.id, f"worker lost ({reason}); sent again")
        try:
            send(record.id, record.queue)
        except Exception:
            log.warning("recovery: could not send job %s again", record.id, exc_info=True)
            continue
        if record.state == JobState.queued:
            mark_sent(records, record.id)
        log.warning("recovery: sent job %s again: %s", record.id, reason)
        recovered.append(Recovered(record.id, reason))
    return recovered


def _claim_locked(records: RecordStore, job_id: str, note: str) -> None:
    """Note the resend, so the next sweeps leave the job to the new delivery for a while."""

    def claim(r: JobRecord) -> bool:
        r.resent_at = now()
        r.events.append(JobEvent(at=now(), state=r.state, attempt=r.attempts, note=note))
        return True

    records.update_locked(job_id, claim)


def mark_sent(records: RecordStore, job_id: str) -> None:
    """Note that the job's message reached the broker (failing to is only a later resend)."""

    def sent(r: JobRecord) -> bool:
        if r.sent_at is not None:
            return False
        r.sent_at = now()
        return True

    try:
        records.update(job_id, sent)
    except (OSError, SQLAlchemyError, RecordNotFound):
        log.warning("could not note that job %s was sent", job_id, exc_info=True)
