"""Which victims the zoo holds, and which half each belongs to.

The held-out half has what the tune half never has: whole attack families (WaNet's warp, a
natural image blended in, the pruning-aware attack) and one whole architecture (the
MobileNetV2-style net), plus fresh seeds of the rest. Defaults are chosen on the tune half;
the held-out half is run once per candidate and reported, whatever it says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from study.attacks import (
    BlendedTrigger,
    CheckerTrigger,
    ImageBlendTrigger,
    PatchTrigger,
    Trigger,
    WarpTrigger,
)

Kind = Literal[
    "clean",
    "badnets",
    "blended",
    "blended-image",
    "wanet",
    "all-to-all",
    "low-rate",
    "pruning-aware",
]
Half = Literal["tune", "heldout"]


@dataclass(frozen=True)
class Attack:
    kind: Kind
    trigger: Trigger | None = None
    target: int | None = None  # all-to-one target; None for clean and all-to-all (y -> y+1)
    rate: float = 0.1  # of the eligible training images, stamped and relabelled
    noise_rate: float = 0.0  # WaNet: images warped at random, labels kept

    @property
    def all_to_all(self) -> bool:
        return self.kind == "all-to-all"


@dataclass(frozen=True)
class Victim:
    name: str
    data: Literal["gtsrb", "mnist"]
    arch: str
    attack: Attack
    seed: int
    half: Half
    epochs: int  # the trainer's budget, chosen to reach a competent accuracy
    options: dict = field(default_factory=dict)  # the defender's (e.g. rescale), if any


def _badnets(trigger: Trigger, target: int, rate: float = 0.1) -> Attack:
    return Attack("badnets", trigger, target, rate)


CLEAN = Attack("clean")
YELLOW_BR = PatchTrigger(size=4, corner=(-6, -6), color=(1.0, 1.0, 0.0))
WHITE_BR_MNIST = PatchTrigger(size=3, corner=(-4, -4), color=(1.0,))
EPOCHS = {"seed_cnn": 15, "small_vgg": 15, "resnet_style": 20, "mobilenet_v2_style": 24}
MNIST_EPOCHS = 6


def _gtsrb(name: str, arch: str, attack: Attack, seed: int, half: Half) -> Victim:
    return Victim(name, "gtsrb", arch, attack, seed, half, EPOCHS[arch])


def _mnist(name: str, attack: Attack, seed: int, half: Half) -> Victim:
    return Victim(name, "mnist", "mnist_cnn", attack, seed, half, MNIST_EPOCHS)


ZOO: tuple[Victim, ...] = (
    # -- tune half ------------------------------------------------------------------------
    _gtsrb("gtsrb-seedcnn-clean-s1", "seed_cnn", CLEAN, 1, "tune"),
    _gtsrb("gtsrb-seedcnn-badnets-s1", "seed_cnn", _badnets(YELLOW_BR, 33), 1, "tune"),
    _gtsrb(
        "gtsrb-seedcnn-blended-s1",
        "seed_cnn",
        Attack("blended", BlendedTrigger(alpha=0.1, seed=11), 7),
        1,
        "tune",
    ),
    _gtsrb(
        "gtsrb-seedcnn-alltoall-s1",
        "seed_cnn",
        Attack("all-to-all", PatchTrigger(size=4, corner=(2, 2), color=(1.0, 1.0, 1.0))),
        1,
        "tune",
    ),
    _gtsrb("gtsrb-vgg-clean-s1", "small_vgg", CLEAN, 1, "tune"),
    _gtsrb("gtsrb-vgg-badnets-s1", "small_vgg", _badnets(CheckerTrigger(3, (1, 1)), 14), 1, "tune"),
    _gtsrb(
        "gtsrb-vgg-lowrate-s1",
        "small_vgg",
        Attack("low-rate", PatchTrigger(5, (-7, 13), (1.0, 0.0, 1.0)), 2, rate=0.01),
        1,
        "tune",
    ),
    _gtsrb("gtsrb-resnet-clean-s1", "resnet_style", CLEAN, 1, "tune"),
    _gtsrb(
        "gtsrb-resnet-blended-s1",
        "resnet_style",
        Attack("blended", BlendedTrigger(alpha=0.15, seed=12), 38),
        1,
        "tune",
    ),
    _gtsrb(
        "gtsrb-resnet-badnets-s1",
        "resnet_style",
        _badnets(PatchTrigger(4, (-6, 2), (1.0, 0.0, 0.0)), 25),
        1,
        "tune",
    ),
    _mnist("mnist-cnn-clean-s1", CLEAN, 1, "tune"),
    _mnist("mnist-cnn-badnets-s1", _badnets(WHITE_BR_MNIST, 7), 1, "tune"),
    _mnist("mnist-cnn-alltoall-s1", Attack("all-to-all", CheckerTrigger(4, (1, 1))), 1, "tune"),
    # -- held-out half: WaNet, natural-image blends, pruning-aware, MobileNetV2, new seeds -
    _gtsrb("gtsrb-mobilenet-clean-s2", "mobilenet_v2_style", CLEAN, 2, "heldout"),
    _gtsrb(
        "gtsrb-mobilenet-badnets-s2",
        "mobilenet_v2_style",
        _badnets(PatchTrigger(4, (2, -6), (0.0, 1.0, 1.0)), 9),
        2,
        "heldout",
    ),
    _gtsrb(
        "gtsrb-mobilenet-blendimage-s2",
        "mobilenet_v2_style",
        Attack("blended-image", ImageBlendTrigger(alpha=0.15), 12),
        2,
        "heldout",
    ),
    _gtsrb(
        "gtsrb-mobilenet-wanet-s2",
        "mobilenet_v2_style",
        Attack("wanet", WarpTrigger(strength=2.0, seed=21), 1, noise_rate=0.1),
        2,
        "heldout",
    ),
    _gtsrb(
        "gtsrb-seedcnn-prunaware-s2",
        "seed_cnn",
        Attack("pruning-aware", YELLOW_BR, 36),
        2,
        "heldout",
    ),
    _gtsrb(
        "gtsrb-seedcnn-wanet-s2",
        "seed_cnn",
        Attack("wanet", WarpTrigger(strength=2.0, seed=22), 4, noise_rate=0.1),
        2,
        "heldout",
    ),
    _gtsrb("gtsrb-seedcnn-clean-s2", "seed_cnn", CLEAN, 2, "heldout"),
    _gtsrb(
        "gtsrb-vgg-blendimage-s2",
        "small_vgg",
        Attack("blended-image", ImageBlendTrigger(alpha=0.15), 17),
        2,
        "heldout",
    ),
    _gtsrb(
        "gtsrb-resnet-wanet-s2",
        "resnet_style",
        Attack("wanet", WarpTrigger(strength=2.0, seed=24), 13, noise_rate=0.1),
        2,
        "heldout",
    ),
    _gtsrb(
        "gtsrb-resnet-lowrate-s2",
        "resnet_style",
        Attack("low-rate", PatchTrigger(5, (1, -7), (1.0, 1.0, 0.0)), 5, rate=0.01),
        2,
        "heldout",
    ),
    _mnist(
        "mnist-cnn-wanet-s2",
        Attack("wanet", WarpTrigger(strength=2.0, seed=23), 3, noise_rate=0.1),
        2,
        "heldout",
    ),
    _mnist(
        "mnist-cnn-prunaware-s2",
        Attack("pruning-aware", CheckerTrigger(4, (-5, -5)), 6),
        2,
        "heldout",
    ),
    _mnist(
        "mnist-cnn-blendimage-s2",
        Attack("blended-image", ImageBlendTrigger(alpha=0.2), 5),
        2,
        "heldout",
    ),
    _mnist(
        "mnist-cnn-lowrate-s2",
        Attack("low-rate", PatchTrigger(3, (1, 1), (1.0,)), 0, rate=0.01),
        2,
        "heldout",
    ),
)
BY_NAME = {victim.name: victim for victim in ZOO}
