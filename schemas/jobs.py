"""The job resource of the REST API: what a client polls, lists and downloads."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from schemas.options import SanitizeOptions


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def final(self) -> bool:
        return self in (JobState.succeeded, JobState.failed, JobState.cancelled)


class JobProgress(BaseModel):
    stage: str | None = Field(None, description="load, profile, cut, fine-tune or report.")
    percent: float = Field(0.0, ge=0.0, le=100.0, description="Of the whole job.")


class JobError(BaseModel):
    kind: str = Field(
        description="invalid_model, unsafe_model, invalid_data, pruning, "
        "worker_lost, timeout, internal..."
    )
    message: str


class InputFile(BaseModel):
    role: str = Field(description="model, data, trigger_data or test_data.")
    filename: str
    sha256: str
    bytes: int


class JobLinks(BaseModel):
    self: str
    report: str
    report_html: str
    report_png: str
    model: str


class JobSummary(BaseModel):
    """The headline numbers of a finished job (the report has everything)."""

    clean_accuracy_before: float
    clean_accuracy_after: float
    accuracy_split: str
    attack_success_before: float | None = None
    attack_success_after: float | None = None
    channels_pruned: int
    parameters_before: int
    parameters_after: int
    conclusion: str | None = Field(
        None, description="The verdict: no-signature, removed or may-remain (report.verdict)."
    )
    suspect: int | None = Field(
        None, description="The class the detector suspected in the delivered model, if any."
    )


class JobResource(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "3f2b9c1e6a7d4e0f9b8a7c6d5e4f3a2b",
                    "state": "running",
                    "progress": {"stage": "fine-tune", "percent": 62.5},
                    "error": None,
                    "created_at": "2026-11-25T16:00:00Z",
                    "started_at": "2026-11-25T16:00:02Z",
                    "finished_at": None,
                    "attempts": 1,
                    "options": SanitizeOptions().model_dump(),
                    "inputs": [],
                    "summary": None,
                    "cancel_requested": False,
                    "artifacts_deleted": False,
                    "links": {
                        "self": "/v1/jobs/3f2b9c1e6a7d4e0f9b8a7c6d5e4f3a2b",
                        "report": "/v1/jobs/3f2b9c1e6a7d4e0f9b8a7c6d5e4f3a2b/report",
                        "report_html": "/v1/jobs/3f2b9c1e6a7d4e0f9b8a7c6d5e4f3a2b/report.html",
                        "report_png": "/v1/jobs/3f2b9c1e6a7d4e0f9b8a7c6d5e4f3a2b/report.png",
                        "model": "/v1/jobs/3f2b9c1e6a7d4e0f9b8a7c6d5e4f3a2b/model",
                    },
                }
            ]
        }
    )

    id: str
    state: JobState
    progress: JobProgress = JobProgress()
    error: JobError | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = 0
    options: SanitizeOptions
    inputs: list[InputFile] = []
    summary: JobSummary | None = None
    links: JobLinks
    cancel_requested: bool = Field(
        False, description="DELETE was called while running: it stops at the next stage."
    )
    artifacts_deleted: bool = Field(
        False, description="Uploads and results were removed (DELETE or retention)."
    )


class JobPage(BaseModel):
    items: list[JobResource]
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next page.")


class ErrorBody(BaseModel):
    """Every 4xx/5xx body: a code a program can switch on and a message a person can read."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": "unsafe_model",
                    "message": "layer 'lambda_1' is a Lambda layer: it would run code from the "
                    "file",
                    "detail": [
                        {
                            "loc": ["body", "model"],
                            "msg": "layer 'lambda_1' is a Lambda layer: it would run code "
                            "from the file",
                            "type": "unsafe_model",
                        }
                    ],
                },
                {"error": "not_found", "message": "no job '3f2b9c1e6a7d4e0f9b8a7c6d5e4f3a2b'"},
            ]
        }
    )

    error: str
    message: str
    detail: list[dict] | None = None
