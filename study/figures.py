"""The study's figures, drawn from the reports `study.reproduce` saved: nothing is recomputed."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from schemas.report import SanitizeReport

CLEAN, TUNE, ASR, CHOICE = "#1f5fa8", "#7f8c9a", "#c0392b", "#2c3e50"
TITLES = {
    "badnets": "BadNets attack (sticker on Stop signs)",
    "pruning-aware": "Pruning-aware attack",
    "blended": "Blended-trigger attack",
}


def _save(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=120, bbox_inches="tight")


def pruning_curve(report: SanitizeReport, attack: str, path: Path) -> None:
    """Accuracy and attack success against the fraction of channels pruned, to the last one."""
    figure = Figure(figsize=(7.0, 4.2))
    axes = figure.add_subplot()
    fraction = [100 * p.fraction for p in report.curve]
    axes.plot(
        fraction,
        [100 * p.evaluation_accuracy for p in report.curve],
        color=CLEAN,
        label="clean accuracy (GTSRB test set)",
    )
    axes.plot(
        fraction,
        [100 * p.tune_accuracy for p in report.curve],
        color=TUNE,
        ls="--",
        label="clean accuracy (defender's 1,500 images)",
    )
    axes.plot(
        fraction,
        [100 * (p.attack_success_rate or 0.0) for p in report.curve],
        color=ASR,
        label="attack success (stickered Stop signs)",
    )
    chosen = report.curve[report.decision.pruned]
    axes.axvline(100 * chosen.fraction, color=CHOICE, ls=":", lw=1.2)
    axes.annotate(
        f"stop at {report.options.max_accuracy_drop:g}-point drop:\n"
        f"{chosen.pruned} of {len(report.curve) - 1} pruned,\n"
        f"attack success {100 * (chosen.attack_success_rate or 0):.1f} %",
        xy=(100 * chosen.fraction, 50),
        xytext=(-8, 0),
        textcoords="offset points",
        ha="right",
        fontsize=8,
        color=CHOICE,
    )
    axes.set_xlabel(f"channels of {report.surgery.layer if report.surgery else '?'} pruned")
    axes.set_ylabel("rate")
    axes.xaxis.set_major_formatter(PercentFormatter())
    axes.yaxis.set_major_formatter(PercentFormatter())
    axes.set_ylim(-2, 102)
    axes.set_title(f"Pruning: {TITLES.get(attack, attack)}")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left", fontsize=8)
    _save(figure, path)


def fine_tuning_curves(reports: dict[str, SanitizeReport], attacks: list[str], path: Path) -> None:
    """Per epoch: validation accuracy and attack success, fine-tuning alone vs fine-pruning."""
    figure = Figure(figsize=(4.2 * len(attacks), 3.8))
    for i, attack in enumerate(attacks, start=1):
        axes = figure.add_subplot(1, len(attacks), i)
        for defense, style in (("fine-tuning", "--"), ("fine-pruning", "-")):
            report = reports.get(f"{attack}-{defense}")
            if report is None or report.fine_tuning is None:
                continue
            history = report.fine_tuning.history
            epochs = [0] + [r.epoch for r in history]
            start = report.pruned
            accuracy = [start.clean_accuracy.value] + [r.val_accuracy for r in history]
            asr = [start.attack_success_rate.value if start.attack_success_rate else 0.0]
            asr += [r.attack_success_rate or 0.0 for r in history]
            axes.plot(
                epochs,
                [100 * a for a in accuracy],
                color=CLEAN,
                ls=style,
                label=f"{defense}: validation accuracy",
            )
            axes.plot(
                epochs,
                [100 * a for a in asr],
                color=ASR,
                ls=style,
                label=f"{defense}: attack success",
            )
            axes.plot(
                [report.fine_tuning.best_epoch],
                [100 * asr[report.fine_tuning.best_epoch]],
                "o",
                color=ASR,
                ms=4,
            )
        axes.set_title(TITLES.get(attack, attack), fontsize=10)
        axes.set_xlabel("fine-tuning epoch (0 = before)")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.yaxis.set_major_formatter(PercentFormatter())
        axes.set_ylim(-2, 102)
        axes.grid(alpha=0.3)
        if i == 1:
            axes.legend(fontsize=7, loc="center right")
    _save(figure, path)


def draw_all(results: dict, reports: dict[str, SanitizeReport], out: Path) -> list[Path]:
    attacks = list(results["attacks"])
    drawn = []
    for attack in attacks:
        report = reports.get(f"{attack}-fine-pruning") or reports.get(f"{attack}-pruning")
        if report is not None and report.curve:
            drawn.append(out / f"pruning-{attack}.png")
            pruning_curve(report, attack, drawn[-1])
    drawn.append(out / "fine-tuning.png")
    fine_tuning_curves(reports, attacks, drawn[-1])
    return drawn
