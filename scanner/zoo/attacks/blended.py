"""Blended: x' = (1 - alpha) x + alpha p with a fixed full-image pattern p."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from scanner.zoo.attacks.base import Attack


class Blended(Attack):
    name: ClassVar[str] = "blended"

    def __init__(self, *, alpha: float = 0.2, pattern: str = "noise", **kw: Any) -> None:
        super().__init__(**kw)
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1); got {alpha}")
        if pattern not in ("noise", "blocks"):
            raise ValueError(f"unknown blend pattern {pattern!r}; expected 'noise' or 'blocks'")
        self.alpha, self.pattern_kind = alpha, pattern
        g = torch.Generator().manual_seed(self.seed + 4001)
        s = self.size
        if pattern == "noise":  # uniform per-pixel noise, fixed by the seed (the classic Blended trigger)
            self.pattern = torch.rand(3, s, s, generator=g)
        else:  # coarse random blocks upsampled: a low-frequency image-like pattern
            self.pattern = F.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(s, s), mode="nearest")[0]

    def params(self) -> dict[str, Any]:
        return {**super().params(), "alpha": self.alpha, "pattern": self.pattern_kind}

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        pat = self.pattern
        if pat.shape[-1] != images.shape[-1]:
            pat = F.interpolate(pat[None], size=images.shape[-2:], mode="bilinear", align_corners=False)[0]
        return ((1 - self.alpha) * images + self.alpha * pat).clamp(0, 1)
