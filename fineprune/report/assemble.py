"""The report, assembled from what each stage returned: versioned, for machines and people."""

from __future__ import annotations

import platform
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import keras

from fineprune.data.splits import Splits
from fineprune.load.loading import sha256_file
from fineprune.prune.channels import count_parameters
from fineprune.prune.decide import Pruning
from fineprune.prune.surgery import CutResult
from fineprune.tune.loop import FineTuneResult
from fineprune.tune.recipe import Research
from fineprune.tune.stage import Tuning
from fineprune.verdict.scan import ScanResult
from schemas.options import SanitizeOptions
from schemas.report import (
    DataFile,
    EpochRecord,
    FineTuneReport,
    FineTuneRun,
    ModelFile,
    PruneDecision,
    SanitizeReport,
    SplitSizes,
    StageMetrics,
    SurgeryReport,
    TriggerScan,
    Verdict,
)


def assemble(
    *,
    model_path: Path,
    model_format: str,
    parameters: int,
    sanitized_path: Path,
    sanitized: keras.Model,
    data_path: Path,
    test_path: Path | None,
    trigger_path: Path | None,
    splits: Splits,
    near_copies: float | None,
    options: SanitizeOptions,
    research: Research,
    pruning: Pruning | None,
    cut: CutResult,
    decision: PruneDecision,
    metrics: tuple[StageMetrics, StageMetrics, StageMetrics],
    tuning: Tuning | None,
    scan: ScanResult | None,
    verdict: Verdict | None,
    timings: dict[str, float],
    warnings: list[str],
) -> SanitizeReport:
    baseline, pruned, final = metrics
    return SanitizeReport(
        created_at=datetime.now(UTC),
        verdict=verdict,
        input_model=ModelFile(
            sha256=sha256_file(model_path),
            format=model_format,
            bytes=model_path.stat().st_size,
            parameters=parameters,
        ),
        output_model=ModelFile(
            sha256=sha256_file(sanitized_path),
            format="keras",
            bytes=sanitized_path.stat().st_size,
            parameters=count_parameters(sanitized),
        ),
        data=_data_files(data_path, test_path, trigger_path, splits),
        options=options,
        research=research.changed(),
        splits=SplitSizes(
            tune=len(splits.tune),
            validation=len(splits.validation),
            evaluation=len(splits.evaluation),
            evaluation_split=splits.evaluation_name,
            groups=splits.holdout_groups,
            near_copies=near_copies,
            trigger=len(splits.trigger) if splits.trigger is not None else 0,
        ),
        surgery=None if pruning is None else _surgery(pruning, cut),
        curve=[] if pruning is None else pruning.curve,
        decision=decision,
        baseline=baseline,
        pruned=pruned,
        fine_pruned=final,
        fine_tuning=None if tuning is None else _tuning(tuning, scan),
        timings=timings,
        versions=_versions(),
        seed=options.seed,
        warnings=warnings,
    )


def _surgery(pruning: Pruning, cut: CutResult) -> SurgeryReport:
    path, removed = pruning.path, cut.mode == "removed"
    return SurgeryReport(
        layer=path.layer.name,
        channels_before=path.channels,
        channels_after=path.channels - len(pruning.channels) if removed else path.channels,
        removed_channels=[int(c) for c in pruning.channels],
        mode=cut.mode,
        mode_reason=cut.reason,
        adjusted_layers=cut.adjusted_layers,
        mean_activations=pruning.mean_activations,
        profiled_at=path.profile_layer,
    )


def _tuning(tuning: Tuning, scan: ScanResult | None) -> FineTuneReport:
    result, recipe = tuning.result, tuning.result.recipe
    return FineTuneReport(
        method=recipe.method,
        learning_rate=recipe.learning_rate,
        sharpness_radius=recipe.sharpness_radius,
        unlearning_radius=recipe.unlearning_radius,
        distillation=recipe.distillation,
        synthetic_triggers=recipe.synthetic_triggers if result.stamped else 0.0,
        frozen_layers=list(recipe.frozen_layers),
        trigger_scan=_scan(scan, recipe.proxy_share),
        reinitialized_layer=result.reinitialized_layer,
        selected_on="last" if recipe.epoch_choice == "last" else "validation",
        fallback_reason=tuning.fallback_reason,
        epochs_run=len(result.history),
        best_epoch=result.best_epoch,
        history=[EpochRecord(**r) for r in result.history],
        averaged_runs=[_run(r) for r in tuning.runs],
        averaged_validation_accuracy=tuning.averaged_validation_accuracy,
        extrapolation=recipe.extrapolation,
    )


def _run(result: FineTuneResult) -> FineTuneRun:
    kept = result.history[result.best_epoch - 1] if result.best_epoch else {}
    return FineTuneRun(
        seed=result.recipe.seed,
        epochs_run=len(result.history),
        best_epoch=result.best_epoch,
        validation_accuracy=kept.get("val_accuracy", 0.0),
        attack_success_rate=kept.get("attack_success_rate"),
        history=[EpochRecord(**r) for r in result.history],
    )


def _scan(found: ScanResult | None, share: float) -> TriggerScan | None:
    if found is None:
        return None
    return TriggerScan(
        radius=found.radius,
        success=list(found.success),
        anomaly=list(found.anomaly),
        suspect=found.suspect,
        share=share,
        seconds=found.seconds,
    )


def _data_files(
    data_path: Path, test_path: Path | None, trigger_path: Path | None, splits: Splits
) -> list[DataFile]:
    clean_samples = len(splits.tune) + (0 if test_path else len(splits.evaluation))
    files = [DataFile(sha256=sha256_file(data_path), samples=clean_samples, role="clean")]
    if test_path is not None:
        files.append(
            DataFile(sha256=sha256_file(test_path), samples=len(splits.evaluation), role="test")
        )
    if trigger_path is not None and splits.trigger is not None:
        files.append(
            DataFile(sha256=sha256_file(trigger_path), samples=len(splits.trigger), role="trigger")
        )
    return files


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("fineprune", "keras", "tensorflow", "numpy", "h5py"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions
