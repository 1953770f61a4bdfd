"""The verdict: what it concludes from the detector and from trigger data, and the gate on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from factories import backdoor_inputs, train_backdoored

from fineprune.pipeline import sanitize
from fineprune.verdict.verdict import Detection, conclude
from schemas.options import SanitizeOptions

FINEPRUNE = [sys.executable, "-m", "fineprune"]


def _reading(suspect: int | None, score: float) -> Detection:
    return Detection("universal-perturbation", suspect, score, 2.0, 1.0)


def test_measured_attack_success_decides_when_there_is_trigger_data():
    suspected = _reading(3, 9.0)
    assert conclude(suspected, _reading(3, 8.0), 0.01).conclusion == "removed"
    measured = conclude(suspected, _reading(None, 0.5), 0.30)
    assert measured.conclusion == "may-remain" and measured.measured
    assert conclude(_reading(None, 1.0), None, 0.5).conclusion == "may-remain"


def test_without_trigger_data_nothing_suspected_is_no_signature_and_says_it_proves_nothing():
    found = conclude(_reading(None, 1.2), _reading(None, 1.0), None)
    assert found.conclusion == "no-signature" and "not proof" in found.reason
    # Nothing changed and the trigger data reaches nothing: no signature, and nothing "removed".
    assert conclude(_reading(None, 1.2), None, 0.0).conclusion == "no-signature"


def test_a_vanished_signature_is_not_read_as_removed_without_evidence():
    """The smoke run that suggested the rule: the scan found nothing after sanitizing while
    62.6 % of triggered images still went to the target."""
    found = conclude(_reading(0, 11.4), _reading(None, 0.7), None)
    assert found.conclusion == "may-remain" and "trigger data" in found.reason
    still = conclude(_reading(0, 11.4), _reading(0, 6.0), None)
    assert still.conclusion == "may-remain" and "class 0" in still.reason


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return backdoor_inputs(tmp_path_factory.mktemp("verdict"), train_backdoored(seed=5), seed=51)


def test_the_report_opens_with_the_verdict(files, tmp_path: Path):
    out = tmp_path / "out"
    report = sanitize(
        files["keras"],
        files["clean"],
        out,
        SanitizeOptions(epochs=2),
        trigger_data=files["trigger"],
    )
    verdict = report.verdict
    assert verdict is not None and verdict.measured
    assert verdict.before.suspect == 0  # the factories' target
    assert verdict.after is not None
    asr = report.fine_pruned.attack_success_rate.value
    assert verdict.conclusion == ("removed" if asr <= 0.02 else "may-remain")
    on_disk = json.loads((out / "report.json").read_text())
    assert list(on_disk)[:3] == ["schema_version", "created_at", "verdict"]
    page = (out / "report.html").read_text()
    assert page.index("Verdict: ") < page.index("<h1>")


def test_defense_none_only_looks_and_changes_nothing(files, tmp_path: Path):
    report = sanitize(files["keras"], files["clean"], tmp_path, SanitizeOptions(defense="none"))
    verdict = report.verdict
    assert verdict.conclusion == "may-remain" and verdict.before.suspect == 0
    assert verdict.after is None and "nothing was changed" in verdict.reason
    assert report.surgery is None and report.fine_tuning is None
    assert report.output_model.parameters == report.input_model.parameters
    assert report.fine_pruned == report.baseline


def _cli(*args: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [*FINEPRUNE, *map(str, args)], capture_output=True, text=True, env=env, timeout=600
    )


def test_the_gate_exits_3_and_says_which_rule_tripped(files, tmp_path: Path):
    plain = _cli("scan", files["keras"], "--data", files["clean"])
    assert plain.returncode == 0 and plain.stdout.startswith("Verdict: may-remain: class 0")
    gated = _cli("scan", files["keras"], "--data", files["clean"], "--fail-on", "suspected")
    assert gated.returncode == 3 and "suspected (class 0)" in gated.stderr
    asr = _cli(
        "sanitize", files["keras"], "--data", files["clean"], "--out", tmp_path / "o",
        "--epochs", "1", "--trigger-data", files["trigger"], "--max-asr", "0",
    )  # fmt: skip
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    measured = report["fine_pruned"]["attack_success_rate"]["value"]
    assert asr.returncode == (3 if measured > 0 else 0), asr.stderr
    assert asr.stdout.strip().splitlines()[-1].startswith("Verdict: ")
    usage = _cli("sanitize", files["keras"], "--data", files["clean"], "--out", tmp_path / "u",
                 "--max-asr", "0.1")  # fmt: skip
    assert usage.returncode == 2 and "--trigger-data" in usage.stderr


def test_every_rate_carries_its_wilson_interval(files, tmp_path: Path):
    from fineprune.report.metrics import wilson

    assert wilson(0.5, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    low, high = wilson(0.0, 100)
    assert low == 0.0 and high == pytest.approx(0.037, abs=1e-3)  # not a zero-width interval
    report = sanitize(
        files["keras"],
        files["clean"],
        tmp_path / "o",
        SanitizeOptions(defense="pruning"),
        trigger_data=files["trigger"],
    )
    for stage in (report.baseline, report.pruned, report.fine_pruned):
        for m in (stage.clean_accuracy, stage.attack_success_rate):
            assert m.low is not None and m.low <= m.value <= m.high
            assert (m.low, m.high) == wilson(m.value, m.samples)
    assert "95 % interval" in (tmp_path / "o" / "report.html").read_text()
