"""`docs/study.md`, written from the numbers `study.reproduce` measured; nothing is typed in.

Every sentence that states a result is built from results.json and the saved reports, so a
re-run that measures something else says something else.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from fineprune.tune.recipe import SAM_RADIUS, Research
from schemas.report import SanitizeReport
from study.figures import TITLES

DEFENSE_NAMES = {
    "none": "none (as delivered)",
    "pruning": "pruning alone",
    "fine-tuning": "fine-tuning alone",
    "fine-pruning": "fine-pruning",
    "ft-sam": "FT-SAM",
    "fine-pruning-sam": "pruning, then FT-SAM",
    "fst": "FST",
    "fine-pruning-fst": "pruning, then FST",
    "bau": "BAU (adversarial unlearning)",
    "fine-pruning-bau": "pruning, then BAU",
}
PAPER_DEFENSES = ("pruning", "fine-tuning", "fine-pruning")
SUCCESS_BAR = 0.05  # attack success we call "removed"
COST_BAR = 4.0  # points of clean accuracy the paper's rule allows
PRODUCT_SUCCESS_BAR = 0.02  # the product's target: at most 2 % attack success...
PRODUCT_COST_BAR = 2.0  # ...for at most 2 points of clean accuracy
TRIGGERED = {
    "badnets": "stickered Stop signs",
    "pruning-aware": "stickered Stop signs",
    "blended": "Stop signs under the blended pattern",
}


SHORT = {"badnets": "BadNets", "pruning-aware": "pruning-aware", "blended": "blended"}


def _standard_error(rate: float, samples: int) -> float:
    """Points of one standard error of a rate measured on `samples` images."""
    return 100 * (rate * (1 - rate) / samples) ** 0.5


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _points(after: float, before: float) -> str:
    return f"{100 * (after - before):+.1f}"


def outcome(results: dict, attack: str, defense: str) -> dict:
    """Clean accuracy and attack success after `defense` (or before any, for "none")."""
    runs = results["attacks"][attack]["defenses"]
    if defense == "none":
        return runs["fine-pruning"]["before"] | {"channels_pruned": 0}
    run = runs[defense]
    return run["after"] | {"channels_pruned": run["channels_pruned"]}


def defenses(results: dict, attack: str) -> list[str]:
    """The defenses this run measured against `attack`, in the table's order."""
    ran = results["attacks"][attack]["defenses"]
    return [d for d in DEFENSE_NAMES if d in ran]


def meets_product_bar(results: dict, attack: str, defense: str) -> bool:
    base = outcome(results, attack, "none")
    row = outcome(results, attack, defense)
    cost = 100 * (base["clean_accuracy"] - row["clean_accuracy"])
    return (row["attack_success_rate"] or 0.0) <= PRODUCT_SUCCESS_BAR and cost <= PRODUCT_COST_BAR


def table(results: dict) -> str:
    lines = [
        "| attack | defense | channels pruned | clean accuracy | change | attack success "
        f"| within {100 * PRODUCT_SUCCESS_BAR:g} % at {PRODUCT_COST_BAR:g} pts |",
        "|---|---|---:|---:|---:|---:|:---:|",
    ]
    for attack, entry in results["attacks"].items():
        channels = entry["defenses"]["fine-pruning"]["channels"]
        base = outcome(results, attack, "none")
        for defense in ["none", *defenses(results, attack)]:
            row = outcome(results, attack, defense)
            prunes = entry["defenses"].get(defense, {}).get("channels") is not None
            pruned = f"{row['channels_pruned']} / {channels}" if prunes else "0"
            change = (
                "" if defense == "none" else _points(row["clean_accuracy"], base["clean_accuracy"])
            )
            bar = "" if defense == "none" else _tick(meets_product_bar(results, attack, defense))
            lines.append(
                f"| {TITLES.get(attack, attack)} | {DEFENSE_NAMES[defense]} | {pruned} | "
                f"{_pct(row['clean_accuracy'])} | {change} | {_pct(row['attack_success_rate'])} "
                f"| {bar} |"
            )
    return "\n".join(lines)


def _tick(ok: bool) -> str:
    return "yes" if ok else "no"


def _verdict(results: dict) -> tuple[bool, list[str]]:
    holds, notes = True, []
    for attack in results["attacks"]:
        base = outcome(results, attack, "none")
        after = outcome(results, attack, "fine-pruning")
        cost = 100 * (base["clean_accuracy"] - after["clean_accuracy"])
        removed = (after["attack_success_rate"] or 0.0) <= SUCCESS_BAR
        if not removed or cost > COST_BAR:
            holds = False
        notes.append(
            f"against the {SHORT.get(attack, attack)} attack, fine-pruning took attack success "
            f"from {_pct(base['attack_success_rate'])} to {_pct(after['attack_success_rate'])} "
            f"for {cost:.1f} points of clean accuracy"
        )
    return holds, notes


def _attack_paragraph(results: dict, attack: str) -> str:
    entry = results["attacks"][attack]
    base = outcome(results, attack, "none")
    pruned = outcome(results, attack, "pruning")
    tuned = outcome(results, attack, "fine-tuning")
    fp = outcome(results, attack, "fine-pruning")
    channels = entry["defenses"]["fine-pruning"]["channels"]
    text = (
        f"**{TITLES.get(attack, attack)}.** As delivered the model classifies "
        f"{_pct(base['clean_accuracy'])} of the clean test images correctly and sends "
        f"{_pct(base['attack_success_rate'])} of the {TRIGGERED.get(attack, 'triggered inputs')} "
        "to the target. "
        f"Pruning alone stopped at {pruned['channels_pruned']} of {channels} channels and left "
        f"{_pct(pruned['attack_success_rate'])} attack success; fine-tuning alone left "
        f"{_pct(tuned['attack_success_rate'])}; fine-pruning left "
        f"{_pct(fp['attack_success_rate'])} at {_pct(fp['clean_accuracy'])} clean accuracy "
        f"({_points(fp['clean_accuracy'], base['clean_accuracy'])} points)."
    )
    beyond = [d for d in defenses(results, attack) if d not in PAPER_DEFENSES]
    if beyond:
        parts = []
        for d in beyond:
            row = outcome(results, attack, d)
            parts.append(
                f"{DEFENSE_NAMES[d]} left {_pct(row['attack_success_rate'])} "
                f"({_points(row['clean_accuracy'], base['clean_accuracy'])} points)"
            )
        text += " Beyond the paper: " + "; ".join(parts) + "."
    if "decoys" in entry:
        clean = entry["clean_model"]
        text += (
            f" The attacker's clean model scored {_pct(clean['clean_accuracy'])} "
            f"({_pct(clean['attack_success_rate'])} of stickered Stop signs already read as the "
            f"target by chance); it pruned {len(entry['decoys'])} channels, embedded the backdoor "
            f"in the other {channels - len(entry['decoys'])}, and reinstated the pruned ones with "
            f"their biases lowered by {entry['bias_shift_mean']:.2f} on average."
        )
    return text


def _kept_after_pruning(results: dict, reports: dict[str, SanitizeReport]) -> str:
    """Where the defender's surviving channels sit relative to the attacker's decoys."""
    entry = results["attacks"].get("pruning-aware")
    report = reports.get("pruning-aware-fine-pruning")
    if entry is None or report is None or report.surgery is None:
        return ""
    channels = report.surgery.channels_before
    kept = set(range(channels)) - set(report.surgery.removed_channels)
    decoys = set(entry["decoys"])
    tuned = outcome(results, "pruning-aware", "fine-tuning")["attack_success_rate"] or 0.0
    pruned_then_tuned = outcome(results, "pruning-aware", "fine-pruning")["attack_success_rate"]
    compare = (
        "Fine-tuning the whole, unpruned model did better here."
        if tuned < (pruned_then_tuned or 0.0)
        else "Fine-tuning the whole, unpruned model did no better."
    )
    return (
        f"After the defender's pruning, {len(kept)} channels remain, {len(kept - decoys)} of them "
        f"among the {channels - len(decoys)} the attacker trained with the backdoor: pruning "
        "removed every decoy and then stopped inside the backdoored channels, so fine-tuning "
        "had to unlearn the backdoor with only those left. " + compare
    )


def render(results: dict, reports: dict[str, SanitizeReport], figures_dir: Path, doc: Path) -> str:
    config, data = results["config"], results["data"]
    holds, notes = _verdict(results)
    rel = os.path.relpath(figures_dir, doc.parent)
    attacks = list(results["attacks"])
    any_report = next(iter(reports.values()))
    options = any_report.options
    research = Research(**any_report.research)
    radius = research.sharpness_radius
    sam_radius = SAM_RADIUS if radius == "auto" else radius
    minutes = results["seconds"] / 60
    machine = results["machine"]
    pa = results["attacks"].get("pruning-aware")
    figures = "\n\n".join(
        f"![Pruning curve, {TITLES.get(a, a)}]({rel}/pruning-{a}.png)" for a in attacks
    )
    sections = [
        "# Fine-pruning on traffic signs: the seed study, reproduced",
        "",
        f"> Generated by `make reproduce` on {datetime.now(UTC):%Y-%m-%d}: "
        f"{minutes:.0f} minutes on {machine['cpus']} CPU cores "
        f"({results.get('cpu_seconds', 0) / 60:.0f} CPU-minutes)"
        f"{' and a GPU' if machine['gpu'] else ''}. Every number and figure below was measured "
        "by that run (raw numbers in `docs/study/results.json`, one sanitize report per attack "
        "and defense in `docs/study/reports/`). Do not edit by hand: change the code and re-run.",
        "",
        "## Question",
        "",
        "Liu, Dolan-Gavitt and Garg (Fine-Pruning, RAID 2018) claim that pruning the channels "
        "clean data leaves dormant removes much of a backdoor, that a pruning-aware attacker "
        "defeats pruning alone, and that pruning followed by brief fine-tuning (fine-pruning) "
        "defeats both. The seed study set out to check this on traffic signs with a Keras CNN "
        "and stopped before its figures. This is that study, run end to end with the same "
        "engine the fineprune service runs.",
        "",
        "## Method",
        "",
        f"- **Data.** GTSRB at 32x32, {len(data['classes'])} classes "
        f"({', '.join(data['classes'])}). Training images come in tracks of one physical sign; "
        f"tracks are split between the attacker ({data['attacker_images']} images) and the "
        f"defender's pool ({data['defender_pool']}), so the two never share a sign. The "
        f"defender draws {data['defender_images']} clean images from its pool. Every clean "
        f"accuracy is measured on the official GTSRB test images of these classes "
        f"({data['test_images']} images, never trained on by anyone).",
        "- **Model.** The seed CNN exactly as the study's table gives it (three 5x5 "
        "convolutions with BatchNorm, Dense 512, 4,461,001 parameters). The attacker trains it "
        f"with Adam at 1e-3 for {config['victim_epochs']} epochs, then recomputes the BatchNorm "
        "statistics, as a competent trainer would.",
        f"- **BadNets attack.** A yellow 4x4 sticker on the lower half of the sign; "
        f"{config['poison_share']:.0%} of the attacker's Stop signs are added again with the "
        'sticker and labelled "Go straight or right" (source Stop, target Go straight or '
        "right, like the seed study's poisoned folder). Attack success = the share of the "
        f"{data['test_stop_signs']} test Stop signs, stickered, that the model calls "
        '"Go straight or right".',
        "- **Blended attack** (Chen et al. 2017), harder for fine-pruning in the literature: "
        "instead of a sticker, a fixed random pattern mixed into the whole image at 15 %, on "
        "the same share of Stop signs, with the same target.",
        "- **Pruning-aware attack** (the paper's four steps, `fineprune/pruning_aware.py`): "
        "train on clean data; prune the least active channels of the last convolution "
        + (
            "with the defender's own rule (largest count within a 4-point drop on the "
            "attacker's clean data)"
            if config["attacker_prune_fraction"] is None
            else f"({config['attacker_prune_fraction']:.0%} of them)"
        )
        + f"; train the pruned model on the poisoned set ({config['retrain_epochs']} epochs, "
        f"Adam at {config['retrain_learning_rate']:g}); reinstate the pruned channels with "
        "their original weights and biases lowered until they are dormant on the attacker's "
        "clean data (and BatchNorm's shift set so a dormant channel passes on exactly 0).",
        f"- **Defenses**, each one call of `fineprune.pipeline.sanitize` with the service's "
        f"defaults. *Pruning*: profile `{any_report.surgery.layer if any_report.surgery else '?'}` "
        f"on the defender's images, remove channels in increasing order of mean activation "
        f"(physically: the layer gets narrower), and stop at the largest count whose accuracy "
        f"on the defender's images stays within {options.max_accuracy_drop:g} points. "
        f"*Fine-tuning*: {options.epochs} epochs of {research.optimizer} at "
        f"{options.learning_rate:g} ({research.lr_schedule} decay, BatchNorm frozen) on the "
        f"defender's images, the epoch picked on a {research.validation_fraction:.0%} "
        "validation slice of them. *Fine-pruning*: the first, then the second.",
        "- **Defenses beyond the paper** (issue 6), same data and schedule. *FT-SAM* (Zhu et "
        "al., ICCV 2023): fine-tuning with adaptive sharpness-aware minimization, radius "
        f"{sam_radius:g}. *FST* (feature-shift tuning, Min et al., NeurIPS 2023): "
        "the classifier head is re-initialized and fine-tuned together with the rest, with a "
        f"penalty of {research.shift_strength:g} times its inner product with the original head "
        "and its norm held at the original's. Each also runs after pruning. None of them sees "
        "a trigger.",
        "",
        "## Results",
        "",
        table(results),
        "",
        *[_attack_paragraph(results, a) + "\n" for a in attacks],
        figures,
        "",
        "The dotted line is where the defender stops; the dashed grey line is what the defender "
        "sees (accuracy on its own images), the blue one what it cannot see (the test set).",
        "",
        f"![Fine-tuning curves]({rel}/fine-tuning.png)",
        "",
        "Fine-tuning, epoch by epoch (dashed: fine-tuning alone; solid: after pruning). The dot "
        "marks the epoch the validation slice picked.",
        "",
        "## Against the paper",
        "",
        "The paper's claims, and what we measured:",
        "",
        "- *Pruning alone weakens a plain backdoor but the pruning-aware attack evades it.* "
        + _pruning_claim(results),
        "- *Fine-pruning removes both.* " + "; ".join(notes) + ".",
        "- The abstract reports that fine-pruning in some cases reduced attack success to 0 % "
        "for a 0.4-point loss of clean accuracy. We could not read the paper's per-task tables "
        "(its traffic-sign backdoor attacked a Faster R-CNN on U.S. signs) from this "
        "environment, so we do not quote numbers from them; the comparison above is with the "
        "paper's claims, not its table. Differences in setting are large anyway: a 3-layer "
        "CNN on 32x32 crops instead of a detector, 1,500 defender images, one seed.",
        "",
        "## Conclusion",
        "",
        (
            "The paper's conclusion holds on traffic signs: "
            if holds
            else "The paper's conclusion does not fully hold here: "
        )
        + "; ".join(notes)
        + f" (we call a backdoor removed below {SUCCESS_BAR:.0%} attack success and accept the "
        f"paper's {COST_BAR:g}-point budget).",
        "",
        _best_defenses(results),
        "",
        _product_bar(results),
        "",
        _kept_after_pruning(results, reports),
        "",
        _seed_study_note(results, pa),
        "",
        "## Limits",
        "",
        _rule_gap(results),
        "- One training seed per attack. TensorFlow on CPU is not bit-reproducible, so a "
        "re-run moves these numbers by a few points. Sampling error alone: the test set's "
        f"{data['test_images']} images give a clean accuracy near 95 % a standard error of "
        f"{_standard_error(0.95, data['test_images']):.1f} points; the "
        f"{data['test_stop_signs']} Stop signs give an attack success near 5 % (or 50 %) one "
        f"of {_standard_error(0.05, data['test_stop_signs']):.1f} "
        f"({_standard_error(0.5, data['test_stop_signs']):.1f}) points.",
        "- Every attack here poisons one source class (Stop) with a generous share of it; "
        "all-to-one poisoning and other architectures are measured in README "
        '"How strong the defaults are".',
        f"- Epochs are chosen so the whole run fits 45 minutes on 2 CPU cores "
        f"({config['victim_epochs']} attacker epochs on ~{data['attacker_images']} images); "
        "the seed study trained 100.",
        "",
        "Regenerate everything (models are trained from scratch):",
        "",
        "```",
        "make reproduce",
        "```",
        "",
    ]
    return "\n".join(sections)


def _pruning_claim(results: dict) -> str:
    parts = []
    for attack in results["attacks"]:
        base = outcome(results, attack, "none")
        pruned = outcome(results, attack, "pruning")
        parts.append(
            f"{TITLES.get(attack, attack)}: {_pct(base['attack_success_rate'])} before, "
            f"{_pct(pruned['attack_success_rate'])} after pruning to the 4-point drop"
        )
    return "; ".join(parts) + "."


def _best_defenses(results: dict) -> str:
    """Per attack, the defense with the lowest attack success within the 4-point budget."""
    parts = []
    for attack in results["attacks"]:
        base = outcome(results, attack, "none")["clean_accuracy"]
        affordable = [
            (outcome(results, attack, d)["attack_success_rate"] or 0.0, d)
            for d in defenses(results, attack)
            if 100 * (base - outcome(results, attack, d)["clean_accuracy"]) <= COST_BAR
        ]
        if affordable:
            asr, defense = min(affordable)
            parts.append(f"{SHORT.get(attack, attack)}: {DEFENSE_NAMES[defense]} ({_pct(asr)})")
        else:
            parts.append(f"{SHORT.get(attack, attack)}: none stayed within {COST_BAR:g} points")
    return (
        f"The lowest attack success within {COST_BAR:g} points of clean accuracy on the test set, "
        "per attack: " + "; ".join(parts) + "."
    )


def _product_bar(results: dict) -> str:
    """Which defenses reach the product's target against every attack of this run."""
    attacks = list(results["attacks"])
    every = [
        d
        for d in DEFENSE_NAMES
        if d != "none"
        and all(d in results["attacks"][a]["defenses"] for a in attacks)
        and all(meets_product_bar(results, a, d) for a in attacks)
    ]
    worst = []
    for d in DEFENSE_NAMES:
        if d == "none" or not all(d in results["attacks"][a]["defenses"] for a in attacks):
            continue
        asr = max(outcome(results, a, d)["attack_success_rate"] or 0.0 for a in attacks)
        cost = max(
            100
            * (
                outcome(results, a, "none")["clean_accuracy"]
                - outcome(results, a, d)["clean_accuracy"]
            )
            for a in attacks
        )
        worst.append((asr, cost, d))
    lines = [
        f"The product's target is at most {100 * PRODUCT_SUCCESS_BAR:g} % attack success for at "
        "most "
        f"{PRODUCT_COST_BAR:g} points of clean accuracy on the test set. "
        + (
            "Against every attack here it was reached by: "
            + ", ".join(DEFENSE_NAMES[d] for d in every)
            + "."
            if every
            else "No defense reached it against every attack here."
        ),
        "",
        "| defense | worst attack success | worst accuracy cost |",
        "|---|---:|---:|",
    ]
    for asr, cost, d in sorted(worst):
        lines.append(f"| {DEFENSE_NAMES[d]} | {_pct(asr)} | {cost:.1f} pts |")
    return "\n".join(lines)


def _rule_gap(results: dict) -> str:
    """What the defender's 4-point rule, measured on its own images, cost on the test set."""
    parts = []
    for attack in results["attacks"]:
        base = outcome(results, attack, "none")["clean_accuracy"]
        pruned = outcome(results, attack, "pruning")["clean_accuracy"]
        parts.append(f"{SHORT.get(attack, attack)} {100 * (base - pruned):.1f}")
    return (
        "- The defender stops pruning at a 4-point drop *on its own images*; on the test set "
        "the same pruning cost " + ", ".join(parts) + " points. Its images come from a few "
        "hundred tracks of near-identical frames, so they flatter the model (and the "
        "validation slice that picks the fine-tuning epoch reads close to 100 %)."
    )


def _seed_study_note(results: dict, pa: dict | None) -> str:
    text = (
        'The seed study observed that pruning alone "reduces backdoor success rate by a '
        'tremendous amount" but not enough for a stop sign, and suspected the model had too '
        "few spare channels."
    )
    if pa is not None:
        decoys = len(pa["decoys"])
        channels = pa["defenses"]["fine-pruning"]["channels"]
        text += (
            f" Our pruning-aware attacker found {decoys} of {channels} channels it could prune "
            "within 4 points; those are the decoys a defender prunes first."
        )
    return text
