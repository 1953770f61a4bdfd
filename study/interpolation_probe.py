"""Weight interpolation between the pruned model and the fine-pruned one, on the tuning victims.

Fine-pruning's accuracy loss here is forgetting: fine-tuning on 1,500 clean images overwrites
what the delivered model knew about the sign tracks the defender's set does not show
(README, "Where fine-pruning's forgetting lives"). Interpolating fine-tuned weights back toward
the starting ones restores such knowledge elsewhere (WiSE-FT, Wortsman et al. 2022); the question
here is whether the backdoor comes back with it. Both ends have the same architecture (the
pruning defense with the same seed cuts the same channels), so every point of the segment is a
model. Results: docs/experiments/interpolation-probe.jsonl.

    .venv/bin/python -m study.interpolation_probe seed_cnn blended
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

from fineprune.attacks import triggered
from fineprune.pipeline import Inputs, sanitize
from schemas.options import SanitizeOptions
from study.gtsrb import load
from study.tune_defaults import DEFENDER_IMAGES, RESULTS, TARGET, TRIGGERS, victim

STEPS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("arch")
    parser.add_argument("trigger", choices=list(TRIGGERS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--options", default="{}", help="SanitizeOptions of the fine-pruned end")
    args = parser.parse_args()
    data = load()
    rows = np.random.default_rng(args.seed).choice(
        len(data.defender.y), size=DEFENDER_IMAGES, replace=False
    )
    xt, yt = triggered(data.test.x, data.test.y, TRIGGERS[args.trigger], TARGET)
    path = victim(args.arch, args.trigger, args.seed, 10)
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / "clean.npz"
        np.savez(clean, x=data.defender.x[rows], y=data.defender.y[rows])
        options = json.loads(args.options)
        tuned_report = sanitize(
            Inputs(path, clean), Path(tmp) / "tuned", SanitizeOptions(seed=args.seed, **options)
        )
        pruned_only = SanitizeOptions(seed=args.seed, defense="pruning")
        sanitize(Inputs(path, clean), Path(tmp) / "pruned", pruned_only)
        tuned = keras.models.load_model(Path(tmp) / "tuned" / "sanitized.keras", compile=False)
        start = keras.models.load_model(Path(tmp) / "pruned" / "sanitized.keras", compile=False)
    ends = (start.get_weights(), tuned.get_weights())
    if [w.shape for w in ends[0]] != [w.shape for w in ends[1]]:
        raise SystemExit("the two ends were pruned differently")
    model = tuned
    curve = []
    for step in STEPS:
        model.set_weights([(1 - step) * a + step * b for a, b in zip(*ends, strict=True)])
        clean_hits = model.predict(data.test.x, batch_size=512, verbose=0).argmax(-1)
        hits = model.predict(xt, batch_size=512, verbose=0).argmax(-1) == yt
        defender = model.predict(data.defender.x[rows], batch_size=512, verbose=0).argmax(-1)
        curve.append(
            {
                "step": step,
                "test_accuracy": round(100 * float((clean_hits == data.test.y).mean()), 1),
                "test_asr": round(100 * float(hits.mean()), 1),
                "defender_accuracy": round(
                    100 * float((defender == data.defender.y[rows]).mean()), 1
                ),
            }
        )
        print(curve[-1], flush=True)
    record = {
        "arch": args.arch,
        "trigger": args.trigger,
        "seed": args.seed,
        "options": options,
        "pruned": tuned_report.decision.pruned,
        "curve": curve,
    }
    with (RESULTS / "interpolation-probe.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
