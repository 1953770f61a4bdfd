"""What a report says, read for people: shared by the figure, the page and the command line."""

from __future__ import annotations

import math

from schemas.report import SanitizeReport, StageMetrics

TITLE_MAX_CHARS = 60
MINUS = "\N{MINUS SIGN}"  # typographic minus reads better than a hyphen


def percent(value: float | None) -> str:
    """One decimal, the precision the underlying sample counts can support."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value * 100:.1f} %"


def shorten(text: str, limit: int = TITLE_MAX_CHARS) -> str:
    """Untrusted layer names can be arbitrarily long; a title must stay on one line."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def report_stages(report: SanitizeReport) -> list[tuple[str, StageMetrics]]:
    """The stages that actually ran, in order; the last one describes the delivered model."""
    stages = [("input model", report.baseline)]
    if report.options.prunes:
        stages.append(("pruned", report.pruned))
    if report.fine_tuning is not None:
        stages.append(
            ("fine-pruned" if report.options.prunes else "fine-tuned", report.fine_pruned)
        )
    return stages


def chosen_fraction(report: SanitizeReport) -> float | None:
    """Where the decision sits on the curve; None when nothing was profiled."""
    surgery = report.surgery
    if surgery is None or surgery.channels_before <= 0:
        return None
    return report.decision.pruned / surgery.channels_before


def baseline_tune_accuracy(report: SanitizeReport) -> float | None:
    """The threshold rule is applied to tune accuracy of the unpruned model (k = 0)."""
    for point in report.curve:
        if point.pruned == 0:
            return point.tune_accuracy
    return report.curve[0].tune_accuracy if report.curve else None


def accuracy_threshold(report: SanitizeReport) -> float | None:
    """The line the decision was not allowed to cross, as a fraction; None for other rules."""
    if report.decision.rule != "max_accuracy_drop":
        return None
    base = baseline_tune_accuracy(report)
    if base is None:
        return None
    return base - report.options.max_accuracy_drop / 100.0


def verdict_line(report: SanitizeReport) -> str:
    """The report's first line, in words: what a pipeline acts on."""
    verdict = report.verdict
    if verdict is None:
        return "Verdict: none (the detector could not run; see the warnings)"
    return f"Verdict: {verdict.conclusion}: {verdict.reason}"


def interval(m) -> str:
    """A Measurement's 95 % interval, as "94.7-98.3 %"; empty for old reports without it."""
    if m is None or m.low is None or m.high is None:
        return ""
    return f"{m.low * 100:.1f}-{m.high * 100:.1f} %"


def budget_note(report: SanitizeReport) -> str | None:
    """Why the pruned model can read more than the budget below the delivered one: k is
    chosen on the tune split's accuracy, and the evaluation split is another sample."""
    if report.decision.rule != "max_accuracy_drop" or report.surgery is None:
        return None
    drop = 100 * (report.baseline.clean_accuracy.value - report.pruned.clean_accuracy.value)
    budget = report.options.max_accuracy_drop
    if drop <= budget:
        return None
    split = report.pruned.clean_accuracy.split
    return (
        f"On the {split} split the pruned model reads {drop:.1f} points below the delivered one, "
        f"more than the {budget:g}-point budget: k is chosen on the tune split's accuracy "
        f"(within budget there), and the {split} split is another, smaller sample."
    )
