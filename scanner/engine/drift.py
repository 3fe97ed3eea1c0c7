"""Prompt drift: how far each class's prompt has moved its text feature away from plain zero-shot prompts.

The encoders are frozen and public, so a prompt backdoor can live only in the prompt. To send triggered
images of *every* class to the target, the target's prompt must pull its text feature towards the
trigger's image features, away from where plain prompts ("a photo of a {class}") put the class; the
other prompts only learn their own class. A class-specific drift that stands out among the classes
therefore names the likely target before any image is optimised.

Measured on the full zoo (the ``candidate`` of each row of ``scanner zoo eval``): the most drifted class
was the planted target in 29 of 37 backdoored CoOp models (BadNets, Blended, WaNet and one
class-specific BadCLIP), at no image cost. It is a *ranking*, not a verdict: clean prompts drift too
(a clean model's most drifted class is as far out as a backdoored one's), so CI confirms the top
class with trigger inversion. For CoCoOp, whose text features depend on the image, the drift of the
mean text feature over a few clean images is used; it ranked the target first in only 2 of 11 BadCLIP
models (shared context, no class-specific prompt to drift).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scanner.prompting.classifier import PromptedCLIP

DRIFT_IMAGES = 16  # clean images whose mean text feature stands for an image-conditioned prompt
DRIFT_FLOOR = 1e-3  # lower bound on the MAD of the per-class drifts (unit-norm feature units)


def prompt_drift(model: PromptedCLIP, zero_shot_text: torch.Tensor, clean_features: torch.Tensor) -> torch.Tensor:
    """Per class (C,): how far the suspect's prompt moved the class's text feature from plain prompts.

    ``zero_shot_text`` (T, C, E) are normalised plain-prompt text features (a panel of T templates);
    ``clean_features`` (N, E) image features of clean OOD images, used only by image-conditioned learners.
    """
    with torch.no_grad():
        if model.learner.image_conditioned:
            text = model.text_features(clean_features[:DRIFT_IMAGES]).float().mean(dim=0)  # (B, C, E) -> (C, E)
        else:
            text = model.text_features().float()  # (C, E)
    return class_drift(text.cpu(), zero_shot_text.float().cpu())


def class_drift(text: torch.Tensor, zero_shot_text: torch.Tensor) -> torch.Tensor:
    """(C,) norm of each class's own drift: normalised ``text`` (C, E) minus the normalised template mean of
    ``zero_shot_text`` (T, C, E), with the drift every class shares removed (a context that says "a rendering
    of" instead of "a photo of" moves all classes alike and does not change which class wins)."""
    d = F.normalize(text, dim=-1) - F.normalize(zero_shot_text.mean(dim=0), dim=-1)  # (C, E)
    return (d - d.mean(dim=0, keepdim=True)).norm(dim=-1)
