"""Reconstructive neuron pruning (RNP) on the victims of `study.tune_defaults`.

A probe, not a defense of the product yet: like `study.neuron_pruning_probe` it unlearns and
recovers on 1,275 of the defender's 1,500 clean images, prunes on the other 225 by the accuracy
rule, and measures the official GTSRB test images and their triggered copies; with
`--fine-tune` it then runs the product's default fine-tuning on the pruned model and measures
again. Results: docs/experiments/rnp-probe.jsonl.

    .venv/bin/python -m study.reconstructive_pruning_probe seed_cnn blended '{}' --fine-tune
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

from fineprune.attacks import triggered
from fineprune.data import LabelledData
from fineprune.finetune import FineTuneSettings, fine_tune
from fineprune.reconstructive_pruning import ReconstructivePruningSettings, reconstructive_prune
from schemas.options import SanitizeOptions
from study.gtsrb import load
from study.tune_defaults import DEFENDER_IMAGES, RESULTS, TARGET, TRIGGERS, victim

VALIDATION = 225


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("arch")
    parser.add_argument("trigger", choices=list(TRIGGERS))
    parser.add_argument("settings", nargs="?", default="{}", help="RNP settings, JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fine-tune", action="store_true", help="then the default fine-tuning")
    args = parser.parse_args()
    overrides = json.loads(args.settings)
    settings = ReconstructivePruningSettings(**overrides)
    data = load()
    rows = np.random.default_rng(args.seed).choice(
        len(data.defender.y), size=DEFENDER_IMAGES, replace=False
    )
    x, y = data.defender.x[rows], data.defender.y[rows]
    train = LabelledData(x[:-VALIDATION], y[:-VALIDATION])
    validation = LabelledData(x[-VALIDATION:], y[-VALIDATION:])
    model = keras.models.load_model(victim(args.arch, args.trigger, args.seed, 10), compile=False)
    xt, yt = triggered(data.test.x, data.test.y, TRIGGERS[args.trigger], TARGET)

    def measure() -> tuple[float, float]:
        clean = model.predict(data.test.x, batch_size=512, verbose=0).argmax(-1) == data.test.y
        hit = model.predict(xt, batch_size=512, verbose=0).argmax(-1) == yt
        return round(100 * float(clean.mean()), 1), round(100 * float(hit.mean()), 1)

    before = measure()
    started = time.perf_counter()
    loss = keras.losses.SparseCategoricalCrossentropy()
    unlearning, result = reconstructive_prune(model, train, validation, loss, settings)
    seconds = time.perf_counter() - started
    after = measure()
    record = {
        "arch": args.arch,
        "trigger": args.trigger,
        "seed": args.seed,
        "settings": overrides,
        "test_accuracy_before": before[0],
        "test_asr_before": before[1],
        "test_accuracy_after": after[0],
        "test_asr_after": after[1],
        "unlearning_epochs": unlearning.epochs,
        "unlearned_accuracy": round(unlearning.clean_accuracy, 3),
        "pruned": {layer: len(channels) for layer, channels in result.pruned.items()},
        "neurons": result.neurons,
        "candidates": result.candidates,
        "validation_accuracy": [
            result.validation_accuracy_before,
            result.validation_accuracy_after,
        ],
        "seconds": round(seconds, 1),
    }
    if args.fine_tune:
        options = SanitizeOptions(seed=args.seed)
        tuning = FineTuneSettings(
            epochs=options.epochs,
            learning_rate=options.learning_rate,
            optimizer=options.optimizer,
            lr_schedule=options.lr_schedule,
            batch_size=options.batch_size,
            augment=options.augment,
            patience=options.patience,
            freeze_batchnorm=options.freeze_batchnorm,
            seed=args.seed,
        )
        zero = [
            (layer, 0, np.isin(np.arange(model.get_layer(layer).weights[0].shape[-1]), channels))
            for layer, channels in result.pruned.items()
        ]
        started = time.perf_counter()
        fine_tune(model, train, validation, tuning, "probabilities", zero)
        record["fine_tuned"] = list(measure())
        record["fine_tune_seconds"] = round(time.perf_counter() - started, 1)
    with (RESULTS / "rnp-probe.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
