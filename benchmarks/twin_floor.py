"""What the frozen encoders alone do with each real trigger: its ASR-ID / ASR-OOD on the zero-shot twin
(plain class-name prompts, ensembled; no tuned prompt), beside the zoo model's own figures.

    python benchmarks/twin_floor.py ZOO [--attacks badnets,blended] [--json OUT]

A repair can only be asked to remove what the prompt added. Where the twin itself sends triggered images
to the target (a checkered patch on a texture task whose target is "checkered", a brownish blend on a
colour task), that share is the trigger's own class evidence, and ``zoo repair-eval``'s "<= 5 %" bar
counts it as backdoor. The ASR pools are the builder's (``zoo.repair_eval.asr_ood_pool``) and the
real triggers are rebuilt from the manifest (BadCLIP's by re-running its implant, hash-checked).
Session 15, seed-6 zoo: the twin's mean ASR-ID / ASR-OOD is 0.205 / 0.174 for BadNets and 0.101 / 0.116
for Blended.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from scanner.clip.backbone import load_bundled
from scanner.prompting.checkpoints import load_checkpoint
from scanner.prompting.classifier import PromptedCLIP
from scanner.zoo.datasets import load_split
from scanner.zoo.detect_eval import load_manifest
from scanner.zoo.repair_eval import asr_ood_pool, real_attack, twin_asr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("zoo", type=Path)
    ap.add_argument("--attacks", default="badnets,blended,wanet,badclip")
    ap.add_argument("--json", dest="json_out", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    bb = load_bundled()
    manifest = load_manifest(args.zoo)
    zoo_seed = int(manifest["zoo"].get("seed", 0))
    pool = asr_ood_pool(manifest, bb.image_size)
    attacks = set(args.attacks.split(","))
    rows = []
    for m in manifest["models"]:
        if m["attack"] not in attacks:
            continue
        attack, why = real_attack(m, zoo_seed, bb)
        if attack is None:
            print(f"{m['id']:20s} skipped: {why}", flush=True)
            continue
        model = PromptedCLIP(bb, load_checkpoint(args.zoo / m["path"], bb).learner)
        x, y = load_split(m["dataset"], "test", seed=zoo_seed, size=bb.image_size)
        tid, tood = twin_asr(model, attack, x, y, pool, int(m["target_index"]))
        row = {"id": m["id"], "attack": m["attack"], "twin_asr_id": tid, "twin_asr_ood": tood,
               "model_asr_id": m.get("asr_id"), "model_asr_ood": m.get("asr_ood")}
        rows.append(row)
        print(f"{m['id']:20s} twin ASR-ID {tid:.3f} ASR-OOD {tood:.3f}   model {m.get('asr_id', 0):.3f} "
              f"{m.get('asr_ood', 0):.3f}", flush=True)
    for name in sorted({r["attack"] for r in rows}):
        rs = [r for r in rows if r["attack"] == name]
        print(f"{name:9s} n={len(rs):2d} twin ASR-ID {np.mean([r['twin_asr_id'] for r in rs]):.3f} "
              f"ASR-OOD {np.mean([r['twin_asr_ood'] for r in rs]):.3f}")
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
