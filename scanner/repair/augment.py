"""The images a repair trains on besides the clean ones: copies carrying a reconstructed trigger, and
copies carrying a random *generic* overlay of the four classic shapes of a trigger.

Both keep the image's true label: the prompt must learn that such a stamp carries no class evidence.
A reconstructed trigger is an approximation of the planted one (other position, other pattern, other
family), so each copy translates it by a random offset; the generic overlays (a small patch, a
full-image blend, bounded noise, a smooth warp; random patterns, positions and strengths, never the
real trigger) widen what the prompt unlearns beyond the one pattern the detector found.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from scanner.engine.triggers import apply_raw, identity_grid

GENERIC_KINDS = ("patch", "blend", "noise", "warp")


def _randint(lo: int, hi: int, gen: torch.Generator) -> int:
    """Uniform integer in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def _uniform(lo: float, hi: float, gen: torch.Generator) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def shift_raw(raw: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """A raw trigger (C, S, S) translated by (dy, dx) pixels, wrapping around."""
    return torch.roll(raw, shifts=(dy, dx), dims=(-2, -1)) if (dy or dx) else raw


def stamp_triggers(images: torch.Tensor, triggers: Sequence[torch.Tensor], copies: int, max_shift: int,
                   gen: torch.Generator) -> torch.Tensor:
    """``copies`` triggered copies of every image (copies * N, 3, S, S), copy-major: each copy takes a
    random trigger of ``triggers`` (raw form, see ``apply_raw``) translated by up to ``max_shift`` px."""
    if copies == 0 or not triggers:
        return images.new_zeros((0, *images.shape[1:]))
    out = []
    for _ in range(copies):
        for i in range(images.shape[0]):
            raw = triggers[_randint(0, len(triggers) - 1, gen)]
            if max_shift > 0:
                raw = shift_raw(raw, _randint(-max_shift, max_shift, gen), _randint(-max_shift, max_shift, gen))
            out.append(apply_raw(raw, images[i:i + 1]))
    return torch.cat(out)


def _patch(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    s = x.shape[-1]
    p = _randint(max(2, s // 16), max(3, s // 5), gen)
    kind = _randint(0, 2, gen)
    if kind == 0:  # two-colour checker with 1-3 px cells
        cell = _randint(1, 3, gen)
        yy, xx = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
        board = ((yy // cell + xx // cell) % 2).float()  # (p, p)
        a, b = torch.rand(3, 1, 1, generator=gen), torch.rand(3, 1, 1, generator=gen)
        pattern = a * board + b * (1 - board)
    elif kind == 1:  # per-pixel noise
        pattern = torch.rand(3, p, p, generator=gen)
    else:  # one solid colour
        pattern = torch.rand(3, 1, 1, generator=gen).expand(3, p, p)
    y, xpos = _randint(0, s - p, gen), _randint(0, s - p, gen)
    out = x.clone()
    out[:, :, y:y + p, xpos:xpos + p] = pattern.to(x)
    return out


def _blend(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    s = x.shape[-1]
    res = (s, max(1, s // 4), max(1, s // 8))[_randint(0, 2, gen)]
    pattern = torch.rand(1, 3, res, res, generator=gen)
    if res != s:
        pattern = F.interpolate(pattern, size=(s, s), mode="nearest")
    alpha = _uniform(0.1, 0.3, gen)
    return ((1 - alpha) * x + alpha * pattern.to(x)).clamp(0, 1)


def _noise(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    eps = _uniform(4 / 255, 16 / 255, gen)
    return (x + eps * (2 * torch.rand(x.shape[1:], generator=gen) - 1).to(x)).clamp(0, 1)


def _warp(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    s = x.shape[-1]
    coarse = torch.rand(1, 2, 4, 4, generator=gen) * 2 - 1
    coarse = coarse / coarse.abs().mean().clamp_min(1e-6)  # unit mean displacement, as WaNet
    px = _uniform(0.5, 2.0, gen)
    flow = F.interpolate(coarse * px * 2 / s, size=(s, s), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    grid = (identity_grid(s) + flow).clamp(-1, 1).to(x)
    return F.grid_sample(x, grid, align_corners=True).clamp(0, 1)


_GENERIC = {"patch": _patch, "blend": _blend, "noise": _noise, "warp": _warp}


def generic_overlays(images: torch.Tensor, copies: int, gen: torch.Generator) -> torch.Tensor:
    """``copies`` copies of every image (copies * N, 3, S, S), each with one random generic overlay
    (a kind of ``GENERIC_KINDS`` with random pattern, position and strength)."""
    out = []
    for _ in range(copies):
        for i in range(images.shape[0]):
            kind = GENERIC_KINDS[_randint(0, len(GENERIC_KINDS) - 1, gen)]
            out.append(_GENERIC[kind](images[i:i + 1], gen))
    return torch.cat(out) if out else images.new_zeros((0, *images.shape[1:]))
