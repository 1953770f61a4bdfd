"""`python -m fineprune`: the same command line as `fineprune`."""

from fineprune.cli import app

app(prog_name="fineprune")
