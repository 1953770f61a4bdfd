"""Cheap checks of uploaded inputs, run for the API before a job is queued.

They read the model's container and config, the .npz directory, the .npy headers and the
labels (a few bytes per sample), never the inputs: a bad upload is refused in milliseconds
instead of minutes later in a worker. `check_inputs` runs them in a bounded process of their
own (`fineprune.load.inspection.bounded`), never in the API's; `run_checks` is what that
process runs.
No TensorFlow or Keras here; the engine repeats every check when it really loads the data.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fineprune.data.labelled import (
    check_clean_classes,
    check_groups,
    prepare_labels,
    trigger_targets,
)
from fineprune.data.npz import ArrayHeader, read_npz_headers
from fineprune.errors import FinePruneError, InvalidDataError, InvalidModelError, UnsafeModelError
from fineprune.load.inspection import (
    Limits,
    ModelFileInfo,
    bounded,
    inspect_model_file,
    layer_index,
)
from fineprune.load.signature import ModelSignature
from fineprune.text import one_line
from jobs.settings import Settings, get_settings
from schemas.options import SanitizeOptions

log = logging.getLogger(__name__)

CHECKS_ENTRY = "jobs.checks:run_checks"
"""What the bounded process runs for `check_inputs`."""
MIN_CLEAN_SAMPLES = 20
MAX_LABEL_BYTES = 64 * 1024**2
"""Labels up to this size are read at submit (range, classes); bigger ones only by the worker."""


class InputRejected(Exception):
    """An upload that cannot make a job: which form field, what kind, and why."""

    def __init__(self, field: str, kind: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.kind = kind
        self.message = message


def check_model(path: Path, limits: Limits | None = None) -> ModelFileInfo:
    """Format by magic bytes, container limits, the allowlist and the weight budget."""
    try:
        return inspect_model_file(path, limits)
    except FinePruneError as exc:
        raise InputRejected("model", exc.kind, exc.message) from exc
    except MemoryError:
        raise  # the bounded process answers it for the field being checked
    except Exception as exc:  # a parser choking on a hostile file is still the file's fault
        log.warning("model inspection failed unexpectedly", exc_info=True)
        raise InputRejected(
            "model",
            InvalidModelError.kind,
            f"the model file could not be read: {one_line(exc, with_type=True)}",
        ) from exc


def _check_x(x: ArrayHeader, role: str, input_shape: tuple[int | None, ...] | None) -> None:
    if x.dtype.kind not in "uif":
        raise InvalidDataError(f"{role} x has dtype {x.dtype}; expected numbers")
    if len(x.shape) < 1 or x.shape[0] == 0:
        raise InvalidDataError(f"{role} x holds no samples")
    if input_shape is None:
        return
    expected = tuple(input_shape[1:])
    got = x.shape[1:]
    fits = len(got) == len(expected) and all(
        e is None or e == g for e, g in zip(expected, got, strict=True)
    )
    if not fits:
        shown = tuple("any" if e is None else e for e in expected)
        raise InvalidDataError(
            f"{role} x has shape {x.shape}, i.e. samples of shape {got}, "
            f"but the model expects samples of shape {shown}"
        )


def _check_labels(
    y: ArrayHeader, n: int, role: str, key: str, units: int | None, scalar_ok: bool
) -> None:
    if y.dtype.kind not in "iuf":
        raise InvalidDataError(f"{role} {key} has dtype {y.dtype}; expected integer labels")
    if scalar_ok and math.prod(y.shape) == 1:
        return
    if y.shape[:1] != (n,):
        count = y.shape[0] if y.shape else 0
        raise InvalidDataError(f"{role} has {n} samples in x but {count} labels in {key}")
    if len(y.shape) == 2 and units is not None and y.shape[1] != max(units, 2):
        raise InvalidDataError(
            f"{role} {key} is one-hot with {y.shape[1]} columns but the model has "
            f"{max(units, 2)} outputs"
        )
    if len(y.shape) > 2:
        raise InvalidDataError(f"{role} {key} has shape {y.shape}; expected (samples,)")


def _check_label_values(
    path: Path, role: str, key: str, header: ArrayHeader, n: int, units: int | None
) -> None:
    """Label range and class counts, as the engine checks them, from the (small) label array.

    Labels are a few bytes per sample, so reading them here spares a queued job that would
    fail in the worker. Skipped when the config does not state the class count plainly or the
    labels are unusually big: the worker still checks everything.
    """
    if units is None or header.nbytes > MAX_LABEL_BYTES:
        return
    with np.load(path, allow_pickle=False) as npz:
        y = npz[key]
    if role == "trigger":
        y = trigger_targets(y, n)
    labels = prepare_labels(y, n, ModelSignature(input_shape=(), classes=units), role)
    if role == "clean":
        check_clean_classes(labels)


def check_labelled(path: Path, role: str, field: str, info: ModelFileInfo) -> int:
    """Clean or test data: members `x` and `y` that fit the model; returns the sample count."""
    try:
        headers = read_npz_headers(path, role, {"x", "y", "groups"})
        missing = [k for k in ("x", "y") if k not in headers]
        if missing:
            raise InvalidDataError(
                f"{role} data lacks {', '.join(repr(m) for m in missing)}; "
                "an .npz with arrays 'x' and 'y' is expected"
            )
        _check_x(headers["x"], role, info.input_shape)
        n = headers["x"].shape[0]
        _check_labels(headers["y"], n, role, "y", info.output_units, scalar_ok=False)
        _check_label_values(path, role, "y", headers["y"], n, info.output_units)
        if "groups" in headers:
            check_groups(headers["groups"].dtype, headers["groups"].shape, n, role)
    except FinePruneError as exc:
        raise InputRejected(field, exc.kind, exc.message) from exc
    except MemoryError:
        raise
    except Exception as exc:
        raise _unreadable(field, role, exc) from exc
    return n


def check_trigger(path: Path, info: ModelFileInfo) -> int:
    """Trigger data: `x` and the attacker's target, `y_target` or `target` (one or per row)."""
    try:
        headers = read_npz_headers(path, "trigger", {"x", "y_target", "target"})
        key = "y_target" if "y_target" in headers else "target"
        if "x" not in headers or key not in headers:
            raise InvalidDataError(
                "trigger data needs arrays 'x' and 'y_target' (or 'target'); "
                f"it holds {', '.join(repr(k) for k in headers) or 'none of them'}"
            )
        _check_x(headers["x"], "trigger", info.input_shape)
        n = headers["x"].shape[0]
        _check_labels(headers[key], n, "trigger", key, info.output_units, scalar_ok=True)
        _check_label_values(path, "trigger", key, headers[key], n, info.output_units)
    except FinePruneError as exc:
        raise InputRejected("trigger_data", exc.kind, exc.message) from exc
    except MemoryError:
        raise
    except Exception as exc:
        raise _unreadable("trigger_data", "trigger", exc) from exc
    return n


def _unreadable(field: str, role: str, exc: Exception) -> InputRejected:
    """A parser choking on a hostile .npz: still a bad upload (422), never a 500."""
    log.warning("%s data check failed unexpectedly", role, exc_info=True)
    return InputRejected(
        field,
        InvalidDataError.kind,
        f"{role} data could not be read: {one_line(exc, with_type=True)}",
    )


PRUNABLE_CLASSES = ("Conv1D", "Conv2D", "Conv3D", "Dense")


def check_layer_option(info: ModelFileInfo, options: SanitizeOptions | None) -> None:
    """A `layer` option must name a prunable layer of this model: known before any queueing."""
    if options is None or options.layer is None or not options.prunes:
        return
    layers = layer_index(info.config)
    kind = layers.get(options.layer)
    if kind is None:
        shown = ", ".join(list(layers)[:30])
        raise InputRejected(
            "options", "pruning", f"no layer named {options.layer!r} in the model (layers: {shown})"
        )
    if kind not in PRUNABLE_CLASSES:
        raise InputRejected(
            "options",
            "pruning",
            f"layer {options.layer!r} is a {kind}; only {', '.join(PRUNABLE_CLASSES)} layers "
            "can be pruned",
        )


def check_inputs_here(
    paths: dict[str, Path],
    options: SanitizeOptions | None = None,
    limits: Limits | None = None,
    stage: Callable[[str], None] = lambda field: None,
) -> ModelFileInfo:
    """Every cheap check of one submission, in this process; raises InputRejected naming the
    bad field. `stage` hears each field before it is checked."""
    stage("model")
    info = check_model(paths["model"], limits)
    check_layer_option(info, options)
    stage("data")
    n = check_labelled(paths["data"], "clean", "data", info)
    if n < MIN_CLEAN_SAMPLES:
        raise InputRejected(
            "data",
            InvalidDataError.kind,
            f"clean data has {n} samples; at least {MIN_CLEAN_SAMPLES} are needed",
        )
    if "test_data" in paths:
        stage("test_data")
        check_labelled(paths["test_data"], "test", "test_data", info)
    if "trigger_data" in paths:
        stage("trigger_data")
        check_trigger(paths["trigger_data"], info)
    return info


@dataclass(frozen=True)
class CheckedInputs:
    """What the checks learnt of an accepted submission (the config stays in the check)."""

    format: str
    layers: int
    parameters: int
    weight_bytes: int


def model_limits(settings: Settings) -> Limits:
    """The bounds on an uploaded model: the weight budget from the settings."""
    if settings.max_weight_bytes is not None:
        return Limits(weight_bytes=settings.max_weight_bytes)
    if settings.job_memory_bytes:
        return Limits.for_memory(settings.job_memory_bytes)
    return Limits.for_this_process()


def check_inputs(
    paths: dict[str, Path],
    options: SanitizeOptions | None = None,
    settings: Settings | None = None,
) -> CheckedInputs:
    """Every cheap check of one submission, in a bounded process; raises InputRejected.

    The process may use `check_memory_bytes` of heap and `check_seconds` of CPU and wall
    time; an upload that needs more is refused for its field (422), whatever it is.
    """
    settings = settings or get_settings()
    limits = model_limits(settings)
    request = {
        "paths": {name: str(Path(path).resolve()) for name, path in paths.items()},
        "options": None if options is None else options.model_dump(mode="json"),
        "limits": {name: getattr(limits, name) for name in limits.__dataclass_fields__},
    }
    process = bounded.ProcessLimits(
        memory_bytes=settings.check_memory_bytes,
        cpu_seconds=max(1, math.ceil(settings.check_seconds)),
        wall_seconds=settings.check_seconds,
        file_bytes=limits.weights_file_bytes + 1024**2,
    )
    try:
        answer = bounded.run(
            CHECKS_ENTRY, request, process, concurrency=settings.check_concurrency, spare=1
        )
    except bounded.SandboxFailure as exc:
        field = exc.stage or "model"
        kind = UnsafeModelError.kind if field == "model" else InvalidDataError.kind
        raise InputRejected(field, kind, f"the {_role(field)} was refused: {exc.reason}") from None
    if "rejected" in answer:
        rejected = answer["rejected"]
        raise InputRejected(rejected["field"], rejected["kind"], rejected["message"])
    return CheckedInputs(**answer["accepted"])


def run_checks(request: dict[str, Any], stage: Callable[[str], None]) -> dict[str, Any]:
    """The bounded process's side: the request from `check_inputs` in, a JSON answer out."""
    paths = {name: Path(path) for name, path in request["paths"].items()}
    options = request.get("options")
    limits = Limits(**request["limits"])
    current = ["model"]

    def at(field: str) -> None:
        current[0] = field
        stage(field)

    try:
        info = check_inputs_here(
            paths,
            None if options is None else SanitizeOptions.model_validate(options),
            limits,
            at,
        )
    except InputRejected as exc:
        return {"rejected": {"field": exc.field, "kind": exc.kind, "message": exc.message}}
    except MemoryError:
        field = current[0]
        kind = UnsafeModelError.kind if field == "model" else InvalidDataError.kind
        message = (
            f"the {_role(field)} was refused: checking it needed more memory than the check may use"
        )
        return {"rejected": {"field": field, "kind": kind, "message": message}}
    accepted = CheckedInputs(
        info.format, len(info.layer_classes), info.parameters, info.weight_bytes
    )
    return {"accepted": accepted.__dict__}


def _role(field: str) -> str:
    return {"model": "model", "data": "clean data", "test_data": "test data"}.get(
        field, "trigger data"
    )
