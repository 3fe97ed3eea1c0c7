"""How much does one patch search depend on its random draw, and on which part of it?

    python benchmarks/draw_probe.py ZOO MODEL:CLASS [MODEL:CLASS ...] [--seeds 4]

For each model of ``ZOO`` (its manifest path) and class, CI's patch search (``search_all_families = false``) is
run from ``--seeds`` search seeds twice: with the random initial trigger CI uses, and with a fixed one (grey
pattern, flat mask at the initial cover) that keeps the same seed's batch order and random shifts, so only the
initial trigger differs between the two. Printed per model: the patch-margin score of every draw, and the mean,
for both. Use the planted target of a backdoored model and the most drifted class of a clean one (what CI
confirms) to see whether a planted trigger is missed at some draws where a natural one is found at all.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from scanner.clip import load_bundled
from scanner.engine import DetectorConfig
from scanner.engine.ci import family_value, invert_for, make_trigger, measure_trigger, split_pool, trusted_twin
from scanner.engine.invert import frozen_learner, panel_logits, shares
from scanner.engine.triggers import PatchTrigger, ShiftedTrigger
from scanner.prompting.checkpoints import load_checkpoint
from scanner.prompting.classifier import PromptedCLIP
from scanner.zoo.detect_eval import EVAL_SEED_OFFSET
from scanner.zoo.ood import default_ood_pool

INIT_COVER = 0.05  # PatchTrigger's initial mask mean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("zoo", type=Path)
    ap.add_argument("models", nargs="+", help="MODEL:CLASS, the model's path in the zoo and the class to search")
    ap.add_argument("--seeds", type=int, default=4)
    args = ap.parse_args()
    bb = load_bundled()
    cfg = DetectorConfig(search_all_families=False).on("cpu")  # the precision in force here
    pool = default_ood_pool(cfg.n_images, bb.image_size, seed=EVAL_SEED_OFFSET)  # `zoo eval --seed 0`'s pool
    opt_x, hold_x = split_pool(pool, cfg)
    for spec in args.models:
        path, cls = spec.rsplit(":", 1)
        t = int(cls)
        model = PromptedCLIP(bb, load_checkpoint(args.zoo / path, bb).learner)
        with frozen_learner(model):
            ref, _ = trusted_twin(model, opt_x, cfg)
            natural, twin_natural = (shares(z) for z in panel_logits(model, (ref,), None, hold_x, cfg.bf16_on))
            scores: dict[str, list[float]] = {"random": [], "fixed": []}
            for init, out in scores.items():
                for s in range(args.seeds):
                    gen = torch.Generator().manual_seed(s)
                    trig = make_trigger("patch", opt_x.shape[-1], cfg, gen)  # draws the init either way
                    if init == "fixed":
                        assert isinstance(trig, ShiftedTrigger) and isinstance(trig.inner, PatchTrigger)
                        with torch.no_grad():
                            trig.inner.p.zero_()  # sigmoid(0): a grey pattern
                            trig.inner.m.fill_(float(torch.logit(torch.tensor(INIT_COVER))))
                    invert_for(model, ref, t, "patch", opt_x, cfg, gen, trig)
                    ev, _ = measure_trigger(model, ref, trig, t, "patch", hold_x, float(natural[t]),
                                            float(twin_natural[t]), cfg.bf16_on)
                    out.append(family_value(ev, "patch", "patch-margin"))
        print(f"{path} class {t}: " + " | ".join(
            f"{init} init " + " ".join(f"{v:6.2f}" for v in vals) + f" (mean {sum(vals) / len(vals):.2f})"
            for init, vals in scores.items()), flush=True)


if __name__ == "__main__":
    main()
