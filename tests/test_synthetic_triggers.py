"""Synthetic triggers: which images are stamped, and what a stamp may change."""

from __future__ import annotations

import numpy as np
import pytest

from fineprune.tune.synthetic_triggers import SyntheticTriggers


def _images(n: int = 400, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.25 + 0.5 * rng.random((n, 32, 32, 3))).astype(np.float32)


def test_nothing_is_stamped_at_share_zero():
    x = _images()
    np.testing.assert_array_equal(np.asarray(SyntheticTriggers(0.0, x)(x)), x)


@pytest.mark.parametrize("share", [0.5, 1.0])
def test_about_the_share_is_stamped_each_with_a_patch_or_a_low_ratio_blend(share: float):
    x = _images()
    stamp = SyntheticTriggers(share, x, seed=3)
    out = np.asarray(stamp(x))
    assert out.min() >= 0.25 - 1e-6 and out.max() <= 0.75 + 1e-6  # the inputs' own range
    changed = np.abs(out - x).max(axis=-1) > 1e-6
    stamped = changed.any(axis=(1, 2))
    assert abs(stamped.mean() - share) < 0.1
    patches = blends = 0
    for i in np.flatnonzero(stamped):
        rows, cols = np.nonzero(changed[i])
        if changed[i].mean() < 0.5:  # a patch: the changes fit one square of an allowed size
            patches += 1
            assert rows.max() - rows.min() < stamp.sizes[1]
            assert cols.max() - cols.min() < stamp.sizes[1]
        else:  # a blend: every pixel moves, by at most the largest ratio of the range
            blends += 1
            assert np.abs(out[i] - x[i]).max() <= 0.3 * 0.5 + 1e-5
    assert patches > 0.3 * stamped.sum() and blends > 0.3 * stamped.sum()


def test_the_stamps_change_from_step_to_step_and_are_fixed_by_seed_and_step():
    x = _images(64)
    first, second = SyntheticTriggers(1.0, x, seed=5), SyntheticTriggers(1.0, x, seed=5)
    a, b = np.asarray(first(x, 7)), np.asarray(second(x, 7))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, np.asarray(first(x, 8)))
    assert not np.array_equal(a, np.asarray(SyntheticTriggers(1.0, x, seed=6)(x, 7)))


def test_non_images_are_refused():
    with pytest.raises(ValueError, match="images"):
        SyntheticTriggers(0.5, np.zeros((10, 4), np.float32))
