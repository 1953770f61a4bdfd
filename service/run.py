"""`python -m service.run`: the API and one worker together, for `make run` and laptops.

Without REDIS_URL this is the embedded mode (SQLite broker in the artifacts dir), so one
command gives a working service. Production runs the API and workers as separate processes.
"""

from __future__ import annotations

import logging
import signal
import subprocess

import uvicorn

from jobs.settings import get_settings
from service.main import create_app
from workers.command import worker_argv

log = logging.getLogger("fineprune.run")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = get_settings()
    argv = worker_argv(
        settings.submit_queue,
        "--loglevel",
        "INFO",
        "--beat",  # hourly retention sweep; only one beat per deployment
    )
    worker = subprocess.Popen(argv)
    mode = f"Redis at {settings.redis_url}" if settings.redis_url else "embedded (SQLite broker)"
    log.info("worker pid %d, broker: %s, artifacts: %s", worker.pid, mode, settings.artifacts_dir)
    url = f"http://{settings.host}:{settings.port}"
    access = "open mode (no API keys)" if settings.is_open else "API keys required"
    print(f"fineprune API on {url} - docs at {url}/docs - {access}", flush=True)
    try:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


if __name__ == "__main__":
    main()
