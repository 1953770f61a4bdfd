"""Fine-tuning the pruned model on the defender's clean data, epoch chosen on validation.

The epoch is picked on a validation slice carved from the tuning data, never on the held-out
split the report quotes. Channels that surgery had to zero (not remove) are zeroed again after
every step, so training cannot bring a pruned channel back.

With a sharpness radius, each step first climbs to the worst weights within that radius and
takes its gradient there (adaptive SAM, as FT-SAM uses it: Zhu et al., ICCV 2023). A backdoor
sits in a sharp minimum that plain fine-tuning on a little clean data does not leave; the
perturbation pushes the weights that carry it, and only those that matter for clean data
are pulled back.

With a feature-shift strength, the classifier head is re-initialized and kept turned away from
the original one while everything trains (FST; `fineprune.feature_shift`).

With an unlearning radius, each step also trains on the batch shifted by its worst universal
perturbation within that radius (adversarial unlearning; `fineprune.unlearning`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from fineprune.data import LabelledData
from fineprune.distillation import Teacher
from fineprune.evaluation import OutputKind, predict, rate
from fineprune.feature_shift import (
    FeatureShift,
    alignment,
    classifier_head,
    reinitialize,
)
from fineprune.graph import leaf_layers
from fineprune.relative_rate import LayerScaledAdam, layer_scales
from fineprune.sweep import predicted_classes
from fineprune.synthetic_triggers import SyntheticTriggers
from fineprune.trigger_scan import ProxyRefresher, ScanResult
from fineprune.unlearning import AdversarialUnlearning, perturbation_radius
from fineprune.wrapped import TrainingWrapper

ZeroMask = tuple[str, int, np.ndarray]  # layer name, weight index, True where the weight is 0
EpochCallback = Callable[[dict[str, float]], None]


@dataclass
class FineTuneSettings:
    epochs: int
    learning_rate: float
    optimizer: str
    lr_schedule: str
    batch_size: int
    augment: bool
    patience: int
    freeze_batchnorm: bool
    seed: int
    sharpness_radius: float = 0.0  # 0: plain fine-tuning; >0: adaptive SAM with this rho
    feature_shift: float = 0.0  # 0: keep the classifier; >0: FST with this penalty strength
    unlearning_radius: float = 0.0  # >0: adversarial unlearning, radius relative to input norm
    distillation: float = 0.0  # weight of the delivered model's teaching (needs a teacher)
    keep_last: bool = False  # run every epoch and keep the last, instead of the validation pick
    # Among epochs at the best validation accuracy: the latest, or the lowest validation loss.
    epoch_choice: str = "lowest-loss"
    synthetic_triggers: float = 0.0  # share of each batch stamped with a random patch or blend
    frozen_layers: tuple[str, ...] = ()  # kept as delivered: the classifier head, when asked
    relative_rate: bool = False  # Adam only: each layer's rate is the rate times its kernel's RMS
    proxy_trigger: np.ndarray | None = None  # a scan's perturbation (fineprune.trigger_scan)
    proxy_share: float = 0.0  # share of each batch shifted by it, true labels kept
    proxy_target: int | None = None  # the scan's suspect: the class the proxy sends images to
    # More perturbations that reach the suspect, orthogonal to the proxy: a proxied row gets
    # the proxy or one of these, drawn at random (trigger_scan.orthogonal_proxies).
    proxy_alternates: tuple[np.ndarray, ...] = ()
    proxy_refresh: bool = False  # search the proxy again on the tuned model before each epoch
    proxy_augment: bool = False  # shift and zoom a proxied row before the proxy is added
    # For the caller that averages runs (fineprune.averaging); one fine_tune ignores them.
    averaged_runs: int = 1
    extrapolation: float = 1.0

    @property
    def method(self) -> str:
        if self.feature_shift:
            return "feature-shift"
        if self.unlearning_radius:
            return "adversarial-unlearning"
        return "sharpness-aware" if self.sharpness_radius else "plain"


@dataclass
class FineTuneResult:
    model: keras.Model
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    method: str = "plain"
    reinitialized_layer: str | None = None
    selected_on: str = "validation"
    fallback_reason: str | None = None  # set when this replaced a failed feature-shift run
    synthetic_triggers: float = 0.0  # the share of each batch that was stamped
    learning_rate: float = 0.0
    sharpness_radius: float = 0.0
    frozen_layers: tuple[str, ...] = ()
    trigger_scan: ScanResult | None = None  # set by the pipeline when it scanned
    proxy_share: float = 0.0  # the share of each batch shifted by the scan's perturbation
    seed: int = 0
    # Set by the pipeline when several runs were averaged (fineprune.averaging): all of them,
    # this one first, and the average's validation accuracy.
    averaged_runs: list[FineTuneResult] = field(default_factory=list)
    averaged_validation_accuracy: float | None = None
    extrapolation: float = 1.0  # the step taken along the average's change (fineprune.averaging)


class _KeepZeroed(keras.callbacks.Callback):
    def __init__(self, model: keras.Model, masks: list[ZeroMask]) -> None:
        super().__init__()
        self._targets = [
            (model.get_layer(name).weights[index], tf.constant(mask)) for name, index, mask in masks
        ]

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        for variable, mask in self._targets:
            variable.assign(tf.where(mask, tf.zeros_like(variable), variable))


class SharpnessAware(TrainingWrapper):
    """Trains `inner` (sharing its variables) with adaptive sharpness-aware minimization.

    ASAM (Kwon et al. 2021): the ascent step is rho * T^2 g / ||T g|| with T = |w|, so the
    radius is relative to each weight's size and one rho suits every layer.
    """

    def __init__(self, inner: keras.Model, radius: float, teacher: Teacher | None = None) -> None:
        super().__init__(inner, "sam", teacher)
        self.radius = radius

    def train_step(self, data: tuple[tf.Tensor, tf.Tensor]) -> dict[str, tf.Tensor]:
        x, y = data
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            y_pred, loss, total = self.taught_losses(x, y)
        grads = tape.gradient(total, variables)
        scaled = [
            tf.zeros_like(v) if g is None else g * tf.abs(v)
            for g, v in zip(grads, variables, strict=True)
        ]
        norm = tf.linalg.global_norm(scaled) + 1e-12
        steps = [self.radius * s * tf.abs(v) / norm for s, v in zip(scaled, variables, strict=True)]
        for variable, step in zip(variables, steps, strict=True):
            variable.assign_add(step)
        with tf.GradientTape() as tape:
            _, _, sharp_loss = self.taught_losses(x, y)
        sharp_grads = tape.gradient(sharp_loss, variables)
        for variable, step in zip(variables, steps, strict=True):
            variable.assign_sub(step)
        self.apply_gradients(sharp_grads, variables)
        return self.metrics_after(loss, y, y_pred)


class Distilled(TrainingWrapper):
    """Trains `inner` on its labels and on the delivered model's outputs for mixed images.

    Plain fine-tuning on a small clean set forgets what that set does not show; the teacher
    covers more of the input space. It also re-teaches the backdoor: 20-24 % left without a
    proxy trigger, 9.7-52.7 % with one (README, "The proxy's accuracy cost"), so no `auto`
    uses it.
    """

    def __init__(self, inner: keras.Model, teacher: Teacher) -> None:
        super().__init__(inner, "distilled", teacher)

    def train_step(self, data: tuple[tf.Tensor, tf.Tensor]) -> dict[str, tf.Tensor]:
        x, y = data
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            y_pred, loss, total = self.taught_losses(x, y)
        self.apply_gradients(tape.gradient(total, variables), variables)
        return self.metrics_after(loss, y, y_pred)


def _loss(kind: OutputKind, classes: int) -> keras.losses.Loss:
    from_logits = kind == "logits"
    if classes == 1:
        return keras.losses.BinaryCrossentropy(from_logits=from_logits)
    return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)


def _optimizer(
    settings: FineTuneSettings, steps: int, model: keras.Model
) -> keras.optimizers.Optimizer:
    rate: float | keras.optimizers.schedules.LearningRateSchedule = settings.learning_rate
    if settings.lr_schedule == "cosine":
        # High early, when the backdoor is unlearned; near zero late, when accuracy settles.
        rate = keras.optimizers.schedules.CosineDecay(settings.learning_rate, max(steps, 1))
    if settings.optimizer == "sgd":
        return keras.optimizers.SGD(rate, momentum=0.9, nesterov=True)
    if settings.relative_rate:
        return LayerScaledAdam(rate, layer_scales(model))
    return keras.optimizers.Adam(rate)


def _augmenter(seed: int) -> keras.Sequential:
    # Small geometric changes only: flips would turn "keep left" into "keep right".
    return keras.Sequential(
        [
            keras.layers.RandomTranslation(0.1, 0.1, fill_mode="nearest", seed=seed),
            keras.layers.RandomZoom(0.1, fill_mode="nearest", seed=seed + 1),
        ]
    )


def _dataset(
    data: LabelledData,
    settings: FineTuneSettings,
    image_like: bool,
    proxy: tf.Variable | None = None,
) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices((data.x, data.y))
    ds = ds.shuffle(len(data), seed=settings.seed, reshuffle_each_iteration=True)
    ds = ds.batch(settings.batch_size)
    if settings.augment and image_like:
        augment = _augmenter(settings.seed)
        ds = ds.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=2)
    if settings.synthetic_triggers and image_like:
        stamp = SyntheticTriggers(settings.synthetic_triggers, data.x, settings.seed)
        ds = ds.enumerate().map(lambda step, xy: (stamp(xy[0], step), xy[1]))
    if proxy is not None:
        varied = _augmenter(settings.seed + 2) if settings.proxy_augment and image_like else None
        shift = _proxy_shift(proxy, settings.proxy_share, data.x, settings.seed, varied)
        ds = ds.enumerate().map(lambda step, xy: (shift(xy[0], step), xy[1]))
    return ds.prefetch(2)


def _proxy_shift(
    patterns: tf.Variable,
    share: float,
    reference: np.ndarray,
    seed: int,
    varied: keras.Sequential | None = None,
) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """Adds one of `patterns` (stacked; read at every batch: a refresh changes them), drawn
    per row, to `share` of a batch's rows, kept in the inputs' range; `varied` first shifts
    and zooms those rows, the pattern staying where it is, as a trigger stays on new images."""
    low, high = float(np.min(reference)), float(np.max(reference))
    dims = len(patterns.shape) - 1
    count = int(patterns.shape[0])

    def shift(x: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
        pick = tf.random.stateless_uniform(
            tf.concat([tf.shape(x)[:1], tf.ones([dims], tf.int32)], 0),
            tf.stack([tf.constant(seed * 100 + 77, tf.int64), step]),
        )
        pattern = tf.convert_to_tensor(patterns)  # one: it broadcasts over the batch
        if count > 1:
            which = tf.random.stateless_uniform(
                tf.shape(x)[:1],
                tf.stack([tf.constant(seed * 100 + 78, tf.int64), step]),
                maxval=count,
                dtype=tf.int32,
            )
            pattern = tf.gather(pattern, which)
        base = x if varied is None else varied(x, training=True)
        shifted = tf.clip_by_value(base + tf.cast(pattern, x.dtype), low, high)
        return tf.where(pick < share, shifted, x)

    return shift


def _freeze(model: keras.Model, names: tuple[str, ...]) -> None:
    layers = {layer.name: layer for layer in leaf_layers(model)}
    missing = [name for name in names if name not in layers]
    if missing:
        raise ValueError(f"no layer named {', '.join(missing)} to freeze")
    for name in names:
        layers[name].trainable = False


def _validation_loss(
    model: keras.Model, loss: keras.losses.Loss, data: LabelledData, classes: int
) -> tuple[float, float]:
    outputs = predict(model, data.x)
    labels = data.y.astype(np.float32)[:, None] if classes == 1 else data.y
    value = float(keras.ops.convert_to_numpy(loss(labels, outputs)))
    accuracy = float((predicted_classes(outputs) == data.y).mean())
    return value, accuracy


def fine_tune(
    model: keras.Model,
    train: LabelledData,
    validation: LabelledData,
    settings: FineTuneSettings,
    kind: OutputKind,
    zero_masks: list[ZeroMask] | None = None,
    trigger: LabelledData | None = None,
    on_epoch: EpochCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    teacher: keras.Model | None = None,
) -> FineTuneResult:
    """Train `model` in place for up to `settings.epochs`; return it with the best weights."""
    classes = int(model.outputs[0].shape[-1])
    loss = _loss(kind, classes)
    if settings.freeze_batchnorm:
        for layer in leaf_layers(model):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False  # Keras 3: a frozen BN also runs in inference mode
    _freeze(model, settings.frozen_layers)
    methods = (settings.feature_shift, settings.sharpness_radius, settings.unlearning_radius)
    if sum(1 for strength in methods if strength) > 1:
        raise ValueError("feature-shift, sharpness-aware and unlearning are separate methods")
    head, original_head = None, None
    trainer: keras.Model = model
    teach = None
    if settings.distillation and teacher is not None:
        teach = Teacher(teacher, settings.distillation, from_logits=kind == "logits")
    if settings.feature_shift:
        head = classifier_head(model)
        original_head = reinitialize(head, settings.seed)
        trainer = FeatureShift(model, head, original_head, settings.feature_shift, teach)
    elif settings.unlearning_radius:
        radius = perturbation_radius(train.x, settings.unlearning_radius)
        trainer = AdversarialUnlearning(model, loss, radius, teach)
    elif settings.sharpness_radius:
        trainer = SharpnessAware(model, settings.sharpness_radius, teach)
    elif teach is not None:
        trainer = Distilled(model, teach)
    trainer.compile(
        optimizer=_optimizer(
            settings, settings.epochs * -(-len(train) // settings.batch_size), model
        ),
        loss=loss,
        metrics=["accuracy"],
    )
    image_like = train.x.ndim == 4 and train.x.shape[-1] in (1, 3)
    proxy, refresher = None, None
    if settings.proxy_trigger is not None and settings.proxy_share:
        stacked = np.stack([settings.proxy_trigger, *settings.proxy_alternates])
        proxy = tf.Variable(stacked.astype(np.float32), trainable=False)
        if settings.proxy_refresh and settings.proxy_target is not None:
            refresher = ProxyRefresher(
                model,
                train.x,
                train.y,
                settings.proxy_target,
                proxy,
                settings.seed,
                from_logits=kind == "logits",
            )
    dataset = _dataset(train, settings, image_like, proxy)
    callbacks = [_KeepZeroed(model, zero_masks)] if zero_masks else []
    for callback in callbacks:
        callback.on_train_batch_end(0)  # a re-initialized head must not revive pruned inputs

    # The pruned model itself (epoch 0) is never kept: pruning alone leaves the backdoor in
    # the surviving channels, and only training on clean data removes it.
    best_weights: list[np.ndarray] | None = None
    best = (-1.0, -np.inf)
    keep_last = settings.keep_last or settings.epoch_choice == "last"
    result = FineTuneResult(
        model=model,
        method=settings.method,
        reinitialized_layer=None if head is None else str(head.name),
        selected_on="last" if keep_last else "validation",
        synthetic_triggers=settings.synthetic_triggers if image_like else 0.0,
        learning_rate=settings.learning_rate,
        sharpness_radius=settings.sharpness_radius,
        frozen_layers=settings.frozen_layers,
        proxy_share=settings.proxy_share if settings.proxy_trigger is not None else 0.0,
        seed=settings.seed,
    )
    since_best = 0
    for epoch in range(1, settings.epochs + 1):
        if should_stop is not None and should_stop():
            break
        proxy_success = None
        if refresher is not None and epoch > 1:
            proxy_success = refresher()
        fit = trainer.fit(dataset, epochs=1, verbose=0, callbacks=callbacks)
        val_loss, val_accuracy = _validation_loss(model, loss, validation, classes)
        record = {
            "epoch": epoch,
            "loss": float(fit.history["loss"][-1]),
            "accuracy": float(fit.history["accuracy"][-1]),
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
        }
        if trigger is not None:
            record["attack_success_rate"] = rate(model, trigger)
        if proxy_success is not None:
            record["proxy_success"] = proxy_success
        if head is not None and original_head is not None:
            record["head_alignment"] = alignment(head, original_head)
        result.history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        # A tie on accuracy goes to the later epoch under `latest-best`: on a slice of a
        # hundred or two images ties are common, and the later epoch has unlearned longer.
        progress = keep_last or (val_accuracy, -val_loss) > best
        latest_tie = settings.epoch_choice == "latest-best" and val_accuracy >= best[0]
        if progress or latest_tie:
            best_weights = model.get_weights()
            result.best_epoch = epoch
        if progress:  # patience counts epochs without progress, ties or not
            best = (val_accuracy, -val_loss)
            since_best = 0
        else:
            since_best += 1
            if since_best >= settings.patience:
                break
    if best_weights is not None:
        model.set_weights(best_weights)
    for layer in leaf_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = True  # the delivered model trains like the one we were given
    return result
