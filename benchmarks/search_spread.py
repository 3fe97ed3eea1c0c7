"""How much CI's verdicts depend on the search seed: one zoo, one OOD pool, several seeds for the trigger search.

    python benchmarks/search_spread.py ZOO [--seeds 0,1] [--scored-families-only] [--restarts R] [--json-dir DIR]

``scanner zoo eval`` draws the OOD pool and seeds the trigger search from one ``--seed``. Here the pool stays
the default evaluation pool of seed 0 and only the search seed changes: every model's initial trigger, batch
order and translations are drawn again, nothing else. A seed gives every model of a zoo the same draws, so
one seed's zoo-wide accuracy is a single draw too. Printed: per seed, CI's accuracy, TPR, FPR and AUROC at
the shipped lines; per pair of seeds, how far the models' scores move (over the models confirmed in either
run) and which verdicts flip; then every model's score per seed. ``--json-dir`` keeps one resumable rows file
per seed (``seed<S>.json``). ``--restarts R`` scores each candidate by the mean of R searches of its scored
family (``DetectorConfig.restarts``): what it buys is the drop in the spread between seeds.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from scanner.clip import load_bundled
from scanner.engine import DetectorConfig
from scanner.zoo.detect_eval import EVAL_SEED_OFFSET, evaluate_zoo, metrics
from scanner.zoo.ood import default_ood_pool


def spread(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> tuple[list[float], list[str]]:
    """Score differences (models confirmed in either run: an unconfirmed row scores -1) and verdict flips."""
    ids = sorted(set(a) & set(b))
    diffs = [a[i]["anomaly_score"] - b[i]["anomaly_score"] for i in ids
             if a[i]["anomaly_score"] > -1 or b[i]["anomaly_score"] > -1]
    flips = [i for i in ids if a[i]["flagged"] != b[i]["flagged"]]
    return diffs, flips


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("zoo", type=Path)
    ap.add_argument("--seeds", default="0,1", help="search seeds, comma-separated")
    ap.add_argument("--scored-families-only", action="store_true",
                    help="search only the families the score reads (DetectorConfig.search_all_families = False)")
    ap.add_argument("--restarts", type=int, default=1, help="searches of each scored family, averaged")
    ap.add_argument("--json-dir", type=Path, default=None, help="resumable rows, one file per seed")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    cfg = DetectorConfig(search_all_families=not args.scored_families_only, restarts=args.restarts)
    bb = load_bundled()
    pool = default_ood_pool(cfg.n_images, bb.image_size, seed=EVAL_SEED_OFFSET)  # `zoo eval --seed 0`'s pool
    out_dir = args.json_dir or Path(tempfile.mkdtemp(prefix="search-spread-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[int, dict[str, dict[str, Any]]] = {}
    for s in seeds:
        rows = evaluate_zoo(args.zoo, bb, ["ci"], out=out_dir / f"seed{s}.json", config=cfg, seed=s, ood=pool)
        runs[s] = {r["id"]: r for r in rows}
        m = metrics(rows)
        print(f"search seed {s}: accuracy {m['accuracy']:.3f}  TPR {m['tpr']:.3f}  FPR {m['fpr']:.3f}  "
              f"AUROC {m['auroc']:.3f} (both channels {m['auroc_combined']:.3f})  s/model {m['seconds_mean']:.1f}",
              flush=True)
    for a, b in itertools.combinations(seeds, 2):
        diffs, flips = spread(runs[a], runs[b])
        print(f"seeds {a} vs {b}: {len(diffs)} models scored, |score difference| mean {np.mean(np.abs(diffs)):.2f}, "
              f"median {np.median(np.abs(diffs)):.2f}, max {np.max(np.abs(diffs)):.2f}; "
              f"{len(flips)} verdicts flip: {', '.join(flips) or '-'}")
    print("\nmodel                    truth  " + "  ".join(f"seed {s:<3d}" for s in seeds))
    first = runs[seeds[0]]
    for i in sorted(first):
        truth = f"B:{first[i]['truth_target']}" if first[i]["truth_backdoored"] else "C"
        print(f"{i:24s} {truth:6s} " + "  ".join(f"{runs[s][i]['anomaly_score']:8.2f}" for s in seeds))
    print(f"rows: {out_dir}")


if __name__ == "__main__":
    main()
