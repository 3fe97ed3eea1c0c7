"""Trigger families that inversion optimises: each maps clean pixels (B, 3, S, S) in [0, 1] to
triggered pixels, and reports its size (what the trigger *costs*).

Every trigger also has a *raw* form (:meth:`Trigger.raw`): one detached tensor from which it can be
re-applied to new images without its optimiser parameters (:func:`apply_raw`); detectors store it in
``DetectionResult.raw_triggers`` and repair stamps it on clean images. Its channel count names the form:

* ``(2, S, S)`` — a warp: the sampling-grid displacement (grid units, x then y), applied with grid_sample;
* ``(3, S, S)`` — an additive delta (additive and pixel families): ``x' = clamp(x + delta, 0, 1)``;
* ``(4, S, S)`` — a pattern ``p`` (channels 0-2) under a mask ``m`` (channel 3), the patch and blend
  families: ``x' = (1 - m) x + m p``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RAW_FORMS: dict[int, str] = {2: "warp", 3: "additive", 4: "patch"}  # raw channel count -> how it is applied


def raw_form(raw: torch.Tensor) -> str:
    """``"warp"``, ``"additive"`` or ``"patch"`` for a raw trigger (C, S, S); ValueError for anything else."""
    if raw.ndim != 3 or int(raw.shape[0]) not in RAW_FORMS or raw.shape[1] != raw.shape[2]:
        raise ValueError(
            f"a raw trigger is (2, S, S) warp, (3, S, S) additive or (4, S, S) patch; got {tuple(raw.shape)}"
        )
    return RAW_FORMS[int(raw.shape[0])]


def identity_grid(size: int) -> torch.Tensor:
    """grid_sample's identity sampling grid (1, S, S, 2), (x, y) order, corners aligned."""
    lin = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    return torch.stack((xx, yy), dim=2)[None]


def apply_raw(raw: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Stamp a raw trigger (C, S, S) on pixels (B, 3, S, S) in [0, 1]; returns new pixels in [0, 1]."""
    form = raw_form(raw)
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != raw.shape[-2:]:
        raise ValueError(
            f"images must be (B, 3, {raw.shape[-2]}, {raw.shape[-1]}) to take this trigger; got {tuple(images.shape)}"
        )
    r = raw.to(images)  # dtype and device of the images
    if form == "additive":
        return (images + r).clamp(0, 1)
    if form == "patch":
        m = r[3:].clamp(0, 1)
        return ((1 - m) * images + m * r[:3].clamp(0, 1)).clamp(0, 1)
    grid = (identity_grid(images.shape[-1]).to(images) + r.permute(1, 2, 0)[None]).clamp(-1, 1)
    return F.grid_sample(images, grid.expand(images.shape[0], -1, -1, -1), align_corners=True).clamp(0, 1)


class Trigger(nn.Module):
    family: str = ""

    def size(self) -> torch.Tensor:
        """A scalar cost of the trigger (differentiable): what a planted trigger needs little of."""
        raise NotImplementedError

    def image(self) -> torch.Tensor:
        """(3, S, S) in [0, 1]: a picture of the trigger for reports."""
        raise NotImplementedError

    def raw(self) -> torch.Tensor:
        """The re-applicable raw form, detached: (3, S, S) delta or (4, S, S) pattern + mask (see module)."""
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

    def raw(self) -> torch.Tensor:
        return self.delta().detach().clone()


class MaskedPatternTrigger(Trigger):
    """x' = (1 - m) x + m p: a pattern p = sigmoid(self.p) (3, S, S) laid over the image under a mask m
    (1, S, S) that subclasses define; its raw form is the (4, S, S) pattern + mask."""

    p: nn.Parameter  # (3, S, S) pattern logits

    def mask(self) -> torch.Tensor:
        raise NotImplementedError

    def pattern(self) -> torch.Tensor:
        return torch.sigmoid(self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask()
        return (1 - m) * x + m * self.pattern()

    def size(self) -> torch.Tensor:
        return self.mask().mean()  # the share of the image the trigger covers

    def image(self) -> torch.Tensor:
        return (self.mask() * self.pattern()).detach()

    def raw(self) -> torch.Tensor:
        return torch.cat([self.pattern(), self.mask()]).detach()  # (4, S, S)


# a mask logit so far out (sigmoid 1 - 6e-6; 6e-6 when negative) that one epoch of Adam steps (50 at lr 0.1) leaves
# the pixel opaque (transparent)
SURE_LOGIT = 12.0


def grid_mask_logits(size: int, side: int) -> torch.Tensor:
    """Mask logits (1, S, S) of a 3 x 3 grid of opaque squares of ``side`` px, one centred in each ninth of the
    image, transparent elsewhere (``PatchTrigger.start_at``)."""
    m = torch.full((1, size, size), -SURE_LOGIT)
    for i in range(3):
        for j in range(3):
            y, x = (2 * i + 1) * size // 6 - side // 2, (2 * j + 1) * size // 6 - side // 2
            m[:, max(0, y):y + side, max(0, x):x + side] = SURE_LOGIT
    return m


class PatchTrigger(MaskedPatternTrigger):
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

    def start_at(self, mask_logits: torch.Tensor) -> None:
        """Replace the initial mask logits (1, S, S), keeping the pattern drawn at construction (so a start differs
        from the soft one in its mask alone, and draws the same random numbers)."""
        with torch.no_grad():
            self.m.copy_(mask_logits.to(self.m))


class StickerTrigger(MaskedPatternTrigger):
    """x' = (1 - m) x + m p with a *fixed* small square mask m (1, S, S) — a sticker of side ``side`` px at a
    random position drawn from ``generator`` — and a learned pattern p (3, S, S) (only the square shows).

    A bounded-area family: a whole-image pattern can paint natural evidence for many classes of a small
    CLIP, a sticker of a few pixels cannot, while a planted patch trigger needs no more. ``size`` is the
    covered share of the image (constant: the cost is fixed by construction).
    """

    family = "sticker"
    m: torch.Tensor  # (1, S, S) 0/1 buffer: the square

    def __init__(self, size: int, side: int, generator: torch.Generator) -> None:
        super().__init__()
        side = max(1, min(side, size))
        y, x = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=generator))
        m = torch.zeros(1, size, size)
        m[:, y:y + side, x:x + side] = 1.0
        self.register_buffer("m", m)
        self.p = nn.Parameter(torch.randn(3, size, size, generator=generator))

    def mask(self) -> torch.Tensor:
        return self.m


class BlendTrigger(MaskedPatternTrigger):
    """x' = (1 - a) x + a p: a full-image pattern p (3, S, S) blended in with a learned opacity a in
    (0, ``alpha_max``) — the Blended attack's form. ``size`` is a / alpha_max."""

    family = "blend"

    def __init__(self, size: int, alpha_max: float, generator: torch.Generator) -> None:
        super().__init__()
        self.alpha_max = alpha_max
        self.a = nn.Parameter(torch.zeros(()))  # sigmoid(0) = half the bound
        self.p = nn.Parameter(torch.randn(3, size, size, generator=generator))

    def alpha(self) -> torch.Tensor:
        return self.alpha_max * torch.sigmoid(self.a)

    def mask(self) -> torch.Tensor:
        return self.alpha().expand(1, *self.p.shape[1:])  # (1, S, S): one opacity everywhere

    def size(self) -> torch.Tensor:
        return self.alpha() / self.alpha_max

    def image(self) -> torch.Tensor:
        return self.pattern().detach()


class WarpTrigger(Trigger):
    """A smooth warp (WaNet's form): a coarse displacement field (2, k, k), bounded to ``max_px`` pixels
    by tanh, upsampled bicubically to (S, S) and applied with grid_sample. ``size`` is the mean
    displacement as a share of the bound."""

    family = "warp"
    identity: torch.Tensor  # (1, S, S, 2) the identity sampling grid

    def __init__(self, size: int, max_px: float, generator: torch.Generator, k: int = 4) -> None:
        super().__init__()
        self.s, self.max_px = size, max_px
        self.flow = nn.Parameter(torch.randn(1, 2, k, k, generator=generator) * 0.1)
        self.register_buffer("identity", identity_grid(size), persistent=False)  # (1, S, S, 2)

    def displacement(self) -> torch.Tensor:
        """(1, S, S, 2) in grid units (2 / (S - 1) per pixel with align_corners), grid_sample's (x, y) order."""
        coarse = self.max_px * torch.tanh(self.flow) * 2 / (self.s - 1)
        return F.interpolate(coarse, size=(self.s, self.s), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = (self.identity + self.displacement()).clamp(-1, 1).expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, align_corners=True).clamp(0, 1)

    def size(self) -> torch.Tensor:
        return self.displacement().abs().mean() * (self.s - 1) / 2 / self.max_px

    def image(self) -> torch.Tensor:
        # the warp applied to a fine grid pattern, so the report shows the distortion
        lin = torch.arange(self.s, device=self.flow.device)
        grid = (((lin[:, None] // 4 + lin[None, :] // 4) % 2).float())[None, None].expand(1, 3, -1, -1)
        return self.forward(grid).detach()[0]

    def raw(self) -> torch.Tensor:
        return self.displacement().detach()[0].permute(2, 0, 1).contiguous()  # (2, S, S)


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

    def raw(self) -> torch.Tensor:
        return self.delta().detach().clone()


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

    def raw(self) -> torch.Tensor:
        return self.inner.raw()  # the translation is a random test-time augmentation, not part of the trigger
