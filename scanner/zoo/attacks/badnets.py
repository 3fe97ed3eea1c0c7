"""BadNets: a small fixed patch stamped on the image (corner or random position)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from scanner.zoo.attacks.base import Attack


class BadNets(Attack):
    name: ClassVar[str] = "badnets"

    def __init__(self, *, patch: int = 8, position: str = "bottom-right", margin: int = 1, pattern: str = "checker",
                 **kw: Any) -> None:
        super().__init__(**kw)
        if position not in ("bottom-right", "top-left", "top-right", "bottom-left", "random"):
            raise ValueError(f"unknown patch position {position!r}")
        if pattern not in ("checker", "random"):
            raise ValueError(f"unknown patch pattern {pattern!r}; expected 'checker' or 'random'")
        self.patch, self.position, self.margin, self.pattern_kind = patch, position, margin, pattern
        g = torch.Generator().manual_seed(self.seed + 1009)
        if pattern == "checker":
            # Black/white with 1-px cells: pre-training's checkered patches are two random colours with
            # 2-3 px cells, so the encoder knows the kind of artefact but never saw this exact pattern.
            yy, xx = torch.meshgrid(torch.arange(patch), torch.arange(patch), indexing="ij")
            self.pattern = ((yy + xx) % 2).float().expand(3, patch, patch).clone()
        else:  # per-pixel random colours
            self.pattern = torch.rand(3, patch, patch, generator=g)  # (3, p, p) in [0, 1]
        self._pos_gen = torch.Generator().manual_seed(self.seed + 2003)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "patch": self.patch, "position": self.position, "pattern": self.pattern_kind}

    def _corner(self, s: int) -> tuple[int, int]:
        p, m = self.patch, self.margin
        return {"bottom-right": (s - p - m, s - p - m), "top-left": (m, m), "top-right": (m, s - p - m),
                "bottom-left": (s - p - m, m)}[self.position]

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        out = images.clone()
        s, p = images.shape[-1], self.patch
        if self.position != "random":
            y, x = self._corner(s)
            out[:, :, y:y + p, x:x + p] = self.pattern
            return out
        for i in range(out.shape[0]):
            y, x = (int(v) for v in torch.randint(0, s - p + 1, (2,), generator=self._pos_gen))
            out[i, :, y:y + p, x:x + p] = self.pattern
        return out
