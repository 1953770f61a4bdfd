"""Run the engine on an uploaded model in a process of its own, supervised by the task.

Everything that touches an untrusted model (config checks, Keras loading, TensorFlow itself)
runs in a fresh interpreter that runs one job (`python -P -m workers.isolation`), so that:

- a crash, a runaway allocation or an endless computation kills that process, not the Celery
  pool child, and the job fails with a readable reason instead of costing a redelivery;
- the process never sees the broker URL, API keys or the callback secret: its environment is
  built from an allowlist, and it only reads and writes a scratch directory of its own;
- memory (RLIMIT_DATA) and CPU time (RLIMIT_CPU) are capped by the kernel.

RLIMIT_DATA, not RLIMIT_AS: TensorFlow maps about 2.6 GB of address space for a tiny model
on two cores and aborts at import under RLIMIT_AS = 2 GiB, while its heap (what RLIMIT_DATA
counts: private writable mappings, thread stacks included) is about 0.45 GiB; it cannot start
below about 0.5 GiB of RLIMIT_DATA.

The parent does all I/O: it copies the inputs into the scratch directory, the child writes its
outputs there and reports progress and its result as JSON lines on a pipe, and the parent
publishes them. Cancelling kills the child; nothing it wrote is kept.

Warm processes: importing TensorFlow takes 3-5 s, so each worker slot keeps one child started
ahead (`Slot`): limits set, TensorFlow imported and its thread pools sized, then waiting on
its stdin, its scratch directory still empty. A job takes it (its inputs are copied in, then
one line on stdin says go), and a new one is started for the next job as soon as it ends.
The child is the same program either way, with the same environment, limits and directory:
only when it was started differs. It has opened nothing of any job before its own arrives,
and it never runs a second one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fineprune.errors import CancelledError, FinePruneError
from fineprune.load.inspection.isolated import inspect_bounded
from fineprune.load.inspection.limits import Limits as InspectionLimits
from fineprune.text import readable_bytes
from jobs.lifecycle import OUTPUT_NAMES, STAGE_WEIGHTS
from schemas.options import SanitizeOptions
from schemas.report import SanitizeReport

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]
GiB = 1024**3
MiB = 1024**2

# Faults the child can simulate, for tests: chosen by the worker's own settings
# (`FINEPRUNE_TEST_HOOK_FILE`), never by anything in a job.
TEST_HOOKS = ("sigkill", "segfault", "exit", "probe")
SPEC_NAME = "job.json"
LOG_NAME = "child.log"
PROBE_NAME = "probe.json"
LABEL_NAME = "label"
SPARE_PREFIX = "spare"
_ROOT = Path(__file__).resolve().parents[1]
_CPU_GRACE_S = 5  # between SIGXCPU (soft limit) and SIGKILL (hard limit)
_MAX_LINE = 64 * MiB  # the report is the largest message, well below this
_MAX_MESSAGE = 2000
_LABEL = re.compile(r"[A-Za-z0-9_]{1,64}")
_KIND = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
_OUT_OF_MEMORY = re.compile(
    r"MemoryError|bad_alloc|cannot allocate memory|out of memory|failed to map segment"
    r"|pthread_create|OOM when allocating|ResourceExhausted|Memory allocation still failed",
    re.IGNORECASE,
)
# What the child may inherit from the worker's environment; everything else is dropped.
_ENV_NAMES = frozenset(
    {
        "PATH",
        "LANG",
        "LANGUAGE",
        "LC_ALL",
        "LC_CTYPE",
        "TZ",
        "PYTHONHASHSEED",
        "PYTHONDONTWRITEBYTECODE",
        "LD_LIBRARY_PATH",
        "KERAS_BACKEND",
        "XLA_FLAGS",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "MPLBACKEND",
        "MPLCONFIGDIR",
        "NVIDIA_VISIBLE_DEVICES",
        "NVIDIA_DRIVER_CAPABILITIES",
    }
)
_ENV_PREFIXES = ("TF_", "CUDA_")
_ENV_REFUSED_PREFIXES = ("TF_VAR_", "TF_CLI_", "TF_TOKEN_")  # Terraform's, not TensorFlow's
_SECRETISH = re.compile(r"SECRET|TOKEN|PASSW|CREDENTIAL|API_?KEY", re.IGNORECASE)


@dataclass(frozen=True)
class Limits:
    """What the kernel lets one job's process use; 0 means no limit."""

    memory_bytes: int = 0
    cpu_seconds: int = 0


@dataclass(frozen=True)
class Launch:
    """What a job's process is started with, before it knows which job it will run."""

    limits: Limits = Limits()
    threads: int = 0  # TensorFlow's intra- and inter-op threads; 0: its default (every core)


@dataclass(frozen=True)
class Outcome:
    """A finished run: the report, and the folder holding `OUTPUT_NAMES` until the scope ends."""

    report: SanitizeReport
    out_dir: Path


class IsolationFailure(Exception):
    """The job's process ended without a result, or with one the parent refuses.

    `kind` is `crashed`, `out_of_memory`, `timeout` or `internal`; `message` is for the user.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


def one_line(exc: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def child_environment(parent: Mapping[str, str], scratch: Path, threads: int = 0) -> dict[str, str]:
    """The child's environment: allowlisted names only, home and temp in the scratch dir."""
    env = {
        name: value
        for name, value in parent.items()
        if (name in _ENV_NAMES or name.startswith(_ENV_PREFIXES))
        and not name.startswith(_ENV_REFUSED_PREFIXES)
        and not _SECRETISH.search(name)
    }
    paths = [str(_ROOT), *parent.get("PYTHONPATH", "").split(os.pathsep)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    env["HOME"] = str(scratch)
    for name in ("TMPDIR", "TMP", "TEMP"):
        env[name] = str(scratch / "tmp")
    env.setdefault("PATH", os.defpath)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("KERAS_BACKEND", "tensorflow")
    env.setdefault("MPLBACKEND", "Agg")
    env["PYTHONNOUSERSITE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    if threads > 0:  # oneDNN and OpenMP pools, which TensorFlow's own settings do not reach
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def remove_scratch(work_root: Path, label: str) -> None:
    """Delete scratch folders left by a run of `label` whose worker died before cleaning up.

    A warm process's folder is named for its slot, not its job: the job's label is written
    into it (`LABEL_NAME`) when the job takes it.
    """
    if not _LABEL.fullmatch(label):
        raise ValueError(f"bad label {label!r}")
    for folder in work_root.glob(f"{label}-*"):
        shutil.rmtree(folder, ignore_errors=True)
    for folder in work_root.glob(f"{SPARE_PREFIX}-*"):
        with contextlib.suppress(OSError):
            if (folder / LABEL_NAME).read_text() == label:
                shutil.rmtree(folder, ignore_errors=True)


def remove_stale_spares(work_root: Path) -> None:
    """Delete warm processes' folders whose slot (the pid in the name) no longer runs."""
    for folder in work_root.glob(f"{SPARE_PREFIX}-*"):
        match = re.fullmatch(rf"{SPARE_PREFIX}-(\d+)-.*", folder.name)
        if match and not _pid_alive(int(match.group(1))):
            shutil.rmtree(folder, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JobProcess:
    """A started child in its own scratch directory, waiting for the go line of its job."""

    def __init__(self, work_root: Path, launch: Launch, prefix: str) -> None:
        work_root.mkdir(parents=True, exist_ok=True)
        self.launch = launch
        self.scratch = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=work_root))
        self.started = time.monotonic()
        for folder in ("in", "out", "tmp"):
            (self.scratch / folder).mkdir()
        start = {
            "memory_bytes": launch.limits.memory_bytes,
            "cpu_seconds": launch.limits.cpu_seconds,
            "threads": launch.threads,
            "parent_pid": os.getpid(),
        }
        read_fd, write_fd = os.pipe()
        try:
            with (self.scratch / LOG_NAME).open("wb") as child_log:
                self.proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-P",
                        "-s",
                        "-m",
                        "workers.isolation",
                        str(write_fd),
                        json.dumps(start),
                    ],
                    cwd=self.scratch,
                    env=child_environment(os.environ, self.scratch, launch.threads),
                    stdin=subprocess.PIPE,
                    stdout=child_log,
                    stderr=child_log,
                    pass_fds=(write_fd,),
                    start_new_session=True,  # its own process group: killed as a whole
                )
        except BaseException:
            os.close(read_fd)
            shutil.rmtree(self.scratch, ignore_errors=True)
            raise
        finally:
            os.close(write_fd)
        self.read_fd = read_fd
        self._closed = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return not _exited(self.proc)

    def label(self, label: str) -> None:
        """Name the job this process runs, for `remove_scratch` after a lost worker."""
        (self.scratch / LABEL_NAME).write_text(label)

    def go(self) -> None:
        """The job's inputs and spec are in place: let the child read them."""
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):  # it died waiting: the supervisor says why
            self.proc.stdin.write(b"go\n")
            self.proc.stdin.flush()

    def reap(self) -> float:
        """Kill and reap the child (see `_reap`); its CPU seconds."""
        return _reap(self.proc)

    def close(self) -> None:
        """Kill the child if it runs, close the pipe, delete the scratch directory."""
        if self._closed:
            return
        self._closed = True
        if self.proc.returncode is None:
            _reap(self.proc)
        with contextlib.suppress(OSError):
            os.close(self.read_fd)
        shutil.rmtree(self.scratch, ignore_errors=True)


class Slot:
    """One worker slot's spare job process: started ahead, taken by one job, then replaced.

    Only the thread that made the slot may use it: the kernel kills a child when the thread
    that started it ends (PR_SET_PDEATHSIG), so spares are started by the slot's own thread.
    """

    def __init__(self, work_root: Path, launch: Launch) -> None:
        self.work_root = work_root
        self.launch = launch
        self.spare: JobProcess | None = None
        work_root.mkdir(parents=True, exist_ok=True)
        remove_stale_spares(work_root)

    def refill(self) -> None:
        """Start the next job's process unless one is waiting already."""
        if self.spare is not None and self.spare.alive():
            return
        if self.spare is not None:
            log.warning(
                "the warm job process %d died while waiting; starting another", self.spare.pid
            )
            self.spare.close()
            self.spare = None
        try:
            self.spare = JobProcess(self.work_root, self.launch, f"{SPARE_PREFIX}-{os.getpid()}")
        except OSError:
            log.warning("could not start a warm job process", exc_info=True)

    def take(self, launch: Launch) -> JobProcess | None:
        """The waiting process, if it lives and was started for these limits; else None."""
        spare, self.spare = self.spare, None
        if spare is None:
            return None
        if spare.launch != launch or not spare.alive():
            spare.close()
            return None
        return spare

    def close(self) -> None:
        if self.spare is not None:
            self.spare.close()
            self.spare = None


@contextlib.contextmanager
def sanitize_isolated(
    inputs: Mapping[str, Path],
    options: SanitizeOptions,
    *,
    work_root: Path,
    limits: Limits,
    progress: Progress,
    should_cancel: Callable[[], bool],
    label: str = "job",
    test_hook: str | None = None,
    poll_interval: float = 0.25,
    threads: int = 0,
    slot: Slot | None = None,
) -> Iterator[Outcome]:
    """Sanitize in a child process; the outcome is valid until the `with` block ends.

    `inputs` maps roles (model, data, trigger_data, test_data) to files, which are copied
    into the scratch dir. With a `slot`, its waiting process runs the job when it was started
    with these limits and threads (else a process is started now), and the slot is refilled
    as soon as this one ends. Raises `CancelledError` when `should_cancel` turns true (the
    child is killed), the engine's `FinePruneError` with the child's kind and message, or
    `IsolationFailure`. The scratch dir is deleted on the way out, whatever happened.
    """
    if test_hook is not None and test_hook not in TEST_HOOKS:
        raise ValueError(f"unknown test hook {test_hook!r}")
    if not _LABEL.fullmatch(label):
        raise ValueError(f"bad label {label!r}")
    launch = Launch(limits, threads)
    child = slot.take(launch) if slot is not None else None
    warm = child is not None
    try:
        if child is None:
            child = JobProcess(work_root, launch, label)
        child.label(label)
        _prepare(child.scratch, inputs, options, test_hook, warm)
        try:
            report = _Supervisor(child, progress, should_cancel, poll_interval).run()
        finally:
            if slot is not None:
                slot.refill()  # while this job's results are published
        yield Outcome(report, child.scratch / "out")
    finally:
        if child is not None:
            child.close()


# --------------------------------------------------------------------------- the parent


def _prepare(
    scratch: Path,
    inputs: Mapping[str, Path],
    options: SanitizeOptions,
    test_hook: str | None,
    warm: bool,
) -> None:
    """Copy the inputs in and write the child's job description; the child gets no other path."""
    names: dict[str, str] = {}
    for role, source in inputs.items():
        if not re.fullmatch(r"[a-z_]{1,32}", role):
            raise ValueError(f"bad input role {role!r}")
        name = f"in/{role}{source.suffix.lower()[:8]}"
        shutil.copyfile(source, scratch / name)
        names[role] = name
    spec = {
        "inputs": names,
        "options": options.model_dump(mode="json"),
        "out": "out",
        "test_hook": test_hook,
        "warm": warm,
    }
    (scratch / SPEC_NAME).write_text(json.dumps(spec))


class _Supervisor:
    """Starts the child, relays its progress, watches for cancellation, judges its end."""

    def __init__(
        self,
        child: JobProcess,
        progress: Progress,
        should_cancel: Callable[[], bool],
        poll_interval: float,
    ) -> None:
        self.child = child
        self.scratch = child.scratch
        self.limits = child.launch.limits
        self.progress = progress
        self.should_cancel = should_cancel
        self.poll_interval = poll_interval
        self.buffer = bytearray()
        self.eof = False

    def run(self) -> SanitizeReport:
        proc, read_fd = self.child.proc, self.child.read_fd
        try:
            self.child.go()
            final, cancelled = self._relay(proc, read_fd)
        finally:
            cpu_used = self.child.reap()
        if cancelled:
            raise CancelledError("cancelled while running")
        if final is None:
            raise self._judge_death(proc.returncode, cpu_used)
        return self._result(final)

    def _relay(self, proc: subprocess.Popen[bytes], fd: int) -> tuple[dict[str, Any] | None, bool]:
        """Forward progress until the child's final message, its exit, or a cancel request."""
        os.set_blocking(fd, False)
        final: dict[str, Any] | None = None
        next_cancel_check = 0.0
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while final is None:
                if selector.select(self.poll_interval):
                    self._read(fd)
                for message in self._messages():
                    if message.get("type") == "progress":
                        self._forward_progress(message)
                    elif message.get("type") in ("report", "error"):
                        final = message
                        break
                moment = time.monotonic()
                if moment >= next_cancel_check:
                    next_cancel_check = moment + self.poll_interval
                    if self.should_cancel():
                        return None, True
                if final is None and (self.eof or _exited(proc)):
                    while self._read(fd):  # whatever it wrote just before it ended
                        pass
                    final = next(
                        (m for m in self._messages() if m.get("type") in ("report", "error")),
                        None,
                    )
                    break
        if final is not None:  # it exits right after its final message; a moment's grace
            with contextlib.suppress(subprocess.TimeoutExpired):
                _wait_unreaped(proc, timeout=5.0)
        return final, False

    def _read(self, fd: int) -> bool:
        """Read what is there; True when there may be more (a chatty child cannot starve
        the cancel check)."""
        for _ in range(64):
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                return False
            if not chunk:
                self.eof = True
                return False
            self.buffer += chunk
            if len(self.buffer) > _MAX_LINE and b"\n" not in self.buffer:
                raise IsolationFailure("internal", "the job's process sent an oversized message")
        return True

    def _messages(self) -> Iterator[dict[str, Any]]:
        while (end := self.buffer.find(b"\n")) >= 0:
            line = bytes(self.buffer[:end])
            del self.buffer[: end + 1]
            try:
                message = json.loads(line)
            except ValueError:
                log.warning("isolated process sent a line that is not JSON; ignored")
                continue
            if isinstance(message, dict):
                yield message

    def _forward_progress(self, message: dict[str, Any]) -> None:
        stage, fraction = message.get("stage"), message.get("fraction")
        if (
            stage in STAGE_WEIGHTS
            and isinstance(fraction, int | float)
            and math.isfinite(fraction)
            and 0.0 <= fraction <= 1.0
        ):
            self.progress(stage, float(fraction))

    def _result(self, final: dict[str, Any]) -> SanitizeReport:
        """The child's final message as a report, or as the error it stands for."""
        if final["type"] == "error":
            kind, message = final.get("kind"), final.get("message")
            if not (isinstance(kind, str) and _KIND.match(kind) and isinstance(message, str)):
                raise IsolationFailure("internal", "the job's process sent a malformed error")
            message = message[:_MAX_MESSAGE]
            if kind in ("out_of_memory", "internal"):
                self._log_output(f"failed: {kind}: {message}")
                raise IsolationFailure(kind, message)
            raise _engine_error(kind, message)
        try:
            report = SanitizeReport.model_validate_json(final.get("report", ""))
        except ValueError as exc:
            raise IsolationFailure("internal", "the job's process sent an invalid report") from exc
        out = self.scratch / "out"
        for name in OUTPUT_NAMES:  # the child is dead: nothing can swap these after the check
            path = out / name
            if not path.is_file() or path.is_symlink():
                raise IsolationFailure("internal", f"the job's process did not write {name}")
        # The output is checked here too, where a compromised job process cannot reach: it
        # must hold built-in classes only, as any upload must (and as the child checked).
        try:
            inspect_bounded(out / "sanitized.keras", InspectionLimits.for_this_process())
        except FinePruneError as exc:
            raise IsolationFailure(
                "internal", f"the sanitized model failed the output check: {exc.message}"
            ) from None
        return report

    def _log_output(self, what: str) -> str:
        """Log the end of the child's output for the operator (never shown to the user)."""
        tail = _tail(self.scratch / LOG_NAME)
        lines = [line for line in tail.splitlines() if line.strip() and "    @ " not in line]
        excerpt = "\n".join(lines[-40:]) if lines else "(no output)"
        log.warning("the job's process %s; its last output:\n%s", what, excerpt)
        return tail

    def _judge_death(self, returncode: int | None, cpu_used: float) -> IsolationFailure:
        """Why the child ended without a final message, in words for the user."""
        tail = self._log_output("ended without a result")
        limits = self.limits
        cpu_out = limits.cpu_seconds and cpu_used >= limits.cpu_seconds
        sig = -returncode if returncode is not None and returncode < 0 else None
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_out):
            return IsolationFailure(
                "timeout",
                f"the job used up its CPU time limit of {limits.cpu_seconds} s "
                "(FINEPRUNE_JOB_CPU_SECONDS) and was stopped",
            )
        if _OUT_OF_MEMORY.search(tail):
            return IsolationFailure("out_of_memory", out_of_memory_message(limits.memory_bytes))
        if sig is not None:
            hint = "; the system may have stopped it for lack of memory" if sig == 9 else ""
            return IsolationFailure(
                "crashed", f"the process that ran the job was killed by {_signal_name(sig)}{hint}"
            )
        return IsolationFailure(
            "crashed", f"the process that ran the job exited with status {returncode} and no result"
        )


def out_of_memory_message(memory_bytes: int) -> str:
    if memory_bytes:
        return (
            f"the job ran out of memory: its process may use {readable_bytes(memory_bytes)} "
            "(FINEPRUNE_JOB_MEMORY_BYTES)"
        )
    return "the job ran out of memory"


def _engine_error(kind: str, message: str) -> FinePruneError:
    """The engine's error class for `kind` (so jobs fail exactly as if run in-process)."""
    pending = [FinePruneError]
    while pending:
        cls = pending.pop()
        if cls.kind == kind:
            return cls(message)
        pending.extend(cls.__subclasses__())
    error = FinePruneError(message)
    error.kind = kind  # a subclass the parent never imported (it would pull in Keras)
    return error


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    """Has the child exited? Without reaping it, so its process group can still be killed."""
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _wait_unreaped(proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _exited(proc):
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        time.sleep(0.05)


def _reap(proc: subprocess.Popen[bytes]) -> float:
    """Kill the child's process group (anything it left behind too), reap it; its CPU seconds.

    The group is killed before the leader is reaped, so its id cannot have been reused.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except ChildProcessError:  # reaped by someone else; the exit status is lost
        proc.returncode = proc.returncode if proc.returncode is not None else -signal.SIGKILL
        return 0.0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


def _tail(path: Path, size: int = 64 * 1024) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - size))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def _signal_name(sig: int) -> str:
    try:
        return f"signal {sig} ({signal.Signals(sig).name})"
    except ValueError:
        return f"signal {sig}"


# --------------------------------------------------------------------------- the child


class _Channel:
    """JSON lines to the parent on an inherited pipe; the parent gone means we are done."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._last: tuple[str, float] = ("", 0.0)

    def send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode() + b"\n"
        with self._lock:
            try:
                while data:
                    data = data[os.write(self._fd, data) :]
            except BrokenPipeError:
                os._exit(70)

    def progress(self, stage: str, fraction: float) -> None:
        """Every stage change, else at most ten a second: the parent throttles writes anyway."""
        moment = time.monotonic()
        last_stage, last_time = self._last
        if stage == last_stage and moment - last_time < 0.1 and fraction < 1.0:
            return
        self._last = (stage, moment)
        self.send({"type": "progress", "stage": stage, "fraction": fraction})


def _die_with_parent(parent_pid: int) -> None:
    """A child must not outlive a pool child killed by Celery's hard limit or a lost machine.

    Elsewhere than Linux the parent's end of stdin closing tells it (`_watch_stdin`).
    """
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # it died before the line above
        os._exit(70)


def _wait_for_job() -> None:
    """Block until the parent's go line; end at once if the parent is gone instead."""
    try:
        line = sys.stdin.buffer.readline()
    except OSError:
        line = b""
    if line.strip() != b"go":
        os._exit(70)
    if sys.platform.startswith("linux"):
        return  # PR_SET_PDEATHSIG covers it, and a thread could fail under a small heap

    def exit_on_eof() -> None:  # the parent's end of stdin closing: the parent is gone
        with contextlib.suppress(OSError):
            sys.stdin.buffer.read()
        os._exit(70)

    threading.Thread(target=exit_on_eof, name="parent-watch", daemon=True).start()


def _set_limits(memory_bytes: int, cpu_seconds: int) -> None:
    """Cap this process before it reads anything it was given (lowering needs no privilege)."""
    for which, soft, hard in (
        (resource.RLIMIT_DATA, memory_bytes, memory_bytes),
        (resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + _CPU_GRACE_S),
    ):
        if soft <= 0:
            continue
        _, current_hard = resource.getrlimit(which)
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(which, (soft, hard))


def _configure_tensorflow(threads: int) -> None:
    """Import TensorFlow, size its thread pools, let GPU memory grow instead of grabbing it.

    Both must be set before TensorFlow runs anything, so they are the first thing done after
    the import. `threads` (cores / worker slots) keeps two slots from each running every core;
    memory growth, on the `fineprune-gpu` queue (one worker per GPU), lets the engine share the
    card politely. The engine is imported too: all of this is what a warm process saves a job.
    """
    import tensorflow as tf

    if threads > 0:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised in this process
            log.warning("could not enable memory growth on %s", gpu.name)
    import fineprune.pipeline  # noqa: F401  (Keras, matplotlib and the engine, ahead of the job)


_inherited: list[str] = []  # the environment's names as the child was given them


def _open_files() -> list[str]:
    """Regular files this process has open (Linux), by path."""
    found = []
    with contextlib.suppress(OSError):
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/self/fd/{fd}")
                if target.startswith("/") and os.path.isfile(target):
                    found.append(target)
    return sorted(found)


def _probe(out: Path, spec: dict[str, Any], open_at_go: list[str]) -> None:
    """Test hook: what this process was given, for the tests to check."""
    data_limit = resource.getrlimit(resource.RLIMIT_DATA)
    cpu_limit = resource.getrlimit(resource.RLIMIT_CPU)
    probe = {
        "warm": bool(spec.get("warm")),
        "open_files_at_go": open_at_go,
        "intra_op_threads": _tf_threads(),
        "pid": os.getpid(),
        "environ": _inherited,  # before imports: TensorFlow and h5py add names of their own
        "cwd": os.getcwd(),
        "home": os.environ.get("HOME"),
        "tmpdir": tempfile.gettempdir(),
        "rlimit_data": list(data_limit),
        "rlimit_cpu": list(cpu_limit),
        "own_session": os.getsid(0) == os.getpid(),
        "modules_at_go": sorted(m for m in ("tensorflow", "keras") if m in sys.modules),
    }
    (out / PROBE_NAME).write_text(json.dumps(probe))


def _tf_threads() -> int | None:
    if "tensorflow" not in sys.modules:
        return None
    import tensorflow as tf

    return int(tf.config.threading.get_intra_op_parallelism_threads())


def _fault(hook: str) -> None:
    """Test hooks that end this process the hard way."""
    if hook == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif hook == "segfault":
        import ctypes

        ctypes.string_at(0)
    elif hook == "exit":
        os._exit(3)


def _sanitize(spec: dict[str, Any], channel: _Channel, open_at_go: list[str]) -> SanitizeReport:
    hook = spec.get("test_hook")
    out = Path(spec["out"])
    if hook == "probe":
        _probe(out, spec, open_at_go)
    channel.progress("load", 0.0)
    from fineprune.pipeline import sanitize

    def progress(stage: str, fraction: float) -> None:
        channel.progress(stage, fraction)
        if stage == "profile" and hook is not None:
            _fault(hook)

    paths = {role: Path(name) for role, name in spec["inputs"].items()}
    return sanitize(
        paths["model"],
        paths["data"],
        out,
        SanitizeOptions.model_validate(spec["options"]),
        trigger_data=paths.get("trigger_data"),
        test_data=paths.get("test_data"),
        progress=progress,
    )


def _near_memory_limit(memory_bytes: int) -> bool:
    """Is the heap at its limit? Then a C extension's odd error is a failed allocation.

    Code that does not check its allocations fails in odd ways (seen: "SystemError: error
    return without exception set" importing TensorFlow under 256 MiB).
    """
    if not memory_bytes:
        return False
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return False
    match = re.search(r"^VmData:\s+(\d+) kB", status, re.MULTILINE)
    used = int(match.group(1)) * 1024 if match else 0
    return used >= memory_bytes - max(64 * MiB, memory_bytes // 10)


def _error_message(exc: BaseException, memory_bytes: int) -> dict[str, Any]:
    if isinstance(exc, FinePruneError):
        return {"type": "error", "kind": exc.kind, "message": exc.message}
    text = one_line(exc)
    if (
        isinstance(exc, MemoryError)
        or _OUT_OF_MEMORY.search(f"{type(exc).__name__} {exc}")
        or _near_memory_limit(memory_bytes)
    ):
        return {
            "type": "error",
            "kind": "out_of_memory",
            "message": out_of_memory_message(memory_bytes),
        }
    return {"type": "error", "kind": "internal", "message": text}


def child_main(fd: int, start: dict[str, Any]) -> None:
    """The child: limits, TensorFlow, then its one job; one final message, then a quick exit.

    Everything before the go line is the same for every job (a warm process does it ahead):
    nothing of the job exists yet. A failure there (a memory limit too small to import
    TensorFlow) is kept and reported as the job's result.
    """
    reserve: bytearray | None = bytearray(MiB)  # freed to report a MemoryError
    _inherited[:] = sorted(os.environ)
    _die_with_parent(int(start["parent_pid"]))
    for sig in (signal.SIGXCPU, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    memory_bytes = int(start["memory_bytes"])
    _set_limits(memory_bytes, int(start["cpu_seconds"]))
    import faulthandler

    faulthandler.enable()
    channel = _Channel(fd)
    failed: BaseException | None = None
    try:
        _configure_tensorflow(int(start.get("threads") or 0))
    except BaseException as exc:
        failed = exc  # the reserve stays: waiting and reporting need a little heap
    _wait_for_job()
    try:
        open_at_go = _open_files()
        if failed is not None:
            raise failed
        spec = json.loads(Path(SPEC_NAME).read_text())
        report = _sanitize(spec, channel, open_at_go)
        message: dict[str, Any] = {"type": "report", "report": report.model_dump_json()}
    except BaseException as exc:
        reserve = None
        message = _error_message(exc, memory_bytes)
        if not isinstance(exc, FinePruneError):
            traceback.print_exception(exc)
    del reserve
    channel.send(message)
    sys.stderr.flush()
    os._exit(0)  # TensorFlow's teardown is slow and has nothing left to do


if __name__ == "__main__":
    child_main(int(sys.argv[1]), json.loads(sys.argv[2]))
