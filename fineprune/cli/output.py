"""What every command shares: one-line errors on stderr, and TensorFlow kept quiet."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console

err = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True, markup=True)
    raise typer.Exit(code)


_BRANCHES = {"float": "a number", "int": "a whole number", "literal['auto']": "auto"}


def fail_options(exc: ValidationError) -> NoReturn:
    """One line naming every invalid option (exit 2, a usage error).

    A value that fits none of a union's types (`--epochs many`) is said once, not per type.
    """
    said: dict[str, str] = {}
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]] or ["options"]
        name = loc[0]
        if len(loc) > 1 and loc[1] in _BRANCHES:
            kinds = [_BRANCHES[e["loc"][1]] for e in exc.errors() if e["loc"][:1] == (name,)]
            said[name] = f"{name}: {error['input']!r} is neither {' nor '.join(kinds)}"
        else:
            said.setdefault(".".join(loc), f"{'.'.join(loc)}: {error['msg']}")
    fail("; ".join(said.values()), code=2)


def require_files(**named: Path | None) -> None:
    for label, path in named.items():
        if path is not None and not path.is_file():
            fail(f"{label.replace('_', ' ')} file {str(path)!r} does not exist", code=2)


def quiet_tensorflow() -> None:
    """Keep TensorFlow's start-up chatter and retracing notices off the user's terminal."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="keras")
