"""Fine-tune only part of a fine-pruned model: where does fine-pruning's forgetting live?

On the tuning victims of `study.tune_defaults`: prune with the product's rule (defense
`pruning`, defaults), then fine-tune with the default schedule (cosine from 1e-3, 10 epochs,
BatchNorm frozen) either everything ("all"), only the layers after the pruned convolution
("after"), or only the layers up to and including it ("upto", the dense head frozen), the
last optionally with another schedule or method. A probe: the tuning images are split 956 /
169 / 375 (train / validation / unused) here, not by the pipeline's stratified split, so "all"
is this probe's own baseline. Results: docs/experiments/partial-tuning-probe.jsonl.

    .venv/bin/python -m study.partial_tuning_probe seed_cnn patch all,after,upto,upto-e20
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

from fineprune.attacks import triggered
from fineprune.data import LabelledData
from fineprune.finetune import FineTuneSettings, fine_tune
from fineprune.pipeline import Inputs, sanitize
from fineprune.surgery import copy_model
from schemas.options import SanitizeOptions
from study.gtsrb import load
from study.tune_defaults import DEFENDER_IMAGES, RESULTS, TARGET, TRIGGERS, victim

PRUNED_LAYER = {
    "seed_cnn": "conv2d_3",
    "small_resnet": "head_conv",
    "small_resnet_aug": "head_conv",
}
DEFAULT = FineTuneSettings(
    epochs=10,
    learning_rate=1e-3,
    optimizer="adam",
    lr_schedule="cosine",
    batch_size=32,
    augment=False,
    patience=10,
    freeze_batchnorm=True,
    seed=0,
)
VARIANTS: dict[str, tuple[str, dict]] = {
    "all": ("all", {}),
    "after": ("after", {}),
    "upto": ("upto", {}),
    "upto-lr3e-3": ("upto", {"learning_rate": 3e-3}),
    "upto-e20": ("upto", {"epochs": 20}),
    "upto-bau": ("upto", {"unlearning_radius": 0.2}),
    "upto-sam": ("upto", {"sharpness_radius": 2.0}),
    "upto-bau-r01": ("upto", {"unlearning_radius": 0.1}),
    "upto-bau-teach": ("upto", {"unlearning_radius": 0.2, "distillation": 1.0}),
    # Synthetic triggers with the dense head frozen: the convolutions, which see a stamp the
    # same wherever it lands, learn to ignore it; the head cannot memorise stamp positions.
    "all-synth50": ("all", {"synthetic_triggers": 0.5}),
    "upto-synth50": ("upto", {"synthetic_triggers": 0.5}),
    "upto-synth50-lr2e-3": ("upto", {"synthetic_triggers": 0.5, "learning_rate": 2e-3}),
    "upto-synth50-lr3e-3": ("upto", {"synthetic_triggers": 0.5, "learning_rate": 3e-3}),
    "upto-synth50-lr2.5e-3": ("upto", {"synthetic_triggers": 0.5, "learning_rate": 2.5e-3}),
    "upto-synth75-lr2e-3": ("upto", {"synthetic_triggers": 0.75, "learning_rate": 2e-3}),
    "upto-lr2e-3": ("upto", {"learning_rate": 2e-3}),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("arch", choices=list(PRUNED_LAYER))
    parser.add_argument("trigger", choices=list(TRIGGERS))
    parser.add_argument("variants", help=f"comma-separated, of {','.join(VARIANTS)}")
    parser.add_argument(
        "--per-epoch", action="store_true", help="also measure the test images after every epoch"
    )
    parser.add_argument("--seed", type=int, default=0, help="1: the held-out victims")
    args = parser.parse_args()
    seed = args.seed
    data = load()
    rows = np.random.default_rng(seed).choice(
        len(data.defender.y), size=DEFENDER_IMAGES, replace=False
    )
    x, y = data.defender.x[rows], data.defender.y[rows]
    xt, yt = triggered(data.test.x, data.test.y, TRIGGERS[args.trigger], TARGET)
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / "clean.npz"
        np.savez(clean, x=x, y=y)
        options = SanitizeOptions(defense="pruning", seed=seed)
        sanitize(Inputs(victim(args.arch, args.trigger, seed, 10), clean), Path(tmp), options)
        pruned = keras.models.load_model(Path(tmp) / "sanitized.keras", compile=False)
    cut = [layer.name for layer in pruned.layers].index(PRUNED_LAYER[args.arch])
    train, validation = LabelledData(x[:956], y[:956]), LabelledData(x[956:1125], y[956:1125])

    def measure(model: keras.Model) -> tuple[float, float]:
        clean = model.predict(data.test.x, batch_size=512, verbose=0).argmax(-1) == data.test.y
        hit = model.predict(xt, batch_size=512, verbose=0).argmax(-1) == yt
        return round(100 * float(clean.mean()), 1), round(100 * float(hit.mean()), 1)

    pruned_only = measure(pruned)
    # The teaching variants learn from the delivered model, as the product's BAU does.
    delivered = keras.models.load_model(victim(args.arch, args.trigger, seed, 10), compile=False)
    for name in args.variants.split(","):
        part, changes = VARIANTS[name]
        keras.utils.set_random_seed(seed)  # each variant from the same state, whatever ran before
        model = copy_model(pruned)
        for index, layer in enumerate(model.layers):
            layer.trainable = part == "all" or (index > cut) == (part == "after")
        started = time.perf_counter()
        settings = replace(DEFAULT, seed=seed, **changes)
        trajectory: list[dict[str, float]] = []

        def watch(
            epoch: dict[str, float], model: keras.Model = model, into: list = trajectory
        ) -> None:
            if args.per_epoch:
                accuracy, asr = measure(model)
                into.append({**epoch, "test_accuracy": accuracy, "test_asr": asr})

        tuned = fine_tune(
            model, train, validation, settings, "probabilities", on_epoch=watch, teacher=delivered
        )
        accuracy, asr = measure(model)
        record = {
            "arch": args.arch,
            "trigger": args.trigger,
            "seed": seed,
            "variant": name,
            "pruned_only": pruned_only,
            "test_accuracy_after": accuracy,
            "test_asr_after": asr,
            "best_epoch": tuned.best_epoch,
            "seconds": round(time.perf_counter() - started),
        }
        if trajectory:
            record["per_epoch"] = trajectory
        with (RESULTS / "partial-tuning-probe.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
