"""The static inspection within bounds, whatever the file and whoever asks: in this process
when it already runs under memory and CPU limits (a job's process), else in a short-lived
capped process (`bounded`). Free of Keras, so the worker's own process can check a job's output.
"""

from __future__ import annotations

import dataclasses
import resource
from pathlib import Path

from fineprune.errors import InvalidModelError, UnsafeModelError
from fineprune.load.inspection import ModelFileInfo, bounded, info_from_json, inspect_model_file
from fineprune.load.inspection.limits import Limits

INSPECT_ENTRY = "fineprune.load.inspection:inspect_request"
CHECK_MEMORY_BYTES = 1024**3
"""Heap of the process that inspects a model for a process with no memory limit of its own."""
CHECK_SECONDS = 60


def inspect_bounded(path: Path, limits: Limits) -> ModelFileInfo:
    """The static inspection, within bounds whatever the file: in this process when it has
    memory and CPU limits of its own (a job's process), else in a capped process (`bounded`)."""
    if _capped():
        return inspect_model_file(path, limits)
    process = bounded.ProcessLimits(
        memory_bytes=CHECK_MEMORY_BYTES,
        cpu_seconds=CHECK_SECONDS,
        wall_seconds=CHECK_SECONDS,
        file_bytes=limits.weights_file_bytes + 1024**2,
    )
    request = {"path": str(Path(path).resolve()), "limits": dataclasses.asdict(limits)}
    try:
        answer = bounded.run(INSPECT_ENTRY, request, process, stopping=lambda: False)
    except bounded.SandboxFailure as exc:
        raise UnsafeModelError(f"the model was refused: {exc.reason}") from None
    if "error" in answer:
        error = answer["error"]
        kind = UnsafeModelError if error["kind"] == UnsafeModelError.kind else InvalidModelError
        raise kind(error["message"])
    return info_from_json(answer["info"])


def _capped() -> bool:
    """Does this process run under finite heap and CPU limits (as a job's process does)?"""
    for which in (resource.RLIMIT_DATA, resource.RLIMIT_CPU):
        soft, _ = resource.getrlimit(which)
        if soft == resource.RLIM_INFINITY:
            return False
    return True
