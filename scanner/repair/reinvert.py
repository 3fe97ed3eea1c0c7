"""Triggers that still work on a half-repaired prompt: CI's inversion run again against the repair.

A reconstructed trigger approximates the planted one (another family, pattern or place), so re-aligning
the prompt with it can leave part of the backdoor behind (quick zoo: `shapes/badnets` kept 0.17 ASR-ID,
`colours/blended` 0.39 ASR-OOD after one pass). After a first pass the repair therefore asks the detector's
question again of the *repaired* prompt: which trigger still sends clean OOD photos into the suspected
target, beyond what it does to the zero-shot twin? Those triggers join the repair set under true labels
for a second pass. The twin term keeps out triggers that merely paint the target's natural evidence
(unlearning those would teach the prompt to ignore real evidence of the class).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from scanner.engine.ci import invert_for, split_pool, trusted_twin
from scanner.engine.config import DetectorConfig
from scanner.engine.invert import frozen_learner
from scanner.prompting.classifier import PromptedCLIP


def residual_triggers(model: PromptedCLIP, target: int, ood: torch.Tensor, families: Sequence[str],
                      images: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Raw triggers (one per family of ``families``) inverted against ``model`` for ``target`` on the first
    ``images`` of the unlabelled ``ood`` images (M, 3, S, S), with CI's default search settings."""
    cfg = DetectorConfig(families=tuple(families), n_images=min(images, ood.shape[0])).on(ood.device)
    x = split_pool(ood, cfg)[0]  # the optimisation split, as a detection would take it
    out = []
    with frozen_learner(model):
        twin, _ = trusted_twin(model, x, cfg)
        for fam in families:
            out.append(invert_for(model, twin, target, fam, x, cfg, gen).raw())
    return out
