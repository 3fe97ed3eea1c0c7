"""Should CI's patch score subtract the twin's margin? Figures per twin weight, leave-one-zoo-out.

    python benchmarks/twin_margin_cv.py A.json B.json C.json ... [--weights 0,0.25,0.5,0.75,1] [--fpr 0.05]
    python benchmarks/twin_margin_cv.py --judge NEW.json [...]

Each JSON is a ``scanner zoo eval ZOO --detectors ci --json`` run, one zoo each. Runs made with more candidates,
flat candidates or best-of-R restarts are cut to what the default would have decided (``first_candidates``,
``first_restarts``: exact for the first candidate). Every confirmed class is then re-scored by ``"patch-twin"``:
the patch trigger's median margin in the suspect less ``w`` times the twin's median margin for the class under
the same trigger (``family_value``; ``w`` = 0 is the shipped ``"patch-margin"``). A natural trigger draws the
class's evidence, so plain prompts concede the class too; a planted one convinces the suspect alone.

Printed per weight, with the dormancy channel kept at the shipped margin and switched off (margin 1): pooled
held-out accuracy, TPR, FPR and target accuracy, with each zoo judged by lines fitted (as ``scanner calibrate``
fits them) on the *other* zoos' clean models; AUROC over all rows; and the line fitted on every zoo, rounded up
to 1/32 of a logit (what a pre-registration fixes), with each zoo's figures at it.

With ``--judge`` nothing is fitted: each run (and all of them pooled) is decided by three fixed rules, from the same
rows: the shipped default (patch margin at its line, dormancy channel at its margin), the same with the dormancy
channel off, and ``"patch-twin"`` at ``TWIN_MARGIN_WEIGHT`` and ``PATCH_TWIN_THRESHOLD`` with the dormancy channel
off (the rule pre-registered in session 23, docs/preregistrations.md). Figures are broken down by attack.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from scanner.engine import DetectorConfig
from scanner.engine.config import DORMANCY_OFF, PATCH_TWIN_THRESHOLD, TWIN_MARGIN_WEIGHT
from scanner.zoo.detect_eval import (
    first_candidates,
    first_restarts,
    held_out_figures,
    metrics,
    redecide,
    rescore_ci,
)


def as_default(row: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """A CI row of a run with ``config`` as a run with one candidate and one restart would have scored it."""
    out = first_candidates(row, 1)
    if int(config.get("restarts", 1)) > 1:
        if config.get("restart_rule", "mean") != "best":
            raise SystemExit(f"row {row.get('id')!r}: a mean run's evidence is no single restart's; use a "
                             "--restart-rule best run or a one-restart run")
        out = first_restarts(out, 1, float(config.get("family_bonus", 0.5)), "patch-margin")
    return out


def judge(paths: list[Path], zoos: list[list[dict[str, Any]]]) -> None:
    """Print the fixed rules' figures per run, pooled, and per attack (see the module docstring)."""
    shipped = DetectorConfig()
    rules = [("default (patch-margin, dormancy on)", "patch-margin", shipped.decision_threshold,
              shipped.dormant_margin),
             ("patch-margin, dormancy off", "patch-margin", shipped.decision_threshold, DORMANCY_OFF),
             (f"patch-twin w {TWIN_MARGIN_WEIGHT:g}, dormancy off", "patch-twin", PATCH_TWIN_THRESHOLD, DORMANCY_OFF)]
    groups = [*zip([p.stem for p in paths], zoos, strict=True)]
    if len(zoos) > 1:
        groups.append(("pooled", [r for z in zoos for r in z]))
    for name, score, line, margin in rules:
        print(f"{name}, line {line:g}:")
        for label, rows in groups:
            scored = [rescore_ci(r, 0.0, score, TWIN_MARGIN_WEIGHT) for r in rows]
            m = metrics(scored, line, margin)
            attacks = sorted({str(r["attack"]) for r in scored if r["truth_backdoored"]})
            per = ", ".join(f"{a} {sum(_right(r, line, margin) for r in scored if r['attack'] == a)}/"
                            f"{sum(r['attack'] == a for r in scored)}" for a in attacks)
            print(f"  {label}: accuracy {m['accuracy']:.3f}  TPR {m['tpr']:.3f}  FPR {m['fpr']:.3f}  target "
                  f"{m['target_accuracy'] or 0:.3f}  AUROC {m['auroc']:.3f}  | found with the target: {per}")


def _right(row: dict[str, Any], line: float, margin: float) -> bool:
    """Whether a backdoored row is flagged with its true target at these lines."""
    flagged, target = redecide(row, line, margin)
    return flagged and target == row["truth_target"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="one `scanner zoo eval --detectors ci --json` file per zoo")
    ap.add_argument("--weights", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--fpr", type=float, default=0.05)
    ap.add_argument("--judge", action="store_true", help="decide each run by the fixed rules; fit nothing")
    args = ap.parse_args()
    if len(args.runs) < 2 and not args.judge:
        ap.error("leave-one-zoo-out needs at least two zoos' runs")
    files = [json.loads(p.read_text()) for p in args.runs]
    for p, f in zip(args.runs, files, strict=True):
        if (f.get("config") or {}).get("trigger_score", "patch-margin") != "patch-margin":
            ap.error(f"{p}: re-scoring needs a patch-margin run (its evidence holds both margins)")
    zoos = [[as_default(r, f.get("config") or {}) for r in f["rows"] if r["detector"] == "ci"] for f in files]
    if args.judge:
        judge(args.runs, zoos)
        return
    shipped = DetectorConfig().dormant_margin
    print(f"{len(zoos)} zoos, {sum(map(len, zoos))} models; lines fitted at FPR {args.fpr} on the other zoos' clean "
          f"models; dormancy channel at {shipped} or off")
    for w in (float(v) for v in args.weights.split(",")):
        scored = [[rescore_ci(r, 0.0, "patch-twin", w) for r in z] for z in zoos]
        for margin in (shipped, DORMANCY_OFF):
            f = held_out_figures(scored, args.fpr, margin)
            t_all = f["line_all"][0]
            t_reg = math.ceil(t_all * 32) / 32  # a pre-registered line: the fit on every zoo, rounded up to 1/32
            per_zoo = "; ".join(f"{p.stem} {(m := metrics(z, t_reg, margin))['accuracy']:.3f}/{m['fpr']:.3f}"
                                for p, z in zip(args.runs, scored, strict=True))
            print(f"w {w:<4g} dormancy {'off ' if margin >= DORMANCY_OFF else f'{margin:.2f}'}: held-out accuracy "
                  f"{f['accuracy']:.3f}  TPR {f['tpr']:.3f}  FPR {f['fpr']:.3f}  target {f['target_accuracy']:.3f}"
                  f"  | AUROC {f['auroc_all']:.3f}  | fitted on all {t_all:.4f} -> {t_reg:.5f}: {per_zoo}")


if __name__ == "__main__":
    main()
