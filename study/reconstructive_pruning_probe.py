"""Reconstructive neuron pruning (RNP) on the victims of `study.tune_defaults`.

A probe, not a defense of the product yet: like `study.neuron_pruning_probe` it unlearns and
recovers on 1,275 of the defender's 1,500 clean images, prunes on the other 225 by the accuracy
rule, and measures the official GTSRB test images and their triggered copies; with
`--fine-tune` it then runs the product's default fine-tuning on the pruned model and measures
again. Results: docs/experiments/rnp-probe.jsonl.

    .venv/bin/python -m study.reconstructive_pruning_probe seed_cnn blended '{}' --fine-tune
"""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

from fineprune.finetune import fine_tune
from fineprune.pipeline import fine_tune_settings
from fineprune.reconstructive_pruning import ReconstructivePruningSettings, reconstructive_prune
from schemas.options import SanitizeOptions
from study.probe_setup import append_record, probe_parser, probe_setup, pruning_record


def main() -> None:
    parser = probe_parser("RNP settings, JSON")
    parser.add_argument("--fine-tune", action="store_true", help="then the default fine-tuning")
    args = parser.parse_args()
    overrides = json.loads(args.settings)
    settings = ReconstructivePruningSettings(**overrides)
    setup = probe_setup(args.arch, args.trigger, args.seed)
    model, train, validation, measure = setup.model, setup.train, setup.validation, setup.measure
    before = measure()
    started = time.perf_counter()
    loss = keras.losses.SparseCategoricalCrossentropy()
    unlearning, result = reconstructive_prune(model, train, validation, loss, settings)
    seconds = time.perf_counter() - started
    after = measure()
    record = pruning_record(args, overrides, before, after, result)
    record["unlearning_epochs"] = unlearning.epochs
    record["unlearned_accuracy"] = round(unlearning.clean_accuracy, 3)
    record["seconds"] = round(seconds, 1)
    if args.fine_tune:
        tuning = fine_tune_settings(SanitizeOptions(seed=args.seed), model)
        zero = [
            (layer, 0, np.isin(np.arange(model.get_layer(layer).weights[0].shape[-1]), channels))
            for layer, channels in result.pruned.items()
        ]
        started = time.perf_counter()
        fine_tune(model, train, validation, tuning, "probabilities", zero)
        record["fine_tuned"] = list(measure())
        record["fine_tune_seconds"] = round(time.perf_counter() - started, 1)
    append_record("rnp-probe.jsonl", record)


if __name__ == "__main__":
    main()
