"""How much memory and time a sanitize takes per byte of weights: the budget's evidence.

Run from the repository root (a few minutes on 2 CPUs):

    .venv/bin/python -m bench.budget_bench
    .venv/bin/python -m bench.budget_bench --megabytes 32 128 --epochs 2

Sanitizes Dense-heavy models (Input(w) -> Dense(w) -> Dense(4), so nearly every byte is a
weight) of each size, each in a fresh process like a job's, and records the process's peak
resident memory and the wall time. The slope of peak memory over weight bytes between the
sizes is how many copies of its weights a sanitize holds (`WEIGHT_COPIES` in
`fineprune/load/inspection/limits.py`); `before` is the sanitizing process's peak once
TensorFlow and the engine are imported, before any weight exists (the model and data are made
in another process). Then the largest model is sanitized again under RLIMIT_DATA set to what
the budget formula gives it (JOB_RESERVE_BYTES + WEIGHT_COPIES x its weights), which must
succeed, and the time per MiB is carried to a model at the default budget (the evidence for
`task_soft_time_limit`). Writes bench/results/budget.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fineprune.load.inspection.limits import JOB_RESERVE_BYTES, WEIGHT_COPIES, weight_budget

RESULTS = REPO / "bench" / "results" / "budget.json"
MiB = 1024**2

_MAKE = r"""
import os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import keras, numpy as np
width, samples, root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rng = np.random.default_rng(0)
np.savez(f"{root}/data.npz", x=rng.random((samples, width), dtype=np.float32),
         y=np.arange(samples) % 4)
keras.utils.set_random_seed(0)
keras.Sequential(
    [keras.Input((width,)), keras.layers.Dense(width, activation="relu", name="wide"),
     keras.layers.Dense(4, activation="softmax", name="out")]
).save(f"{root}/model.keras")
"""
_SANITIZE = r"""
import json, os, resource, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
from fineprune.pipeline import sanitize
from schemas.options import SanitizeOptions
epochs, root = int(sys.argv[1]), sys.argv[2]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
started = time.monotonic()
report = sanitize(f"{root}/model.keras", f"{root}/data.npz", f"{root}/out",
                  SanitizeOptions(epochs=epochs, layer="wide"))
took = time.monotonic() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
weights = report.input_model.parameters * 4
print(json.dumps({"weights": weights, "before": before, "peak": peak, "seconds": took,
                  "timings": report.timings}))
"""


def log(message: str) -> None:
    print(message, flush=True)


def measure(
    megabytes: int, samples: int, epochs: int, memory_bytes: int | None = None
) -> dict[str, Any]:
    """Make the model in one process, sanitize it in a fresh one (a job's), and measure that;
    under RLIMIT_DATA = `memory_bytes` when given, as a job's process runs."""
    width = int((megabytes * MiB / 4) ** 0.5)

    def cap() -> None:
        if memory_bytes:
            resource.setrlimit(resource.RLIMIT_DATA, (memory_bytes, memory_bytes))

    with tempfile.TemporaryDirectory(prefix="fineprune-budget-") as tmp:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        for code, args in (
            (_MAKE, [str(width), str(samples), tmp]),
            (_SANITIZE, [str(epochs), tmp]),
        ):
            done = subprocess.run(
                [sys.executable, "-c", code, *args],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=3600,
                check=False,
            )
            if done.returncode != 0:
                raise SystemExit(f"the run of {megabytes} MiB failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--megabytes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    runs = []
    for megabytes in args.megabytes:
        log(f"sanitizing a model of {megabytes} MiB of weights ...")
        started = time.monotonic()
        run = measure(megabytes, args.samples, args.epochs)
        runs.append(run)
        log(
            f"  weights {run['weights'] / MiB:.0f} MiB: peak {run['peak'] / MiB:.0f} MiB "
            f"(before the model {run['before'] / MiB:.0f} MiB), sanitize {run['seconds']:.1f} s "
            f"({time.monotonic() - started:.0f} s with the process)"
        )
    low, high = runs[0], runs[-1]
    copies = (high["peak"] - low["peak"]) / max(high["weights"] - low["weights"], 1)
    per_mib = (high["seconds"] - low["seconds"]) / max((high["weights"] - low["weights"]) / MiB, 1)
    log(
        f"\npeak memory grows {copies:.1f} bytes per byte of weights; sanitize time grows "
        f"{per_mib:.2f} s per MiB of weights ({args.samples} samples, {args.epochs} epochs)"
    )
    # The largest size again, in a job's memory that the budget says just fits it.
    memory = JOB_RESERVE_BYTES + WEIGHT_COPIES * int(high["weights"] * 1.02)
    log(f"the {args.megabytes[-1]} MiB model again under RLIMIT_DATA = {memory / MiB:.0f} MiB ...")
    at_budget = measure(args.megabytes[-1], args.samples, args.epochs, memory)
    log(f"  sanitized in {at_budget['seconds']:.1f} s within the memory its budget allows")
    log(
        f"at {per_mib:.2f} s per MiB, a model at the default budget"
        f" ({weight_budget(8 * 1024**3) / MiB:.0f} MiB, 8 GiB jobs) takes about"
        f" {per_mib * weight_budget(8 * 1024**3) / MiB:.0f} s with these samples and epochs"
    )
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "parameters": vars(args) | {"out": str(args.out)},
        "runs": runs,
        "copies": round(copies, 2),
        "seconds_per_weight_mib": round(per_mib, 3),
        "at_budget": at_budget | {"memory_bytes": memory},
        "default_budget_seconds": round(per_mib * weight_budget(8 * 1024**3) / MiB, 1),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
