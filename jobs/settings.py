"""Every knob of the API and the workers, read once from the environment.

Both processes build the same `Settings`, so the API and the workers agree on where artifacts
live, which broker to use and how long a job may run. Names take the prefix `FINEPRUNE_`;
`REDIS_URL`, `ARTIFACTS_DIR` and `PORT` are accepted bare too, as platforms set them that way.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024**2
GiB = 1024**3
MIN_JOB_MEMORY = 512 * MiB  # TensorFlow cannot even start with less heap (measured)


def _env(name: str, *bare: str) -> AliasChoices:
    """Accept `FINEPRUNE_<NAME>` and bare aliases; kwargs use the field name."""
    return AliasChoices(f"FINEPRUNE_{name.upper()}", *bare)


class Settings(BaseSettings):
    """The service's configuration; see each field's description."""

    model_config = SettingsConfigDict(
        env_prefix="FINEPRUNE_",
        extra="ignore",
        populate_by_name=True,
        case_sensitive=False,
        hide_input_in_errors=True,  # keys and secrets must not reach startup logs
    )

    redis_url: str | None = Field(
        None,
        validation_alias=_env("redis_url", "REDIS_URL"),
        description="Broker and result backend. None: embedded mode, Celery's SQLAlchemy "
        "transport over SQLite files in the artifacts dir.",
    )
    database_url: str | None = Field(
        None,
        description="Where job records live, as a SQLAlchemy URL, e.g. "
        "postgresql+psycopg://fineprune@db.internal/fineprune: required once the API or "
        "workers run on more than one host. None: SQLite in the artifacts dir "
        "(state/jobs.sqlite), one host only. JSON record files of an older artifacts dir are "
        "imported on first start.",
    )
    artifacts_dir: Path = Field(
        Path("./var/artifacts"),
        validation_alias=_env("artifacts_dir", "ARTIFACTS_DIR"),
        description="Uploads, results, job records (and the SQLite broker in embedded mode).",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated bearer keys. None configured means open mode.",
    )
    open_mode: bool = Field(
        False, description="Accept requests without a key (all jobs belong to owner 'open')."
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, validation_alias=_env("port", "PORT"), ge=1, le=65535)
    public_url: str = Field(
        "", description="Prefix for links in callbacks, e.g. https://fineprune.example.com."
    )

    max_model_bytes: int = Field(512 * MiB, ge=1, description="Cap of the model part (413).")
    max_data_bytes: int = Field(
        1024 * MiB, ge=1, description="Cap of each data part: data, trigger_data, test_data (413)."
    )
    max_field_bytes: int = Field(64 * 1024, ge=1, description="Cap of each non-file form field.")
    max_weight_bytes: int | None = Field(
        None,
        ge=1,
        description="Weights a model may declare, in its config or its weights file (422 "
        "above). None: what fits job_memory_bytes (a job holds about 8 copies of the weights, "
        "besides 1 GiB for TensorFlow and the data): 896 MiB at the default 8 GiB.",
    )
    check_seconds: float = Field(
        10.0,
        gt=0.0,
        description="Wall seconds the upload checks may take, in their own process, before "
        "it is killed and the upload refused (422). A good upload takes well under one.",
    )
    check_memory_bytes: int = Field(
        512 * MiB,
        ge=128 * MiB,
        description="Heap (RLIMIT_DATA) of the process that checks one upload; its CPU time "
        "is capped at check_seconds too.",
    )
    check_concurrency: int = Field(
        4, ge=1, description="Upload checks running at once; more wait for a free one."
    )

    task_soft_time_limit: int = Field(
        1800,
        ge=1,
        description="Seconds; the job fails 'timeout'. Sized to the largest model the weight "
        "budget accepts: bench/budget_bench.py sanitizes one at the default 896 MiB in about "
        "320 s on 2 busy cores (200 samples, 2 epochs), so 1800 s leaves room for more data and "
        "epochs, not for an hour of a stuck worker.",
    )
    task_time_limit: int = Field(2100, ge=1, description="Seconds; the worker child is killed.")
    visibility_timeout: int = Field(
        4200,
        ge=1,
        description="Seconds before Redis hands an unacknowledged job to another worker; must "
        "exceed task_time_limit, or a slow job would run twice at once.",
    )
    unacked_restore_interval: int = Field(
        10, ge=1, description="Seconds between the workers' sweeps for abandoned jobs."
    )
    max_attempts: int = Field(
        3, ge=1, description="Deliveries before a job that keeps killing workers is failed."
    )
    progress_interval: float = Field(
        1.0, ge=0.0, description="Least seconds between two progress writes of one job."
    )
    heartbeat_interval: float = Field(
        10.0, gt=0.0, description="Seconds between two heartbeats a worker writes for its job."
    )
    stale_after: float = Field(
        120.0,
        gt=0.0,
        description="Seconds without a heartbeat after which a running job's worker counts as "
        "lost: its job is sent again (embedded mode), and a duplicate delivery may take it "
        "over (any mode). Must be well above heartbeat_interval.",
    )
    unsent_after: float = Field(
        60.0,
        gt=0.0,
        description="Seconds after which a queued job whose message was never sent (the API "
        "stopped in between) is sent by the recovery sweep.",
    )
    recovery_interval: float = Field(
        60.0, gt=0.0, description="Seconds between two recovery sweeps (run by the beat)."
    )
    job_memory_bytes: int = Field(
        8 * GiB,
        ge=0,
        description="Heap (RLIMIT_DATA: private writable memory, thread stacks included) of the "
        "process that runs a job; over it the job fails 'out_of_memory'. 0: no limit; else at "
        "least 512 MiB, below which TensorFlow cannot start.",
    )
    job_cpu_seconds: int = Field(
        4 * 3600,
        ge=0,
        description="CPU seconds (RLIMIT_CPU, all threads together) of the process that runs a "
        "job; over it the job fails 'timeout'. A backstop under task_soft_time_limit, which "
        "counts wall time, for jobs on many busy cores. 0: no limit.",
    )
    test_hook_file: Path | None = Field(
        None,
        description="Tests only: while this file exists, its content (sigkill, segfault, exit, "
        "probe) is a fault the job's process simulates. Never set it in production.",
    )

    callback_secret: str | None = Field(
        None, description="HMAC key for callback signatures; callbacks are refused without it."
    )
    callback_allow_private: bool = Field(
        False, description="Allow callbacks to loopback and private addresses (tests, LANs)."
    )
    callback_max_attempts: int = Field(6, ge=1, le=20)

    mlflow_tracking_uri: str | None = Field(
        None,
        description="Log every finished job to this MLflow tracking URI (the run is named by "
        "the job id); needs the mlflow extra. None: no tracking.",
    )
    retention_days: float = Field(
        7.0, gt=0, description="Artifacts of finished jobs older than this are deleted."
    )
    cpu_queue: str = "fineprune"
    gpu_queue: str = "fineprune-gpu"
    use_gpu_queue: bool = Field(False, description="Send new jobs to the GPU queue.")

    worker_concurrency: int = Field(
        0,
        ge=0,
        description="Jobs one worker runs at once (its prefork pool's size). 0: what fits the "
        "machine, one slot per two usable cores, and no more slots than the memory holds at "
        "job_memory_bytes each (at least one). Small models gain little from many threads, so "
        "more slots with fewer threads each finish more jobs per hour than one job on every "
        "core; a large model wants fewer slots with more threads (set job_threads too).",
    )
    job_threads: int = Field(
        0,
        ge=0,
        description="Threads of each job's TensorFlow (intra- and inter-op pools). 0: usable "
        "cores divided by worker_concurrency, at least one, so slots do not fight for cores.",
    )
    warm_job_process: bool = Field(
        True,
        description="Keep one job process per worker slot started ahead, TensorFlow imported "
        "(about 0.5 GiB of memory each), so a job does not wait 3-5 s for the import. Each "
        "runs one job and is replaced; its isolation is that of a process started for the job.",
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if value is None:
            return []
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @model_validator(mode="after")
    def _limits_agree(self) -> Settings:
        if self.task_soft_time_limit >= self.task_time_limit:
            raise ValueError("task_soft_time_limit must be below task_time_limit")
        if 0 < self.job_memory_bytes < MIN_JOB_MEMORY:
            raise ValueError(
                "job_memory_bytes is in bytes, and TensorFlow cannot start with less than "
                f"{MIN_JOB_MEMORY} (512 MiB); 0 means no limit"
            )
        if self.visibility_timeout <= self.task_time_limit:
            raise ValueError(
                "visibility_timeout must exceed task_time_limit: otherwise Redis redelivers a "
                "job that is still running"
            )
        if self.stale_after < 3 * self.heartbeat_interval:
            raise ValueError(
                "stale_after must be at least 3 heartbeat_intervals: otherwise a live job's "
                "worker could be taken for lost"
            )
        return self

    @property
    def is_open(self) -> bool:
        """Open mode: asked for, or no key configured."""
        return self.open_mode or not self.api_keys

    @property
    def embedded(self) -> bool:
        return not self.redis_url

    @property
    def records_url(self) -> str:
        """The records database: `database_url`, else SQLite in the state folder."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.state_dir / 'jobs.sqlite').resolve()}"

    @property
    def concurrency(self) -> int:
        """Worker slots: `worker_concurrency`, or what fits the machine's cores and memory."""
        if self.worker_concurrency:
            return self.worker_concurrency
        by_cores = usable_cores() // 2
        memory = total_memory_bytes()
        by_memory = memory // self.job_memory_bytes if memory and self.job_memory_bytes else 0
        return max(1, min(by_cores, by_memory) if by_memory else by_cores)

    @property
    def threads_per_job(self) -> int:
        """TensorFlow threads of one job: `job_threads`, or usable cores / slots."""
        return self.job_threads or max(1, usable_cores() // self.concurrency)

    @property
    def state_dir(self) -> Path:
        """Records, cancel markers, idempotency keys and the embedded broker's files."""
        return self.artifacts_dir / "state"

    @property
    def jobs_dir(self) -> Path:
        """Root of the local artifact store: one folder per job."""
        return self.artifacts_dir / "jobs"

    @property
    def submit_queue(self) -> str:
        return self.gpu_queue if self.use_gpu_queue else self.cpu_queue

    @property
    def max_request_bytes(self) -> int:
        """Whole-body cap: every part at its cap, plus room for the small fields."""
        return self.max_model_bytes + 3 * self.max_data_bytes + 16 * self.max_field_bytes + MiB


def usable_cores() -> int:
    """Cores this process may run on (its affinity: a container's CPU set, not the host's)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def total_memory_bytes() -> int:
    """Physical memory, or 0 when the system cannot say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read from the environment once."""
    return Settings()
