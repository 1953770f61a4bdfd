"""Every refusal of the data checks, each with a message that says what is wrong."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from factories import save_npz

from fineprune.data.labelled import load_clean, load_labelled, load_trigger
from fineprune.data.splits import stratified_split
from fineprune.errors import InvalidDataError
from fineprune.load.signature import ModelSignature

SIGNATURE = ModelSignature(input_shape=(16, 16, 3), classes=4)


def _images(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, 16, 16, 3)).astype(np.float32), np.arange(n) % 4


def test_good_data_loads_with_integer_or_one_hot_labels(tmp_path: Path):
    x, y = _images()
    data = load_clean(save_npz(tmp_path / "a.npz", x=x, y=y), SIGNATURE, None)
    assert data.x.shape == (40, 16, 16, 3) and data.x.dtype == np.float32
    one_hot = np.eye(4, dtype=np.uint8)[y]
    same = load_clean(save_npz(tmp_path / "b.npz", x=x, y=one_hot), SIGNATURE, None)
    np.testing.assert_array_equal(same.y, data.y)


def test_rescale_turns_uint8_into_unit_range(tmp_path: Path):
    x = np.full((40, 16, 16, 3), 255, dtype=np.uint8)
    data = load_clean(save_npz(tmp_path / "u.npz", x=x, y=np.arange(40) % 4), SIGNATURE, 1 / 255)
    assert data.x.max() == pytest.approx(1.0)


def test_trigger_data_with_one_target(tmp_path: Path):
    x, _ = _images(10)
    data = load_trigger(save_npz(tmp_path / "t.npz", x=x, target=np.array(2)), SIGNATURE, None)
    assert (data.y == 2).all() and len(data) == 10


def test_any_batch_dimension_matches_none(tmp_path: Path):
    signature = ModelSignature(input_shape=(None, 3), classes=2)
    x = np.zeros((30, 7, 3), np.float32)
    data = load_labelled(
        save_npz(tmp_path / "s.npz", x=x, y=np.arange(30) % 2), signature, "x", None
    )
    assert len(data) == 30


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            {"x": np.zeros((40, 16, 16), np.float32), "y": np.arange(40) % 4},
            r"samples of shape \(16, 16\).*expects samples of shape \(16, 16, 3\)",
        ),
        (
            {"x": np.zeros((40, 32, 32, 3), np.float32), "y": np.arange(40) % 4},
            r"expects samples of shape \(16, 16, 3\)",
        ),
        (
            {"x": np.zeros((40, 16, 16, 3), np.float32), "y": np.arange(40) % 4 + 3},
            r"labels from 3 to 6, but the model has 4 classes",
        ),
        (
            {"x": np.zeros((40, 16, 16, 3), np.float32), "y": -(np.arange(40) % 4)},
            r"labels from -3 to 0",
        ),
        (
            {"x": np.zeros((40, 16, 16, 3), np.float32), "y": np.arange(39) % 4},
            r"40 samples in x but 39 labels",
        ),
        (
            {"x": np.full((40, 16, 16, 3), np.nan, np.float32), "y": np.arange(40) % 4},
            r"NaN or infinite values in 40 sample",
        ),
        ({"x": np.zeros((40, 16, 16, 3), np.float32), "y": np.zeros(40, int)}, r"only class 0"),
        (
            {"x": np.zeros((6, 16, 16, 3), np.float32), "y": np.arange(6) % 4},
            r"6 samples for 4 classes",
        ),
        (
            {"x": np.zeros((40, 16, 16, 3), np.float32), "y": np.eye(5)[np.arange(40) % 5]},
            r"one-hot with 5 columns but the model has 4 outputs",
        ),
        (
            {"x": np.zeros((40, 16, 16, 3), np.float32), "y": np.full((40, 4), 0.25)},
            r"rows are not one-hot",
        ),
        (
            {"x": np.zeros((40, 16, 16, 3), np.float32), "y": (np.arange(40) % 4) + 0.5},
            r"non-integer labels",
        ),
        ({"x": np.zeros((40, 16, 16, 3), bool), "y": np.arange(40) % 4}, r"dtype bool"),
        ({"x": np.zeros((40, 16, 16, 3), np.float32)}, r"lacks 'y'"),
        ({"y": np.arange(40) % 4}, r"lacks 'x'"),
        (
            {"x": np.zeros((40, 16, 16, 3)), "y": np.arange(40) % 4, "groups": np.zeros(39, int)},
            r"groups have shape \(39,\); expected \(40,\)",
        ),
        (
            {"x": np.zeros((40, 16, 16, 3)), "y": np.arange(40) % 4, "groups": np.zeros((40, 2))},
            r"groups have dtype float64; expected integers or strings",
        ),
    ],
)
def test_bad_clean_data_is_refused_with_its_reason(tmp_path: Path, arrays, message: str):
    path = save_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(InvalidDataError, match=message):
        load_clean(path, SIGNATURE, None)


def test_infinity_after_rescale_is_caught(tmp_path: Path):
    x = np.full((40, 16, 16, 3), 3e38, np.float32)
    path = save_npz(tmp_path / "big.npz", x=x, y=np.arange(40) % 4)
    with pytest.raises(InvalidDataError, match="infinite"):
        load_clean(path, SIGNATURE, 10.0)


def test_object_arrays_are_never_unpickled(tmp_path: Path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    x = np.empty(40, dtype=object)
    x[:] = [Payload() for _ in range(40)]
    path = tmp_path / "pickle.npz"
    np.savez(path, x=x, y=np.arange(40) % 4)
    with pytest.raises(InvalidDataError, match="object arrays"):
        load_clean(path, SIGNATURE, None)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "empty"), (b"not a zip at all", "not an .npz"), (b"PK\x03\x04trunc", "not an .npz")],
)
def test_non_npz_files_are_refused(tmp_path: Path, content: bytes, message: str):
    path = tmp_path / "data.npz"
    path.write_bytes(content)
    with pytest.raises(InvalidDataError, match=message):
        load_clean(path, SIGNATURE, None)


def test_npz_bomb_is_refused_before_expansion(tmp_path: Path):
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            chunk = bytes(1024 * 1024)
            for _ in range(64):
                member.write(chunk)
        archive.writestr("y.npy", b"")
    with pytest.raises(InvalidDataError, match="compression bomb"):
        load_clean(path, SIGNATURE, None)


def test_missing_trigger_target_is_named(tmp_path: Path):
    x, _ = _images(10)
    with pytest.raises(InvalidDataError, match="lacks 'target'"):
        load_trigger(save_npz(tmp_path / "t.npz", x=x), SIGNATURE, None)


def test_stratified_split_is_seeded_disjoint_and_keeps_every_class():
    labels = np.repeat(np.arange(5), [50, 30, 20, 8, 2])
    kept, held = stratified_split(labels, 0.25, seed=3)
    again_kept, again_held = stratified_split(labels, 0.25, seed=3)
    np.testing.assert_array_equal(kept, again_kept)
    np.testing.assert_array_equal(held, again_held)
    assert set(kept) & set(held) == set()
    assert len(kept) + len(held) == len(labels)
    for cls, n in enumerate([50, 30, 20, 8, 2]):
        in_held = int((labels[held] == cls).sum())
        assert 1 <= in_held < n
        assert abs(in_held - 0.25 * n) <= 1
    other_kept, _ = stratified_split(labels, 0.25, seed=4)
    assert not np.array_equal(kept, other_kept)


def test_grouped_split_keeps_every_group_whole():
    # Class 0: ten groups of 6; class 1: five groups of 4; class 2: one group (cannot split);
    # class 3: two groups of 5, each too big for a quarter of the class.
    labels = np.repeat([0, 1, 2, 3], [60, 20, 7, 10])
    groups = np.concatenate(
        [np.arange(60) // 6, 100 + np.arange(20) // 4, np.full(7, 200), 300 + np.arange(10) // 5]
    )
    kept, held = stratified_split(labels, 0.25, seed=3, groups=groups)
    again = stratified_split(labels, 0.25, seed=3, groups=groups)
    np.testing.assert_array_equal(kept, again[0])
    assert set(kept) & set(held) == set() and len(kept) + len(held) == len(labels)
    assert set(groups[kept]) & set(groups[held]) == set()
    assert abs((labels[held] == 0).sum() - 15) <= 3  # as near 25 % as groups of 6 allow
    assert abs((labels[held] == 1).sum() - 5) <= 2
    assert (labels[held] == 2).sum() == 0  # a class's only group stays on the kept side
    assert (labels[held] == 3).sum() == 0
    other_kept, _ = stratified_split(labels, 0.25, seed=4, groups=groups)
    assert not np.array_equal(kept, other_kept)


def test_groups_ride_along_with_their_rows(tmp_path: Path):
    x, y = _images()
    names = np.array([f"track-{i // 5}" for i in range(40)])
    data = load_clean(save_npz(tmp_path / "g.npz", x=x, y=y, groups=names), SIGNATURE, None)
    assert data.groups is not None
    part = data.take(np.array([0, 7, 39]))
    assert list(part.groups) == ["track-0", "track-1", "track-7"]
