"""The tree shows the pipeline: no engine subpackage imports a later stage, the API no engine.

Read statically from the sources, so a new backward import fails here, not in review.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["load", "data", "prune", "tune", "verdict", "report"]
SHARED = {"fineprune.errors", "fineprune.text"}  # helpers every stage may use
# What the API's process may take from the engine: checks that need no TensorFlow.
API_ALLOWED = (
    "fineprune.errors",
    "fineprune.text",
    "fineprune.data",
    "fineprune.load.inspection",
    "fineprune.load.signature",
)
TF_FREE = ("fineprune.data", "fineprune.load.inspection", "fineprune.load.signature")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("stage", ORDER)
def test_a_stage_imports_only_earlier_stages(stage: str) -> None:
    allowed = {f"fineprune.{s}" for s in ORDER[: ORDER.index(stage) + 1]}
    for path in _modules(f"fineprune/{stage}"):
        for name in _imports(path):
            if not name.startswith("fineprune") or name in SHARED:
                continue
            assert any(name == a or name.startswith(a + ".") for a in allowed), (
                f"{path.relative_to(ROOT)} imports {name}, a later stage or an edge"
            )
            assert not name.startswith(("study", "service", "workers", "jobs"))


@pytest.mark.parametrize("folder", ["service", "jobs"])
def test_the_api_side_imports_no_tensorflow_and_no_engine_stage(folder: str) -> None:
    for path in _modules(folder):
        for name in _imports(path):
            assert name.split(".")[0] not in ("tensorflow", "keras"), path
            if name.startswith("fineprune"):
                assert name.startswith(API_ALLOWED), f"{path.relative_to(ROOT)} imports {name}"


def test_what_the_api_takes_from_the_engine_is_itself_free_of_tensorflow() -> None:
    for path in _modules("fineprune"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if not module.startswith(TF_FREE):
            continue
        for name in _imports(path):
            assert name.split(".")[0] not in ("tensorflow", "keras"), f"{module} imports {name}"
            if name.startswith("fineprune"):
                assert name.startswith(API_ALLOWED), f"{module} imports {name}"


def test_the_package_exports_its_public_api() -> None:
    import fineprune

    assert set(fineprune.__all__) == {
        "Client",
        "SanitizeOptions",
        "SanitizeReport",
        "__version__",
        "sanitize",
    }
    for name in fineprune.__all__:
        assert getattr(fineprune, name) is not None
    assert (ROOT / "fineprune" / "py.typed").exists()
