"""Backdoor attacks, to test the defense against: BadNets patches, blends and warps.

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


@dataclass(frozen=True)
class CheckerTrigger:
    """A black-and-white checkerboard patch: a BadNets pattern that is not one colour."""

    size: int = 5
    corner: tuple[int, int] = (1, 1)

    def apply(self, x: np.ndarray) -> np.ndarray:
        out = np.array(x, dtype=np.float32, copy=True)
        height, width = out.shape[1:3]
        top, left = self.corner[0] % height, self.corner[1] % width
        rows, cols = np.indices((self.size, self.size))
        board = ((rows + cols) % 2).astype(np.float32)[..., None]
        out[:, top : top + self.size, left : left + self.size, :] = board
        return out


@dataclass(frozen=True)
class ImageBlendTrigger:
    """A natural photograph mixed into the whole image (Chen et al. 2017's "Hello Kitty" key):
    matplotlib's sample portrait, resized to the input and made grey for one-channel inputs."""

    alpha: float = 0.15
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def pattern(self, shape: tuple[int, ...]) -> np.ndarray:
        if shape not in self._cache:
            from matplotlib import cbook
            from PIL import Image

            with cbook.get_sample_data("grace_hopper.jpg") as fh:
                image = Image.open(fh).convert("RGB" if shape[-1] == 3 else "L")
                image = image.resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, np.float32) / 255.0
            self._cache[shape] = pixels.reshape(shape)
        return self._cache[shape]

    def apply(self, x: np.ndarray) -> np.ndarray:
        pattern = self.pattern(tuple(x.shape[1:]))
        return ((1.0 - self.alpha) * x + self.alpha * pattern).astype(np.float32)


@dataclass(frozen=True)
class WarpTrigger:
    """WaNet (Nguyen and Tran, ICLR 2021): a smooth, nearly invisible warp of the whole image.

    A random k x k field of offsets, upsampled to the image and scaled to `strength` pixels at
    most, moves every pixel a little; the image is resampled bilinearly. `noise` draws another
    random field around it: WaNet's "noise mode" images keep their labels, so the model
    learns this one warp, not warping in general.
    """

    grid: int = 4
    strength: float = 0.5
    seed: int = 0
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def offsets(self, height: int, width: int) -> np.ndarray:
        key = (height, width)
        if key not in self._cache:
            coarse = np.random.default_rng(self.seed).uniform(-1, 1, (2, self.grid, self.grid))
            coarse /= np.abs(coarse).mean()
            self._cache[key] = _upsample(coarse, height, width) * self.strength
        return self._cache[key]

    def apply(self, x: np.ndarray, extra: np.ndarray | None = None) -> np.ndarray:
        height, width = x.shape[1:3]
        offsets = self.offsets(height, width)
        if extra is not None:
            offsets = offsets[None] + extra
        return _warp(np.asarray(x, np.float32), offsets)

    def noise(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """WaNet's noise mode: the warp plus a random one, each image its own."""
        height, width = x.shape[1:3]
        extra = rng.uniform(-1, 1, (len(x), 2, height, width)).astype(np.float32)
        return self.apply(x, extra * self.strength)


def _upsample(coarse: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic-free smooth upsampling: bilinear interpolation of a (2, k, k) field."""
    k = coarse.shape[-1]
    rows = np.linspace(0, k - 1, height)
    cols = np.linspace(0, k - 1, width)
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    r1, c1 = np.minimum(r0 + 1, k - 1), np.minimum(c0 + 1, k - 1)
    fr, fc = (rows - r0)[:, None], (cols - c0)[None, :]
    top = coarse[:, r0][:, :, c0] * (1 - fc) + coarse[:, r0][:, :, c1] * fc
    bottom = coarse[:, r1][:, :, c0] * (1 - fc) + coarse[:, r1][:, :, c1] * fc
    return (top * (1 - fr) + bottom * fr).astype(np.float32)


def _warp(x: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Resample `x` (n, h, w, c) at each pixel plus `offsets` ((2, h, w) or (n, 2, h, w):
    row and column shifts in pixels), bilinearly, clamped at the border."""
    n, height, width, _ = x.shape
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    offsets = np.broadcast_to(offsets, (n, 2, height, width))
    r = np.clip(rows[None] + offsets[:, 0], 0, height - 1)
    c = np.clip(cols[None] + offsets[:, 1], 0, width - 1)
    r0, c0 = np.floor(r).astype(int), np.floor(c).astype(int)
    r1, c1 = np.minimum(r0 + 1, height - 1), np.minimum(c0 + 1, width - 1)
    fr, fc = (r - r0)[..., None], (c - c0)[..., None]
    batch = np.arange(n)[:, None, None]
    out = (
        x[batch, r0, c0] * (1 - fr) * (1 - fc)
        + x[batch, r0, c1] * (1 - fr) * fc
        + x[batch, r1, c0] * fr * (1 - fc)
        + x[batch, r1, c1] * fr * fc
    )
    return out.astype(np.float32)


Trigger = PatchTrigger | BlendedTrigger | CheckerTrigger | ImageBlendTrigger | WarpTrigger


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
