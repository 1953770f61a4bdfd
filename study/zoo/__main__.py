"""`make zoo`: build the victims that are missing, defend them with a recipe, write the table.

Victims are cached outside the repository (`$FINEPRUNE_ZOO_CACHE`, default
`~/.cache/fineprune/zoo`) and rebuilt when missing; every defense run appends one line to
`docs/experiments/zoo.jsonl`, and a run already recorded for the same victim, recipe, image
count and defense seed is skipped, so an interrupted zoo resumes where it stopped.

    python -m study.zoo build [--victims NAME,...]
    python -m study.zoo defend --recipe default [--half tune|heldout] [--images 1500,500]
    python -m study.zoo report
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

from study.zoo import data as zoo_data
from study.zoo.measure import drop, measures
from study.zoo.recipes import RECIPES, settings
from study.zoo.train import train_victim
from study.zoo.victims import BY_NAME, ZOO, Victim

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "experiments" / "zoo.jsonl"
DETECTIONS = ROOT / "docs" / "experiments" / "detect.jsonl"
VICTIM_RECORDS = ROOT / "docs" / "experiments" / "zoo-victims.jsonl"
CACHE = Path(os.environ.get("FINEPRUNE_ZOO_CACHE", Path.home() / ".cache" / "fineprune" / "zoo"))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    )
    return done.stdout.strip() or "unknown"


_DATASETS: dict[str, zoo_data.Dataset] = {}


def dataset(name: str) -> zoo_data.Dataset:
    if name not in _DATASETS:
        _DATASETS[name] = (
            zoo_data.gtsrb() if name == "gtsrb" else zoo_data.mnist_digits(CACHE / "mnist")
        )
    return _DATASETS[name]


def victim_path(victim: Victim) -> Path:
    return CACHE / "victims" / f"{victim.name}.keras"


def build(victims: list[Victim]) -> None:
    for victim in victims:
        path = victim_path(victim)
        if path.exists():
            continue
        log(f"training {victim.name} ({victim.arch}, {victim.attack.kind}, {victim.epochs} epochs)")
        data = dataset(victim.data)
        trained = train_victim(victim, data, log)
        path.parent.mkdir(parents=True, exist_ok=True)
        trained.model.save(path)
        record = {
            "victim": victim.name,
            "commit": _commit(),
            "half": victim.half,
            "data": victim.data,
            "arch": victim.arch,
            "attack": victim.attack.kind,
            "seed": victim.seed,
            "epochs": trained.epochs,
            "seconds": trained.seconds,
            "poisoned": trained.poisoned,
            "parameters": trained.model.count_params(),
            **measures(trained.model, victim, data.test, data.evaluation, data.classes),
        }
        path.with_suffix(".json").write_text(json.dumps(record, indent=1))
        with VICTIM_RECORDS.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        log(f"{victim.name}: test {record['test_accuracy']:.2%}, ASR {record['asr']}")


def _recorded() -> set[tuple]:
    if not RESULTS.exists():
        return set()
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    return {(r["victim"], r["recipe"], r["images"], r["defense_seed"]) for r in rows}


def defend(victims: list[Victim], recipe: str, images: list[int], seeds: list[int]) -> None:
    from fineprune import sanitize

    done = _recorded()
    for victim in victims:
        meta = victim_path(victim).with_suffix(".json")
        if not meta.exists():
            log(f"{victim.name}: not built; skipped")
            continue
        before = json.loads(meta.read_text())
        competent = before["test_accuracy"] >= (0.95 if victim.data == "gtsrb" else 0.98)
        for count in images:
            for seed in seeds:
                if (victim.name, recipe, count, seed) in done:
                    continue
                row = _defend_once(sanitize, victim, recipe, count, seed, before, competent)
                with RESULTS.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                after = row["after"]
                log(
                    f"{victim.name} {recipe} {count}: ASR {before['asr']} -> {after['asr']}, "
                    f"test {row['change']['test_accuracy']:+.1f} / eval "
                    f"{row['change']['evaluation_accuracy']:+.1f} pts, {row['seconds']:.0f} s"
                )


def _defend_once(sanitize, victim, recipe, count, seed, before, competent) -> dict:
    data = dataset(victim.data)
    sample = zoo_data.defender_sample(data.defender, count, seed)
    options, research = settings(recipe, seed)
    with tempfile.TemporaryDirectory(prefix="zoo-") as tmp:
        clean = Path(tmp) / "clean.npz"
        arrays = {"x": sample.x, "y": sample.y}
        if sample.groups is not None:
            arrays["groups"] = sample.groups
        np.savez(clean, **arrays)
        started = time.perf_counter()
        report = sanitize(victim_path(victim), clean, Path(tmp) / "out", options, research=research)
        seconds = time.perf_counter() - started
        model = keras.models.load_model(Path(tmp) / "out" / "sanitized.keras", compile=False)
        after = measures(model, victim, data.test, data.evaluation, data.classes)
    keep = ("test_accuracy", "evaluation_accuracy", "asr")
    before = {k: before[k] for k in keep}
    verdict = report.verdict
    rechecked = None if verdict is None else verdict.after
    return {
        "victim": victim.name,
        "recipe": recipe,
        "images": count,
        "defense_seed": seed,
        "commit": _commit(),
        "half": victim.half,
        "data": victim.data,
        "arch": victim.arch,
        "attack": victim.attack.kind,
        "target": victim.attack.target,
        "competent": competent,
        "before": before,
        "after": after,
        "change": drop(before, after),
        "pruned": report.decision.pruned,
        "channels": report.surgery.channels_before if report.surgery else 0,
        "holdout_accuracy_after": report.fine_pruned.clean_accuracy.value,
        "verdict": None if verdict is None else verdict.conclusion,
        "suspect_before": None if verdict is None else verdict.before.suspect,
        "score_before": None if verdict is None else verdict.before.score,
        "suspect_after": None if rechecked is None else rechecked.suspect,
        "score_after": None if rechecked is None else rechecked.score,
        "seconds": round(seconds, 1),
        "timings": report.timings,
    }


DETECTORS = ("universal-perturbation", "neural-cleanse-halving", "neural-cleanse")


def detect_all(victims: list[Victim], detectors: list[str], count: int, seed: int) -> None:
    """Every detector on every built (delivered) victim, with `count` of the defender's images."""
    from fineprune.load.loading import load_untrusted_model
    from fineprune.verdict.cleanse import reconstruct
    from fineprune.verdict.scan import scan

    done = set()
    if DETECTIONS.exists():
        for line in DETECTIONS.read_text().splitlines():
            r = json.loads(line)
            done.add((r["victim"], r["detector"], r["images"], r["seed"]))
    for victim in victims:
        if not victim_path(victim).exists():
            continue
        data = dataset(victim.data)
        sample = zoo_data.defender_sample(data.defender, count, seed)
        model, _ = load_untrusted_model(victim_path(victim))
        for name in detectors:
            if (victim.name, name, count, seed) in done:
                continue
            if name == "neural-cleanse" and data.classes > 10:
                continue  # the full schedule is for the small-class comparison only
            if name == "universal-perturbation":
                found = scan(model, sample.x, sample.y, seed)
                anomaly, seconds = found.anomaly, found.seconds
            else:
                found = reconstruct(
                    model, sample.x, sample.y, seed, halving=name.endswith("halving")
                )
                anomaly, seconds = found.anomaly, found.seconds
            top = int(np.argmax(anomaly))
            row = {
                "victim": victim.name, "detector": name, "images": count, "seed": seed,
                "commit": _commit(), "half": victim.half, "data": victim.data,
                "arch": victim.arch, "attack": victim.attack.kind, "target": victim.attack.target,
                "top": top, "score": float(max(anomaly)), "anomaly": list(anomaly),
                "seconds": seconds,
            }  # fmt: skip
            with DETECTIONS.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            log(f"{victim.name} {name}: top {top} (target {victim.attack.target}) "
                f"score {row['score']:.2f}, {seconds:.0f} s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m study.zoo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train the victims that are missing")
    b.add_argument("--victims", default="", help="comma-separated names (default: all)")
    d = sub.add_parser("defend", help="defend built victims with a recipe")
    d.add_argument("--recipe", default="default", choices=sorted(RECIPES))
    d.add_argument("--half", choices=("tune", "heldout", "all"), default="tune")
    d.add_argument("--victims", default="")
    d.add_argument("--images", default="1500,500")
    d.add_argument("--seeds", default="0")
    t = sub.add_parser("detect", help="every detector on every built victim")
    t.add_argument("--victims", default="")
    t.add_argument("--half", choices=("tune", "heldout", "all"), default="all")
    t.add_argument("--detectors", default=",".join(DETECTORS))
    t.add_argument("--images", type=int, default=1500)
    t.add_argument("--seed", type=int, default=0)
    sub.add_parser("report", help="write docs/experiments/zoo.md from zoo.jsonl")
    args = parser.parse_args()

    def chosen() -> list[Victim]:
        if args.victims:
            return [BY_NAME[n] for n in args.victims.split(",") if n]
        half = getattr(args, "half", "all")
        return [v for v in ZOO if half == "all" or v.half == half]

    if args.command == "build":
        build(chosen())
    elif args.command == "detect":
        detect_all(chosen(), args.detectors.split(","), args.images, args.seed)
    elif args.command == "defend":
        images = [int(n) for n in args.images.split(",")]
        seeds = [int(n) for n in args.seeds.split(",")]
        defend(chosen(), args.recipe, images, seeds)
    else:
        from study.zoo.summary import write

        write(RESULTS, VICTIM_RECORDS, ROOT / "docs" / "experiments" / "zoo.md")


if __name__ == "__main__":
    sys.exit(main())
