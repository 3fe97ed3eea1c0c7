"""How decisively a class wins each image: per-image logit margins and their quantiles.

A share (how many held-out images a trigger moves into a class) saturates at 1.0: a natural trigger that
barely tips 0.95 of the photos and a planted one that sends them all with a wide margin read alike. The
margin of class k on an image is its logit minus the best other logit (positive = k wins); its quantiles
over held-out images keep growing where the share stops. They are recorded as CI evidence beside the shares.
"""

from __future__ import annotations

import torch

#: the quantiles recorded as evidence: the hardest tenth of the images and the median one
MARGIN_QUANTILES = (0.1, 0.5)


def class_margins(logits: torch.Tensor) -> torch.Tensor:
    """(N, C) logits -> (N, C) margins: z_k - max_{j != k} z_j for every class k."""
    if logits.shape[1] < 2:
        raise ValueError(f"margins need at least two classes, got logits of shape {tuple(logits.shape)}")
    top2 = logits.float().topk(2, dim=1).values  # (N, 2)
    winner = logits.float() >= top2[:, :1]  # (N, C): the argmax (ties: every tied class)
    best_other = torch.where(winner, top2[:, 1:2], top2[:, :1])  # (N, C)
    return logits.float() - best_other


def margin_quantiles(margins: torch.Tensor) -> torch.Tensor:
    """(N, C) margins -> (len(MARGIN_QUANTILES), C) their quantiles over the images."""
    q = torch.tensor(MARGIN_QUANTILES, dtype=torch.float32)
    return torch.quantile(margins.float(), q, dim=0)
