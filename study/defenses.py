"""The defenses the study compares, as the engine's options plus its research settings.

The product offers fine-pruning and its two halves; the study also runs the published
alternatives the project measured against them (FT-SAM, FST, BAU), each alone and after pruning.
"""

from __future__ import annotations

from typing import Any

from fineprune.tune.recipe import Research
from schemas.options import SanitizeOptions

METHODS = {
    "sam": "sharpness-aware",
    "fst": "feature-shift",
    "bau": "adversarial-unlearning",
}
# name -> (defense, research method)
DEFENSES: dict[str, tuple[str, str]] = {
    "pruning": ("pruning", "plain"),
    "fine-tuning": ("fine-tuning", "plain"),
    "fine-pruning": ("fine-pruning", "plain"),
    "ft-sam": ("fine-tuning", METHODS["sam"]),
    "fine-pruning-sam": ("fine-pruning", METHODS["sam"]),
    "fst": ("fine-tuning", METHODS["fst"]),
    "fine-pruning-fst": ("fine-pruning", METHODS["fst"]),
    "bau": ("fine-tuning", METHODS["bau"]),
    "fine-pruning-bau": ("fine-pruning", METHODS["bau"]),
}


def defense_settings(
    name: str, options: dict[str, Any] | None = None, research: dict[str, Any] | None = None
) -> tuple[SanitizeOptions, Research]:
    """The options and research settings that run the study's defense `name`."""
    defense, method = DEFENSES[name]
    return (
        SanitizeOptions(defense=defense, **(options or {})),
        Research(method=method, **(research or {})),
    )
