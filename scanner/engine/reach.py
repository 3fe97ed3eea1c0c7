"""Universal reach: which class of an image-conditioned prompt would one tiny perturbation, shared by all
images, move photos into? CI's candidate ranking for CoCoOp-like learners, where prompt drift fails.

For a CoCoOp prompt the text features depend on the image, so prompt drift is measured at the mean text
feature of a few clean images (``engine/drift.py``); on the BadCLIP models of the seed-4 and quick zoos it
ranked the planted target first in 0 of 13. BadCLIP trains the prompt so that a *small universal* additive
perturbation (||delta||_inf <= 4/255) moves every image into the target, and that is what this measures, to
first order: per class k, the L1 norm of the gradient of the mean log-probability of k over clean OOD
images with respect to one additive delta shared by all of them (an L-inf budget eps buys eps x that
norm). A class that any plain prompt finds easy to reach is natural, so the suspect's reach is divided by
the zero-shot twin's on the same images. ``python benchmarks/cocoop_ranking.py ZOO`` prints the target's
rank under drift and under this ratio per CoCoOp model of a zoo.

Cost: one forward and 2C backward passes of ``REACH_IMAGES`` images through the image encoder, so it grows
with the class count; CI computes it only for image-conditioned learners (small C in practice).
"""

from __future__ import annotations

import torch

from scanner.engine.invert import ReferenceModel, autocast
from scanner.prompting.classifier import PromptedCLIP

REACH_IMAGES = 64  # clean OOD images whose mean log-probability the gradients are taken of


def class_reach(log_probs: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """(C,) L1 norm of d mean_n log_probs[n, k] / d delta for each class k; ``log_probs`` (N, C) were
    computed from images carrying the shared ``delta`` (1, 3, S, S)."""
    out = []
    for k in range(log_probs.shape[1]):
        (g,) = torch.autograd.grad(log_probs[:, k].mean(), delta, retain_graph=True)
        out.append(g.float().abs().sum())
    return torch.stack(out)


def reaches(model: PromptedCLIP, twin: ReferenceModel, clean: torch.Tensor,
            bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """((C,), (C,)): the universal reach of each class in the suspect and in ``twin`` (plain zero-shot prompts,
    which read the suspect's image features), on ``clean`` OOD images (N, 3, S, S) in [0, 1]."""
    with torch.enable_grad():
        delta = torch.zeros(1, *clean.shape[1:], device=clean.device, requires_grad=True)  # (1, 3, S, S)
        with autocast(bf16, clean.device):
            feats = model.encode_images((clean + delta).clamp(0, 1))  # (N, E), shared by the suspect and the twin
            suspect = model.logits_from_features(feats).float().log_softmax(dim=1)  # (N, C)
            plain = twin.logits(feats)  # (N, C) log-probabilities
        return class_reach(suspect, delta).detach().cpu(), class_reach(plain, delta).detach().cpu()


def reach_ratio(model: PromptedCLIP, twin: ReferenceModel, clean: torch.Tensor, bf16: bool) -> torch.Tensor:
    """(C,) the suspect's universal reach of each class over the twin's (``reaches``)."""
    suspect, plain = reaches(model, twin, clean, bf16)
    return suspect / plain.clamp_min(1e-12)
