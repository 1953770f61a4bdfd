"""The report as one self-contained HTML page (the figure embedded), safe for untrusted names.

Kept free of keras and tensorflow so the service and workers can render reports without them.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from fineprune.report.summary import (
    MINUS,
    accuracy_threshold,
    baseline_tune_accuracy,
    budget_note,
    chosen_fraction,
    interval,
    percent,
    report_stages,
    shorten,
    verdict_line,
)
from fineprune.text import readable_bytes
from schemas.report import (
    FineTuneReport,
    Measurement,
    SanitizeReport,
    SplitSizes,
    TriggerScan,
)


def _fmt_delta(after: float | None, before: float | None) -> str:
    """Percentage-point change, signed, so a drop is never mistaken for a level."""
    if after is None or before is None or not (math.isfinite(after) and math.isfinite(before)):
        return ""
    delta = (after - before) * 100
    if abs(delta) < 0.05:
        return "±0.0 pts"
    sign = "+" if delta > 0 else MINUS
    return f"{sign}{abs(delta):.1f} pts"


def _fmt_seconds(seconds: float) -> str:
    """Sub-second stages still show something useful; long ones read as minutes."""
    if not math.isfinite(seconds):
        return "n/a"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
  color:#1d2430;background:#fff;margin:0;line-height:1.45}
main{max-width:960px;margin:0 auto;padding:24px 20px 48px}
h1{font-size:1.5rem;margin:0 0 4px}
h2{font-size:1.1rem;margin:32px 0 8px;padding-bottom:4px;border-bottom:1px solid #e3e6ea}
.sub{color:#5a6472;margin:0 0 16px}
.ci{color:#667;font-size:.85em}
.conclusion{font-weight:700;padding:.5rem .8rem;border-radius:4px;margin:0 0 .5rem}
.conclusion.removed{background:#e6f4ea;color:#1e5631}
.conclusion.may-remain,.conclusion.none{background:#fdecea;color:#8a1c1c}
.conclusion.no-signature{background:#fff4e0;color:#7a4b00}
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
    _, final = report_stages(report)[-1]
    base = report.baseline
    parts: list[str] = []
    if base.attack_success_rate is not None and final.attack_success_rate is not None:
        parts.append(
            f'Attack success <span class="asr">{percent(base.attack_success_rate.value)} → '
            f"{percent(final.attack_success_rate.value)}</span>"
        )
    acc = final.clean_accuracy
    text = (
        f'clean accuracy <span class="acc">{percent(base.clean_accuracy.value)} → '
        f"{percent(acc.value)}</span> ({_e(acc.split)}, {acc.samples} samples)"
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
    value = percent(m.value) + (f' <span class="delta">({delta})</span>' if delta else "")
    span = interval(m)
    value += f' <span class="ci">[{span}]</span>' if span else ""
    return [value, _e(m.split), str(m.samples)]


def _stages_table(report: SanitizeReport) -> str:
    """Each stage side by side with its change from the input model, split and sample count."""
    stages = report_stages(report)
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
    headers = [
        "stage",
        "clean accuracy [95 % interval]",
        "split",
        "samples",
        "attack success [95 % interval]",
        "split",
        "samples",
    ]
    return _table(headers, rows, numeric=(1, 3, 4, 6), row_classes=classes)


def _decision_section(report: SanitizeReport) -> str:
    """How k was chosen, with the threshold spelled out so the choice can be checked."""
    d = report.decision
    pairs = [("rule", f"<code>{_e(d.rule)}</code>"), ("channels pruned (k)", str(d.pruned))]
    chosen = chosen_fraction(report)
    if chosen is not None:
        pairs.append(("fraction pruned", f"{chosen * 100:.1f} %"))
    threshold = accuracy_threshold(report)
    base_tune = baseline_tune_accuracy(report)
    if threshold is not None and base_tune is not None:
        pairs.append(
            (
                "accuracy threshold",
                f"{percent(threshold)} (tune accuracy {percent(base_tune)} {MINUS} "
                f"{report.options.max_accuracy_drop:g} pts)",
            )
        )
    elif d.rule == "prune_fraction" and report.options.prune_fraction is not None:
        pairs.append(("requested fraction", f"{report.options.prune_fraction * 100:.1f} %"))
    pairs.append(("reason", _e(d.reason)))
    note = budget_note(report)
    return _kv_table(pairs) + (f"<p class='note'>{_e(note)}</p>" if note else "")


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
        sign = "+" if ratio > 0 else MINUS if ratio < 0 else "±"
        change = f" ({sign}{abs(ratio):.1f} %)"
    rows = [
        ["input", _e(i.format), f"{i.parameters:,}", readable_bytes(i.bytes), _mono(i.sha256)],
        [
            "output",
            _e(o.format),
            f"{o.parameters:,}{change}",
            readable_bytes(o.bytes),
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
            percent(e.accuracy),
            f"{e.val_loss:.4f}",
            percent(e.val_accuracy),
        ]
        if has_asr:
            row.append(percent(e.attack_success_rate))
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
            f"{ft.unlearning_radius:g} times the clean inputs' mean norm.</p>"
        )
    elif ft.method == "sharpness-aware":
        intro += (
            "<p>Method: <b>sharpness-aware</b> (adaptive SAM, radius "
            f"{ft.sharpness_radius:g} of each weight's size).</p>"
        )
    if ft.distillation and not ft.fallback_reason:
        intro += (
            "<p>The delivered model taught the tuned one on mixtures of clean images "
            f"(distillation weight {ft.distillation:g}), to keep the clean "
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
        row = [str(i), str(run.seed), str(run.best_epoch), percent(run.validation_accuracy)]
        if has_asr:
            row.append(percent(run.attack_success_rate))
        rows.append(row)
    label = "average" if ft.extrapolation == 1.0 else f"average, stepped {ft.extrapolation:g}"
    average = [label, "", "", percent(ft.averaged_validation_accuracy)]
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
            percent(p.tune_accuracy),
            percent(p.evaluation_accuracy),
        ]
        if has_asr:
            row.append(percent(p.attack_success_rate))
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
    title = "fineprune report" + (f" — {shorten(layer)}" if layer else "")
    versions = _kv_table((_e(k), f"<code>{_e(v)}</code>") for k, v in report.versions.items())
    meta = _kv_table(
        [
            ("created", _e(report.created_at.isoformat(timespec="seconds"))),
            ("seed", str(report.seed)),
            ("schema version", _e(report.schema_version)),
        ]
    )
    conclusion = report.verdict.conclusion if report.verdict else "none"
    sections = [
        f'<p class="conclusion {conclusion}">{_e(verdict_line(report))}</p>',
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
