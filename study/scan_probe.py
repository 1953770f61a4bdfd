"""How reliably the trigger scan names a held-out victim's target, and what makes it steadier.

`python -m study.scan_probe --seeds 0,1 --scan-seeds 0,1,2,3,4,5 --check-images 0,256`: for
each seed CNN victim (patch and blended) and each scan seed, the scan on the defender's 1,500
clean images as the study gives them; one line per scan with the target's robust z-score.
"""

from __future__ import annotations

import argparse
import json

import keras
import numpy as np

from fineprune.trigger_scan import scan
from study.gtsrb import load
from study.tune_defaults import DEFENDER_IMAGES, RESULTS, TARGET, TRIGGERS, victim


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="seed_cnn")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--scan-seeds", default="0,1,2,3,4,5")
    parser.add_argument("--check-images", default="0,256")
    parser.add_argument("--results", default="scan-steadiness.jsonl")
    args = parser.parse_args()
    data = load()
    for seed in (int(s) for s in args.seeds.split(",")):
        rows = np.random.default_rng(seed).choice(
            len(data.defender.y), size=DEFENDER_IMAGES, replace=False
        )
        x, y = data.defender.x[rows], data.defender.y[rows]
        for trigger in TRIGGERS:
            model = keras.models.load_model(victim(args.arch, trigger, seed, 10), compile=False)
            for scan_seed in (int(s) for s in args.scan_seeds.split(",")):
                for check in (int(c) for c in args.check_images.split(",")):
                    found = scan(model, x, y, seed=scan_seed, check_images=check)
                    record = {
                        "arch": args.arch,
                        "trigger": trigger,
                        "seed": seed,
                        "scan_seed": scan_seed,
                        "check_images": check,
                        "radius": found.radius,
                        "target_z": found.anomaly[TARGET],
                        "next_z": max(z for c, z in enumerate(found.anomaly) if c != TARGET),
                        "suspect": found.suspect,
                        "seconds": found.seconds,
                    }
                    with (RESULTS / args.results).open("a") as f:
                        f.write(json.dumps(record) + "\n")
                    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
