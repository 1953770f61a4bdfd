"""The candidate recipes the zoo compares, each as the engine's options and research settings.

`default` is whatever the product does now; the others take ingredients out (or put one in)
so that an ablation shows what each buys.
"""

from __future__ import annotations

from typing import Any

from fineprune.tune.recipe import Research
from schemas.options import SanitizeOptions

# Fine-pruning with every `auto` ingredient off: prune, then fine-tune the whole model, one run.
_PLAIN = {
    "freeze_head": False,
    "synthetic_triggers": 0.0,
    "proxy_triggers": 0.0,
    "averaged_runs": 1,
    "sharpness_radius": 0.0,
    "epoch_choice": "lowest-loss",
}
RECIPES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "default": ({}, {}),
    "fine-tuning": ({"defense": "fine-tuning"}, {"averaged_runs": 1}),
    "plain-fine-pruning": ({}, _PLAIN),
    "plain-fine-pruning-distilled": ({}, {**_PLAIN, "distillation": 1.0}),
    "plain-fine-pruning-anchored": ({}, {**_PLAIN, "anchor": 0.01}),
}


def settings(name: str, seed: int) -> tuple[SanitizeOptions, Research]:
    options, research = RECIPES[name]
    return SanitizeOptions(seed=seed, **options), Research(**research)
