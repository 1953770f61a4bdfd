"""The `fineprune` command line.

The engine is imported only inside the commands, so `fineprune --help` answers at once and
TensorFlow's start-up noise is silenced before it can print.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from schemas.options import SanitizeOptions

app = typer.Typer(
    help="Remove backdoors from untrusted Keras models with fine-pruning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
FIELDS = SanitizeOptions.model_fields


def _help(name: str) -> str:
    return FIELDS[name].description or ""


def _default(name: str):
    return FIELDS[name].default


def _quiet_tensorflow() -> None:
    """Keep TensorFlow's start-up chatter and retracing notices off the user's terminal."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="keras")


def _parse_rescale(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(Fraction(value))
    except (ValueError, ZeroDivisionError) as exc:
        raise typer.BadParameter(f"{value!r} is not a number or fraction like 1/255") from exc


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.callback()
def main() -> None:
    """Remove backdoors from untrusted Keras models with fine-pruning."""


@app.command()
def sanitize(
    model: Annotated[Path, typer.Argument(help="Untrusted model: a .keras or legacy .h5 file.")],
    data: Annotated[
        Path, typer.Option("--data", help="Clean data .npz with x (inputs) and y (labels).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Directory for the model and the report.")],
    trigger_data: Annotated[
        Path | None,
        typer.Option(
            help="Suspect triggered samples .npz (x and y_target or target): measures ASR."
        ),
    ] = None,
    test_data: Annotated[
        Path | None,
        typer.Option(
            help="Separate clean .npz to report accuracy on, instead of a held-out split."
        ),
    ] = None,
    defense: Annotated[str, typer.Option(help=_help("defense"))] = _default("defense"),
    layer: Annotated[str | None, typer.Option(help=_help("layer"))] = None,
    max_accuracy_drop: Annotated[float, typer.Option(help=_help("max_accuracy_drop"))] = _default(
        "max_accuracy_drop"
    ),
    prune_fraction: Annotated[float | None, typer.Option(help=_help("prune_fraction"))] = None,
    rescale: Annotated[
        str | None, typer.Option(help=_help("rescale") + " Fractions allowed.")
    ] = None,
    holdout_fraction: Annotated[float, typer.Option(help=_help("holdout_fraction"))] = _default(
        "holdout_fraction"
    ),
    validation_fraction: Annotated[
        float, typer.Option(help=_help("validation_fraction"))
    ] = _default("validation_fraction"),
    epochs: Annotated[int, typer.Option(help=_help("epochs"))] = _default("epochs"),
    learning_rate: Annotated[float, typer.Option(help=_help("learning_rate"))] = _default(
        "learning_rate"
    ),
    optimizer: Annotated[str, typer.Option(help=_help("optimizer"))] = _default("optimizer"),
    batch_size: Annotated[int, typer.Option(help=_help("batch_size"))] = _default("batch_size"),
    augment: Annotated[bool, typer.Option(help=_help("augment"))] = _default("augment"),
    patience: Annotated[int, typer.Option(help=_help("patience"))] = _default("patience"),
    seed: Annotated[int, typer.Option(help=_help("seed"))] = _default("seed"),
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the report as JSON on stdout; no progress bars.")
    ] = False,
) -> None:
    """Prune the least active channels of a layer, fine-tune, and report what it cost."""
    from pydantic import ValidationError

    try:
        options = SanitizeOptions(
            defense=defense,
            layer=layer,
            max_accuracy_drop=max_accuracy_drop,
            prune_fraction=prune_fraction,
            rescale=_parse_rescale(rescale),
            holdout_fraction=holdout_fraction,
            validation_fraction=validation_fraction,
            epochs=epochs,
            learning_rate=learning_rate,
            optimizer=optimizer,
            batch_size=batch_size,
            augment=augment,
            patience=patience,
            seed=seed,
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors()
        )
        fail(problems, code=2)
    for label, path in (
        ("model", model),
        ("data", data),
        ("trigger data", trigger_data),
        ("test data", test_data),
    ):
        if path is not None and not path.is_file():
            fail(f"{label} file {str(path)!r} does not exist", code=2)

    _quiet_tensorflow()
    from fineprune.errors import FinePruneError
    from fineprune.pipeline import STAGES, Inputs
    from fineprune.pipeline import sanitize as run_sanitize

    inputs = Inputs(model, data, trigger_data, test_data)
    try:
        if as_json:
            report = run_sanitize(inputs, out, options)
        else:
            with Progress(
                TextColumn("{task.description:<10}"),
                BarColumn(),
                TextColumn("{task.percentage:>5.1f}%"),
                TimeElapsedColumn(),
                console=err,
            ) as bars:
                tasks = {s: bars.add_task(s, total=1.0, visible=False) for s in STAGES}

                def progress(stage: str, fraction: float) -> None:
                    bars.update(tasks[stage], completed=fraction, visible=True)

                report = run_sanitize(inputs, out, options, progress=progress)
    except FinePruneError as exc:
        fail(exc.message)
    except MemoryError:
        fail("out of memory; try fewer samples")

    if as_json:
        sys.stdout.write(report.model_dump_json(indent=2) + "\n")
        return
    _print_summary(report, out)


def _print_summary(report, out: Path) -> None:
    console = Console()
    table = Table(title=f"fineprune: {report.decision.reason}", title_justify="left")
    table.add_column("stage")
    table.add_column(f"clean accuracy ({report.baseline.clean_accuracy.split})", justify="right")
    has_asr = report.baseline.attack_success_rate is not None
    if has_asr:
        table.add_column("attack success", justify="right")
    for name, metrics in (
        ("baseline", report.baseline),
        ("pruned", report.pruned),
        ("fine-pruned", report.fine_pruned),
    ):
        row = [name, f"{metrics.clean_accuracy.value:.2%}"]
        if has_asr:
            row.append(f"{metrics.attack_success_rate.value:.2%}")
        table.add_row(*row)
    console.print(table)
    console.print(
        f"parameters {report.input_model.parameters:,} -> {report.output_model.parameters:,}; "
        f"model: {out / 'sanitized.keras'}; report: {out / 'report.html'}"
    )
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {warning}")


@app.command("schema", hidden=True)
def schema() -> None:
    """Print the JSON schema of the report."""
    from schemas.report import SanitizeReport

    sys.stdout.write(json.dumps(SanitizeReport.model_json_schema(), indent=2) + "\n")


if __name__ == "__main__":
    app()
