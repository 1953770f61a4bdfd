"""Counting near-copies: frames of one object are found, independent samples are not."""

from __future__ import annotations

import numpy as np
from factories import frames, textures

from fineprune.data.near_copies import WARNING_SHARE, near_copies, near_copy_warning


def test_frames_of_the_tuned_images_are_counted():
    base, _ = textures(60, seed=1)
    found = near_copies(frames(base, 1, seed=2), base)
    assert found is not None and found.share == 1.0 and found.checked == 60


def test_independent_images_of_the_same_classes_are_not():
    tuned, _ = textures(400, seed=1)
    new, _ = textures(100, seed=2)
    found = near_copies(new, tuned)
    assert found is not None and found.share == 0.0
    assert near_copy_warning(found, "holdout", grouped=False) is None


def test_a_partial_echo_is_measured_as_its_share():
    tuned, _ = textures(200, seed=1)
    new, _ = textures(75, seed=2)
    echo = frames(tuned[:25], 1, seed=3)
    found = near_copies(np.concatenate([new, echo]), tuned)
    assert found is not None and found.share == 0.25


def test_large_images_are_compared_shrunk_and_the_checked_share_is_capped():
    base, _ = textures(40, seed=1)
    large = np.repeat(np.repeat(base, 10, axis=1), 10, axis=2)  # 160 x 160
    found = near_copies(frames(large, 20, seed=4), large, max_checked=128)
    assert found is not None and found.checked == 128 and found.share == 1.0


def test_long_feature_vectors_are_compared_on_a_sample_of_positions():
    rng = np.random.default_rng(0)
    tuned = rng.normal(size=(30, 20_000)).astype(np.float32)
    echo = tuned[:10] * 2.0 + rng.normal(0, 0.2, (10, 20_000))
    found = near_copies(np.concatenate([echo, rng.normal(size=(30, 20_000))]), tuned)
    assert found is not None and found.share == 0.25


def test_samples_too_small_to_tell_are_not_judged():
    rng = np.random.default_rng(0)
    assert near_copies(rng.normal(size=(50, 8)), rng.normal(size=(50, 8))) is None
    assert near_copies(np.zeros((0, 16, 16, 3)), rng.normal(size=(5, 16, 16, 3))) is None


def test_constant_images_match_nothing():
    flat = np.full((10, 16, 16, 3), 0.5, dtype=np.float32)
    found = near_copies(flat, flat)
    assert found is not None and found.share == 0.0


def test_the_warning_says_what_to_do_for_each_evaluation():
    base, _ = textures(50, seed=1)
    found = near_copies(frames(base, 1, seed=5), base)
    assert found is not None and found.share >= WARNING_SHARE
    holdout = near_copy_warning(found, "holdout", grouped=False)
    assert holdout is not None and "100% of the holdout samples (50 of 50 checked)" in holdout
    assert "`groups`" in holdout and "separate test data" in holdout
    assert "finer than the sources" in (near_copy_warning(found, "holdout", grouped=True) or "")
    assert "same sources" in (near_copy_warning(found, "test", grouped=False) or "")
