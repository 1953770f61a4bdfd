"""The command line that starts one worker: one definition for `make run`, the CLI and the tests."""

from __future__ import annotations

import sys


def worker_argv(queue: str, *extra: str) -> list[str]:
    """A prefork worker with one child: the engine uses every core of its own accord."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.app",
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        "1",
        "--queues",
        queue,
        *extra,
    ]
