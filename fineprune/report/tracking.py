"""One sanitize run logged to MLflow: options as parameters, accuracies, attack success, k and
the verdict's scores as metrics, and the report and the sanitized model as artifacts.

Called where a run has ended (the CLI, the worker after its job's process is gone), never
while an untrusted model is loaded. MLflow is an optional dependency (`fineprune[mlflow]`).
"""

from __future__ import annotations

import os
from pathlib import Path

from fineprune.errors import TrackingError
from schemas.report import SanitizeReport

EXPERIMENT = "fineprune"
ARTIFACTS = ("sanitized.keras", "report.json", "report.html", "report.png")


def log_run(report: SanitizeReport, out: Path, uri: str, name: str | None = None) -> str:
    """Log `report` and the files in `out` to the MLflow tracking server or store at `uri`;
    return the run's id."""
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise TrackingError(
            "MLflow logging needs MLflow: pip install 'fineprune[mlflow]'"
        ) from None
    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 keeps its file store for those who ask for it by name: this user did.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
    run = client.create_run(experiment_id, run_name=name or report.input_model.sha256[:12])
    run_id = run.info.run_id
    for key, value in params(report).items():
        client.log_param(run_id, key, value)
    for key, value in metrics(report).items():
        client.log_metric(run_id, key, value)
    for artifact in ARTIFACTS:
        if (out / artifact).exists():
            client.log_artifact(run_id, str(out / artifact))
    client.set_terminated(run_id)
    return run_id


def params(report: SanitizeReport) -> dict[str, str]:
    values = {f"option.{k}": str(v) for k, v in report.options.model_dump().items()}
    values.update({f"research.{k}": str(v) for k, v in report.research.items()})
    values["input_sha256"] = report.input_model.sha256
    values["evaluation_split"] = report.splits.evaluation_split
    if report.verdict is not None:
        values["verdict"] = report.verdict.conclusion
        values["detector"] = report.verdict.before.method
    return values


def metrics(report: SanitizeReport) -> dict[str, float]:
    values: dict[str, float] = {"channels_pruned": float(report.decision.pruned)}
    for stage, measured in (
        ("baseline", report.baseline),
        ("pruned", report.pruned),
        ("sanitized", report.fine_pruned),
    ):
        values[f"{stage}.clean_accuracy"] = measured.clean_accuracy.value
        if measured.attack_success_rate is not None:
            values[f"{stage}.attack_success"] = measured.attack_success_rate.value
    verdict = report.verdict
    if verdict is not None:
        values["verdict.before_score"] = verdict.before.score
        if verdict.after is not None:
            values["verdict.after_score"] = verdict.after.score
    return values
