"""Markdown tables from the defaults experiment's JSON lines (for the README)."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "experiments"


def rows(name: str) -> list[dict]:
    path = RESULTS / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def per_run(records: list[dict]) -> str:
    lines = [
        "| victim | trigger | schedule | channels pruned | test acc. before -> after | "
        "ASR before -> pruned only -> after |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['arch']} (seed {r['seed']}) | {r['trigger']} | {r['schedule']} | "
            f"{r['pruned']}/{r['channels']} | {r['test_accuracy_before']:.1%} -> "
            f"{r['test_accuracy_after']:.1%} | {r['test_asr_before']:.1%} -> "
            f"{r['test_asr_pruned_only']:.1%} -> {r['test_asr_after']:.1%} |"
        )
    return "\n".join(lines)


def per_schedule(records: list[dict]) -> str:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["schedule"]].append(r)
    lines = [
        "| schedule | victims | worst ASR after | mean ASR after | worst accuracy change | "
        "mean accuracy change | within 2 % at 2 pts | mean seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for schedule, group in groups.items():
        asr = [r["test_asr_after"] for r in group]
        change = [100 * (r["test_accuracy_after"] - r["test_accuracy_before"]) for r in group]
        within = sum(a <= 0.02 and c >= -2.0 for a, c in zip(asr, change, strict=True))
        seconds = sum(r["seconds"] for r in group) / len(group)
        lines.append(
            f"| {schedule} | {len(group)} | {max(asr):.1%} | {sum(asr) / len(asr):.1%} | "
            f"{min(change):+.1f} pts | {sum(change) / len(change):+.1f} pts | "
            f"{within}/{len(group)} | {seconds:.0f} |"
        )
    return "\n".join(lines)


ARCH_NAMES = {"seed_cnn": "seed CNN", "small_resnet": "small ResNet"}


def compare(records: list[dict], schedules: list[str]) -> str:
    """One row per victim and defense, in the README's words."""
    lines = [
        "| victim | trigger | defense | clean accuracy (GTSRB test) | attack success | seconds |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in records:
        if r["schedule"] not in schedules:
            continue
        name = "fine-pruning (default)" if r["schedule"] == "default" else r["schedule"]
        lines.append(
            f"| {ARCH_NAMES.get(r['arch'], r['arch'])} | {r['trigger']} | {name} | "
            f"{100 * r['test_accuracy_before']:.1f} -> {100 * r['test_accuracy_after']:.1f} % | "
            f"{100 * r['test_asr_before']:.1f} -> {100 * r['test_asr_after']:.1f} % | "
            f"{r['seconds']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "defaults-tune.jsonl"
    records = rows(name)
    if len(sys.argv) > 2:  # a comma-separated list of schedules: the README's comparison
        print(compare(records, sys.argv[2].split(",")))
        sys.exit()
    print(per_schedule(records))
    print()
    print(per_run(records))
