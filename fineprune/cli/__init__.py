"""The `fineprune` command line: sanitize here, or submit to the service and follow the job.

The engine is imported only inside the commands, so `fineprune --help` answers at once and
TensorFlow's start-up noise is silenced before it can print.
"""

from __future__ import annotations

from typing import Annotated

import typer

from fineprune.cli import local, remote, serve

app = typer.Typer(
    help="Remove backdoors from untrusted Keras models with fine-pruning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from fineprune import __version__

        typer.echo(f"fineprune {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Remove backdoors from untrusted Keras models with fine-pruning."""


app.command()(local.sanitize)
app.command()(local.scan)
app.command()(remote.submit)
app.command()(remote.status)
app.command()(remote.download)
app.command()(remote.cancel)
app.command()(serve.serve)
app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
    serve.worker
)
app.command("schema", hidden=True)(serve.schema)

__all__ = ["app"]
