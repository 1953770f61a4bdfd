"""`fineprune sanitize`: the defense on this machine, with progress bars and a summary."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fineprune.cli.flags import build_options, with_option_flags
from fineprune.cli.gate import FailOnOpt, MaxAsrOpt, check_gate_options, gate_report
from fineprune.cli.output import err, fail, quiet_tensorflow, require_files
from fineprune.report.summary import interval, verdict_line

ModelArg = Annotated[Path, typer.Argument(help="Untrusted model: a .keras or legacy .h5 file.")]
DataOpt = Annotated[
    Path,
    typer.Option(
        "--data",
        help="Clean data .npz: x (inputs), y (labels), optionally groups (each sample's "
        "source, e.g. a video or track: the holdout then takes whole groups).",
    ),
]
TriggerOpt = Annotated[
    Path | None,
    typer.Option(help="Suspect triggered samples .npz (x, and y_target or target): measured only."),
]
TestOpt = Annotated[
    Path | None, typer.Option(help="Clean .npz from other sources to report accuracy on.")
]


@with_option_flags
def sanitize(
    model: ModelArg,
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", help="Directory for the model and the report.")],
    trigger_data: TriggerOpt = None,
    test_data: TestOpt = None,
    fail_on: FailOnOpt = None,
    max_asr: MaxAsrOpt = None,
    mlflow_uri: Annotated[
        str | None,
        typer.Option(metavar="URI", help="Log the run to this MLflow tracking URI."),
    ] = None,
    options: dict[str, Any] | None = None,
) -> None:
    """Prune the least active channels of a layer, fine-tune, and report what it cost in
    OUT (sanitized.keras, report.json, report.html, report.png)."""
    chosen = build_options(options)
    require_files(model=model, data=data, trigger_data=trigger_data, test_data=test_data)
    check_gate_options(max_asr, trigger_data)

    quiet_tensorflow()
    from fineprune.errors import FinePruneError
    from fineprune.pipeline import STAGES
    from fineprune.pipeline import sanitize as run

    def go(progress=None):
        return run(
            model, data, out, chosen, trigger_data=trigger_data, test_data=test_data,
            progress=progress,
        )  # fmt: skip

    try:
        with Progress(
            TextColumn("{task.description:<10}"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TimeElapsedColumn(),
            console=err,
        ) as bars:
            tasks = {s: bars.add_task(s, total=1.0, visible=False) for s in STAGES}
            report = go(lambda stage, f: bars.update(tasks[stage], completed=f, visible=True))
    except FinePruneError as exc:
        fail(exc.message)
    except MemoryError:
        fail("out of memory; try fewer samples")
    _print_summary(report, out)
    if mlflow_uri:
        from fineprune.report.tracking import log_run

        try:
            err.print(f"mlflow run: {log_run(report, out, mlflow_uri)}", highlight=False)
        except FinePruneError as exc:
            fail(exc.message)
    gate_report(report, fail_on, max_asr)


def _with_interval(m) -> str:
    span = interval(m)
    return f"{m.value:.2%}" + (f" [{span}]" if span else "") + f" n={m.samples}"


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
        row = [name, _with_interval(metrics.clean_accuracy)]
        if has_asr:
            row.append(_with_interval(metrics.attack_success_rate))
        table.add_row(*row)
    console.print(table)
    console.print(
        f"parameters {report.input_model.parameters:,} -> {report.output_model.parameters:,}; "
        f"model: {out / 'sanitized.keras'}; report: {out / 'report.html'}",
        highlight=False,
    )
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    console.print(verdict_line(report), highlight=False, markup=False, soft_wrap=True)


def scan(
    model: ModelArg,
    data: DataOpt,
    trigger_data: TriggerOpt = None,
    rescale: Annotated[
        str | None, typer.Option(metavar="FACTOR", help="Multiply inputs first (1/255).")
    ] = None,
    fail_on: FailOnOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the verdict as JSON.")] = False,
) -> None:
    """Look for a backdoor's signature without changing the model (defense none); exit 3 with
    --fail-on when one is found."""
    chosen = build_options({"defense": "none", **({"rescale": rescale} if rescale else {})})
    require_files(model=model, data=data, trigger_data=trigger_data)
    quiet_tensorflow()
    from fineprune.errors import FinePruneError
    from fineprune.pipeline import sanitize as run

    with tempfile.TemporaryDirectory(prefix="fineprune-scan-") as out:
        try:
            report = run(model, data, out, chosen, trigger_data=trigger_data)
        except FinePruneError as exc:
            fail(exc.message)
    if as_json:
        verdict = report.verdict.model_dump_json(indent=2) if report.verdict else "null"
        sys.stdout.write(verdict + "\n")
    else:
        Console().print(verdict_line(report), highlight=False, markup=False, soft_wrap=True)
    gate_report(report, fail_on, None)
