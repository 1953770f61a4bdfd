"""The experiment behind the sanitize defaults: fine-tuning schedules against attacks we build.

Victims: the seed CNN, a small ResNet and a small VGG, each backdoored all-to-one with a patch
and with a blended trigger, on GTSRB; `small_resnet_aug` is the same ResNet trained with
augmentation for 30 epochs (85-87 % on the test signs, where the plain recipe leaves it at
71-75 %). Tuning
victims use one training seed; held-out victims another, and are only ever run with the chosen
defaults. Every sanitize sees 1,500 clean images of the defender's pool; clean accuracy is also
measured on the official GTSRB test images.

    .venv/bin/python -m study.tune_defaults --phase tune      # compare schedules
    .venv/bin/python -m study.tune_defaults --phase heldout   # defaults on unseen victims
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

from fineprune.architectures import seed_cnn, small_resnet, small_vgg
from fineprune.attacks import BlendedTrigger, PatchTrigger, poison, triggered
from fineprune.averaging import extrapolate
from fineprune.data import stratified_split
from fineprune.pipeline import Inputs, sanitize
from schemas.options import SanitizeOptions
from schemas.report import SanitizeReport
from study.gtsrb import GO_STRAIGHT_OR_RIGHT, load
from study.training import train

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "victims-v2"
RESULTS = ROOT / "docs" / "experiments"
ARCHITECTURES = {
    "seed_cnn": seed_cnn,
    "small_resnet": small_resnet,
    "small_resnet_aug": small_resnet,
    "small_vgg": small_vgg,
}
# How each victim is trained, beyond `train`'s defaults. "small_resnet_aug" is the small ResNet
# as a competent trainer would deliver it (87 % on the test signs instead of 72-75 %).
RECIPES: dict[str, dict] = {"small_resnet_aug": dict(epochs=30, learning_rate=2e-3, augment=True)}
TRIGGERS = {"patch": PatchTrigger(size=4), "blended": BlendedTrigger(alpha=0.15)}
SCHEDULES = {
    "paper": dict(epochs=10, learning_rate=1e-3, optimizer="adam", augment=False, patience=10),
    "adam-aug": dict(epochs=20, learning_rate=1e-3, optimizer="adam", augment=True, patience=5),
    "sgd-aug": dict(epochs=20, learning_rate=1e-2, optimizer="sgd", augment=True, patience=5),
}
# Added after the first three: the same schedules with BatchNorm frozen while fine-tuning.
SCHEDULES_FROZEN_BN = {
    "paper-frozenbn": dict(SCHEDULES["paper"], freeze_batchnorm=True),
    "adam-aug-frozenbn": dict(SCHEDULES["adam-aug"], freeze_batchnorm=True),
    "sgd-aug-frozenbn": dict(SCHEDULES["sgd-aug"], freeze_batchnorm=True),
    "lowlr-frozenbn": dict(SCHEDULES["paper"], learning_rate=1e-4, freeze_batchnorm=True),
    "midlr-frozenbn": dict(SCHEDULES["paper"], learning_rate=3e-4, freeze_batchnorm=True),
    "cosine-frozenbn": dict(SCHEDULES["paper"], lr_schedule="cosine", freeze_batchnorm=True),
}
for schedule in SCHEDULES.values():
    schedule.setdefault("freeze_batchnorm", False)
SCHEDULES.update(SCHEDULES_FROZEN_BN)
SCHEDULES["default"] = {}  # whatever SanitizeOptions defaults to now
# Issue 6: defenses beyond fine-pruning, on the default schedule (cosine, BN frozen).
SCHEDULES_BEYOND = {
    "ft-sam": dict(defense="ft-sam"),
    "ft-sam-r05": dict(defense="ft-sam", sharpness_radius=0.5),
    "fine-pruning-sam": dict(defense="fine-pruning-sam"),
    "fine-tuning": dict(defense="fine-tuning"),
    # FST (feature-shift tuning). The first runs had no distillation and cost 8-17 points of
    # clean accuracy; prototypes then showed that the delivered model's teaching keeps it.
    "fst-paper-nodistill": dict(defense="fst", shift_strength=0.2, distillation=0.0),
    "fst-a1-nodistill": dict(defense="fst", shift_strength=1.0, distillation=0.0),
    "fine-pruning-fst-a02-nodistill": dict(
        defense="fine-pruning-fst", shift_strength=0.2, distillation=0.0
    ),
    "fine-pruning-fst-a1-nodistill": dict(
        defense="fine-pruning-fst", shift_strength=1.0, distillation=0.0
    ),
    "fst-a1-lr3e-4-nodistill": dict(
        defense="fst", shift_strength=1.0, learning_rate=3e-4, distillation=0.0
    ),
    "fst-a1-lr1e-4-nodistill": dict(
        defense="fst", shift_strength=1.0, learning_rate=1e-4, distillation=0.0
    ),
    "fine-pruning-fst-a02-lr3e-4-nodistill": dict(
        defense="fine-pruning-fst", shift_strength=0.2, learning_rate=3e-4, distillation=0.0
    ),
    # Strength 1, distillation 1, the last epoch kept; first without, then with the fallback
    # to plain fine-tuning when the validation accuracy drops more than 4 points.
    "fst-nofallback": dict(defense="fst", fst_fallback=False),
    "fine-pruning-fst-nofallback": dict(defense="fine-pruning-fst", fst_fallback=False),
    "fst": dict(defense="fst"),
    "fine-pruning-fst": dict(defense="fine-pruning-fst"),
    "fine-pruning-fst-a02": dict(defense="fine-pruning-fst", shift_strength=0.2),
}
SCHEDULES.update(SCHEDULES_BEYOND)
# Backdoor adversarial unlearning (I-BAU's min-max, alternating), the delivered model teaching.
SCHEDULES.update(
    {
        "bau": dict(defense="bau"),
        "fine-pruning-bau": dict(defense="fine-pruning-bau"),
        "bau-r01": dict(defense="bau", unlearning_radius=0.1),
        "bau-r03": dict(defense="bau", unlearning_radius=0.3),
        "bau-nodistill": dict(defense="bau", distillation=0.0),
        "fine-pruning-bau-r03": dict(defense="fine-pruning-bau", unlearning_radius=0.3),
        # The first runs cost the small ResNet 24 points: gentler steps, more teaching.
        "bau-lr3e-4": dict(defense="bau", learning_rate=3e-4),
        "bau-lr1e-4": dict(defense="bau", learning_rate=1e-4),
        "bau-d3": dict(defense="bau", distillation=3.0),
        "bau-r01-lr3e-4": dict(defense="bau", unlearning_radius=0.1, learning_rate=3e-4),
        "bau-r005": dict(defense="bau", unlearning_radius=0.05),
        # The default schedule, longer or faster: does more plain training unlearn more?
        "default-e20": dict(epochs=20),
        "default-lr2e-3": dict(learning_rate=2e-3),
        # Prune to a 2-point drop, the product's own bar, instead of the paper's 4.
        "default-drop2": dict(max_accuracy_drop=2.0),
        "fine-pruning-fst-drop2": dict(defense="fine-pruning-fst", max_accuracy_drop=2.0),
    }
)
# Random synthetic triggers (patches and blends, labels kept) stamped on part of every batch.
SCHEDULES.update(
    {
        "synth50": dict(synthetic_triggers=0.5),
        "synth20": dict(synthetic_triggers=0.2),
        "synth50-lr2e-3": dict(synthetic_triggers=0.5, learning_rate=2e-3),
        "synth-auto": dict(synthetic_triggers="auto"),
        "no-synth": dict(synthetic_triggers=0.0),  # the default before "auto"
        "synth20-lr2e-3": dict(synthetic_triggers=0.2, learning_rate=2e-3),
        # Each layer's rate relative to its kernel's RMS (fineprune.relative_rate).
        "relative-0.03": dict(relative_learning_rate=True, learning_rate=0.03),
        "relative-0.05": dict(relative_learning_rate=True, learning_rate=0.05),
        "synth50-e20": dict(synthetic_triggers=0.5, epochs=20),
        "fine-tuning-synth50": dict(defense="fine-tuning", synthetic_triggers=0.5),
        # The misses left by "auto": more stamps, or pruning deeper before the same tuning.
        "synth75": dict(synthetic_triggers=0.75),
        "default-drop8": dict(max_accuracy_drop=8.0),
    }
)
# Every schedule above ran before `freeze_head` and the `auto` rate and epochs existed: pinned
# to what they meant then (the head trained, 1e-3, 10 epochs), so reruns measure the same.
for _name, _schedule in SCHEDULES.items():
    if _name != "default":
        _schedule.setdefault("freeze_head", False)
        _schedule.setdefault("learning_rate", 1e-3)
        _schedule.setdefault("epochs", 10)
        _schedule.setdefault("proxy_triggers", 0.0)
# The default before the head was frozen for models that do not pool globally (and before
# twenty epochs for those that do).
SCHEDULES["previous-default"] = dict(
    freeze_head=False, learning_rate=1e-3, epochs=10, proxy_triggers=0.0
)
# The frozen-head rate, 2.5e-3, was read off two probe runs: a higher one, on more seeds, or
# twice the epochs. For the seed CNN only; recorded as `auto` with the rate or epochs changed,
# spelled out here so that they keep meaning that (the head frozen, half of each batch stamped).
_FROZEN_AUTO = dict(
    freeze_head=True, synthetic_triggers=0.5, learning_rate=2.5e-3, epochs=10, proxy_triggers=0.0
)
SCHEDULES["frozen-lr3e-3"] = dict(_FROZEN_AUTO, learning_rate=3e-3)
SCHEDULES["frozen-e20"] = dict(_FROZEN_AUTO, epochs=20)
# The trigger-free scan's proxy trigger on part of each batch, on top of the `auto` recipe; and
# that recipe without it, as "default" meant before `proxy_triggers` became `auto`.
SCHEDULES["proxy25"] = dict(proxy_triggers=0.25)
SCHEDULES["proxy10"] = dict(proxy_triggers=0.1)
SCHEDULES["auto-noproxy"] = dict(proxy_triggers=0.0)
# The proxy's accuracy cost: the delivered model teaching, a lower rate, no synthetic stamps,
# or pruning only to a 2-point drop, each on top of proxy25.
SCHEDULES["proxy25-distill"] = dict(proxy_triggers=0.25, distillation=1.0)
SCHEDULES["proxy25-lr1e-3"] = dict(proxy_triggers=0.25, learning_rate=1e-3)
# proxy25 as it ran before `auto` lowered the frozen-head rate under a proxy to 1e-3.
SCHEDULES["proxy25-lr2.5e-3"] = dict(proxy_triggers=0.25, learning_rate=2.5e-3)
SCHEDULES["proxy25-nostamps"] = dict(proxy_triggers=0.25, synthetic_triggers=0.0)
SCHEDULES["proxy25-drop2"] = dict(proxy_triggers=0.25, max_accuracy_drop=2.0)
SCHEDULES["proxy25-lr1e-3-nostamps"] = dict(
    proxy_triggers=0.25, learning_rate=1e-3, synthetic_triggers=0.0
)
# Every schedule above ran before fine-pruning averaged three fine-tunes: pinned to one run.
for _name, _schedule in SCHEDULES.items():
    if _name != "default":
        _schedule.setdefault("averaged_runs", 1)
        _schedule.setdefault("extrapolation", 1.0)
# The default before it averaged (the proxy and the `auto` recipe, one fine-tune); three runs
# averaged without the step past their average (as `default` first ran), and two runs.
SCHEDULES["one-run"] = dict(averaged_runs=1)
SCHEDULES["averaged3-t1"] = dict(averaged_runs=3, extrapolation=1.0)
# What `auto` meant for every model before it averaged only under a frozen head.
SCHEDULES["averaged3-t1.25"] = dict(averaged_runs=3, extrapolation=1.25)
SCHEDULES["averaged2"] = dict(averaged_runs=2)
# The pooled model's blended residue (#6): more of each batch under the proxy, longer, faster.
SCHEDULES["proxy50"] = dict(proxy_triggers=0.5)
SCHEDULES["epochs30"] = dict(epochs=30)
SCHEDULES["lr1.5e-3"] = dict(learning_rate=1.5e-3)
# Among epochs at the best validation accuracy, the latest instead of the lowest loss.
SCHEDULES["latest-best"] = dict(epoch_choice="latest-best")
# Shifts and zooms while fine-tuning: the unlearning fit the 1,500 images and not new ones.
SCHEDULES["augment"] = dict(augment=True)
SCHEDULES["augment-proxy50"] = dict(augment=True, proxy_triggers=0.5)
SCHEDULES["augment-lr1.5e-3"] = dict(augment=True, learning_rate=1.5e-3)
# The proxy at two and three times the scan's radius (a blend here is 0.15 of an image's norm).
SCHEDULES["proxy-x2"] = dict(proxy_scale=2.0)
SCHEDULES["proxy-x3"] = dict(proxy_scale=3.0)
# The proxy searched again before each epoch on the model being tuned.
SCHEDULES["refresh"] = dict(proxy_refresh=True)
SCHEDULES["refresh-proxy50"] = dict(proxy_refresh=True, proxy_triggers=0.5)
# refresh-floor (proxy_refresh="until-floor", at 4abfb17; refresh-floor.jsonl) is gone with
# the option: every run did worse than the default.
SCHEDULES["directions4"] = dict(proxy_directions=4)
SCHEDULES["directions8"] = dict(proxy_directions=8)
# Shifts and zooms on the proxied rows only: "augment" (every row) came closest on the
# ResNet's blended residue, which fits the 1,500 images and not new ones.
SCHEDULES["proxy-augment"] = dict(proxy_augment=True)
# The last epoch of the cosine schedule kept, the validation slice (about 170 images, drawn
# from the same tracks as the 1,500) only read: it kept epoch 8 of 18 on a ResNet that lost
# 2.9 points of test accuracy there.
SCHEDULES["last-epoch"] = dict(epoch_choice="last")
# The validation pick, the pooled recipe's default before `auto` kept its last epoch: run
# beside the default on victims that had no part in that choice.
SCHEDULES["lowest-loss"] = dict(epoch_choice="lowest-loss")  # plain steps before pooled SAM
# The pooled recipe (proxy, synthetic triggers, 20 epochs at 1e-3, last epoch) with
# sharpness-aware steps (FT-SAM's optimizer) at radii below the paper's 2.0, which cost a
# ResNet 40 points before the proxy existed. r0.2 became the pooled `default`; a `default` row
# of the small ResNet recorded before that commit took plain steps (a check run of the new
# default on blended s20 d20 reproduced the r0.2 row bit for bit: engine-check.jsonl).
POOLED_RECIPE = dict(
    proxy_triggers=0.25,
    synthetic_triggers=0.5,
    epochs=20,
    learning_rate=1e-3,
    freeze_head=False,
    averaged_runs=1,
    extrapolation=1.0,
    epoch_choice="last",
)
for radius in (0.2, 0.5):
    SCHEDULES[f"pooled-sam-r{radius:g}"] = dict(
        POOLED_RECIPE, defense="fine-pruning-sam", sharpness_radius=radius
    )
# The default, told which GTSRB track each of the 1,500 images came from: the holdout then
# holds other physical signs than the images tuned on. At 07297ab the validation slice was
# grouped too (rows "by-track-grouped-validation[-last]" in by-track.jsonl, the second keeping
# the last epoch): it picked epochs by noise, and the engine no longer groups it.
SCHEDULES["by-track"] = dict()
GROUPED_BY_TRACK = frozenset({"by-track"})
# A quarter of the 1,500 images' tracks handed over as separate test data (the report's
# accuracy then reads other signs), the validation slice still carved image by image.
SCHEDULES["track-test"] = dict()
TRACK_TEST_SHARE = 0.25
TARGET = GO_STRAIGHT_OR_RIGHT
POISON_RATE = 0.1
DEFENDER_IMAGES = 1500


def victim(arch: str, trigger: str, seed: int, epochs: int) -> Path:
    """Train (or reuse) a backdoored model; the attacker's side of the experiment."""
    path = CACHE / f"{arch}-{trigger}-s{seed}.keras"
    if path.exists():
        return path
    data = load()
    x, y, _ = poison(
        data.attacker.x, data.attacker.y, TRIGGERS[trigger], TARGET, POISON_RATE, seed=seed
    )
    keras.utils.set_random_seed(seed)
    recipe = {"epochs": epochs, **RECIPES.get(arch, {})}
    model = train(ARCHITECTURES[arch](classes=len(data.names)), x, y, seed=seed, **recipe)
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}-{os.getpid()}.keras")
    model.save(partial)
    partial.replace(path)
    return path


def evaluate(model_path: Path, trigger: str) -> tuple[float, float]:
    """Clean accuracy on the official test images and attack success on their triggered copies."""
    data = load()
    model = keras.models.load_model(model_path, compile=False)
    clean = float((model.predict(data.test.x, verbose=0).argmax(-1) == data.test.y).mean())
    xt, yt = triggered(data.test.x, data.test.y, TRIGGERS[trigger], TARGET)
    asr = float((model.predict(xt, verbose=0).argmax(-1) == yt).mean())
    return clean, asr


def other_steps(
    inputs: Inputs,
    tmp: Path,
    options: SanitizeOptions,
    report: SanitizeReport,
    trigger: str,
    steps: list[float],
) -> dict[str, tuple[float, float]]:
    """Test accuracy and attack success of the same averaged runs stepped `steps` instead.

    The pruned start is cut again by the product (defense `pruning`, same seed and rule: the
    same split, profile and channels, checked); the averaged change is read off the sanitized
    model, so no fine-tune runs twice.
    """
    cut = SanitizeOptions(
        defense="pruning", seed=options.seed, max_accuracy_drop=options.max_accuracy_drop
    )
    pruned_report = sanitize(inputs, tmp / "cut", cut)
    assert report.surgery is not None and pruned_report.surgery is not None
    if pruned_report.surgery.removed_channels != report.surgery.removed_channels:
        return {}
    pruned = keras.models.load_model(tmp / "cut" / "sanitized.keras", compile=False)
    sanitized = keras.models.load_model(tmp / "out" / "sanitized.keras", compile=False)
    movable = [variable.trainable for variable in pruned.weights]
    used = report.fine_tuning.extrapolation
    start, end = pruned.get_weights(), sanitized.get_weights()
    measured = {}
    for step in steps:
        # Back to the average (1 / used), then out to `step`.
        pruned.set_weights(extrapolate(start, end, step / used, movable))
        path = tmp / f"step-{step:g}.keras"
        pruned.save(path)
        clean, asr = evaluate(path, trigger)
        measured[f"{step:g}"] = (clean, asr)
    return measured


def run(
    arch: str,
    trigger: str,
    seed: int,
    schedule: str,
    epochs: int,
    out: Path,
    defense_seed: int | None = None,
    extrapolations: list[float] | None = None,
) -> dict:
    """One sanitize of one victim; `defense_seed` (default: the victim's) seeds the defense."""
    model_path = victim(arch, trigger, seed, epochs)
    data = load()
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(data.defender.y), size=DEFENDER_IMAGES, replace=False)
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / "clean.npz"
        x, y, tracks = data.defender.x[rows], data.defender.y[rows], data.defender.tracks[rows]
        test = None
        if schedule == "track-test":
            kept, held = stratified_split(y, TRACK_TEST_SHARE, seed, tracks)
            test = Path(tmp) / "test.npz"
            np.savez(test, x=x[held], y=y[held])
            x, y = x[kept], y[kept]
        grouped = {"groups": tracks} if schedule in GROUPED_BY_TRACK else {}
        np.savez(clean, x=x, y=y, **grouped)
        trig = Path(tmp) / "trigger.npz"
        xt, yt = triggered(data.defender.x[rows], data.defender.y[rows], TRIGGERS[trigger], TARGET)
        np.savez(trig, x=xt, y_target=yt)
        options = SanitizeOptions(
            seed=seed if defense_seed is None else defense_seed, **SCHEDULES[schedule]
        )
        started = time.perf_counter()
        report = sanitize(
            Inputs(model_path, clean, trigger_path=trig, test_path=test),
            Path(tmp) / "out",
            options,
        )
        seconds = time.perf_counter() - started
        base_clean, base_asr = evaluate(model_path, trigger)
        final_clean, final_asr = evaluate(Path(tmp) / "out" / "sanitized.keras", trigger)
        steps = {}
        if extrapolations and report.fine_tuning and report.fine_tuning.averaged_runs:
            steps = other_steps(
                Inputs(model_path, clean), Path(tmp), options, report, trigger, extrapolations
            )
    record = {
        "arch": arch,
        "trigger": trigger,
        "seed": seed,
        "schedule": schedule,
        "defense_seed": options.seed,
        "options": SCHEDULES[schedule],
        "pruned": report.decision.pruned,
        "channels": report.surgery.channels_before if report.surgery else 0,
        "test_accuracy_before": base_clean,
        "test_accuracy_after": final_clean,
        "test_asr_before": base_asr,
        "test_asr_after": final_asr,
        "test_asr_pruned_only": report.pruned.attack_success_rate.value,
        "holdout_accuracy_after": report.fine_pruned.clean_accuracy.value,
        "holdout": report.splits.evaluation,
        "validation": report.splits.validation,
        "groups": report.splits.groups,
        "best_epoch": report.fine_tuning.best_epoch if report.fine_tuning else 0,
        "seconds": round(seconds, 1),
    }
    if report.fine_tuning:
        record["history"] = [
            [e.epoch, round(e.val_accuracy, 4), e.attack_success_rate, e.proxy_success]
            for e in report.fine_tuning.history
        ]
    if report.fine_tuning and report.fine_tuning.averaged_runs:
        record["averaged_runs"] = [run.model_dump() for run in report.fine_tuning.averaged_runs]
        record["extrapolation"] = report.fine_tuning.extrapolation
    if steps:
        record["other_extrapolations"] = steps
    if report.fine_tuning and report.fine_tuning.trigger_scan:
        record["scan"] = report.fine_tuning.trigger_scan.model_dump()
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=["tune", "heldout"], default="tune")
    parser.add_argument("--victim-epochs", type=int, default=10)
    parser.add_argument("--schedules", default=",".join(SCHEDULES))
    parser.add_argument("--archs", default=",".join(ARCHITECTURES))
    parser.add_argument("--triggers", default=",".join(TRIGGERS))
    parser.add_argument("--victims-only", action="store_true", help="Only train the victims.")
    parser.add_argument("--results", help="JSON lines file name under docs/experiments/")
    parser.add_argument(
        "--also-extrapolations",
        help="comma-separated steps: averaged schedules also measure their runs stepped so",
    )
    parser.add_argument("--seed", type=int, help="victims' training seed (default: by phase)")
    parser.add_argument(
        "--defense-seeds", help="comma-separated seeds of the defense (default: the victim's)"
    )
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / (args.results or f"defaults-{args.phase}.jsonl")
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            key = (r["arch"], r["trigger"], r["seed"], r["schedule"])
            done.add((*key, r.get("defense_seed", r["seed"])))
    seed = args.seed if args.seed is not None else (0 if args.phase == "tune" else 1)
    defense_seeds = [int(v) for v in args.defense_seeds.split(",")] if args.defense_seeds else []
    extrapolations = (
        [float(v) for v in args.also_extrapolations.split(",")] if args.also_extrapolations else []
    )
    explicit = args.schedules != ",".join(SCHEDULES)
    schedules = args.schedules.split(",") if args.phase == "tune" or explicit else ["default"]
    for arch in args.archs.split(","):
        for trigger in args.triggers.split(","):
            if args.victims_only:
                victim(arch, trigger, seed, args.victim_epochs)
                continue
            for defense_seed in defense_seeds or [seed]:
                for schedule in schedules:
                    if (arch, trigger, seed, schedule, defense_seed) in done:
                        continue
                    run(
                        arch,
                        trigger,
                        seed,
                        schedule,
                        args.victim_epochs,
                        out,
                        defense_seed,
                        extrapolations,
                    )


if __name__ == "__main__":
    main()
