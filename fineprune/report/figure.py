"""The tradeoff figure: accuracy and attack success against channels pruned, and fine-tuning.

Kept free of keras and tensorflow so the service and workers can render reports without them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter
from numpy.typing import ArrayLike

from fineprune.report.summary import (
    MINUS,
    accuracy_threshold,
    chosen_fraction,
    percent,
    report_stages,
    shorten,
)
from schemas.report import FineTuneReport, Measurement, SanitizeReport

# Colours the page's tables use too, so the two read as one document.
TUNE_COLOUR = "#7f8c9a"
EVAL_COLOUR = "#1f5fa8"
ASR_COLOUR = "#c0392b"
CHOICE_COLOUR = "#2c3e50"
_DPI = 120


def _pct(value: float | None) -> float:
    """Fractions become percentages; missing values become NaN so matplotlib leaves a gap."""
    if value is None:
        return math.nan
    return value * 100.0


def _style_rate_axis(ax: Axes) -> None:
    """Every panel shares one 0-100 % scale so heights compare across panels."""
    ax.set_ylim(-3, 105)
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=100.0, decimals=0))
    ax.grid(True, color="#e5e5e5", lw=0.8)
    ax.set_axisbelow(True)


def _label_points(ax: Axes, x: float, points: Sequence[tuple[float, str, str]]) -> None:
    """Print values next to markers at one x; close values are pushed apart to stay legible.

    points: (y in %, text, colour).
    """
    ordered = sorted(points, key=lambda p: p[0])
    for i, (y, text, colour) in enumerate(ordered):
        dy = 0.0
        if len(ordered) > 1:
            below = i > 0 and y - ordered[i - 1][0] < 8
            above = i < len(ordered) - 1 and ordered[i + 1][0] - y < 8
            dy = 7.0 if below and not above else -7.0 if above and not below else 0.0
        ax.annotate(
            text,
            xy=(x, y),
            xytext=(9, dy),
            textcoords="offset points",
            ha="left",
            va="center",
            fontsize=8.5,
            color=colour,
            fontweight="bold",
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85},
            zorder=6,
        )


def _layer_title(report: SanitizeReport, what: str) -> str:
    """Which layer was cut is the first thing a reader checks against their model."""
    layer = report.surgery.layer if report.surgery is not None else None
    return f"{what} — layer {shorten(layer)}" if layer else what


def _mark(ax: Axes, x: float, text: str, lw: float, fontsize: int, bold: bool) -> None:
    """A dotted vertical line at a chosen point, labelled at the top of the axes."""
    ax.axvline(x, color=CHOICE_COLOUR, ls=":", lw=lw)
    ax.annotate(
        text,
        xy=(x, 1.0),
        xycoords=("data", "axes fraction"),
        xytext=(4, -4),
        textcoords="offset points",
        ha="left",
        va="top",
        fontsize=fontsize,
        color=CHOICE_COLOUR,
        fontweight="bold" if bold else "normal",
    )


def _draw_curve(ax: Axes, report: SanitizeReport) -> None:
    """The main panel: how accuracy and attack success move as channels are pruned."""
    curve = sorted(report.curve, key=lambda p: p.fraction)
    xs = [p.fraction for p in curve]
    eval_split = report.splits.evaluation_split

    ax.plot(
        xs,
        [_pct(p.tune_accuracy) for p in curve],
        color=TUNE_COLOUR,
        lw=1.4,
        label="clean accuracy (tune)",
    )
    ax.plot(
        xs,
        [_pct(p.evaluation_accuracy) for p in curve],
        color=EVAL_COLOUR,
        lw=2.0,
        label=f"clean accuracy ({eval_split})",
    )
    if any(p.attack_success_rate is not None for p in curve):
        ax.plot(
            xs,
            [_pct(p.attack_success_rate) for p in curve],
            color=ASR_COLOUR,
            lw=2.0,
            label="attack success rate",
        )

    threshold = accuracy_threshold(report)
    if threshold is not None:
        ax.axhline(
            _pct(threshold),
            color=TUNE_COLOUR,
            ls="--",
            lw=1.0,
            label=f"threshold {percent(threshold)} "
            f"(tune {MINUS} {report.options.max_accuracy_drop:g} pts)",
        )

    chosen = chosen_fraction(report)
    if chosen is not None:
        _mark(ax, chosen, f"k = {report.decision.pruned}", lw=1.3, fontsize=9, bold=True)

    if report.fine_tuning is not None:
        x = chosen if chosen is not None else 0.0
        stage, fp = report_stages(report)[-1]
        stars = [("accuracy", fp.clean_accuracy, EVAL_COLOUR)]
        if fp.attack_success_rate is not None:
            stars.append(("attack success", fp.attack_success_rate, ASR_COLOUR))
        for what, m, colour in stars:
            ax.plot(
                [x],
                [_pct(m.value)],
                marker="*",
                ms=15,
                ls="none",
                color=colour,
                mec="white",
                mew=0.8,
                zorder=5,
                label=f"{stage} {what} ({m.split})",
            )
        _label_points(ax, x, [(_pct(m.value), percent(m.value), c) for _, m, c in stars])

    x_max = max([*xs, chosen or 0.0]) or 1.0
    ax.set_xlim(-0.02 * x_max, 1.02 * x_max)
    ax.xaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
    ax.set_xlabel("channels pruned")
    ax.set_ylabel("accuracy and attack success")
    _style_rate_axis(ax)
    ax.set_title(
        _layer_title(report, "Pruning tradeoff"), loc="left", fontsize=11, parse_math=False
    )
    _add_channel_axis(ax, report)
    _legend_below(ax)


def _draw_stages(ax: Axes, report: SanitizeReport) -> None:
    """Without a pruning curve (fine-tuning alone), before and after is the whole story."""
    stages = report_stages(report)
    xs = list(range(len(stages)))
    eval_split = report.splits.evaluation_split
    series: list[tuple[str, str, list[Measurement | None]]] = [
        (f"clean accuracy ({eval_split})", EVAL_COLOUR, [m.clean_accuracy for _, m in stages]),
    ]
    asr = [m.attack_success_rate for _, m in stages]
    if any(a is not None for a in asr):
        series.append(("attack success rate", ASR_COLOUR, asr))
    for label, colour, values in series:
        ys = [_pct(v.value if v is not None else None) for v in values]
        ax.plot(xs, ys, color=colour, lw=2.0, marker="o", ms=7, label=label)
    for x in xs:
        column = [
            (_pct(v.value), percent(v.value), c) for _, c, vs in series if (v := vs[x]) is not None
        ]
        _label_points(ax, x, column)
    ax.set_xticks(xs, [name for name, _ in stages])
    ax.set_xlim(-0.4, len(stages) - 0.4)
    ax.set_ylabel("accuracy and attack success")
    _style_rate_axis(ax)
    ax.set_title(
        _layer_title(report, "Before and after"), loc="left", fontsize=11, parse_math=False
    )
    _legend_below(ax)


def _add_channel_axis(ax: Axes, report: SanitizeReport) -> None:
    """Counts on top, because the decision is stated in channels, not fractions."""
    surgery = report.surgery
    if surgery is None or surgery.channels_before <= 0 or not report.curve:
        return
    n = surgery.channels_before

    def to_channels(fraction: ArrayLike) -> ArrayLike:
        return np.asarray(fraction) * n

    def to_fraction(channels: ArrayLike) -> ArrayLike:
        return np.asarray(channels) / n

    top = ax.secondary_xaxis("top", functions=(to_channels, to_fraction))
    top.set_xlabel(f"channels pruned (of {n})", fontsize=8, color="#555555")
    top.tick_params(labelsize=8, colors="#555555")


def _legend_below(ax: Axes) -> None:
    """Under the panel, so that no entry hides a curve."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8, frameon=False)


def _draw_history(ax: Axes, ft: FineTuneReport) -> None:
    """The side panel: whether fine-tuning converged and the backdoor stayed gone, every
    averaged run drawn (the first run solid, the others thin)."""
    runs = [run.history for run in ft.averaged_runs if run.history] or [ft.history]
    epochs: list[int] = []
    for index, history in enumerate(runs):
        history = sorted(history, key=lambda e: e.epoch)
        epochs = epochs or [e.epoch for e in history]
        first = index == 0
        style = {"lw": 1.8 if first else 0.9, "alpha": 1.0 if first else 0.6}
        marker = "o" if first and len(history) <= 25 else None
        others = "run 2" if len(runs) == 2 else f"runs 2-{len(runs)}"
        suffix = "" if len(runs) == 1 else " (run 1)" if first else f" ({others})"
        ax.plot(
            [e.epoch for e in history],
            [_pct(e.val_accuracy) for e in history],
            color=EVAL_COLOUR,
            marker=marker,
            ms=3.5,
            label=f"validation accuracy{suffix}" if first or index == 1 else None,
            **style,
        )
        if any(e.attack_success_rate is not None for e in history):
            ax.plot(
                [e.epoch for e in history],
                [_pct(e.attack_success_rate) for e in history],
                color=ASR_COLOUR,
                marker=marker,
                ms=3.5,
                label=f"attack success{suffix}" if first or index == 1 else None,
                **style,
            )
    best = ft.best_epoch
    if best > 0:
        _mark(ax, best, f"best: {best}", lw=1.2, fontsize=8, bold=False)
    if epochs:
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy and attack success")
    _style_rate_axis(ax)
    ax.set_title("Fine-tuning", loc="left", fontsize=11)
    _legend_below(ax)


def render_curve_png(report: SanitizeReport, path: Path) -> None:
    """Draw the tradeoff figure with a private Agg canvas, so no global pyplot state is touched."""
    ft = report.fine_tuning
    fig = Figure(figsize=(10, 4.5), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    if ft is not None and ft.history:
        ax_main, ax_history = fig.subplots(1, 2, width_ratios=[2.3, 1])
        _draw_history(ax_history, ft)
    else:
        ax_main = fig.subplots()
    if len(report.curve) >= 2:
        _draw_curve(ax_main, report)
    else:
        _draw_stages(ax_main, report)
    fig.savefig(path, format="png", dpi=_DPI, facecolor="white")
