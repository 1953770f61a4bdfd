"""The defenses the study compares, as the engine's options plus its research settings.

The product offers fine-pruning and its two halves; the study also runs the published
alternatives the project measured against them (FT-SAM, FST, BAU), each alone and after pruning.
"""

from __future__ import annotations

from typing import Any

from fineprune.tune.recipe import Research
from schemas.options import SanitizeOptions
from schemas.report import V1_DEFENSES

# name -> (defense, research method), in the order the study's table lists them
DEFENSES: dict[str, tuple[str, str]] = {
    "pruning": ("pruning", "plain"),
    "fine-tuning": ("fine-tuning", "plain"),
    "fine-pruning": ("fine-pruning", "plain"),
    **V1_DEFENSES,
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
