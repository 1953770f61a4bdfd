"""The trigger-free scan: it names a backdoor's class, and its proxy is unlearned in fine-tuning."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from factories import (
    backdoor_inputs,
    save_npz,
    sequential_bn_flatten,
    textures,
    train_backdoored,
    tuning_settings,
)
from pydantic import ValidationError

from fineprune.data import LabelledData
from fineprune.finetune import _dataset
from fineprune.pipeline import Inputs, sanitize
from fineprune.recipe import AUTOMATIC_RATE, FROZEN_HEAD_RATE, PROXY_SHARE, resolve_recipe
from fineprune.trigger_scan import (
    ANOMALY_THRESHOLD,
    ProxyRefresher,
    orthogonal_proxies,
    scan,
    universal_perturbation,
)
from fineprune.unlearning import perturbation_radius
from schemas.options import SanitizeOptions


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
    """7 search images, 30 held apart: every success is a count out of 30, not out of 7."""
    x, y = textures(600, seed=36)
    found = scan(backdoored, x, y, seed=1, images=7, check_images=30)
    counts = np.array(found.success) * 30
    np.testing.assert_allclose(counts, np.round(counts), atol=0.01)
    assert any(round(s * 7, 2) % 1 for s in found.success)  # so not read on the 7
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
    settings = tuning_settings(batch_size=512)
    plain = _dataset(LabelledData(x, y), settings, image_like=True)
    shuffled, reshuffled = (next(iter(plain))[0].numpy() for _ in range(2))
    proxy = tf.Variable(delta[None])
    dataset = _dataset(
        LabelledData(x, y),
        replace(settings, proxy_trigger=delta, proxy_share=0.25),
        image_like=True,
        proxy=proxy,
    )
    shifted = next(iter(dataset))[0].numpy()
    changed = np.any(shifted != shuffled, axis=(1, 2, 3))
    assert 0.15 < changed.mean() < 0.35  # a quarter, drawn per row
    expected = np.clip(shuffled[changed] + delta, 0.0, 1.0)
    np.testing.assert_allclose(shifted[changed], expected, atol=1e-6)
    # A refreshed proxy reaches the next pass over the same dataset (the next epoch).
    proxy.assign(-proxy)
    again = next(iter(dataset))[0].numpy()
    np.testing.assert_array_equal(np.any(again != reshuffled, axis=(1, 2, 3)), changed)
    np.testing.assert_allclose(again[changed], np.clip(reshuffled[changed] - delta, 0.0, 1.0))


def test_proxy_augment_varies_the_proxied_rows_only_and_keeps_the_proxy_in_place():
    x, y = textures(512, seed=34)
    x = 0.2 + 0.6 * x  # nothing clips: what is left after the proxy is the varied image
    delta = np.where(np.arange(x.shape[2]) % 2 == 0, 0.05, -0.05).astype(np.float32)
    delta = np.broadcast_to(delta[None, :, None], x.shape[1:]).copy()
    settings = tuning_settings(batch_size=512)
    shuffled = next(iter(_dataset(LabelledData(x, y), settings, image_like=True)))[0].numpy()
    varied = replace(settings, proxy_trigger=delta, proxy_share=0.25, proxy_augment=True)
    proxy = tf.Variable(delta[None])
    shifted = next(iter(_dataset(LabelledData(x, y), varied, image_like=True, proxy=proxy)))
    shifted = shifted[0].numpy()
    changed = np.any(shifted != shuffled, axis=(1, 2, 3))
    assert 0.15 < changed.mean() < 0.35  # the other rows are untouched
    underneath = shifted[changed] - delta
    # Shifts and zooms move the image: most proxied rows are not the image plus the proxy...
    moved = np.abs(underneath - shuffled[changed]).max(axis=(1, 2, 3)) > 1e-3
    assert moved.mean() > 0.8
    # ...but the proxy is on them whole and unmoved: take it off and an image of the same
    # range is left (interpolation stays within it), where the proxy moved along would not.
    assert underneath.min() >= 0.2 - 1e-5 and underneath.max() <= 0.8 + 1e-5
    with pytest.raises(ValidationError, match="proxy_augment needs a proxy"):
        SanitizeOptions(proxy_augment=True, proxy_triggers=0.0)
    assert SanitizeOptions(proxy_augment=True).proxy_augment  # fine-pruning's auto scans


def test_each_of_several_proxies_shifts_some_rows():
    x, y = textures(512, seed=34)
    deltas = np.stack([np.full(x.shape[1:], v, np.float32) for v in (0.05, -0.05, 0.1)])
    settings = tuning_settings(batch_size=512)
    plain = _dataset(LabelledData(x, y), settings, image_like=True)
    shuffled = next(iter(plain))[0].numpy()
    dataset = _dataset(
        LabelledData(x, y),
        replace(settings, proxy_trigger=deltas[0], proxy_share=0.5),
        image_like=True,
        proxy=tf.Variable(deltas),
    )
    shifted = next(iter(dataset))[0].numpy()
    changed = np.flatnonzero(np.any(shifted != shuffled, axis=(1, 2, 3)))
    used = []
    for row in changed:  # each shifted row carries exactly one of the three, whole
        fits = [
            np.allclose(shifted[row], np.clip(shuffled[row] + d, 0.0, 1.0), atol=1e-6)
            for d in deltas
        ]
        assert sum(fits) == 1
        used.append(fits.index(True))
    counts = np.bincount(used, minlength=3)
    assert counts.min() > 0.2 * len(changed)  # drawn about evenly


def test_orthogonal_proxies_are_orthogonal_and_reach_the_backdoor(backdoored):
    x, y = textures(600, seed=38)
    found = scan(backdoored, x, y, seed=0)
    assert found.perturbation is not None and found.suspect == 0
    proxy = found.perturbation
    more = orthogonal_proxies(backdoored, x, y, 0, proxy, count=2, seed=0, from_logits=False)
    assert len(more) == 2
    directions = [proxy, *(p for p, _ in more)]
    flat = np.stack([d.ravel() / np.linalg.norm(d) for d in directions])
    np.testing.assert_allclose(flat @ flat.T, np.eye(3), atol=1e-3)
    radius = float(np.linalg.norm(proxy))
    others = x[y != 0]
    untouched = (backdoored.predict(others, verbose=0).argmax(-1) == 0).mean()
    for delta, success in more:
        assert np.linalg.norm(delta) <= radius * (1 + 1e-4)
        assert 0.0 <= success <= 1.0
    sent = backdoored.predict(others + more[0][0], verbose=0).argmax(-1)
    assert (sent == 0).mean() > untouched + 0.1  # a second route to the backdoor's class


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, backdoored) -> dict[str, Path]:
    return backdoor_inputs(tmp_path_factory.mktemp("scan"), backdoored, seed=35)


def test_sanitize_scans_shifts_and_reports_the_scan(files, tmp_path: Path):
    out = tmp_path / "out"
    report = sanitize(
        Inputs(files["keras"], files["clean"], trigger_path=files["trigger"]),
        out,
        SanitizeOptions(epochs=2, proxy_triggers=0.25),
    )
    tuning = report.fine_tuning
    assert tuning is not None and tuning.trigger_scan is not None
    assert tuning.trigger_scan.suspect == 0 and tuning.trigger_scan.share == 0.25
    assert tuning.learning_rate == AUTOMATIC_RATE  # the proxy unlearns at the usual rate
    assert len(tuning.trigger_scan.success) == 4
    html = (out / "report.html").read_text()
    assert "trigger scan flagged class 0" in html
    untouched = sanitize(
        Inputs(files["keras"], files["clean"]),
        tmp_path / "plain",
        SanitizeOptions(epochs=1, proxy_triggers=0.0),
    )
    assert untouched.fine_tuning is not None and untouched.fine_tuning.trigger_scan is None


def test_proxy_scale_strengthens_the_proxy_that_fine_tuning_adds(files, tmp_path: Path):
    def tune(scale: float, name: str):
        options = SanitizeOptions(
            epochs=1, proxy_triggers=0.5, proxy_scale=scale, averaged_runs=1, seed=4
        )
        report = sanitize(Inputs(files["keras"], files["clean"]), tmp_path / name, options)
        assert report.fine_tuning is not None and report.fine_tuning.trigger_scan is not None
        return report.fine_tuning

    once, again, tripled = tune(1.0, "a"), tune(1.0, "b"), tune(3.0, "c")
    # The same scan finds the same proxy; only its strength in training changes.
    unscaled = once.trigger_scan.model_dump(exclude={"seconds"})
    assert tripled.trigger_scan.model_dump(exclude={"seconds"}) == unscaled
    assert again.history[0].loss == once.history[0].loss  # a rerun is exact...
    assert tripled.history[0].loss != once.history[0].loss  # ...so this is the scale
    with pytest.raises(ValidationError):
        SanitizeOptions(proxy_scale=0.0)


def test_sanitize_unlearns_several_directions_and_reports_each(files, tmp_path: Path):
    options = SanitizeOptions(epochs=1, proxy_triggers=0.5, proxy_directions=3, averaged_runs=1)
    report = sanitize(Inputs(files["keras"], files["clean"]), tmp_path / "out", options)
    assert report.fine_tuning is not None and report.fine_tuning.trigger_scan is not None
    alternates = report.fine_tuning.trigger_scan.alternates
    assert len(alternates) == 2 and all(0.0 <= s <= 1.0 for s in alternates)
    with pytest.raises(ValidationError, match="proxy_directions needs a proxy"):
        SanitizeOptions(proxy_directions=2, proxy_triggers=0.0)
    with pytest.raises(ValidationError, match="refreshes one proxy"):
        SanitizeOptions(proxy_directions=2, proxy_refresh=True)
    with pytest.raises(ValidationError):
        SanitizeOptions(proxy_directions=0)


def test_a_refresh_continues_the_proxy_within_its_radius(backdoored):
    x, y = textures(600, seed=36)
    found = scan(backdoored, x, y, seed=0)
    assert found.perturbation is not None
    proxy = tf.Variable(found.perturbation[None])
    refresher = ProxyRefresher(backdoored, x, y, 0, proxy, seed=0, from_logits=False)
    radius = float(np.linalg.norm(found.perturbation))
    successes = [refresher(), refresher()]
    delta = proxy.numpy()[0]  # the refresh writes where fine-tuning reads
    np.testing.assert_array_equal(refresher.perturbation, delta)
    assert np.linalg.norm(delta) <= radius * (1 + 1e-4)
    assert not np.array_equal(delta, found.perturbation)
    # On the model the backdoor is whole in, the continued proxy still reaches it.
    others = x[y != 0]
    sent = backdoored.predict(others + delta, verbose=0).argmax(-1)
    untouched = backdoored.predict(others, verbose=0).argmax(-1)
    assert (sent == 0).mean() > (untouched == 0).mean() + 0.3
    assert all(0.5 < s <= 1.0 for s in successes)
    with pytest.raises(ValueError, match="one proxy"):
        ProxyRefresher(backdoored, x, y, 0, tf.Variable(np.stack([delta, -delta])), 0, False)


def test_proxy_refresh_searches_again_before_every_epoch_but_the_first(files, tmp_path: Path):
    def tune(refresh: bool, name: str):
        options = SanitizeOptions(
            epochs=3, patience=3, proxy_triggers=0.5, proxy_refresh=refresh, averaged_runs=1
        )
        report = sanitize(Inputs(files["keras"], files["clean"]), tmp_path / name, options)
        assert report.fine_tuning is not None and report.fine_tuning.trigger_scan is not None
        return report.fine_tuning

    fixed, refreshed = tune(False, "fixed").history, tune(True, "refreshed").history
    assert [e.proxy_success is None for e in refreshed] == [True, False, False]
    assert all(e.proxy_success is None for e in fixed)
    assert all(0.0 <= e.proxy_success <= 1.0 for e in refreshed[1:])
    assert refreshed[0].loss == fixed[0].loss  # the scan's own proxy trains the first epoch
    assert refreshed[1].loss != fixed[1].loss  # then the refreshed one


def test_the_proxy_needs_a_defense_that_fine_tunes():
    with pytest.raises(ValidationError, match="proxy_triggers needs a defense that fine-tunes"):
        SanitizeOptions(defense="pruning", proxy_triggers=0.25)
    with pytest.raises(ValidationError):
        SanitizeOptions(proxy_triggers=1.5)
    assert SanitizeOptions(defense="fine-tuning", proxy_triggers=0.1).proxy_triggers == 0.1
    assert SanitizeOptions(defense="pruning").proxy_triggers == "auto"  # auto: nothing to tune
    with pytest.raises(ValidationError, match="proxy_refresh needs a proxy"):
        SanitizeOptions(proxy_refresh=True, proxy_triggers=0.0)
    with pytest.raises(ValidationError, match="proxy_refresh needs a proxy"):
        SanitizeOptions(defense="fine-tuning", proxy_refresh=True)  # its auto does not scan
    assert SanitizeOptions(proxy_refresh=True).proxy_refresh
    assert SanitizeOptions(defense="ft-sam", proxy_triggers=0.25, proxy_refresh=True).proxy_refresh


def test_auto_shifts_a_quarter_for_fine_pruning_only(backdoored):
    head = ["flatten", "dense"]
    assert resolve_recipe(SanitizeOptions(), backdoored, head).proxy_triggers == PROXY_SHARE
    for defense in ("fine-tuning", "fine-pruning-sam", "fine-pruning-fst", "fine-pruning-bau"):
        recipe = resolve_recipe(SanitizeOptions(defense=defense), backdoored, head)
        assert recipe.proxy_triggers == 0.0, defense
    chosen = resolve_recipe(
        SanitizeOptions(defense="fine-tuning", proxy_triggers=0.1), backdoored, []
    )
    assert chosen.proxy_triggers == 0.1


def test_the_scan_refuses_what_it_cannot_score(backdoored):
    x, y = textures(100, seed=38)
    with pytest.raises(ValueError, match="two classes"):
        scan(backdoored, x, np.zeros_like(y))


def test_a_clean_model_is_fine_pruned_without_a_proxy_and_told_so(clean_model, tmp_path: Path):
    clean_model.save(tmp_path / "clean.keras")
    x, y = textures(600, seed=39)
    data = save_npz(tmp_path / "clean.npz", x=x, y=y)
    report = sanitize(
        Inputs(tmp_path / "clean.keras", data), tmp_path / "out", SanitizeOptions(epochs=1)
    )
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
    options = SanitizeOptions(epochs=1, proxy_triggers=0.25)
    report = sanitize(Inputs(tmp_path / "binary.keras", data), tmp_path / "out", options)
    assert report.fine_tuning is not None and report.fine_tuning.trigger_scan is None
    assert any("trigger scan skipped" in w and "two or more" in w for w in report.warnings)
