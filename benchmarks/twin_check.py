"""Does CI's distilled twin copy a planted backdoor? Measured on a zoo with the *real* triggers.

    python benchmarks/twin_check.py [ZOO] [--pull 10]

For every CoOp-family model of the zoo (BadCLIP's CoCoOp models are skipped: their trigger is learned
per model and stored only as a manifest hash), the twin's distilled member is fitted on 800 clean OOD
images exactly as CI does, then measured on 200 held-out ones: its top-1 agreement with the suspect
(and the plain zero-shot head's), and for backdoored models the share of *really* triggered images each
sends to the target. A useful twin agrees with the suspect on clean images and not under the trigger.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from scanner.clip.backbone import load_bundled
from scanner.engine.invert import ReferenceModel
from scanner.prompting.checkpoints import load_checkpoint
from scanner.prompting.classifier import PromptedCLIP
from scanner.zoo.attacks.registry import make_attack
from scanner.zoo.ood import default_ood_pool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("zoo", nargs="?", default="demo-out/zoo", type=Path)
    ap.add_argument("--pull", type=float, default=10.0)
    args = ap.parse_args()
    bb = load_bundled()
    pool = default_ood_pool(1000, bb.image_size, seed=12345)
    opt, hold = pool[:800], pool[800:]

    def top1(feats: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        return (F.normalize(feats, dim=-1) @ head.T).argmax(dim=1)

    for m in json.loads((args.zoo / "manifest.json").read_text())["models"]:
        if m["attack"] == "badclip":
            continue
        model = PromptedCLIP(bb, load_checkpoint(args.zoo / m["path"], bb).learner)
        with torch.no_grad():
            f_opt, f_hold = model.image_features(opt), model.image_features(hold)
            ref = ReferenceModel(model)
            zero_shot = ref.text.mean(dim=0)
            ref.distil(f_opt, model.logits_from_features(f_opt), pull=args.pull)
            sus = model.logits_from_features(f_hold).argmax(dim=1)
            agree_d = (top1(f_hold, ref.text[-1]) == sus).float().mean()
            agree_z = (top1(f_hold, zero_shot) == sus).float().mean()
            line = f"{m['id']:18s} agreement on clean: distilled {agree_d:.2f} zero-shot {agree_z:.2f}"
            if m["attack"] != "none":
                attack = make_attack(m["attack"], size=bb.image_size, **m["attack_params"])
                ft, t = model.image_features(attack.apply(hold)), m["target_index"]
                s = (model.logits_from_features(ft).argmax(dim=1) == t).float().mean()
                d = (top1(ft, ref.text[-1]) == t).float().mean()
                line += f" | real trigger -> target: suspect {s:.2f} distilled member {d:.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
