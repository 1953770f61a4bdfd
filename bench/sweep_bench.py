"""Benchmark the channel sweep: fast sweep vs. the naive one vs. one forward pass, on the seed CNN.

Run from the repository root:

    .venv/bin/python -m bench.sweep_bench            # full run, naive sweep over every k
    .venv/bin/python -m bench.sweep_bench --naive-channels 16   # k=0..16 timed, extrapolated

Writes bench/results/sweep.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
os.environ["KERAS_BACKEND"] = "tensorflow"

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/sweep_bench.py` puts bench/ first, not the repo
    sys.path.insert(0, str(REPO))

import keras
import numpy as np

import fineprune.prune.sweep
from fineprune.pipeline import sanitize
from fineprune.prune.channels import ChannelPath, trace_channels
from fineprune.prune.graph import ModelGraph
from fineprune.prune.sweep import ChannelSweeper, naive_sweep
from schemas.options import SanitizeOptions
from study.architectures import seed_cnn

DATA = REPO.parent / "shared" / "data" / "gtsrb_32.npz"
RESULTS = REPO / "bench" / "results" / "sweep.json"
# The study's nine classes, Stop first; mapped to 0..8 in this order.
STUDY_CLASSES = (14, 33, 34, 35, 36, 37, 38, 39, 13)


def log(message: str) -> None:
    """Print at once, so a background run's log can be followed."""
    print(message, flush=True)


def load_gtsrb(
    path: Path, images: int, train_images: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint bench and training sets from x_train of the study's classes, 0..1 float32."""
    with np.load(path, allow_pickle=False) as npz:
        x_all, y_all = npz["x_train"], npz["y_train"]
    rows = np.flatnonzero(np.isin(y_all, STUDY_CLASSES))
    if images >= len(rows):
        raise SystemExit(f"only {len(rows)} images of the study's classes; asked for {images}")
    if images + train_images > len(rows):
        train_images = len(rows) - images
        log(f"only {len(rows)} images of the study's classes: training on the other {train_images}")
    rows = np.random.default_rng(seed).permutation(rows)
    mapping = np.full(int(y_all.max()) + 1, -1, dtype=np.int64)
    mapping[list(STUDY_CLASSES)] = np.arange(len(STUDY_CLASSES))

    def take(chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        chosen = np.sort(chosen)
        return x_all[chosen].astype(np.float32) / 255.0, mapping[y_all[chosen]]

    x, y = take(rows[:images])
    x_train, y_train = take(rows[images : images + train_images])
    return x, y, x_train, y_train


def build_model(x_train: np.ndarray, y_train: np.ndarray, epochs: int) -> tuple[Any, float]:
    """The seed CNN, seeded, trained briefly so BatchNorm statistics and accuracies are real."""
    keras.utils.set_random_seed(0)
    model = seed_cnn(classes=len(STUDY_CLASSES))
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    started = time.perf_counter()
    if epochs > 0:
        model.fit(x_train, y_train, batch_size=64, epochs=epochs, verbose=0, shuffle=True)
    recalibrate_batchnorm(model, x_train)
    return model, time.perf_counter() - started


def recalibrate_batchnorm(model: Any, x: np.ndarray) -> None:
    """Set every BatchNormalization's moving statistics to the population statistics on `x`.

    After one short epoch the moving averages (momentum 0.99) still mostly hold their initial
    0/1, so inference accuracy would be near chance; this makes them what training converges to.
    """
    for layer in model.layers:
        if type(layer).__name__ != "BatchNormalization":
            continue
        upstream = keras.Model(model.inputs, layer.input)
        values = upstream.predict(x, batch_size=256, verbose=0).astype(np.float64)
        axes = tuple(range(values.ndim - 1))
        layer.moving_mean.assign(values.mean(axis=axes).astype(np.float32))
        layer.moving_variance.assign(values.var(axis=axes).astype(np.float32))


class CountingGraph:
    """A ModelGraph stand-in that counts `run` calls, to report the naive sweep's progress."""

    def __init__(self, graph: ModelGraph, calls_per_k: int, ks: int) -> None:
        self._graph = graph
        self._calls_per_k = calls_per_k
        self._ks = ks
        self._calls = 0
        self._started = time.perf_counter()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._graph, name)

    def run(self, *args: Any, **kwargs: Any) -> list[Any]:
        """Delegate, then print a line every few values of k."""
        result = self._graph.run(*args, **kwargs)
        self._calls += 1
        if self._calls % self._calls_per_k == 0:
            done = self._calls // self._calls_per_k
            if done % 8 == 0 or done == self._ks:
                elapsed = time.perf_counter() - self._started
                eta = elapsed / done * (self._ks - done)
                log(f"  naive sweep: k {done}/{self._ks}  {elapsed:7.1f}s  (~{eta:.0f}s left)")
        return result


def time_naive(
    path: ChannelPath, x: np.ndarray, order: np.ndarray, channels: int, batch_size: int = 256
) -> tuple[float, np.ndarray]:
    """Seconds and predictions of `naive_sweep` over k = 0..channels (all of them by default)."""
    calls_per_k = -(-len(x) // batch_size)
    counting = CountingGraph(path.graph, calls_per_k, channels + 1)
    timed_path = dataclasses.replace(path, graph=counting, channels=channels)
    started = time.perf_counter()
    sweep = naive_sweep(timed_path, x, order, batch_size)  # type: ignore[arg-type]
    return time.perf_counter() - started, sweep.predictions


def run_sanitize(
    model: Any, x: np.ndarray, y: np.ndarray, epochs: int
) -> tuple[dict[str, float], dict[str, Any]]:
    """A whole default sanitize (but `epochs`) on the bench images; stage seconds and outcome."""
    with tempfile.TemporaryDirectory(prefix="fineprune-bench-") as tmp:
        tmp_dir = Path(tmp)
        model_path = tmp_dir / "seed_cnn.keras"
        data_path = tmp_dir / "clean.npz"
        model.save(model_path)
        np.savez(data_path, x=x, y=y)
        last = {"stage": ""}

        def progress(stage: str, fraction: float) -> None:
            if stage != last["stage"]:
                last["stage"] = stage
                log(f"  sanitize: {stage} ...")

        started = time.perf_counter()
        report = sanitize(
            model_path,
            data_path,
            tmp_dir / "out",
            SanitizeOptions(epochs=epochs),
            progress=progress,
        )
        total = time.perf_counter() - started
        plain_s = plain_fine_tune(model_path, x, y, epochs)
        log(f"  one plain fine-tune ({epochs} epochs, no pruning): {plain_s:.2f}s")
    stages = {name: float(seconds) for name, seconds in report.timings.items()}
    outcome = {
        "total_s": round(total, 3),
        "epochs": epochs,
        "pruned_channels": report.decision.pruned,
        "surgery_mode": report.surgery.mode if report.surgery else None,
        "clean_accuracy_baseline": report.baseline.clean_accuracy.value,
        "clean_accuracy_pruned": report.pruned.clean_accuracy.value,
        "clean_accuracy_fine_pruned": report.fine_pruned.clean_accuracy.value,
        "evaluation_samples": report.baseline.clean_accuracy.samples,
        "plain_fine_tune_s": round(plain_s, 3),
        "ratio_total_over_plain_fine_tune": round(total / plain_s, 2),
    }
    return stages, outcome


def plain_fine_tune(model_path: Path, x: np.ndarray, y: np.ndarray, epochs: int) -> float:
    """The baseline of a sanitize: loading the model and fine-tuning it on the tune split's
    share of the images (75 %, batch 32) for the same epochs, nothing else."""
    started = time.perf_counter()
    model = keras.models.load_model(model_path, compile=False)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy")
    tune = int(len(x) * 0.75) // 32 * 32  # whole batches (an odd last batch can kill oneDNN)
    model.fit(x[:tune], y[:tune], batch_size=32, epochs=epochs, verbose=0)
    return time.perf_counter() - started


def machine() -> dict[str, Any]:
    """Where the numbers came from."""
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    if hasattr(os, "sched_getaffinity"):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    for package in ("tensorflow", "keras", "numpy"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = "unknown"
    return info


def code_version() -> dict[str, Any]:
    """Which engine code was measured: the commit, and the sweep module as it was imported."""
    sweep_file = Path(fineprune.prune.sweep.__file__)
    info: dict[str, Any] = {
        "sweep_py_sha256": hashlib.sha256(sweep_file.read_bytes()).hexdigest()[:16],
    }
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "fineprune", "schemas"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        info["git_head"] = head.stdout.strip() or None
        info["uncommitted_engine_files"] = [line[3:] for line in dirty.stdout.splitlines()]
    except OSError:
        info["git_head"] = None
    return info


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--naive-channels",
        type=int,
        default=None,
        help="time the naive sweep on k = 0..N only and extrapolate linearly (default: all k)",
    )
    parser.add_argument("--epochs", type=int, default=5, help="sanitize fine-tuning epochs")
    parser.add_argument("--images", type=int, default=1500, help="bench images")
    parser.add_argument("--train-images", type=int, default=3000, help="images to train on")
    parser.add_argument("--train-epochs", type=int, default=1, help="training epochs (0: none)")
    parser.add_argument("--skip-sanitize", action="store_true", help="skip the sanitize run")
    parser.add_argument("--repeats", type=int, default=5, help="forward / fast sweep pairs")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every measurement once, print the table, write the JSON."""
    args = parse_args(argv)
    host = machine()
    code = code_version()
    log(f"loading {args.data} ...")
    x, y, x_train, y_train = load_gtsrb(args.data, args.images, args.train_images, seed=0)
    log(f"training the seed CNN on {len(x_train)} images for {args.train_epochs} epoch(s) ...")
    model, train_s = build_model(x_train, y_train, args.train_epochs)
    log(f"  trained in {train_s:.1f}s; {model.count_params():,} parameters")

    # 1 and 2. One plain forward pass and the fast sweep (profile + predictions for every k),
    # alternated `--repeats` times so each sweep has a forward pass beside it.
    model.predict(x, batch_size=256, verbose=0)
    path = trace_channels(ModelGraph(model), None)
    channels = path.channels
    sweeper = ChannelSweeper(path)
    sweeper.profile_and_sweep(x[:32], np.arange(32))  # warm the kernels up (and trace)
    forwards, sweeps = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        probs = model.predict(x, batch_size=256, verbose=0)
        forwards.append(time.perf_counter() - started)
        started = time.perf_counter()
        profile, fast = sweeper.profile_and_sweep(x, np.arange(len(x)))
        sweeps.append(time.perf_counter() - started)
    accuracy = float((probs.argmax(axis=1) == y).mean())
    forward_s, fast_s = float(np.median(forwards)), float(np.median(sweeps))
    per_pair = [s / f for s, f in zip(sweeps, forwards, strict=True)]
    log(f"forward pass: {np.round(forwards, 3)} s  (accuracy on the bench images {accuracy:.2%})")
    log(
        f"fast sweep ({path.layer.name}, {channels} channels, {channels + 1} k): "
        f"{np.round(sweeps, 3)} s; per pair fast / forward {np.round(per_pair, 2)}"
    )

    # 3. The naive sweep: the whole model per k.
    naive_channels = channels if args.naive_channels is None else args.naive_channels
    naive_channels = max(0, min(naive_channels, channels))
    extrapolated = naive_channels < channels
    ks_timed = naive_channels + 1
    log(f"naive sweep over k = 0..{naive_channels} ({ks_timed} of {channels + 1} values) ...")
    naive_timed_s, naive_predictions = time_naive(path, x, profile.order, naive_channels)
    naive_s = naive_timed_s * (channels + 1) / ks_timed
    shown = f"{naive_s:.1f}s" + (
        f" (extrapolated from {naive_timed_s:.1f}s for {ks_timed} k)" if extrapolated else ""
    )
    log(f"naive sweep: {shown}")

    # 4. Do they agree?
    fast_part = fast.predictions[:ks_timed]
    per_k = (fast_part == naive_predictions).mean(axis=1)
    agreement = float(per_k.mean())
    disagreeing_ks = [int(k) for k in np.flatnonzero(per_k < 1.0)]
    log(f"agreement fast vs naive: {agreement:.6f} over {ks_timed} k x {len(x)} images")
    curve = fast.accuracy(np.arange(len(x)), y)
    eighths = (channels * q // 8 for q in (2, 4, 6, 7))
    curve_points = sorted({0, *eighths, max(channels - 1, 0), channels})

    # 5. A whole sanitize.
    stages: dict[str, float] = {}
    outcome: dict[str, Any] | None = None
    if not args.skip_sanitize:
        log(f"sanitize with default options, epochs={args.epochs} ...")
        stages, outcome = run_sanitize(model, x, y, args.epochs)

    # 6. The table and the JSON.
    result: dict[str, Any] = {
        "forward_pass_s": round(forward_s, 4),
        "fast_sweep_s": round(fast_s, 4),
        "naive_sweep_s": round(naive_s, 3),
        "naive_timed_s": round(naive_timed_s, 3),
        "naive_extrapolated": extrapolated,
        "naive_ks_timed": ks_timed,
        "ratio_naive_over_fast": round(naive_s / fast_s, 2),
        "ratio_fast_over_forward": round(fast_s / forward_s, 2),
        "forward_pass_runs_s": [round(v, 4) for v in forwards],
        "fast_sweep_runs_s": [round(v, 4) for v in sweeps],
        "ratio_fast_over_forward_per_pair": {
            "min": round(min(per_pair), 3),
            "median": round(float(np.median(per_pair)), 3),
            "max": round(max(per_pair), 3),
        },
        "agreement": agreement,
        "agreement_min_over_k": float(per_k.min()),
        "disagreeing_ks": disagreeing_ks,
        "images": len(x),
        "channels": channels,
        "layer": path.layer.name,
        "model": {
            "name": model.name,
            "parameters": model.count_params(),
            "train_images": len(x_train),
            "train_epochs": args.train_epochs,
            "train_s": round(train_s, 2),
            "accuracy_unpruned": accuracy,
            "sweep_accuracy_at_k": {str(k): float(curve[k]) for k in curve_points},
        },
        "stage_seconds": stages,
        "sanitize": outcome,
        "machine": host,
        "code": code,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(
            ["python -m bench.sweep_bench", *(sys.argv[1:] if argv is None else argv)]
        ),
    }
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.out}")
    return result


def print_table(r: dict[str, Any]) -> None:
    """The three timings side by side, the ratios and the sanitize stages."""
    naive_note = f" (extrapolated from {r['naive_ks_timed']} k)" if r["naive_extrapolated"] else ""
    lines = [
        "",
        f"seed CNN, {r['images']} images, {r['channels']} channels of {r['layer']}",
        f"{'measurement':<34}{'seconds':>10}",
        f"{'forward pass (model.predict)':<34}{r['forward_pass_s']:>10.3f}",
        f"{'fast sweep (profile + all k)':<34}{r['fast_sweep_s']:>10.3f}",
        f"{'naive sweep (model per k)':<34}{r['naive_sweep_s']:>10.1f}{naive_note}",
        f"{'naive / fast':<34}{r['ratio_naive_over_fast']:>10.1f}x",
        f"{'fast / forward (medians)':<34}{r['ratio_fast_over_forward']:>10.2f}x",
        "{:<34}{min:>6.2f} / {median:.2f} / {max:.2f}".format(
            "fast / forward per pair", **r["ratio_fast_over_forward_per_pair"]
        ),
        f"{'agreement fast vs naive':<34}{r['agreement']:>10.4%}",
    ]
    if r["stage_seconds"]:
        lines.append("sanitize stages:")
        for stage, seconds in r["stage_seconds"].items():
            lines.append(f"  {stage:<32}{seconds:>10.2f}")
        lines.append(f"  {'total':<32}{r['sanitize']['total_s']:>10.2f}")
        lines.append(f"  {'one plain fine-tune':<32}{r['sanitize']['plain_fine_tune_s']:>10.2f}")
        ratio = r["sanitize"]["ratio_total_over_plain_fine_tune"]
        lines.append(f"  {'total / plain fine-tune':<32}{ratio:>10.2f}x")
    log("\n".join(lines))


if __name__ == "__main__":
    main()
