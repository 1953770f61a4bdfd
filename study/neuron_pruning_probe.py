"""Adversarial neuron pruning (ANP) alone on the tuning victims of `study.tune_defaults`.

A probe, not a defense of the product yet: it learns the masks on 1,275 of the defender's
1,500 clean images, prunes on the other 225 by the accuracy rule, and measures the official
GTSRB test images and their triggered copies. Results: docs/experiments/anp-probe.jsonl.

    .venv/bin/python -m study.neuron_pruning_probe seed_cnn patch '{"steps": 400}'
"""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras

from fineprune.neuron_pruning import NeuronPruningSettings, learn_masks, prune_by_masks
from study.probe_setup import append_record, probe_parser, probe_setup, pruning_record


def main() -> None:
    parser = probe_parser("NeuronPruningSettings, JSON")
    args = parser.parse_args()
    overrides = json.loads(args.settings)
    settings = NeuronPruningSettings(**overrides)
    setup = probe_setup(args.arch, args.trigger, args.seed)
    model, train, validation, measure = setup.model, setup.train, setup.validation, setup.measure
    before = measure()
    started = time.perf_counter()
    loss = keras.losses.SparseCategoricalCrossentropy()
    groups, masks, history = learn_masks(model, train, loss, settings)
    seconds = time.perf_counter() - started
    result = prune_by_masks(model, groups, masks, validation, settings)
    after = measure()
    record = pruning_record(args, overrides, before, after, result)
    record["mask_loss_last"] = history[-1]["loss"] if history else None
    record["mask_seconds"] = round(seconds, 1)
    append_record("anp-probe.jsonl", record)


if __name__ == "__main__":
    main()
