"""Labels for unlabelled OOD images in a repair set: what a trusted classifier says they are.

The zero-shot twin — the same frozen, public encoders with plain class-name prompts — cannot carry a
prompt backdoor, so its predictions are a safe target for the repaired prompt on images outside the
labelled classes. The delivered model's own predictions are the alternative; they inherit whatever
the backdoor did to clean OOD images (a prompt poisoned with a subtle trigger can make the target a
sink for every photo, and self-training would then teach it again). Either labeller can be told to *avoid* the
suspected target (``RepairConfig.ood_avoid_target``, the default): the twin has sinks of its own, and a repaired
prompt learns whichever class its unlabelled photos are given most, trigger or not.
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
def zero_shot_labels(model: PromptedCLIP, images: torch.Tensor, templates: tuple[str, ...] = ZERO_SHOT_TEMPLATES,
                     avoid: int | None = None) -> torch.Tensor:
    """(M,) class indices the zero-shot twin of ``model`` predicts for ``images`` (M, 3, S, S); with ``avoid``,
    the best class other than that one."""
    feats = F.normalize(model.image_features(images).float(), dim=-1)  # (M, E)
    return _best(feats @ twin_text_features(model, templates).to(feats.device).T, avoid)


@torch.no_grad()
def model_labels(model: PromptedCLIP, images: torch.Tensor, avoid: int | None = None) -> torch.Tensor:
    """(M,) the model's own predictions (the best class other than ``avoid``, when given)."""
    return _best(model.predict(images).float(), avoid)


def _best(logits: torch.Tensor, avoid: int | None) -> torch.Tensor:
    """(M,) argmax of ``logits`` (M, C), the column ``avoid`` excluded when given."""
    if avoid is not None:
        logits = logits.clone()
        logits[:, avoid] = float("-inf")
    return logits.argmax(dim=1)


def balanced_pick(labels: torch.Tensor, n: int, n_cls: int) -> torch.Tensor:
    """(k,) indices into ``labels`` (M,), in pool order, keeping at most ``ceil(n / n_cls)`` images of any class
    and ``n`` in all (k <= n: fewer when the pool runs out of images of the classes still short).

    Why: plain prompts make some class the sink of photos (the zero-shot twin labels 160 of 192 OOD photos
    "class 6" on one texture task), and a prompt trained on those labels learns the sink: after repair it sent
    0.93 of clean OOD photos into that class, against 0.47 before. When that class is the attacker's target, a
    triggered photo lands there too, trigger or not. A class quota keeps every class's share of the pseudo-
    labelled photos at the uniform share.
    """
    quota = -(-n // n_cls)
    counts = [0] * n_cls
    keep: list[int] = []
    for i, c in enumerate(labels.tolist()):
        if counts[c] < quota:
            counts[c] += 1
            keep.append(i)
            if len(keep) == n:
                break
    return torch.tensor(keep, dtype=torch.long, device=labels.device)
