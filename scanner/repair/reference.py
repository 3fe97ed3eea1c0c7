"""Which class a repair guards, checked against the user's labelled images.

CI names the suspected target from unlabelled OOD photos alone: it ranks classes by how far each prompt drifted from
plain zero-shot prompts, and clean tuning moves prompts too (on the real digits every prompt drifts). A repair has
what CI lacks: labelled images of the task. A fresh prompt tuned on them (the reference) learns the task's drift and
no backdoor, since the repair set holds no planted trigger. The delivered prompt's class drift *from the reference*
keeps what the labelled images do not explain; the class that drifted furthest is the labelled images' suspect.

The repair then guards one class (``RepairConfig.target_guard``, ``ood_avoid_target``): the detection's suspect, or
the labelled images' when that class stands out further in its own ranking (robust anomaly index of the drift from
the reference) than the detection's suspect does in CI's (drift from plain prompts). Measured before it was written
(seed-21 p7 zoo, 33 CSC backdoors, ``runs/s31/relabel.py``, not shipped): the furthest drift from the reference named
the target in 27 of 33 models, CI's ranking in 23; the larger anomaly of the two in 28. Guarding both classes
instead was tried on 11 of those models and made three repaired prompts re-scan as backdoored (docs/history.md,
session 31). Judged on the 33 backdoors of a new seed-22 zoo it failed its pre-registered test and stays an option
(``RepairConfig.reference_suspect``): it changed the guarded class on 4 models, rightly on 2; on a 4-class task it
overrode a right suspect, and that repair's ASR-OOD went 0.00 -> 0.79 (docs/preregistrations.md).

Only prompts that do not read the image are checked: an image-conditioned prompt (CoCoOp) has no class-specific
context, its drift ranks BadCLIP targets poorly (docs/history.md, session 12), and a second tuning pass would take a
CoCoOp repair past a minute on this CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from scanner.engine.drift import DRIFT_FLOOR, class_drift
from scanner.engine.invert import ReferenceModel
from scanner.engine.scoring import anomaly_index
from scanner.prompting.classifier import PromptedCLIP

if TYPE_CHECKING:  # finetune imports this module: the config type only, at check time
    from scanner.repair.config import RepairConfig


@dataclass(frozen=True)
class GuardChoice:
    """The class a repair guards and why: ``named`` is the labelled images' suspect with its anomaly index in the
    drift from the reference, ``suspect_anomaly`` the detection's suspect's in the drift from plain prompts (None
    without a suspect)."""

    guarded: int
    named: int
    named_anomaly: float
    suspect_anomaly: float | None

    def to_dict(self) -> dict[str, float | int | None]:
        return {"guarded": self.guarded, "named": self.named, "named_anomaly": round(self.named_anomaly, 4),
                "suspect_anomaly": None if self.suspect_anomaly is None else round(self.suspect_anomaly, 4)}


@torch.no_grad()
def drift_anomalies(model: PromptedCLIP, reference: PromptedCLIP) -> tuple[torch.Tensor, torch.Tensor]:
    """((C,), (C,)): robust anomaly index of each class's own drift (``engine.drift.class_drift``) of ``model``'s
    text features from ``reference``'s, and from plain zero-shot prompts (CI's ranking)."""
    text = model.text_features().float().cpu()  # (C, E)
    ref = reference.text_features().float().cpu()  # (C, E)
    plain = ReferenceModel(model).text.cpu()  # (T, C, E) the template panel CI's drift reads
    return (anomaly_index(class_drift(text, ref[None]), floor=DRIFT_FLOOR),
            anomaly_index(class_drift(text, plain), floor=DRIFT_FLOOR))


def choose_guard(model: PromptedCLIP, images: torch.Tensor, labels: torch.Tensor, cfg: RepairConfig, seed: int,
                 ood: torch.Tensor | None, suspect: int | None) -> GuardChoice | None:
    """The class to guard (see the module docstring), from a fresh prompt tuned on the labelled ``images``
    (N, 3, S, S) / ``labels`` (N,) and ``ood`` photos pseudo-labelled as a repair does; None for an
    image-conditioned prompt. The reference is a ``reinit`` repair that knows nothing of the detection: no
    reconstructed trigger, no guard, no class kept out of the pseudo-labels."""
    if model.learner.image_conditioned:
        return None
    from scanner.repair.finetune import repair_prompt

    plain = replace(cfg, mode="reinit", target_guard=0.0, ood_avoid_target=False, reference_suspect=False,
                    reinvert_families=())
    reference = repair_prompt(model, images, labels, [], plain, seed=seed, target=None, ood=ood).model
    from_reference, from_plain = drift_anomalies(model, reference)
    named = int(torch.argmax(from_reference))
    named_anomaly = float(from_reference[named])
    if suspect is None:
        return GuardChoice(named, named, named_anomaly, None)
    suspect_anomaly = float(from_plain[suspect])
    guarded = named if named_anomaly > suspect_anomaly else suspect
    return GuardChoice(guarded, named, named_anomaly, suspect_anomaly)
