"""A Python client for the fineprune REST API, for pipelines and for the `fineprune submit` CLI.

with Client("http://127.0.0.1:8000", api_key="...") as client:
    job = client.submit("model.keras", "clean.npz", options={"rescale": 1 / 255})
    job = client.wait(job.id)
    client.download_model(job.id, "sanitized.keras")
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from schemas.jobs import JobPage, JobResource
from schemas.options import SanitizeOptions
from schemas.report import SanitizeReport

DEFAULT_URL = "http://127.0.0.1:8000"
REPORT_KINDS = ("json", "html", "png")
StrPath = str | os.PathLike[str]


class ApiError(Exception):
    """The API answered with an error body: `status`, a machine `code` and a readable message."""

    def __init__(self, status: int, code: str, message: str, detail: Any = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail


class ServiceUnreachable(ConnectionError):
    """No answer from the service at `url`: it is down, or the URL is not the service's."""

    def __init__(self, url: str, cause: Exception) -> None:
        detail = str(cause) or type(cause).__name__
        super().__init__(
            f"cannot reach the fineprune service at {url} ({detail}); "
            "is it running, and is that its URL (--url, FINEPRUNE_URL)?"
        )
        self.url = url


class JobFailed(Exception):
    """`wait` saw the job end in `failed` or `cancelled`."""

    def __init__(self, job: JobResource) -> None:
        reason = job.error.message if job.error else job.state.value
        super().__init__(f"job {job.id} {job.state.value}: {reason}")
        self.job = job


class Client:
    """Thin and typed: every call returns the API's pydantic resources."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = (base_url or os.environ.get("FINEPRUNE_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("FINEPRUNE_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=timeout,
            transport=transport,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- jobs ------------------------------------------------------------------------------

    def submit(
        self,
        model: StrPath,
        data: StrPath,
        *,
        trigger_data: StrPath | None = None,
        test_data: StrPath | None = None,
        options: SanitizeOptions | dict[str, Any] | None = None,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> JobResource:
        """Upload a model and its clean data; the job is queued when this returns."""
        if isinstance(options, dict):
            options = SanitizeOptions(**options)
        fields: dict[str, str] = {}
        if options is not None:
            fields["options"] = options.model_dump_json(exclude_defaults=True)
        if callback_url:
            fields["callback_url"] = callback_url
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        parts = {"model": model, "data": data, "trigger_data": trigger_data, "test_data": test_data}
        with ExitStack() as stack:
            files: dict[str, tuple[str, BinaryIO, str]] = {}
            for name, path in parts.items():
                if path is not None:
                    handle = stack.enter_context(Path(path).open("rb"))
                    files[name] = (Path(path).name, handle, "application/octet-stream")
            response = self._request("POST", "/v1/jobs", files=files, data=fields, headers=headers)
        return JobResource.model_validate(self._json(response))

    def get(self, job_id: str) -> JobResource:
        return JobResource.model_validate(self._json(self._request("GET", f"/v1/jobs/{job_id}")))

    def list(self, limit: int = 20, cursor: str | None = None) -> JobPage:
        params: dict[str, Any] = {"limit": limit}
        if cursor:
            params["cursor"] = cursor
        return JobPage.model_validate(self._json(self._request("GET", "/v1/jobs", params=params)))

    def iter_jobs(self, page_size: int = 50) -> Iterator[JobResource]:
        cursor = None
        while True:
            page = self.list(limit=page_size, cursor=cursor)
            yield from page.items
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def cancel(self, job_id: str) -> JobResource:
        return JobResource.model_validate(self._json(self._request("DELETE", f"/v1/jobs/{job_id}")))

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        poll_interval: float = 1.0,
        on_update: Callable[[JobResource], None] | None = None,
        raise_on_failure: bool = True,
    ) -> JobResource:
        """Poll until the job is final; raise JobFailed if it failed or was cancelled."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if on_update is not None:
                on_update(job)
            if job.state.final:
                if raise_on_failure and job.state.value != "succeeded":
                    raise JobFailed(job)
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.state.value} after {timeout} s")
            time.sleep(poll_interval)

    # -- results ---------------------------------------------------------------------------

    def report(self, job_id: str) -> SanitizeReport:
        response = self._request("GET", f"/v1/jobs/{job_id}/report")
        return SanitizeReport.model_validate(self._json(response))

    def download_model(self, job_id: str, dest: StrPath) -> Path:
        """Stream the sanitized model to `dest` (a file, or a directory to put it in)."""
        return self._download(f"/v1/jobs/{job_id}/model", Path(dest), f"{job_id}.keras")

    def download_report(self, job_id: str, dest: StrPath, kind: str = "html") -> Path:
        """One report file (json, html or png) to `dest` (a directory: `<job id>.report.<kind>`)."""
        if kind not in REPORT_KINDS:
            raise ValueError(f"report kind {kind!r} is none of {', '.join(REPORT_KINDS)}")
        path = "report" if kind == "json" else f"report.{kind}"
        return self._download(f"/v1/jobs/{job_id}/{path}", Path(dest), f"{job_id}.report.{kind}")

    def download_reports(self, job_id: str, folder: StrPath) -> dict[str, Path]:
        """report.json, .html and .png into `folder`, named by the job so that jobs never clash."""
        return {kind: self.download_report(job_id, folder, kind) for kind in REPORT_KINDS}

    def _download(self, url: str, dest: Path, default_name: str) -> Path:
        target = dest / default_name if dest.is_dir() else dest
        partial = target.with_name(target.name + ".part")
        try:
            with self._http.stream("GET", url) as response:
                if response.status_code >= 400:
                    response.read()
                    self._json(response)
                with partial.open("wb") as out:
                    for chunk in response.iter_bytes(1024 * 1024):
                        out.write(chunk)
        except httpx.TransportError as exc:
            raise ServiceUnreachable(self.url, exc) from exc
        partial.replace(target)
        return target

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise ServiceUnreachable(self.url, exc) from exc

    # -- service ---------------------------------------------------------------------------

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        if response.status_code < 400:
            return response.json()
        try:
            body = response.json()
            raise ApiError(
                response.status_code,
                body.get("error", "error"),
                body.get("message", response.text),
                body.get("detail"),
            )
        except ValueError:
            raise ApiError(response.status_code, "error", response.text[:300]) from None
