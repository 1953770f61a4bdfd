"""Fine-tune one cut K times: how much the seed decides, what averaging does, what a scan sees.

One defense seed decides a lot: the same seed CNN victim, sanitized with another seed, went from
0.0 % to 6.3 % attack success (README, "how much one seed decides"). Here the cut is made once,
by the product (defense `pruning`, the victim's seed), with the split the pipeline would use; the
pruned model is then fine-tuned with the product's `auto` recipe K times, each with its own
shuffling and stamps (fine-tuning seeds seed, seed+1000, ...), and the K results are averaged
weight by weight (Wortsman et al., ICML 2022: fine-tunes of one start share a basin). Every
ingredient and the soup are measured on the GTSRB test images.

With `--scan`, each ingredient is also scanned without the trigger: for every class, the one
small perturbation (L2 radius relative to the images' norm) that sends the most of the
defender's images to that class. A backdoor left behind is such a perturbation, so the target
class should stand out; if the scan's score follows the real attack success across
ingredients, a defender could tell a good fine-tune from a bad one. Results:
docs/experiments/ingredient-probe.jsonl.

    .venv/bin/python -m study.ingredient_probe seed_cnn patch --seed 1 --ingredients 4 --scan
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
from fineprune.data import LabelledData, stratified_split
from fineprune.evaluation import output_kind, predict
from fineprune.finetune import fine_tune
from fineprune.graph import ModelGraph
from fineprune.pipeline import Inputs, fine_tune_settings, sanitize
from fineprune.surgery import copy_model
from fineprune.trigger_scan import scan, universal_perturbation
from fineprune.unlearning import perturbation_radius
from schemas.options import SanitizeOptions
from study.gtsrb import load
from study.tune_defaults import ARCHITECTURES, DEFENDER_IMAGES, RESULTS, TARGET, TRIGGERS, victim


def soup(models: list[keras.Model]) -> keras.Model:
    """The uniform average of models that share one architecture."""
    mixed = copy_model(models[0])
    weights = [m.get_weights() for m in models]
    mixed.set_weights([np.mean(ws, axis=0) for ws in zip(*weights, strict=True)])
    return mixed


def universal_success(
    model: keras.Model, x: np.ndarray, y: np.ndarray, radius: float
) -> list[float]:
    """Per class: the share of the other classes' images one perturbation sends there."""
    return [
        round(100 * universal_perturbation(model, x[y != c][:128], c, radius, steps=20)[1], 1)
        for c in range(int(model.outputs[0].shape[-1]))
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("arch", choices=list(ARCHITECTURES))
    parser.add_argument("trigger", choices=list(TRIGGERS))
    parser.add_argument("--seed", type=int, default=0, help="victim seed")
    parser.add_argument("--defense-seed", type=int, help="split and cut (default: --seed)")
    parser.add_argument("--ingredients", type=int, default=4)
    parser.add_argument("--scan", action="store_true", help="scan every ingredient")
    parser.add_argument("--radius", type=float, default=0.1, help="scan's, relative")
    parser.add_argument(
        "--proxy-share",
        type=float,
        default=0.0,
        help="shift this share of each batch by the delivered model's scanned proxy trigger",
    )
    parser.add_argument("--first-seed", type=int, default=0, help="index of the first ingredient")
    parser.add_argument(
        "--extrapolate",
        default="",
        help="comma-separated t: also measure pruned + t (soup - pruned) for the full soup",
    )
    parser.add_argument("--results", default="ingredient-probe.jsonl")
    args = parser.parse_args()
    seed = args.seed if args.defense_seed is None else args.defense_seed
    data = load()
    rows = np.random.default_rng(args.seed).choice(
        len(data.defender.y), size=DEFENDER_IMAGES, replace=False
    )
    x, y = data.defender.x[rows], data.defender.y[rows]
    xt, yt = triggered(data.test.x, data.test.y, TRIGGERS[args.trigger], TARGET)
    options = SanitizeOptions(seed=seed, proxy_triggers=0.0)  # the recipe before the scan
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / "clean.npz"
        np.savez(clean, x=x, y=y)
        model_path = victim(args.arch, args.trigger, args.seed, 10)
        report = sanitize(
            Inputs(model_path, clean), Path(tmp), options.model_copy(update={"defense": "pruning"})
        )
        pruned = keras.models.load_model(Path(tmp) / "sanitized.keras", compile=False)
    # The pipeline's split (fineprune.pipeline.load_splits), so the cut saw what it would.
    kept, _ = stratified_split(y, options.holdout_fraction, seed)
    tune = LabelledData(x[kept], y[kept])
    train_rows, val_rows = stratified_split(tune.y, options.validation_fraction, seed + 1)
    train, validation = tune.take(train_rows), tune.take(val_rows)
    head = ModelGraph(pruned).downstream_layers(report.surgery.layer)
    # With a proxy, the recipe the product resolves with one (the frozen head's rate is 1e-3).
    recipe_options = options.model_copy(update={"proxy_triggers": args.proxy_share})
    settings = fine_tune_settings(recipe_options, pruned, head)
    proxy = None
    if args.proxy_share:
        started = time.perf_counter()
        proxy = scan(keras.models.load_model(model_path, compile=False), train.x, train.y, seed)
        settings = replace(settings, proxy_trigger=proxy.perturbation, proxy_share=args.proxy_share)
        print(f"scan {time.perf_counter() - started:.0f} s: {proxy}"[:400], flush=True)
    kind = output_kind(predict(pruned, validation.x[:256]))

    def measure(model: keras.Model) -> tuple[float, float]:
        clean = model.predict(data.test.x, batch_size=512, verbose=0).argmax(-1) == data.test.y
        hit = model.predict(xt, batch_size=512, verbose=0).argmax(-1) == yt
        return round(100 * float(clean.mean()), 1), round(100 * float(hit.mean()), 1)

    delivered = keras.models.load_model(model_path, compile=False)
    radius = perturbation_radius(validation.x, args.radius)
    record: dict = {
        "arch": args.arch,
        "trigger": args.trigger,
        "seed": args.seed,
        "defense_seed": seed,
        "pruned": report.decision.pruned,
        "delivered": measure(delivered),
        "pruned_only": measure(pruned),
        "scan_radius": args.radius if args.scan else None,
        "scan_delivered": universal_success(delivered, validation.x, validation.y, radius)
        if args.scan
        else None,
        "recipe": {
            "epochs": settings.epochs,
            "learning_rate": settings.learning_rate,
            "synthetic_triggers": settings.synthetic_triggers,
            "frozen_layers": list(settings.frozen_layers),
        },
        "ingredients": [],
    }
    if proxy is not None:
        record["proxy"] = {
            "share": args.proxy_share,
            "radius": proxy.radius,
            "success": proxy.success,
            "anomaly": proxy.anomaly,
            "suspect": proxy.suspect,
        }
    tuned: list[keras.Model] = []
    started = time.perf_counter()
    for i in range(args.first_seed, args.first_seed + args.ingredients):
        keras.utils.set_random_seed(seed + 1000 * i)
        model = copy_model(pruned)
        result = fine_tune(model, train, validation, replace(settings, seed=seed + 1000 * i), kind)
        accuracy, asr = measure(model)
        val = result.history[result.best_epoch - 1]["val_accuracy"]
        record["ingredients"].append(
            {"seed": seed + 1000 * i, "test": (accuracy, asr), "val_accuracy": round(100 * val, 1)}
        )
        if args.scan:
            record["ingredients"][-1]["scan"] = universal_success(
                model, validation.x, validation.y, radius
            )
        tuned.append(model)
        print(json.dumps(record["ingredients"][-1]), flush=True)
    record["seconds"] = round(time.perf_counter() - started)
    for k in range(2, len(tuned) + 1):
        record[f"soup{k}"] = measure(soup(tuned[:k]))
    if args.extrapolate:
        full, start = soup(tuned).get_weights(), pruned.get_weights()
        for t in (float(v) for v in args.extrapolate.split(",")):
            moved = copy_model(pruned)
            moved.set_weights([a + t * (b - a) for a, b in zip(start, full, strict=True)])
            record[f"soup{len(tuned)}_t{t:g}"] = measure(moved)
    with (RESULTS / args.results).open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
