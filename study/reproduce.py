"""`make reproduce`: the seed study, start to finish, on real GTSRB images.

The attacker trains the study's CNN on its share of the tracks: once with BadNets poisoning
(Stop signs with a yellow sticker relabelled "Go straight or right"), once with the
pruning-aware attack, once with a blended trigger (a faint pattern over the whole Stop sign).
The defender gets 1,500 clean images from other tracks and runs every defense the product
offers through `fineprune.pipeline.sanitize`, the same code the service runs. Every clean
accuracy is measured on the official GTSRB test images; every attack success rate on the test
set's Stop signs with the trigger. Victims are kept in .cache/study-victims (by attack and
config), so a re-run defends the same models; `--retrain` trains them again.

    .venv/bin/python -m study.reproduce            # about an hour on 2 CPU cores
    .venv/bin/python -m study.reproduce --quick    # minutes; a smoke test, numbers meaningless
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

from fineprune.pipeline import sanitize
from schemas.report import SanitizeReport
from study import figures, write_up
from study.architectures import seed_cnn
from study.attacks import BlendedTrigger, PatchTrigger, Trigger, poison, triggered
from study.defenses import DEFENSES, defense_settings
from study.gtsrb import GO_STRAIGHT_OR_RIGHT, STOP, Gtsrb, load
from study.pruning_aware import pruning_aware_attack
from study.training import train

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
OUT = DOCS / "study"
LAYER = "conv2d_3"
CACHE = ROOT / ".cache" / "study-victims"
# The study's fine-tuning: the classifier head trained, 10 epochs at 1e-3, one run, as every
# default before the `auto` recipe (docs/defaults.md says what `auto` does now).
STUDY_OPTIONS: dict[str, object] = {"learning_rate": 1e-3, "epochs": 10}
STUDY_RESEARCH: dict[str, object] = {
    "freeze_head": False,
    "proxy_triggers": 0.0,
    "averaged_runs": 1,
}


@dataclass(frozen=True)
class Config:
    victim_epochs: int = 10  # attacker's training, standard attack and clean model alike
    retrain_epochs: int = 5  # pruning-aware step 3: the pruned model on poisoned data
    retrain_learning_rate: float = 1e-3
    attacker_prune_fraction: float | None = None  # None: the defender's own 4-point rule
    poison_share: float = 0.5  # of the attacker's Stop signs, added again with the sticker
    defender_images: int = 1500
    seed: int = 0
    attacks: tuple[str, ...] = ("badnets", "pruning-aware", "blended")


TRIGGERS: dict[str, Trigger] = {
    # A yellow 4x4 sticker low on the sign, about where one sits on a real stop sign.
    "badnets": PatchTrigger(size=4, corner=(-10, 14), color=(1.0, 1.0, 0.0)),
    "pruning-aware": PatchTrigger(size=4, corner=(-10, 14), color=(1.0, 1.0, 0.0)),
    "blended": BlendedTrigger(alpha=0.15),
}
QUICK = Config(victim_epochs=1, retrain_epochs=1, defender_images=300)


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


def victim_key(attack: str, config: Config) -> str:
    return hashlib.sha256(json.dumps(asdict(config) | {"attack": attack}).encode()).hexdigest()[:12]


def weights_digest(model: keras.Model) -> str:
    """A fingerprint of the weights: training the same config again can give another model."""
    digest = hashlib.sha256()
    for weights in model.get_weights():
        digest.update(np.ascontiguousarray(weights).tobytes())
    return digest.hexdigest()[:16]


def cached_victim(
    attack: str, data: Gtsrb, config: Config, log: Callable[[str], None], cache: Path | None
) -> dict:
    """`build_victim`, kept on disk by attack and config: a re-run defends the same models."""
    if cache is None:
        return build_victim(attack, data, config, log)
    key = victim_key(attack, config)
    folder = cache / f"{attack}-{key}"
    if (folder / "extras.json").exists():
        log(f"{attack}: reusing the victim in {folder}")
        victim = json.loads((folder / "extras.json").read_text()) | {"reused": True}
        victim["model"] = keras.models.load_model(folder / "model.keras", compile=False)
        if (folder / "clean.keras").exists():
            victim["clean_model"] = keras.models.load_model(folder / "clean.keras", compile=False)
        return victim
    victim = build_victim(attack, data, config, log)
    partial = folder.with_name(f".{folder.name}-{os.getpid()}")
    partial.mkdir(parents=True, exist_ok=True)
    victim["model"].save(partial / "model.keras")
    if "clean_model" in victim:
        victim["clean_model"].save(partial / "clean.keras")
    extras = {k: v for k, v in victim.items() if k not in ("model", "clean_model")}
    (partial / "extras.json").write_text(json.dumps(extras))
    if folder.exists():
        shutil.rmtree(folder)
    partial.replace(folder)
    return victim


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


def run(
    config: Config,
    out: Path,
    log: Callable[[str], None] = print,
    cache: Path | None = None,
    defenses: tuple[str, ...] = tuple(DEFENSES),
) -> dict:
    """Attack, then defend; with a cache, defenses not re-run are kept from the last run."""
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
        "seconds": 0.0,
        "cpu_seconds": 0.0,
    }
    previous = _previous(out, config) if cache is not None else None
    if previous is not None:
        results["seconds"] = previous.get("seconds", 0.0)
        results["cpu_seconds"] = previous.get("cpu_seconds", 0.0)
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
            victim = cached_victim(attack, data, config, log, cache)
            model_path = work / f"{attack}.keras"
            victim["model"].save(model_path)
            entry: dict = {
                "training_seconds": round(time.perf_counter() - attack_started, 1),
                "victim_reused": bool(victim.get("reused")),
            }
            if "clean_model" in victim:
                clean_model = victim["clean_model"]
                entry["clean_model"] = {
                    "clean_accuracy": _accuracy(clean_model, data.test.x, data.test.y),
                    "attack_success_rate": _accuracy(clean_model, xt, yt),
                }
                entry["decoys"] = victim["decoys"]
                entry["bias_shift_mean"] = victim["bias_shift_mean"]
            entry["victim_key"] = victim_key(attack, config)
            entry["victim_weights"] = weights_digest(victim["model"])
            entry["defenses"] = {}
            earlier = (previous or {}).get("attacks", {}).get(attack) or {}
            # Same config is not enough: a victim trained again (no cache) differs.
            same_victim = earlier.get("victim_weights") == entry["victim_weights"]
            if same_victim:
                # The same model was defended before: keep what this run does not redo.
                entry["defenses"] = {
                    d: v for d, v in earlier["defenses"].items() if d not in defenses
                }
            else:
                for stale in (out / "reports").glob(f"{attack}-*.json"):
                    stale.unlink()
            for defense in defenses:
                log(f"{attack}: defense {defense}")
                chosen = {**STUDY_OPTIONS, "seed": config.seed}
                if config is QUICK:
                    chosen["epochs"] = 2
                options, research = defense_settings(defense, chosen, STUDY_RESEARCH)
                report = sanitize(
                    model_path,
                    clean_path,
                    work / f"{attack}-{defense}",
                    options,
                    trigger_data=trigger_path,
                    test_data=test_path,
                    research=research,
                )
                (out / "reports" / f"{attack}-{defense}.json").write_text(
                    report.model_dump_json(indent=1)
                )
                entry["defenses"][defense] = _summary(report)
            ran = entry["defenses"]
            entry["defenses"] = {d: ran[d] for d in DEFENSES if d in ran}
            entry["seconds"] = round(time.perf_counter() - attack_started, 1)
            results["attacks"][attack] = entry
            log(f"{attack}: done in {entry['seconds']:.0f} s")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    results["seconds"] = round(results["seconds"] + time.perf_counter() - started, 1)
    results["cpu_seconds"] = round(results["cpu_seconds"] + usage.ru_utime + usage.ru_stime, 1)
    results["machine"] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "gpu": bool(_gpus()),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def _previous(out: Path, config: Config) -> dict | None:
    """The last run's results in `out`, if it ran with this config."""
    path = out / "results.json"
    if not path.exists():
        return None
    previous = json.loads(path.read_text())
    return previous if previous.get("config") == json.loads(json.dumps(asdict(config))) else None


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
    parser.add_argument(
        "--defenses",
        default=",".join(DEFENSES),
        help="comma-separated defenses to (re-)run; with cached victims the others are kept",
    )
    parser.add_argument(
        "--retrain",
        action="store_true",
        help=f"train the victims again instead of reusing those in {CACHE.relative_to(ROOT)}",
    )
    args = parser.parse_args()
    config = QUICK if args.quick else Config()

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    if not args.write_only:
        chosen = tuple(d for d in args.defenses.split(",") if d)
        unknown = set(chosen) - set(DEFENSES)
        if unknown:
            parser.error(f"unknown defenses: {', '.join(sorted(unknown))}")
        cache = None if args.retrain or args.quick else CACHE
        run(config, args.out, log, cache=cache, defenses=chosen)
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
