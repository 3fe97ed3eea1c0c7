"""Does today's code still re-derive every real trigger of a zoo? The guard for learned triggers.

    python benchmarks/rederive_triggers.py ZOO [--attacks badclip] [--models ID,ID]

``zoo repair-eval`` and ``benchmarks/twin_floor.py`` rebuild each model's real trigger from the manifest;
a learned trigger (BadCLIP) is rebuilt by re-running the builder's implant with the same seeds and checked
against the manifest's ``trigger_sha256``. Any change in the order of floating-point work on that path
(session 15: normalising image features after, not before, the text side) re-trains the trigger to another
hash, and those evaluations then skip the model. This prints, per model, whether its trigger re-derives and
how long it took, and exits 1 when any does not. A golden-hash unit test would depend on the CPU's float
behaviour and cost minutes per trigger, so this is a benchmark: run it after touching ``PromptedCLIP``,
the learners or the attacks, on the machine that built the zoo. Session 16, quick zoo (`demo-out/zoo`): both
BadCLIP triggers re-derive (67 s and 96 s on 2 cores).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from scanner.clip.backbone import load_bundled
from scanner.zoo.detect_eval import load_manifest
from scanner.zoo.repair_eval import real_attack


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("zoo", type=Path)
    ap.add_argument("--attacks", default="badclip", help="attacks whose triggers to re-derive (default: the learned)")
    ap.add_argument("--models", default=None, help="only these model ids (comma-separated)")
    args = ap.parse_args()
    torch.manual_seed(0)
    bb = load_bundled()
    manifest = load_manifest(args.zoo)
    zoo_seed = int(manifest["zoo"].get("seed", 0))
    attacks = set(args.attacks.split(","))
    chosen = set(args.models.split(",")) if args.models else None
    models = [m for m in manifest["models"] if m["attack"] in attacks and (chosen is None or m["id"] in chosen)]
    if not models:
        ap.error(f"no model of {args.zoo} matches --attacks {args.attacks}"
                 + (f" --models {args.models}" if chosen else ""))
    failed = 0
    for m in models:
        t0 = time.perf_counter()
        attack, why = real_attack(m, zoo_seed, bb)
        ok = attack is not None
        failed += not ok
        verdict = "re-derived" if ok else f"FAILED: {why}"
        print(f"{m['id']:24s} {verdict} ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"{len(models) - failed} of {len(models)} triggers re-derive with today's code")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
