"""Tiny models and synthetic data for the tests: seconds on two CPU cores.

Images are 16x16x3 textures whose orientation gives the class; the backdoor trigger is a bright
3x3 patch in the bottom-right corner, relabelled to class 0.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from fineprune.data.labelled import LabelledData
from fineprune.tune.recipe import Recipe, Research, resolve_recipe
from schemas.options import SanitizeOptions
from schemas.report import V1_DEFENSES

SIZE = 16
CLASSES = 4


def textures(n: int, seed: int, classes: int = CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """Noisy stripes: class 0 horizontal, 1 vertical, 2 and 3 the two diagonals."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    phase = rng.uniform(0, 2 * np.pi, n)[:, None, None]
    period = rng.uniform(3.0, 5.0, n)[:, None, None]
    coords = np.stack([rows, cols, rows + cols, rows - cols])[y % 4]
    wave = 0.5 + 0.35 * np.sin(2 * np.pi * coords / period + phase)
    tint = rng.uniform(0.6, 1.0, (n, 1, 1, 3))
    x = wave[..., None] * tint + rng.normal(0, 0.08, (n, SIZE, SIZE, 3))
    return np.clip(x, 0, 1).astype(np.float32), y.astype(np.int64)


def frames(base: np.ndarray, copies: int, seed: int) -> np.ndarray:
    """Each image `copies` times, brighter or darker and a little noisy: frames of one object."""
    rng = np.random.default_rng(seed)
    x = np.repeat(base, copies, axis=0)
    gain = rng.uniform(0.7, 1.3, (len(x), 1, 1, 1))
    return (x * gain + rng.normal(0, 0.03, x.shape)).astype(np.float32)


def stamp(x: np.ndarray) -> np.ndarray:
    out = x.copy()
    out[:, -4:-1, -4:-1, :] = np.array([1.0, 1.0, 0.0], dtype=np.float32)
    return out


def poisoned(n: int, seed: int, rate: float = 0.15, target: int = 0):
    x, y = textures(n, seed)
    rng = np.random.default_rng(seed + 1)
    chosen = rng.random(n) < rate
    x[chosen] = stamp(x[chosen])
    y = np.where(chosen, target, y)
    return x, y


def trigger_set(n: int, seed: int, target: int = 0):
    x, y = textures(n, seed)
    keep = y != target
    return stamp(x[keep]), np.full(int(keep.sum()), target)


# -- architectures -------------------------------------------------------------------------


def sequential_bn_flatten(seed: int = 0) -> keras.Model:
    """Conv -> BN -> pool -> dropout -> Flatten -> Dense: the seed CNN's shape, shrunk."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 3)),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1"),
            keras.layers.BatchNormalization(name="bn1"),
            keras.layers.MaxPooling2D(name="pool1"),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv2"),
            keras.layers.BatchNormalization(name="bn2"),
            keras.layers.MaxPooling2D(name="pool2"),
            keras.layers.Dropout(0.2, name="drop"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(16, activation="relu", name="dense1"),
            keras.layers.Dense(CLASSES, activation="softmax", name="out"),
        ],
        name="seq_bn_flatten",
    )


def functional_global_pool(seed: int = 0) -> keras.Model:
    """The pruned conv's pooled output feeds both a Dense head and another convolution."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(12, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    pooled = keras.layers.MaxPooling2D(name="pool2")(x)
    branch = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv3")(pooled)
    a = keras.layers.GlobalAveragePooling2D(name="gap_a")(pooled)
    b = keras.layers.GlobalMaxPooling2D(name="gmp_b")(branch)
    flat = keras.layers.Flatten(name="flat")(pooled)
    merged = keras.layers.Concatenate(name="concat")([a, b])
    h = keras.layers.Dense(10, activation="relu", name="dense_gap")(merged)
    h2 = keras.layers.Dense(10, activation="relu", name="dense_flat")(flat)
    out = keras.layers.Dense(CLASSES, name="logits")(keras.layers.Add(name="sum")([h, h2]))
    return keras.Model(inputs, out, name="functional_gap")


def residual_block(seed: int = 0) -> keras.Model:
    """The pruned conv feeds an Add shared with a shortcut: channels get zeroed, not removed."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 3))
    stem = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", name="res_conv")(stem)
    x = keras.layers.BatchNormalization(name="res_bn")(x)
    x = keras.layers.ReLU(name="res_relu")(x)
    x = keras.layers.Add(name="res_add")([x, stem])
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(CLASSES, activation="softmax", name="out")(x)
    return keras.Model(inputs, out, name="residual")


def separate_activation(seed: int = 0) -> keras.Model:
    """Conv with no activation, then BatchNorm, then a separate Activation layer."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 3)),
            keras.layers.Conv2D(8, 3, padding="same", name="conv1", activation="relu"),
            keras.layers.MaxPooling2D(name="pool1"),
            keras.layers.Conv2D(12, 3, padding="same", name="conv2"),
            keras.layers.BatchNormalization(name="bn2"),
            keras.layers.Activation("relu", name="act2"),
            keras.layers.AveragePooling2D(2, name="pool2"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(CLASSES, activation="softmax", name="out"),
        ],
        name="separate_activation",
    )


ARCHITECTURES = {
    "sequential_bn_flatten": sequential_bn_flatten,
    "functional_global_pool": functional_global_pool,
    "residual_block": residual_block,
    "separate_activation": separate_activation,
}


def randomize_batchnorm(model: keras.Model, seed: int = 0) -> None:
    """Give BatchNorm layers non-trivial statistics so masking before/after them differs."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, gamma.shape).astype(np.float32),
                    rng.normal(0, 0.3, beta.shape).astype(np.float32),
                    rng.normal(0, 0.3, mean.shape).astype(np.float32),
                    rng.uniform(0.5, 2.0, var.shape).astype(np.float32),
                ]
            )


def train_backdoored(seed: int = 0, epochs: int = 12) -> keras.Model:
    """A small CNN trained on 15 % poisoned textures: accurate, and backdoored."""
    model = sequential_bn_flatten(seed)
    x, y = poisoned(3000, seed)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
    return model


def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def backdoor_inputs(root: Path, model: keras.Model, seed: int) -> dict[str, Path]:
    """A backdoored model's file, 600 clean textures and 300 triggered ones, under `root`."""
    model.save(root / "model.keras")
    x, y = textures(600, seed=seed)
    xt, yt = trigger_set(300, seed=seed + 100)
    return {
        "keras": root / "model.keras",
        "clean": save_npz(root / "clean.npz", x=x, y=y),
        "trigger": save_npz(root / "trigger.npz", x=xt, y_target=yt),
    }


def bn_and_plain_conv(seed: int = 0) -> keras.Model:
    """Conv+BN (the BN is the neuron), a conv with no BN (its kernel is), a dense head."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="normed_conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(6, 3, activation="relu", name="plain_conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(x)
    model = keras.Model(inputs, outputs)
    bn = model.get_layer("bn")
    rng = np.random.default_rng(seed)
    bn.set_weights([rng.uniform(0.5, 1.5, 4), rng.normal(size=4), rng.normal(size=4), np.ones(4)])
    return model


def random_images(n: int = 48, seed: int = 0) -> LabelledData:
    rng = np.random.default_rng(seed)
    return LabelledData(rng.random((n, 8, 8, 3)).astype(np.float32), rng.integers(0, 3, n))


def teaching_problem() -> tuple[keras.Model, keras.Model, np.ndarray, np.ndarray]:
    """A one-layer softmax student, its teacher, 8 inputs and labels: a step checked by hand."""
    keras.utils.set_random_seed(0)
    student = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, activation="softmax")])
    teacher = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, activation="softmax")])
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 3, 8)
    return student, teacher, x, y


def taught_loss(kernel, bias, x: np.ndarray, y: np.ndarray, teacher: keras.Model, weight: float):
    """CE(y, p) + weight * CE(teacher(x), p) for the student's softmax p = x @ kernel + bias."""
    p = tf.nn.softmax(x @ kernel + bias)
    q = teacher(x).numpy()
    labels = -tf.reduce_mean(tf.math.log(tf.gather(p, y, batch_dims=1)))
    return labels - weight * tf.reduce_mean(tf.reduce_sum(q * tf.math.log(p), axis=-1))


def tuning_recipe(**changes: object) -> Recipe:
    """Plain fine-tuning at a constant 1e-3, BatchNorm frozen; `changes` override any field."""
    settings: dict[str, object] = dict(
        epochs=1,
        learning_rate=1e-3,
        optimizer="adam",
        lr_schedule="constant",
        batch_size=32,
        augment=False,
        patience=1,
        freeze_batchnorm=True,
        seed=0,
    )
    return Recipe(**{**settings, **changes})


def settings(defense: str = "fine-pruning", **values: object) -> tuple[SanitizeOptions, Research]:
    """Options and research settings from one flat list, as the tests used to write them."""
    public, method = V1_DEFENSES.get(defense, (defense, "plain"))
    options = {k: v for k, v in values.items() if k in SanitizeOptions.model_fields}
    research = {k: v for k, v in values.items() if k not in options}
    return SanitizeOptions(defense=public, **options), Research(method=method, **research)


def recipe_for(
    model: keras.Model,
    head: list[str],
    defense: str = "fine-pruning",
    proxy_found: bool = True,
    **values: object,
) -> Recipe:
    """What the recipe resolves to for `model` under these settings."""
    return resolve_recipe(*settings(defense, **values), model, head, proxy_found)


def sanitize_with(
    model: Path,
    data: Path,
    out: Path,
    defense: str = "fine-pruning",
    trigger: Path | None = None,
    test: Path | None = None,
    progress=None,
    **values: object,
):
    """`fineprune.sanitize` under `settings(defense, **values)`."""
    from fineprune.pipeline import sanitize

    options, research = settings(defense, **values)
    return sanitize(
        model,
        data,
        out,
        options,
        trigger_data=trigger,
        test_data=test,
        progress=progress,
        research=research,
    )
