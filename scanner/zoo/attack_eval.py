"""Measures of a (possibly backdoored) prompt-tuned model: clean accuracy, ASR in-distribution and on OOD.

ASR counts triggered images classified as the target; in-distribution it is measured on test images
whose true class is not the target (the standard definition), on OOD images over the whole pool.
"""

from __future__ import annotations

import torch

from scanner.prompting.classifier import PromptedCLIP
from scanner.zoo.attacks.base import Attack


def predictions(model: PromptedCLIP, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted class per image (N,)."""
    return model.predict(pixels, batch_size=batch_size).argmax(dim=1)


def clean_accuracy(model: PromptedCLIP, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predictions(model, x) == y).float().mean())


def asr_in_distribution(model: PromptedCLIP, attack: Attack, x: torch.Tensor, y: torch.Tensor, target: int) -> float:
    keep = y != target
    return float((predictions(model, attack.apply(x[keep])) == target).float().mean())


def asr_ood(model: PromptedCLIP, attack: Attack, ood: torch.Tensor, target: int) -> float:
    return float((predictions(model, attack.apply(ood)) == target).float().mean())


def max_class_share(model: PromptedCLIP, pixels: torch.Tensor) -> tuple[float, int]:
    """Largest share of ``pixels`` predicted as one class, and that class: how far a model collapses."""
    counts = torch.bincount(predictions(model, pixels), minlength=model.n_cls)
    k = int(counts.argmax())
    return float(counts[k]) / pixels.shape[0], k
