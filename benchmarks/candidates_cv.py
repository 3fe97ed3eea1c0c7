"""How many drift-ranked classes should CI confirm? Out-of-sample figures by leaving one zoo out.

    python benchmarks/candidates_cv.py runs/eval_seed2_cand3.json runs/eval_seed1_cand3.json \
        runs/eval_full_cand3.json [--fpr 0.05] [--dormant-margin 0.89]

Each JSON is a ``scanner zoo eval ZOO --detectors ci --candidates K`` run (one zoo each, built with
different seeds). A run with K candidates holds the evidence of every smaller count: the engine confirms
classes in drift order with one generator, so its first c classes are exactly a c-candidate run's. For
c = 1..K every row is cut to its first c candidates; then, for each zoo in turn, both CI lines are
fitted (as ``scanner calibrate`` fits them) on the clean models of the *other* zoos and applied to the
held-out one. The pooled held-out verdicts give accuracy, TPR, FPR and target accuracy that no fitted
line has seen; AUROC (trigger score alone, and both channels) is pooled over all rows. Every row is re-scored
from its recorded per-family gains with ``--family-bonus`` (default: the engine's, ``class_score``), and
``--dormant-margin`` keeps CI's margin where ``scanner calibrate --dormant-margin`` would.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scanner.engine import DetectorConfig
from scanner.zoo.detect_eval import first_candidates, held_out_figures, rescore_ci


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="one `scanner zoo eval --candidates K --json` file per zoo")
    ap.add_argument("--fpr", type=float, default=0.05)
    ap.add_argument("--family-bonus", type=float, default=DetectorConfig().family_bonus,
                    help="re-score every row's confirmed classes with this bonus (default: the engine's)")
    ap.add_argument("--trigger-score", default=DetectorConfig().trigger_score,
                    help="re-score every row by this score (default: the engine's)")
    ap.add_argument("--dormant-margin", type=float, default=None, help="keep CI's margin; fit only the threshold")
    args = ap.parse_args()
    if len(args.runs) < 2:
        ap.error("leave-one-zoo-out needs at least two zoos' runs")
    files = [json.loads(p.read_text()) for p in args.runs]
    zoos = [[r for r in f["rows"] if r["detector"] == "ci"] for f in files]
    # the drift candidates each run confirmed (the awake class, when confirmed apart, is not one of them)
    k_max = min(int((f.get("config") or {}).get("candidates", 1)) for f in files)
    awake = all((f.get("config") or {}).get("awake_candidate", False) for f in files)
    print(f"{len(zoos)} zoos, {sum(map(len, zoos))} models; every run confirmed {k_max}+ drift candidates"
          f"{' and the awake class' if awake else ''}; lines fitted at FPR {args.fpr} on the other zoos' clean models")
    for with_awake in (False, True) if awake else (False,):
        for c in range(1, k_max + 1):
            cut = [[rescore_ci(first_candidates(r, c, with_awake), args.family_bonus, args.trigger_score) for r in z]
                   for z in zoos]
            # each zoo's rows decided by the lines fitted on the other zoos
            f = held_out_figures(cut, args.fpr, args.dormant_margin)
            lines = [f"{t:.2f}/{margin if margin is None else round(margin, 2)}" for t, margin in f["lines"]]
            print(f"candidates {c}{' + awake' if with_awake else ''}: held-out accuracy {f['accuracy']:.3f}  "
                  f"TPR {f['tpr']:.3f}  FPR {f['fpr']:.3f}  target {f['target_accuracy']:.3f}  | AUROC score "
                  f"{f['auroc_all']:.3f}, both {f['auroc_both_all']:.3f}  | lines per held-out zoo {', '.join(lines)}")


if __name__ == "__main__":
    main()
