"""Clean, test and trigger data as the model consumes them, checked against the model.

Every mismatch with the model is reported in words: shapes, label ranges, non-finite values,
too few samples or classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fineprune.data.npz import check_npz_container, read_npz
from fineprune.errors import InvalidDataError
from fineprune.load.signature import ModelSignature


@dataclass(frozen=True)
class LabelledData:
    """Inputs as the model consumes them, with integer labels.

    `groups`, when the data has them, names the source of each sample (a video, a physical
    sign photographed thirty times): near-copies that a split must keep on one side.
    """

    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.x)

    def take(self, rows: np.ndarray) -> LabelledData:
        groups = None if self.groups is None else self.groups[rows]
        return LabelledData(self.x[rows], self.y[rows], groups)


def prepare_inputs(
    x: np.ndarray, signature: ModelSignature, role: str, rescale: float | None
) -> np.ndarray:
    """Check `x` against the model's input shape, rescale, and refuse non-finite values."""
    if x.dtype.kind not in "uif":
        raise InvalidDataError(f"{role} x has dtype {x.dtype}; expected numbers")
    expected = signature.input_shape
    got = tuple(x.shape[1:])
    fits = len(got) == len(expected) and all(
        e is None or e == g for e, g in zip(expected, got, strict=True)
    )
    if x.ndim < 1 or not fits:
        shown = tuple("any" if e is None else e for e in expected)
        raise InvalidDataError(
            f"{role} x has shape {tuple(x.shape)}, i.e. samples of shape {got}, "
            f"but the model expects samples of shape {shown}"
        )
    if len(x) == 0:
        raise InvalidDataError(f"{role} x holds no samples")
    values = x.astype(np.float32)
    if rescale is not None:
        with np.errstate(over="ignore"):
            values *= np.float32(rescale)
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).reshape(len(values), -1).any(axis=1).sum())
        raise InvalidDataError(f"{role} x has NaN or infinite values in {bad} sample(s)")
    return values


def prepare_labels(y: np.ndarray, n: int, signature: ModelSignature, role: str) -> np.ndarray:
    """Integer labels from integer or one-hot `y`, checked against the model's classes."""
    classes = max(signature.classes, 2)
    if len(y) != n:
        raise InvalidDataError(f"{role} has {n} samples in x but {len(y)} labels in y")
    if y.ndim == 2 and y.shape[1] == classes:
        if not (np.isin(y, (0, 1)).all() and (y.sum(axis=1) == 1).all()):
            raise InvalidDataError(f"{role} y is 2-D but its rows are not one-hot")
        return y.argmax(axis=1).astype(np.int64)
    if y.ndim == 2:
        raise InvalidDataError(
            f"{role} y is one-hot with {y.shape[1]} columns but the model has {classes} outputs"
        )
    if y.ndim != 1:
        raise InvalidDataError(f"{role} y has shape {tuple(y.shape)}; expected (samples,)")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or not (y == np.round(y)).all():
            raise InvalidDataError(f"{role} y holds non-integer labels")
    elif y.dtype.kind not in "iu":
        raise InvalidDataError(f"{role} y has dtype {y.dtype}; expected integer labels")
    labels = y.astype(np.int64)
    if labels.min() < 0 or labels.max() >= classes:
        raise InvalidDataError(
            f"{role} y has labels from {labels.min()} to {labels.max()}, but the model has "
            f"{classes} classes (0..{classes - 1})"
        )
    return labels


def load_labelled(
    path: Path, signature: ModelSignature, role: str, rescale: float | None
) -> LabelledData:
    arrays = read_npz(path, role, ("x", "y"))
    x = prepare_inputs(arrays["x"], signature, role, rescale)
    y = prepare_labels(arrays["y"], len(x), signature, role)
    groups = arrays.get("groups")
    if groups is not None:
        check_groups(groups.dtype, groups.shape, len(x), role)
    return LabelledData(x, y, groups)


def load_clean(path: Path, signature: ModelSignature, rescale: float | None) -> LabelledData:
    """The defender's clean data; enough of it, and more than one class."""
    data = load_labelled(path, signature, "clean", rescale)
    check_clean_classes(data.y)
    return data


def check_groups(dtype: np.dtype, shape: tuple[int, ...], n: int, role: str) -> None:
    """One integer or string per sample: what a split needs to keep near-copies together."""
    if dtype.kind not in "iuUS":
        raise InvalidDataError(
            f"{role} groups have dtype {dtype}; expected integers or strings, one per sample "
            "(e.g. the video or track each image came from)"
        )
    if len(shape) != 1 or shape[0] != n:
        raise InvalidDataError(
            f"{role} groups have shape {tuple(shape)}; expected ({n},), one per sample in x"
        )


def check_clean_classes(labels: np.ndarray) -> None:
    """More than one class, and enough samples to split every class into tune and holdout."""
    present = np.unique(labels)
    if len(present) < 2:
        raise InvalidDataError(
            f"clean data has only class {present[0]}: accuracy on one class measures nothing"
        )
    if len(labels) < max(20, 2 * len(present)):
        raise InvalidDataError(
            f"clean data has {len(labels)} samples for {len(present)} classes; need at least "
            f"{max(20, 2 * len(present))} to split into tuning and held-out parts"
        )


def trigger_targets(target: np.ndarray, n: int) -> np.ndarray:
    """One target per triggered sample: a single `target` (or a one-element `y_target`) repeats.

    Repeated as it is, not through int(): a NaN target must reach the label checks.
    """
    if target.ndim == 0 or target.size == 1:
        return np.repeat(target.reshape(1), n)
    return target


def load_trigger(path: Path, signature: ModelSignature, rescale: float | None) -> LabelledData:
    """Triggered samples and the class the attacker wants for each (`y_target` or `target`)."""
    names = check_npz_container(path, "trigger")
    target_key = "y_target" if "y_target" in names else "target"
    arrays = read_npz(path, "trigger", ("x", target_key))
    x = prepare_inputs(arrays["x"], signature, "trigger", rescale)
    y = prepare_labels(trigger_targets(arrays[target_key], len(x)), len(x), signature, "trigger")
    return LabelledData(x, y)


def perturbation_radius(x: np.ndarray, relative: float) -> float:
    """`relative` times the mean L2 norm of one input: a perturbation's absolute radius, so that
    one relative setting suits 0..1 and 0..255 inputs alike."""
    norms = np.linalg.norm(x.reshape(len(x), -1).astype(np.float64), axis=1)
    return float(relative * norms.mean()) if len(norms) else 0.0
