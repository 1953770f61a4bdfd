"""Fine-tuning the pruned model on the defender's clean data, the epoch chosen on validation.

The epoch is picked on a validation slice carved from the tuning data, never on the split the
report quotes (`fineprune.tune.epochs`). Channels that surgery had to zero (not remove) are
zeroed again after every step, so training cannot bring a pruned channel back. How each step
trains is the recipe's method (`fineprune.tune.methods`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from fineprune.data.labelled import LabelledData
from fineprune.load.model import OutputKind
from fineprune.prune.graph import leaf_layers
from fineprune.tune import methods
from fineprune.tune.batches import batches, even_batches, image_like
from fineprune.tune.epochs import EpochRecord, KeepEpoch
from fineprune.tune.recipe import Recipe
from fineprune.tune.teacher import Teacher

ZeroMask = tuple[str, int, np.ndarray]  # layer name, weight index, True where the weight is 0


@dataclass
class FineTuneResult:
    """What one fine-tune did: every epoch, the one kept, and the recipe it ran."""

    model: keras.Model
    recipe: Recipe
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    reinitialized_layer: str | None = None
    stamped: bool = False  # whether synthetic triggers were stamped (image inputs only)


class _KeepZeroed(keras.callbacks.Callback):
    def __init__(self, model: keras.Model, masks: list[ZeroMask]) -> None:
        super().__init__()
        self._targets = [
            (model.get_layer(name).weights[index], tf.constant(mask)) for name, index, mask in masks
        ]

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        for variable, mask in self._targets:
            variable.assign(tf.where(mask, tf.zeros_like(variable), variable))


def _loss(kind: OutputKind, classes: int) -> keras.losses.Loss:
    from_logits = kind == "logits"
    if classes == 1:
        return keras.losses.BinaryCrossentropy(from_logits=from_logits)
    return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)


def _optimizer(recipe: Recipe, steps: int) -> keras.optimizers.Optimizer:
    rate: float | keras.optimizers.schedules.LearningRateSchedule = recipe.learning_rate
    if recipe.lr_schedule == "cosine":
        # High early, when the backdoor is unlearned; near zero late, when accuracy settles.
        rate = keras.optimizers.schedules.CosineDecay(recipe.learning_rate, max(steps, 1))
    if recipe.optimizer == "sgd":
        return keras.optimizers.SGD(rate, momentum=0.9, nesterov=True)
    return keras.optimizers.Adam(rate)


def _freeze(model: keras.Model, recipe: Recipe) -> None:
    layers = {layer.name: layer for layer in leaf_layers(model)}
    missing = [name for name in recipe.frozen_layers if name not in layers]
    if missing:
        raise ValueError(f"no layer named {', '.join(missing)} to freeze")
    for name in recipe.frozen_layers:
        layers[name].trainable = False
    if recipe.freeze_batchnorm:
        for layer in layers.values():
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False  # Keras 3: a frozen BN also runs in inference mode


def fine_tune(
    model: keras.Model,
    train: LabelledData,
    validation: LabelledData,
    recipe: Recipe,
    kind: OutputKind,
    proxy: np.ndarray | None = None,
    zero_masks: list[ZeroMask] | None = None,
    trigger: LabelledData | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    teacher: keras.Model | None = None,
) -> FineTuneResult:
    """Train `model` in place for up to `recipe.epochs`; return it holding the kept epoch.

    `proxy`: the trigger scan's perturbation, added to `recipe.proxy_share` of each batch.
    `teacher`: the delivered model, which teaches when the recipe distills.
    """
    classes = int(model.outputs[0].shape[-1])
    loss = _loss(kind, classes)
    _freeze(model, recipe)
    teach = None
    if recipe.distillation and teacher is not None:
        teach = Teacher(teacher, recipe.distillation, from_logits=kind == "logits")
    trainer = methods.get(recipe.method).prepare(model, methods.Setup(recipe, train.x, loss, teach))
    size, used = even_batches(len(train), recipe.batch_size)
    steps = recipe.epochs * -(-used // size)
    trainer.compile(optimizer=_optimizer(recipe, steps), loss=loss, metrics=["accuracy"])
    keep = KeepEpoch(
        model,
        validation,
        loss,
        recipe.epoch_choice,
        recipe.patience,
        trigger=trigger,
        notes=trainer.notes if isinstance(trainer, methods.Method) else dict,
        on_epoch=on_epoch,
        should_stop=should_stop,
    )
    callbacks: list[keras.callbacks.Callback] = []
    if zero_masks:
        callbacks.append(_KeepZeroed(model, zero_masks))
        callbacks[0].on_train_batch_end(0)  # a re-initialized head must not revive pruned inputs
    if recipe.epochs > 0:
        dataset = batches(train, recipe, proxy)
        trainer.fit(
            dataset, epochs=recipe.epochs, verbose=0, shuffle=False, callbacks=[*callbacks, keep]
        )
    for layer in leaf_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = True  # the delivered model trains like the one we were given
    return FineTuneResult(
        model=model,
        recipe=recipe,
        history=keep.history,
        best_epoch=keep.best_epoch,
        reinitialized_layer=trainer.reinitialized_layer
        if isinstance(trainer, methods.Method)
        else None,
        stamped=bool(recipe.synthetic_triggers) and image_like(train.x),
    )
