"""Can CI's patch search find a planted patch trigger, and would finding it be enough? A diagnostic per model.

    python benchmarks/real_trigger_probe.py ZOO:MODEL[:CLASS] [...] [--seeds 2] [--starts random,real,grid]

For each backdoored model (``ZOO`` a zoo folder, ``MODEL`` its id in the manifest) of a patch-shaped attack
(BadNets), the zoo's real trigger is rebuilt from the manifest and written as a patch trigger (mask 1 on the
pixels the attack sets, 0 elsewhere). Printed for the planted target:

* the real trigger's own evidence on CI's held-out OOD photos: its patch-margin score, the share it moves into the
  target in the suspect and in the twin. A score under the line means even a perfect search would miss it;
* CI's patch search from its random initial trigger (as ``zoo eval`` runs it) at ``--seeds`` search seeds;
* the same search started *at* the real trigger: whether the objective keeps a planted trigger once it has it;
* with ``--starts ...,grid``, started from a 3 x 3 grid of opaque squares of the sticker family's side spread over
  the image (``DetectorConfig.patch_start = "grid"``): whether a localised start finds a small patch anywhere.

A clean model (or any model, with ``:CLASS``) is searched for that class instead, without a real trigger: what
CI would find for a clean model's confirmed class (its natural trigger). Each trigger is described by its mask:
mean cover, pixels over 0.5 and the mask's centroid (row, column).
Session 23, digits BadNets (8 px checker, bottom-right): on seed 10 the real trigger scores 7.56, the search from
random 3.72 / 2.88 with a diffuse mask (cover 0.057, centroid at the image centre, 9 pixels over 0.5), the search
started at the real trigger 9.17 / 9.48. On seed 12 the real trigger itself scores 1.97: a weak planted margin.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from scanner.clip import load_bundled
from scanner.engine import DetectorConfig
from scanner.engine.ci import family_value, invert_for, make_trigger, measure_trigger, split_pool, trusted_twin
from scanner.engine.invert import frozen_learner, panel_logits, shares
from scanner.engine.triggers import SURE_LOGIT, PatchTrigger, ShiftedTrigger, Trigger
from scanner.prompting.checkpoints import load_checkpoint
from scanner.prompting.classifier import PromptedCLIP
from scanner.zoo.attacks.base import Attack
from scanner.zoo.detect_eval import EVAL_SEED_OFFSET
from scanner.zoo.ood import default_ood_pool
from scanner.zoo.repair_eval import real_attack


def as_patch(attack: Attack, size: int) -> PatchTrigger:
    """The attack's trigger as a patch trigger: a pixel is in the mask when the attack sets it whatever the image
    (stamped on black and on white images alike), and the pattern is what it sets it to."""
    on_black = attack.apply(torch.zeros(1, 3, size, size))[0]  # (3, S, S)
    on_white = attack.apply(torch.ones(1, 3, size, size))[0]
    mask = (on_white - on_black).abs().sum(dim=0, keepdim=True) < 1e-6  # (1, S, S)
    if not bool(mask.any()):
        raise SystemExit(f"the {attack.name} trigger sets no pixel whatever the image: not a patch trigger")
    trig = PatchTrigger(size, torch.Generator().manual_seed(0))
    with torch.no_grad():
        trig.m.copy_(torch.where(mask, SURE_LOGIT, -SURE_LOGIT))
        trig.p.copy_(torch.logit(on_black.clamp(1e-4, 1 - 1e-4)))
    return trig


def describe(trig: Trigger) -> str:
    """Mask cover, pixels over 0.5 and centroid (row, column) of a patch trigger."""
    inner = trig.inner if isinstance(trig, ShiftedTrigger) else trig
    assert isinstance(inner, PatchTrigger)
    m = inner.mask().detach()[0]  # (S, S)
    rows, cols = torch.meshgrid(torch.arange(m.shape[0]), torch.arange(m.shape[1]), indexing="ij")
    w = m / m.sum()
    return (f"cover {float(m.mean()):.3f}, {int((m > 0.5).sum())} px over 0.5, centroid "
            f"({float((w * rows).sum()):.1f}, {float((w * cols).sum()):.1f})")


def probe(spec: str, model: PromptedCLIP, attack: Attack | None, t: int, cfg: DetectorConfig, opt_x: torch.Tensor,
          hold_x: torch.Tensor, seeds: int, starts: list[str]) -> None:
    """Print the real trigger's evidence for class ``t`` (when there is one), then each search's (see the module
    docstring)."""
    size = opt_x.shape[-1]
    with frozen_learner(model):
        ref, _ = trusted_twin(model, opt_x, cfg)
        natural, twin_natural = (shares(z) for z in panel_logits(model, (ref,), None, hold_x, cfg.bf16_on))

        def judged(trig: Trigger) -> str:
            ev, _ = measure_trigger(model, ref, trig, t, "patch", hold_x, float(natural[t]),
                                    float(twin_natural[t]), cfg.bf16_on)
            return (f"score {family_value(ev, 'patch', 'patch-margin'):6.2f}, share {ev['asr_patch']:.2f} "
                    f"(twin {ev['ref_asr_patch']:.2f}); {describe(trig)}")

        real = as_patch(attack, size) if attack is not None else None
        print(f"{spec} (class {t}): " + (f"real trigger {judged(real)}" if real is not None else "no real trigger"),
              flush=True)
        for s in range(seeds):
            for start in (x for x in starts if real is not None or x != "real"):
                gen = torch.Generator().manual_seed(s)
                # the soft and grid starts are the engine's own (``patch_start``); the real one is set by hand
                run_cfg = replace(cfg, patch_start="grid" if start == "grid" else "soft")
                at_real = None
                if start == "real" and real is not None:
                    at_real = make_trigger("patch", size, run_cfg, gen)
                    inner = at_real.inner if isinstance(at_real, ShiftedTrigger) else at_real
                    assert isinstance(inner, PatchTrigger)
                    inner.start_at(real.m.detach())
                    with torch.no_grad():
                        inner.p.copy_(real.p)
                trig = invert_for(model, ref, t, "patch", opt_x, run_cfg, gen, at_real)
                print(f"  seed {s}, search from {start:6s}: {judged(trig)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="ZOO:MODEL, a zoo folder and a backdoored model's id in it")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--starts", default="random,real", help="comma-separated: random, real, grid")
    args = ap.parse_args()
    starts = args.starts.split(",")
    if not starts or any(x not in ("random", "real", "grid") for x in starts):
        ap.error(f"--starts takes random, real and grid; got {args.starts!r}")
    bb = load_bundled()
    cfg = DetectorConfig().on("cpu")  # the precision in force here
    pool = default_ood_pool(cfg.n_images, bb.image_size, seed=EVAL_SEED_OFFSET)  # `zoo eval --seed 0`'s pool
    opt_x, hold_x = split_pool(pool, cfg)
    for spec in args.models:
        zoo_dir, mid, *cls = spec.split(":")
        zoo = Path(zoo_dir)
        manifest = json.loads((zoo / "manifest.json").read_text())
        entry = next((m for m in manifest["models"] if m["id"] == mid), None)
        if entry is None or (entry["target_index"] is None and not cls):
            raise SystemExit(f"{spec}: not a model of that zoo's manifest, or a clean one without :CLASS")
        attack = None
        if entry["target_index"] is not None and not cls:
            attack, why = real_attack(entry, int(manifest["zoo"].get("seed", 0)), bb)
            if attack is None:
                raise SystemExit(f"{spec}: cannot rebuild its trigger: {why}")
        t = int(cls[0]) if cls else int(entry["target_index"])
        model = PromptedCLIP(bb, load_checkpoint(zoo / entry["path"], bb).learner)
        probe(spec, model, attack, t, cfg, opt_x, hold_x, args.seeds, starts)


if __name__ == "__main__":
    main()
