"""The service's own costs, each beside a baseline measured in the same run.

Run from the repository root (Redis at 127.0.0.1:6379; DB 13 is emptied before and after):

    .venv/bin/python -m bench.service_bench                          # ~6 minutes on 2 busy cores
    .venv/bin/python -m bench.service_bench --jobs 2 --repeats 2 --seconds 8     # quicker

1. **Job wall time**: the same small job (a 16x16 CNN from `tests/factories.py`, 240 images)
   run by `fineprune sanitize` (a fresh interpreter: what a user on the command line waits
   for) and through the service (submit, poll every 0.1 s until it has succeeded) with a warm
   worker: its waiting job process has TensorFlow imported before each submission. Pairs
   alternate; the ratio is service / CLI per pair.
2. **Status poll**: `GET /v1/jobs/{id}` of the real API (bearer key, record read, the resource
   serialized) against `bench/bare_app.py`, a bare FastAPI endpoint answering the same body,
   each under its own uvicorn, driven open loop at each `--rates` for `--seconds`: request i is
   due at i / rate, and its latency counts from then, so a server that falls behind shows it.
   Per run: p50, p99, answers per second, and server CPU per answer (from /proc).

Prints both tables and writes bench/results/service.json. The clients share the machine's
cores with the servers: the ratios are what is comparable, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import httpx
import numpy as np
from service_helpers import (
    Proc,
    free_port,
    owned_redis_db,
    service_env,
    start_api,
    start_worker,
    wait_api,
    wait_worker,
)

RESULTS = REPO / "bench" / "results" / "service.json"
REDIS_URL = "redis://127.0.0.1:6379/13"
API_KEY = "bench-key"


def log(message: str) -> None:
    print(message, flush=True)


def spread(values: Sequence[float]) -> dict[str, float]:
    return {
        "min": round(float(np.min(values)), 3),
        "median": round(float(np.median(values)), 3),
        "max": round(float(np.max(values)), 3),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        found.extend(int(c) for c in children)
        pending.extend(int(c) for c in children)
    return found


def wait_warm(worker: Proc, timeout: float = 180.0) -> None:
    """Until a process under the worker has TensorFlow loaded and waits for its job."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in descendants(worker.popen.pid):
            try:
                maps = Path(f"/proc/{pid}/maps").read_text(errors="replace")
            except OSError:
                continue
            if "tensorflow" in maps and "workers.isolation" in Path(
                f"/proc/{pid}/cmdline"
            ).read_text(errors="replace"):
                time.sleep(2.0)  # the engine's own imports follow TensorFlow's
                return
        time.sleep(0.3)
    raise SystemExit(f"no warm job process after {timeout:.0f} s:\n{worker.tail()}")


# --------------------------------------------------------------------------- jobs


def make_inputs(folder: Path) -> tuple[Path, Path]:
    from factories import save_npz, textures, train_backdoored

    model = folder / "model.keras"
    train_backdoored(seed=0, epochs=1).save(model)
    x, y = textures(240, seed=100)
    return model, save_npz(folder / "clean.npz", x=x, y=y)


def cli_job(model: Path, data: Path, out: Path, epochs: int, env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fineprune",
            "sanitize",
            str(model),
            "--data",
            str(data),
            "--out",
            str(out),
            "--epochs",
            str(epochs),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the CLI failed:\n{done.stderr[-2000:]}")
    return elapsed


def service_job(base_url: str, model: Path, data: Path, epochs: int) -> tuple[float, str]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    files = {
        "model": (model.name, model.read_bytes(), "application/octet-stream"),
        "data": (data.name, data.read_bytes(), "application/octet-stream"),
    }
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:
        started = time.perf_counter()
        response = client.post(
            "/v1/jobs", files=files, data={"options": json.dumps({"epochs": epochs})}
        )
        response.raise_for_status()
        job_id = response.json()["id"]
        while True:
            body = client.get(f"/v1/jobs/{job_id}").json()
            if body["state"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.1)
        elapsed = time.perf_counter() - started
    if body["state"] != "succeeded":
        raise SystemExit(f"the service job ended {body['state']}: {body.get('error')}")
    return elapsed, job_id


# --------------------------------------------------------------------------- polls


async def open_loop(url: str, headers: dict[str, str], rate: float, seconds: float) -> dict:
    """Requests due at i / rate; latency from when each was due; answers per second."""
    count = int(rate * seconds)
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=30) as client:
        await client.get(url)  # connect once before the clock starts
        start = time.perf_counter()
        last = start

        async def one(i: int) -> None:
            nonlocal errors, last
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                response = await client.get(url)
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            now = time.perf_counter()
            last = max(last, now)
            if ok:
                latencies.append(now - due)
            else:
                errors += 1

        await asyncio.gather(*(one(i) for i in range(count)))
    ms = np.asarray(latencies) * 1000.0
    return {
        "requests": count,
        "errors": errors,
        "answers_per_s": round(len(latencies) / max(last - start, 1e-9), 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
    }


def poll_run(url: str, headers: dict[str, str], pid: int, rate: float, seconds: float) -> dict:
    before = cpu_seconds(pid)
    result = asyncio.run(open_loop(url, headers, rate, seconds))
    result["server_cpu_ms_per_answer"] = round(
        (cpu_seconds(pid) - before) * 1000.0 / max(result["requests"] - result["errors"], 1), 3
    )
    return result


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3, help="CLI / service pairs")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rates", type=float, nargs="+", default=[200.0, 500.0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per poll run")
    parser.add_argument("--repeats", type=int, default=3, help="poll runs per rate and server")
    parser.add_argument("--skip-jobs", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "cpus": len(os.sched_getaffinity(0)),
        "git_head": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip(),
    }
    with (
        tempfile.TemporaryDirectory(prefix="fineprune-service-bench-") as tmp,
        owned_redis_db(REDIS_URL),
    ):
        root = Path(tmp)
        artifacts = root / "artifacts"
        env = service_env(artifacts, REDIS_URL, api_keys=API_KEY, worker_concurrency=1)
        port, bare_port = free_port(), free_port()
        api = start_api(env, port, root / "api.log")
        worker = start_worker(env, root / "worker.log", "bench")
        procs = [api, worker]
        try:
            base = f"http://127.0.0.1:{port}"
            wait_api(base, api)
            wait_worker(worker)
            log("making the job's inputs ...")
            model, data = make_inputs(root)
            if not args.skip_jobs:
                result["jobs"] = jobs_side_by_side(args, base, model, data, root, worker)
            result["polls"] = polls_side_by_side(args, base, model, data, root, env, api, procs)
            result["polls_bare_port"] = bare_port
        finally:
            for proc in procs:
                proc.stop()
    print_tables(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.out}")
    return result


def jobs_side_by_side(
    args: argparse.Namespace, base: str, model: Path, data: Path, root: Path, worker: Proc
) -> dict[str, Any]:
    cli_env = {k: v for k, v in os.environ.items() if not k.startswith("FINEPRUNE_")}
    cli_env["PYTHONPATH"] = str(REPO)
    cli, service, ratios = [], [], []
    for i in range(args.jobs):
        wait_warm(worker)
        took, _ = service_job(base, model, data, args.epochs)
        service.append(took)
        cli.append(cli_job(model, data, root / f"cli-{i}", args.epochs, cli_env))
        ratios.append(service[-1] / cli[-1])
        log(f"job {i + 1}: service {service[-1]:.2f} s, CLI {cli[-1]:.2f} s")
    return {
        "cli_s": [round(v, 2) for v in cli],
        "service_warm_s": [round(v, 2) for v in service],
        "service_over_cli": spread(ratios),
        "epochs": args.epochs,
    }


def polls_side_by_side(
    args: argparse.Namespace,
    base: str,
    model: Path,
    data: Path,
    root: Path,
    env: dict[str, str],
    api: Proc,
    procs: list[Proc],
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
        response = client.post(
            "/v1/jobs",
            files={"model": ("m.keras", model.read_bytes()), "data": ("d.npz", data.read_bytes())},
            data={"options": json.dumps({"epochs": 1})},
        )
        job_id = response.json()["id"]
        client.delete(f"/v1/jobs/{job_id}")  # a final job: its body no longer changes
        body = client.get(f"/v1/jobs/{job_id}").content
    body_file = root / "body.json"
    body_file.write_bytes(body)
    bare_port = free_port()
    bare = Proc.start(
        "bare",
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.bare_app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(bare_port),
            "--log-level",
            "warning",
        ],
        {**env, "BENCH_BODY_FILE": str(body_file)},
        root / "bare.log",
    )
    procs.append(bare)
    wait_bare = f"http://127.0.0.1:{bare_port}/v1/jobs/{job_id}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(wait_bare, timeout=2).content == body:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the bare endpoint did not start:\n{bare.tail()}")
        time.sleep(0.2)
    targets = {
        "api": (f"{base}/v1/jobs/{job_id}", headers, api.popen.pid),
        "bare": (wait_bare, {}, bare.popen.pid),
    }
    out: dict[str, Any] = {"body_bytes": len(body), "seconds": args.seconds, "rates": {}}
    for rate in args.rates:
        runs: dict[str, list[dict]] = {"api": [], "bare": []}
        for repeat in range(args.repeats):
            order = ("bare", "api") if repeat % 2 == 0 else ("api", "bare")
            for name in order:
                url, hdrs, pid = targets[name]
                runs[name].append(poll_run(url, hdrs, pid, rate, args.seconds))
            log(f"{rate:.0f}/s run {repeat + 1}: api {runs['api'][-1]}, bare {runs['bare'][-1]}")
        pairs = list(zip(runs["api"], runs["bare"], strict=True))
        out["rates"][str(int(rate))] = {
            "runs": runs,
            "p50_ratio": spread([a["p50_ms"] / b["p50_ms"] for a, b in pairs]),
            "p99_ratio": spread([a["p99_ms"] / b["p99_ms"] for a, b in pairs]),
            "cpu_ratio": spread(
                [
                    a["server_cpu_ms_per_answer"] / max(b["server_cpu_ms_per_answer"], 1e-6)
                    for a, b in pairs
                ]
            ),
            "api_answers_per_s": spread([a["answers_per_s"] for a in runs["api"]]),
            "bare_answers_per_s": spread([b["answers_per_s"] for b in runs["bare"]]),
        }
    return out


def print_tables(r: dict[str, Any]) -> None:
    lines = ["", f"{r['cpus']} CPUs, load average at start {r['load_average_at_start']}"]
    if "jobs" in r:
        j = r["jobs"]
        lines += [
            f"job wall time, {len(j['cli_s'])} pairs, epochs={j['epochs']}:",
            f"  CLI (fineprune sanitize)      {j['cli_s']} s",
            f"  service, warm worker          {j['service_warm_s']} s",
            "  service / CLI                 min {min} / median {median} / max {max}".format(
                **j["service_over_cli"]
            ),
        ]
    lines.append("GET /v1/jobs/{id} vs a bare endpoint (ratios api / bare, min / median / max):")
    for rate, v in r["polls"]["rates"].items():
        fmt = "{min} / {median} / {max}"
        lines += [
            f"  {rate}/s: p50 {fmt.format(**v['p50_ratio'])}, p99 {fmt.format(**v['p99_ratio'])}"
            f", CPU per answer {fmt.format(**v['cpu_ratio'])}",
            f"         answers/s api {fmt.format(**v['api_answers_per_s'])}"
            f", bare {fmt.format(**v['bare_answers_per_s'])}",
        ]
    log("\n".join(lines))


if __name__ == "__main__":
    main()
