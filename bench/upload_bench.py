"""Upload throughput of `POST /v1/jobs` beside a streaming-to-disk baseline, in the same run.

Run from the repository root (Redis at 127.0.0.1:6379; DB 9 is emptied before and after):

    .venv/bin/python -m bench.upload_bench                 # a 256 MiB model, 9 rounds
    .venv/bin/python -m bench.upload_bench --megabytes 512 --rounds 3

Builds a Dense model whose stored weights take `--megabytes` (Keras writes them uncompressed in
the .keras archive), and the same multipart body twice over: once to the real API (uvicorn,
the upload parsed, hashed and written to the store, then every cheap check, in its bounded
process, then the job queued and at once cancelled), once to a bare ASGI app in its own
uvicorn that writes the body to a file and fsyncs it (the floor: no parsing, no hash, no
check, the same 4 MiB writes off the event loop). The client sends the bytes as they are over
a socket, so it costs both the same little. Rounds alternate the two so the load of the shared
machine falls on both. Prints
MB/s (min/median/max) for each, the ratio of the medians, and both servers' peak resident
memory, which must not grow with the upload. Writes bench/results/upload.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "tests"):  # the tests' process helpers
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import httpx
import numpy as np
from service_helpers import Proc, free_port, service_env, start_api, wait_api

RESULTS = REPO / "bench" / "results" / "upload.json"
REDIS_URL = "redis://127.0.0.1:6379/9"
API_KEY = "bench-key"
BOUNDARY = "benchb0undary"
CHUNK = 1024**2
MiB = 1024**2


async def baseline_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The floor: stream the body to a file in $FINEPRUNE_BENCH_DIR, fsync, answer 200.

    As fast as a bare server streams to disk: the body is gathered into 4 MiB pieces, each
    written by a worker thread while the next arrives (writing 64 KiB at a time in the event
    loop was slower than the API itself)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    folder = Path(os.environ["FINEPRUNE_BENCH_DIR"])
    target = folder / f"upload-{time.monotonic_ns()}"
    received = 0
    pending = bytearray()
    with target.open("wb") as fh:
        more = True
        while more:
            message = await receive()
            body = message.get("body", b"")
            pending += body
            received += len(body)
            more = message.get("more_body", False)
            if len(pending) >= 4 * MiB or not more:
                await asyncio.to_thread(fh.write, bytes(pending))
                pending.clear()
        await asyncio.to_thread(_sync, fh)
    target.unlink()
    payload = json.dumps({"bytes": received}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def _sync(fh: Any) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def log(message: str) -> None:
    print(message, flush=True)


def build_inputs(root: Path, megabytes: int) -> dict[str, Path]:
    """A Dense model of about `megabytes` of float32 weights and 40 samples that fit it."""
    import keras

    width = max(64, int((megabytes * MiB / 4) ** 0.5))
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((width,)),
            keras.layers.Dense(width, name="wide"),
            keras.layers.Dense(4, activation="softmax", name="out"),
        ]
    )
    model.save(root / "model.keras")
    rng = np.random.default_rng(0)
    x = rng.random((40, width), dtype=np.float32)
    np.savez(root / "data.npz", x=x, y=np.arange(40) % 4)
    return {"model": root / "model.keras", "data": root / "data.npz"}


def multipart(files: dict[str, Path]) -> tuple[int, Iterator[bytes]]:
    """The body's length and its bytes in 1 MiB pieces, read from the files as they go."""
    heads = {
        name: (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{path.name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        for name, path in files.items()
    }
    tail = f"--{BOUNDARY}--\r\n".encode()
    sizes = [p.stat().st_size for p in files.values()]
    length = sum(len(h) + n + 2 for h, n in zip(heads.values(), sizes, strict=True))
    length += len(tail)

    def pieces() -> Iterator[bytes]:
        for name, path in files.items():
            yield heads[name]
            with path.open("rb") as fh:
                while chunk := fh.read(CHUNK):
                    yield chunk
            yield b"\r\n"
        yield tail

    return length + 0, pieces()


def upload(port: int, target: str, files: dict[str, Path], auth: str) -> tuple[float, int, Any]:
    """Send the multipart body over a plain socket; seconds until the whole answer is in."""
    length, body = multipart(files)
    head = (
        f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n{auth}Connection: close"
        "\r\n\r\n"
    ).encode()
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=600) as sock:
        sock.sendall(head)
        for piece in body:
            sock.sendall(piece)
        answer = bytearray()
        while chunk := sock.recv(65536):
            answer += chunk
    took = time.perf_counter() - started
    status_line, _, rest = bytes(answer).partition(b"\r\n")
    payload = json.loads(rest.partition(b"\r\n\r\n")[2] or b"null")
    return took, length, (int(status_line.split()[1]), payload)


def peak_kib(proc: Proc) -> int:
    status = Path(f"/proc/{proc.popen.pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0])


def spread(values: list[float]) -> dict[str, float]:
    return {
        "min": round(min(values), 1),
        "median": round(statistics.median(values), 1),
        "max": round(max(values), 1),
    }


def flush_db(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.flushdb()
    finally:
        client.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fineprune-upload-") as tmp:
        root = Path(tmp)
        log(f"building a {args.megabytes} MiB model ...")
        files = build_inputs(root, args.megabytes)
        flush_db(args.redis_url)
        cap = files["model"].stat().st_size + 64 * MiB
        env = service_env(root / "artifacts", args.redis_url, api_keys=API_KEY, max_model_bytes=cap)
        api_port, base_port = free_port(), free_port()
        api = start_api(env, api_port, root / "api.log")
        (root / "baseline").mkdir()
        baseline_env = {**env, "FINEPRUNE_BENCH_DIR": str(root / "baseline")}
        baseline = Proc.start(
            "baseline",
            [sys.executable, "-m", "uvicorn", "bench.upload_bench:baseline_app", "--port",
             str(base_port), "--log-level", "warning"],
            baseline_env,
            root / "baseline.log",
        )  # fmt: skip
        auth = {"Authorization": f"Bearer {API_KEY}"}
        auth_line = f"Authorization: Bearer {API_KEY}\r\n"
        ours: list[float] = []
        floor: list[float] = []
        try:
            wait_api(f"http://127.0.0.1:{api_port}", api)
            for _ in range(50):
                try:
                    httpx.get(f"http://127.0.0.1:{base_port}/", timeout=2)
                    break
                except httpx.HTTPError:
                    time.sleep(0.2)
            warm_kib = peak_kib(api), peak_kib(baseline)
            for round_no in range(args.rounds + 1):  # round 0 warms both up, not counted
                took, length, (status, body) = upload(base_port, "/", files, "")
                assert status == 200, body
                base_rate = length / took / 1e6
                took, length, (status, body) = upload(api_port, "/v1/jobs", files, auth_line)
                assert status == 202, body
                httpx.delete(
                    f"http://127.0.0.1:{api_port}/v1/jobs/{body['id']}", headers=auth, timeout=60
                )
                our_rate = length / took / 1e6
                label = "warm-up" if round_no == 0 else f"round {round_no}"
                log(f"{label}: API {our_rate:7.1f} MB/s, baseline {base_rate:7.1f} MB/s")
                if round_no:
                    ours.append(our_rate)
                    floor.append(base_rate)
            peaks = peak_kib(api), peak_kib(baseline)
        finally:
            api.stop()
            baseline.stop()
            flush_db(args.redis_url)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "parameters": {"megabytes": args.megabytes, "rounds": args.rounds},
        "body_bytes": length,
        "api_mb_per_s": spread(ours),
        "baseline_mb_per_s": spread(floor),
        "ratio_of_medians": round(statistics.median(ours) / statistics.median(floor), 3),
        "ratios": [round(a / b, 3) for a, b in zip(ours, floor, strict=True)],
        "peak_mib": {
            "api_before": warm_kib[0] // 1024,
            "api_after": peaks[0] // 1024,
            "baseline_before": warm_kib[1] // 1024,
            "baseline_after": peaks[1] // 1024,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average": [round(v, 2) for v in os.getloadavg()],
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--megabytes", type=int, default=256, help="model weights (MiB)")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds of each")
    parser.add_argument("--redis-url", default=REDIS_URL)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = run(args)
    api, base = result["api_mb_per_s"], result["baseline_mb_per_s"]
    peaks = result["peak_mib"]
    log(
        f"\nupload of {result['body_bytes'] / MiB:.0f} MiB: API {api['median']} MB/s "
        f"(min {api['min']}, max {api['max']}), streaming baseline {base['median']} MB/s "
        f"(min {base['min']}, max {base['max']}): {result['ratio_of_medians']:.2f}x "
        f"(per round {result['ratios']})"
    )
    log(
        f"peak memory: API {peaks['api_before']} -> {peaks['api_after']} MiB, baseline "
        f"{peaks['baseline_before']} -> {peaks['baseline_after']} MiB"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
