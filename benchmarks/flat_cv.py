"""How many classes should CI confirm on a flat model (no class's ranking anomaly reaches 2)? Figures per count.

    python benchmarks/flat_cv.py runs/s22/eval_seed14_f5.json [MORE_RUNS ...] [--line 5.96875] \
        [--dormant-margin 0.89] [--fpr 0.05]

Each JSON is a ``scanner zoo eval ZOO --detectors ci --flat-candidates K`` run (one zoo each). The engine
confirms candidates in ranking order with one generator, so such a run holds every smaller rule: for k = 1..K
each flat row is cut to its first k candidates and every other row to its first (``first_candidates``); k = 1
is the run without the option. Printed per k: the figures at ``--line`` (the shipped line by default) over all
rows and per run, and, with two or more runs, leave-one-zoo-out figures with lines fitted on the other zoos'
clean models (as ``scanner calibrate`` fits them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from scanner.engine import DetectorConfig
from scanner.zoo.detect_eval import first_candidates, held_out_figures, is_flat, metrics


def cut(row: dict[str, Any], k: int) -> dict[str, Any]:
    """``row`` as a run with ``flat_candidates = k`` (k = 1: without the option) would have decided it."""
    return first_candidates(row, min(k, int(row["n_classes"])) if is_flat(row) else 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="one `scanner zoo eval --flat-candidates K --json` file per zoo")
    ap.add_argument("--line", type=float, default=DetectorConfig().decision_threshold)
    ap.add_argument("--dormant-margin", type=float, default=DetectorConfig().dormant_margin)
    ap.add_argument("--fpr", type=float, default=0.05)
    args = ap.parse_args()
    files = [json.loads(p.read_text()) for p in args.runs]
    k_max = min(int((f.get("config") or {}).get("flat_candidates", 0)) for f in files)
    if k_max < 1:
        ap.error("every run must have been made with --flat-candidates K (K >= 1)")
    zoos = [[r for r in f["rows"] if r["detector"] == "ci"] for f in files]
    n_flat = sum(is_flat(r) for z in zoos for r in z)
    print(f"{len(zoos)} zoo(s), {sum(map(len, zoos))} models, {n_flat} flat; every run confirmed up to {k_max} "
          f"classes on flat models; line {args.line} / dormant margin {args.dormant_margin}")
    for k in sorted({1, 2, 3, 5, k_max} & set(range(1, k_max + 1))):
        rows = [[cut(r, k) for r in z] for z in zoos]
        every = [r for z in rows for r in z]
        m = metrics(every, args.line, args.dormant_margin)
        per = "; ".join(f"{p.stem} {(q := metrics(z, args.line, args.dormant_margin))['accuracy']:.3f}/{q['fpr']:.3f}"
                        for p, z in zip(args.runs, rows, strict=True))
        line = (f"flat candidates {k}{' (off)' if k == 1 else ''}: accuracy {m['accuracy']:.3f}  TPR {m['tpr']:.3f}  "
                f"FPR {m['fpr']:.3f}  target {m['target_accuracy'] or 0:.3f}  AUROC {m['auroc']:.3f}  | per run {per}")
        if len(rows) > 1:
            f = held_out_figures(rows, args.fpr, args.dormant_margin)
            line += f"  | held out {f['accuracy']:.3f} (FPR {f['fpr']:.3f})"
        print(line)


if __name__ == "__main__":
    main()
