"""The verdict a pipeline acts on: was a backdoor suspected, and is it shown to be gone?

The detector (`detect`) runs on the delivered model and again on the sanitized one. Its
conclusion is one of three words:
- `no-signature`: the detector suspected no class in the delivered model. That is not a proof
  of health: backdoors the detector cannot see (docs/experiments/detect.md says which) pass.
- `removed`: a class was suspected and its signature is gone after sanitizing, in a way that on
  the victim zoo went with a measured attack success of at most 2 %; or, with trigger data, the
  measured attack success is at most `max_asr`.
- `may-remain`: anything else. Where the product cannot show a backdoor is gone, it says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import keras
import numpy as np

from fineprune.verdict.scan import ANOMALY_THRESHOLD, ScanResult, scan

Conclusion = Literal["no-signature", "removed", "may-remain"]
DEFAULT_MAX_ASR = 0.02
# Whether a signature that vanished after sanitizing may be read as "removed" without trigger
# data. Set from the zoo: only where that reading went with a measured ASR of at most 2 % on
# every victim of the tune half (docs/experiments/detect.md). Until the zoo shows it, no.
SIGNATURE_GONE_MEANS_REMOVED = False


@dataclass(frozen=True)
class Detection:
    method: str
    suspect: int | None
    score: float  # the suspect's (or the top class's) anomaly
    threshold: float
    seconds: float
    scan: ScanResult | None = None  # the scan itself, whose proxy fine-tuning may unlearn


def detect(
    model: keras.Model, x: np.ndarray, y: np.ndarray, seed: int, from_logits: bool
) -> Detection:
    """The product's detector on one model: the trigger-free universal-perturbation scan."""
    found = scan(model, x, y, seed, from_logits=from_logits)
    score = float(max(found.anomaly))
    return Detection("universal-perturbation", found.suspect, score, ANOMALY_THRESHOLD,
                     found.seconds, found)  # fmt: skip


@dataclass(frozen=True)
class Verdict:
    conclusion: Conclusion
    reason: str
    measured: bool  # whether trigger data decided


def conclude(
    before: Detection,
    after: Detection | None,
    attack_success: float | None,
    max_asr: float = DEFAULT_MAX_ASR,
) -> Verdict:
    """The conclusion from the detector before and after, or from a measured attack success."""
    if attack_success is not None:
        if attack_success <= max_asr and after is None:  # nothing was changed: none to remove
            return Verdict(
                "no-signature",
                f"measured attack success {attack_success:.1%} on the trigger data is at most "
                f"{max_asr:.1%}",
                True,
            )
        if attack_success <= max_asr:
            return Verdict(
                "removed",
                f"measured attack success {attack_success:.1%} on the trigger data is at most "
                f"{max_asr:.1%}",
                True,
            )
        return Verdict(
            "may-remain",
            f"measured attack success {attack_success:.1%} on the trigger data is above "
            f"{max_asr:.1%}",
            True,
        )
    if before.suspect is None:
        return Verdict(
            "no-signature",
            f"the detector suspected no class (top anomaly {before.score:.2f}, threshold "
            f"{before.threshold:g}); this is not proof that no backdoor is there",
            False,
        )
    gone = after is not None and after.suspect != before.suspect and after.score < after.threshold
    if gone and SIGNATURE_GONE_MEANS_REMOVED:
        return Verdict(
            "removed",
            f"class {before.suspect} stood out (anomaly {before.score:.2f}) and no class stands "
            f"out after sanitizing ({after.score:.2f} < {after.threshold:g})",
            False,
        )
    if after is None:
        return Verdict(
            "may-remain",
            f"class {before.suspect} stands out (anomaly {before.score:.2f}) and nothing was "
            "changed",
            False,
        )
    if gone:
        return Verdict(
            "may-remain",
            f"class {before.suspect} stood out (anomaly {before.score:.2f}); after sanitizing "
            f"no class does ({after.score:.2f}), but on the victim zoo that has not been shown "
            "to mean the backdoor is gone: measure with trigger data",
            False,
        )
    still = (
        ""
        if after is None
        else f" and after sanitizing class {after.suspect} stands out ({after.score:.2f})"
    )
    return Verdict(
        "may-remain",
        f"class {before.suspect} stood out (anomaly {before.score:.2f}){still}",
        False,
    )
