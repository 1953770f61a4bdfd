"""The allowlist the API checks uploads with is the one the installed Keras would resolve."""

from __future__ import annotations

from pathlib import Path

from allowlist_source import derive, render

from fineprune.load.inspection import allowlist


def test_the_allowlist_file_is_what_this_keras_derives() -> None:
    """Fails after a Keras upgrade: regenerate with `python tests/allowlist_source.py`."""
    assert derive()["version"] == allowlist.KERAS_VERSION
    assert render() == Path(allowlist.__file__).read_text()


def test_nothing_that_runs_code_or_is_abstract_is_allowed() -> None:
    names = {n for kind in allowlist.CLASSES.values() for ns in kind.values() for n in ns}
    functions = {n for kind in allowlist.FUNCTIONS.values() for ns in kind.values() for n in ns}
    for refused in ("Lambda", "TFSMLayer", "TorchModuleWrapper", "JaxLayer", "FlaxLayer"):
        assert refused not in names
    assert not {"Layer", "Wrapper", "Initializer", "Loss", "Metric"} & names
    assert not {"get", "serialize", "deserialize"} & functions
    modules = {m for kind in allowlist.CLASSES.values() for m in kind}
    assert all(m == "keras" or m.startswith("keras.") for m in modules)
    assert not [
        m for m in modules if m.startswith("keras.src.") and m != "keras.src.models.functional"
    ]
