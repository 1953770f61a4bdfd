"""The worker's tasks: run a sanitize job, deliver its callback, purge old artifacts.

Delivery is at least once (late acks, requeue when a worker dies), so `sanitize_job` makes
running exactly once its own business: the record says whether a job is already final, and
counts deliveries so a job that keeps killing its worker is failed instead of looping.

The engine itself runs in a process of its own per job (`workers.isolation`): this module,
and the pool child that runs it, never import TensorFlow or open an uploaded model. Each pool
child keeps one such process started ahead (`isolation.Slot`, from `worker_process_init`), so
a job does not wait for TensorFlow's import.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from functools import lru_cache
from pathlib import Path
from typing import Any

import httpx
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery.signals import worker_process_init, worker_process_shutdown, worker_ready

from fineprune.errors import CancelledError, FinePruneError
from jobs import lifecycle
from jobs.callbacks import SIGNATURE_HEADER, CallbackRefused, check_url_target, sign
from jobs.queue import CALLBACK_TASK, PURGE_TASK, RECOVER_TASK, SANITIZE_TASK, send_job
from jobs.records import JobRecord, RecordStore, now, open_records, summary_from_report, to_resource
from jobs.recovery import recover_lost_jobs
from jobs.retention import purge_expired
from jobs.settings import usable_cores
from jobs.storage import LocalArtifactStore, StorageError
from workers import isolation
from workers.app import app, pool_size, settings

log = logging.getLogger(__name__)


@lru_cache
def _stores() -> tuple[RecordStore, LocalArtifactStore]:
    return open_records(settings), LocalArtifactStore(settings.jobs_dir)


_slot: isolation.Slot | None = None  # this pool child's warm job process


def _launch() -> isolation.Launch:
    """What every job's process of this worker starts with: limits, and cores / slots threads."""
    threads = settings.job_threads or max(1, usable_cores() // pool_size())
    return isolation.Launch(
        isolation.Limits(settings.job_memory_bytes, settings.job_cpu_seconds), threads
    )


@worker_process_init.connect
def _start_warm_process(**_: Any) -> None:
    """Each pool child starts its first job's process as it starts (not on the first job)."""
    global _slot
    if settings.warm_job_process:
        _slot = isolation.Slot(_work_root(), _launch())
        _slot.refill()


@worker_process_shutdown.connect
def _stop_warm_process(**_: Any) -> None:
    if _slot is not None:
        _slot.close()


class JobTask(Task):
    """Base of `sanitize_job`: turns a hard time limit (child killed) into a failed job.

    Celery calls `on_failure` in the worker's main process when it kills a child for the
    hard limit; every other failure is handled inside the task itself.
    """

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        if isinstance(exc, TimeLimitExceeded) and args:
            records, _ = _stores()
            record = lifecycle.fail(
                records,
                str(args[0]),
                "timeout",
                f"the job ran past the hard time limit of {settings.task_time_limit} s "
                "and its worker was stopped",
            )
            isolation.remove_scratch(_work_root(), str(args[0]))
            if record is not None and record.callback is not None:
                deliver_callback.apply_async((record.id,), queue=record.queue)


def _work_root() -> Path:
    """Where each job's process gets its scratch directory."""
    return settings.state_dir / "work"


def _test_hook() -> str | None:
    """The fault a test asked this worker to simulate (from the worker's settings only)."""
    path = settings.test_hook_file
    if path is None:
        return None
    try:
        hook = path.read_text().strip()
    except OSError:
        return None
    if hook not in isolation.TEST_HOOKS:
        log.warning("ignoring unknown test hook %r in %s", hook, path)
        return None
    return hook


def _run(record: JobRecord) -> JobRecord | None:
    """The engine on the job's inputs, in its own process; results published, or failed."""
    records, store = _stores()
    job_id = record.id
    isolation.remove_scratch(_work_root(), job_id)  # left by an attempt whose worker died
    heartbeat = lifecycle.Heartbeat(records, job_id, settings.heartbeat_interval)
    launch = _launch()

    def watch() -> bool:
        """Polled by the supervisor while the job runs: a heartbeat, and has it been cancelled?"""
        heartbeat()
        return records.cancel_requested(job_id)

    try:
        with ExitStack() as stack:
            paths = {
                role: stack.enter_context(store.local_path(job_id, name))
                for role, name in record.input_names.items()
            }
            result = stack.enter_context(
                isolation.sanitize_isolated(
                    paths,
                    record.options,
                    work_root=_work_root(),
                    limits=launch.limits,
                    threads=launch.threads,
                    slot=_slot,
                    progress=lifecycle.ProgressWriter(records, job_id, settings.progress_interval),
                    should_cancel=watch,
                    label=job_id,
                    test_hook=_test_hook(),
                )
            )
            report = result.report
            _track(settings.mlflow_tracking_uri, report, result.out_dir, job_id)
            return lifecycle.publish_success(
                records,
                store,
                job_id,
                result.out_dir,
                summary_from_report(report),
                dict(report.timings),
            )
    except CancelledError:
        log.info("job %s cancelled", job_id)
        return lifecycle.mark_cancelled(records, store, job_id)
    except SoftTimeLimitExceeded:
        message = f"the job ran past its time limit of {settings.task_soft_time_limit} s"
        return lifecycle.fail(records, job_id, "timeout", message)
    except isolation.IsolationFailure as exc:
        log.warning("job %s failed: %s: %s", job_id, exc.kind, exc.message)
        return lifecycle.fail(records, job_id, exc.kind, exc.message)
    except FinePruneError as exc:
        log.info("job %s failed: %s: %s", job_id, exc.kind, exc.message)
        return lifecycle.fail(records, job_id, exc.kind, exc.message)
    except StorageError as exc:
        log.warning("job %s could not store its results: %s", job_id, exc)
        return lifecycle.fail(records, job_id, "storage", str(exc))
    except Exception as exc:
        log.exception("job %s failed unexpectedly", job_id)
        return lifecycle.fail(records, job_id, "internal", isolation.one_line(exc))


def _track(uri: str | None, report, out_dir, job_id: str) -> None:
    """Log the finished run to MLflow, here in the worker, after the job's process has gone:
    the untrusted model's process never opens a connection. A tracking failure is logged and
    does not fail the job: the sanitized model and report are what the client asked for."""
    if not uri:
        return
    from fineprune.report.tracking import log_run

    try:
        log_run(report, out_dir, uri, name=job_id)
    except Exception:
        log.warning("job %s could not be logged to MLflow at %s", job_id, uri, exc_info=True)


@app.task(bind=True, base=JobTask, name=SANITIZE_TASK, max_retries=None)
def sanitize_job(self: Task, job_id: str) -> str:
    """Run one job, at most once to completion however often its message is delivered.

    A delivery that finds the job running under a live heartbeat (a resend, or Redis handing
    over a job whose worker only just died) looks again when that heartbeat would be stale.
    """
    records, store = _stores()
    try:
        started = lifecycle.begin_attempt(
            records, store, job_id, settings.max_attempts, stale_after=settings.stale_after
        )
    except lifecycle.StillRunning as busy:
        log.info("%s", busy)
        raise self.retry(countdown=busy.wait + settings.heartbeat_interval) from None
    if started is None:
        final = records.get(job_id)
    else:
        log.info("job %s: attempt %d", job_id, started.attempts)
        final = _run(started)
    callback = final.callback if final is not None and final.state.final else None
    if callback is not None and callback.delivered_at is None and callback.attempts == 0:
        deliver_callback.apply_async((job_id,), queue=final.queue)
    return final.state.value if final is not None else "unknown"


@app.task(bind=True, name=CALLBACK_TASK, max_retries=settings.callback_max_attempts - 1)
def deliver_callback(self: Task, job_id: str) -> str:
    """POST the final job resource to the client's URL, signed; retried with backoff."""
    records, _ = _stores()
    record = records.get(job_id)
    if record is None or record.callback is None or record.callback.delivered_at is not None:
        return "nothing to do"
    body = to_resource(record, settings.public_url).model_dump_json().encode()
    error: str | None = None
    retry = True
    try:
        if not settings.callback_secret:
            raise CallbackRefused("the worker has no FINEPRUNE_CALLBACK_SECRET to sign with")
        check_url_target(record.callback.url, settings.callback_allow_private)
        response = httpx.post(
            record.callback.url,
            content=body,
            headers={
                "Content-Type": "application/json",
                SIGNATURE_HEADER: sign(settings.callback_secret, body),
                "User-Agent": "fineprune-callback/1",
            },
            timeout=10.0,
            follow_redirects=False,
        )
        if not 200 <= response.status_code < 300:
            error = f"callback answered HTTP {response.status_code}"
    except CallbackRefused as exc:
        error, retry = str(exc), False
    except httpx.HTTPError as exc:
        error = f"callback failed: {isolation.one_line(exc)}"

    def note(r: JobRecord) -> bool:
        if r.callback is None:
            return False
        r.callback.attempts += 1
        r.callback.last_error = error
        if error is None:
            r.callback.delivered_at = now()
        return True

    records.update(job_id, note)
    if error is None:
        return "delivered"
    if retry and self.request.retries < (self.max_retries or 0):
        raise self.retry(countdown=min(60, 2 ** (self.request.retries + 1)))
    log.warning("callback of job %s given up: %s", job_id, error)
    return "given up"


@app.task(name=PURGE_TASK)
def purge_expired_task() -> int:
    """Retention sweep; scheduled hourly by `celery -A workers.app beat` (or `worker -B`)."""
    records, store = _stores()
    started = time.monotonic()
    count = purge_expired(records, store, settings.retention_days)
    log.info("retention sweep took %.1f s", time.monotonic() - started)
    return count


@app.task(name=RECOVER_TASK)
def recover_lost_jobs_task() -> int:
    """Send again the jobs that lost their message; scheduled by the beat, and at worker start."""
    records, _ = _stores()
    recovered = recover_lost_jobs(
        records,
        lambda job_id, queue: send_job(app, job_id, queue),
        stale_after=settings.stale_after,
        unsent_after=settings.unsent_after,
        redelivers=not settings.embedded,
    )
    return len(recovered)


@worker_ready.connect
def _recover_at_start(**_: Any) -> None:
    """A worker restarted after a crash picks its lost job up without waiting for the beat."""
    try:
        recover_lost_jobs_task()
    except Exception:
        log.warning("recovery sweep at worker start failed", exc_info=True)
