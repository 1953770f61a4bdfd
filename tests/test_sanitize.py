"""The whole defense on a tiny backdoored model, through the engine and through the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from factories import (
    frames,
    recipe_for,
    residual_block,
    sanitize_with,
    save_npz,
    textures,
    train_backdoored,
    trigger_set,
)

from fineprune.data.splits import load_splits
from fineprune.errors import InvalidDataError
from fineprune.load.model import model_signature
from fineprune.pipeline import sanitize
from fineprune.tune.methods.sharpness import SharpnessAware
from fineprune.tune.recipe import (
    AUTOMATIC_RATE,
    AUTOMATIC_SHARE,
    FROZEN_HEAD_RATE,
    POOLED_SHARPNESS,
    SAM_RADIUS,
)
from schemas.options import SanitizeOptions
from schemas.report import SanitizeReport

FINEPRUNE = [sys.executable, "-m", "fineprune"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("backdoored")
    model = train_backdoored(seed=0)
    model.save(root / "model.keras")
    model.save(root / "model.h5")
    x, y = textures(600, seed=100)
    xt, yt = trigger_set(300, seed=200)
    xi, yi = textures(800, seed=300)  # a second, independent clean source
    return {
        "keras": root / "model.keras",
        "h5": root / "model.h5",
        "clean": save_npz(root / "clean.npz", x=x, y=y),
        "trigger": save_npz(root / "trigger.npz", x=xt, y_target=yt),
        "independent": save_npz(root / "independent.npz", x=xi, y=yi),
        "bad_shape": save_npz(root / "bad.npz", x=x[:, :8], y=y),
    }


def _accuracy(model: keras.Model, path: Path, key: str = "y") -> float:
    with np.load(path) as data:
        return float((model.predict(data["x"], verbose=0).argmax(-1) == data[key]).mean())


def test_fine_pruning_removes_the_backdoor_and_keeps_accuracy(files, tmp_path: Path):
    out = tmp_path / "out"
    stages: list[tuple[str, float]] = []
    report = sanitize(
        files["keras"],
        files["clean"],
        out,
        trigger_data=files["trigger"],
        progress=lambda stage, fraction: stages.append((stage, fraction)),
    )
    assert report.baseline.attack_success_rate.value >= 0.9
    assert report.fine_pruned.attack_success_rate.value <= 0.2
    assert report.baseline.clean_accuracy.split == "holdout"
    assert report.fine_pruned.clean_accuracy.value >= report.baseline.clean_accuracy.value - 0.04

    # Judged again on clean data from another source that no stage ever saw.
    original = keras.models.load_model(files["keras"], compile=False)
    sanitized = keras.models.load_model(out / "sanitized.keras", compile=False)
    before = _accuracy(original, files["independent"])
    assert _accuracy(sanitized, files["independent"]) >= before - 0.04
    assert _accuracy(sanitized, files["trigger"], "y_target") <= 0.2

    surgery = report.surgery
    assert surgery is not None and surgery.mode == "removed"
    assert len(report.curve) == surgery.channels_before + 1
    assert len(surgery.removed_channels) == report.decision.pruned > 0
    assert surgery.channels_after == surgery.channels_before - report.decision.pruned
    assert report.output_model.parameters < report.input_model.parameters
    threshold = report.curve[0].tune_accuracy - 0.04
    assert report.curve[report.decision.pruned].tune_accuracy >= threshold - 1e-9
    assert all(p.tune_accuracy < threshold for p in report.curve[report.decision.pruned + 1 : -1])
    assert report.splits.tune + report.splits.evaluation == 600
    assert report.fine_tuning is not None and report.fine_tuning.epochs_run >= 1
    # Three fine-tunes averaged, each listed with what it kept and its attack success there.
    runs = report.fine_tuning.averaged_runs
    assert [run.seed for run in runs] == [0, 1000, 2000]
    assert runs[0].best_epoch == report.fine_tuning.best_epoch
    assert all(1 <= run.best_epoch <= run.epochs_run for run in runs)
    assert all(run.attack_success_rate is not None for run in runs)
    assert report.fine_tuning.averaged_validation_accuracy is not None
    assert report.fine_tuning.extrapolation == 1.25
    assert set(report.timings) == {"load", "profile", "cut", "fine-tune", "report"}
    finished = list(dict.fromkeys(s for s, f in stages if f == 1.0))
    assert finished == ["load", "profile", "cut", "fine-tune", "report"]

    for name in ("sanitized.keras", "report.json", "report.png", "report.html"):
        assert (out / name).stat().st_size > 0
    again = SanitizeReport.model_validate_json((out / "report.json").read_text())
    assert again.output_model.sha256 == report.output_model.sha256
    assert "Attack success" in (out / "report.html").read_text()


def test_pruning_alone_and_fine_tuning_alone(files, tmp_path: Path):
    pruned = sanitize(
        files["keras"],
        files["clean"],
        tmp_path / "p",
        SanitizeOptions(defense="pruning", prune_fraction=0.5),
        trigger_data=files["trigger"],
    )
    assert pruned.fine_tuning is None and pruned.decision.rule == "prune_fraction"
    assert pruned.decision.pruned == pruned.surgery.channels_before // 2
    assert pruned.fine_pruned == pruned.pruned

    tuned = sanitize(
        files["keras"],
        files["clean"],
        tmp_path / "t",
        SanitizeOptions(defense="fine-tuning", epochs=2),
        test_data=files["independent"],
    )
    assert tuned.surgery is None and tuned.curve == []
    assert tuned.output_model.parameters == tuned.input_model.parameters
    assert tuned.splits.evaluation_split == "test" and tuned.splits.evaluation == 800
    assert tuned.fine_pruned.clean_accuracy.split == "test"


def test_named_groups_stay_whole_across_the_holdout_split(files, tmp_path: Path):
    # Six frames of each of 100 images, as GTSRB's tracks are frames of one sign.
    base, labels = textures(100, seed=100)
    x, y, groups = frames(base, 6, seed=101), np.repeat(labels, 6), np.repeat(np.arange(100), 6)
    clean = save_npz(tmp_path / "grouped.npz", x=x, y=y, groups=groups)
    options = SanitizeOptions(defense="pruning")
    signature = model_signature(keras.models.load_model(files["keras"], compile=False))
    splits = load_splits(clean, None, None, signature, options, 0.15, [])
    tune, held = set(splits.tune.groups), set(splits.evaluation.groups)
    assert tune and held and not tune & held
    # The validation slice only ranks epochs, and is carved image by image: groups straddle it.
    assert set(splits.train.groups) & set(splits.validation.groups)
    report = sanitize(files["keras"], clean, tmp_path / "out", options)
    assert report.splits.groups == len(tune)
    assert "each group stayed whole" in (tmp_path / "out" / "report.html").read_text()
    assert report.splits.near_copies == 0.0
    assert not any("near-copy" in w for w in report.warnings)

    # The same frames split image by image: the holdout echoes what was tuned on, and says so.
    ungrouped = save_npz(tmp_path / "frames.npz", x=x, y=y)
    echoed = sanitize(files["keras"], ungrouped, tmp_path / "echoed", options)
    assert echoed.splits.near_copies is not None and echoed.splits.near_copies > 0.9
    assert any("near-copy in the data tuned on" in w for w in echoed.warnings)
    assert "have a near-copy in tune" in (tmp_path / "echoed" / "report.html").read_text()

    one_per_class = save_npz(tmp_path / "coarse.npz", x=x, y=y, groups=y)
    with pytest.raises(InvalidDataError, match="nothing to hold out: no class has two groups"):
        load_splits(one_per_class, None, None, signature, options, 0.15, [])


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [*FINEPRUNE, *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


def test_cli_sanitizes_a_legacy_h5_model_and_writes_the_report(files, tmp_path: Path):
    out = tmp_path / "cli"
    done = _cli(
        "sanitize",
        files["h5"],
        "--data",
        files["clean"],
        "--out",
        out,
        "--trigger-data",
        files["trigger"],
        "--epochs",
        "3",
        "--learning-rate",
        "2e-3",
    )
    assert done.returncode == 0, done.stderr
    report = SanitizeReport.model_validate_json((out / "report.json").read_text())
    assert done.stdout.strip().splitlines()[-1].startswith("Verdict: ")
    assert report.input_model.format == "h5"
    assert report.options.epochs == 3 and report.research == {}
    assert report.fine_tuning is not None and report.fine_tuning.learning_rate == 2e-3
    reloaded = keras.models.load_model(out / "sanitized.keras")
    assert reloaded.count_params() == report.output_model.parameters


def test_cli_reads_a_keras_file_by_its_bytes_not_its_name(files, tmp_path: Path):
    disguised = tmp_path / "model.bin"
    disguised.write_bytes(files["keras"].read_bytes())
    done = _cli(
        "sanitize",
        disguised,
        "--data",
        files["clean"],
        "--out",
        tmp_path / "o",
        "--defense",
        "pruning",
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["input_model"]["format"] == "keras"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--data", "{bad_shape}"], 1, "expects samples of shape (16, 16, 3)"),
        (["--data", "{clean}", "--layer", "nope"], 1, "no layer named 'nope'"),
        (["--data", "/nonexistent.npz"], 2, "does not exist"),
        (["--data", "{clean}", "--max-accuracy-drop", "-1"], 2, "max_accuracy_drop"),
        (["--data", "{clean}", "--rescale", "1/0"], 2, "1/0"),
        (["--data", "{clean}", "--learning-rate", "fast"], 2, "fast"),
        (["--data", "{clean}", "--learning-rate", "0"], 2, "learning_rate"),
        (["--data", "{clean}", "--epochs", "many"], 2, "many"),
        (["--data", "{clean}", "--defense", "fst"], 2, "fst"),
        (["--data", "{clean}", "--batch-size", "0"], 2, "batch_size"),
        (["--data", "{clean}", "--synthetic-triggers", "0.5"], 2, "--synthetic-triggers"),
    ],
)
def test_cli_fails_with_one_clear_line(files, tmp_path: Path, args, code: int, message: str):
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    done = _cli("sanitize", files["keras"], *args, "--out", tmp_path / "x")
    assert done.returncode == code
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert message in " ".join(lines[-3:])
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("command", ["sanitize", "submit"])
def test_every_option_is_a_flag_once_in_basic_or_advanced(command: str):
    """The flags come from SanitizeOptions: each field once, in one of the two panels."""
    done = subprocess.run(
        [*FINEPRUNE, command, "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    flags = re.findall(r"^[│|]\s+(?:\*\s+)?(--[a-z-]+)", done.stdout, flags=re.MULTILINE)
    for name in SanitizeOptions.model_fields:
        assert flags.count("--" + name.replace("_", "-")) == 1, name
    assert "Options" in done.stdout and "Advanced options" in done.stdout
    assert len(flags) == len(set(flags))


def test_sharpness_aware_step_takes_the_gradient_at_the_perturbed_weights():
    """One ASAM step by hand: w - lr * grad(w + rho * T^2 g / ||T g||), T = |w|."""
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    y = np.random.default_rng(1).normal(size=(8, 2)).astype(np.float32)
    start = [w.copy() for w in inner.get_weights()]

    def grads(weights: list[np.ndarray]) -> list[np.ndarray]:
        probe = keras.models.clone_model(inner)
        probe.set_weights(weights)
        with tf.GradientTape() as tape:
            loss = keras.losses.MeanSquaredError()(y, probe(x))
        return [g.numpy() for g in tape.gradient(loss, probe.trainable_variables)]

    g = grads(start)
    norm = np.sqrt(sum(((gi * np.abs(w)) ** 2).sum() for gi, w in zip(g, start, strict=True)))
    ascent = [w + 0.5 * np.abs(w) ** 2 * gi / norm for gi, w in zip(g, start, strict=True)]
    expected = [w - 0.1 * gi for w, gi in zip(start, grads(ascent), strict=True)]

    trainer = SharpnessAware(inner, radius=0.5)
    trainer.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    trainer.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for got, want in zip(inner.get_weights(), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("defense", ["ft-sam", "fine-pruning-sam"])
def test_sharpness_aware_defenses_run_through_the_pipeline(files, tmp_path: Path, defense: str):
    report = sanitize_with(
        files["keras"],
        files["clean"],
        tmp_path / "out",
        defense,
        trigger=files["trigger"],
        epochs=3,
    )
    assert (report.surgery is not None) == (defense == "fine-pruning-sam")
    assert report.research == {"method": "sharpness-aware"}
    assert report.fine_tuning is not None and report.fine_tuning.epochs_run == 3
    assert report.fine_tuning.method == "sharpness-aware"
    assert report.fine_tuning.sharpness_radius == SAM_RADIUS
    assert report.fine_pruned.clean_accuracy.value >= report.baseline.clean_accuracy.value - 0.04
    sanitized = keras.models.load_model(tmp_path / "out" / "sanitized.keras", compile=False)
    before = _accuracy(keras.models.load_model(files["keras"], compile=False), files["independent"])
    assert _accuracy(sanitized, files["independent"]) >= before - 0.04
    assert [layer.name for layer in sanitized.layers] == [
        layer.name for layer in keras.models.load_model(files["keras"], compile=False).layers
    ]


def test_synthetic_triggers_change_what_fine_tuning_learns(files, tmp_path: Path):
    weights = {}
    for share in (0.0, 0.5):
        report = sanitize_with(
            files["keras"],
            files["clean"],
            tmp_path / str(share),
            synthetic_triggers=share,
            epochs=2,
            patience=5,
        )
        assert report.research["synthetic_triggers"] == share
        assert report.fine_tuning is not None and report.fine_tuning.epochs_run == 2
        assert report.fine_tuning.synthetic_triggers == share
        sanitized = tmp_path / str(share) / "sanitized.keras"
        weights[share] = keras.models.load_model(sanitized, compile=False).get_weights()
    assert len(weights[0.0]) == len(weights[0.5])  # the same pruning: only the stamps differ
    assert any(
        a.shape == b.shape and not np.array_equal(a, b)
        for a, b in zip(weights[0.0], weights[0.5], strict=True)
    )


def test_auto_recipe_follows_the_architecture(files, tmp_path: Path):
    pooled = tmp_path / "pooled.keras"
    residual_block().save(pooled)
    expected = {
        pooled: (AUTOMATIC_SHARE, AUTOMATIC_RATE, False, "last", POOLED_SHARPNESS),
        files["keras"]: (AUTOMATIC_SHARE, FROZEN_HEAD_RATE, True, "validation", 0.0),
    }
    for path, (share, rate, frozen, selected_on, radius) in expected.items():
        # No proxy: a found one lowers the frozen-head rate (tests/test_trigger_scan.py).
        report = sanitize_with(
            path, files["clean"], tmp_path / path.stem, epochs=1, proxy_triggers=0.0
        )
        assert report.research == {"proxy_triggers": 0.0}
        assert report.fine_tuning is not None
        assert report.fine_tuning.synthetic_triggers == share
        assert report.fine_tuning.learning_rate == rate
        assert bool(report.fine_tuning.frozen_layers) == frozen
        assert report.fine_tuning.selected_on == selected_on
        assert report.fine_tuning.sharpness_radius == radius
        assert report.fine_tuning.method == ("sharpness-aware" if radius else "plain")


def test_a_frozen_head_leaves_fine_pruning_as_delivered_after_the_cut(files, tmp_path: Path):
    """The head's weights are the pruned model's, bit for bit; the convolutions moved."""
    runs = {}
    for defense in ("pruning", "fine-pruning"):
        report = sanitize_with(
            files["keras"], files["clean"], tmp_path / defense, defense, epochs=2, patience=5
        )
        model = keras.models.load_model(tmp_path / defense / "sanitized.keras", compile=False)
        runs[defense] = (report, {layer.name: layer.get_weights() for layer in model.layers})
    tuned_report, tuned = runs["fine-pruning"]
    _, pruned = runs["pruning"]
    assert tuned_report.fine_tuning is not None
    head = tuned_report.fine_tuning.frozen_layers
    assert head and tuned_report.surgery is not None
    assert tuned_report.surgery.layer not in head
    for name in head:
        for after, before in zip(tuned[name], pruned[name], strict=True):
            np.testing.assert_array_equal(after, before)
    moved = [
        name
        for name in tuned
        if name not in head
        and any(not np.array_equal(a, b) for a, b in zip(tuned[name], pruned[name], strict=True))
    ]
    assert tuned_report.surgery.layer in moved


def test_sharpness_radius_is_read_only_where_it_means_something():
    layers = keras.layers
    dense_head = keras.Sequential(
        [keras.Input((16, 16, 3)), layers.Conv2D(4, 3), layers.Flatten(), layers.Dense(4)]
    )
    for defense, asked, radius in [
        ("fine-pruning", "auto", 0.0),  # a dense head over every position: plain steps
        ("fine-pruning", 0.5, 0.5),
        ("ft-sam", "auto", SAM_RADIUS),
        ("fine-pruning-sam", 0.3, 0.3),
        ("fine-tuning", "auto", 0.0),
        ("fine-tuning", 0.5, 0.0),  # read only where it means something
    ]:
        recipe = recipe_for(dense_head, [], defense, sharpness_radius=asked)
        assert recipe.sharpness_radius == radius
    with pytest.raises(ValueError, match="needs a sharpness_radius above 0"):
        recipe_for(dense_head, [], "ft-sam", sharpness_radius=0.0)
    with pytest.raises(ValueError, match="prune_fraction"):
        SanitizeOptions(defense="fine-tuning", prune_fraction=0.3)


@pytest.mark.parametrize(
    "bad",
    [
        {"seed": 2**32},
        {"rescale": float("inf")},
        {"learning_rate": float("nan")},
        {"proxy_refresh": True},
    ],
)
def test_options_refuse_what_the_engine_cannot_use(bad: dict):
    with pytest.raises(ValueError):
        SanitizeOptions(**bad)
