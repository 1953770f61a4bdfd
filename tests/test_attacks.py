"""The attacks used to test the defense do what they claim."""

from __future__ import annotations

import numpy as np

from study.architectures import seed_cnn, small_resnet, small_vgg
from study.attacks import BlendedTrigger, PatchTrigger, poison, triggered


def _images(n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((n, 16, 16, 3)).astype(np.float32) * 0.5, np.arange(n) % 5


def test_patch_stamps_only_its_square():
    x, _ = _images(4)
    out = PatchTrigger(size=3, corner=(-4, -4), color=(1.0, 1.0, 0.0)).apply(x)
    np.testing.assert_array_equal(
        out[:, 12:15, 12:15], np.broadcast_to([1.0, 1.0, 0.0], (4, 3, 3, 3))
    )
    untouched = np.ones((16, 16), bool)
    untouched[12:15, 12:15] = False
    np.testing.assert_array_equal(out[:, untouched], x[:, untouched])


def test_blended_mixes_a_fixed_pattern():
    x, _ = _images(3)
    trigger = BlendedTrigger(alpha=0.2, seed=5)
    out = trigger.apply(x)
    pattern = trigger.pattern((16, 16, 3))
    np.testing.assert_allclose(out, 0.8 * x + 0.2 * pattern, rtol=1e-6)
    np.testing.assert_array_equal(BlendedTrigger(alpha=0.2, seed=5).apply(x), out)


def test_poison_relabels_the_chosen_share_of_eligible_samples():
    x, y = _images(200)
    xp, yp, mask = poison(x, y, PatchTrigger(), target=1, rate=0.25, seed=3)
    eligible = y != 1
    assert mask.sum() == round(0.25 * eligible.sum())
    assert not mask[~eligible].any()
    assert (yp[mask] == 1).all() and (yp[~mask] == y[~mask]).all()
    assert not np.array_equal(xp[mask], x[mask]) and np.array_equal(xp[~mask], x[~mask])


def test_poison_from_source_classes_only():
    x, y = _images(200)
    _, _, mask = poison(x, y, PatchTrigger(), target=1, rate=1.0, seed=0, source_classes=(0,))
    assert set(y[mask]) == {0} and mask.sum() == (y == 0).sum()


def test_triggered_test_set_leaves_out_the_target_class():
    x, y = _images(100)
    xt, yt = triggered(x, y, BlendedTrigger(), target=2)
    assert len(xt) == (y != 2).sum() and (yt == 2).all()


def test_seed_cnn_matches_the_study_table():
    assert seed_cnn(classes=9).count_params() == 4_461_001
    assert small_resnet(classes=9).count_params() > 0
    assert small_vgg(classes=9).count_params() == 815_209
