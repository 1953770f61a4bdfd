"""An odd batch through a narrow strided 1x1 convolution kills TensorFlow 2.21 (oneDNN): the
engine must never train or take input gradients on one.

Each case runs in its own interpreter, because the failure is the process dying (heap
corruption), which no exception handler sees. The first case shows the failure is real on this
machine (it is skipped where this TensorFlow does not crash), the others that the engine
avoids it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = """
import numpy as np, keras
L = keras.layers
keras.utils.set_random_seed(0)
inputs = keras.Input((16, 16, 3))
h = L.Conv2D(8, 3, padding="same", activation="relu", name="conv")(inputs)
shortcut = L.Conv2D(8, 1, strides=2, use_bias=False, name="proj")(h)  # the narrow 1x1, stride 2
h = L.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv2")(h)
h = L.GlobalAveragePooling2D()(L.Add()([h, shortcut]))
model = keras.Model(inputs, L.Dense(4, activation="softmax")(h))
x = np.random.default_rng(1).random((93, 16, 16, 3)).astype(np.float32)
y = np.random.default_rng(2).integers(0, 4, 93)
"""


def _run(body: str) -> subprocess.CompletedProcess[str]:
    code = MODEL + textwrap.dedent(body) + "\nprint('survived')\n"
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)},
    )


def test_the_failure_is_real_here():
    plain = _run(
        """
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        model.fit(x, y, batch_size=31, epochs=2, verbose=0)
        """
    )
    if plain.returncode == 0:
        pytest.skip("this TensorFlow trains odd batches through the 1x1 convolution fine")
    assert "survived" not in plain.stdout


def test_fine_tuning_with_an_odd_batch_size_and_an_odd_remainder_survives():
    done = _run(
        """
        from fineprune.data.labelled import LabelledData
        from fineprune.tune.loop import fine_tune
        from fineprune.tune.recipe import Recipe
        recipe = Recipe(epochs=2, learning_rate=1e-3, batch_size=31, seed=0, sharpness_radius=0.2,
                        method="sharpness-aware")
        result = fine_tune(model, LabelledData(x, y), LabelledData(x[:9], y[:9]), recipe,
                           "probabilities")
        assert len(result.history) == 2
        """
    )
    assert done.returncode == 0 and "survived" in done.stdout, done.stderr[-1500:]


def test_the_trigger_scan_on_odd_counts_survives():
    done = _run(
        """
        from fineprune.verdict.scan import scan, universal_perturbation
        universal_perturbation(model, x[:31], 0, radius=1.0, steps=3)
        universal_perturbation(model, x[:1], 1, radius=1.0, steps=3)
        scan(model, x, y, seed=0, steps=2)
        """
    )
    assert done.returncode == 0 and "survived" in done.stdout, done.stderr[-1500:]
