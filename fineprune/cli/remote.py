"""`fineprune submit | status | download | cancel`: the REST service from a shell or a pipeline."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fineprune.cli.flags import build_options, with_option_flags
from fineprune.cli.gate import FailOnOpt, MaxAsrOpt, check_gate_options, gate_report
from fineprune.cli.local import DataOpt, ModelArg, TestOpt, TriggerOpt
from fineprune.cli.output import err, fail, require_files
from fineprune.report.summary import verdict_line

Url = Annotated[
    str | None,
    typer.Option(
        "--url", envvar="FINEPRUNE_URL", help=r"API base URL \[default: http://127.0.0.1:8000]."
    ),
]
ApiKey = Annotated[
    str | None, typer.Option("--api-key", envvar="FINEPRUNE_API_KEY", help="Bearer API key.")
]
AsJson = Annotated[bool, typer.Option("--json", help="Print the job resource as JSON.")]


def _client(url: str | None, api_key: str | None):
    from fineprune.client import Client

    return Client(url, api_key)


def _api_call(fn):
    """Run a client call; turn API and connection errors into one line and a non-zero exit."""
    from fineprune.client import ApiError, JobFailed, ServiceUnreachable

    try:
        return fn()
    except ApiError as exc:
        fail(f"{exc.status} {exc.code}: {exc.message}")
    except (JobFailed, ServiceUnreachable, TimeoutError) as exc:
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
        if s.conclusion:
            suspect = "" if s.suspect is None else f" (class {s.suspect} suspected)"
            line += f"  verdict {s.conclusion}{suspect}"
    Console().print(line, highlight=False, soft_wrap=True)


@with_option_flags
def submit(
    model: ModelArg,
    data: DataOpt,
    trigger_data: TriggerOpt = None,
    test_data: TestOpt = None,
    callback_url: Annotated[str | None, typer.Option(help="POSTed the job when it ends.")] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="Retry-safe submit key.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the job to its end.")] = False,
    out: Annotated[
        Path | None, typer.Option(help="With --wait: download the sanitized model here.")
    ] = None,
    fail_on: FailOnOpt = None,
    max_asr: MaxAsrOpt = None,
    url: Url = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
    options: dict[str, Any] | None = None,
) -> None:
    """Submit a model to the service; with --wait, follow it to the end (exit 1 if it fails)."""
    chosen = build_options(options)
    require_files(model=model, data=data, trigger_data=trigger_data, test_data=test_data)
    check_gate_options(max_asr, trigger_data)
    if (fail_on or max_asr is not None) and not wait:
        fail("--fail-on and --max-asr judge the finished job: add --wait", code=2)
    with _client(url, api_key) as client:
        job = _api_call(
            lambda: client.submit(
                model,
                data,
                trigger_data=trigger_data,
                test_data=test_data,
                options=chosen,
                callback_url=callback_url,
                idempotency_key=idempotency_key,
            )
        )
        if wait:
            job = _wait(client, job.id, quiet=as_json)
            if out is not None:
                written = _api_call(lambda: client.download_model(job.id, out))
                err.print(f"sanitized model: {written}", highlight=False)
        _print_job(job, as_json)
        if wait:
            report = _api_call(lambda: client.report(job.id))
            if not as_json:
                Console().print(verdict_line(report), highlight=False, markup=False, soft_wrap=True)
            gate_report(report, fail_on, max_asr)


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


def download(
    job_id: Annotated[str, typer.Argument(help="A succeeded job.")],
    out: Annotated[
        Path, typer.Option(help="Directory (files named by the job id) or file for the model.")
    ] = Path("."),
    report: Annotated[
        bool, typer.Option(help="Also fetch the report: .json, .html and .png, by job id.")
    ] = False,
    url: Url = None,
    api_key: ApiKey = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the paths as JSON.")] = False,
) -> None:
    """Download the sanitized model (and the report)."""
    with _client(url, api_key) as client:
        paths = {"model": _api_call(lambda: client.download_model(job_id, out))}
        if report:
            folder = out if out.is_dir() else paths["model"].parent
            found = _api_call(lambda: client.download_reports(job_id, folder))
            paths.update({f"report_{kind}": path for kind, path in found.items()})
    if as_json:
        sys.stdout.write(json.dumps({k: str(v) for k, v in paths.items()}) + "\n")
        return
    for name, path in paths.items():
        Console().print(f"{name}: {path}", highlight=False)


def cancel(
    job_id: Annotated[str, typer.Argument(help="The job to cancel and delete.")],
    url: Url = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Cancel a queued or running job and delete its artifacts."""
    with _client(url, api_key) as client:
        _print_job(_api_call(lambda: client.cancel(job_id)), as_json)
