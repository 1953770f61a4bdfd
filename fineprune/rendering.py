"""Human-facing views of a SanitizeReport: a tradeoff figure and a self-contained HTML page.

Kept free of keras and tensorflow so the service and workers can render reports without them.
"""

from __future__ import annotations

import base64
import contextlib
import html
import math
import os
import secrets
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter
from numpy.typing import ArrayLike

from schemas.report import (
    FineTuneReport,
    Measurement,
    SanitizeReport,
    SplitSizes,
    StageMetrics,
    TriggerScan,
)

__all__ = ["render_curve_png", "render_html", "write_report_files"]

# Colours shared by the figure and the page so the two read as one document.
_TUNE_COLOUR = "#7f8c9a"
_EVAL_COLOUR = "#1f5fa8"
_ASR_COLOUR = "#c0392b"
_CHOICE_COLOUR = "#2c3e50"
_DPI = 120
_TITLE_MAX_CHARS = 60
_MINUS = "\N{MINUS SIGN}"  # typographic minus reads better than a hyphen


# --------------------------------------------------------------------------- helpers


def _pct(value: float | None) -> float:
    """Fractions become percentages; missing values become NaN so matplotlib leaves a gap."""
    if value is None:
        return math.nan
    return value * 100.0


def _fmt_pct(value: float | None) -> str:
    """One decimal, the precision the underlying sample counts can support."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value * 100:.1f} %"


def _fmt_delta(after: float | None, before: float | None) -> str:
    """Percentage-point change, signed, so a drop is never mistaken for a level."""
    if after is None or before is None or not (math.isfinite(after) and math.isfinite(before)):
        return ""
    delta = (after - before) * 100
    if abs(delta) < 0.05:
        return "±0.0 pts"
    sign = "+" if delta > 0 else _MINUS
    return f"{sign}{abs(delta):.1f} pts"


def _fmt_bytes(n: int) -> str:
    """Readable file sizes; the exact count stays alongside for checking."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover - loop always returns


def _fmt_seconds(seconds: float) -> str:
    """Sub-second stages still show something useful; long ones read as minutes."""
    if not math.isfinite(seconds):
        return "n/a"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def _shorten(text: str, limit: int = _TITLE_MAX_CHARS) -> str:
    """Untrusted layer names can be arbitrarily long; a title must stay on one line."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _stages(report: SanitizeReport) -> list[tuple[str, StageMetrics]]:
    """The stages that actually ran, in order; the last one describes the delivered model."""
    stages = [("input model", report.baseline)]
    if report.options.prunes:
        stages.append(("pruned", report.pruned))
    if report.fine_tuning is not None:
        stages.append(
            ("fine-pruned" if report.options.prunes else "fine-tuned", report.fine_pruned)
        )
    return stages


def _chosen_fraction(report: SanitizeReport) -> float | None:
    """Where the decision sits on the curve; None when nothing was profiled."""
    surgery = report.surgery
    if surgery is None or surgery.channels_before <= 0:
        return None
    return report.decision.pruned / surgery.channels_before


def _baseline_tune_accuracy(report: SanitizeReport) -> float | None:
    """The threshold rule is applied to tune accuracy of the unpruned model (k = 0)."""
    for point in report.curve:
        if point.pruned == 0:
            return point.tune_accuracy
    return report.curve[0].tune_accuracy if report.curve else None


def _accuracy_threshold(report: SanitizeReport) -> float | None:
    """The line the decision was not allowed to cross, as a fraction; None for other rules."""
    if report.decision.rule != "max_accuracy_drop":
        return None
    base = _baseline_tune_accuracy(report)
    if base is None:
        return None
    return base - report.options.max_accuracy_drop / 100.0


# --------------------------------------------------------------------------- figure


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
    return f"{what} — layer {_shorten(layer)}" if layer else what


def _mark(ax: Axes, x: float, text: str, lw: float, fontsize: int, bold: bool) -> None:
    """A dotted vertical line at a chosen point, labelled at the top of the axes."""
    ax.axvline(x, color=_CHOICE_COLOUR, ls=":", lw=lw)
    ax.annotate(
        text,
        xy=(x, 1.0),
        xycoords=("data", "axes fraction"),
        xytext=(4, -4),
        textcoords="offset points",
        ha="left",
        va="top",
        fontsize=fontsize,
        color=_CHOICE_COLOUR,
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
        color=_TUNE_COLOUR,
        lw=1.4,
        label="clean accuracy (tune)",
    )
    ax.plot(
        xs,
        [_pct(p.evaluation_accuracy) for p in curve],
        color=_EVAL_COLOUR,
        lw=2.0,
        label=f"clean accuracy ({eval_split})",
    )
    if any(p.attack_success_rate is not None for p in curve):
        ax.plot(
            xs,
            [_pct(p.attack_success_rate) for p in curve],
            color=_ASR_COLOUR,
            lw=2.0,
            label="attack success rate",
        )

    threshold = _accuracy_threshold(report)
    if threshold is not None:
        ax.axhline(
            _pct(threshold),
            color=_TUNE_COLOUR,
            ls="--",
            lw=1.0,
            label=f"threshold {_fmt_pct(threshold)} "
            f"(tune {_MINUS} {report.options.max_accuracy_drop:g} pts)",
        )

    chosen = _chosen_fraction(report)
    if chosen is not None:
        _mark(ax, chosen, f"k = {report.decision.pruned}", lw=1.3, fontsize=9, bold=True)

    if report.fine_tuning is not None:
        x = chosen if chosen is not None else 0.0
        stage, fp = _stages(report)[-1]
        stars = [("accuracy", fp.clean_accuracy, _EVAL_COLOUR)]
        if fp.attack_success_rate is not None:
            stars.append(("attack success", fp.attack_success_rate, _ASR_COLOUR))
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
        _label_points(ax, x, [(_pct(m.value), _fmt_pct(m.value), c) for _, m, c in stars])

    x_max = max([*xs, chosen or 0.0]) or 1.0
    ax.set_xlim(-0.02 * x_max, 1.02 * x_max)
    ax.xaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
    ax.set_xlabel("channels pruned")
    ax.set_ylabel("share of samples")
    _style_rate_axis(ax)
    ax.set_title(
        _layer_title(report, "Pruning tradeoff"), loc="left", fontsize=11, parse_math=False
    )
    _add_channel_axis(ax, report)
    ax.legend(loc="center left", fontsize=8, framealpha=0.92)


def _draw_stages(ax: Axes, report: SanitizeReport) -> None:
    """Without a pruning curve (fine-tuning alone), before and after is the whole story."""
    stages = _stages(report)
    xs = list(range(len(stages)))
    eval_split = report.splits.evaluation_split
    series: list[tuple[str, str, list[Measurement | None]]] = [
        (f"clean accuracy ({eval_split})", _EVAL_COLOUR, [m.clean_accuracy for _, m in stages]),
    ]
    asr = [m.attack_success_rate for _, m in stages]
    if any(a is not None for a in asr):
        series.append(("attack success rate", _ASR_COLOUR, asr))
    for label, colour, values in series:
        ys = [_pct(v.value if v is not None else None) for v in values]
        ax.plot(xs, ys, color=colour, lw=2.0, marker="o", ms=7, label=label)
    for x in xs:
        column = [
            (_pct(v.value), _fmt_pct(v.value), c) for _, c, vs in series if (v := vs[x]) is not None
        ]
        _label_points(ax, x, column)
    ax.set_xticks(xs, [name for name, _ in stages])
    ax.set_xlim(-0.4, len(stages) - 0.4)
    ax.set_ylabel("share of samples")
    _style_rate_axis(ax)
    ax.set_title(
        _layer_title(report, "Before and after"), loc="left", fontsize=11, parse_math=False
    )
    ax.legend(loc="center left", fontsize=8, framealpha=0.92)


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


def _draw_history(ax: Axes, ft: FineTuneReport) -> None:
    """The side panel: whether fine-tuning converged and the backdoor stayed gone."""
    history = sorted(ft.history, key=lambda e: e.epoch)
    epochs = [e.epoch for e in history]
    marker = "o" if len(history) <= 25 else None
    ax.plot(
        epochs,
        [_pct(e.val_accuracy) for e in history],
        color=_EVAL_COLOUR,
        lw=1.8,
        marker=marker,
        ms=3.5,
        label="val accuracy",
    )
    if any(e.attack_success_rate is not None for e in history):
        ax.plot(
            epochs,
            [_pct(e.attack_success_rate) for e in history],
            color=_ASR_COLOUR,
            lw=1.8,
            marker=marker,
            ms=3.5,
            label="attack success",
        )
    best = ft.best_epoch
    if best > 0:
        _mark(ax, best, f"best: {best}", lw=1.2, fontsize=8, bold=False)
    if epochs:
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    _style_rate_axis(ax)
    ax.set_title("Fine-tuning", loc="left", fontsize=11)
    ax.legend(loc="center right", fontsize=8, framealpha=0.92)


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


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
  color:#1d2430;background:#fff;margin:0;line-height:1.45}
main{max-width:960px;margin:0 auto;padding:24px 20px 48px}
h1{font-size:1.5rem;margin:0 0 4px}
h2{font-size:1.1rem;margin:32px 0 8px;padding-bottom:4px;border-bottom:1px solid #e3e6ea}
.sub{color:#5a6472;margin:0 0 16px}
.verdict{font-size:1.25rem;font-weight:600;background:#f4f7fb;border-left:4px solid #1f5fa8;
  padding:12px 16px;margin:16px 0}
.asr{color:#c0392b}.acc{color:#1f5fa8}
.warn{background:#fff8e1;border:1px solid #f0c36d;border-left:4px solid #e0a100;
  padding:10px 16px;margin:16px 0}
.warn ul{margin:4px 0 0;padding-left:20px}
table{border-collapse:collapse;width:100%;margin:8px 0;font-size:.92rem}
th,td{border:1px solid #dde1e6;padding:5px 9px;text-align:left;vertical-align:top}
th{background:#f6f7f9;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
tr.hl td{background:#eef4fb;font-weight:600}
table.kv th{width:32%}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.85rem;
  word-break:break-all}
.delta{color:#5a6472;font-size:.85em}
img.figure{width:100%;height:auto;border:1px solid #e3e6ea;margin:8px 0}
details{margin:8px 0}summary{cursor:pointer;color:#1f5fa8}
footer{margin-top:40px;color:#8a929c;font-size:.8rem}
"""


def _e(value: object) -> str:
    """Every string may come from an untrusted model file, so all of them are escaped."""
    return html.escape(str(value), quote=True)


def _table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    numeric: Iterable[int] = (),
    row_classes: Sequence[str] | None = None,
) -> str:
    """Cells arrive already escaped; this only lays them out."""
    num = set(numeric)
    head = "".join(
        f'<th class="num">{h}</th>' if i in num else f"<th>{h}</th>" for i, h in enumerate(headers)
    )
    body: list[str] = []
    for r, row in enumerate(rows):
        cls = row_classes[r] if row_classes and r < len(row_classes) else ""
        cells = "".join(
            f'<td class="num">{c}</td>' if i in num else f"<td>{c}</td>" for i, c in enumerate(row)
        )
        body.append(f'<tr class="{cls}">{cells}</tr>' if cls else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _kv_table(pairs: Iterable[tuple[str, str]]) -> str:
    """Keys and values arrive already escaped."""
    rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in pairs)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def _headline(report: SanitizeReport) -> str:
    """The one sentence a reader needs: did the backdoor go, and what did it cost."""
    _, final = _stages(report)[-1]
    base = report.baseline
    parts: list[str] = []
    if base.attack_success_rate is not None and final.attack_success_rate is not None:
        parts.append(
            f'Attack success <span class="asr">{_fmt_pct(base.attack_success_rate.value)} → '
            f"{_fmt_pct(final.attack_success_rate.value)}</span>"
        )
    acc = final.clean_accuracy
    text = (
        f'clean accuracy <span class="acc">{_fmt_pct(base.clean_accuracy.value)} → '
        f"{_fmt_pct(acc.value)}</span> ({_e(acc.split)}, {acc.samples} samples)"
    )
    parts.append(text if parts else text[0].upper() + text[1:])
    return ", ".join(parts)


def _subline(report: SanitizeReport) -> str:
    """What was done, in words, under the verdict."""
    bits = [f"defense: <b>{_e(report.options.defense)}</b>"]
    if report.surgery is not None:
        s = report.surgery
        bits.append(
            f"layer <code>{_e(s.layer)}</code>: {report.decision.pruned} of "
            f"{s.channels_before} channels pruned ({_e(s.mode)})"
        )
    if report.fine_tuning is not None:
        ft = report.fine_tuning
        best = f"best epoch {ft.best_epoch}" if ft.best_epoch > 0 else "no epoch improved"
        if ft.selected_on == "last":
            best = "last epoch kept"
        method = "" if ft.method == "plain" else f" ({_e(ft.method)})"
        runs = f", {len(ft.averaged_runs)} runs averaged" if ft.averaged_runs else ""
        bits.append(f"{ft.epochs_run} fine-tuning epochs{method}, {best}{runs}")
    return " · ".join(bits)


def _metric_cells(m: Measurement | None, base: Measurement | None) -> list[str]:
    """Value with its change from baseline, plus where and on how many samples it was measured."""
    if m is None:
        return ["not measured", "", ""]
    delta = _fmt_delta(m.value, base.value) if base is not None else ""
    value = _fmt_pct(m.value) + (f' <span class="delta">({delta})</span>' if delta else "")
    return [value, _e(m.split), str(m.samples)]


def _stages_table(report: SanitizeReport) -> str:
    """Each stage side by side with its change from the input model, split and sample count."""
    stages = _stages(report)
    base = report.baseline
    rows: list[list[str]] = []
    for i, (name, metrics) in enumerate(stages):
        delivered = i == len(stages) - 1 and i > 0
        ref = None if i == 0 else base
        rows.append(
            [
                _e(name) + (" — <i>delivered</i>" if delivered else ""),
                *_metric_cells(metrics.clean_accuracy, ref.clean_accuracy if ref else None),
                *_metric_cells(
                    metrics.attack_success_rate, ref.attack_success_rate if ref else None
                ),
            ]
        )
    classes = [""] * (len(rows) - 1) + ["hl" if len(rows) > 1 else ""]
    headers = ["stage", "clean accuracy", "split", "samples", "attack success", "split", "samples"]
    return _table(headers, rows, numeric=(1, 3, 4, 6), row_classes=classes)


def _decision_section(report: SanitizeReport) -> str:
    """How k was chosen, with the threshold spelled out so the choice can be checked."""
    d = report.decision
    pairs = [("rule", f"<code>{_e(d.rule)}</code>"), ("channels pruned (k)", str(d.pruned))]
    chosen = _chosen_fraction(report)
    if chosen is not None:
        pairs.append(("fraction pruned", f"{chosen * 100:.1f} %"))
    threshold = _accuracy_threshold(report)
    base_tune = _baseline_tune_accuracy(report)
    if threshold is not None and base_tune is not None:
        pairs.append(
            (
                "accuracy threshold",
                f"{_fmt_pct(threshold)} (tune accuracy {_fmt_pct(base_tune)} {_MINUS} "
                f"{report.options.max_accuracy_drop:g} pts)",
            )
        )
    elif d.rule == "prune_fraction" and report.options.prune_fraction is not None:
        pairs.append(("requested fraction", f"{report.options.prune_fraction * 100:.1f} %"))
    pairs.append(("reason", _e(d.reason)))
    return _kv_table(pairs)


def _surgery_section(report: SanitizeReport) -> str:
    """What changed inside the model, so the output can be audited against the input."""
    s = report.surgery
    if s is None:
        return "<p>No layer was pruned.</p>"
    adjusted = ", ".join(f"<code>{_e(name)}</code>" for name in s.adjusted_layers) or "none"
    removed = ", ".join(str(i) for i in s.removed_channels) or "none"
    pairs = [
        ("layer", f"<code>{_e(s.layer)}</code>"),
        ("profiled at", f"<code>{_e(s.profiled_at)}</code>"),
        ("channels", f"{s.channels_before} → {s.channels_after}"),
        ("mode", f"<b>{_e(s.mode)}</b> — {_e(s.mode_reason)}"),
        ("adjusted layers", adjusted),
        (
            f"pruned channel indices ({len(s.removed_channels)})",
            f'<span class="mono">{removed}</span>',
        ),
    ]
    out = _kv_table(pairs)
    if s.mean_activations:
        acts = ", ".join(
            f"{i}: {a:.3g}" for i, a in enumerate(s.mean_activations) if math.isfinite(a)
        )
        out += (
            "<details><summary>Mean activation per channel (tune split)</summary>"
            f'<p class="mono">{_e(acts)}</p></details>'
        )
    return out


def _models_section(report: SanitizeReport) -> str:
    """Hashes and sizes tie this page to exact files; split sizes bound the error bars."""
    i, o = report.input_model, report.output_model
    change = ""
    if i.parameters > 0:
        ratio = (o.parameters - i.parameters) / i.parameters * 100
        sign = "+" if ratio > 0 else _MINUS if ratio < 0 else "±"
        change = f" ({sign}{abs(ratio):.1f} %)"
    rows = [
        ["input", _e(i.format), f"{i.parameters:,}", _fmt_bytes(i.bytes), _mono(i.sha256)],
        [
            "output",
            _e(o.format),
            f"{o.parameters:,}{change}",
            _fmt_bytes(o.bytes),
            _mono(o.sha256),
        ],
    ]
    out = _table(["model", "format", "parameters", "size", "sha256"], rows, numeric=(2, 3))
    if report.data:
        data_rows = [[_e(d.role), str(d.samples), _mono(d.sha256)] for d in report.data]
        out += _table(["data", "samples", "sha256"], data_rows, numeric=(1,))
    sp = report.splits
    split_rows = [
        ["tune", str(sp.tune), "profile, choose k, fine-tune"],
        ["validation", str(sp.validation), "carved from tune; picks the epoch only"],
        [_e(sp.evaluation_split), str(sp.evaluation), _evaluation_use(sp)],
    ]
    if sp.trigger:
        split_rows.append(["trigger", str(sp.trigger), "attack success rate"])
    out += _table(["split", "samples", "used for"], split_rows, numeric=(1,))
    if sp.groups:
        out += (
            f"<p>The clean data named its samples' groups ({sp.groups} in tune): each group "
            "stayed whole on one side of the tune / holdout split, so the holdout reads "
            "sources never tuned on.</p>"
        )
    return out


def _evaluation_use(sp: SplitSizes) -> str:
    use = "never trained on; reported accuracy"
    if sp.near_copies:
        use += f" ({sp.near_copies:.1%} have a near-copy in tune)"
    return use


def _mono(text: str) -> str:
    """Hashes are compared by eye character by character; monospace makes that possible."""
    return f'<span class="mono">{_e(text)}</span>'


def _scan_sentence(found: TriggerScan) -> str:
    if found.suspect is None:
        return (
            f"the trigger scan (radius {found.radius:g}) found no class that stands out "
            f"(largest anomaly {max(found.anomaly):.1f}), so no batch was shifted"
        )
    reach = found.success[found.suspect]
    return (
        f"the trigger scan flagged class {found.suspect} (reached from {reach:.0%} of other "
        f"images at radius {found.radius:g}, anomaly {found.anomaly[found.suspect]:.1f}); "
        f"{found.share:.0%} of each batch shifted by its perturbation, labels kept"
    )


def _history_section(report: SanitizeReport) -> str:
    """Per-epoch numbers show whether the kept epoch was a fluke or a plateau."""
    ft = report.fine_tuning
    if ft is None:
        return "<p>No fine-tuning was run.</p>"
    has_asr = any(e.attack_success_rate is not None for e in ft.history)
    has_alignment = any(e.head_alignment is not None for e in ft.history)
    headers = ["epoch", "loss", "accuracy", "val loss", "val accuracy"]
    if has_asr:
        headers.append("attack success")
    if has_alignment:
        headers.append("head alignment")
    rows: list[list[str]] = []
    classes: list[str] = []
    for e in sorted(ft.history, key=lambda r: r.epoch):
        row = [
            str(e.epoch) + (" ★" if e.epoch == ft.best_epoch else ""),
            f"{e.loss:.4f}",
            _fmt_pct(e.accuracy),
            f"{e.val_loss:.4f}",
            _fmt_pct(e.val_accuracy),
        ]
        if has_asr:
            row.append(_fmt_pct(e.attack_success_rate))
        if has_alignment:
            row.append("" if e.head_alignment is None else f"{e.head_alignment:+.2f}")
        rows.append(row)
        classes.append("hl" if e.epoch == ft.best_epoch else "")
    kept = (
        f"epoch {ft.best_epoch} kept (★)"
        if ft.best_epoch > 0
        else "no epoch beat the starting model, which was kept as is"
    )
    intro = (
        f"<p>{ft.epochs_run} epochs run; {kept}, selected on the "
        f"<b>{_e(ft.selected_on)}</b> split.</p>"
        if ft.selected_on == "validation"
        else f"<p>{ft.epochs_run} epochs run; the last one kept (★), as asked, as the "
        "method does, or as the recipe of a model that pools globally does.</p>"
    )
    settings = [f"learning rate {ft.learning_rate:g}"] if ft.learning_rate else []
    if ft.synthetic_triggers:
        share = f"{ft.synthetic_triggers:.0%}"
        settings.append(f"{share} of each batch stamped with synthetic triggers")
    if ft.trigger_scan is not None:
        settings.append(_scan_sentence(ft.trigger_scan))
    if ft.frozen_layers:
        head = ", ".join(f"<code>{_e(name)}</code>" for name in ft.frozen_layers)
        settings.append(f"the head after the pruned layer kept as delivered ({head})")
    if settings:
        text = "; ".join(settings)
        intro += f"<p>{text[0].upper()}{text[1:]}.</p>"
    if ft.fallback_reason:
        intro += (
            f"<p><b>Fell back to plain fine-tuning:</b> {_e(ft.fallback_reason)}. The epochs "
            "below are the plain run's.</p>"
        )
    if ft.method == "feature-shift":
        intro += (
            f"<p>Method: <b>feature-shift</b>. The classifier "
            f"<code>{_e(ft.reinitialized_layer or '')}</code> was re-initialized and kept "
            "turned away from the original; head alignment is the cosine similarity of its "
            "weights with the original (1: unchanged).</p>"
        )
    elif ft.method == "adversarial-unlearning":
        intro += (
            "<p>Method: <b>adversarial unlearning</b>. Each step also trained on the batch "
            "shifted by its worst universal perturbation, of L2 norm up to "
            f"{report.options.unlearning_radius:g} times the clean inputs' mean norm.</p>"
        )
    elif ft.method == "sharpness-aware":
        intro += (
            "<p>Method: <b>sharpness-aware</b> (adaptive SAM, radius "
            f"{ft.sharpness_radius:g} of each weight's size).</p>"
        )
    if report.options.distills and not ft.fallback_reason:
        intro += (
            "<p>The delivered model taught the tuned one on mixtures of clean images "
            f"(distillation weight {report.options.distillation_weight:g}), to keep the clean "
            "accuracy this method would otherwise lose.</p>"
        )
    if ft.averaged_runs:
        step = (
            ""
            if ft.extrapolation == 1.0
            else f", and the pruned model moved {ft.extrapolation:g} times the average's change"
        )
        intro += (
            f"<p>{len(ft.averaged_runs)} fine-tunes from the pruned model, each with its own "
            f"shuffling and stamps, were averaged weight by weight{step}; the epochs below are "
            "the first run's.</p>" + _runs_table(ft)
        )
    if not rows:
        return intro
    return intro + _table(headers, rows, numeric=range(1, len(headers)), row_classes=classes)


def _runs_table(ft: FineTuneReport) -> str:
    """Each averaged run at the epoch it kept, then their average."""
    has_asr = any(run.attack_success_rate is not None for run in ft.averaged_runs)
    headers = ["run", "seed", "epoch kept", "val accuracy"]
    if has_asr:
        headers.append("attack success")
    rows = []
    for i, run in enumerate(ft.averaged_runs, start=1):
        row = [str(i), str(run.seed), str(run.best_epoch), _fmt_pct(run.validation_accuracy)]
        if has_asr:
            row.append(_fmt_pct(run.attack_success_rate))
        rows.append(row)
    label = "average" if ft.extrapolation == 1.0 else f"average, stepped {ft.extrapolation:g}"
    average = [label, "", "", _fmt_pct(ft.averaged_validation_accuracy)]
    if has_asr:
        average.append("")  # the sanitized model: the stages table gives it
    rows.append(average)
    classes = [""] * len(ft.averaged_runs) + ["hl"]
    return _table(headers, rows, numeric=range(1, len(headers)), row_classes=classes)


def _curve_section(report: SanitizeReport) -> str:
    """The exact numbers behind the figure, folded away because few readers need them."""
    if not report.curve:
        return ""
    has_asr = any(p.attack_success_rate is not None for p in report.curve)
    eval_split = _e(report.splits.evaluation_split)
    headers = ["k", "fraction", "tune accuracy", f"{eval_split} accuracy"]
    if has_asr:
        headers.append("attack success")
    rows: list[list[str]] = []
    classes: list[str] = []
    for p in sorted(report.curve, key=lambda q: q.pruned):
        row = [
            str(p.pruned),
            f"{p.fraction * 100:.1f} %",
            _fmt_pct(p.tune_accuracy),
            _fmt_pct(p.evaluation_accuracy),
        ]
        if has_asr:
            row.append(_fmt_pct(p.attack_success_rate))
        rows.append(row)
        classes.append("hl" if p.pruned == report.decision.pruned else "")
    table = _table(headers, rows, numeric=range(len(headers)), row_classes=classes)
    return f"<details><summary>Curve data ({len(rows)} points)</summary>{table}</details>"


def _options_section(report: SanitizeReport) -> str:
    """Every setting, so the run can be repeated."""
    pairs = [
        (_e(k), "<i>not set</i>" if v is None else f"<code>{_e(v)}</code>")
        for k, v in report.options.model_dump().items()
    ]
    return _kv_table(pairs)


def _timings_section(report: SanitizeReport) -> str:
    """Where the time went, to size the next run or spot a stage that misbehaved."""
    if not report.timings:
        return "<p>No timings recorded.</p>"
    rows = [[_e(k), _fmt_seconds(v)] for k, v in report.timings.items()]
    total = sum(v for v in report.timings.values() if math.isfinite(v))
    rows.append(["<b>total</b>", f"<b>{_fmt_seconds(total)}</b>"])
    return _table(["stage", "time"], rows, numeric=(1,))


def _image_html(png_path: Path | None) -> str:
    """Embedded as a data URI so the page is one file that can be mailed or archived."""
    if png_path is None:
        return ""
    data = base64.b64encode(Path(png_path).read_bytes()).decode("ascii")
    return (
        f'<img class="figure" src="data:image/png;base64,{data}" '
        'alt="Clean accuracy and attack success rate against the fraction of channels pruned">'
    )


def render_html(report: SanitizeReport, png_path: Path | None = None) -> str:
    """One self-contained page: the JSON is for machines, this is for the person deciding."""
    warnings = ""
    if report.warnings:
        items = "".join(f"<li>{_e(w)}</li>" for w in report.warnings)
        warnings = f'<div class="warn"><b>Warnings</b><ul>{items}</ul></div>'
    layer = report.surgery.layer if report.surgery is not None else None
    title = "fineprune report" + (f" — {_shorten(layer)}" if layer else "")
    versions = _kv_table((_e(k), f"<code>{_e(v)}</code>") for k, v in report.versions.items())
    meta = _kv_table(
        [
            ("created", _e(report.created_at.isoformat(timespec="seconds"))),
            ("seed", str(report.seed)),
            ("schema version", _e(report.schema_version)),
        ]
    )
    sections = [
        f"<h1>Sanitize report</h1><p class='sub'>{_subline(report)}</p>",
        f'<div class="verdict">{_headline(report)}</div>',
        warnings,
        _image_html(png_path),
        "<h2>Results</h2>",
        _stages_table(report),
        "<h2>Prune decision</h2>",
        _decision_section(report),
        _curve_section(report),
        "<h2>Surgery</h2>",
        _surgery_section(report),
        "<h2>Fine-tuning</h2>",
        _history_section(report),
        "<h2>Models and data</h2>",
        _models_section(report),
        "<h2>Timings</h2>",
        _timings_section(report),
        "<h2>Options</h2>",
        _options_section(report),
        "<h2>Versions</h2>",
        versions,
        meta,
    ]
    body = "\n".join(s for s in sections if s)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>"
        f"<body><main>\n{body}\n"
        "<footer>Generated by fineprune. Every accuracy is measured on the split named next "
        "to it.</footer></main></body></html>\n"
    )


# --------------------------------------------------------------------------- files


def _atomic_write(dest: Path, write: Callable[[Path], object]) -> None:
    """Readers polling the output folder must never see a half-written file.

    The temporary name is not pre-created (unlike mkstemp) so the file gets the usual
    umask-derived permissions rather than 0600, which a separate web process could not read.
    """
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_report_files(report: SanitizeReport, out_dir: Path) -> dict[str, Path]:
    """The three artifacts of a run, each replaced atomically; the HTML embeds the PNG."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "report.json",
        "png": out_dir / "report.png",
        "html": out_dir / "report.html",
    }
    _atomic_write(
        paths["json"],
        lambda p: p.write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8"),
    )
    _atomic_write(paths["png"], lambda p: render_curve_png(report, p))
    _atomic_write(
        paths["html"],
        lambda p: p.write_text(render_html(report, paths["png"]), encoding="utf-8"),
    )
    return paths
