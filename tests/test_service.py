"""The REST service end to end, against real parts: Redis, PostgreSQL, uvicorn, Celery workers.

One API and one worker serve the module (Redis DB 9, flushed before and after; records in a
PostgreSQL schema of the module's own); the worker-loss test kills that worker's whole process
group mid-job and starts another; the embedded-mode tests run their own API and worker on the
SQLite broker and SQLite records. The record store's units run on both databases. Models are
tiny and jobs run two epochs, so the whole module stays within a few minutes on two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import keras
import numpy as np
import pytest
from factories import residual_block, save_npz, textures, train_backdoored, trigger_set
from hostile_models import save_lambda_model
from service_helpers import (
    API_KEY,
    CALLBACK_SECRET,
    OTHER_KEY,
    ROOT,
    CallbackReceiver,
    Observed,
    Proc,
    final,
    free_port,
    loaded_libraries,
    multipart_files,
    owned_redis_db,
    poll_job,
    postgres_schema,
    raw_request,
    read_record,
    service_env,
    start_api,
    start_worker,
    wait_api,
    wait_until,
    wait_worker,
)

from jobs import lifecycle
from jobs.callbacks import verify
from jobs.database import create_schema, make_engine
from jobs.migration import import_file_records
from jobs.records import (
    IdempotencyEntry,
    JobRecord,
    RecordStore,
    now,
    open_records,
    to_resource,
)
from jobs.recovery import recover_lost_jobs
from jobs.retention import purge_expired
from jobs.settings import Settings
from jobs.storage import LocalArtifactStore
from schemas.jobs import JobResource, JobState
from schemas.options import SanitizeOptions
from schemas.report import SanitizeReport

REDIS_URL = "redis://127.0.0.1:6379/9"
MiB = 1024**2
# Short limits so a killed worker's job comes back within about a minute. Every job starts a
# fresh process that imports TensorFlow (5 s idle, up to 15 s on a loaded machine), so the soft
# limit leaves room for that. The visibility timeout must exceed the hard limit (Settings
# refuses otherwise).
LIMITS = {
    "task_soft_time_limit": 60,
    "task_time_limit": 65,
    "visibility_timeout": 70,
    "unacked_restore_interval": 1,
    "progress_interval": 0.2,
    "heartbeat_interval": 1,
    "stale_after": 5,
    "max_model_bytes": 1 * MiB,
    "max_data_bytes": 1 * MiB,
}
FAST = {"epochs": 2}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("service-inputs")
    train_backdoored(seed=0).save(root / "model.keras")
    residual_block().save(root / "pooled.keras")  # its recipe runs every epoch: a long job
    x, y = textures(240, seed=100)
    xt, yt = trigger_set(100, seed=200)
    save_lambda_model(root / "lambda.keras", root / "marker")
    (root / "not_a_model.keras").write_bytes(b"this is not a model, just text\n" * 10)
    big = np.random.default_rng(0).random((400, 16, 16, 3)).astype(np.float32)  # 1.2 MiB
    return {
        "model": root / "model.keras",
        "pooled": root / "pooled.keras",
        "clean": save_npz(root / "clean.npz", x=x, y=y),
        "clean2": save_npz(root / "clean2.npz", x=x[:200], y=y[:200]),
        "trigger": save_npz(root / "trigger.npz", x=xt, y_target=yt),
        "lambda": root / "lambda.keras",
        "not_a_model": root / "not_a_model.keras",
        "bad_shape": save_npz(root / "bad_shape.npz", x=x[:, :8], y=y),
        "bad_groups": save_npz(root / "bad_groups.npz", x=x, y=y, groups=np.zeros(239, int)),
        "no_target": save_npz(root / "no_target.npz", x=xt),
        "big": save_npz(root / "big.npz", x=big, y=np.arange(400) % 4),
    }


@dataclass
class Stack:
    """A running API and worker, and how to talk to them."""

    base_url: str
    port: int
    artifacts: Path
    env: dict[str, str]
    logs: Path
    api: Proc
    worker: Proc
    database_url: str
    spare: list[Proc] = field(default_factory=list)

    def record(self, job_id: str) -> dict[str, Any]:
        return read_record(self.artifacts, job_id, self.database_url)

    def client(self, key: str | None = API_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60.0)

    def submit(
        self,
        client: httpx.Client,
        parts: dict[str, Path],
        options: dict[str, Any] | None = None,
        **extra: Any,
    ) -> httpx.Response:
        data = {"options": json.dumps(options)} if options is not None else {}
        data.update({k: str(v) for k, v in extra.pop("fields", {}).items()})
        return client.post("/v1/jobs", files=multipart_files(parts), data=data, **extra)

    def job_dirs(self) -> set[str]:
        jobs = self.artifacts / "jobs"
        if not jobs.exists():
            return set()
        return {p.name for p in jobs.iterdir() if not p.name.startswith(".")}


@pytest.fixture(scope="module")
def redis_db() -> Iterator[None]:
    with owned_redis_db(REDIS_URL):  # DB 9
        yield


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with postgres_schema() as url:
        yield url


@pytest.fixture(scope="module")
def stack(redis_db: None, pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("service-redis")
    artifacts, logs = root / "artifacts", root / "logs"
    logs.mkdir()
    env = service_env(
        artifacts,
        REDIS_URL,
        api_keys=f"{API_KEY},{OTHER_KEY}",
        callback_secret=CALLBACK_SECRET,
        callback_allow_private="true",
        database_url=pg_url,
        mlflow_tracking_uri=(root / "mlruns").as_uri(),
        **LIMITS,
    )
    port = free_port()
    api = start_api(env, port, logs / "api.log")
    worker = start_worker(env, logs / "worker-1.log", "worker1")
    running = Stack(f"http://127.0.0.1:{port}", port, artifacts, env, logs, api, worker, pg_url)
    try:
        wait_api(running.base_url, api)
        wait_worker(worker)
        yield running
    finally:
        for proc in (running.worker, *running.spare, api):
            proc.stop()


@dataclass
class DoneJob:
    id: str
    observed: Observed
    callbacks: CallbackReceiver


@pytest.fixture(scope="module")
def done_job(stack: Stack, files: dict[str, Path]) -> DoneJob:
    """A backdoored model sanitized through the service, with a callback that fails once."""
    receiver = CallbackReceiver(fail_first=1)
    with receiver.running(), stack.client() as client:
        response = stack.submit(
            client,
            {"model": files["model"], "data": files["clean"], "trigger_data": files["trigger"]},
            FAST,
            fields={"callback_url": receiver.url},
        )
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        assert response.headers["location"] == f"/v1/jobs/{job_id}"
        observed = Observed()
        poll_job(client, job_id, final, timeout=120, observed=observed, interval=0.1)
        wait_until(lambda: len(receiver.received) >= 2, 30, "the callback to be retried")
    return DoneJob(job_id, observed, receiver)


# --------------------------------------------------------------------------- the happy path


def test_a_finished_job_carries_its_verdict_and_is_logged_to_mlflow(
    stack: Stack, done_job: DoneJob
) -> None:
    mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    with stack.client() as client:
        job = client.get(f"/v1/jobs/{done_job.id}").json()
        report = client.get(f"/v1/jobs/{done_job.id}/report").json()
    summary = job["summary"]
    assert summary["conclusion"] == report["verdict"]["conclusion"]
    assert summary["suspect"] == report["verdict"]["before"]["suspect"] == 0
    uri = stack.env["FINEPRUNE_MLFLOW_TRACKING_URI"]
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    tracking = mlflow.MlflowClient(tracking_uri=uri)
    experiment = tracking.get_experiment_by_name("fineprune")
    runs = tracking.search_runs(
        [experiment.experiment_id], f"tags.mlflow.runName = '{done_job.id}'"
    )
    assert len(runs) == 1
    assert runs[0].data.params["verdict"] == summary["conclusion"]
    assert {a.path for a in tracking.list_artifacts(runs[0].info.run_id)} >= {"report.json"}


def test_api_and_worker_main_process_never_import_tensorflow(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "import service.main\n"
        "client = TestClient(service.main.app)\n"
        "assert client.get('/healthz').status_code == 200\n"
        "assert client.get('/openapi.json').status_code == 200\n"
        "assert client.get('/v1/jobs').status_code == 200\n"
        "import workers.app, workers.tasks  # the worker's main process, before forking\n"
        "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))\n"
    )
    env = service_env(tmp_path / "artifacts", None)
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_submit_poll_and_download(stack: Stack, done_job: DoneJob, tmp_path: Path) -> None:
    import keras

    with stack.client() as client:
        body = client.get(f"/v1/jobs/{done_job.id}").json()
        assert body["state"] == "succeeded", body
        JobResource.model_validate(body)
        assert body["attempts"] == 1 and body["error"] is None
        assert body["progress"] == {"stage": "report", "percent": 100.0}
        summary = body["summary"]
        assert summary["parameters_after"] < summary["parameters_before"]
        assert summary["attack_success_before"] is not None
        assert {i["role"] for i in body["inputs"]} == {"model", "data", "trigger_data"}

        # Progress was visible while it ran, stage by stage and monotonic.
        running = [s for s in done_job.observed.snapshots if s[0] == "running" and s[1]]
        assert running, done_job.observed.snapshots
        percents = [p for _, _, p in running]
        assert percents == sorted(percents) and any(0 < p < 100 for p in percents)

        model = client.get(f"/v1/jobs/{done_job.id}/model")
        assert model.status_code == 200
        assert model.headers["content-disposition"].startswith("attachment; filename=")
        etag = model.headers["etag"]
        path = tmp_path / "sanitized.keras"
        path.write_bytes(model.content)
        sanitized = keras.models.load_model(path)
        x, _ = textures(8, seed=7)
        assert sanitized.predict(x, verbose=0).shape == (8, 4)
        again = client.get(f"/v1/jobs/{done_job.id}/model", headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.headers["etag"] == etag

        report = client.get(f"/v1/jobs/{done_job.id}/report")
        assert report.status_code == 200
        parsed = SanitizeReport.model_validate_json(report.content)
        assert f'"{parsed.output_model.sha256}"' == etag
        html = client.get(f"/v1/jobs/{done_job.id}/report.html")
        assert html.headers["content-type"].startswith("text/html") and "<html" in html.text
        assert "default-src 'none'" in html.headers["content-security-policy"]
        png = client.get(f"/v1/jobs/{done_job.id}/report.png")
        assert png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"

        page = client.get("/v1/jobs", params={"limit": 100}).json()
        assert done_job.id in [item["id"] for item in page["items"]]

        metrics = client.get("/metrics").text
        assert 'fineprune_jobs{state="succeeded"}' in metrics
        assert 'fineprune_stage_duration_seconds_count{stage="fine-tune"}' in metrics
        assert "fineprune_queue_depth" in metrics

    # The API process served all that without loading TensorFlow.
    assert "tensorflow" not in loaded_libraries(stack.api.popen.pid)


def test_callback_is_signed_and_retried(stack: Stack, done_job: DoneJob) -> None:
    receiver = done_job.callbacks
    assert receiver.answers[:2] == [503, 204]
    headers, body = receiver.received[1]
    assert verify(CALLBACK_SECRET, body, headers["X-Fineprune-Signature"])
    assert not verify("another secret", body, headers["X-Fineprune-Signature"])
    sent = json.loads(body)
    assert sent["id"] == done_job.id and sent["state"] == "succeeded"
    record = stack.record(done_job.id)
    assert record["callback"]["attempts"] == 2 and record["callback"]["delivered_at"]


# --------------------------------------------------------------------------- refusals


def test_bad_uploads_are_refused_at_once(stack: Stack, files: dict[str, Path]) -> None:
    good = {"model": files["model"], "data": files["clean"]}
    before = stack.job_dirs()

    def refused(parts: dict[str, Path], status: int, options: dict | None = None) -> dict:
        with stack.client() as client:
            response = stack.submit(client, parts, options)
        assert response.status_code == status, response.text
        body = response.json()
        assert body["error"] and body["message"], body
        return body

    body = refused({**good, "model": files["lambda"]}, 422)
    assert body["error"] == "unsafe_model" and "'lambda_1' is a Lambda layer" in body["message"]
    assert body["detail"][0]["loc"] == ["body", "model"]

    body = refused({**good, "data": files["bad_shape"]}, 422)
    assert body["error"] == "invalid_data" and "shape" in body["message"]
    assert body["detail"][0]["loc"] == ["body", "data"]

    body = refused({**good, "data": files["bad_groups"]}, 422)
    assert body["error"] == "invalid_data" and "groups have shape (239,)" in body["message"]

    body = refused({**good, "model": files["not_a_model"]}, 422)
    assert body["error"] == "invalid_model"

    body = refused({"model": files["model"]}, 422)
    assert body["error"] == "missing_field" and "'data'" in body["message"]

    body = refused({**good, "trigger_data": files["no_target"]}, 422)
    assert "y_target" in body["message"] and body["detail"][0]["loc"] == ["body", "trigger_data"]

    body = refused(good, 422, {"epochs": -1})
    assert body["detail"][0]["loc"] == ["body", "options", "epochs"]

    body = refused({**good, "data": files["big"]}, 413)  # over the 1 MiB part cap, streamed
    assert "'data'" in body["message"]

    # A declared Content-Length over the whole-request cap is refused before the body is read.
    status, text = raw_request(
        stack.port,
        f"POST /v1/jobs HTTP/1.1\nHost: x\nAuthorization: Bearer {API_KEY}\n"
        "Content-Type: multipart/form-data; boundary=b\nContent-Length: 99999999999\n\n",
    )
    assert status == 413 and json.loads(text)["error"] == "too_large"

    with stack.client() as client:
        not_multipart = client.post("/v1/jobs", json={"model": "x"})
        assert not_multipart.status_code == 415 and not_multipart.json()["error"]
        unknown = client.post("/v1/jobs", files=multipart_files({**good, "extra": files["clean"]}))
        assert unknown.status_code == 422 and "extra" in unknown.json()["message"]
        nested = client.post(
            "/v1/jobs", files=multipart_files(good), data={"options": "[" * 60_000}
        )
        assert nested.status_code == 422 and nested.json()["detail"][0]["loc"][-1] == "options"
        garbage = client.post(
            "/v1/jobs",
            content=b"--b\r\nnot a header line\r\n" * 50,
            headers={"Content-Type": "multipart/form-data; boundary=b"},
        )
        assert garbage.status_code == 400 and garbage.json()["error"] == "bad_request"
        assert client.get("/v1/jobs", params={"cursor": "nonsense"}).status_code == 422
        assert client.get("/v1/jobs", params={"limit": 0}).json()["error"] == "validation_error"

    # Nothing of the refused uploads was kept.
    assert stack.job_dirs() == before


def test_jobs_are_private_to_their_key(stack: Stack, done_job: DoneJob) -> None:
    with stack.client(OTHER_KEY) as other:
        for path in ("", "/report", "/report.html", "/report.png", "/model"):
            response = other.get(f"/v1/jobs/{done_job.id}{path}")
            assert response.status_code == 404, path
            assert response.json()["error"] == "not_found"
        assert other.delete(f"/v1/jobs/{done_job.id}").status_code == 404
        ids = [item["id"] for item in other.get("/v1/jobs").json()["items"]]
        assert done_job.id not in ids
    with stack.client(None) as anonymous:
        response = anonymous.get(f"/v1/jobs/{done_job.id}")
        assert response.status_code == 401 and response.json()["error"] == "unauthorized"
        assert anonymous.post("/v1/jobs").status_code == 401
    with stack.client("wrong-key") as wrong:
        assert wrong.get("/v1/jobs").status_code == 401


def test_results_of_an_unfinished_job_are_409(stack: Stack, files: dict[str, Path]) -> None:
    with stack.client() as client:
        response = stack.submit(client, {"model": files["model"], "data": files["clean"]}, FAST)
        job_id = response.json()["id"]
        conflict = client.get(f"/v1/jobs/{job_id}/model")
        assert conflict.status_code == 409 and conflict.json()["error"] == "not_succeeded"
        client.delete(f"/v1/jobs/{job_id}")
        poll_job(client, job_id, final, timeout=120)


# --------------------------------------------------------------------------- idempotency, cancel


def test_idempotency_key(stack: Stack, files: dict[str, Path]) -> None:
    parts = {"model": files["model"], "data": files["clean"]}
    headers = {"Idempotency-Key": "submit-42"}
    with stack.client() as client:
        first = stack.submit(client, parts, FAST, headers=headers)
        assert first.status_code == 202, first.text
        job_id = first.json()["id"]
        replay = stack.submit(client, parts, FAST, headers=headers)
        assert replay.status_code == 200 and replay.json()["id"] == job_id
        assert replay.headers["location"] == f"/v1/jobs/{job_id}"
        other_options = stack.submit(client, parts, {**FAST, "seed": 1}, headers=headers)
        assert other_options.status_code == 422
        assert other_options.json()["error"] == "idempotency_mismatch"
        other_data = stack.submit(client, {**parts, "data": files["clean2"]}, FAST, headers=headers)
        assert other_data.status_code == 422
        # The same key from another caller is another key.
        with stack.client(OTHER_KEY) as other:
            theirs = stack.submit(other, parts, FAST, headers=headers)
            assert theirs.status_code == 202 and theirs.json()["id"] != job_id
            other.delete(f"/v1/jobs/{theirs.json()['id']}")
        client.delete(f"/v1/jobs/{job_id}")
        poll_job(client, job_id, final, timeout=120)
    assert job_id not in stack.job_dirs()


def test_cancel_a_running_job(stack: Stack, files: dict[str, Path]) -> None:
    with stack.client() as client:
        response = stack.submit(
            client, {"model": files["pooled"], "data": files["clean"]}, {"epochs": 400}
        )
        job_id = response.json()["id"]
        poll_job(client, job_id, lambda b: b["progress"]["stage"] == "fine-tune" or final(b), 60)
        cancel = client.delete(f"/v1/jobs/{job_id}")
        assert cancel.status_code == 202, cancel.text
        assert cancel.json()["cancel_requested"] is True
        body = poll_job(client, job_id, final, timeout=60)
        assert body["state"] == "cancelled" and body["artifacts_deleted"] is True
        assert client.get(f"/v1/jobs/{job_id}/model").status_code == 409
        # Deleting again is harmless.
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 200
    assert job_id not in stack.job_dirs()
    record = stack.record(job_id)
    assert [e["state"] for e in record["events"]] == ["queued", "running", "cancelled"]


# --------------------------------------------------------------------------- worker loss


def test_job_survives_its_worker_being_killed(stack: Stack, files: dict[str, Path]) -> None:
    with stack.client() as client:
        response = stack.submit(
            client,
            {"model": files["model"], "data": files["clean"]},
            {"epochs": 6, "seed": 5},
        )
        job_id = response.json()["id"]
        poll_job(client, job_id, lambda b: b["state"] == "running" and b["progress"]["stage"], 60)

        stack.worker.kill_group()  # the machine is gone: main process and pool child at once
        stack.worker.popen.wait(10)
        assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "running"

        replacement = start_worker(stack.env, stack.logs / "worker-2.log", "worker2")
        stack.spare.append(stack.worker)
        stack.worker = replacement
        wait_worker(replacement)
        body = poll_job(client, job_id, final, timeout=220, interval=0.5)
        assert body["state"] == "succeeded", (body, replacement.tail())
        assert body["attempts"] == 2

        record = stack.record(job_id)
        states = [(e["state"], e["attempt"]) for e in record["events"]]
        assert states == [("queued", 0), ("running", 1), ("running", 2), ("succeeded", 2)]

        # Deleting a finished job keeps its record and removes its files.
        deleted = client.delete(f"/v1/jobs/{job_id}")
        assert deleted.status_code == 200 and deleted.json()["state"] == "succeeded"
        assert deleted.json()["artifacts_deleted"] is True
        assert client.get(f"/v1/jobs/{job_id}/model").status_code == 410
    assert job_id not in stack.job_dirs()


# --------------------------------------------------------------------------- embedded mode


def test_embedded_mode_runs_jobs_without_redis(files: dict[str, Path], tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    env = service_env(artifacts, None, **LIMITS)  # no REDIS_URL, no keys: open mode
    port = free_port()
    api = start_api(env, port, tmp_path / "api.log")
    worker = start_worker(env, tmp_path / "worker.log", "embedded")
    try:
        wait_api(f"http://127.0.0.1:{port}", api)
        wait_worker(worker)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60.0) as client:
            response = client.post(
                "/v1/jobs",
                files=multipart_files({"model": files["model"], "data": files["clean"]}),
                data={"options": json.dumps(FAST)},
            )
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            body = poll_job(client, job_id, final, timeout=120, interval=0.5)
            assert body["state"] == "succeeded", (body, worker.tail())
            assert client.get(f"/v1/jobs/{job_id}/model").status_code == 200
            assert client.get("/readyz").status_code == 200
        assert (artifacts / "state" / "broker.sqlite").exists()
    finally:
        worker.stop()
        api.stop()


def test_embedded_mode_recovers_a_job_whose_worker_died(
    files: dict[str, Path], tmp_path: Path
) -> None:
    """The SQLite broker never gives a taken message back: the records' heartbeat does."""
    artifacts = tmp_path / "artifacts"
    env = service_env(artifacts, None, **LIMITS)
    port = free_port()
    api = start_api(env, port, tmp_path / "api.log")
    workers = [start_worker(env, tmp_path / "worker-1.log", "embedded1")]
    try:
        wait_api(f"http://127.0.0.1:{port}", api)
        wait_worker(workers[0])
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60.0) as client:
            response = client.post(
                "/v1/jobs",
                files=multipart_files({"model": files["model"], "data": files["clean"]}),
                data={"options": json.dumps({"epochs": 6, "seed": 5})},
            )
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            poll_job(client, job_id, _running_a_stage, 60)
            workers[0].kill_group()  # the machine is gone: main process and pool child at once
            workers[0].popen.wait(10)

            # Nothing will ever run it again on its own: the broker marked the message taken.
            wait_until(
                lambda: lifecycle.seconds_since_heartbeat(_read(artifacts, job_id)) > 5,
                30,
                "the dead worker's heartbeat to go stale",
            )
            assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "running"

            workers.append(start_worker(env, tmp_path / "worker-2.log", "embedded2"))
            body = poll_job(client, job_id, final, timeout=220, interval=0.5)
            assert body["state"] == "succeeded", (body, workers[1].tail())
            assert body["attempts"] == 2
        notes = [e.note or "" for e in _read(artifacts, job_id).events]
        assert any(note.startswith("worker lost (no heartbeat") for note in notes), notes
    finally:
        for worker in workers:
            worker.stop()
        api.stop()


def _running_a_stage(body: dict[str, Any]) -> bool:
    return body["state"] == "running" and bool(body["progress"]["stage"])


def _read(artifacts: Path, job_id: str) -> JobRecord:
    return JobRecord.model_validate(read_record(artifacts, job_id))


# --------------------------------------------------------------------------- in-process units


@pytest.fixture(params=["sqlite", "postgresql"])
def records(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RecordStore]:
    """The record store on each database the service supports."""
    if request.param == "sqlite":
        store = RecordStore.sqlite(tmp_path / "state")
        yield store
        store.engine.dispose()
        return
    with postgres_schema() as url:
        engine = make_engine(url)
        create_schema(engine)
        yield RecordStore(engine)
        engine.dispose()


def _record(
    store: RecordStore,
    state: JobState = JobState.queued,
    owner: str = "open",
    created: datetime | None = None,
) -> JobRecord:
    created = created or now()
    record = JobRecord(
        id=os.urandom(16).hex(),
        owner=owner,
        created_at=created,
        updated_at=created,
        options=SanitizeOptions(),
        queue="fineprune",
        payload_hash="x",
        state=state,
    )
    store.insert(record)
    return record


def test_a_job_that_keeps_killing_workers_is_failed(records: RecordStore, tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "jobs")
    job = _record(records)
    for attempt in (1, 2, 3):
        started = lifecycle.begin_attempt(records, store, job.id, max_attempts=3)
        assert started is not None and started.attempts == attempt
    assert lifecycle.begin_attempt(records, store, job.id, max_attempts=3) is None
    failed = records.get(job.id)
    assert failed is not None and failed.state == JobState.failed
    assert failed.error is not None and failed.error.kind == "worker_lost"
    assert "stopped its worker 3 times" in failed.error.message
    # A final job is never run again.
    assert lifecycle.begin_attempt(records, store, job.id, max_attempts=9) is None


def test_a_live_job_is_not_started_twice_and_a_dead_one_is(
    records: RecordStore, tmp_path: Path
) -> None:
    store = LocalArtifactStore(tmp_path / "jobs")
    job = _record(records)
    assert lifecycle.begin_attempt(records, store, job.id, 3, stale_after=60) is not None
    with pytest.raises(lifecycle.StillRunning) as busy:
        lifecycle.begin_attempt(records, store, job.id, 3, stale_after=60)
    assert 0 < busy.value.wait <= 60
    _age_heartbeat(records, job.id, seconds=61)
    again = lifecycle.begin_attempt(records, store, job.id, 3, stale_after=60)
    assert again is not None and again.attempts == 2


def _age_heartbeat(records: RecordStore, job_id: str, seconds: float) -> None:
    def age(r: JobRecord) -> bool:
        r.heartbeat_at = now() - timedelta(seconds=seconds)
        return True

    records.update(job_id, age)


def test_recovery_sends_lost_jobs_once_and_leaves_live_ones(
    records: RecordStore, tmp_path: Path
) -> None:
    store = LocalArtifactStore(tmp_path / "jobs")
    unsent = _record(records)  # the API stopped between the record and the message
    sent = _record(records)
    records.update(sent.id, lambda r: setattr(r, "sent_at", now()) or True)
    dead, live = _record(records), _record(records)
    for job in (dead, live):
        lifecycle.begin_attempt(records, store, job.id, 3)
    _age_heartbeat(records, dead.id, seconds=300)
    sends: list[tuple[str, str]] = []

    def sweep(at: datetime, redelivers: bool = False) -> list[str]:
        found = recover_lost_jobs(
            records,
            lambda job_id, queue: sends.append((job_id, queue)),
            stale_after=120,
            unsent_after=60,
            redelivers=redelivers,
            at=at,
        )
        return sorted(r.job_id for r in found)

    assert sweep(now()) == [dead.id]  # the unsent one is young yet
    assert sweep(now() + timedelta(seconds=61)) == [unsent.id]  # the dead one was just resent
    assert sends == [(dead.id, "fineprune"), (unsent.id, "fineprune")]
    unsent_after = records.get(unsent.id)
    assert unsent_after is not None and unsent_after.sent_at is not None
    lost = records.get(dead.id)
    assert lost is not None and lost.state == JobState.running and lost.resent_at is not None
    assert "no heartbeat from its worker for 300 s" in (lost.events[-1].note or "")
    # Redis hands a dead worker's job over by itself: only never-sent jobs are the sweep's.
    assert sweep(now() + timedelta(seconds=400), redelivers=True) == []
    assert sweep(now() + timedelta(seconds=400)) == sorted([dead.id, live.id])


def test_cancel_wins_over_late_worker_writes(records: RecordStore, tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "jobs")
    job = _record(records)
    assert lifecycle.begin_attempt(records, store, job.id, max_attempts=3) is not None
    record, done = lifecycle.request_cancel(records, store, job.id)
    assert not done and record.state == JobState.running and records.cancel_requested(job.id)
    lifecycle.mark_cancelled(records, store, job.id)
    lifecycle.ProgressWriter(records, job.id, 0.0)("fine-tune", 0.5)  # a late write
    assert lifecycle.fail(records, job.id, "internal", "late") is not None
    after = records.get(job.id)
    assert after is not None and after.state == JobState.cancelled and after.error is None


def test_retention_deletes_old_artifacts(records: RecordStore, tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "jobs")
    job = _record(records, JobState.succeeded)
    store.write(job.id, "report.json", [b"{}"])
    records.update(job.id, lambda r: setattr(r, "finished_at", now()) or True)
    assert purge_expired(records, store, days=7) == 0
    later = datetime.now(UTC) + timedelta(days=8)
    assert purge_expired(records, store, days=7, at=later) == 1
    assert not store.exists(job.id, "report.json")
    kept = records.get(job.id)
    assert kept is not None and kept.artifacts_deleted_at is not None


def test_listing_pages_newest_first_and_only_the_owners(records: RecordStore) -> None:
    mine, theirs = "a" * 64, "b" * 64
    start = now() - timedelta(hours=1)
    ids = [_record(records, owner=mine, created=start + timedelta(seconds=i)).id for i in range(25)]
    _record(records, owner=theirs)
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        items, cursor = records.list_owner(mine, cursor, 10)
        pages.append([r.id for r in items])
        if cursor is None:
            break
    assert [len(page) for page in pages] == [10, 10, 5]
    assert [i for page in pages for i in page] == ids[::-1]  # newest first, once, none of theirs
    assert records.list_owner(theirs, None, 10)[0][0].owner == theirs
    with pytest.raises(ValueError):
        records.list_owner(mine, "not-a-cursor", 10)


def test_state_counts_stage_histogram_and_expiry_come_from_queries(records: RecordStore) -> None:
    queued, running, done = _record(records), _record(records), _record(records)
    records.update(running.id, lambda r: r.transition(JobState.running) or True)

    def succeed(r: JobRecord) -> bool:
        r.timings = {"profile": 0.3, "fine-tune": 7.0}
        r.transition(JobState.succeeded)
        return True

    records.update(done.id, succeed)
    counts = records.count_by_state()
    assert counts == {JobState.queued: 1, JobState.running: 1, JobState.succeeded: 1}
    histogram = records.stage_histogram((0.5, 5.0, 60.0))
    assert histogram["profile"] == ([1, 1, 1], 1, 0.3)
    assert histogram["fine-tune"] == ([0, 0, 1], 1, 7.0)
    assert {r.id for r in records.in_states([JobState.queued, JobState.running])} == {
        queued.id,
        running.id,
    }
    assert [r.id for r in records.expired(now() + timedelta(days=1))] == [done.id]
    assert records.expired(now() - timedelta(days=1)) == []


def test_concurrent_updates_lose_no_write(records: RecordStore) -> None:
    job = _record(records)

    def bump(r: JobRecord) -> bool:
        r.attempts += 1
        return True

    def hammer() -> None:
        for _ in range(25):
            records.update(job.id, bump)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = records.get(job.id)
    assert after is not None and after.attempts == 100


def test_idempotency_keys_bind_once_per_owner(records: RecordStore) -> None:
    first, second = _record(records), _record(records)
    assert records.claim_idempotent("open", "k" * 64, IdempotencyEntry(first.id, "p1")) is None
    winner = records.claim_idempotent("open", "k" * 64, IdempotencyEntry(second.id, "p2"))
    assert winner == IdempotencyEntry(first.id, "p1")
    assert records.find_idempotent("open", "k" * 64) == winner
    assert records.find_idempotent("c" * 64, "k" * 64) is None  # another owner's key
    records.remove(first)  # the key now points at nothing: the next claim takes it
    assert records.find_idempotent("open", "k" * 64) is None
    assert records.claim_idempotent("open", "k" * 64, IdempotencyEntry(second.id, "p2")) is None


def test_json_records_of_an_older_artifacts_dir_are_imported_once(tmp_path: Path) -> None:
    state = tmp_path / "artifacts" / "state"
    old = [_legacy_record(state), _legacy_record(state)]
    (state / "cancel").mkdir(parents=True)
    (state / "cancel" / old[1].id).touch()
    idem = state / "idempotency" / "open" / f"{'k' * 64}.json"
    idem.parent.mkdir(parents=True)
    idem.write_text(json.dumps({"job_id": old[0].id, "payload_hash": "p"}))
    (state / "records" / "garbage.json").write_text("{")

    records = open_records(Settings(artifacts_dir=tmp_path / "artifacts"))
    for record in old:
        stored = records.get(record.id)
        assert stored is not None and stored.model_dump() == record.model_dump()
    assert records.cancel_requested(old[1].id) and not records.cancel_requested(old[0].id)
    assert records.find_idempotent("open", "k" * 64) == IdempotencyEntry(old[0].id, "p")
    assert [r.id for r in records.list_owner("open", None, 10)[0]] == [old[1].id, old[0].id]
    assert not (state / "records").exists() and (state / "records.imported").is_dir()
    assert import_file_records(records, state) == 0  # nothing left to import


def _legacy_record(state: Path) -> JobRecord:
    """A record file as the file store wrote it."""
    created = now() - timedelta(minutes=1) + timedelta(microseconds=len(list(state.glob("*/*"))))
    record = JobRecord(
        id=os.urandom(16).hex(),
        owner="open",
        created_at=created,
        updated_at=created,
        options=SanitizeOptions(epochs=3),
        queue="fineprune",
        payload_hash="x",
    )
    record.transition(JobState.queued)
    (state / "records").mkdir(parents=True, exist_ok=True)
    (state / "records" / f"{record.id}.json").write_text(record.model_dump_json())
    return record


def test_the_resource_built_without_validation_is_the_validated_one(
    records: RecordStore,
) -> None:
    job = _record(records)
    records.update(job.id, lambda r: r.transition(JobState.running) or True)
    record = records.get(job.id)
    assert record is not None
    built = to_resource(record).model_dump_json()
    assert JobResource.model_validate_json(built).model_dump_json() == built


def test_middleware_counts_routes_and_metrics_cache_the_snapshot(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from service.main import create_app

    settings = Settings(artifacts_dir=tmp_path / "artifacts")
    app = create_app(settings)
    with TestClient(app) as client:
        health = client.get("/healthz")
        assert health.headers["x-content-type-options"] == "nosniff"
        missing = client.get("/nowhere")
        assert missing.status_code == 404 and missing.headers["x-content-type-options"]
        first = client.get("/metrics").text
        assert 'fineprune_http_requests_total{method="GET",route="/healthz",status="200"}' in first
        assert 'route="unmatched",status="404"' in first
        assert 'fineprune_jobs{state="queued"} 0.0' in first
        assert "fineprune_queue_depth 0.0" in first
        _record(app.state.records)
        assert 'fineprune_jobs{state="queued"} 0.0' in client.get("/metrics").text  # cached
        collector = next(iter(app.state.registry._collector_to_names))
        collector._ttl = 0.0
        assert 'fineprune_jobs{state="queued"} 1.0' in client.get("/metrics").text


def test_settings_refuse_a_visibility_timeout_below_the_time_limit() -> None:
    with pytest.raises(ValueError, match="visibility_timeout"):
        Settings(task_soft_time_limit=10, task_time_limit=20, visibility_timeout=20)
    with pytest.raises(ValueError, match="stale_after"):
        Settings(heartbeat_interval=10, stale_after=20)
    settings = Settings(api_keys="a, b,,", redis_url=None)
    assert settings.api_keys == ["a", "b"] and not settings.is_open and settings.embedded


# --------------------------------------------------------------------------- the CLI client


def _fineprune(stack: Stack, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FINEPRUNE_URL": stack.base_url, "FINEPRUNE_API_KEY": API_KEY}
    return subprocess.run(
        [sys.executable, "-m", "fineprune", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )


def test_cli_submit_wait_status_download(
    stack: Stack, files: dict[str, Path], tmp_path: Path
) -> None:
    done = _fineprune(
        stack,
        "submit",
        files["model"],
        "--data",
        files["clean"],
        "--trigger-data",
        files["trigger"],
        "--epochs",
        "2",
        "--wait",
        "--json",
        "--out",
        tmp_path / "cli.keras",
    )
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert job["state"] == "succeeded" and job["summary"]["channels_pruned"] >= 0
    assert (
        keras.models.load_model(tmp_path / "cli.keras").count_params()
        == job["summary"]["parameters_after"]
    )

    status = _fineprune(stack, "status", job["id"], "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["id"] == job["id"]
    listing = _fineprune(stack, "status", "--json")
    assert job["id"] in {item["id"] for item in json.loads(listing.stdout)["items"]}

    folder = tmp_path / "dl"
    folder.mkdir()
    fetched = _fineprune(stack, "download", job["id"], "--out", folder, "--report")
    assert fetched.returncode == 0, fetched.stderr
    assert (folder / f"{job['id']}.keras").stat().st_size > 0
    assert "<html" in (folder / f"{job['id']}.report.html").read_text().lower()
    report = json.loads((folder / f"{job['id']}.report.json").read_text())
    assert report["schema_version"] == "2"
    assert (folder / f"{job['id']}.report.png").read_bytes().startswith(b"\x89PNG")
    for kind in ("model", "report_json", "report_html", "report_png"):
        assert f"{kind}: " in fetched.stdout


def test_cli_reports_a_refused_upload_in_one_line(stack: Stack, files: dict[str, Path]) -> None:
    done = _fineprune(stack, "submit", files["lambda"], "--data", files["clean"], "--wait")
    assert done.returncode == 1
    assert "422" in done.stderr and "lambda" in done.stderr.lower()
    assert "Traceback" not in done.stderr


def test_a_layer_option_naming_no_prunable_layer_is_refused_at_submit(
    stack: Stack, files: dict[str, Path]
) -> None:
    parts = {"model": files["model"], "data": files["clean"]}
    with stack.client() as client:
        missing = stack.submit(client, parts, {"layer": "nope"})
        assert missing.status_code == 422, missing.text
        assert "no layer named 'nope'" in missing.json()["message"]
        wrong = stack.submit(client, parts, {"layer": "bn1"})
        assert wrong.status_code == 422 and "BatchNormalization" in wrong.json()["message"]
