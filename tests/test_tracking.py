"""A sanitize run logged to a real local MLflow file store, read back with MLflow's client."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from factories import backdoor_inputs, train_backdoored

mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed")


def test_the_cli_logs_options_metrics_verdict_and_artifacts(tmp_path: Path) -> None:
    files = backdoor_inputs(tmp_path, train_backdoored(seed=6, epochs=6), seed=61)
    store = tmp_path / "mlruns"
    done = subprocess.run(
        [sys.executable, "-m", "fineprune", "sanitize", files["keras"], "--data", files["clean"],
         "--trigger-data", files["trigger"], "--out", tmp_path / "out", "--epochs", "1",
         "--mlflow-uri", store.as_uri()],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    run_id = done.stderr.split("mlflow run: ")[1].split()[0]

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(tracking_uri=store.as_uri())
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["option.epochs"] == "1"
    assert run.data.params["verdict"] in ("removed", "may-remain", "no-signature")
    metrics = run.data.metrics
    assert 0.0 <= metrics["sanitized.clean_accuracy"] <= 1.0
    assert "sanitized.attack_success" in metrics and "verdict.before_score" in metrics
    assert metrics["channels_pruned"] >= 0
    logged = {a.path for a in client.list_artifacts(run_id)}
    assert {"sanitized.keras", "report.json", "report.html", "report.png"} <= logged
