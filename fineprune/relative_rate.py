"""A learning rate relative to each layer's weight scale, so one setting suits every model.

Adam moves every weight by about the learning rate per step, whatever its gradient's size, so
the same rate is a large change for a layer of small weights and a small one for a layer of
large weights. Measured here: the seed CNN's kernels have an RMS of 0.017-0.06 and the small
ResNet's 0.05-0.15; at 1e-3 fine-tuning the first forgets unseen signs and the second keeps its
backdoor, while 2e-3 fixes the second and ruins the first. With a relative rate each layer's
rate is the setting times the RMS of its kernel (its largest weight when it has none): every
layer moves by the same fraction of its own scale.
"""

from __future__ import annotations

import keras
import numpy as np

from fineprune.graph import leaf_layers


def layer_scales(model: keras.Model) -> dict[str, float]:
    """Variable path -> the RMS of the weight that sets its layer's scale."""
    scales: dict[str, float] = {}
    for layer in leaf_layers(model):
        weights = layer.trainable_weights
        if not weights:
            continue
        kernel = getattr(layer, "kernel", None)
        if kernel is None or not any(kernel is w for w in weights):
            kernel = max(weights, key=lambda w: int(np.prod(w.shape)))
        value = keras.ops.convert_to_numpy(kernel)
        rms = float(np.sqrt(np.mean(np.square(value)))) if value.size else 0.0
        for weight in weights:
            scales[weight.path] = max(rms, 1e-6)
    return scales


class LayerScaledAdam(keras.optimizers.Adam):
    """Adam whose rate for each variable is multiplied by that variable's layer scale."""

    def __init__(self, learning_rate, scales: dict[str, float], **kwargs) -> None:
        super().__init__(learning_rate=learning_rate, **kwargs)
        self._scales_by_path = dict(scales)
        self._scale_list: list[float] = []

    def build(self, variables: list) -> None:
        super().build(variables)
        self._scale_list = [self._scales_by_path.get(v.path, 1.0) for v in variables]

    def update_step(self, gradient, variable, learning_rate) -> None:
        scale = self._scale_list[self._get_variable_index(variable)]
        super().update_step(gradient, variable, learning_rate * scale)
