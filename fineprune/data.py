"""Clean, test and trigger data: read .npz safely, check it against the model, split it.

Data arrives from users as .npz files. They are read without pickle, checked member by member
before numpy expands them, and every mismatch with the model is reported in words.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fineprune.errors import InvalidDataError

MAX_MEMBER_BYTES = 4 * 1024**3
MAX_EXPANSION_RATIO = 1000


@dataclass(frozen=True)
class LabelledData:
    """Inputs as the model consumes them, with integer labels."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.x)

    def take(self, rows: np.ndarray) -> LabelledData:
        return LabelledData(self.x[rows], self.y[rows])


@dataclass(frozen=True)
class ModelSignature:
    """What the data must look like: per-sample input shape (None = any) and class count."""

    input_shape: tuple[int | None, ...]
    classes: int


def check_npz_container(path: Path, role: str) -> list[str]:
    """Member names of an .npz, after refusing bombs and non-archives. Cheap: reads no array."""
    if not path.exists() or path.stat().st_size == 0:
        raise InvalidDataError(f"{role} data file is empty or missing")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except zipfile.BadZipFile as exc:
        raise InvalidDataError(f"{role} data is not an .npz file (not a zip archive)") from exc
    names = []
    for info in infos:
        if info.file_size > MAX_MEMBER_BYTES:
            raise InvalidDataError(
                f"{role} data member {info.filename!r} expands to {info.file_size} bytes, "
                f"over the {MAX_MEMBER_BYTES} byte limit"
            )
        if info.compress_size and info.file_size / info.compress_size > MAX_EXPANSION_RATIO:
            ratio = info.file_size // info.compress_size
            raise InvalidDataError(
                f"{role} data member {info.filename!r} expands {ratio}-fold: "
                "refused as a compression bomb"
            )
        names.append(info.filename.removesuffix(".npy"))
    return names


def read_npz(path: Path, role: str, required: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays of an .npz, never unpickling anything."""
    names = check_npz_container(path, role)
    missing = [k for k in required if k not in names]
    if missing:
        raise InvalidDataError(
            f"{role} data lacks {', '.join(repr(m) for m in missing)} "
            f"(it holds {', '.join(repr(n) for n in names) or 'nothing'})"
        )
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for key in names:
                if key in required or key in ("y_target", "target"):
                    arrays[key] = npz[key]
    except ValueError as exc:
        raise InvalidDataError(
            f"{role} data holds object arrays (pickled Python objects); refused: {exc}"
        ) from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InvalidDataError(f"{role} data could not be read: {exc}") from exc
    return arrays


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
    return LabelledData(x, y)


def load_clean(path: Path, signature: ModelSignature, rescale: float | None) -> LabelledData:
    """The defender's clean data; enough of it, and more than one class."""
    data = load_labelled(path, signature, "clean", rescale)
    present = np.unique(data.y)
    if len(present) < 2:
        raise InvalidDataError(
            f"clean data has only class {present[0]}: accuracy on one class measures nothing"
        )
    if len(data) < max(20, 2 * len(present)):
        raise InvalidDataError(
            f"clean data has {len(data)} samples for {len(present)} classes; need at least "
            f"{max(20, 2 * len(present))} to split into tuning and held-out parts"
        )
    return data


def load_trigger(path: Path, signature: ModelSignature, rescale: float | None) -> LabelledData:
    """Triggered samples and the class the attacker wants for each (`y_target` or `target`)."""
    names = check_npz_container(path, "trigger")
    target_key = "y_target" if "y_target" in names else "target"
    arrays = read_npz(path, "trigger", ("x", target_key))
    x = prepare_inputs(arrays["x"], signature, "trigger", rescale)
    target = arrays[target_key]
    if target.ndim == 0 or target.size == 1:
        target = np.full(len(x), int(target.reshape(-1)[0]))
    y = prepare_labels(target, len(x), signature, "trigger")
    return LabelledData(x, y)


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (kept, split off): `fraction` of every class split off, seeded."""
    rng = np.random.default_rng(seed)
    kept, off = [], []
    for cls in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == cls))
        n_off = round(fraction * len(rows))
        n_off = min(max(n_off, 1), len(rows) - 1) if len(rows) >= 2 else 0
        off.append(rows[:n_off])
        kept.append(rows[n_off:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(off))
