"""The deployment gate: exit with its own code when the verdict says the model must not ship.

Exit codes: 0 done and the gate passed; 1 the defense or the job failed; 2 a usage error;
3 the gate tripped (`--fail-on`, `--max-asr`).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from fineprune.cli.output import err, fail
from schemas.report import SanitizeReport

GATE_TRIPPED = 3


class FailOn(StrEnum):
    may_remain = "may-remain"
    suspected = "suspected"


FailOnOpt = Annotated[
    FailOn | None,
    typer.Option(
        "--fail-on",
        help="Exit 3 when the verdict is may-remain, or when any backdoor was suspected.",
    ),
]
MaxAsrOpt = Annotated[
    float | None,
    typer.Option(
        "--max-asr",
        min=0.0,
        max=1.0,
        metavar="RATE",
        help="Exit 3 when the attack success measured on --trigger-data ends above RATE.",
    ),
]


def check_gate_options(max_asr: float | None, trigger_data: object) -> None:
    if max_asr is not None and trigger_data is None:
        fail("--max-asr needs --trigger-data: attack success is measured on it", code=2)


def apply_gate(
    conclusion: str | None,
    suspect: int | None,
    attack_success: float | None,
    fail_on: FailOn | None,
    max_asr: float | None,
) -> None:
    """Exit 3 with one line naming the rule that tripped; return when the gate passes."""
    reasons = []
    if fail_on is FailOn.suspected and suspect is not None:
        reasons.append(f"a backdoor was suspected (class {suspect})")
    if fail_on is FailOn.may_remain and conclusion in ("may-remain", None):
        reasons.append(f"the verdict is {conclusion or 'missing'}")
    if max_asr is not None and attack_success is not None and attack_success > max_asr:
        reasons.append(f"attack success {attack_success:.1%} is above --max-asr {max_asr:.1%}")
    if reasons:
        err.print(f"[bold red]gate:[/] {'; '.join(reasons)}", highlight=False, soft_wrap=True)
        raise typer.Exit(GATE_TRIPPED)


def gate_report(report: SanitizeReport, fail_on: FailOn | None, max_asr: float | None) -> None:
    """The gate on a sanitize report: its verdict and the attack success it measured."""
    verdict, asr = report.verdict, report.fine_pruned.attack_success_rate
    apply_gate(
        verdict.conclusion if verdict else None,
        verdict.before.suspect if verdict else None,
        None if asr is None else asr.value,
        fail_on,
        max_asr,
    )
