"""The trigger-free scan: it names a backdoor's class, and its proxy is unlearned in fine-tuning."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import keras
import numpy as np
import pytest
from factories import (
    backdoor_inputs,
    recipe_for,
    sanitize_with,
    save_npz,
    sequential_bn_flatten,
    textures,
    train_backdoored,
    tuning_recipe,
)

from fineprune.data.labelled import LabelledData, perturbation_radius
from fineprune.tune.batches import batches
from fineprune.tune.recipe import AUTOMATIC_RATE, FROZEN_HEAD_RATE, PROXY_SHARE
from fineprune.verdict.scan import ANOMALY_THRESHOLD, scan, universal_perturbation


@pytest.fixture(scope="module")
def backdoored() -> keras.Model:
    return train_backdoored(seed=2)


@pytest.fixture(scope="module")
def clean_model() -> keras.Model:
    model = sequential_bn_flatten(seed=2)
    x, y = textures(3000, seed=2)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=12, batch_size=64, verbose=0)
    return model


def test_the_scan_names_the_backdoors_class_and_keeps_its_perturbation(backdoored):
    x, y = textures(600, seed=31)
    found = scan(backdoored, x, y, seed=0)
    assert found.suspect == 0  # the factories' backdoor target
    assert found.anomaly[0] > ANOMALY_THRESHOLD
    assert found.success[0] == max(found.success)
    delta = found.perturbation
    assert delta is not None and delta.shape == x.shape[1:]
    radius = perturbation_radius(x, found.radius)
    assert np.linalg.norm(delta) <= radius * (1 + 1e-4)
    others = x[y != 0]
    sent = backdoored.predict(others + delta, verbose=0).argmax(-1)
    untouched = backdoored.predict(others, verbose=0).argmax(-1)
    assert (sent == 0).mean() > (untouched == 0).mean() + 0.3


def test_success_is_read_on_images_held_apart_from_the_search(backdoored):
    """8 search images, 31 held apart: every success is a count out of 31, not out of 8."""
    x, y = textures(600, seed=36)
    found = scan(backdoored, x, y, seed=1, images=8, check_images=31)
    counts = np.array(found.success) * 31
    np.testing.assert_allclose(counts, np.round(counts), atol=0.01)
    assert any(round(s * 8, 2) % 1 for s in found.success)  # so not read on the 8
    assert found.suspect == 0


def test_a_clean_model_has_no_suspect(clean_model):
    x, y = textures(600, seed=32)
    found = scan(clean_model, x, y, seed=0)
    assert found.suspect is None and found.perturbation is None
    assert max(found.anomaly) <= ANOMALY_THRESHOLD


def test_a_universal_perturbation_stays_in_its_ball_and_reports_what_it_reaches(backdoored):
    x, y = textures(200, seed=33)
    others = x[y != 0]
    delta, reached = universal_perturbation(backdoored, others, 0, radius=0.5)
    assert np.linalg.norm(delta) <= 0.5 * (1 + 1e-4)
    predicted = backdoored.predict(others + delta, verbose=0).argmax(-1)
    assert reached == pytest.approx((predicted == 0).mean())


def test_fine_tuning_shifts_the_asked_share_of_each_batch_by_the_proxy():
    x, y = textures(512, seed=34)
    delta = np.full(x.shape[1:], 0.05, np.float32)
    recipe = tuning_recipe(batch_size=512)
    shuffled = next(iter(batches(LabelledData(x, y), recipe)))[0].numpy()
    proxied = batches(LabelledData(x, y), replace(recipe, proxy_share=0.25), proxy=delta)
    shifted = next(iter(proxied))[0].numpy()
    changed = np.any(shifted != shuffled, axis=(1, 2, 3))
    assert 0.15 < changed.mean() < 0.35  # a quarter, drawn per row
    expected = np.clip(shuffled[changed] + delta, 0.0, 1.0)
    np.testing.assert_allclose(shifted[changed], expected, atol=1e-6)
    # The next epoch shifts other rows of another shuffle.
    again = next(iter(proxied))[0].numpy()
    assert not np.array_equal(again, shifted)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, backdoored) -> dict[str, Path]:
    return backdoor_inputs(tmp_path_factory.mktemp("scan"), backdoored, seed=35)


def test_sanitize_scans_shifts_and_reports_the_scan(files, tmp_path: Path):
    out = tmp_path / "out"
    report = sanitize_with(
        files["keras"], files["clean"], out, trigger=files["trigger"], epochs=2, proxy_triggers=0.25
    )
    tuning = report.fine_tuning
    assert tuning is not None and tuning.trigger_scan is not None
    assert tuning.trigger_scan.suspect == 0 and tuning.trigger_scan.share == 0.25
    assert tuning.learning_rate == AUTOMATIC_RATE  # the proxy unlearns at the usual rate
    assert len(tuning.trigger_scan.success) == 4
    html = (out / "report.html").read_text()
    assert "trigger scan flagged class 0" in html
    untouched = sanitize_with(
        files["keras"], files["clean"], tmp_path / "plain", epochs=1, proxy_triggers=0.0
    )
    assert untouched.fine_tuning is not None and untouched.fine_tuning.trigger_scan is None


def test_auto_shifts_a_quarter_for_fine_pruning_only(backdoored):
    head = ["flatten", "dense"]
    assert recipe_for(backdoored, head).proxy_share == PROXY_SHARE
    for defense in ("fine-tuning", "fine-pruning-sam", "fine-pruning-fst", "fine-pruning-bau"):
        assert recipe_for(backdoored, head, defense).proxy_share == 0.0, defense
    assert recipe_for(backdoored, [], "fine-tuning", proxy_triggers=0.1).proxy_share == 0.1
    assert recipe_for(backdoored, head, proxy_found=False).proxy_share == 0.0


def test_the_scan_refuses_what_it_cannot_score(backdoored):
    x, y = textures(100, seed=38)
    with pytest.raises(ValueError, match="two classes"):
        scan(backdoored, x, np.zeros_like(y))


def test_a_clean_model_is_fine_pruned_without_a_proxy_and_told_so(clean_model, tmp_path: Path):
    clean_model.save(tmp_path / "clean.keras")
    x, y = textures(600, seed=39)
    data = save_npz(tmp_path / "clean.npz", x=x, y=y)
    report = sanitize_with(tmp_path / "clean.keras", data, tmp_path / "out", epochs=1)
    found = report.fine_tuning.trigger_scan
    assert found is not None and found.suspect is None and found.share == 0.0
    assert report.fine_tuning.learning_rate == FROZEN_HEAD_RATE  # the recipe without a proxy
    assert any("found no class that stands out" in w for w in report.warnings)
    assert "found no class that stands out" in (tmp_path / "out" / "report.html").read_text()


def test_a_scan_that_cannot_run_is_skipped_with_a_warning(tmp_path: Path):
    keras.utils.set_random_seed(3)
    inputs = keras.Input((16, 16, 3))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    h = keras.layers.GlobalAveragePooling2D()(h)
    binary = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(h))
    binary.save(tmp_path / "binary.keras")
    x, y = textures(300, seed=40)
    data = save_npz(tmp_path / "clean.npz", x=x, y=(y == 0).astype(np.int64))
    report = sanitize_with(
        tmp_path / "binary.keras", data, tmp_path / "out", epochs=1, proxy_triggers=0.25
    )
    assert report.fine_tuning is not None and report.fine_tuning.trigger_scan is None
    assert any("trigger scan skipped" in w and "two or more" in w for w in report.warnings)
