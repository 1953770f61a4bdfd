"""`fineprune serve | worker`: the service's processes (settings from the environment)."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer


def serve(
    with_worker: Annotated[
        bool, typer.Option(help="Also start one worker (embedded mode without REDIS_URL).")
    ] = True,
) -> None:
    """Start the API (settings from the environment: REDIS_URL, ARTIFACTS_DIR, PORT...)."""
    if with_worker:
        from service.run import main as run_all

        run_all()
        return
    import uvicorn

    from jobs.settings import get_settings
    from service.main import create_app

    settings = get_settings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port)


def worker(ctx: typer.Context) -> None:
    """Start a Celery worker; extra arguments go to `celery worker` (--queues ...). Its slots
    fit the machine unless FINEPRUNE_WORKER_CONCURRENCY or --concurrency says otherwise."""
    from workers.app import app as celery_app

    celery_app.worker_main(["worker", *ctx.args])


def schema() -> None:
    """Print the JSON schema of the report."""
    from schemas.report import SanitizeReport

    sys.stdout.write(json.dumps(SanitizeReport.model_json_schema(), indent=2) + "\n")
