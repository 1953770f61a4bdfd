"""Load on the real service: concurrent status polls and submissions, and exactly-once jobs.

Run from the repository root (Redis at 127.0.0.1:6379; DB 11 is emptied before and after):

    .venv/bin/python -m bench.load_bench
    .venv/bin/python -m bench.load_bench --jobs 5 --polls 1000      # quicker

Starts a real uvicorn API and one real Celery worker (the same command lines as the tests,
`tests/service_helpers.py`), loopback only, on a temporary artifacts directory. First the
baseline: one client, one request at a time, worker idle (a few submissions, cancelled at
once, then polls of those jobs and health checks). Then, at the same time: `--jobs`
submissions of a tiny 16x16 model by up to `--concurrency` clients, and `--clients` clients
polling `GET /v1/jobs/{id}` and `GET /healthz` until `--polls` answers, while the worker
drains the jobs. Then it waits (at most `--timeout` s) for every job to be final and checks,
in each job's record, that it reached exactly one final state, once, on its first attempt.
Prints a table (each number beside its baseline) and writes bench/results/load.json.

The clients run in this process (asyncio, one connection each) on the same machine as the API
and the worker: on a small machine they compete with what they measure, and the numbers say
what one box does with everything on it, not what the API could do alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "tests"):  # the tests' process helpers and tiny-model factories
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import httpx
import numpy as np
from service_helpers import (
    free_port,
    service_env,
    start_api,
    start_worker,
    wait_api,
    wait_worker,
)

from jobs.records import JobRecord, RecordStore

RESULTS = REPO / "bench" / "results" / "load.json"
REDIS_URL = "redis://127.0.0.1:6379/11"
API_KEY = "bench-key"
FINAL = ("succeeded", "failed", "cancelled")


def log(message: str) -> None:
    print(message, flush=True)


@dataclass
class Samples:
    """Latencies (seconds) and status codes of one kind of request."""

    latencies: list[float] = field(default_factory=list)
    sent_at: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    started: float = 0.0
    ended: float = 0.0

    def add(self, sent_at: float, status: int) -> None:
        """One answer to a request sent at `sent_at` (perf_counter), received now."""
        self.latencies.append(time.perf_counter() - sent_at)
        self.sent_at.append(sent_at)
        self.statuses[status] += 1

    def split(self, at: float) -> dict[str, dict[str, float]]:
        """Percentiles of the requests sent before and after `at` (the end of the submits)."""
        sent, ms = np.asarray(self.sent_at), np.asarray(self.latencies) * 1000.0
        out = {}
        for name, part in (("while_submitting", ms[sent < at]), ("after_submits", ms[sent >= at])):
            if len(part):
                out[name] = {"requests": len(part)} | _percentiles(part)
        return out

    def summary(self) -> dict[str, Any]:
        ms = np.asarray(self.latencies) * 1000.0
        span = max(self.ended - self.started, 1e-9)
        out: dict[str, Any] = {
            "requests": len(self.latencies),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "transport_errors": dict(self.errors),
            "seconds": round(span, 2),
            "per_second": round(len(self.latencies) / span, 1),
        }
        if len(ms):
            out |= _percentiles(ms)
        return out


def _percentiles(ms: np.ndarray) -> dict[str, float]:
    return {
        f"{name}_ms": round(float(np.percentile(ms, q)), 1)
        for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
    }


def tiny_inputs(root: Path, images: int) -> dict[str, bytes]:
    """An untrained 16x16 CNN and matching data, as the tests build them (TensorFlow here)."""
    from factories import save_npz, sequential_bn_flatten, textures

    sequential_bn_flatten(seed=0).save(root / "model.keras")
    x, y = textures(images, seed=1)
    save_npz(root / "data.npz", x=x, y=y)
    return {
        "model": (root / "model.keras").read_bytes(),
        "data": (root / "data.npz").read_bytes(),
    }


async def poll_all(
    base_url: str, ids: list[str], clients: int, polls: int, deadline: float
) -> dict[str, Samples]:
    """`clients` clients, each alternating job polls and health checks, until `polls` answers.

    They start with the submissions, so they overlap the burst and then the worker's training;
    ids are drawn from every job known so far (the baseline's, then each accepted one).
    """
    by_kind = {"poll": Samples(), "healthz": Samples()}
    done = 0
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def client_loop(n: int) -> None:
        nonlocal done
        rng = random.Random(n)
        async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as client:
            turn = n
            while done < polls and time.perf_counter() < deadline:
                kind = "poll" if turn % 2 == 0 else "healthz"
                turn += 1
                url = f"/v1/jobs/{rng.choice(ids)}" if kind == "poll" else "/healthz"
                done += 1
                t0 = time.perf_counter()
                try:
                    response = await client.get(url)
                except httpx.HTTPError as exc:
                    by_kind[kind].errors[type(exc).__name__] += 1
                    continue
                by_kind[kind].add(t0, response.status_code)

    started = time.perf_counter()
    await asyncio.gather(*(client_loop(n) for n in range(clients)))
    ended = time.perf_counter()
    for samples in by_kind.values():
        samples.started, samples.ended = started, ended
    return by_kind


async def load_phase(
    base_url: str, inputs: dict[str, bytes], known: Sequence[str], args: argparse.Namespace
) -> tuple[Samples, dict[str, Samples], list[str]]:
    """Submissions and polls at the same time; returns the ids of the accepted submissions."""
    accepted: list[str] = []
    pollable = list(known)  # grows as submissions are accepted
    options = {"epochs": args.epochs, "patience": args.epochs}

    async def submitter() -> Samples:
        gate = asyncio.Semaphore(args.concurrency)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        samples = Samples()

        async def one(i: int) -> None:
            async with gate, httpx.AsyncClient(base_url=base_url, headers=headers) as client:
                files = {name: (f"{name}-{i}.bin", blob) for name, blob in inputs.items()}
                data = {"options": json.dumps({**options, "seed": i})}
                t0 = time.perf_counter()
                try:
                    response = await client.post("/v1/jobs", files=files, data=data, timeout=120)
                except httpx.HTTPError as exc:
                    samples.errors[type(exc).__name__] += 1
                    return
                samples.add(t0, response.status_code)
                if response.status_code == 202:
                    accepted.append(response.json()["id"])
                    pollable.append(accepted[-1])

        samples.started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(args.jobs)))
        samples.ended = time.perf_counter()
        return samples

    deadline = time.perf_counter() + args.poll_seconds
    submits, polls = await asyncio.gather(
        submitter(), poll_all(base_url, pollable, args.clients, args.polls, deadline)
    )
    return submits, polls, accepted


def wait_final(base_url: str, ids: Sequence[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Every job's last resource once all are final, or whatever they are at the timeout."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    bodies: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
        pending = list(ids)
        while pending and time.monotonic() < deadline:
            for job_id in list(pending):
                body = client.get(f"/v1/jobs/{job_id}").json()
                bodies[job_id] = body
                if body["state"] in FINAL:
                    pending.remove(job_id)
            if pending:
                time.sleep(1.0)
    return bodies


def baseline_phase(
    base_url: str, inputs: dict[str, bytes], args: argparse.Namespace
) -> tuple[dict[str, Samples], list[str]]:
    """The baseline, before any load: one client, one request at a time, the worker idle.

    Its submissions are cancelled at once (DELETE), so the worker stays idle; their ids are
    what the baseline polls (and the load's pollers start with), and they join the
    exactly-once check as cancelled jobs.
    """
    by_kind = {"submit": Samples(), "poll": Samples(), "healthz": Samples()}
    made: list[str] = []
    headers = {"Authorization": f"Bearer {API_KEY}"}
    options = json.dumps({"epochs": args.epochs, "patience": args.epochs})
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:
        by_kind["submit"].started = time.perf_counter()
        for i in range(max(1, args.baseline_submits)):
            files = {name: (f"{name}-b{i}.bin", blob) for name, blob in inputs.items()}
            t0 = time.perf_counter()
            response = client.post("/v1/jobs", files=files, data={"options": options})
            by_kind["submit"].add(t0, response.status_code)
            if response.status_code != 202:
                raise SystemExit(f"the baseline submission was refused: {response.text}")
            made.append(response.json()["id"])
            client.delete(f"/v1/jobs/{made[-1]}")
        by_kind["submit"].ended = time.perf_counter()
        started = time.perf_counter()
        for i in range(args.baseline_requests):
            for kind, url in (("poll", f"/v1/jobs/{made[i % len(made)]}"), ("healthz", "/healthz")):
                t0 = time.perf_counter()
                response = client.get(url)
                by_kind[kind].add(t0, response.status_code)
        ended = time.perf_counter()
        for kind in ("poll", "healthz"):
            by_kind[kind].started, by_kind[kind].ended = started, ended
    return by_kind, made


def exactly_once(records: RecordStore, ids: Sequence[str]) -> dict[str, Any]:
    """From each job's own event log: one final event, matching its state, and one run (a job
    cancelled before it started has none)."""
    problems: list[str] = []
    states: Counter[str] = Counter()
    attempts: Counter[int] = Counter()
    queued_s: list[float] = []
    run_s: list[float] = []
    stages: dict[str, list[float]] = {}
    for job_id in ids:
        record: JobRecord | None = records.get(job_id)
        if record is None:
            problems.append(f"{job_id}: no record")
            continue
        states[record.state.value] += 1
        attempts[record.attempts] += 1
        finals = [e for e in record.events if e.state.final]
        runs = [e for e in record.events if e.state.value == "running"]
        if len(finals) != 1:
            problems.append(f"{job_id}: {len(finals)} final events")
        elif finals[0].state != record.state:
            problems.append(f"{job_id}: final event {finals[0].state} but state {record.state}")
        ran_once = len(runs) == 1 and record.attempts == 1
        cancelled_early = record.state.value == "cancelled" and len(runs) <= 1
        if not (ran_once or cancelled_early):
            problems.append(f"{job_id}: {len(runs)} running events, {record.attempts} attempts")
        if record.state.value != "succeeded":
            continue  # timings of whole runs only
        for stage, seconds in record.timings.items():
            stages.setdefault(stage, []).append(seconds)
        if record.started_at and record.finished_at:
            queued_s.append((record.started_at - record.created_at).total_seconds())
            run_s.append((record.finished_at - record.started_at).total_seconds())
    return {
        "jobs": len(ids),
        "states": dict(states),
        "attempts": {str(k): v for k, v in sorted(attempts.items())},
        "exactly_once": not problems,
        "problems": problems,
        "queue_wait_s": _spread(queued_s),
        "run_s": _spread(run_s),
        "stage_p50_s": {k: round(float(np.median(v)), 2) for k, v in stages.items()},
    }


def _spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {
        "min": round(float(arr.min()), 2),
        "p50": round(float(np.percentile(arr, 50)), 2),
        "max": round(float(arr.max()), 2),
    }


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def code_version() -> dict[str, Any]:
    """HEAD, and any uncommitted change to the code this bench runs (others edit the tree)."""

    def git(*argv: str) -> str:
        try:
            done = subprocess.run(
                ["git", *argv], cwd=REPO, capture_output=True, text=True, check=True
            )
        except (OSError, subprocess.CalledProcessError):
            return ""
        return done.stdout.strip()

    dirty = git("status", "--porcelain", "--", "service", "workers", "jobs", "fineprune", "schemas")
    return {
        "commit": git("rev-parse", "--short", "HEAD") or "unknown",
        "uncommitted": [line[3:] for line in dirty.splitlines()],
    }


def flush_db(url: str) -> None:
    """DB 11 belongs to this bench while it runs: queued messages never outlive a run."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.flushdb()
    finally:
        client.close()


def print_table(result: dict[str, Any]) -> None:
    head = ("request", "n", "p50 ms", "p90 ms", "p99 ms", "max ms", "req/s")
    log("")
    log(f"{head[0]:<9}" + "".join(f"{h:>9}" for h in head[1:]) + "  status")
    for kind in ("submit", "poll", "healthz"):
        for label, s in ((kind, result["load"][kind]), ("  alone", result["baseline"][kind])):
            statuses = ", ".join(f"{k}: {v}" for k, v in s["statuses"].items())
            if s["transport_errors"]:
                statuses += f"; errors {s['transport_errors']}"
            cells = [s.get(f"{q}_ms", 0.0) for q in ("p50", "p90", "p99", "max")]
            row = "".join(f"{c:>9.1f}" for c in [*cells, s["per_second"]])
            log(f"{label:<9}{s['requests']:>9}{row}  {statuses}")
    log("(alone: the baseline, one client, one request at a time, worker idle)")
    for kind in ("poll", "healthz"):
        parts = [
            f"{when.replace('_', ' ')}: n {p['requests']}, p50 {p['p50_ms']:.0f}, "
            f"p99 {p['p99_ms']:.0f}, max {p['max_ms']:.0f} ms"
            for when in ("while_submitting", "after_submits")
            if (p := result["load"][kind].get(when))
        ]
        log(f"{kind}: " + "; ".join(parts))
    jobs = result["jobs"]
    log(
        f"\njobs: {jobs['jobs']} submitted, states {jobs['states']}, attempts {jobs['attempts']}, "
        f"exactly once: {jobs['exactly_once']}; all final {result['drain_s']:.1f} s after the "
        f"first submit; queue wait {jobs['queue_wait_s']} s, run {jobs['run_s']} s; "
        f"median stage seconds {jobs['stage_p50_s']}"
    )
    for problem in jobs["problems"]:
        log(f"  PROBLEM {problem}")
    before, after = result["machine_before"], result["machine_after"]
    log(
        f"machine: {before['cpus']} CPUs, load average before {before['load_average']}, "
        f"after {after['load_average']}"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    before = machine()
    with tempfile.TemporaryDirectory(prefix="fineprune-load-") as tmp:
        root = Path(tmp)
        artifacts, logs = root / "artifacts", root / "logs"
        logs.mkdir()
        log("building the tiny model and data ...")
        inputs = tiny_inputs(root, args.images)
        flush_db(args.redis_url)
        env = service_env(artifacts, args.redis_url, api_keys=API_KEY)
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        api = start_api(env, port, logs / "api.log")
        worker = start_worker(env, logs / "worker.log", "loadworker")
        try:
            wait_api(base_url, api)
            wait_worker(worker, timeout=120)
            log(
                f"API and worker up; baseline, then {args.jobs} submissions ({args.concurrency} "
                f"at a time) and {args.clients} polling clients ({args.polls} requests) ..."
            )
            baseline, cancelled = baseline_phase(base_url, inputs, args)
            t0 = time.perf_counter()
            submits, polls, ids = asyncio.run(load_phase(base_url, inputs, cancelled, args))
            log(f"load phase done in {time.perf_counter() - t0:.1f} s; waiting for the jobs ...")
            bodies = wait_final(base_url, [*cancelled, *ids], args.timeout)
            drained = time.perf_counter() - t0
            ids = [*ids, *cancelled]
            not_final = [i for i in ids if bodies.get(i, {}).get("state") not in FINAL]
            jobs = exactly_once(RecordStore.sqlite(artifacts / "state"), ids)
            if not_final:
                jobs["exactly_once"] = False
                jobs["problems"].append(f"{len(not_final)} jobs not final after {args.timeout} s")
            api_alive = api.popen.poll() is None and worker.popen.poll() is None
        finally:
            worker.stop()
            api.stop()
            flush_db(args.redis_url)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "code": code_version(),
        "parameters": {k: v for k, v in vars(args).items() if k not in ("out", "redis_url")},
        "load": {"submit": submits.summary()}
        | {
            kind: samples.summary() | samples.split(submits.ended)
            for kind, samples in polls.items()
        },
        "baseline": {kind: samples.summary() for kind, samples in baseline.items()},
        "jobs": jobs,
        "drain_s": round(drained, 1),
        "processes_alive_at_end": api_alive,
        "machine_before": before,
        "machine_after": machine(),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=20, help="submissions (default 20)")
    parser.add_argument("--concurrency", type=int, default=20, help="submissions in flight")
    parser.add_argument("--clients", type=int, default=20, help="concurrent polling clients")
    parser.add_argument("--polls", type=int, default=4000, help="poll + healthz requests in all")
    parser.add_argument("--poll-seconds", type=float, default=120.0, help="cap on polling time")
    parser.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs per job")
    parser.add_argument("--images", type=int, default=160, help="clean images per job")
    parser.add_argument("--timeout", type=float, default=600.0, help="cap on draining the jobs")
    parser.add_argument(
        "--baseline-requests", type=int, default=200, help="baseline polls and health checks each"
    )
    parser.add_argument(
        "--baseline-submits",
        type=int,
        default=3,
        help="baseline submissions (then cancelled), >= 1",
    )
    parser.add_argument("--redis-url", default=REDIS_URL)
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.out}")
    ok = result["jobs"]["exactly_once"] and result["processes_alive_at_end"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
