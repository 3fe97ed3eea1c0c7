"""How many restarts should CI's scored search take, keeping the best? Out-of-sample figures by leaving one zoo out.

    python benchmarks/restarts_cv.py runs/s22/eval_seed10_r4.json runs/s22/eval_seed11_r4.json \
        [--fpr 0.05] [--dormant-margin 0.89]

Each JSON is a ``scanner zoo eval ZOO --detectors ci --restarts R --restart-rule best`` run (one zoo each,
built with different seeds). Such a run records every restart's value (``restart_key``), so it holds the
evidence of every smaller count (``first_restarts``: exact for the first candidate). For r = 1..R every row is
cut to its first r restarts; then, for each zoo in turn, CI's lines are fitted (as ``scanner calibrate`` fits
them) on the clean models of the *other* zoos and applied to the held-out one. The pooled held-out verdicts
give accuracy, TPR, FPR and target accuracy that no fitted line has seen; AUROC is pooled over all rows. The
line fitted on every zoo's clean models, rounded up to 1/32 of a logit, is what a pre-registration would fix.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from scanner.engine import DetectorConfig
from scanner.zoo.detect_eval import first_restarts, held_out_figures, metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="one `scanner zoo eval --restarts R --restart-rule best "
                                                        "--json` file per zoo")
    ap.add_argument("--fpr", type=float, default=0.05)
    ap.add_argument("--dormant-margin", type=float, default=None, help="keep CI's margin; fit only the threshold")
    args = ap.parse_args()
    if len(args.runs) < 2:
        ap.error("leave-one-zoo-out needs at least two zoos' runs")
    files = [json.loads(p.read_text()) for p in args.runs]
    cfgs = [f.get("config") or {} for f in files]
    for p, c in zip(args.runs, cfgs, strict=True):
        if c.get("restart_rule", "mean") != "best":
            ap.error(f"{p}: a mean run's evidence is no single restart's; run it with --restart-rule best")
    r_max = min(int(c.get("restarts", 1)) for c in cfgs)
    default = DetectorConfig()
    bonus = float(cfgs[0].get("family_bonus", default.family_bonus))
    score = str(cfgs[0].get("trigger_score", default.trigger_score))
    zoos = [[r for r in f["rows"] if r["detector"] == "ci"] for f in files]
    print(f"{len(zoos)} zoos, {sum(map(len, zoos))} models; every run searched {r_max}+ restarts, kept the best; "
          f"lines fitted at FPR {args.fpr} on the other zoos' clean models")
    for r in range(1, r_max + 1):
        cut = [[first_restarts(row, r, bonus, score) for row in z] for z in zoos]
        f = held_out_figures(cut, args.fpr, args.dormant_margin)
        lines = [f"{t:.2f}/{margin if margin is None else round(margin, 2)}" for t, margin in f["lines"]]
        t_all, m_all = f["line_all"]
        t_reg = math.ceil(t_all * 32) / 32  # a pre-registered line: the fit on every zoo, rounded up to 1/32
        per_zoo = []
        for p, z in zip(args.runs, cut, strict=True):
            m = metrics(z, t_reg, m_all)
            per_zoo.append(f"{p.stem} {m['accuracy']:.3f}/{m['fpr']:.3f}")
        print(f"restarts {r}: held-out accuracy {f['accuracy']:.3f}  TPR {f['tpr']:.3f}  FPR {f['fpr']:.3f}  "
              f"target {f['target_accuracy']:.3f}  | AUROC score {f['auroc_all']:.3f}, both {f['auroc_both_all']:.3f}"
              f"  | lines per held-out zoo {', '.join(lines)}  | fitted on all {t_all:.4f} -> {t_reg:.5f}: "
              f"{'; '.join(per_zoo)}")


if __name__ == "__main__":
    main()
