"""The job's own process (`workers.isolation`), with real processes and a tiny model.

Unit tests drive the supervisor from this process, as the Celery pool child does; faults are
test hooks passed by the caller (in the service: the worker's own settings, never a job's
inputs). A warm slot's process is checked to be the same isolated process, only started
earlier. The end-to-end test runs an API and a worker on Redis DB 10, makes the first job's
process die, and finds the next jobs run by the processes the worker started ahead. Each
child imports TensorFlow afresh: about 5-15 s on two cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import keras
import pytest
from celery.exceptions import SoftTimeLimitExceeded
from factories import residual_block, save_npz, textures, train_backdoored, trigger_set
from service_helpers import (
    API_KEY,
    ROOT,
    final,
    free_port,
    loaded_libraries,
    multipart_files,
    owned_redis_db,
    poll_job,
    read_record,
    service_env,
    start_api,
    start_worker,
    wait_api,
    wait_worker,
)

from fineprune.errors import CancelledError, FinePruneError, InvalidDataError
from schemas.options import SanitizeOptions
from schemas.report import SanitizeReport
from workers import isolation
from workers.isolation import IsolationFailure, Launch, Limits, Slot, sanitize_isolated

GiB, MiB = 1024**3, 1024**2
FAST = SanitizeOptions(epochs=2)
LONG = SanitizeOptions(epochs=400)
# What the child may see: the allowlist's names that these tests' environment can hold.
CHILD_NAMES = {
    "PATH",
    "HOME",
    "TMPDIR",
    "TMP",
    "TEMP",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "PYTHONPATH",
    "PYTHONNOUSERSITE",
    "PYTHONUNBUFFERED",
    "PYTHONHASHSEED",
    "PYTHONDONTWRITEBYTECODE",
    "LD_LIBRARY_PATH",
    "KERAS_BACKEND",
    "MPLBACKEND",
    "MPLCONFIGDIR",
}
SECRETS = {
    "REDIS_URL": "redis://:hunter2@127.0.0.1:6379/0",
    "FINEPRUNE_REDIS_URL": "redis://:hunter2@127.0.0.1:6379/0",
    "FINEPRUNE_CALLBACK_SECRET": "hunter2",
    "FINEPRUNE_API_KEYS": "key-1,key-2",
    "ARTIFACTS_DIR": "/srv/artifacts",
    "AWS_SECRET_ACCESS_KEY": "hunter2",
    "CELERY_BROKER_URL": "redis://:hunter2@127.0.0.1:6379/0",
    "TF_VAR_db_password": "hunter2",  # Terraform's TF_, not TensorFlow's
    "TF_TOKEN_app_terraform_io": "hunter2",
    "TF_SECRET_THING": "hunter2",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("isolation-inputs")
    train_backdoored(seed=0, epochs=3).save(root / "model.keras")
    residual_block().save(root / "pooled.keras")  # its recipe runs every epoch: a long job
    x, y = textures(240, seed=100)
    xt, yt = trigger_set(60, seed=200)
    return {
        "model": root / "model.keras",
        "pooled": root / "pooled.keras",
        "clean": save_npz(root / "clean.npz", x=x, y=y),
        "trigger": save_npz(root / "trigger.npz", x=xt, y_target=yt),
        "bad_shape": save_npz(root / "bad_shape.npz", x=x[:, :8], y=y),
    }


class Watch:
    """Progress and cancellation for one run; finds the running child's probe."""

    def __init__(self, work_root: Path, cancel_at: str | None = None) -> None:
        self.work_root = work_root
        self.cancel_at = cancel_at
        self.stages: list[str] = []
        self.probe: dict[str, Any] | None = None

    def progress(self, stage: str, fraction: float) -> None:
        assert 0.0 <= fraction <= 1.0
        if not self.stages or self.stages[-1] != stage:
            self.stages.append(stage)
        if self.probe is None:
            for path in self.work_root.glob(f"*/out/{isolation.PROBE_NAME}"):
                with contextlib.suppress(ValueError, OSError):
                    self.probe = json.loads(path.read_text())

    def should_cancel(self) -> bool:
        return self.cancel_at is not None and self.cancel_at in self.stages


def run(
    files: dict[str, Path],
    work_root: Path,
    *,
    options: SanitizeOptions = FAST,
    limits: Limits = Limits(2 * GiB, 600),
    hook: str | None = None,
    watch: Watch | None = None,
    data: str = "clean",
    model: str = "model",
) -> SanitizeReport:
    watch = watch or Watch(work_root)
    inputs = {"model": files[model], "data": files[data]}
    with sanitize_isolated(
        inputs,
        options,
        work_root=work_root,
        limits=limits,
        progress=watch.progress,
        should_cancel=watch.should_cancel,
        test_hook=hook,
    ) as outcome:
        return outcome.report


def gone(pid: int) -> bool:
    """The process no longer runs (reaped, or a zombie waiting for init)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in status


# --------------------------------------------------------------------------- success


def test_success_returns_the_report_and_model_and_the_child_saw_no_secrets(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    work_root = tmp_path / "work"
    watch = Watch(work_root)
    inputs = {"model": files["model"], "data": files["clean"], "trigger_data": files["trigger"]}
    with sanitize_isolated(
        inputs,
        FAST,
        work_root=work_root,
        limits=Limits(2 * GiB, 600),
        progress=watch.progress,
        should_cancel=watch.should_cancel,
        label="job1",
        test_hook="probe",
    ) as outcome:
        report = outcome.report
        assert isinstance(report, SanitizeReport)
        assert sorted(p.name for p in outcome.out_dir.iterdir()) == sorted(
            ["probe.json", "report.html", "report.json", "report.png", "sanitized.keras"]
        )
        model = keras.models.load_model(outcome.out_dir / "sanitized.keras")
        assert model.count_params() == report.output_model.parameters
        scratch = outcome.out_dir.parent
        assert scratch.parent == work_root and scratch.name.startswith("job1-")
    assert report.baseline.attack_success_rate is not None  # the trigger data arrived
    assert {d.role for d in report.data} == {"clean", "trigger"}
    assert watch.stages == ["load", "profile", "cut", "fine-tune", "report"]
    assert list(work_root.iterdir()) == []  # the scratch dir is gone

    probe = watch.probe
    assert probe is not None
    leaked = set(probe["environ"]) & set(SECRETS)
    assert not leaked, leaked
    unexpected = {
        n for n in probe["environ"] if n not in CHILD_NAMES and not n.startswith(("TF_", "CUDA_"))
    }
    assert not unexpected, unexpected
    assert "CUDA_VISIBLE_DEVICES" in probe["environ"] and "TF_CPP_MIN_LOG_LEVEL" in probe["environ"]
    assert probe["cwd"] == probe["home"] == str(scratch)
    assert probe["tmpdir"] == str(scratch / "tmp")
    assert probe["rlimit_data"] == [2 * GiB, 2 * GiB]
    assert probe["rlimit_cpu"][0] == 600 and probe["rlimit_cpu"][1] > 600
    assert probe["own_session"] is True
    assert probe["warm"] is False  # no slot: started for this job
    assert opened_before_the_job(probe, scratch) == []


def opened_before_the_job(probe: dict[str, Any], scratch: Path) -> list[str]:
    """Files of the scratch dir the child held open when its job arrived (its log aside)."""
    return [
        path
        for path in probe["open_files_at_go"]
        if path.startswith(str(scratch)) and Path(path).name != isolation.LOG_NAME
    ]


def test_a_warm_process_runs_one_job_and_is_replaced(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    work_root = tmp_path / "work"
    launch = Launch(Limits(2 * GiB, 600), threads=1)
    slot = Slot(work_root, launch)
    try:
        slot.refill()
        first = slot.spare
        assert first is not None
        deadline = time.monotonic() + 120
        while "tensorflow" not in loaded_libraries(first.pid):  # imported before any job
            assert time.monotonic() < deadline and first.alive(), first.scratch
            time.sleep(0.3)
        assert list((first.scratch / "in").iterdir()) == []  # and nothing of a job is there
        watch = Watch(work_root)
        inputs = {"model": files["model"], "data": files["clean"]}
        with sanitize_isolated(
            inputs,
            FAST,
            work_root=work_root,
            limits=launch.limits,
            threads=launch.threads,
            slot=slot,
            progress=watch.progress,
            should_cancel=watch.should_cancel,
            label="job1",
            test_hook="probe",
        ) as outcome:
            assert outcome.out_dir.parent == first.scratch
            assert (outcome.out_dir / "sanitized.keras").is_file()
        probe = watch.probe
        assert probe is not None
        assert probe["warm"] is True and probe["pid"] == first.pid
        assert probe["intra_op_threads"] == 1
        assert probe["modules_at_go"] == ["keras", "tensorflow"]
        assert opened_before_the_job(probe, first.scratch) == []
        assert not set(probe["environ"]) & set(SECRETS)
        assert probe["cwd"] == probe["home"] == str(first.scratch)
        assert probe["rlimit_data"] == [2 * GiB, 2 * GiB] and probe["own_session"] is True
        assert watch.stages == ["load", "profile", "cut", "fine-tune", "report"]

        # It ran one job: it is gone, its folder too, and a new one waits for the next.
        assert gone(first.pid) and not first.scratch.exists()
        second = slot.spare
        assert second is not None and second.pid != first.pid and second.alive()
        assert [p.name for p in work_root.iterdir()] == [second.scratch.name]

        # A job with other limits is not given it: a process of its own runs that job (its
        # CPU limit is too small to import TensorFlow), the spare goes, and a new one waits.
        with pytest.raises(IsolationFailure) as failure:  # noqa: SIM117
            with sanitize_isolated(
                inputs,
                FAST,
                work_root=work_root,
                limits=Limits(2 * GiB, 2),
                slot=slot,
                progress=watch.progress,
                should_cancel=watch.should_cancel,
                label="job2",
            ):
                pass
        assert failure.value.kind == "timeout"
        assert gone(second.pid)
        third = slot.spare
        assert third is not None and third.pid != second.pid

        # A lost worker's leftovers are found by the job's label, warm folder or not.
        third.label("job9")
        isolation.remove_scratch(work_root, "job9")
        assert not third.scratch.exists()
    finally:
        slot.close()


def test_engine_errors_arrive_with_their_kind_and_message(
    files: dict[str, Path], tmp_path: Path
) -> None:
    from fineprune.pipeline import sanitize

    with pytest.raises(InvalidDataError) as in_process:
        sanitize(files["model"], files["bad_shape"], tmp_path / "direct", FAST)
    with pytest.raises(FinePruneError) as isolated:
        run(files, tmp_path / "work", data="bad_shape")
    assert type(isolated.value) is InvalidDataError
    assert isolated.value.kind == "invalid_data"
    assert isolated.value.message == in_process.value.message
    assert list((tmp_path / "work").iterdir()) == []


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    ("hook", "reason"),
    [
        ("sigkill", "killed by signal 9 (SIGKILL)"),
        ("segfault", "killed by signal 11 (SIGSEGV)"),
        ("exit", "exited with status 3 and no result"),
    ],
)
def test_a_child_that_dies_fails_cleanly(
    files: dict[str, Path], tmp_path: Path, hook: str, reason: str
) -> None:
    watch = Watch(tmp_path / "work")
    with pytest.raises(IsolationFailure) as failure:
        run(files, tmp_path / "work", hook=hook, watch=watch)
    assert failure.value.kind == "crashed"
    assert reason in failure.value.message, failure.value.message
    assert watch.stages[-1] == "profile"  # it died mid-job, where the hook fires
    assert list((tmp_path / "work").iterdir()) == []


@pytest.mark.parametrize("limit_mib", [256, 384])
def test_a_memory_limit_too_small_is_out_of_memory_not_a_hang(
    files: dict[str, Path], tmp_path: Path, limit_mib: int
) -> None:
    # 256 MiB: a MemoryError while importing TensorFlow, reported by the child itself;
    # 384 MiB (on two cores): TensorFlow aborts when it cannot start a thread.
    started = time.monotonic()
    with pytest.raises(IsolationFailure) as failure:
        run(files, tmp_path / "work", limits=Limits(limit_mib * MiB, 600))
    assert failure.value.kind == "out_of_memory", failure.value.message
    assert f"{limit_mib:.1f} MiB" in failure.value.message
    assert time.monotonic() - started < 180


def test_a_cpu_time_limit_is_a_timeout(files: dict[str, Path], tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(IsolationFailure) as failure:
        run(files, tmp_path / "work", limits=Limits(2 * GiB, 2))  # importing takes more
    assert failure.value.kind == "timeout"
    assert "CPU time limit of 2 s" in failure.value.message
    assert time.monotonic() - started < 120


# --------------------------------------------------------------------------- stopping a child


class SoftLimitWatch(Watch):
    """Raises Celery's soft time limit from inside the supervisor's loop, as its signal does."""

    def should_cancel(self) -> bool:
        if "fine-tune" in self.stages:
            raise SoftTimeLimitExceeded()
        return False


@pytest.mark.parametrize("stop", ["cancel", "soft_time_limit"])
def test_stopping_a_running_job_kills_its_process(
    files: dict[str, Path], tmp_path: Path, stop: str
) -> None:
    work_root = tmp_path / "work"
    watch = (
        Watch(work_root, cancel_at="fine-tune") if stop == "cancel" else SoftLimitWatch(work_root)
    )
    expected = CancelledError if stop == "cancel" else SoftTimeLimitExceeded
    with pytest.raises(expected):
        run(files, work_root, options=LONG, hook="probe", watch=watch, model="pooled")
    assert watch.probe is not None
    assert gone(watch.probe["pid"])
    assert list(work_root.iterdir()) == []


def test_the_child_dies_with_its_parent(files: dict[str, Path], tmp_path: Path) -> None:
    """Celery's hard time limit SIGKILLs the pool child: the job's process must not linger."""
    work_root = tmp_path / "work"
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from schemas.options import SanitizeOptions\n"
        "from workers.isolation import Limits, sanitize_isolated\n"
        "inputs = {'model': Path(sys.argv[1]), 'data': Path(sys.argv[2])}\n"
        "with sanitize_isolated(inputs, SanitizeOptions(epochs=400),\n"
        "        work_root=Path(sys.argv[3]), limits=Limits(), progress=lambda s, f: None,\n"
        "        should_cancel=lambda: False, test_hook='probe'):\n"
        "    pass\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(files["pooled"]), str(files["clean"]), str(work_root)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.monotonic() + 120
        probes: list[Path] = []
        while not probes and time.monotonic() < deadline:
            assert parent.poll() is None
            time.sleep(0.3)
            probes = list(work_root.glob(f"*/out/{isolation.PROBE_NAME}"))
        assert probes, "the child never started"
        time.sleep(0.5)  # the probe file is complete once a second later
        pid = json.loads(probes[0].read_text())["pid"]
        assert not gone(pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 20
        while not gone(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert gone(pid)
    finally:
        parent.kill()
        parent.wait(10)


# --------------------------------------------------------------------------- API process


def test_the_api_process_never_deserializes_a_model(files: dict[str, Path], tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from fastapi.testclient import TestClient\n"
        "import service.main\n"
        "from jobs.checks import check_inputs\n"
        "info = check_inputs({'model': Path(sys.argv[1]), 'data': Path(sys.argv[2])})\n"
        "assert TestClient(service.main.app).get('/healthz').status_code == 200\n"
        "import workers.app, workers.tasks, workers.isolation\n"
        "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", script, str(files["model"]), str(files["clean"])],
        cwd=ROOT,
        env=service_env(tmp_path / "artifacts", None),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


# --------------------------------------------------------------------------- through the service

REDIS_URL = "redis://127.0.0.1:6379/10"


@pytest.fixture
def redis_db10() -> Iterator[None]:
    with owned_redis_db(REDIS_URL):
        yield


def pool_children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def wait_warm(pool_child: int, timeout: float = 120.0) -> int:
    """The pid of the pool child's waiting job process, once it has TensorFlow loaded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in pool_children(pool_child):
            with contextlib.suppress(OSError):
                if "tensorflow" in loaded_libraries(pid):
                    return pid
        time.sleep(0.3)
    raise AssertionError(f"pool child {pool_child} has no warm job process")


def wait_probe(work_root: Path, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
    """The probe the job's process wrote (its folder carries the job's label)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for folder in work_root.iterdir():
            with contextlib.suppress(OSError, ValueError):
                if (folder / isolation.LABEL_NAME).read_text() == job_id:
                    time.sleep(0.5)  # the probe is written whole right after
                    return json.loads((folder / "out" / isolation.PROBE_NAME).read_text())
        time.sleep(0.2)
    raise AssertionError(f"no probe of job {job_id}")


def test_a_job_whose_process_dies_fails_and_the_next_succeeds(
    redis_db10: None, files: dict[str, Path], tmp_path: Path
) -> None:
    artifacts, hook_file = tmp_path / "artifacts", tmp_path / "hook"
    env = service_env(
        artifacts,
        REDIS_URL,
        api_keys=API_KEY,
        task_soft_time_limit=300,
        task_time_limit=330,
        visibility_timeout=360,
        progress_interval=0.2,
        test_hook_file=hook_file,
        worker_concurrency=1,
    )
    port = free_port()
    api = start_api(env, port, tmp_path / "api.log")
    worker = start_worker(env, tmp_path / "worker.log", "isolation")
    parts = multipart_files({"model": files["model"], "data": files["clean"]})
    options = {"options": json.dumps({"epochs": 2})}
    try:
        wait_api(f"http://127.0.0.1:{port}", api)
        wait_worker(worker)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers) as client:
            hook_file.write_text("segfault")
            crashed = client.post("/v1/jobs", files=parts, data=options)
            assert crashed.status_code == 202, crashed.text
            crashed_id = crashed.json()["id"]
            body = poll_job(client, crashed_id, final, timeout=180, interval=0.5)
            assert body["state"] == "failed", (body, worker.tail())
            assert body["error"]["kind"] == "crashed"
            assert "signal 11 (SIGSEGV)" in body["error"]["message"]
            assert body["attempts"] == 1
            record = read_record(artifacts, crashed_id)
            assert [e["state"] for e in record["events"]] == ["queued", "running", "failed"]

            hook_file.unlink()
            ok = client.post("/v1/jobs", files=parts, data=options)
            ok_id = ok.json()["id"]
            body = poll_job(client, ok_id, final, timeout=180, interval=0.5)
            assert body["state"] == "succeeded", (body, worker.tail())
            assert body["attempts"] == 1
            assert body["progress"] == {"stage": "report", "percent": 100.0}
            assert client.get(f"/v1/jobs/{ok_id}/model").status_code == 200

            # The next job runs in the process the pool child started ahead of it.
            children = pool_children(worker.popen.pid)
            spare = wait_warm(children[0])
            hook_file.write_text("probe")
            long = client.post(
                "/v1/jobs",
                files=multipart_files({"model": files["pooled"], "data": files["clean"]}),
                data={"options": json.dumps({"epochs": 400})},
            )
            long_id = long.json()["id"]
            probe = wait_probe(artifacts / "state" / "work", long_id)
            assert probe["warm"] is True and probe["pid"] == spare
            assert probe["intra_op_threads"] == max(1, len(os.sched_getaffinity(0)))  # 1 slot
            assert client.delete(f"/v1/jobs/{long_id}").status_code == 202
            body = poll_job(client, long_id, final, timeout=60, interval=0.5)
            assert body["state"] == "cancelled", body
            hook_file.unlink()

        # The same worker ran them all; neither its main process nor its pool child loaded TF,
        # and what is left of the work folder is the next job's waiting process.
        assert worker.popen.poll() is None
        children = pool_children(worker.popen.pid)
        assert children
        for pid in [worker.popen.pid, *children]:
            assert "tensorflow" not in loaded_libraries(pid)
        spare = wait_warm(children[0])
        assert spare != probe["pid"]
        left = [p.name for p in (artifacts / "state" / "work").iterdir()]
        assert len(left) == 1 and left[0].startswith(f"{isolation.SPARE_PREFIX}-{children[0]}-")
    finally:
        worker.stop()
        api.stop()
