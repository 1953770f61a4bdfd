"""Which fine-tuning epoch is kept: a Keras callback that scores each epoch on the validation
slice, keeps the weights of the best one, and stops after `patience` epochs without progress.

The pruned model itself (epoch 0) is never kept: pruning alone leaves the backdoor in the
surviving channels, and only training on clean data removes it.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np

from fineprune.data.labelled import LabelledData
from fineprune.load.model import predict, predicted_classes, rate
from fineprune.tune.recipe import EpochChoice

EpochRecord = dict[str, float]


class KeepEpoch(keras.callbacks.Callback):
    """Records every epoch and restores the kept one when training ends.

    `choice`: among the epochs at the best validation accuracy, the one with the lowest
    validation loss (`lowest-loss`) or the latest (`latest-best`: a slice of a hundred or two
    images ties often, and the later epoch has unlearned longer); or `last`: every epoch runs
    and the last is kept, the validation slice only reported.
    """

    def __init__(
        self,
        model: keras.Model,
        validation: LabelledData,
        loss: keras.losses.Loss,
        choice: EpochChoice,
        patience: int,
        trigger: LabelledData | None = None,
        notes: Callable[[], dict[str, float]] = dict,
        on_epoch: Callable[[EpochRecord], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        super().__init__()
        self.tuned = model  # the model being sanitized (the trainer may wrap it)
        self.validation = validation
        self.loss = loss
        self.choice = choice
        self.patience = patience
        self.trigger = trigger
        self.notes = notes
        self.on_epoch = on_epoch
        self.should_stop = should_stop or (lambda: False)
        self.history: list[EpochRecord] = []
        self.best_epoch = 0
        self._best = (-1.0, -np.inf)
        self._best_weights: list[np.ndarray] | None = None
        self._since_best = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if self.should_stop():
            self.model.stop_training = True

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        val_loss, val_accuracy = self._validate()
        record: EpochRecord = {
            "epoch": epoch + 1,
            "loss": float(logs["loss"]),
            "accuracy": float(logs["accuracy"]),
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
        }
        if self.trigger is not None:
            record["attack_success_rate"] = rate(self.tuned, self.trigger.x, self.trigger.y)
        record.update(self.notes())
        self.history.append(record)
        if self.on_epoch is not None:
            self.on_epoch(record)
        keep_last = self.choice == "last"
        progress = keep_last or (val_accuracy, -val_loss) > self._best
        latest_tie = self.choice == "latest-best" and val_accuracy >= self._best[0]
        if progress or latest_tie:
            self._best_weights = self.tuned.get_weights()
            self.best_epoch = epoch + 1
        if progress:  # patience counts epochs without progress, ties or not
            self._best = (val_accuracy, -val_loss)
            self._since_best = 0
        else:
            self._since_best += 1
            if self._since_best >= self.patience:
                self.model.stop_training = True

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._best_weights is not None:
            self.tuned.set_weights(self._best_weights)

    def _validate(self) -> tuple[float, float]:
        outputs = predict(self.tuned, self.validation.x)
        binary = outputs.ndim == 2 and outputs.shape[1] == 1
        labels = self.validation.y.astype(np.float32)[:, None] if binary else self.validation.y
        value = float(keras.ops.convert_to_numpy(self.loss(labels, outputs)))
        accuracy = float((predicted_classes(outputs) == self.validation.y).mean())
        return value, accuracy
