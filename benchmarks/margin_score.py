"""Share gains or margin lifts? CI's two trigger scores, lines fitted on some zoos, judged on others.

    python benchmarks/margin_score.py --fit runs/s16/eval_seed6_margin.json --judge runs/s16/eval_seed7_margin.json

Each file is a ``scanner zoo eval ZOO --detectors ci --json`` run made since CI records margins (session 16).
For each trigger score (``DetectorConfig.trigger_score``) every row is re-scored from its recorded evidence
(``rescore_ci``); CI's trigger threshold is fitted on the clean models of the ``--fit`` runs at ``--fpr`` with
the dormant margin kept (``fit_ci_lines``, as ``scanner calibrate --dormant-margin`` fits it) and the rows of
the ``--judge`` runs are decided at it: figures no fitted line has seen. Each score's shipped line
(``DetectorConfig(trigger_score=...).decision_threshold``; share's is today's default rule) is printed beside
them, and AUROC of each score on the judged rows (trigger score alone, and
both channels). ``--fit`` rows alone (no ``--judge``) print in-sample figures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from scanner.engine import DetectorConfig
from scanner.engine.config import TRIGGER_SCORES
from scanner.zoo.detect_eval import fit_ci_lines, metrics, rescore_ci


def _rows(paths: list[Path]) -> list[dict[str, Any]]:
    return [r for p in paths for r in json.loads(p.read_text())["rows"] if r["detector"] == "ci"]


def _line(name: str, m: dict[str, Any], threshold: float) -> str:
    def f(v: float | None) -> str:
        return "  –  " if v is None else f"{v:.3f}"

    return (f"{name:34s} line {threshold:8.3f}  accuracy {f(m['accuracy'])}  TPR {f(m['tpr'])}  FPR {f(m['fpr'])}  "
            f"target {f(m['target_accuracy'])}  AUROC {f(m['auroc'])} (both channels {f(m['auroc_combined'])})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fit", nargs="+", type=Path, required=True, help="runs whose clean models fit the lines")
    ap.add_argument("--judge", nargs="*", type=Path, default=[], help="runs judged at those lines (held out)")
    ap.add_argument("--fpr", type=float, default=0.05)
    ap.add_argument("--dormant-margin", type=float, default=DetectorConfig().dormant_margin)
    args = ap.parse_args()
    fit, judged = _rows(args.fit), _rows(args.judge or args.fit)
    bonus = DetectorConfig().family_bonus
    where = "held out" if args.judge else "in sample"
    print(f"{len(fit)} rows fit the lines ({sum(not r['truth_backdoored'] for r in fit)} clean, FPR {args.fpr}, "
          f"dormant margin {args.dormant_margin}); {len(judged)} rows judged ({where})")
    for score in TRIGGER_SCORES:
        t, m = fit_ci_lines([rescore_ci(r, bonus, score) for r in fit], args.fpr, args.dormant_margin)
        rows = [rescore_ci(r, bonus, score) for r in judged]
        print(_line(f"{score}, fitted line", metrics(rows, t, m), t))
        at_default = DetectorConfig(trigger_score=score).decision_threshold
        print(_line(f"{score}, shipped line", metrics(rows, at_default, m), at_default))


if __name__ == "__main__":
    main()
