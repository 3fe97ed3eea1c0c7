"""Should CI score a confirmed class by its best trigger family, or by both? Re-decided from saved rows.

    python benchmarks/family_rules_cv.py runs/eval_seed1_ci.json runs/quick_ci.json [--fpr 0.05] \
        [--held-out runs/eval_seed2_ci.json] [--candidates C]

Each JSON is a ``scanner zoo eval ZOO --detectors ci --json`` run. CI confirms its candidate class with two
trigger families (sticker, soft patch) and scores the class by the larger gain plus ``family_bonus`` (0.5)
times the smaller when positive (``scanner.engine.ci.class_score``; until session 11, the larger alone). For
each rule below every row's class scores are recomputed from the recorded per-family gains; then, for each
dataset in turn, CI's two lines are fitted (as ``scanner calibrate`` fits them) on the clean models of the
*other* datasets and applied to the held-out one (leave one dataset out: models of one dataset share class
names, so a line fitted on them would have seen their kind). Printed per rule: held-out accuracy, TPR, FPR,
target accuracy, and AUROC over all rows (trigger channel alone; both channels). With ``--held-out`` the lines
are fitted on the clean models of all the runs given and judged on that other zoo's rows alone (accuracy, TPR,
FPR, target accuracy, AUROC of its rows).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scanner.engine.ci import class_score
from scanner.zoo.detect_eval import first_candidates, fit_ci_lines, leave_one_out, metrics

Rule = Callable[[float, float], float]  # (sticker gain, patch gain) -> class score
RULES: dict[str, Rule] = {
    "max (until session 11)": lambda s, p: max(s, p),
    "sum": lambda s, p: s + p,
    "sum of positives": lambda s, p: max(s, 0.0) + max(p, 0.0),
    "min": lambda s, p: min(s, p),
    "sticker only": lambda s, p: s,
    "patch only": lambda s, p: p,
    "max + quarter the min": lambda s, p: class_score([s, p], 0.25),
    "max + half (default)": lambda s, p: class_score([s, p], 0.5),
    "max + all the min": lambda s, p: class_score([s, p], 1.0),
}


def rescored(row: dict[str, Any], rule: Rule) -> dict[str, Any]:
    """``row`` with its class scores recomputed by ``rule`` (-1 where no class was confirmed with both)."""
    scores = [rule(float(e["gain_sticker"]), float(e["gain_patch"]))
              if e.get("candidate") and "gain_sticker" in e and "gain_patch" in e else -1.0
              for e in row["evidence"]]
    return {**row, "class_scores": scores, "anomaly_score": max(scores)}


def leave_one_dataset_out(rows: list[dict[str, Any]], fpr: float) -> list[dict[str, Any]]:
    """Every row decided by the lines fitted on the clean models of the other datasets."""
    datasets = sorted({r["dataset"] for r in rows})
    return leave_one_out([[r for r in rows if r["dataset"] == d] for d in datasets], fpr)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="`scanner zoo eval --detectors ci --json` files")
    ap.add_argument("--fpr", type=float, default=0.05)
    ap.add_argument("--held-out", type=Path, default=None, help="judge this zoo's rows with lines fitted on the runs")
    ap.add_argument("--candidates", type=int, default=None,
                    help="cut every row to its C most drifted classes (a run with more holds each smaller run's)")
    args = ap.parse_args()

    def ci_rows(path: Path) -> list[dict[str, Any]]:
        rows = [r for r in json.loads(path.read_text())["rows"] if r["detector"] == "ci"]
        return [first_candidates(r, args.candidates) for r in rows] if args.candidates else rows

    rows = [r for p in args.runs for r in ci_rows(p)]
    if not any(r["truth_backdoored"] for r in rows) or all(r["truth_backdoored"] for r in rows):
        ap.error("the rows need both clean and backdoored models")
    how = f"judged on {args.held_out}" if args.held_out else "leaving one dataset out"
    print(f"{len(rows)} models, {sum(not r['truth_backdoored'] for r in rows)} clean; lines fitted at FPR "
          f"{args.fpr}, {how}")
    held = ci_rows(args.held_out) if args.held_out else []
    if held:
        print(f"held-out zoo: {len(held)} models, {sum(not r['truth_backdoored'] for r in held)} clean")
    for name, rule in RULES.items():
        cut = [rescored(r, rule) for r in rows]
        t, margin = fit_ci_lines(cut, args.fpr)
        if held:  # the lines fitted on every run given, judged on the other zoo alone
            m = metrics([rescored(r, rule) for r in held], t, margin)
            aurocs = m
        else:  # verdicts from lines that never saw the dataset; AUROC over all rows at the lines fitted on all
            m = metrics(leave_one_dataset_out(cut, args.fpr))
            aurocs = metrics(cut, t, margin)
        print(f"{name:24s} accuracy {m['accuracy']:.3f}  TPR {m['tpr']:.3f}  FPR {m['fpr']:.3f}  "
              f"target {m['target_accuracy']:.3f}  | AUROC trigger {aurocs['auroc']:.3f}, "
              f"both {aurocs['auroc_combined']:.3f}  | line on the runs' clean models {t:.2f}")

if __name__ == "__main__":
    main()
