"""Celery wiring shared by the API (which only sends) and the workers (which also consume).

The API builds its own Celery instance from the settings it was given and sends tasks by name,
so it never imports the task module (nor, through it, anything heavy).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from celery import Celery
from kombu.exceptions import ChannelError

from jobs.settings import Settings

log = logging.getLogger(__name__)

SANITIZE_TASK = "fineprune.sanitize_job"
CALLBACK_TASK = "fineprune.deliver_callback"
PURGE_TASK = "fineprune.purge_expired"
RECOVER_TASK = "fineprune.recover_lost_jobs"


def _state_dir(settings: Settings) -> Path:
    state = settings.state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True)
    return state


def broker_urls(settings: Settings) -> tuple[str, str]:
    """(broker, result backend): Redis when configured, else SQLite files (embedded mode)."""
    if settings.redis_url:
        return settings.redis_url, settings.redis_url
    state = _state_dir(settings)
    return f"sqla+sqlite:///{state / 'broker.sqlite'}", f"db+sqlite:///{state / 'results.sqlite'}"


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery settings that make delivery at-least-once and jobs finish once."""
    broker, backend = broker_urls(settings)
    transport: dict[str, Any]
    if settings.redis_url:
        transport = {
            # Longer than the hard time limit: Redis must not hand a live job to a second worker.
            "visibility_timeout": settings.visibility_timeout,
            "unacked_restore_interval": settings.unacked_restore_interval,
            "unacked_restore_throttle": 1,
            # A worker killed inside a restore sweep leaves the sweep's lock held until it
            # expires (kombu's default: 300 s), and no worker restores anything meanwhile.
            # A sweep takes milliseconds; a few intervals is ample.
            "unacked_mutex_expire": max(10, 3 * settings.unacked_restore_interval),
            "socket_connect_timeout": 5,
            "socket_timeout": 30,
        }
    else:
        transport = {}  # the SQLAlchemy transport hands these to create_engine: keep it empty
    return {
        "broker_url": broker,
        "result_backend": backend,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_soft_time_limit": settings.task_soft_time_limit,
        "task_time_limit": settings.task_time_limit,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "task_default_queue": settings.cpu_queue,
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1,
        },
        "result_expires": 24 * 3600,
        "enable_utc": True,
        "timezone": "UTC",
        "worker_send_task_events": False,
        "beat_schedule_filename": str(_state_dir(settings) / "celerybeat-schedule"),
        "beat_schedule": {
            "purge-expired": {"task": PURGE_TASK, "schedule": 3600.0},
            "recover-lost-jobs": {"task": RECOVER_TASK, "schedule": settings.recovery_interval},
        },
    }


def make_celery(settings: Settings, name: str = "fineprune", **kwargs: Any) -> Celery:
    app = Celery(name, **kwargs)
    app.conf.update(celery_config(settings))
    return app


def prepare_embedded_broker(app: Celery, queues: list[str], attempts: int = 5) -> None:
    """Embedded mode: create the SQLite broker's queue rows before anything races to.

    Kombu's SQLAlchemy transport creates a queue's row on first use by query-then-insert; when
    the API and a worker start together both can insert, and the loser's UNIQUE violation
    kills the worker at startup. Declaring here, retrying on that violation (the retry finds
    the row), leaves nothing for the later implicit declarations to insert.
    """
    if not str(app.conf.broker_url).startswith("sqla+"):
        return
    from sqlalchemy.exc import IntegrityError

    for attempt in range(1, attempts + 1):
        try:
            with app.connection_for_write() as conn:
                channel = conn.default_channel
                for queue in queues:
                    channel.queue_declare(queue)
            return
        except IntegrityError:
            if attempt == attempts:
                raise
            time.sleep(0.05 * attempt)


def send_job(app: Celery, job_id: str, queue: str) -> None:
    """Queue the job; the task id is the job id, so a resend is recognisable."""
    app.send_task(SANITIZE_TASK, args=[job_id], task_id=job_id, queue=queue)


class JobQueue:
    """What the API needs from the broker: send a job, measure the backlog, check it is up."""

    def __init__(self, settings: Settings, app: Celery | None = None) -> None:
        self.settings = settings
        self.app = app or make_celery(settings, name="fineprune-api")

    def prepare(self) -> None:
        """Create the queues in the embedded broker (nothing to do with Redis)."""
        prepare_embedded_broker(self.app, [self.settings.cpu_queue, self.settings.gpu_queue])

    def send(self, job_id: str, queue: str) -> None:
        send_job(self.app, job_id, queue)

    def depth(self) -> int | None:
        """Messages waiting in the CPU and GPU queues; None when the broker cannot say."""
        total = 0
        try:
            with self.app.connection_for_read() as conn:
                channel = conn.default_channel
                for queue in (self.settings.cpu_queue, self.settings.gpu_queue):
                    try:
                        total += channel.queue_declare(queue, passive=True).message_count
                    except ChannelError:  # never declared: empty
                        channel = conn.default_channel
        except Exception:
            log.debug("queue depth unavailable", exc_info=True)
            return None
        return total

    def ping(self) -> None:
        """Raise when the broker cannot be reached."""
        with self.app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=5)
            channel = conn.default_channel
            client = getattr(channel, "client", None)
            if client is not None and hasattr(client, "ping"):
                client.ping()  # Redis: a real round trip, not just a socket
            else:
                with contextlib.suppress(ChannelError):  # reachable, queue just not declared
                    channel.queue_declare(self.settings.cpu_queue, passive=True)
