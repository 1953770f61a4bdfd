"""Real processes for the service tests: a uvicorn API and Celery workers, and HTTP helpers.

Every process starts in its own session, so a test can SIGKILL a worker's whole process
group (main process and pool children) the way a lost machine would, and teardown can
never leave orphans behind. A test run that is itself killed runs no teardown: each process
is also asked to get SIGTERM when the run dies, or a stray worker would take the next run's
jobs off the shared Redis (seen: a run stopped with SIGTERM left a worker that did).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from workers.command import worker_argv

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `jobs/` is importable from the checkout even if not installed
    sys.path.insert(0, str(ROOT))
# The machine's PostgreSQL (trust auth, database `test`); each user takes a schema of its own.
POSTGRES_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
API_KEY = "test-key-a"
OTHER_KEY = "test-key-b"
CALLBACK_SECRET = "test-callback-secret"


@contextlib.contextmanager
def owned_redis_db(url: str) -> Iterator[None]:
    """A Redis database that belongs to one test module: emptied before and after.

    Each module that starts services uses its own database number, so two modules never take
    each other's messages. Skips when no Redis answers.
    """
    import pytest
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        pytest.skip(f"no Redis at {url}")
    client.flushdb()
    try:
        yield
    finally:
        client.flushdb()
        client.close()


@contextlib.contextmanager
def postgres_schema() -> Iterator[str]:
    """A PostgreSQL schema of one's own, dropped afterwards; the URL that uses it.

    Tests that run at the same time (two modules, two developers) never see each other's
    tables. Skips when no PostgreSQL answers.
    """
    import pytest
    import sqlalchemy

    name = f"fineprune_test_{uuid.uuid4().hex[:12]}"
    engine = sqlalchemy.create_engine(POSTGRES_URL)
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(f'CREATE SCHEMA "{name}"'))
    except sqlalchemy.exc.OperationalError as exc:
        engine.dispose()
        pytest.skip(f"no PostgreSQL at {POSTGRES_URL}: {str(exc).splitlines()[0]}")
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{name}"
    finally:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(f'DROP SCHEMA "{name}" CASCADE'))
        engine.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_env(artifacts: Path, redis_url: str | None, **settings: Any) -> dict[str, str]:
    """A hermetic environment: nothing FINEPRUNE_* leaks in from the developer's shell."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FINEPRUNE_") and k not in ("REDIS_URL", "ARTIFACTS_DIR", "PORT")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env["KERAS_BACKEND"] = "tensorflow"
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["FINEPRUNE_ARTIFACTS_DIR"] = str(artifacts)
    if redis_url:
        env["REDIS_URL"] = redis_url
    for key, value in settings.items():
        env[f"FINEPRUNE_{key.upper()}"] = str(value)
    return env


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_the_run() -> None:
    """In the child, before exec: SIGTERM when the test process dies (Linux; elsewhere a
    no-op, and teardown is the only cleanup)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Proc:
    """A child process in its own session, with its output in a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, name: str, argv: list[str], env: dict[str, str], log: Path) -> Proc:
        with log.open("ab") as out:
            popen = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_the_run,
            )
        return cls(name, popen, log)

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def stop(self, grace: float = 10.0) -> None:
        """TERM the group, then KILL it if it lingers; reap the leader."""
        if self.popen.poll() is None:
            self.kill_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
        self.kill_group(signal.SIGKILL)  # pool children may outlive a leader that exited
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def start_api(env: dict[str, str], port: int, log: Path) -> Proc:
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "service.main:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    return Proc.start("api", argv, env, log)


def start_worker(env: dict[str, str], log: Path, name: str) -> Proc:
    argv = worker_argv(
        "fineprune",
        "--hostname",
        f"{name}@%h",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "--loglevel",
        "INFO",
    )
    return Proc.start(name, argv, env, log)


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
        except (httpx.HTTPError, OSError) as exc:
            last_error, result = exc, None
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} ({last_error})")


def wait_api(base_url: str, proc: Proc, timeout: float = 60.0) -> None:
    def ready() -> bool:
        assert proc.popen.poll() is None, f"API exited:\n{proc.tail()}"
        return httpx.get(f"{base_url}/readyz", timeout=5).status_code == 200

    wait_until(ready, timeout, "the API to be ready")


def wait_worker(proc: Proc, timeout: float = 60.0) -> None:
    def ready() -> bool:
        assert proc.popen.poll() is None, f"worker exited:\n{proc.tail()}"
        return " ready." in proc.log.read_text(errors="replace")

    wait_until(ready, timeout, f"worker {proc.name} to be ready", interval=0.3)


@dataclass
class Observed:
    """What polling a job saw: every distinct (state, stage, percent)."""

    snapshots: list[tuple[str, str | None, float]] = field(default_factory=list)
    last: dict[str, Any] = field(default_factory=dict)


def poll_job(
    client: httpx.Client,
    job_id: str,
    until: Callable[[dict[str, Any]], bool],
    timeout: float,
    observed: Observed | None = None,
    interval: float = 0.2,
) -> dict[str, Any]:
    observed = observed if observed is not None else Observed()

    def check() -> dict[str, Any] | None:
        response = client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        body = response.json()
        snap = (body["state"], body["progress"]["stage"], body["progress"]["percent"])
        if not observed.snapshots or observed.snapshots[-1] != snap:
            observed.snapshots.append(snap)
        observed.last = body
        return body if until(body) else None

    try:
        return wait_until(check, timeout, f"job {job_id}", interval)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last states seen: {observed.snapshots[-5:]}") from None


def final(body: dict[str, Any]) -> bool:
    return body["state"] in ("succeeded", "failed", "cancelled")


def read_record(artifacts: Path, job_id: str, database_url: str | None = None) -> dict[str, Any]:
    """A job's record as the service stored it: in `database_url`, else the artifacts' SQLite."""
    import sqlalchemy

    url = database_url or f"sqlite:///{artifacts / 'state' / 'jobs.sqlite'}"
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            raw = conn.execute(
                sqlalchemy.text("SELECT record FROM fineprune_jobs WHERE id = :id"), {"id": job_id}
            ).scalar()
    finally:
        engine.dispose()
    assert raw is not None, f"no record of job {job_id}"
    return json.loads(raw)


def loaded_libraries(pid: int) -> str:
    """The shared objects mapped into a process (Linux): tells whether TensorFlow was loaded."""
    return Path(f"/proc/{pid}/maps").read_text(errors="replace")


class CallbackReceiver:
    """A local HTTP server that records POSTs; the first `fail_first` answers are 503."""

    def __init__(self, fail_first: int = 0) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.answers: list[int] = []
        self._fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                receiver.received.append((dict(self.headers.items()), body))
                status = 503 if len(receiver.received) <= receiver._fail_first else 204
                receiver.answers.append(status)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @contextlib.contextmanager
    def running(self) -> Iterator[CallbackReceiver]:
        self._thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()


def multipart_files(paths: dict[str, Path]) -> dict[str, tuple[str, bytes, str]]:
    return {
        name: (path.name, path.read_bytes(), "application/octet-stream")
        for name, path in paths.items()
    }


def raw_request(port: int, head: str, body: bytes = b"", timeout: float = 10.0) -> tuple[int, str]:
    """Send bytes as they are (e.g. a lying Content-Length); status and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + body)
        chunks = []
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while data := sock.recv(65536):
                chunks.append(data)
                if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                    break
    raw = b"".join(chunks).decode("latin-1")
    status = int(raw.split(" ", 2)[1]) if raw.startswith("HTTP/") else 0
    return status, raw.split("\r\n\r\n", 1)[-1]


def _complete(raw: bytes) -> bool:
    head, _, body = raw.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False
