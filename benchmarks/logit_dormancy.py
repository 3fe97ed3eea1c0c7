"""Rule D, the logit form of CI's dormancy check: its line fitted on some zoos' clean models, figures on others.

    python benchmarks/logit_dormancy.py --fit runs/s25/eval_seed17.json [--table]
    python benchmarks/logit_dormancy.py --fit runs/s25/eval_seed17.json --judge runs/s26/eval_seed18.json

Each file is a ``scanner zoo eval --detectors ci --json`` run. For a drift-ranked model (CoOp, unified or
class-specific) the rule reads the most drifted class k* and its lift: the suspect's median margin for k* on the
clean OOD hold-out less the twin's (``natural_margin - twin_margin``, recorded in every row; no search). A model the
run's lines do not flag without rule D is flagged when that lift is above the line, with k* as its target
(``DetectorConfig.dormant_lift``, ``ci_verdict``). CoCoOp models (ranked by reach) keep their verdict.

``--fit``: the line, as the project fits its lines: the largest lift of the fit zoos' clean drift-ranked models that
leaves at most ``--fpr`` of them above, rounded up to 1/32 of a logit (what a pre-registration fixes), and every
fit zoo's figures at it. ``--table`` prints every model's lift, class and verdict. ``--judge``: every judge zoo
decided at the lines its run recorded (threshold, dormant margin) without rule D, and with rule D added at the
fitted line and at 0, with per-attack counts of backdoors found with their target. AUROC ranks by the trigger score
alone (rule D adds no score).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from scanner.zoo.detect_eval import decided_at, metrics, rows_of, top_lift


def load_rows(path: str) -> list[dict[str, Any]]:
    """The CI rows of one evaluation file."""
    data = json.loads(Path(path).read_text())
    rows = [r for r in rows_of(data) if r["detector"] == "ci"]
    if not rows:
        raise SystemExit(f"{path}: no CI rows (run `scanner zoo eval ZOO --detectors ci --json {path}`)")
    return rows


def fit_line(rows: list[dict[str, Any]], fpr: float) -> float:
    """The smallest 1/32 step at or above the lift that leaves at most ``fpr`` of the clean drift-ranked models
    above it (flagging is "above the line")."""
    lifts = sorted((v[1] for r in rows if not r["truth_backdoored"] and (v := top_lift(r)) is not None),
                   reverse=True)
    if not lifts:
        raise SystemExit("the fit zoos hold no clean drift-ranked (CoOp) model")
    allowed = math.floor(fpr * len(lifts))
    return math.ceil(lifts[min(allowed, len(lifts) - 1)] * 32) / 32


def decided(rows: list[dict[str, Any]], lift: float | None) -> list[dict[str, Any]]:
    """Rows decided at the threshold and dormant margin their run recorded, with rule D at ``lift`` (None: off,
    whether or not the run had it on)."""
    return [decided_at(r, float(r["threshold"]), r.get("dormant_margin"), lift) for r in rows]


def line_text(label: str, rows: list[dict[str, Any]]) -> str:
    m = metrics(rows)
    found = {a: sum(1 for r in rows if r["attack"] == a and r["flagged"] and r["target"] == r["truth_target"])
             for a in sorted({r["attack"] for r in rows} - {"none"})}
    counts = " / ".join(f"{a} {n} of {sum(1 for r in rows if r['attack'] == a)}" for a, n in found.items())
    auroc = "n/a" if m["auroc"] is None else f"{m['auroc']:.3f}"
    target = "n/a" if m["target_accuracy"] is None else f"{m['target_accuracy']:.3f}"
    return (f"  {label:28s} accuracy {m['accuracy']:.3f}  TPR {m['tpr']:.3f}  FPR {m['fpr']:.3f}  target {target}  "
            f"AUROC {auroc}  found: {counts}")


def table(name: str, rows: list[dict[str, Any]], line: float) -> None:
    print(f"{name}: lift at the most drifted class (line {line})")
    for r in sorted(rows, key=lambda r: (r["attack"], -(top_lift(r) or (0, -math.inf))[1])):
        v = top_lift(r)
        lift = "  (reach-ranked)" if v is None else f"{v[1]:7.2f} at {v[0]:2d}"
        print(f"  {r['attack']:8s} {r['learner']:9s} {r['id']:24s} lift {lift} truth {r['truth_target']}  "
              f"run flagged {r['flagged']} as {r['target']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fit", nargs="+", required=True, metavar="RUN.json")
    ap.add_argument("--judge", nargs="*", default=[], metavar="RUN.json")
    ap.add_argument("--fpr", type=float, default=0.05)
    ap.add_argument("--table", action="store_true", help="print every model's lift")
    args = ap.parse_args()
    fit = {Path(p).stem: load_rows(p) for p in args.fit}
    line = fit_line([r for rows in fit.values() for r in rows], args.fpr)
    print(f"rule D line (fitted on {', '.join(fit)} at FPR {args.fpr}): {line}")
    for name, rows in fit.items():
        print(f"fit zoo {name}:")
        print(line_text("without rule D", decided(rows, None)))
        print(line_text(f"with rule D at {line}", decided(rows, line)))
        if args.table:
            table(name, rows, line)
    for path in args.judge:
        rows = load_rows(path)
        config = json.loads(Path(path).read_text()).get("config") or {}
        print(f"judge zoo {Path(path).stem} (patch start {config.get('patch_start', 'soft')}, "
              f"line {rows[0]['threshold']}, dormant margin {rows[0].get('dormant_margin')}):")
        print(line_text("without rule D", decided(rows, None)))
        print(line_text(f"with rule D at {line}", decided(rows, line)))
        print(line_text("with rule D at 0", decided(rows, 0.0)))
        if args.table:
            table(Path(path).stem, rows, line)


if __name__ == "__main__":
    main()
