"""The report views: a PNG and an HTML page a person can read, built without TensorFlow."""

from __future__ import annotations

import base64
import re
import struct
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fineprune.report.figure import render_curve_png
from fineprune.report.files import write_report_files
from fineprune.report.html import render_html
from schemas.options import Defense, SanitizeOptions
from schemas.report import (
    CurvePoint,
    DataFile,
    EpochRecord,
    FineTuneReport,
    FineTuneRun,
    Measurement,
    ModelFile,
    PruneDecision,
    SanitizeReport,
    SplitSizes,
    StageMetrics,
    SurgeryReport,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = 64
EVIL_LAYER = "<script>alert(1)</script>"


def _curve(with_asr: bool) -> list[CurvePoint]:
    """17 points, k = 0, 4, ..., 64: accuracy holds then collapses, the backdoor dies first."""
    points = []
    for i in range(17):
        k = 4 * i
        f = k / CHANNELS
        tune = 0.982 - 0.01 * f - (0.0 if f <= 0.75 else 2.2 * (f - 0.75) ** 1.3)
        evaluation = tune - 0.011 - 0.015 * f
        asr = max(0.0, 1.0 - 1.5 * max(0.0, f - 0.35)) if with_asr else None
        points.append(
            CurvePoint(
                pruned=k,
                fraction=f,
                tune_accuracy=tune,
                evaluation_accuracy=evaluation,
                attack_success_rate=asr,
            )
        )
    return points


def make_report(
    *, with_asr: bool = True, fine_tune: bool = True, layer: str = "conv2d_3"
) -> SanitizeReport:
    """A realistic fine-pruning report, filled in by hand the way the engine would."""
    defense: Defense = "fine-pruning" if fine_tune else "pruning"
    options = SanitizeOptions(defense=defense, rescale=1 / 255, epochs=10 if fine_tune else 0)
    k = 48
    removed = list(range(CHANNELS))[::-1][:k]
    history = [
        EpochRecord(
            epoch=e,
            loss=0.40 / e,
            accuracy=0.90 + 0.008 * e,
            val_loss=0.35 / e + 0.02,
            val_accuracy=min(0.965, 0.91 + 0.012 * e),
            attack_success_rate=(0.06 - 0.005 * e) if with_asr else None,
        )
        for e in range(1, 7)
    ]

    def asr(value: float) -> Measurement | None:
        return Measurement(value=value, split="trigger", samples=400) if with_asr else None

    return SanitizeReport(
        created_at=datetime(2025, 11, 25, 15, 53, tzinfo=UTC),
        input_model=ModelFile(
            sha256="a" * 64, format="keras", bytes=7_340_032, parameters=1_823_562
        ),
        output_model=ModelFile(
            sha256="b" * 64, format="keras", bytes=6_291_456, parameters=1_541_210
        ),
        data=[
            DataFile(sha256="c" * 64, samples=1500, role="clean"),
            *([DataFile(sha256="d" * 64, samples=400, role="trigger")] if with_asr else []),
        ],
        options=options,
        splits=SplitSizes(
            tune=956,
            validation=169,
            evaluation=375,
            evaluation_split="holdout",
            trigger=400 if with_asr else 0,
        ),
        surgery=SurgeryReport(
            layer=layer,
            channels_before=CHANNELS,
            channels_after=CHANNELS - k,
            removed_channels=removed,
            mode="removed",
            mode_reason="followed by Flatten and Dense; both were narrowed",
            adjusted_layers=["batch_normalization_3", "dense"],
            mean_activations=[0.01 * i for i in range(CHANNELS)],
            profiled_at=layer,
        ),
        curve=_curve(with_asr),
        decision=PruneDecision(
            rule="max_accuracy_drop",
            pruned=k,
            reason="largest k whose tune accuracy stays within 4 points of the unpruned model",
        ),
        baseline=StageMetrics(
            clean_accuracy=Measurement(value=0.971, split="holdout", samples=375),
            attack_success_rate=asr(1.0),
        ),
        pruned=StageMetrics(
            clean_accuracy=Measurement(value=0.952, split="holdout", samples=375),
            attack_success_rate=asr(0.4),
        ),
        fine_pruned=StageMetrics(
            clean_accuracy=Measurement(
                value=0.954 if fine_tune else 0.952, split="holdout", samples=375
            ),
            attack_success_rate=asr(0.032 if fine_tune else 0.4),
        ),
        fine_tuning=FineTuneReport(
            epochs_run=6,
            best_epoch=5,
            history=history,
            learning_rate=2.5e-3,
            synthetic_triggers=0.5,
            frozen_layers=["dropout", "flatten", f"{layer}_head"],
            averaged_runs=[
                FineTuneRun(
                    seed=1000 * i,
                    epochs_run=6,
                    best_epoch=5 - i,
                    validation_accuracy=0.981 - i / 100,
                    attack_success_rate=0.011 * (i + 1) if with_asr else None,
                )
                for i in range(3)
            ],
            averaged_validation_accuracy=0.987,
            extrapolation=1.25,
        )
        if fine_tune
        else None,
        timings={"load": 1.2, "profile": 3.4, "prune": 12.8, "fine_tune": 64.0, "save": 0.4},
        versions={"fineprune": "0.1.0", "keras": "3.15.1", "tensorflow": "2.21.0"},
        seed=0,
        warnings=["The trigger data is small (400 samples); the ASR is approximate."],
    )


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _assert_png(path: Path) -> None:
    width, height = _png_size(path)
    # 10 x 4.5 inches at 120 dpi, give or take what constrained layout trims.
    assert 1000 <= width <= 1400
    assert 450 <= height <= 700
    assert width > height


@pytest.fixture
def report() -> SanitizeReport:
    return make_report()


def test_png_full_report(report: SanitizeReport, tmp_path: Path) -> None:
    path = tmp_path / "curve.png"
    render_curve_png(report, path)
    _assert_png(path)


def test_png_without_asr_or_fine_tuning(tmp_path: Path) -> None:
    path = tmp_path / "curve.png"
    render_curve_png(make_report(with_asr=False, fine_tune=False), path)
    _assert_png(path)


@pytest.mark.parametrize("points", [0, 1])
def test_png_short_curve_does_not_crash(tmp_path: Path, points: int) -> None:
    """Defense 'fine-tuning' alone profiles nothing, so the curve has at most one point."""
    base = make_report()
    report = base.model_copy(
        update={
            "options": SanitizeOptions(defense="fine-tuning"),
            "surgery": None,
            "curve": base.curve[:points],
            "decision": PruneDecision(rule="none", pruned=0, reason="defense is fine-tuning"),
        }
    )
    path = tmp_path / "curve.png"
    render_curve_png(report, path)
    _assert_png(path)
    page = render_html(report, path)
    assert "No layer was pruned." in page


def test_png_layer_name_with_math_and_markup(tmp_path: Path) -> None:
    """Untrusted names must not be parsed as mathtext (a stray '$' would raise)."""
    path = tmp_path / "curve.png"
    render_curve_png(make_report(layer="conv$\\frac{a$" + "x" * 200), path)
    _assert_png(path)


def test_html_headline_and_numbers(report: SanitizeReport, tmp_path: Path) -> None:
    png = tmp_path / "curve.png"
    render_curve_png(report, png)
    page = render_html(report, png)
    text = re.sub(r"<[^>]+>", "", page)
    assert (
        "Attack success 100.0 % → 3.2 %, clean accuracy 97.1 % → 95.4 % (holdout, 375 samples)"
        in text
    )
    assert "95.2 %" in text  # pruned accuracy
    assert "40.0 %" in text  # pruned ASR
    assert "\N{MINUS SIGN}1.7 pts" in text  # fine-pruned accuracy change from baseline
    assert "1,823,562" in text and "1,541,210" in text
    assert "a" * 64 in text and "b" * 64 in text
    assert "conv2d_3" in text
    assert "removed" in text and "followed by Flatten and Dense" in text
    assert "batch_normalization_3" in text
    assert "largest k whose tune accuracy" in text
    assert "The trigger data is small" in text
    assert 'class="warn"' in page
    assert "tensorflow" in text and "2.21.0" in text
    assert "fine_tune" in text and "64.0 s" in text
    assert "Learning rate 0.0025; 50% of each batch stamped with synthetic triggers" in text
    assert "kept as delivered (dropout, flatten, conv2d_3_head)" in text
    assert "3 runs averaged" in text and "3 fine-tunes from the pruned model" in text
    assert re.search(r"3\s*2000\s*3\s*96\.1 %\s*3\.3 %", text)  # the third run's row
    assert "moved 1.25 times the average's change" in text
    assert re.search(r"average, stepped 1\.25\s*98\.7 %", text)
    # The embedded image is the PNG we rendered, byte for byte.
    match = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert match is not None
    assert base64.b64decode(match.group(1)) == png.read_bytes()
    # Self-contained: no external assets, no scripts.
    assert "<script" not in page.lower()
    assert not re.search(r'(src|href)="(https?:)?//', page)


def test_html_without_asr_or_fine_tuning() -> None:
    page = render_html(make_report(with_asr=False, fine_tune=False))
    text = re.sub(r"<[^>]+>", "", page)
    assert "Clean accuracy 97.1 % → 95.2 % (holdout, 375 samples)" in text
    assert "Attack success" not in text.split("Results")[0]
    assert "No fine-tuning was run." in text
    assert "fine-pruned" not in text
    assert "data:image/png" not in page


def test_html_escapes_untrusted_layer_name(tmp_path: Path) -> None:
    report = make_report(layer=EVIL_LAYER)
    png = tmp_path / "curve.png"
    render_curve_png(report, png)
    page = render_html(report, png)
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;_head" in page  # a frozen layer's name too
    assert "data:image/png;base64," in page


def test_write_report_files(report: SanitizeReport, tmp_path: Path) -> None:
    out = tmp_path / "out"
    paths = write_report_files(report, out)
    assert set(paths) == {"json", "png", "html"}
    assert paths == {
        "json": out / "report.json",
        "png": out / "report.png",
        "html": out / "report.html",
    }
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.png"]
    assert SanitizeReport.model_validate_json(paths["json"].read_text()) == report
    _assert_png(paths["png"])
    page = paths["html"].read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "data:image/png;base64," in page
    # Writing again replaces the files in place and leaves no temporaries behind.
    write_report_files(report, out)
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.png"]


def test_rendering_does_not_import_tensorflow() -> None:
    """A fresh interpreter, because other tests in the session may have loaded TF already."""
    code = (
        "import sys, fineprune.report.files; "
        "bad = {'tensorflow', 'keras'} & set(sys.modules); "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_failed_render_keeps_previous_files(
    report: SanitizeReport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash mid-write must leave the last good report and no temporary files."""
    import fineprune.report.files as rendering

    paths = write_report_files(report, tmp_path)
    before = paths["png"].read_bytes()

    def broken(report: SanitizeReport, path: Path) -> None:
        path.write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(rendering, "render_curve_png", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_report_files(report, tmp_path)
    assert paths["png"].read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "report.html",
        "report.json",
        "report.png",
    ]


def test_html_stages_follow_the_defense() -> None:
    """Only stages that ran are listed, and the last one is marked as delivered."""
    pruning_only = re.sub(r"<[^>]+>", "", render_html(make_report(fine_tune=False)))
    assert "pruned — delivered" in pruning_only
    base = make_report()
    fine_tuning_only = base.model_copy(
        update={
            "options": SanitizeOptions(defense="fine-tuning"),
            "surgery": None,
            "curve": [],
            "decision": PruneDecision(rule="none", pruned=0, reason="defense is fine-tuning"),
        }
    )
    page = render_html(fine_tuning_only)
    text = re.sub(r"<[^>]+>", "", page)
    assert "fine-tuned — delivered" in text
    assert "Attack success 100.0 % → 3.2 %" in text
    assert "<td>pruned" not in page and "fine-pruned" not in text
    assert "No layer was pruned." in text
