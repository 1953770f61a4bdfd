"""What the engine probes share: a tuning victim, the defender's split, the test measurement.

The probes (`neuron_pruning_probe`, `reconstructive_pruning_probe`) hand a defense 1,275 of the
defender's 1,500 clean images to learn from and the other 225 to judge pruning by, and measure
clean accuracy and attack success on the official GTSRB test images.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import keras
import numpy as np

from fineprune.attacks import triggered
from fineprune.data import LabelledData
from fineprune.neuron_pruning import NeuronPruningResult
from study.gtsrb import Gtsrb, load
from study.tune_defaults import DEFENDER_IMAGES, RESULTS, TARGET, TRIGGERS, victim

VALIDATION = 225


@dataclass
class ProbeSetup:
    data: Gtsrb
    model: keras.Model  # the victim, loaded fresh: the probe may change it in place
    train: LabelledData
    validation: LabelledData
    triggered_x: np.ndarray
    triggered_y: np.ndarray

    def measure(self) -> tuple[float, float]:
        """(clean accuracy, attack success) of the model now, in percent, on the test images."""
        test = self.data.test
        clean = self.model.predict(test.x, batch_size=512, verbose=0).argmax(-1) == test.y
        hit = self.model.predict(self.triggered_x, batch_size=512, verbose=0).argmax(-1)
        return round(100 * float(clean.mean()), 1), round(
            100 * float((hit == self.triggered_y).mean()), 1
        )


def probe_parser(settings_help: str) -> argparse.ArgumentParser:
    """arch, trigger, the settings as JSON, --seed (1: the held-out victims)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("arch")
    parser.add_argument("trigger", choices=list(TRIGGERS))
    parser.add_argument("settings", nargs="?", default="{}", help=settings_help)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def probe_setup(arch: str, trigger: str, seed: int) -> ProbeSetup:
    data = load()
    rows = np.random.default_rng(seed).choice(
        len(data.defender.y), size=DEFENDER_IMAGES, replace=False
    )
    x, y = data.defender.x[rows], data.defender.y[rows]
    model = keras.models.load_model(victim(arch, trigger, seed, 10), compile=False)
    xt, yt = triggered(data.test.x, data.test.y, TRIGGERS[trigger], TARGET)
    return ProbeSetup(
        data,
        model,
        LabelledData(x[:-VALIDATION], y[:-VALIDATION]),
        LabelledData(x[-VALIDATION:], y[-VALIDATION:]),
        xt,
        yt,
    )


def pruning_record(
    args: argparse.Namespace,
    settings: dict,
    before: tuple[float, float],
    after: tuple[float, float],
    result: NeuronPruningResult,
) -> dict:
    """The fields every neuron-pruning probe records: the victim, the settings, what changed."""
    return {
        "arch": args.arch,
        "trigger": args.trigger,
        "seed": args.seed,
        "settings": settings,
        "test_accuracy_before": before[0],
        "test_asr_before": before[1],
        "test_accuracy_after": after[0],
        "test_asr_after": after[1],
        "pruned": {layer: len(channels) for layer, channels in result.pruned.items()},
        "neurons": result.neurons,
        "candidates": result.candidates,
        "validation_accuracy": [
            result.validation_accuracy_before,
            result.validation_accuracy_after,
        ],
    }


def append_record(file_name: str, record: dict) -> None:
    """One JSON line in docs/experiments/, and on stdout."""
    with (RESULTS / file_name).open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)
