"""The whole defense, stage by stage: load, profile and choose k, cut, fine-tune, report.

The CLI, the Celery worker and the tests all call `sanitize`. It reports progress through a
callback and checks for cancellation between stages; it knows nothing of HTTP or queues.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from fineprune.data.near_copies import near_copies, near_copy_warning
from fineprune.data.splits import Splits, load_splits
from fineprune.errors import CancelledError
from fineprune.load.loading import load_untrusted_model, save_model
from fineprune.load.model import OutputKind, model_signature, output_kind, predict
from fineprune.prune.channels import count_parameters
from fineprune.prune.decide import Pruning, check_cut, profile_and_choose
from fineprune.prune.graph import ModelGraph, classifier_head, inline_nested_models
from fineprune.prune.surgery import CutResult, cut
from fineprune.report.assemble import assemble
from fineprune.report.files import write_report_files
from fineprune.report.metrics import measure, stage_metrics
from fineprune.tune.recipe import Recipe, Research, resolve_recipe
from fineprune.tune.stage import Tuning, tune_stage
from fineprune.verdict.scan import ScanResult
from fineprune.verdict.verdict import Detection, conclude, detect
from schemas.options import SanitizeOptions
from schemas.report import (
    DetectorReading,
    PruneDecision,
    SanitizeReport,
    StageMetrics,
    Verdict,
)

STAGES = ("load", "profile", "cut", "fine-tune", "report")
Progress = Callable[[str, float], None]
PathLike = str | os.PathLike[str]


def sanitize(
    model: PathLike,
    data: PathLike,
    out: PathLike,
    options: SanitizeOptions | None = None,
    *,
    trigger_data: PathLike | None = None,
    test_data: PathLike | None = None,
    progress: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
    research: Research | None = None,
) -> SanitizeReport:
    """Sanitize the model file `model` with the clean samples in `data` (.npz with x, y and
    optionally groups); write `sanitized.keras` and the report files into `out`.

    `trigger_data` (x with y_target or target) is only measured, never used to choose;
    `test_data` replaces the holdout as the split accuracy is reported on.
    """
    options = options or SanitizeOptions()
    research = research or Research()
    paths = _Paths(model, data, out, trigger_data, test_data)
    run = _Run(progress or (lambda stage, fraction: None), should_cancel or (lambda: False))
    keras.utils.set_random_seed(options.seed)
    paths.out.mkdir(parents=True, exist_ok=True)
    warnings: list[str] = []

    with run.stage("load"):
        delivered, info = load_untrusted_model(paths.model)
        parameters = count_parameters(delivered)
        delivered = _flatten(delivered, options, research, warnings)
        splits = _load_data(paths, delivered, options, research, warnings)
        copies = near_copies(splits.evaluation.x, splits.tune.x, seed=options.seed)
        if copies is not None and (warning := _copies_warning(copies, splits)):
            warnings.append(warning)

    with run.stage("profile") as step:
        kind = output_kind(predict(delivered, splits.evaluation.x[:256]))
        before = _detect(delivered, splits, options.seed, kind, warnings)
        pruning = profile_and_choose(delivered, splits, options, step) if options.prunes else None
        baseline = _baseline(delivered, pruning, splits)

    with run.stage("cut"):
        cut_result = _cut(delivered, pruning, options, splits, warnings)
        pruned_metrics = measure(cut_result.model, splits)

    with run.stage("fine-tune") as step:
        sanitized, tuning, found = cut_result.model, None, None
        if options.fine_tunes:
            sanitized, tuning, found = _fine_tune(
                delivered, cut_result, pruning, splits, options, research, kind, run, step, before,
                warnings,
            )  # fmt: skip
        final_metrics = pruned_metrics if tuning is None else measure(sanitized, splits)

    with run.stage("report"):
        changed = before is not None and options.changes_the_model
        after = _detect(sanitized, splits, options.seed, kind, []) if changed else None
        verdict = _verdict(before, after, final_metrics)
        sanitized_path = paths.out / "sanitized.keras"
        save_model(sanitized, sanitized_path)
        report = assemble(
            model_path=paths.model,
            model_format=info.format,
            parameters=parameters,
            sanitized_path=sanitized_path,
            sanitized=sanitized,
            data_path=paths.data,
            test_path=paths.test,
            trigger_path=paths.trigger,
            splits=splits,
            near_copies=None if copies is None else round(copies.share, 4),
            options=options,
            research=research,
            pruning=pruning,
            cut=cut_result,
            decision=_decision(pruning, options),
            metrics=(baseline, pruned_metrics, final_metrics),
            tuning=tuning,
            scan=found,
            verdict=verdict,
            timings=run.timings,
            warnings=warnings,
        )
        write_report_files(report, paths.out)
    report.timings.update(run.timings)
    (paths.out / "report.json").write_text(report.model_dump_json(indent=2))
    return report


@dataclass
class _Paths:
    model: Path
    data: Path
    out: Path
    trigger: Path | None
    test: Path | None

    def __init__(self, model, data, out, trigger=None, test=None) -> None:
        self.model, self.data, self.out = Path(model), Path(data), Path(out)
        self.trigger = None if trigger is None else Path(trigger)
        self.test = None if test is None else Path(test)


@dataclass
class _Run:
    progress: Progress
    should_cancel: Callable[[], bool]
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[Callable[[float], None]]:
        if self.should_cancel():
            raise CancelledError(f"cancelled before stage {name!r}")
        started = time.perf_counter()
        self.progress(name, 0.0)
        yield lambda fraction: self.progress(name, fraction)
        self.timings[name] = round(time.perf_counter() - started, 3)
        self.progress(name, 1.0)


def _flatten(
    model: keras.Model, options: SanitizeOptions, research: Research, warnings: list[str]
) -> keras.Model:
    """Nested models inlined when their layers must be pruned or re-initialized."""
    feature_shift = research.method == "feature-shift" and options.fine_tunes
    if options.prunes or feature_shift:
        model, inlined = inline_nested_models(model)
        if inlined:
            warnings.append(
                f"nested model(s) {', '.join(inlined)} were inlined so that their layers "
                "can be pruned or re-initialized; the sanitized model is one flat model"
            )
    if feature_shift:
        classifier_head(model)  # fail now, not after profiling, if there is no Dense head
    return model


def _load_data(
    paths: _Paths,
    model: keras.Model,
    options: SanitizeOptions,
    research: Research,
    warnings: list[str],
) -> Splits:
    return load_splits(
        paths.data,
        paths.test,
        paths.trigger,
        model_signature(model),
        options,
        research.validation_fraction,
        warnings,
    )


def _copies_warning(copies, splits: Splits) -> str | None:
    return near_copy_warning(copies, splits.evaluation_name, splits.holdout_groups > 0)


def _baseline(model: keras.Model, pruning: Pruning | None, splits: Splits):
    """The delivered model's rates: k = 0 of the sweep when it ran, else one pass."""
    if pruning is None:
        return measure(model, splits)
    first = pruning.curve[0]
    return stage_metrics(first.evaluation_accuracy, first.attack_success_rate, splits)


def _cut(
    model: keras.Model,
    pruning: Pruning | None,
    options: SanitizeOptions,
    splits: Splits,
    warnings: list[str],
) -> CutResult:
    if pruning is None:
        return CutResult(model, "none", f"defense {options.defense} does not prune", [], [])
    result = cut(model, pruning.path, pruning.channels)
    if warning := check_cut(pruning, result, splits.evaluation.x[:64]):
        warnings.append(warning)
    return result


def _decision(pruning: Pruning | None, options: SanitizeOptions) -> PruneDecision:
    if pruning is not None:
        return pruning.decision
    return PruneDecision(rule="none", pruned=0, reason=f"defense {options.defense} does not prune")


def _fine_tune(
    delivered: keras.Model,
    cut_result: CutResult,
    pruning: Pruning | None,
    splits: Splits,
    options: SanitizeOptions,
    research: Research,
    kind: OutputKind,
    run: _Run,
    progress: Callable[[float], None],
    before: Detection | None,
    warnings: list[str],
) -> tuple[keras.Model, Tuning, ScanResult | None]:
    """The recipe for the cut model, the scan's proxy where it asks for one, and the runs."""
    pruned = cut_result.model
    plan = _plan(pruned, pruning, options, research, before, warnings)
    recipe, found, proxy = plan
    sanitized, tuning = tune_stage(
        delivered,
        pruned,
        splits,
        recipe,
        kind,
        proxy,
        cut_result.zeroed_weights,
        options.max_accuracy_drop,
        progress,
        run.should_cancel,
    )
    if tuning.fallback_reason:
        warnings.append(tuning.fallback_reason)
    return sanitized, tuning, found


def _plan(
    pruned: keras.Model,
    pruning: Pruning | None,
    options: SanitizeOptions,
    research: Research,
    before: Detection | None,
    warnings: list[str],
) -> tuple[Recipe, ScanResult | None, np.ndarray | None]:
    """The recipe for `pruned`, and the trigger scan's proxy where the recipe trains on one.

    The scan is the detector's, read on the delivered model, where a backdoor is whole and
    stands out most.
    """
    head = [] if pruning is None else ModelGraph(pruned).downstream_layers(pruning.path.layer.name)
    recipe = resolve_recipe(options, research, pruned, head)
    if not recipe.proxy_share:
        return recipe, None, None
    found = None if before is None else before.scan
    if found is not None and found.suspect is None:
        warnings.append(
            "the trigger scan found no class that stands out; fine-tuned without a proxy trigger"
        )
    proxy = None if found is None else found.perturbation
    if proxy is None:  # nothing to unlearn with: the recipe's rules take their other branch
        recipe = resolve_recipe(options, research, pruned, head, proxy_found=False)
    return recipe, found, proxy


def _detect(
    model: keras.Model, splits: Splits, seed: int, kind: OutputKind, warnings: list[str]
) -> Detection | None:
    """The detector on `model` with the tuning images; None (and why) where it cannot run."""
    try:
        return detect(model, splits.train.x, splits.train.y, seed, from_logits=kind == "logits")
    except ValueError as exc:  # one output, or one class in the clean data
        warnings.append(f"trigger scan skipped: {exc}; no verdict without it")
        return None


def _verdict(
    before: Detection | None, after: Detection | None, final: StageMetrics
) -> Verdict | None:
    if before is None:
        return None
    asr = final.attack_success_rate
    found = conclude(before, after, None if asr is None else asr.value)
    return Verdict(
        conclusion=found.conclusion,
        reason=found.reason,
        measured=found.measured,
        before=_reading(before),
        after=None if after is None else _reading(after),
    )


def _reading(found: Detection) -> DetectorReading:
    return DetectorReading(
        method=found.method,
        suspect=found.suspect,
        score=round(found.score, 3),
        threshold=found.threshold,
        seconds=found.seconds,
    )
