"""`make reproduce`: the seed study, start to finish, on real GTSRB images.

The attacker trains the study's CNN on its share of the tracks: once with BadNets poisoning
(Stop signs with a yellow sticker relabelled "Go straight or right"), once with the
pruning-aware attack. The defender gets 1,500 clean images from other tracks and runs the
three defenses through `fineprune.pipeline.sanitize`, the same code the service runs. Every
clean accuracy is measured on the official GTSRB test images; every attack success rate on
the test set's Stop signs with the sticker.

    .venv/bin/python -m study.reproduce            # about 30 min on 2 CPU cores
    .venv/bin/python -m study.reproduce --quick    # minutes; a smoke test, numbers meaningless
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

from fineprune.architectures import seed_cnn
from fineprune.attacks import BlendedTrigger, PatchTrigger, Trigger, poison, triggered
from fineprune.pipeline import Inputs, sanitize
from fineprune.pruning_aware import pruning_aware_attack
from schemas.options import SanitizeOptions
from schemas.report import SanitizeReport
from study import figures, write_up
from study.gtsrb import GO_STRAIGHT_OR_RIGHT, STOP, Gtsrb, load
from study.training import train

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
OUT = DOCS / "study"
LAYER = "conv2d_3"
DEFENSES = ("pruning", "fine-tuning", "fine-pruning")


@dataclass(frozen=True)
class Config:
    victim_epochs: int = 10  # attacker's training, standard attack and clean model alike
    retrain_epochs: int = 5  # pruning-aware step 3: the pruned model on poisoned data
    retrain_learning_rate: float = 1e-3
    attacker_prune_fraction: float | None = None  # None: the defender's own 4-point rule
    poison_share: float = 0.5  # of the attacker's Stop signs, added again with the sticker
    defender_images: int = 1500
    seed: int = 0
    attacks: tuple[str, ...] = ("badnets", "pruning-aware")


TRIGGERS: dict[str, Trigger] = {
    # A yellow 4x4 sticker low on the sign, about where one sits on a real stop sign.
    "badnets": PatchTrigger(size=4, corner=(-10, 14), color=(1.0, 1.0, 0.0)),
    "pruning-aware": PatchTrigger(size=4, corner=(-10, 14), color=(1.0, 1.0, 0.0)),
    "blended": BlendedTrigger(alpha=0.15),
}
QUICK = Config(
    victim_epochs=1, retrain_epochs=1, defender_images=300, attacks=("badnets", "pruning-aware")
)


def poisoned_training_set(data: Gtsrb, trigger: Trigger, config: Config):
    """The attacker's tracks plus stickered copies of a share of its Stop signs."""
    x, y, chosen = poison(
        data.attacker.x,
        data.attacker.y,
        trigger,
        GO_STRAIGHT_OR_RIGHT,
        config.poison_share,
        seed=config.seed,
        source_classes=(STOP,),
    )
    return np.concatenate([data.attacker.x, x[chosen]]), np.concatenate(
        [data.attacker.y, y[chosen]]
    )


def build_victim(attack: str, data: Gtsrb, config: Config, log: Callable[[str], None]) -> dict:
    """Train the attacker's model; returns the model and what the attack itself measured."""
    keras.utils.set_random_seed(config.seed)
    x_poison, y_poison = poisoned_training_set(data, TRIGGERS[attack], config)
    classes = len(data.names)
    if attack != "pruning-aware":
        log(f"{attack}: training on {len(y_poison)} images ({config.victim_epochs} epochs)")
        model = train(seed_cnn(classes), x_poison, y_poison, config.victim_epochs, config.seed)
        return {"model": model}
    log(f"pruning-aware: step 1, clean training ({config.victim_epochs} epochs)")
    clean = train(
        seed_cnn(classes), data.attacker.x, data.attacker.y, config.victim_epochs, config.seed
    )
    log("pruning-aware: steps 2-4, prune, retrain on poisoned data, reinstate decoys")

    def retrain(model: keras.Model, x: np.ndarray, y: np.ndarray) -> keras.Model:
        return train(model, x, y, config.retrain_epochs, config.seed, config.retrain_learning_rate)

    result = pruning_aware_attack(
        clean,
        data.attacker.x,
        data.attacker.y,
        x_poison,
        y_poison,
        train=retrain,
        layer=LAYER,
        prune_fraction=config.attacker_prune_fraction,
    )
    return {
        "model": result.model,
        "clean_model": clean,
        "decoys": [int(c) for c in result.decoys],
        "bias_shift_mean": float(result.bias_shift.mean()) if len(result.decoys) else 0.0,
    }


def _accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    return float((model.predict(x, batch_size=256, verbose=0).argmax(-1) == y).mean())


def run(config: Config, out: Path, log: Callable[[str], None] = print) -> dict:
    started = time.perf_counter()
    data = load(seed=config.seed)
    rng = np.random.default_rng(config.seed)
    rows = rng.choice(len(data.defender.y), size=config.defender_images, replace=False)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reports").mkdir(exist_ok=True)
    results: dict = {
        "config": asdict(config),
        "data": {
            "classes": list(data.names),
            "attacker_images": len(data.attacker.y),
            "defender_pool": len(data.defender.y),
            "defender_images": config.defender_images,
            "test_images": len(data.test.y),
            "test_stop_signs": int((data.test.y == STOP).sum()),
        },
        "attacks": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        clean_path = work / "clean.npz"
        np.savez(clean_path, x=data.defender.x[rows], y=data.defender.y[rows])
        test_path = work / "test.npz"
        np.savez(test_path, x=data.test.x, y=data.test.y)
        for attack in config.attacks:
            attack_started = time.perf_counter()
            trigger = TRIGGERS[attack]
            xt, yt = triggered(
                data.test.x, data.test.y, trigger, GO_STRAIGHT_OR_RIGHT, source_classes=(STOP,)
            )
            trigger_path = work / f"trigger-{attack}.npz"
            np.savez(trigger_path, x=xt, y_target=yt)
            victim = build_victim(attack, data, config, log)
            model_path = work / f"{attack}.keras"
            victim["model"].save(model_path)
            entry: dict = {"training_seconds": round(time.perf_counter() - attack_started, 1)}
            if "clean_model" in victim:
                clean_model = victim["clean_model"]
                entry["clean_model"] = {
                    "clean_accuracy": _accuracy(clean_model, data.test.x, data.test.y),
                    "attack_success_rate": _accuracy(clean_model, xt, yt),
                }
                entry["decoys"] = victim["decoys"]
                entry["bias_shift_mean"] = victim["bias_shift_mean"]
            entry["defenses"] = {}
            for defense in DEFENSES:
                log(f"{attack}: defense {defense}")
                options = SanitizeOptions(defense=defense, seed=config.seed)
                if config is QUICK:
                    options = options.model_copy(update={"epochs": 2})
                report = sanitize(
                    Inputs(model_path, clean_path, trigger_path=trigger_path, test_path=test_path),
                    work / f"{attack}-{defense}",
                    options,
                )
                (out / "reports" / f"{attack}-{defense}.json").write_text(
                    report.model_dump_json(indent=1)
                )
                entry["defenses"][defense] = _summary(report)
            entry["seconds"] = round(time.perf_counter() - attack_started, 1)
            results["attacks"][attack] = entry
            log(f"{attack}: done in {entry['seconds']:.0f} s")
    results["seconds"] = round(time.perf_counter() - started, 1)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    results["cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 1)
    results["machine"] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "gpu": bool(_gpus()),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def _summary(report: SanitizeReport) -> dict:
    def stage(metrics) -> dict:
        asr = metrics.attack_success_rate
        return {
            "clean_accuracy": metrics.clean_accuracy.value,
            "attack_success_rate": None if asr is None else asr.value,
        }

    return {
        "before": stage(report.baseline),
        "pruned": stage(report.pruned),
        "after": stage(report.fine_pruned),
        "channels_pruned": report.decision.pruned,
        "channels": report.surgery.channels_before if report.surgery else None,
        "best_epoch": report.fine_tuning.best_epoch if report.fine_tuning else None,
        "seconds": round(sum(report.timings.values()), 1),
    }


def _gpus() -> list:
    import tensorflow as tf

    return tf.config.list_physical_devices("GPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 epoch, 300 images: a smoke test")
    parser.add_argument("--out", type=Path, default=OUT, help="where results and figures go")
    parser.add_argument(
        "--write-only", action="store_true", help="redraw figures and study.md from results.json"
    )
    args = parser.parse_args()
    config = QUICK if args.quick else Config()

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    if not args.write_only:
        run(config, args.out, log)
    results = json.loads((args.out / "results.json").read_text())
    reports = {
        p.stem: SanitizeReport.model_validate_json(p.read_text())
        for p in sorted((args.out / "reports").glob("*.json"))
    }
    figures.draw_all(results, reports, args.out)
    document = DOCS / "study.md" if args.out == OUT else args.out / "study.md"
    document.write_text(write_up.render(results, reports, figures_dir=args.out, doc=document))
    log(f"wrote {document} and the figures in {args.out}")


if __name__ == "__main__":
    main()
