"""Does the margin CI's trigger search asks for (``DetectorConfig.kappa``) change how well its score separates?

    python benchmarks/kappa_probe.py ZOO OUT.json [--kappas 1,8] [--seeds 0,1]

CI's targeted objective stops pushing an image once the target leads every other class by ``kappa`` logits
(``differential_margin``), while the default score is the median margin the trigger reaches on held-out images:
at kappa = 1 that margin is what the search overshoots by. This asks whether a search that keeps pushing
(larger kappa) separates planted from natural triggers better, or draws less. Per CSC-CoOp model of ``ZOO``
the patch family is searched, one candidate per model, for the *planted target* (backdoored models: the
ranking is taken out of the question) or the most drifted class (clean models: what CI confirms), at each kappa
and search seed, on the evaluation pool of ``scanner zoo eval --seed 0``. Printed: every model's scores, then
per (kappa, seed) the AUROC of the score, and per kappa the mean |score difference| between the first two seeds.
``OUT.json`` keeps every search's evidence and makes the run resumable.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from scanner.clip import load_bundled
from scanner.engine import DetectorConfig
from scanner.engine.ci import family_value, invert_for, measure_trigger, split_pool, trusted_twin
from scanner.engine.drift import prompt_drift
from scanner.engine.invert import frozen_learner, panel_logits, shares
from scanner.prompting.checkpoints import load_checkpoint
from scanner.prompting.classifier import PromptedCLIP
from scanner.zoo.detect_eval import EVAL_SEED_OFFSET, load_manifest
from scanner.zoo.ood import default_ood_pool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("zoo", type=Path)
    ap.add_argument("out", type=Path, help="resumable evidence of every search")
    ap.add_argument("--kappas", default="1,8")
    ap.add_argument("--seeds", default="0,1")
    args = ap.parse_args()
    kappas = [float(k) for k in args.kappas.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    bb = load_bundled()
    base = DetectorConfig(search_all_families=False).on("cpu")  # the precision in force here
    pool = default_ood_pool(base.n_images, bb.image_size, seed=EVAL_SEED_OFFSET)
    opt_x, hold_x = split_pool(pool, base)
    res: dict[str, dict[str, Any]] = json.loads(args.out.read_text()) if args.out.exists() else {}
    for m in load_manifest(args.zoo)["models"]:
        if m["learner"] != "coop-csc":
            continue
        mid = m["id"]
        model = PromptedCLIP(bb, load_checkpoint(args.zoo / m["path"], bb).learner)
        with frozen_learner(model):
            ref, feats = trusted_twin(model, opt_x, base)
            z_sus, z_twin = panel_logits(model, (ref,), None, hold_x, base.bf16_on)  # 2 x (N, C)
            natural, twin_natural = shares(z_sus), shares(z_twin)  # 2 x (C,)
            drift = prompt_drift(model, ref.zero_shot().text, feats)  # (C,)
            t = m["target_index"] if m["attack"] != "none" else int(torch.argmax(drift))
            for kappa in kappas:
                for s in seeds:
                    key = f"{mid}|{kappa}|{s}"
                    if key in res:
                        continue
                    cfg = replace(base, kappa=kappa)
                    trig = invert_for(model, ref, t, "patch", opt_x, cfg, torch.Generator().manual_seed(s))
                    ev, _ = measure_trigger(model, ref, trig, t, "patch", hold_x, float(natural[t]),
                                            float(twin_natural[t]), cfg.bf16_on)
                    res[key] = {"backdoored": m["attack"] != "none", "class": t,
                                "score": family_value(ev, "patch", "patch-margin"), **ev}
                    args.out.write_text(json.dumps(res, indent=1))
        print(mid, " ".join(f"kappa {k:g} seed {s}: {res[f'{mid}|{k}|{s}']['score']:6.2f}" for k in kappas
                            for s in seeds), flush=True)
    ids = sorted({k.split("|")[0] for k in res})
    for kappa in kappas:
        for s in seeds:
            rows = [res[f"{i}|{kappa}|{s}"] for i in ids if f"{i}|{kappa}|{s}" in res]
            y, score = [r["backdoored"] for r in rows], [r["score"] for r in rows]
            print(f"kappa {kappa:g} seed {s}: {len(rows)} models, AUROC {roc_auc_score(y, score):.3f}")
        if len(seeds) > 1:
            d = [abs(res[f"{i}|{kappa}|{seeds[0]}"]["score"] - res[f"{i}|{kappa}|{seeds[1]}"]["score"]) for i in ids]
            print(f"kappa {kappa:g}: mean |score difference| between seeds {seeds[0]} and {seeds[1]}: "
                  f"{np.mean(d):.2f} (median {np.median(d):.2f})")


if __name__ == "__main__":
    main()
