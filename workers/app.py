"""The Celery app of the workers: `celery -A workers.app worker --queues fineprune`.

Importing this module must stay cheap and must not import TensorFlow or Keras: the prefork
pool forks children from this process, and TensorFlow does not survive a fork. Neither main
process nor pool child ever imports the engine: each job runs it in a fresh process of its own
(`workers.isolation`).
"""

from __future__ import annotations

from typing import Any

from celery.signals import worker_init

from jobs.queue import make_celery, prepare_embedded_broker
from jobs.settings import get_settings

settings = get_settings()
app = make_celery(settings, name="fineprune", include=["workers.tasks"])
# The pool's size, unless `--concurrency` says otherwise: what fits the machine by default.
app.conf.worker_concurrency = settings.concurrency
_pool_size: int | None = None


def pool_size() -> int:
    """Slots of this worker: its `--concurrency` as started, else the settings' default."""
    return _pool_size or settings.concurrency


@worker_init.connect
def _prepare_broker(sender: Any = None, **_: Any) -> None:
    """In the main process, before the pool forks: the broker's queues, the pool's size."""
    global _pool_size
    concurrency = getattr(sender, "concurrency", None)
    if isinstance(concurrency, int) and concurrency > 0:
        _pool_size = concurrency
    prepare_embedded_broker(app, [settings.cpu_queue, settings.gpu_queue])
