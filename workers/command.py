"""The command line that starts one worker: one definition for `make run`, the CLI and the tests."""

from __future__ import annotations

import sys


def worker_argv(queue: str, *extra: str) -> list[str]:
    """A prefork worker sized by the settings (`FINEPRUNE_WORKER_CONCURRENCY`; by default what
    fits the machine), each job's TensorFlow on cores / slots threads; `--concurrency N` in
    `extra` overrides the size."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.app",
        "worker",
        "--pool",
        "prefork",
        "--queues",
        queue,
        *extra,
    ]
