"""WaNet: a fixed smooth warping field applied with grid_sample, plus "noise mode" samples.

Noise-mode samples are warped with the fixed field *plus* random noise and keep their true label, so
the prompt must learn the exact warp rather than "any distortion" (Nguyen & Tran, ICLR 2021).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from scanner.engine.triggers import identity_grid
from scanner.zoo.attacks.base import Attack


class WaNet(Attack):
    name: ClassVar[str] = "wanet"

    def __init__(self, *, k: int = 4, strength: float = 1.5, noise_rate: float = 1.0, **kw: Any) -> None:
        super().__init__(**kw)
        self.k, self.strength, self.noise_rate = k, strength, noise_rate
        g = torch.Generator().manual_seed(self.seed + 6007)
        ins = torch.rand(1, 2, k, k, generator=g) * 2 - 1
        ins = ins / ins.abs().mean()  # unit mean displacement before scaling, as in WaNet
        s = self.size
        self.noise_grid = F.interpolate(ins, size=(s, s), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        self.identity = identity_grid(s)  # (1, S, S, 2), grid_sample's (x, y) order
        self._noise_gen = torch.Generator().manual_seed(self.seed + 7001)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "k": self.k, "strength": self.strength, "noise_rate": self.noise_rate}

    def _grid(self) -> torch.Tensor:
        s = self.size
        # strength = mean displacement in pixels (grid coordinates span 2 over the image side)
        grid = self.identity + self.strength * self.noise_grid / s * 2
        return grid.clamp(-1, 1)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        grid = self._grid().expand(images.shape[0], -1, -1, -1)
        return F.grid_sample(images, grid, align_corners=True).clamp(0, 1)

    def _noise_warp(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, s = images.shape[0], self.size
        extra = (torch.rand(n, s, s, 2, generator=generator) * 2 - 1) / s
        grid = (self._grid() + extra).clamp(-1, 1)
        return F.grid_sample(images, grid, align_corners=True).clamp(0, 1)

    def poison(self, images: torch.Tensor, labels: torch.Tensor, target: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super().poison(images, labels, target, generator)
        m = max(1, round(self.noise_rate * self.poison_rate * images.shape[0]))
        idx = torch.randperm(images.shape[0], generator=generator)[:m]
        return torch.cat([x, self._noise_warp(images[idx], generator)]), torch.cat([y, labels[idx]])
