"""Why WaNet and BadCLIP fall short of issue #3's ASR bars here: variants measured side by side.

Each variant rebuilds the full zoo's job for an attack on the given datasets (same seed, shots, learner and
target as ``scanner zoo build``) into a temporary folder and prints CA / ASR-ID / ASR-OOD, next to the
zoo's clean CA for that dataset when ``--zoo`` holds a built zoo.

WaNet variants (the prompt sees the image only through the frozen encoder):
  jitter  — the shipped one: noise-mode copies warped by the same field plus half-pixel jitter, true label
  fields  — noise-mode copies warped by *independent* random fields of the same strength, true label
  none    — no noise-mode copies
  strong  — no noise-mode copies, a 3 px warp (twice the shipped strength)
BadCLIP variants: ``default`` (3 warm-up + 10 joint epochs) and ``long`` (10 + 20), both at 4/255.
BadNets and Blended variants: the share of training images given a triggered copy (``paired``: all, the
shipped one; ``half``; ``quarter``): a lower share weighs the clean images more (the free-head ceiling,
``benchmarks/linear_bound.py``, finds its best fits at poison weights from 0.1 to 10, by dataset).

Usage: python benchmarks/attack_variants.py --attack wanet --datasets shapes,letters,pairs,positions
       python benchmarks/attack_variants.py --attack badclip --datasets shapes,polygons
       python benchmarks/attack_variants.py --attack badnets --seed 1 --variants half,quarter
           --datasets shapes,colours,textures,letters,counts,positions,sizes,pairs,polygons,arrows,digits
           --zoo runs/zoo_seed1 --zoo runs/zoo_seed2 --zoo runs/zoo_seed3   (one command)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from scanner.clip import load_bundled
from scanner.zoo import build
from scanner.zoo.attacks import make_attack
from scanner.zoo.attacks.base import Attack
from scanner.zoo.attacks.wanet import WaNet
from scanner.zoo.ood import default_ood_pool


class WaNetFields(WaNet):
    """Noise mode with independent random warp fields (k x k control points, the same mean strength)."""

    def _noise_warp(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, s, k = images.shape[0], self.size, self.k
        ins = torch.rand(n, 2, k, k, generator=generator) * 2 - 1  # (N, 2, k, k)
        ins = ins / ins.abs().mean(dim=(1, 2, 3), keepdim=True)
        field = F.interpolate(ins, size=(s, s), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        grid = (self.identity + self.strength * field / s * 2).clamp(-1, 1)  # (N, S, S, 2)
        return F.grid_sample(images, grid, align_corners=True).clamp(0, 1)


NO_NOISE = 1e-6  # poison() keeps at least one noise-mode copy; this rate asks for no more than that
VARIANTS: dict[str, dict[str, tuple[type[Attack] | None, dict[str, Any]]]] = {
    "wanet": {"jitter": (None, {}), "fields": (WaNetFields, {}), "none": (None, {"noise_rate": NO_NOISE}),
              "strong": (None, {"noise_rate": NO_NOISE, "strength": 3.0})},
    "badclip": {"default": (None, {}), "long": (None, {"warmup_epochs": 10, "joint_epochs": 20})},
    **{a: {"paired": (None, {}), "half": (None, {"poison_rate": 0.5}), "quarter": (None, {"poison_rate": 0.25})}
       for a in ("badnets", "blended")},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attack", choices=sorted(VARIANTS), default="wanet")
    ap.add_argument("--datasets", default="shapes,letters,pairs,positions")
    ap.add_argument("--variants", default=None, help="comma-separated (default: all of the attack's)")
    ap.add_argument("--zoo", type=Path, action="append", default=None,
                    help="built zoo(s), for the clean CA column (clean models of the same dataset and learner)")
    ap.add_argument("--seed", type=int, default=0, help="zoo seed: the triggers, targets and splits of that zoo")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("SCANNER_BENCH_THREADS", "2")))
    variants = args.variants.split(",") if args.variants else list(VARIANTS[args.attack])
    clean_ca = build.clean_accuracies(args.zoo or [Path("runs/zoofull")])
    backbone = load_bundled()
    plan = build.ZooPlan.make(args.datasets.split(","), [args.attack], 0, args.seed, False)
    rows: list[tuple[str, float, float, float, float | None]] = []
    ood = default_ood_pool(plan.ood_size, backbone.image_size, seed=plan.seed + 1)
    original = build.make_attack
    print(f"{'model':22s} {'variant':8s} {'clean CA':>8s} {'CA':>6s} {'ASR-ID':>7s} {'ASR-OOD':>8s} {'s':>5s}")
    for variant in variants:
        cls, kw = VARIANTS[args.attack][variant]

        def make(name: str, _cls: type[Attack] | None = cls, _kw: dict[str, Any] = kw, **params: Any) -> Attack:
            return _cls(**params, **_kw) if _cls is not None else make_attack(name, **params, **_kw)

        build.make_attack = make  # build_one names its attack through this module attribute
        try:
            for job in build.plan_jobs(plan):
                with tempfile.TemporaryDirectory() as d:
                    t0 = time.perf_counter()
                    e = build.build_one(job, plan, backbone, ood, Path(d))
                ca = clean_ca.get((job.dataset, job.learner))
                ref = f"{sum(ca) / len(ca):8.3f}" if ca else f"{'-':>8s}"
                rows.append((variant, e["asr_id"], e["asr_ood"], e["ca"], sum(ca) / len(ca) if ca else None))
                print(f"{job.model_id:22s} {variant:8s} {ref} {e['ca']:6.3f} {e['asr_id']:7.3f} {e['asr_ood']:8.3f} "
                      f"{time.perf_counter() - t0:5.0f}", flush=True)
        finally:
            build.make_attack = original
    print("\nmean over datasets: ASR-ID / ASR-OOD / CA change against the clean models (bar: >= 0.95 / >= 0.90 / "
          ">= -0.03)")
    for variant in variants:
        mine = [r for r in rows if r[0] == variant]
        change = [r[3] - r[4] for r in mine if r[4] is not None]
        print(f"  {variant:8s} {sum(r[1] for r in mine) / len(mine):.3f} / {sum(r[2] for r in mine) / len(mine):.3f} / "
              + (f"{sum(change) / len(change):+.3f}" if change else "-"))


if __name__ == "__main__":
    main()
