"""Share gains, margin lifts or the patch trigger's margin? CI's trigger scores, lines fitted on some zoos, judged on
others.

    python benchmarks/margin_score.py --fit runs/s16/eval_seed6_margin.json --judge runs/s16/eval_seed7_margin.json
    python benchmarks/margin_score.py --leave-one-out A.json B.json C.json
    python benchmarks/margin_score.py --fit runs/s17/eval_p7_seed7.json runs/s17/eval_p7_seed8.json \
        --judge runs/s18/eval_p7_seed9.json --fit-margin

Each file is a ``scanner zoo eval ZOO --detectors ci --json`` run made since CI records margins (session 16).
For each trigger score (``DetectorConfig.trigger_score``) every row is re-scored from its recorded evidence
(``rescore_ci``); CI's trigger threshold is fitted on the clean models of the ``--fit`` runs at ``--fpr`` with
the dormant margin kept (``fit_ci_lines``, as ``scanner calibrate --dormant-margin`` fits it; ``--fit-margin``
fits both channels, as ``scanner calibrate`` does without it) and the rows of
the ``--judge`` runs are decided at it: figures no fitted line has seen. Each score's shipped line
(``DetectorConfig(trigger_score=...)``'s threshold and dormant margin) is printed beside
them, and AUROC of each score on the judged rows (trigger score alone, and
both channels). ``--fit`` rows alone (no ``--judge``) print in-sample figures. ``--leave-one-out`` judges
each run by the lines fitted on the others and pools the held-out verdicts (``held_out_figures``).

Session 16 (seeds 6, 7, 8; 132 models): leave-one-zoo-out accuracy 0.629 (share) / 0.727 (margin), FPR 0.061
both; pooled AUROC 0.732 / 0.795. The pre-registered seed-8 test (lines fitted on seeds 6 and 7): margin 0.705 at
FPR 0.045, share's shipped line 0.795 at 0.091.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from scanner.engine import DetectorConfig
from scanner.engine.config import TRIGGER_SCORES
from scanner.zoo.detect_eval import fit_ci_lines, held_out_figures, metrics, rescore_ci


def _rows(paths: list[Path]) -> list[dict[str, Any]]:
    return [r for p in paths for r in json.loads(p.read_text())["rows"] if r["detector"] == "ci"]


def _line(name: str, m: dict[str, Any], threshold: float) -> str:
    def f(v: float | None) -> str:
        return "  –  " if v is None else f"{v:.3f}"

    return (f"{name:40s} line {threshold:8.3f}  accuracy {f(m['accuracy'])}  TPR {f(m['tpr'])}  FPR {f(m['fpr'])}  "
            f"target {f(m['target_accuracy'])}  AUROC {f(m['auroc'])} (both channels {f(m['auroc_combined'])})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fit", nargs="+", type=Path, default=[], help="runs whose clean models fit the lines")
    ap.add_argument("--leave-one-out", nargs="+", type=Path, default=[],
                    help="runs (one zoo each) judged in turn by the lines fitted on the others")
    ap.add_argument("--judge", nargs="*", type=Path, default=[], help="runs judged at those lines (held out)")
    ap.add_argument("--fpr", type=float, default=0.05)
    ap.add_argument("--dormant-margin", type=float, default=DetectorConfig().dormant_margin)
    ap.add_argument("--fit-margin", action="store_true",
                    help="fit the dormant margin too (both channels, as `scanner calibrate` without --dormant-margin)")
    args = ap.parse_args()
    if args.fit_margin:
        args.dormant_margin = None
    bonus = DetectorConfig().family_bonus
    if args.leave_one_out:
        if len(args.leave_one_out) < 2 or args.fit or args.judge:
            ap.error("--leave-one-out takes two or more runs and no --fit / --judge")
        zoos = [_rows([p]) for p in args.leave_one_out]
        for score in TRIGGER_SCORES:
            scored = [[rescore_ci(r, bonus, score) for r in z] for z in zoos]
            f = held_out_figures(scored, args.fpr, args.dormant_margin)
            lines = ", ".join(f"{t:.3f}" for t, _ in f["lines"])
            print(f"{score:6s} held out: accuracy {f['accuracy']:.3f}  TPR {f['tpr']:.3f}  FPR {f['fpr']:.3f}  target "
                  f"{f['target_accuracy']:.3f} | AUROC pooled {f['auroc_all']:.3f} (both {f['auroc_both_all']:.3f}) "
                  f"| lines per held-out zoo {lines}")
        return
    if not args.fit:
        ap.error("give --fit runs (and --judge runs), or --leave-one-out runs")
    fit, judged = _rows(args.fit), _rows(args.judge or args.fit)
    where = "held out" if args.judge else "in sample"
    kept = "fitted" if args.dormant_margin is None else f"{args.dormant_margin}"
    print(f"{len(fit)} rows fit the lines ({sum(not r['truth_backdoored'] for r in fit)} clean, FPR {args.fpr}, "
          f"dormant margin {kept}); {len(judged)} rows judged ({where})")
    for score in TRIGGER_SCORES:
        t, m = fit_ci_lines([rescore_ci(r, bonus, score) for r in fit], args.fpr, args.dormant_margin)
        rows = [rescore_ci(r, bonus, score) for r in judged]
        print(_line(f"{score}, fitted line" + ("" if args.dormant_margin is not None else f" (margin {m:.3f})"),
                    metrics(rows, t, m), t))
        shipped = DetectorConfig(trigger_score=score)
        print(_line(f"{score}, shipped lines", metrics(rows, shipped.decision_threshold, shipped.dormant_margin),
                    shipped.decision_threshold))


if __name__ == "__main__":
    main()
