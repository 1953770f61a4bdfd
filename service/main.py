"""The API app factory, and `app` for `uvicorn service.main:app`.

This process never imports TensorFlow or Keras: it only checks uploads with the engine's
static inspection and queues jobs by task name. A test asserts it stays that way.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobs.queue import JobQueue
from jobs.records import RecordStore, open_records
from jobs.settings import Settings, get_settings
from jobs.storage import ArtifactStore, LocalArtifactStore
from service.errors import install_error_handlers
from service.metrics import build_registry
from service.routes import health, jobs

log = logging.getLogger("fineprune.api")

DESCRIPTION = """\
Removes backdoors from untrusted Keras 3 models by fine-pruning.

Submit a model with clean data (`POST /v1/jobs`), poll the job (`GET /v1/jobs/{id}`) until it
has `succeeded`, then download the sanitized model and the report. Authenticate with
`Authorization: Bearer <key>`; every job is visible only to the key that made it.
"""


def _version() -> str:
    try:
        return metadata.version("fineprune")
    except metadata.PackageNotFoundError:
        return "0"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_NOSNIFF = (b"x-content-type-options", b"nosniff")


class CountAndHarden:
    """Counts requests by route template and status; adds `X-Content-Type-Options: nosniff`.

    Plain ASGI rather than `@app.middleware("http")`, whose wrapper runs every response
    through an extra task and memory stream. The route's template (bounded label values, not
    raw paths) is in the scope once the router has matched it.
    """

    def __init__(self, app: ASGIApp, requests_total: Counter) -> None:
        self.app = app
        self.requests_total = requests_total

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets if the app raises before answering

        async def send_hardened(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                if not any(name.lower() == _NOSNIFF[0] for name, _ in headers):
                    headers.append(_NOSNIFF)
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_hardened)
        finally:
            template = getattr(scope.get("route"), "path", "unmatched")
            self.requests_total.labels(scope["method"], template, str(status)).inc()


def create_app(
    settings: Settings | None = None,
    *,
    store: ArtifactStore | None = None,
    records: RecordStore | None = None,
    queue: JobQueue | None = None,
) -> FastAPI:
    """Build the API; pass implementations to replace the local store, records or queue."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.is_open and not _is_loopback(settings.host):
            log.warning("open mode on %s: anyone who can reach it can submit jobs", settings.host)
        try:
            app.state.queue.prepare()
        except Exception:  # the broker may come up later; sends retry, health says so
            log.warning("could not create the broker's queues at startup", exc_info=True)
        yield

    app = FastAPIOffline(  # /docs and /redoc need no CDN: their assets are served from here
        title="fineprune",
        version=_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=[
            {"name": "jobs", "description": "Sanitize jobs: submit, poll, download, cancel."},
            {"name": "health", "description": "Probes and metrics."},
        ],
    )
    app.state.settings = settings
    app.state.store = store or LocalArtifactStore(settings.jobs_dir)
    app.state.records = records or open_records(settings)
    app.state.queue = queue or JobQueue(settings)
    app.state.registry, requests_total = build_registry(app.state.records, app.state.queue)

    app.add_middleware(CountAndHarden, requests_total=requests_total)
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(jobs.router)
    return app


def __getattr__(name: str) -> FastAPI:
    """`service.main:app`, built on first use so importing the module has no side effects."""
    if name == "app":
        global app
        app = create_app()
        return app
    raise AttributeError(name)


def main() -> None:
    """`python -m service.main`: serve on the configured host and port."""
    import uvicorn

    settings = get_settings()
    logging.basicConfig(level=logging.INFO)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, proxy_headers=False)


if __name__ == "__main__":
    main()
