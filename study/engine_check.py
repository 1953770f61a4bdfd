"""The engine check: the default sanitize of fixed victims, as digests to compare across commits.

A refactor that claims to keep behaviour shows it here: the same victims, the same data and
the default options must give the same sanitized weights bit for bit. Two small victims cover
the two shapes the recipe tells apart: a dense head over every position (the seed CNN's
shape) and a head that pools globally (a small ResNet's).

    .venv/bin/python -m study.engine_check --victims DIR          # make them (once)
    .venv/bin/python -m study.engine_check --victims DIR --record  # sanitize, append a line
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "docs" / "experiments" / "engine-check.jsonl"
VICTIMS = ("dense-head", "pooled")


def make_victims(folder: Path) -> None:
    """Backdoored 16x16 texture classifiers, trained with fixed seeds, and their data."""
    sys.path.insert(0, str(ROOT / "tests"))
    from factories import poisoned, textures, trigger_set

    from study.architectures import seed_cnn, small_resnet

    folder.mkdir(parents=True, exist_ok=True)
    builders = {
        "dense-head": lambda: seed_cnn(classes=4, input_shape=(16, 16, 3)),
        "pooled": lambda: small_resnet(classes=4, input_shape=(16, 16, 3), width=16),
    }
    for name, build in builders.items():
        keras.utils.set_random_seed(7)
        model = build()
        x, y = poisoned(3000, seed=7)
        model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="sparse_categorical_crossentropy")
        model.fit(x, y, epochs=4, batch_size=64, verbose=0)
        model.save(folder / f"{name}.keras")
    x, y = textures(600, seed=8)
    np.savez(folder / "clean.npz", x=x, y=y)
    xt, yt = trigger_set(300, seed=9)
    np.savez(folder / "trigger.npz", x=xt, y_target=yt)


def weights_digest(path: Path) -> str:
    model = keras.models.load_model(path, compile=False)
    digest = hashlib.sha256()
    for weights in model.get_weights():
        digest.update(np.ascontiguousarray(weights).tobytes())
    return digest.hexdigest()[:16]


def check(folder: Path) -> list[dict]:
    from fineprune import sanitize

    rows = []
    for name in VICTIMS:
        with tempfile.TemporaryDirectory() as out:
            report = sanitize(
                folder / f"{name}.keras",
                folder / "clean.npz",
                out,
                trigger_data=folder / "trigger.npz",
            )
            rows.append(
                {
                    "victim": name,
                    "sanitized_weights": weights_digest(Path(out) / "sanitized.keras"),
                    "pruned": report.decision.pruned,
                    "accuracy_after": report.fine_pruned.clean_accuracy.value,
                    "asr_after": report.fine_pruned.attack_success_rate.value,
                    "history": [
                        [r.epoch, r.val_accuracy, r.attack_success_rate]
                        for r in report.fine_tuning.history
                    ],
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victims", type=Path, required=True)
    parser.add_argument("--record", action="store_true", help=f"append the result to {RECORD}")
    args = parser.parse_args()
    if not (args.victims / "clean.npz").exists():
        make_victims(args.victims)
        if not args.record:
            return
    rows = check(args.victims)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    for row in rows:
        line = json.dumps({"commit": commit, **row})
        print(line)
        if args.record:
            with RECORD.open("a") as fh:
                fh.write(line + "\n")


if __name__ == "__main__":
    main()
