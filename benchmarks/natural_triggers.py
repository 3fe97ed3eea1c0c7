"""Natural triggers: how easily random, untrained overlays move a zoo's *clean* prompt-tuned models.

    python benchmarks/natural_triggers.py [--zoo runs/zoofull] [--overlays 192] [--images 100] [--all]

A trigger-inversion detector can only tell a planted trigger from a natural one when clean models are
hard to move. This measures the substrate: a fixed bank of random overlays (checkered, noise and solid
patches of 4-10 px at a corner or anywhere; noise, block and stripe blends at opacity 0.08-0.25; smooth
warps), none optimised, is laid over held-out OOD photos. Per model and class it records the share of
images the suspect sends to the class and the share the zero-shot twin sends there. A class has a
*natural trigger* when some overlay sends >= 80 % of the images to it while the twin sends < 50 %.

Printed per model: the smallest such patch (px) and the weakest such blend (opacity), with their class;
for backdoored models also the same at the true target. The bank's image features depend only on the
backbone and the pool, so they are computed once for all models. CoOp models only unless ``--all``
(CoCoOp's image-conditioned prompts take about a minute each).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from scanner.clip.backbone import load_bundled
from scanner.engine.ci import split_pool, trusted_twin
from scanner.engine.config import DetectorConfig
from scanner.engine.invert import autocast, frozen_learner
from scanner.engine.triggers import identity_grid
from scanner.prompting.checkpoints import load_checkpoint
from scanner.prompting.classifier import PromptedCLIP
from scanner.zoo.detect_eval import EVAL_SEED_OFFSET
from scanner.zoo.ood import default_ood_pool

Overlay = tuple[str, float, Callable[[torch.Tensor], torch.Tensor]]  # (kind, strength, images -> images)
PATCHES = ("checker", "noise patch", "solid patch")
BLENDS = ("noise blend", "block blend", "stripes")


def _rand(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _patch(kind: str, s: int, g: torch.Generator) -> Overlay:
    side = int(torch.randint(4, 11, (), generator=g))
    corner = int(torch.randint(0, 5, (), generator=g))  # 4 corners (1 px margin) or anywhere
    if corner == 4:
        y0, x0 = (int(torch.randint(0, s - side + 1, (), generator=g)) for _ in range(2))
    else:
        y0 = 1 if corner in (0, 1) else s - side - 1
        x0 = 1 if corner in (0, 2) else s - side - 1
    if kind == "checker":  # two random colours, 1-2 px cells
        cell = int(torch.randint(1, 3, (), generator=g))
        yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        mask = (((yy // cell) + (xx // cell)) % 2 == 0).float()
        pat = torch.rand(3, 1, 1, generator=g) * mask + torch.rand(3, 1, 1, generator=g) * (1 - mask)
    elif kind == "noise patch":
        pat = torch.rand(3, side, side, generator=g)
    else:
        pat = torch.rand(3, 1, 1, generator=g).expand(3, side, side)

    def apply(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, :, y0:y0 + side, x0:x0 + side] = pat
        return x
    return kind, float(side), apply


def _blend(kind: str, s: int, g: torch.Generator) -> Overlay:
    if kind == "noise blend":
        pat = torch.rand(3, s, s, generator=g)
    elif kind == "block blend":
        k = int(torch.randint(4, 17, (), generator=g))
        pat = F.interpolate(torch.rand(1, 3, k, k, generator=g), size=(s, s), mode="nearest")[0]
    else:
        half = max(1, int(torch.randint(1, 5, (), generator=g)))
        lines = ((torch.arange(s) // half) % 2).float()
        grid = lines[:, None].expand(s, s) if int(torch.randint(0, 2, (), generator=g)) else lines[None].expand(s, s)
        pat = torch.rand(3, 1, 1, generator=g) * grid
    alpha = _rand(g, 0.08, 0.25)
    return kind, alpha, lambda x: ((1 - alpha) * x + alpha * pat).clamp(0, 1)


def _warp(s: int, g: torch.Generator) -> Overlay:
    field = torch.rand(1, 2, 4, 4, generator=g) * 2 - 1
    field = field / field.abs().mean()
    px = _rand(g, 0.75, 2.25)  # mean displacement in pixels
    flow = F.interpolate(field, size=(s, s), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    grid = (identity_grid(s) + px * flow / s * 2).clamp(-1, 1)
    return "warp", px, lambda x: F.grid_sample(x, grid.expand(x.shape[0], -1, -1, -1), align_corners=True).clamp(0, 1)


def overlay_bank(n: int, size: int, seed: int = 1234) -> list[Overlay]:
    """``n`` random overlays cycling through the seven kinds; fixed by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    kinds = (*PATCHES, *BLENDS, "warp")
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        out.append(_patch(kind, size, g) if kind in PATCHES else _blend(kind, size, g) if kind in BLENDS
                   else _warp(size, g))
    return out


def shares(logits: torch.Tensor, n_cls: int) -> torch.Tensor:
    """(C,) share of rows whose argmax is each class."""
    return torch.bincount(logits.argmax(dim=1), minlength=n_cls).float() / logits.shape[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", type=Path, default=Path("runs/zoofull"))
    ap.add_argument("--overlays", type=int, default=192)
    ap.add_argument("--images", type=int, default=100, help="held-out OOD images each overlay is laid on")
    ap.add_argument("--all", action="store_true", help="CoCoOp models too (slow)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    bb = load_bundled()
    cfg = DetectorConfig().on("cpu")  # the precision in force here
    pool = default_ood_pool(cfg.n_images, bb.image_size, seed=EVAL_SEED_OFFSET)  # the zoo eval's pool
    opt_x, hold_x = split_pool(pool, cfg)
    hold_x = hold_x[: args.images]
    bank = overlay_bank(args.overlays, bb.image_size)
    man = json.loads((args.zoo / "manifest.json").read_text())
    feats: torch.Tensor | None = None
    rows = []
    for entry in man["models"]:
        if entry["learner"] == "cocoop" and not args.all:
            continue
        model = PromptedCLIP(bb, load_checkpoint(args.zoo / entry["path"], bb).learner)
        with frozen_learner(model), torch.no_grad():
            if feats is None:  # (J, N, E): the backbone's features of every overlaid image, once
                with autocast(True, "cpu"):
                    feats = torch.stack([model.image_features(f(hold_x)).float() for _, _, f in bank])
            ref, _ = trusted_twin(model, opt_x, cfg)
            C = model.n_cls
            sus = torch.stack([shares(model.logits_from_features(feats[j]).float(), C) for j in range(len(bank))])
            twin = torch.stack([shares(ref.logits(feats[j]), C) for j in range(len(bank))])
        natural = (sus >= 0.8) & (twin < 0.5)  # (J, C)

        def weakest(kinds: tuple[str, ...], k: int | None, natural: torch.Tensor = natural,
                    n_cls: int = C) -> tuple[float, int]:
            best = (float("inf"), -1)
            for j, (kind, strength, _) in enumerate(bank):
                cls = range(n_cls) if k is None else (k,)
                for c in cls:
                    if kind in kinds and bool(natural[j, c]) and strength < best[0]:
                        best = (strength, c)
            return best

        row = {"id": entry["id"], "attack": entry["attack"], "target": entry["target_index"],
               "patch_px": weakest(PATCHES, None), "blend_alpha": weakest(BLENDS, None)}
        if entry["target_index"] is not None:
            row["target_patch_px"] = weakest(PATCHES, entry["target_index"])[0]
            row["target_blend_alpha"] = weakest(BLENDS, entry["target_index"])[0]
        rows.append(row)
        tail = (f" | at target {row['target_patch_px']:.0f} px / {row['target_blend_alpha']:.2f}"
                if "target_patch_px" in row else "")
        print(f"{entry['id']:<22} {entry['attack']:<8} smallest patch {row['patch_px'][0]:>4.0f} px (class "
              f"{row['patch_px'][1]:>3})  weakest blend {row['blend_alpha'][0]:.2f} (class {row['blend_alpha'][1]:>3})"
              + tail, flush=True)
    clean = [r for r in rows if r["attack"] == "none"]
    small = sum(r["patch_px"][0] <= 6 for r in clean)
    print(f"\nclean models with a natural patch trigger of <= 6 px: {small}/{len(clean)}; "
          f"with any natural trigger in the bank: "
          f"{sum(r['patch_px'][0] < float('inf') or r['blend_alpha'][0] < float('inf') for r in clean)}/{len(clean)}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
