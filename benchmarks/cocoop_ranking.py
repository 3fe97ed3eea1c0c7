"""Which class of an image-conditioned (CoCoOp) model would a tiny universal perturbation move? A ranking
to replace prompt drift where drift fails.

    python benchmarks/cocoop_ranking.py runs/zoo_seed4 [--images 64] [--learners cocoop,coop-csc,coop]

CI confirms the most drifted class (``engine/drift.py``). For CoCoOp the text features depend on the image,
so drift is measured at the mean over clean images, and on BadCLIP models (a learned full-image additive
trigger, ||delta||_inf <= 4/255) it names the target no better than chance. BadCLIP trains the prompt so that
a *small universal* perturbation moves every image into the target, so this ranks classes by the first-order
reach of such a perturbation: per class k, the L1 norm of the gradient of the mean log-probability of k over
clean OOD images with respect to one additive delta shared by all images (what an L-inf budget eps buys to
first order: eps x that norm), divided by the same for CI's zero-shot twin (a class any plain prompt finds
easy to reach is natural). Printed per CoCoOp model of the zoo: the planted target's rank (0 = first) under
drift, under the suspect's reach alone and under the reach over the twin's; then how often each puts the
target first and in its first three. Ground truth is read from the manifest only for the ranks. CI now ranks
image-conditioned prompts by the last of these (``engine/reach.py``: bf16 autocast there, fp32 here).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from scanner.clip.backbone import load_bundled
from scanner.engine.ci import split_pool
from scanner.engine.config import DetectorConfig
from scanner.engine.drift import prompt_drift
from scanner.engine.invert import ReferenceModel
from scanner.engine.reach import reaches
from scanner.prompting.checkpoints import load_checkpoint
from scanner.prompting.classifier import PromptedCLIP
from scanner.zoo.detect_eval import EVAL_SEED_OFFSET
from scanner.zoo.ood import default_ood_pool


def rank_of(scores: torch.Tensor, k: int) -> int:
    """0 when class k scores highest."""
    return int((scores > scores[k]).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("zoo", type=Path)
    ap.add_argument("--images", type=int, default=64, help="clean OOD images the gradients are averaged over")
    ap.add_argument("--learners", default="cocoop",
                    help="comma-separated learners whose backdoored models are ranked (CI uses reach for cocoop)")
    args = ap.parse_args()
    learners = set(args.learners.split(","))
    bb = load_bundled()
    cfg = DetectorConfig()
    pool = default_ood_pool(cfg.n_images, bb.image_size, seed=EVAL_SEED_OFFSET)  # zoo eval's pool
    x = split_pool(pool, cfg)[0][: args.images]  # (N, 3, S, S)
    tally: dict[str, list[int]] = {"drift": [], "reach": [], "reach / twin": []}
    for m in json.loads((args.zoo / "manifest.json").read_text())["models"]:
        if m["learner"] not in learners or m["target_index"] is None:
            continue
        model = PromptedCLIP(bb, load_checkpoint(args.zoo / m["path"], bb).learner).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        twin = ReferenceModel(model).zero_shot()
        reach, twin_reach = reaches(model, twin, x, bf16=False)  # (C,), (C,)
        with torch.no_grad():
            drift = prompt_drift(model, twin.text, model.image_features(x))
        t = int(m["target_index"])
        ranks = {"drift": rank_of(drift, t), "reach": rank_of(reach, t),
                 "reach / twin": rank_of(reach / twin_reach.clamp_min(1e-12), t)}
        for key, r in ranks.items():
            tally[key].append(r)
        print(f"{m['id']:20s} {m['attack']:8s} target {t:2d} of {model.n_cls:2d}  ASR-OOD {m.get('asr_ood') or 0:.2f}  "
              + "  ".join(f"{key} rank {r}" for key, r in ranks.items()), flush=True)
    for key, seen in tally.items():
        print(f"{key:14s} target first in {sum(r == 0 for r in seen)} of {len(seen)}, "
              f"in the first three in {sum(r < 3 for r in seen)}")


if __name__ == "__main__":
    main()
