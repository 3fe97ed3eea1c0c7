"""Labels for unlabelled OOD images in a repair set: what a trusted classifier says they are.

The zero-shot twin — the same frozen, public encoders with plain class-name prompts — cannot carry a
prompt backdoor, so its predictions are a safe target for the repaired prompt on images outside the
labelled classes. The delivered model's own predictions are the alternative; they inherit whatever
the backdoor did to clean OOD images (a prompt poisoned with a subtle trigger can make the target a
sink for every photo, and self-training would then teach it again).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scanner.prompting.classifier import PromptedCLIP
from scanner.zoo.zeroshot import zero_shot_classifier

ZERO_SHOT_TEMPLATES = ("a {}.", "a photo of a {}.", "an image of a {}.")


@torch.no_grad()
def twin_text_features(model: PromptedCLIP, templates: tuple[str, ...] = ZERO_SHOT_TEMPLATES) -> torch.Tensor:
    """Normalised (C, E) text features of ``model``'s zero-shot twin: its class names in ``templates``,
    averaged over templates (CLIP's prompt ensembling)."""
    bb = model.backbone
    text = torch.stack([zero_shot_classifier(bb, [t.format(c) for c in model.classnames])
                        for t in templates]).mean(dim=0)  # (C, E)
    return F.normalize(text, dim=-1)


@torch.no_grad()
def zero_shot_labels(model: PromptedCLIP, images: torch.Tensor,
                     templates: tuple[str, ...] = ZERO_SHOT_TEMPLATES) -> torch.Tensor:
    """(M,) class indices the zero-shot twin of ``model`` predicts for ``images`` (M, 3, S, S)."""
    feats = F.normalize(model.image_features(images).float(), dim=-1)  # (M, E)
    return (feats @ twin_text_features(model, templates).to(feats.device).T).argmax(dim=1)


@torch.no_grad()
def model_labels(model: PromptedCLIP, images: torch.Tensor) -> torch.Tensor:
    """(M,) the model's own predictions."""
    return model.predict(images).argmax(dim=1)
