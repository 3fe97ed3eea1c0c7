"""Zero-shot classification with a plain template: the baseline every prompt learner must beat."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scanner.clip.backbone import ClipBackbone
from scanner.zoo.datasets import get_spec, load_split


@torch.inference_mode()
def image_features(backbone: ClipBackbone, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised image features (N, E)."""
    out = [backbone.encode_image(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)]
    return F.normalize(torch.cat(out).float(), dim=-1)


@torch.inference_mode()
def zero_shot_classifier(backbone: ClipBackbone, prompts: list[str]) -> torch.Tensor:
    """L2-normalised text features (n_cls, E) of one prompt per class."""
    return F.normalize(backbone.encode_tokens(backbone.tokenize(prompts)).float(), dim=-1)


def zero_shot_accuracy(backbone: ClipBackbone, dataset: str, *, seed: int = 0) -> float:
    spec = get_spec(dataset)
    x, y = load_split(dataset, "test", seed=seed, size=backbone.image_size)
    feats = image_features(backbone, x)  # (N, E)
    text = zero_shot_classifier(backbone, spec.prompts())  # (C, E)
    pred = (feats @ text.t()).argmax(dim=1)
    return float((pred == y).float().mean())
