"""Checks of untrusted files, run in a short-lived process with hard limits.

Parsing an untrusted file is where a small upload can cost the most: HDF5's C library holds
Python's lock while it walks a hostile structure, and reading one attribute can ask for
gigabytes (HDF5 converts a variable-length list whole, however few bytes are kept). So the API,
and a command line whose process has no memory limit, never parse a model themselves. Each
check runs in a process of its own that caps its heap (RLIMIT_DATA) and CPU time (RLIMIT_CPU)
before it reads anything, holds no secret (an allowlisted environment), loads no HDF5 plugin,
and is killed at a wall-clock deadline; the thread that waits for it holds no lock, so a
server goes on answering meanwhile.

`entry` names the function the process runs ("module:function", from fineprune's own code);
its module is imported before the process says it is ready, so a warm spare (`spare`) costs no
import. Each process serves one request and exits.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import resource
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[3]
_MAX_ANSWER = 1024**2
_STARTUP_S = 60.0
"""How long a fresh process may take to import what the checks need (a loaded 2-core box)."""
_ENV_NAMES = ("PATH", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ")
_FIXED_ENV = {
    "OPENBLAS_NUM_THREADS": "1",  # numpy's thread pools would take heap and cores for nothing
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "HDF5_PLUGIN_PRELOAD": "::",  # HDF5 loads no filter plugin from disk, whatever a file asks
    "HDF5_USE_FILE_LOCKING": "FALSE",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONNOUSERSITE": "1",
}


@dataclass(frozen=True)
class ProcessLimits:
    """What one check process may use; the deadline is wall time from the request on."""

    memory_bytes: int
    cpu_seconds: int
    wall_seconds: float
    file_bytes: int
    """Largest file it may write (a compressed weights file is copied out to be read)."""


class SandboxFailure(Exception):
    """The check process gave no answer: killed at its deadline, out of a limit, or crashed.

    `stage` is what it was checking (a form field), `reason` a sentence for the user.
    """

    def __init__(self, stage: str | None, reason: str) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


def run(
    entry: str,
    request: dict[str, Any],
    limits: ProcessLimits,
    *,
    concurrency: int = 4,
    spare: int = 0,
    stopping: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Run `entry(request, stage)` in a check process and return its JSON answer.

    At most `concurrency` checks run at once (each may hold `limits.memory_bytes`); the rest
    wait. `spare` processes are kept started for the next call. Raises SandboxFailure when the
    process ends without an answer, is killed at its deadline, or `stopping()` turns true (the
    server is shutting down).
    """
    stopping = stopping or server_stopping
    kind = _Kind(entry, limits)
    with _POOL.slot(concurrency), tempfile.TemporaryDirectory(prefix="fineprune-check-") as tmp:
        child = _POOL.take(kind)
        try:
            return child.ask({**request, "tmp": tmp}, stopping)
        finally:
            child.kill()
            _POOL.refill(kind, spare)


def server_stopping() -> bool:
    """Has the server been asked to stop? uvicorn's SIGTERM handler is a bound
    `Server.handle_exit`, which sets `should_exit`; anything else reads as no."""
    handler = signal.getsignal(signal.SIGTERM)
    server = getattr(handler, "__self__", None)
    return bool(getattr(server, "should_exit", False))


# --------------------------------------------------------------------------- the parent


@dataclass(frozen=True)
class _Kind:
    """Processes of one kind run the same function under the same limits."""

    entry: str
    limits: ProcessLimits


class _Child:
    """One check process: started, imports done once it says `ready`, one request, gone."""

    def __init__(self, kind: _Kind) -> None:
        self.kind = kind
        self.limits = kind.limits
        argv = [sys.executable, "-P", "-s", "-m", __name__, kind.entry]
        self.proc = subprocess.Popen(
            [*argv, json.dumps(asdict(kind.limits))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=tempfile.gettempdir(),
            env=_child_environment(os.environ),
            start_new_session=True,  # its own group, so a kill takes everything it started
            close_fds=True,
        )
        self.buffer = bytearray()
        self.stage: str | None = None
        self.ready = False

    def ask(self, request: dict[str, Any], stopping: Callable[[], bool]) -> dict[str, Any]:
        if not self.ready:
            self._until(lambda m: m.get("ready"), time.monotonic() + _STARTUP_S, stopping)
            self.ready = True
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            raise self._death() from None
        deadline = time.monotonic() + self.limits.wall_seconds
        answer = self._until(lambda m: "answer" in m, deadline, stopping)
        return answer["answer"]

    def _until(
        self, wanted: Callable[[dict[str, Any]], Any], deadline: float, stopping: Callable[[], bool]
    ) -> dict[str, Any]:
        """Read messages until one is `wanted`; stages seen on the way are remembered."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while True:
                for message in self._messages():
                    if "stage" in message:
                        self.stage = str(message["stage"])[:32]
                    if wanted(message):
                        return message
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SandboxFailure(
                        self.stage,
                        f"checking it took longer than {self.limits.wall_seconds:g} s",
                    )
                if stopping():
                    raise SandboxFailure(self.stage, "the service is shutting down")
                if selector.select(min(left, 0.2)):
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        raise self._death()
                    self.buffer += chunk
                    if len(self.buffer) > _MAX_ANSWER:
                        raise SandboxFailure(self.stage, "the check sent an oversized answer")

    def _messages(self) -> list[dict[str, Any]]:
        found = []
        while (end := self.buffer.find(b"\n")) >= 0:
            line = bytes(self.buffer[:end])
            del self.buffer[: end + 1]
            with contextlib.suppress(ValueError):
                message = json.loads(line)
                if isinstance(message, dict):
                    found.append(message)
        return found

    def _death(self) -> SandboxFailure:
        """Why the process ended without answering, in words for the user."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        code = self.proc.returncode
        if code in (-signal.SIGXCPU, -signal.SIGKILL):
            reason = f"checking it took more than {self.limits.cpu_seconds} s of CPU time"
        elif code == -signal.SIGALRM:
            reason = f"checking it took longer than {self.limits.wall_seconds:g} s"
        elif code == _OUT_OF_MEMORY_EXIT:
            reason = f"checking it needed more than {_mib(self.limits.memory_bytes)} of memory"
        else:
            reason = f"the check's process ended unexpectedly (status {code})"
        return SandboxFailure(self.stage, reason)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


class _Pool:
    """Warm processes waiting for a request, and the bound on checks running at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_Child] = []
        self._slots: threading.BoundedSemaphore | None = None
        self._size = 0

    @contextlib.contextmanager
    def slot(self, concurrency: int):  # type: ignore[no-untyped-def]
        with self._lock:
            if self._slots is None or self._size != concurrency:
                self._slots, self._size = threading.BoundedSemaphore(concurrency), concurrency
            slots = self._slots
        with slots:
            yield

    def take(self, kind: _Kind) -> _Child:
        with self._lock:
            for child in list(self._idle):
                if child.kind == kind and child.proc.poll() is None:
                    self._idle.remove(child)
                    return child
        return _Child(kind)

    def refill(self, kind: _Kind, spare: int) -> None:
        """Start spares in the background, so the next check finds one ready."""
        with self._lock:
            missing = spare - sum(1 for child in self._idle if child.kind == kind)
        for _ in range(missing):
            threading.Thread(target=self._start, args=(kind, spare), daemon=True).start()

    def _start(self, kind: _Kind, spare: int) -> None:
        try:
            child = _Child(kind)
        except OSError:
            return
        with self._lock:
            if sum(1 for c in self._idle if c.kind == kind) < spare:
                self._idle.append(child)
                return
        child.kill()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for child in idle:
            child.kill()


_POOL = _Pool()
atexit.register(_POOL.close)


def _child_environment(parent: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """Allowlisted names only: no key, secret or broker URL reaches the check."""
    env = {name: parent[name] for name in _ENV_NAMES if name in parent}
    paths = [str(_ROOT), *parent.get("PYTHONPATH", "").split(os.pathsep)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    env.setdefault("PATH", os.defpath)
    env.update(_FIXED_ENV)
    return env


def _mib(n: int) -> str:
    return f"{n / 1024**2:.0f} MiB"


# --------------------------------------------------------------------------- the child

_OUT_OF_MEMORY_EXIT = 75


def _send(message: dict[str, Any]) -> None:
    os.write(1, json.dumps(message).encode() + b"\n")


def _cap(limits: ProcessLimits) -> None:
    """Limits first, before anything of the upload is read (lowering needs no privilege)."""
    for which, soft, hard in (
        (resource.RLIMIT_DATA, limits.memory_bytes, limits.memory_bytes),
        (resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 1),
        (resource.RLIMIT_FSIZE, limits.file_bytes, limits.file_bytes),
        (resource.RLIMIT_CORE, 0, 0),
    ):
        _, current = resource.getrlimit(which)
        if current != resource.RLIM_INFINITY:
            soft, hard = min(soft, current), min(hard, current)
        resource.setrlimit(which, (soft, hard))


def child_main(entry: str, limits_json: str) -> None:
    """The check process: cap itself, import, say ready, answer one request, exit."""
    limits = ProcessLimits(**json.loads(limits_json))
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGXCPU, signal.SIGALRM):
        signal.signal(sig, signal.SIG_DFL)
    _cap(limits)
    reserve: bytearray | None = bytearray(4 * 1024**2)  # freed to answer a MemoryError
    module, _, function = entry.partition(":")
    run_checks = getattr(importlib.import_module(module), function)  # the heavy imports

    _send({"ready": True})
    line = sys.stdin.buffer.readline(_MAX_ANSWER)
    if not line:
        os._exit(0)  # the API went away before asking
    signal.alarm(int(limits.wall_seconds) + 1)
    request = json.loads(line)
    tempfile.tempdir = request["tmp"]
    try:
        answer = run_checks(request, lambda stage: _send({"stage": stage}))
    except MemoryError:
        reserve = None
        os._exit(_OUT_OF_MEMORY_EXIT)
    del reserve
    _send({"answer": answer})
    os._exit(0)


if __name__ == "__main__":
    child_main(sys.argv[1], sys.argv[2])
