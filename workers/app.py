"""The Celery app of the workers: `celery -A workers.app worker --queues fineprune`.

Importing this module must stay cheap and must not import TensorFlow or Keras: the prefork
pool forks children from this process, and TensorFlow does not survive a fork. Tasks import
the engine lazily, inside the child.
"""

from __future__ import annotations

from jobs.queue import make_celery
from jobs.settings import get_settings

settings = get_settings()
app = make_celery(settings, name="fineprune", include=["workers.tasks"])
