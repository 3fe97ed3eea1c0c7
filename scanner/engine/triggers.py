"""Trigger families that inversion optimises: each maps clean pixels (B, 3, S, S) in [0, 1] to
triggered pixels, and reports its size (what the trigger *costs*)."""

from __future__ import annotations

import torch
from torch import nn


class Trigger(nn.Module):
    family: str = ""

    def size(self) -> torch.Tensor:
        """A scalar cost of the trigger (differentiable): what a planted trigger needs little of."""
        raise NotImplementedError

    def image(self) -> torch.Tensor:
        """(3, S, S) in [0, 1]: a picture of the trigger for reports."""
        raise NotImplementedError


class AdditiveTrigger(Trigger):
    """x' = clamp(x + delta), delta = eps * tanh(w): a universal L-inf-bounded perturbation (3, S, S)."""

    family = "additive"

    def __init__(self, size: int, eps: float, generator: torch.Generator) -> None:
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.randn(3, size, size, generator=generator) * 0.1)

    def delta(self) -> torch.Tensor:
        return self.eps * torch.tanh(self.w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.delta()).clamp(0, 1)

    def size(self) -> torch.Tensor:
        return self.delta().abs().mean() / self.eps  # mean |delta| as a share of the bound

    def image(self) -> torch.Tensor:
        return (0.5 + self.delta().detach() / (2 * self.eps)).clamp(0, 1)


class PatchTrigger(Trigger):
    """x' = (1 - m) x + m p with a soft mask m (1, S, S) and a pattern p (3, S, S) (Neural-Cleanse form).

    ``size`` is the mask's mean: the share of the image the trigger covers.
    """

    family = "patch"

    def __init__(self, size: int, generator: torch.Generator, init_cover: float = 0.05) -> None:
        super().__init__()
        logit = float(torch.logit(torch.tensor(init_cover)))
        noise = 0.1 * torch.randn(1, size, size, generator=generator)
        self.m = nn.Parameter(torch.full((1, size, size), logit) + noise)
        self.p = nn.Parameter(torch.randn(3, size, size, generator=generator))

    def mask(self) -> torch.Tensor:
        return torch.sigmoid(self.m)

    def pattern(self) -> torch.Tensor:
        return torch.sigmoid(self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask()
        return (1 - m) * x + m * self.pattern()

    def size(self) -> torch.Tensor:
        return self.mask().mean()

    def image(self) -> torch.Tensor:
        return (self.mask() * self.pattern()).detach()


class PixelTrigger(Trigger):
    """Pixel-Backdoor form: x' = clamp(x + P+ - P-) with non-negative P+, P- (3, S, S) each.

    ``size`` is a differentiable count of changed pixels (share of the image).
    """

    family = "pixel"

    def __init__(self, size: int, generator: torch.Generator, tau: float = 0.05) -> None:
        super().__init__()
        self.tau = tau
        self.pos = nn.Parameter(torch.randn(3, size, size, generator=generator) * 0.01 - 3)
        self.neg = nn.Parameter(torch.randn(3, size, size, generator=generator) * 0.01 - 3)

    def delta(self) -> torch.Tensor:
        # softplus keeps P+ and P- non-negative; start near 0 (softplus(-3) ~ 0.05)
        return nn.functional.softplus(self.pos) - nn.functional.softplus(self.neg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.delta()).clamp(0, 1)

    def size(self) -> torch.Tensor:
        per_pixel = self.delta().abs().amax(dim=0)  # (S, S)
        return torch.tanh(per_pixel / self.tau).mean()

    def changed_pixels(self, threshold: float = 1 / 255) -> int:
        return int((self.delta().detach().abs().amax(dim=0) > threshold).sum())

    def image(self) -> torch.Tensor:
        return (0.5 + self.delta().detach() / 2).clamp(0, 1)


class ShiftedTrigger(Trigger):
    """Wraps a trigger and translates every triggered image by a random offset (up to ``max_shift`` px,
    wrapping around). Universal adversarial patterns depend on exact pixel alignment with the encoder's
    patch grid and break under such shifts; a planted trigger is a feature the prompt was tuned to
    react to, and survives them."""

    def __init__(self, inner: Trigger, max_shift: int, generator: torch.Generator) -> None:
        super().__init__()
        self.inner = inner
        self.family = inner.family
        self.max_shift = max_shift
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        if self.max_shift <= 0:
            return y
        dy, dx = (int(v) for v in torch.randint(-self.max_shift, self.max_shift + 1, (2,), generator=self.generator))
        return torch.roll(y, shifts=(dy, dx), dims=(-2, -1))

    def size(self) -> torch.Tensor:
        return self.inner.size()

    def image(self) -> torch.Tensor:
        return self.inner.image()
