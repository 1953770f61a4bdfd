"""The bounded process checks of untrusted files run in: answers, deadlines, limits, leftovers.

Real processes throughout (`bounded` starts `python -m fineprune.load.inspection.bounded`);
the inputs are the hostile corpus's builders, the numbers generous bounds, not timings.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from factories import save_npz, textures
from hostile_models import (
    add_unconnected,
    edit_keras_config,
    identity_towers,
    slow_layer_names,
    tiny_functional,
    tiny_model,
    vlen_config_bomb,
)

from fineprune.errors import UnsafeModelError
from fineprune.load.inspection import Limits, bounded
from fineprune.load.loading import inspect_bounded
from jobs.checks import CHECKS_ENTRY, CheckedInputs, InputRejected, check_inputs
from jobs.settings import Settings


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sandbox")
    x, y = textures(40, seed=3)
    model = root / "tiny.keras"
    tiny_model(channels=3, classes=4).save(model)
    legacy = root / "tiny.h5"
    tiny_model(channels=3, classes=4).save(legacy)
    flat = root / "flat.keras"
    keras.Sequential([keras.Input((1,)), keras.layers.Dense(4, name="out")]).save(flat)
    return {
        "flat": flat,
        "model": model,
        "legacy": legacy,
        "data": save_npz(root / "data.npz", x=x, y=y),
        "slow": slow_layer_names(legacy, root / "slow.h5"),
        "vlen": vlen_config_bomb(legacy, root / "vlen.h5"),
        "towers": edit_keras_config(
            tiny_functional(root / "functional.keras"),
            root / "towers.keras",
            add_unconnected(*identity_towers()),
        ),
    }


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def _children() -> set[int]:
    """Processes this test process started that are still alive (not zombies)."""
    me = os.getpid()
    found = set()
    for task in Path(f"/proc/{me}/task").iterdir():
        for pid in (task / "children").read_text().split():
            status = Path(f"/proc/{pid}/status")
            if status.exists() and "State:\tZ" not in status.read_text():
                found.add(int(pid))
    return found


def test_a_good_submission_is_accepted_in_the_process(files: dict[str, Path]) -> None:
    checked = check_inputs({"model": files["model"], "data": files["data"]}, None, settings())
    parameters = tiny_model(channels=3, classes=4).count_params()
    assert checked == CheckedInputs("keras", 5, parameters, 4 * parameters)


def test_a_refusal_comes_back_with_its_field_and_words(files: dict[str, Path]) -> None:
    with pytest.raises(InputRejected) as info:
        check_inputs({"model": files["vlen"], "data": files["data"]}, None, settings())
    assert (info.value.field, info.value.kind) == ("model", "unsafe_model")
    assert "lists 16384 strings" in info.value.message


def test_names_that_point_at_more_data_than_the_file_holds_are_refused(
    files: dict[str, Path],
) -> None:
    """2,000 names, each the same 3 MiB heap object: HDF5 would convert 6 GiB to read them."""
    started = time.monotonic()
    with pytest.raises(InputRejected) as info:
        check_inputs({"model": files["slow"], "data": files["data"]}, None, settings())
    assert info.value.field == "model"
    assert "'layer_names'" in info.value.message
    assert time.monotonic() - started < 30


def test_a_check_past_its_deadline_is_killed_and_refused(files: dict[str, Path]) -> None:
    """The same names under a heap that holds them: only the deadline ends the read."""
    before = _children()
    started = time.monotonic()
    with pytest.raises(InputRejected) as info:
        check_inputs(
            {"model": files["slow"], "data": files["data"]},
            None,
            settings(check_seconds=1, check_memory_bytes=8 * 1024**3),
        )
    took = time.monotonic() - started
    assert info.value.field == "model"
    assert "took" in info.value.message
    assert took < 30, took
    time.sleep(0.5)
    assert _children() - before <= spares(), "a killed check left a process behind"


def test_a_process_without_limits_inspects_in_a_bounded_one(files: dict[str, Path]) -> None:
    """The command line's process has no heap limit: its inspection runs capped elsewhere."""
    with pytest.raises(UnsafeModelError, match="'layer_names'"):
        inspect_bounded(files["slow"], Limits())
    assert inspect_bounded(files["model"], Limits()).format == "keras"


def spares() -> set[int]:
    """The warm spare the pool keeps (one, waiting on stdin)."""
    return {child.proc.pid for child in bounded._POOL._idle}


def test_a_check_out_of_memory_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    """60 MiB of labels are read to check their range: more than a 160 MiB heap can hold."""
    x = np.zeros((7_864_320, 1), np.uint8)
    y = np.arange(len(x)) % 4
    data = save_npz(tmp_path / "big.npz", x=x, y=y)
    request = {
        "paths": {"model": str(files["flat"]), "data": str(data)},
        "options": None,
        "limits": dataclasses.asdict(Limits()),
    }
    process = bounded.ProcessLimits(160 * 1024**2, 20, 20.0, 1024**3)
    answer = bounded.run(CHECKS_ENTRY, request, process)
    assert answer["rejected"]["field"] == "data", answer
    assert "needed more memory than the check may use" in answer["rejected"]["message"]


def test_the_limits_come_from_the_request_and_cpu_is_capped(files: dict[str, Path]) -> None:
    """A walk over 43,200 layers allowed by the request's limits, under a 1 s CPU cap."""
    request = {
        "paths": {"model": str(files["towers"]), "data": str(files["data"])},
        "options": None,
        "limits": dataclasses.asdict(Limits(layers=10**6, nesting=10**3)),
    }
    process = bounded.ProcessLimits(512 * 1024**2, 1, 0.05, 1024**3)
    with pytest.raises(bounded.SandboxFailure) as info:
        bounded.run(CHECKS_ENTRY, request, process)
    assert info.value.stage == "model"
    assert "took" in info.value.reason


def test_a_stopping_server_ends_the_check_at_once(files: dict[str, Path]) -> None:
    request = {
        "paths": {"model": str(files["slow"]), "data": str(files["data"])},
        "options": None,
        "limits": dataclasses.asdict(Limits()),
    }
    process = bounded.ProcessLimits(512 * 1024**2, 30, 30.0, 1024**3)
    started = time.monotonic()
    with pytest.raises(bounded.SandboxFailure, match="shutting down"):
        bounded.run(
            CHECKS_ENTRY, request, process, stopping=lambda: time.monotonic() - started > 0.5
        )
    assert time.monotonic() - started < 10


def test_the_process_inherits_no_secret() -> None:
    parent = {
        "PATH": "/usr/bin",
        "FINEPRUNE_API_KEYS": "key",
        "FINEPRUNE_CALLBACK_SECRET": "secret",
        "REDIS_URL": "redis://x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "PYTHONPATH": "/extra",
    }
    env = bounded._child_environment(parent)
    assert not {k for k in env if "FINEPRUNE" in k or "SECRET" in k or "REDIS" in k}
    assert env["PATH"] == "/usr/bin" and env["PYTHONPATH"].endswith("/extra")
    assert env["HDF5_PLUGIN_PRELOAD"] == "::"
