"""Does a real trigger survive CI's random translation? The target share of real triggers on CI's hold-out
OOD photos, unshifted and with the whole triggered image rolled by up to 2 and 6 px (what ``ShiftedTrigger``
does to every trigger CI optimises, ``max_shift`` = 6), for the suspect and its zero-shot twin.

    python benchmarks/shift_survival.py ZOO ID1,ID2 [--shifts 0,2,6]

The real trigger is rebuilt from the zoo's manifest (``zoo.repair_eval.real_attack``: BadCLIP's learned
trigger is re-derived by re-running its implant, hash-checked, which costs the model's training time).
Session 13: BadCLIP's triggers (a small universal additive pattern) do not survive the roll, so CI cannot
confirm them whatever its ranking: `sizes/badclip` 0.71 unshifted, 0.25 at 2 px, 0.23 at 6 px.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from scanner.clip.backbone import load_bundled
from scanner.engine.ci import split_pool
from scanner.engine.config import DetectorConfig
from scanner.engine.invert import ReferenceModel
from scanner.prompting.checkpoints import load_checkpoint
from scanner.prompting.classifier import PromptedCLIP
from scanner.zoo.detect_eval import EVAL_SEED_OFFSET
from scanner.zoo.ood import default_ood_pool
from scanner.zoo.repair_eval import real_attack

BATCH = 16  # one random roll per batch, as CI's optimisation batches


def rolled(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """``x`` (N, 3, S, S) with each batch of ``BATCH`` images rolled by one random offset in [-shift, shift]."""
    if shift == 0:
        return x
    out = []
    for i in range(0, x.shape[0], BATCH):
        dy, dx = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=gen))
        out.append(torch.roll(x[i:i + BATCH], shifts=(dy, dx), dims=(-2, -1)))
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("zoo", type=Path)
    ap.add_argument("ids", help="comma-separated model ids of backdoored models")
    ap.add_argument("--shifts", default="0,2,6")
    args = ap.parse_args()
    bb = load_bundled()
    cfg = DetectorConfig()
    pool = default_ood_pool(cfg.n_images, bb.image_size, seed=EVAL_SEED_OFFSET)  # zoo eval's pool
    hold = split_pool(pool, cfg)[1]  # (N, 3, S, S)
    shifts = [int(v) for v in args.shifts.split(",")]
    manifest = json.loads((args.zoo / "manifest.json").read_text())
    for mid in args.ids.split(","):
        entry = next(m for m in manifest["models"] if m["id"] == mid)
        attack, why = real_attack(entry, int(manifest["zoo"].get("seed", 0)), bb)
        if attack is None:
            print(f"{mid}: {why}")
            continue
        model = PromptedCLIP(bb, load_checkpoint(args.zoo / entry["path"], bb).learner).eval()
        twin = ReferenceModel(model).zero_shot()
        t = int(entry["target_index"])
        gen = torch.Generator().manual_seed(0)
        parts = []
        with torch.no_grad():
            triggered = attack.apply(hold)
            for name, x in (("clean", hold), ("trigger", triggered)):
                for shift in shifts:
                    f = model.image_features(rolled(x, shift, gen))
                    sus = float((model.logits_from_features(f).argmax(1) == t).float().mean())
                    ref = float((twin.logits(f).argmax(1) == t).float().mean())
                    parts.append(f"{name} +-{shift}px: suspect {sus:.2f} twin {ref:.2f}")
        print(f"{mid}: " + "; ".join(parts), flush=True)


if __name__ == "__main__":
    main()
