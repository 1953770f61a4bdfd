"""Faults with real processes: Redis restarts, the API restarts, storage fails, jobs expire.

The module runs its own redis-server (append-only, on a free port, in a temporary folder), so
restarting it disturbs no one, and one API and one worker against it. Jobs are tiny (an
untrained 4-class CNN, 40 images, one epoch). Tests run in order and build on each other:
the jobs that survive the Redis restart are the ones whose records and downloads must survive
the API restart, and retention later expires them.

Storage faults need a write to fail for the worker even when tests run as root, where chmod
blocks nothing. Where the test may mount (root with CAP_SYS_ADMIN), the job store
(`artifacts/jobs`) is a small tmpfs: filled up for "disk full", remounted read-only for
"unwritable". Elsewhere "disk full" is skipped (no portable way to fill a disk without a
mount), and "unwritable" uses chmod, or as root a directory squatting on the result's name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from factories import save_npz, sequential_bn_flatten, textures
from service_helpers import (
    API_KEY,
    Proc,
    final,
    free_port,
    multipart_files,
    poll_job,
    read_record,
    service_env,
    start_api,
    start_worker,
    wait_api,
    wait_until,
    wait_worker,
)

from jobs.queue import PURGE_TASK, make_celery
from jobs.settings import Settings

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
FAST = {"epochs": 1}
RETENTION_S = 30.0
QUEUE = "fineprune"


# --------------------------------------------------------------------------- processes


@dataclass
class OwnRedis:
    """A private redis-server with an append-only file, restartable on the same port and dir."""

    port: int
    folder: Path
    proc: Proc | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> Any:
        import redis

        return redis.Redis(port=self.port, socket_connect_timeout=2, socket_timeout=10)

    def start(self) -> None:
        self.starts += 1
        argv = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.folder),
            "--appendonly", "yes",
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "no",
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        self.proc = Proc.start(
            "redis", argv, dict(os.environ), self.folder / f"redis-{self.starts}.log"
        )
        wait_until(self._pong, 20, "redis-server to answer")

    def _pong(self) -> bool:
        assert self.proc is not None and self.proc.popen.poll() is None, self.proc.tail()
        with contextlib.closing(self.client()) as client:
            return bool(client.ping())

    def shutdown(self) -> None:
        """SHUTDOWN, as an operator restarting Redis would: the append-only file is flushed."""
        import redis

        assert self.proc is not None
        with (
            contextlib.closing(self.client()) as client,
            contextlib.suppress(redis.ConnectionError),
        ):
            client.shutdown()
        self.proc.popen.wait(20)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


@dataclass
class Stack:
    base_url: str
    port: int
    artifacts: Path
    env: dict[str, str]
    logs: Path
    redis: OwnRedis
    api: Proc
    mounted: bool
    worker: Proc | None = None
    done: dict[str, str] = field(default_factory=dict)  # test -> job ids it left succeeded

    @property
    def jobs_dir(self) -> Path:
        return self.artifacts / "jobs"

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
        )

    def restart_api(self) -> None:
        self.api.kill_group()  # the process is gone at once, as on a crash
        self.api.popen.wait(10)
        self.api = start_api(self.env, self.port, self.logs / "api-2.log")
        wait_api(self.base_url, self.api)

    def ensure_worker(self) -> Proc:
        if self.worker is None:
            self.worker = start_worker(self.env, self.logs / "worker.log", "faults")
            wait_worker(self.worker)
        return self.worker


def _try_mount_tmpfs(path: Path, size: str) -> bool:
    """Mount a tmpfs at `path` if this process may (root with CAP_SYS_ADMIN); else False."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "fineprune-faults", str(path)],
        capture_output=True,
        timeout=30,
    )
    return result.returncode == 0


def _remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True, timeout=30)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fault-inputs")
    sequential_bn_flatten().save(root / "model.keras")
    x, y = textures(40, seed=11)
    return {"model": root / "model.keras", "data": save_npz(root / "clean.npz", x=x, y=y)}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    pytest.importorskip("redis")
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed")
    root = tmp_path_factory.mktemp("faults")
    artifacts, logs, redis_dir = root / "artifacts", root / "logs", root / "redis"
    for folder in (artifacts / "jobs", logs, redis_dir):
        folder.mkdir(parents=True)
    mounted = _try_mount_tmpfs(artifacts / "jobs", "32m")
    redis = OwnRedis(free_port(), redis_dir)
    redis.start()
    env = service_env(
        artifacts,
        redis.url,
        api_keys=API_KEY,
        retention_days=RETENTION_S / 86400,
        progress_interval=0.5,
    )
    port = free_port()
    api = start_api(env, port, logs / "api-1.log")
    running = Stack(f"http://127.0.0.1:{port}", port, artifacts, env, logs, redis, api, mounted)
    try:
        wait_api(running.base_url, api)
        yield running
    finally:
        for proc in (running.worker, running.api):
            if proc is not None:
                proc.stop()
        redis.stop()
        if mounted:
            with contextlib.suppress(subprocess.SubprocessError):
                _remount(artifacts / "jobs", "rw")
            for args in (["umount"], ["umount", "-l"]):
                if subprocess.run([*args, str(artifacts / "jobs")], timeout=30).returncode == 0:
                    break


def _submit(stack: Stack, inputs: dict[str, Path]) -> httpx.Response:
    with stack.client() as client:
        return client.post(
            "/v1/jobs", files=multipart_files(inputs), data={"options": json.dumps(FAST)}
        )


def _error(response: httpx.Response, status: int, error: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error and body["message"], body
    return body


# --------------------------------------------------------------------------- Redis restart


def test_jobs_queued_across_a_redis_restart_all_succeed(
    stack: Stack, inputs: dict[str, Path]
) -> None:
    queued = []
    for _ in range(2):  # no worker yet: the messages wait in Redis
        response = _submit(stack, inputs)
        assert response.status_code == 202, response.text
        queued.append(response.json()["id"])
    with contextlib.closing(stack.redis.client()) as client:
        assert client.llen(QUEUE) == 2

    stack.redis.shutdown()
    with stack.client() as client:
        # While Redis is down the API says so, promptly and in JSON, and refuses new jobs.
        started = time.monotonic()
        ready = client.get("/readyz")
        _error(ready, 503, "not_ready")
        assert "broker unreachable" in ready.json()["message"]
        refused = _submit(stack, inputs)
        body = _error(refused, 503, "unavailable")
        assert "queue is unavailable" in body["message"]
        assert time.monotonic() - started < 30
        for job_id in queued:  # records are not in Redis: still served
            assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "queued"
    assert set(os.listdir(stack.jobs_dir)) >= set(queued)

    stack.redis.start()
    with contextlib.closing(stack.redis.client()) as client:
        assert client.llen(QUEUE) == 2, "Redis lost queued jobs across its restart"
    with stack.client() as client:
        wait_until(lambda: client.get("/readyz").status_code == 200, 30, "the API to reconnect")
        # The API publishes again after the restart: a job sent now is queued (then cancelled,
        # so the worker only has to skip it).
        late = _submit(stack, inputs)
        assert late.status_code == 202, late.text
        cancelled = client.delete(f"/v1/jobs/{late.json()['id']}")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"

        stack.ensure_worker()
        for job_id in queued:
            body = poll_job(client, job_id, final, timeout=240, interval=0.5)
            assert body["state"] == "succeeded", (body, stack.worker and stack.worker.tail())
            assert body["attempts"] == 1
    stack.done["redis"] = ",".join(queued)


# --------------------------------------------------------------------------- API restart


def _snapshot(client: httpx.Client, job_id: str) -> dict[str, Any]:
    model = client.get(f"/v1/jobs/{job_id}/model")
    assert model.status_code == 200, model.text
    return {
        "job": client.get(f"/v1/jobs/{job_id}").json(),
        "report": client.get(f"/v1/jobs/{job_id}/report").content,
        "html": client.get(f"/v1/jobs/{job_id}/report.html").content,
        "etag": model.headers["etag"],
        "sha256": hashlib.sha256(model.content).hexdigest(),
    }


def test_records_reports_and_models_survive_an_api_restart(stack: Stack) -> None:
    job_ids = stack.done.get("redis", "").split(",")
    if not all(job_ids):
        pytest.skip("needs the jobs of the Redis restart test")
    with stack.client() as client:
        before = {job_id: _snapshot(client, job_id) for job_id in job_ids}
    stack.restart_api()
    with stack.client() as client:
        for job_id in job_ids:
            after = _snapshot(client, job_id)
            assert after == before[job_id]
            assert after["etag"] == f'"{after["sha256"]}"'
            report = json.loads(after["report"])
            assert report["output_model"]["sha256"] == after["sha256"]
            unchanged = client.get(
                f"/v1/jobs/{job_id}/model", headers={"If-None-Match": after["etag"]}
            )
            assert unchanged.status_code == 304
        listed = {
            item["id"] for item in client.get("/v1/jobs", params={"limit": 100}).json()["items"]
        }
        assert set(job_ids) <= listed


# --------------------------------------------------------------------------- storage faults


@contextlib.contextmanager
def _disk_full(stack: Stack) -> Iterator[str]:
    """Fill the job store's tmpfs to the last byte; free it afterwards."""
    filler = stack.jobs_dir / ".filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        size = 1024**2
        while size:  # unbuffered, shrinking writes: nothing is left pending in a buffer
            try:
                if os.write(fd, bytes(size)) < size:
                    size //= 4
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                size //= 4
    finally:
        os.close(fd)
    try:
        yield "No space left on device"
    finally:
        filler.unlink()


@contextlib.contextmanager
def _unwritable(stack: Stack, job_id: str) -> Iterator[str]:
    """Make the job store refuse writes, by the strongest means this process has."""
    if stack.mounted:
        _remount(stack.jobs_dir, "ro")
        try:
            yield "Read-only file system"
        finally:
            _remount(stack.jobs_dir, "rw")
    elif os.geteuid() != 0:
        folders = (stack.jobs_dir / job_id, stack.jobs_dir)
        for folder in folders:
            folder.chmod(0o555)
        try:
            yield "Permission denied"
        finally:
            for folder in folders:
                folder.chmod(0o755)
    else:  # root without mounts: chmod blocks nothing; squat on the last result's name
        squatter = stack.jobs_dir / job_id / "report.png"
        squatter.mkdir()
        (squatter / "keep").touch()
        try:
            yield "Is a directory"
        finally:
            shutil.rmtree(squatter)


@pytest.mark.parametrize("fault", ["disk_full", "unwritable"])
def test_storage_fault_fails_the_job_cleanly_and_serves_no_partial_model(
    stack: Stack, inputs: dict[str, Path], fault: str
) -> None:
    if fault == "disk_full" and not stack.mounted:
        pytest.skip("filling a disk needs a small tmpfs, and mounting one needs root")
    stack.ensure_worker()
    response = _submit(stack, inputs)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    squatting = fault == "unwritable" and not stack.mounted and os.geteuid() == 0
    fault_on = _disk_full(stack) if fault == "disk_full" else _unwritable(stack, job_id)
    with fault_on as reason, stack.client() as client:
        # While it lasts, readiness says so and uploads get a 503 that says why, not a 500.
        if not squatting:
            ready = client.get("/readyz")
            assert ready.status_code == 503 and "storage not writable" in ready.text, ready.text
            before = set(os.listdir(stack.jobs_dir))
            body = _error(_submit(stack, inputs), 503, "storage_unavailable")
            assert reason in body["message"], body
            assert set(os.listdir(stack.jobs_dir)) == before
        job = poll_job(client, job_id, final, timeout=240, interval=0.5)
        assert job["state"] == "failed", job
        message = job["error"]["message"]
        assert "could not store" in message and reason in message, job["error"]
        assert "Traceback" not in message and "\n" not in message
        for path in ("/model", "/report", "/report.html"):
            _error(client.get(f"/v1/jobs/{job_id}{path}"), 409, "not_succeeded")
        left = sorted(os.listdir(stack.jobs_dir / job_id))
        assert not [name for name in left if name.endswith(".part")], left
        if not squatting:  # the model was the first result to fail
            assert "sanitized.keras" not in left, left
    record = read_record(stack.artifacts, job_id)
    assert "sanitized.keras" not in record["artifacts"]
    with stack.client() as client:
        assert client.get("/readyz").status_code == 200
    stack.done[f"storage-{fault}"] = job_id


# --------------------------------------------------------------------------- retention


def _age(record: dict[str, Any]) -> float:
    finished = datetime.fromisoformat(record["finished_at"])
    return (datetime.now(UTC) - finished).total_seconds()


def test_expired_jobs_lose_their_files_and_answer_410(stack: Stack) -> None:
    job_ids = [i for ids in stack.done.values() for i in ids.split(",") if i]
    if not job_ids:
        pytest.skip("needs the jobs of the earlier tests")
    worker = stack.ensure_worker()
    oldest = max(job_ids, key=lambda i: _age(read_record(stack.artifacts, i)))
    wait_until(
        lambda: _age(read_record(stack.artifacts, oldest)) > RETENTION_S + 5,
        RETENTION_S + 10,
        "the oldest job to expire",
        interval=1,
    )
    ages = {i: _age(read_record(stack.artifacts, i)) for i in job_ids}
    # The purge is the worker's own task (the beat schedule sends it hourly); send it now.
    app = make_celery(Settings(redis_url=stack.redis.url, artifacts_dir=stack.artifacts))
    purged = app.send_task(PURGE_TASK, queue=QUEUE).get(timeout=120)
    assert purged >= 1, worker.tail()
    expired = [i for i, age in ages.items() if age > RETENTION_S + 2]
    assert oldest in expired
    with stack.client() as client:
        for job_id in job_ids:
            body = client.get(f"/v1/jobs/{job_id}").json()
            if job_id in expired:
                assert body["artifacts_deleted"] is True, body
                assert not (stack.jobs_dir / job_id).exists()
                for path in ("/model", "/report", "/report.png"):
                    gone = client.get(f"/v1/jobs/{job_id}{path}")
                    if body["state"] == "succeeded":
                        _error(gone, 410, "gone")
                    else:
                        assert gone.status_code in (404, 409, 410), gone.text
            elif ages[job_id] < RETENTION_S - 10:  # clearly not expired yet: untouched
                assert body["artifacts_deleted"] is False, body
                assert (stack.jobs_dir / job_id).exists()


def test_results_are_published_all_or_none(tmp_path: Path) -> None:
    """A store that fails on the second result leaves neither it nor the first behind."""
    from jobs import lifecycle
    from jobs.records import JobRecord, RecordStore, new_job_id, now
    from jobs.storage import LocalArtifactStore, StorageError
    from schemas.jobs import JobState, JobSummary
    from schemas.options import SanitizeOptions

    class FailsOnReport(LocalArtifactStore):
        def put_file(self, job_id: str, name: str, path: Path):
            if name == "report.json":
                raise StorageError(name, OSError(28, "No space left on device"))
            return super().put_file(job_id, name, path)

    records, store = RecordStore.sqlite(tmp_path / "state"), FailsOnReport(tmp_path / "jobs")
    job_id = new_job_id()
    records.insert(
        JobRecord(
            id=job_id,
            owner="open",
            created_at=now(),
            updated_at=now(),
            options=SanitizeOptions(),
            queue="fineprune",
            payload_hash="x",
        )
    )
    records.update(job_id, lambda r: r.transition(JobState.running) or True)
    out = tmp_path / "out"
    out.mkdir()
    for name in lifecycle.OUTPUT_NAMES:
        (out / name).write_bytes(b"result")
    summary = JobSummary.model_construct()
    with pytest.raises(StorageError, match="No space left"):
        lifecycle.publish_success(records, store, job_id, out, summary, {})
    assert not store.exists(job_id, "sanitized.keras")
    assert records.get(job_id).state == JobState.running


def test_a_worker_killed_mid_sweep_blocks_restores_for_seconds_not_minutes() -> None:
    """kombu holds a lock while it restores abandoned messages; a worker killed holding it
    leaves it to expire (kombu's default 300 s, longer than this suite waits for a lost job
    to come back: tests/test_service.py::test_job_survives_its_worker_being_killed)."""
    from jobs.queue import celery_config

    settings = Settings(redis_url="redis://127.0.0.1:6379/9", unacked_restore_interval=1)
    transport = celery_config(settings)["broker_transport_options"]
    assert transport["unacked_mutex_expire"] == 10
    assert transport["unacked_mutex_expire"] < settings.visibility_timeout
    app = make_celery(settings)
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        assert channel.unacked_mutex_expire == 10  # what kombu will use, not just what we pass
