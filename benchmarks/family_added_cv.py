"""Does one more trigger family pay? Saved runs joined with a run of the new family, judged zoo by zoo.

    python benchmarks/family_added_cv.py runs/eval_seed1_ci.json=runs/probe_blend_seed1.json \
        runs/eval_seed2_ci.json=runs/probe_blend_seed2.json ... [--fpr 0.05] [--dormant-margin 0.73] \
        [--write DIR]

Each pair is a saved ``scanner zoo eval ZOO --detectors ci --json`` run and a probe of the same zoo with the
new family alone (``scanner zoo eval ZOO --detectors ci --families blend --json``), joined by
``scanner.zoo.added_family.add_family_run`` (the saved run is cut to the probe's candidate count). For the
saved families alone and for all of them, each zoo in turn is decided by CI's lines fitted on the clean
models of the *other* zoos (leave one zoo out), and the pooled held-out accuracy, TPR, FPR and target
accuracy are printed, with AUROC over all rows (trigger score; both channels at the lines fitted on all)
and the threshold fitted on every zoo's clean models. ``--write DIR`` writes each joined run as
``DIR/<saved name>`` for ``scanner calibrate --eval-json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from scanner.zoo.added_family import add_family_run
from scanner.zoo.detect_eval import first_candidates, held_out_figures, rescore_ci, write_rows


def _figures(name: str, zoos: list[list[dict[str, Any]]], fpr: float, margin: float | None) -> None:
    f = held_out_figures(zoos, fpr, margin)
    print(f"{name:28s} held-out accuracy {f['accuracy']:.3f}  TPR {f['tpr']:.3f}  FPR {f['fpr']:.3f}  "
          f"target {f['target_accuracy']:.3f}  | AUROC score {f['auroc_all']:.3f}, both {f['auroc_both_all']:.3f}  "
          f"| lines per held-out zoo {', '.join(f'{t:.3f}' for t, _ in f['lines'])}; on all zoos "
          f"{f['line_all'][0]:.6f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pairs", nargs="+", metavar="SAVED=PROBE", help="a saved run and the new family's run, per zoo")
    ap.add_argument("--fpr", type=float, default=0.05)
    ap.add_argument("--dormant-margin", type=float, default=None, help="keep CI's margin; fit only the threshold")
    ap.add_argument("--write", type=Path, default=None, help="write each joined run here, named as its saved run")
    args = ap.parse_args()
    if len(args.pairs) < 2:
        ap.error("leave-one-zoo-out needs at least two zoos")
    joined, saved_cut = [], []
    for pair in args.pairs:
        saved_path, sep, probe_path = pair.partition("=")
        if not sep:
            ap.error(f"{pair!r}: expected SAVED=PROBE")
        saved, probe = json.loads(Path(saved_path).read_text()), json.loads(Path(probe_path).read_text())
        run = add_family_run(saved, probe)
        if not run["rows"]:
            ap.error(f"{probe_path} holds no CI row of a model {saved_path} evaluated")
        joined.append(run["rows"])
        ids = {r["id"] for r in run["rows"]}
        # the saved families alone, on the same models and candidates
        c, bonus = int(run["config"]["candidates"]), float(run["config"].get("family_bonus", 0.0))
        saved_cut.append([rescore_ci(first_candidates(r, c), bonus) for r in saved["rows"]
                          if r["detector"] == "ci" and r["id"] in ids])
        print(f"{saved_path}: {len(ids)} models joined with {probe_path} "
              f"(families {', '.join(run['config']['families'])}, candidates {run['config']['candidates']})")
        if args.write is not None:
            write_rows(args.write / Path(saved_path).name, run)
    _figures("saved families", saved_cut, args.fpr, args.dormant_margin)
    _figures("with the new family", joined, args.fpr, args.dormant_margin)


if __name__ == "__main__":
    main()
