"""The documents say what the code does: every option, setting and default is in its place."""

from __future__ import annotations

import re
from pathlib import Path

from fineprune.tune.recipe import Research
from jobs.settings import Settings
from schemas.options import SanitizeOptions

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DEFAULTS = (ROOT / "docs" / "defaults.md").read_text()


def test_the_readme_is_a_manual_of_at_most_15_kb():
    assert len(README.encode()) <= 15 * 1024
    for command in ("make run", "make test"):
        assert command in README


def test_every_public_option_is_in_the_readme_and_has_a_default_row():
    for name in SanitizeOptions.model_fields:
        assert f"| `{name}` |" in README, name
        assert f"| `{name}` |" in DEFAULTS, name


def test_every_research_setting_has_a_default_row():
    for name in Research.model_fields:
        assert re.search(rf"\| `[^|]*\b{name}\b[^|]*` \|", DEFAULTS), name


def test_every_service_setting_is_in_the_readme():
    for name in Settings.model_fields:
        assert f"FINEPRUNE_{name.upper()}" in README, name


def test_every_experiment_data_file_has_a_write_up_beside_it():
    folder = ROOT / "docs" / "experiments"
    write_ups = "\n".join(p.read_text() for p in folder.glob("*.md"))
    for data in folder.glob("*.jsonl"):
        assert data.name in write_ups, data.name
