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
from collections.abc import Callable
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
    rich_markup_mode=None,
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


def _parse_auto(value: str, convert: Callable[[str], float], example: str) -> float | str:
    """A number (`convert` parses it), or 'auto' (the options that adapt to the model)."""
    if value.strip().lower() == "auto":
        return "auto"
    try:
        return convert(value)
    except ValueError as exc:
        raise typer.BadParameter(f"{value!r} is neither a number like {example} nor auto") from exc


def _parse_switch(value: str) -> bool | str:
    word = value.strip().lower()
    if word == "auto":
        return "auto"
    if word in ("yes", "true", "on", "1"):
        return True
    if word in ("no", "false", "off", "0"):
        return False
    raise typer.BadParameter(f"{value!r} is none of yes, no, auto")


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _fail_options(exc) -> None:
    """One line naming every invalid option (exit 2, a usage error)."""
    fail(
        "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors()),
        code=2,
    )


def _require_files(
    model: Path, data: Path, trigger_data: Path | None, test_data: Path | None
) -> None:
    named = {"model": model, "data": data, "trigger data": trigger_data, "test data": test_data}
    for label, path in named.items():
        if path is not None and not path.is_file():
            fail(f"{label} file {str(path)!r} does not exist", code=2)


@app.callback()
def main() -> None:
    """Remove backdoors from untrusted Keras models with fine-pruning."""


@app.command()
def sanitize(
    model: Annotated[Path, typer.Argument(help="Untrusted model: a .keras or legacy .h5 file.")],
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            help="Clean data .npz with x (inputs), y (labels) and optionally groups "
            "(each sample's source: the holdout takes whole groups).",
        ),
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
    epochs: Annotated[str, typer.Option(metavar="N|auto", help=_help("epochs"))] = str(
        _default("epochs")
    ),
    learning_rate: Annotated[
        str, typer.Option(metavar="RATE|auto", help=_help("learning_rate"))
    ] = str(_default("learning_rate")),
    optimizer: Annotated[str, typer.Option(help=_help("optimizer"))] = _default("optimizer"),
    lr_schedule: Annotated[str, typer.Option(help=_help("lr_schedule"))] = _default("lr_schedule"),
    batch_size: Annotated[int, typer.Option(help=_help("batch_size"))] = _default("batch_size"),
    augment: Annotated[bool, typer.Option(help=_help("augment"))] = _default("augment"),
    synthetic_triggers: Annotated[
        str,
        typer.Option(metavar="SHARE|auto", help=_help("synthetic_triggers")),
    ] = str(_default("synthetic_triggers")),
    freeze_head: Annotated[
        str, typer.Option(metavar="yes|no|auto", help=_help("freeze_head"))
    ] = str(_default("freeze_head")),
    proxy_triggers: Annotated[
        str, typer.Option(metavar="SHARE|auto", help=_help("proxy_triggers"))
    ] = str(_default("proxy_triggers")),
    proxy_scale: Annotated[float, typer.Option(help=_help("proxy_scale"))] = _default(
        "proxy_scale"
    ),
    proxy_directions: Annotated[int, typer.Option(help=_help("proxy_directions"))] = _default(
        "proxy_directions"
    ),
    proxy_augment: Annotated[bool, typer.Option(help=_help("proxy_augment"))] = _default(
        "proxy_augment"
    ),
    proxy_refresh: Annotated[bool, typer.Option(help=_help("proxy_refresh"))] = _default(
        "proxy_refresh"
    ),
    patience: Annotated[int, typer.Option(help=_help("patience"))] = _default("patience"),
    epoch_choice: Annotated[str, typer.Option(help=_help("epoch_choice"))] = _default(
        "epoch_choice"
    ),
    freeze_batchnorm: Annotated[bool, typer.Option(help=_help("freeze_batchnorm"))] = _default(
        "freeze_batchnorm"
    ),
    sharpness_radius: Annotated[
        str, typer.Option(metavar="RADIUS|auto", help=_help("sharpness_radius"))
    ] = str(_default("sharpness_radius")),
    shift_strength: Annotated[float, typer.Option(help=_help("shift_strength"))] = _default(
        "shift_strength"
    ),
    unlearning_radius: Annotated[float, typer.Option(help=_help("unlearning_radius"))] = _default(
        "unlearning_radius"
    ),
    distillation: Annotated[
        str, typer.Option(metavar="WEIGHT|auto", help=_help("distillation"))
    ] = str(_default("distillation")),
    fst_fallback: Annotated[bool, typer.Option(help=_help("fst_fallback"))] = _default(
        "fst_fallback"
    ),
    averaged_runs: Annotated[
        str, typer.Option(metavar="N|auto", help=_help("averaged_runs"))
    ] = str(_default("averaged_runs")),
    extrapolation: Annotated[
        str, typer.Option(metavar="T|auto", help=_help("extrapolation"))
    ] = str(_default("extrapolation")),
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
            epochs=_parse_auto(epochs, int, "10"),
            learning_rate=_parse_auto(learning_rate, float, "1e-3"),
            optimizer=optimizer,
            lr_schedule=lr_schedule,
            batch_size=batch_size,
            augment=augment,
            synthetic_triggers=_parse_auto(synthetic_triggers, float, "0.5"),
            freeze_head=_parse_switch(freeze_head),
            proxy_triggers=_parse_auto(proxy_triggers, float, "0.25"),
            proxy_scale=proxy_scale,
            proxy_directions=proxy_directions,
            proxy_augment=proxy_augment,
            proxy_refresh=proxy_refresh,
            patience=patience,
            epoch_choice=epoch_choice,
            freeze_batchnorm=freeze_batchnorm,
            sharpness_radius=_parse_auto(sharpness_radius, float, "0.2"),
            shift_strength=shift_strength,
            unlearning_radius=unlearning_radius,
            distillation=_parse_auto(distillation, float, "1"),
            fst_fallback=fst_fallback,
            averaged_runs=_parse_auto(averaged_runs, int, "3"),
            extrapolation=_parse_auto(extrapolation, float, "1.25"),
            seed=seed,
        )
    except ValidationError as exc:
        _fail_options(exc)
    _require_files(model, data, trigger_data, test_data)

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


# -- the service: submit, poll, download ------------------------------------------------------

Url = Annotated[str | None, typer.Option("--url", envvar="FINEPRUNE_URL", help="API base URL.")]
ApiKey = Annotated[
    str | None, typer.Option("--api-key", envvar="FINEPRUNE_API_KEY", help="Bearer API key.")
]
AsJson = Annotated[bool, typer.Option("--json", help="Print the job resource as JSON.")]


def _client(url: str | None, api_key: str | None):
    from fineprune.client import Client

    return Client(url, api_key)


def _api_call(fn):
    """Run a client call; turn API and connection errors into one line and a non-zero exit."""
    import httpx

    from fineprune.client import ApiError, JobFailed

    try:
        return fn()
    except ApiError as exc:
        fail(f"{exc.status} {exc.code}: {exc.message}")
    except JobFailed as exc:
        fail(str(exc))
    except httpx.TransportError as exc:
        fail(f"cannot reach the service: {exc}")
    except TimeoutError as exc:
        fail(str(exc))


def _print_job(job, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(job.model_dump_json(indent=2) + "\n")
        return
    line = f"{job.id}  {job.state.value}"
    if job.progress.stage and not job.state.final:
        line += f"  {job.progress.stage} {job.progress.percent:.0f}%"
    if job.error:
        line += f"  {job.error.kind}: {job.error.message}"
    if job.summary:
        s = job.summary
        line += (
            f"  accuracy {s.clean_accuracy_before:.2%} -> {s.clean_accuracy_after:.2%}"
            f" ({s.accuracy_split})"
        )
        if s.attack_success_before is not None and s.attack_success_after is not None:
            line += f"  attack {s.attack_success_before:.2%} -> {s.attack_success_after:.2%}"
    Console().print(line, highlight=False, soft_wrap=True)


def _parse_settings(pairs: list[str], rescale: str | None) -> dict:
    options: dict = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in FIELDS:
            fail(f"--set {pair!r}: expected NAME=VALUE with NAME one of {', '.join(FIELDS)}", 2)
        options[name] = value
    if rescale is not None:
        options["rescale"] = _parse_rescale(rescale)
    return options


@app.command()
def submit(
    model: Annotated[Path, typer.Argument(help="Untrusted model: a .keras or legacy .h5 file.")],
    data: Annotated[Path, typer.Option("--data", help="Clean data .npz (x, y, optional groups).")],
    trigger_data: Annotated[
        Path | None, typer.Option(help="Suspect triggered samples .npz.")
    ] = None,
    test_data: Annotated[
        Path | None, typer.Option(help="Separate clean .npz to report on.")
    ] = None,
    rescale: Annotated[str | None, typer.Option(help=_help("rescale"))] = None,
    settings: Annotated[
        list[str] | None,
        typer.Option("--set", help="Any sanitize option as NAME=VALUE, e.g. --set epochs=10."),
    ] = None,
    callback_url: Annotated[str | None, typer.Option(help="POSTed the job when it ends.")] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="Retry-safe submit key.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the job, with progress.")] = False,
    out: Annotated[Path | None, typer.Option(help="With --wait: download the model here.")] = None,
    url: Url = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Submit a model to the service; with --wait, follow it to the end (exit 1 if it fails)."""
    from pydantic import ValidationError

    try:
        options = SanitizeOptions(**_parse_settings(settings or [], rescale))
    except ValidationError as exc:
        _fail_options(exc)
    _require_files(model, data, trigger_data, test_data)
    with _client(url, api_key) as client:
        job = _api_call(
            lambda: client.submit(
                model,
                data,
                trigger_data=trigger_data,
                test_data=test_data,
                options=options,
                callback_url=callback_url,
                idempotency_key=idempotency_key,
            )
        )
        if wait:
            job = _wait(client, job.id, quiet=as_json)
            if out is not None:
                _api_call(lambda: client.download_model(job.id, out))
        _print_job(job, as_json)


def _wait(client, job_id: str, quiet: bool):
    if quiet:
        return _api_call(lambda: client.wait(job_id))
    with Progress(
        TextColumn("{task.description:<24}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TimeElapsedColumn(),
        console=err,
    ) as bars:
        task = bars.add_task("queued", total=100.0)

        def update(job) -> None:
            stage = job.progress.stage or job.state.value
            bars.update(task, completed=job.progress.percent, description=f"{job_id[:8]} {stage}")

        return _api_call(lambda: client.wait(job_id, on_update=update))


@app.command()
def status(
    job_id: Annotated[str | None, typer.Argument(help="A job id; none lists your jobs.")] = None,
    url: Url = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Show one job, or list your jobs (newest first)."""
    with _client(url, api_key) as client:
        if job_id is not None:
            _print_job(_api_call(lambda: client.get(job_id)), as_json)
            return
        page = _api_call(lambda: client.list(limit=50))
        if as_json:
            sys.stdout.write(page.model_dump_json(indent=2) + "\n")
            return
        for job in page.items:
            _print_job(job, False)


@app.command()
def download(
    job_id: Annotated[str, typer.Argument(help="A succeeded job.")],
    out: Annotated[Path, typer.Option(help="File or directory for the model.")] = Path("."),
    report: Annotated[bool, typer.Option(help="Also fetch report.html and report.json.")] = False,
    url: Url = None,
    api_key: ApiKey = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the paths as JSON.")] = False,
) -> None:
    """Download the sanitized model (and optionally the report)."""
    with _client(url, api_key) as client:
        paths = {"model": str(_api_call(lambda: client.download_model(job_id, out)))}
        if report:
            folder = Path(paths["model"]).parent
            paths["report_html"] = str(_api_call(lambda: client.download_report(job_id, folder)))
            json_path = folder / "report.json"
            json_path.write_text(_api_call(lambda: client.report(job_id)).model_dump_json(indent=2))
            paths["report_json"] = str(json_path)
    if as_json:
        sys.stdout.write(json.dumps(paths) + "\n")
        return
    for name, path in paths.items():
        Console().print(f"{name}: {path}", highlight=False)


@app.command()
def cancel(
    job_id: Annotated[str, typer.Argument(help="The job to cancel and delete.")],
    url: Url = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Cancel a queued or running job and delete its artifacts."""
    with _client(url, api_key) as client:
        _print_job(_api_call(lambda: client.cancel(job_id)), as_json)


@app.command()
def serve(
    with_worker: Annotated[
        bool, typer.Option(help="Also start one worker (embedded mode without REDIS_URL).")
    ] = True,
) -> None:
    """Start the API (settings from the environment: REDIS_URL, ARTIFACTS_DIR, PORT...)."""
    if with_worker:
        from service.run import main as run_all

        run_all()
        return
    import uvicorn

    from jobs.settings import get_settings
    from service.main import create_app

    settings = get_settings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(ctx: typer.Context) -> None:
    """Start a Celery worker; extra arguments go to `celery worker` (--queues ...)."""
    from workers.app import app as celery_app

    celery_app.worker_main(["worker", "--concurrency", "1", *ctx.args])


@app.command("schema", hidden=True)
def schema() -> None:
    """Print the JSON schema of the report."""
    from schemas.report import SanitizeReport

    sys.stdout.write(json.dumps(SanitizeReport.model_json_schema(), indent=2) + "\n")


if __name__ == "__main__":
    app()
