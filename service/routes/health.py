"""Liveness, readiness and metrics: for orchestrators and Prometheus, not for clients."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import QueueDep, StoreDep
from service.errors import error_response, error_responses

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:  # no I/O: answered on the event loop, no threadpool hop
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="The broker answers and storage is writable",
    responses=error_responses(503),
)
def readyz(queue: QueueDep, store: StoreDep) -> JSONResponse:
    problems: list[str] = []
    try:
        queue.ping()
    except Exception as exc:
        problems.append(f"broker unreachable: {type(exc).__name__}: {str(exc)[:200]}")
    try:
        store.check_writable()
    except OSError as exc:
        problems.append(f"storage not writable: {exc.strerror or exc}")
    if problems:
        return error_response(
            503,
            "not_ready",
            "; ".join(problems),
            [{"loc": ["readyz"], "msg": p, "type": "not_ready"} for p in problems],
        )
    return JSONResponse({"status": "ready", "broker": "ok", "storage": "ok"})


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
