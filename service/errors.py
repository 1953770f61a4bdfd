"""Every error the API answers is an `ErrorBody`: a code to switch on, a sentence to read.

Handlers cover our own `ApiError`, FastAPI's validation errors (422), Starlette's HTTP errors
(404 for unknown routes, 405...) and, as a last resort, bugs (500, logged, never the content
of a request).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from schemas.jobs import ErrorBody

log = logging.getLogger(__name__)

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    410: "gone",
    413: "too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    503: "unavailable",
}


class ApiError(Exception):
    """Raise anywhere in a request to answer `status` with an ErrorBody."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        detail: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.detail = detail
        self.headers = headers


def error_response(
    status: int,
    error: str,
    message: str,
    detail: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorBody(error=error, message=message, detail=detail)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


def field_errors(errors: list[Any], prefix: tuple[str | int, ...] = ()) -> list[dict[str, Any]]:
    """Pydantic errors as plain JSON: where, what, which kind (never the offending input)."""
    return [
        {
            "loc": [*prefix, *(e.get("loc") or ())],
            "msg": str(e.get("msg", "")),
            "type": str(e.get("type", "")),
        }
        for e in errors
    ]


def summarize(detail: list[dict[str, Any]]) -> str:
    if not detail:
        return "the request is invalid"
    first = detail[0]
    where = ".".join(str(p) for p in first["loc"])
    more = f" (and {len(detail) - 1} more)" if len(detail) > 1 else ""
    return f"{where}: {first['msg']}{more}" if where else f"{first['msg']}{more}"


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.error, exc.message, exc.detail, exc.headers)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    detail = field_errors(list(exc.errors()))
    return error_response(422, "validation_error", summarize(detail), detail)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return error_response(exc.status_code, code, message, headers=exc.headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal", "internal error; it has been logged")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting ErrorBody for these statuses."""
    return {
        status: {"model": ErrorBody, "description": _CODES.get(status, "error").replace("_", " ")}
        for status in statuses
    }
