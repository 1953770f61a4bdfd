"""Backdoor attacks, to test the defense against: BadNets patch and blended triggers.

Everything here works on inputs as the model consumes them (floats, usually 0..1). The defense
never imports this module: a defender has no trigger; only the study, the benchmarks and the
tests play the attacker.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class PatchTrigger:
    """A solid square stamped on the image (BadNets): a sticker on a stop sign."""

    size: int = 4
    corner: tuple[int, int] = (-5, -5)  # top-left of the patch; negative counts from the end
    color: tuple[float, ...] = (1.0, 1.0, 0.0)

    def apply(self, x: np.ndarray) -> np.ndarray:
        out = np.array(x, dtype=np.float32, copy=True)
        height, width = out.shape[1:3]
        top = self.corner[0] % height
        left = self.corner[1] % width
        color = np.asarray(self.color, dtype=np.float32)[: out.shape[-1]]
        out[:, top : top + self.size, left : left + self.size, :] = color
        return out


@dataclass(frozen=True)
class BlendedTrigger:
    """A fixed random pattern mixed into the whole image at a low ratio (Chen et al. 2017)."""

    alpha: float = 0.1
    seed: int = 1234
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def pattern(self, shape: tuple[int, ...]) -> np.ndarray:
        if shape not in self._cache:
            self._cache[shape] = np.random.default_rng(self.seed).random(shape).astype(np.float32)
        return self._cache[shape]

    def apply(self, x: np.ndarray) -> np.ndarray:
        pattern = self.pattern(tuple(x.shape[1:]))
        return ((1.0 - self.alpha) * x + self.alpha * pattern).astype(np.float32)


Trigger = PatchTrigger | BlendedTrigger


def poison(
    x: np.ndarray,
    y: np.ndarray,
    trigger: Trigger,
    target: int,
    rate: float,
    seed: int,
    source_classes: tuple[int, ...] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stamp `rate` of the eligible samples and relabel them `target`; returns x, y, mask.

    Eligible: samples of `source_classes` (all classes but the target when None).
    """
    eligible = y != target if source_classes is None else np.isin(y, source_classes)
    rng = np.random.default_rng(seed)
    candidates = np.flatnonzero(eligible)
    count = round(rate * len(candidates))
    chosen = rng.choice(candidates, size=count, replace=False)
    mask = np.zeros(len(x), dtype=bool)
    mask[chosen] = True
    x_out = np.array(x, dtype=np.float32, copy=True)
    x_out[mask] = trigger.apply(x_out[mask])
    y_out = np.where(mask, target, y)
    return x_out, y_out, mask


def triggered(
    x: np.ndarray,
    y: np.ndarray,
    trigger: Trigger,
    target: int,
    source_classes: tuple[int, ...] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The attacker's test set: eligible samples with the trigger, and the target label."""
    eligible = y != target if source_classes is None else np.isin(y, source_classes)
    x_t = trigger.apply(x[eligible])
    return x_t, np.full(len(x_t), target, dtype=np.int64)
