"""Two CI runs on the same models, side by side, each decided at the engine's default lines.

    python benchmarks/paired_runs.py NEW.json OLD.json [NEW2.json OLD2.json ...] [--learners cocoop]

Pairs of ``scanner zoo eval --json`` files (the first of each pair is the run under test, the second what
it is compared with; a pair may come from different zoos than the next pair). Only the models both files
of a pair hold are compared (filtered by learner when asked). Every row is re-scored with the default
``family_bonus`` and re-decided at the default threshold and dormant margin (``DEFAULT_THRESHOLDS["ci"]``,
``DetectorConfig().dormant_margin``), so that rows saved under older lines compare fairly. Printed per
model where the verdicts differ, then per attack for each side: models, flagged, flagged with the true
target, and the mean detection seconds.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from scanner.engine.config import DetectorConfig
from scanner.zoo.detect_eval import decided_at, rescore_ci


def _decided(path: Path, learners: set[str] | None) -> dict[str, dict[str, Any]]:
    cfg = DetectorConfig()
    rows = json.loads(path.read_text())["rows"]
    return {r["id"]: decided_at(rescore_ci(r, cfg.family_bonus), cfg.decision_threshold, cfg.dormant_margin)
            for r in rows if r["detector"] == "ci" and (learners is None or r["learner"] in learners)}


def _verdict(r: dict[str, Any]) -> str:
    if not r["flagged"]:
        return "clean"
    return f"flagged {r['target']}" + (" (true target)" if r["target"] == r["truth_target"] else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="NEW.json OLD.json pairs")
    ap.add_argument("--learners", default=None, help="compare only these learners' models (e.g. cocoop)")
    args = ap.parse_args()
    if len(args.files) % 2:
        ap.error("give the files in pairs: NEW.json OLD.json ...")
    learners = set(args.learners.split(",")) if args.learners else None
    tally: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    seconds: dict[tuple[str, str], list[float]] = defaultdict(list)
    for new_path, old_path in zip(args.files[::2], args.files[1::2], strict=True):
        new, old = _decided(new_path, learners), _decided(old_path, learners)
        for mid in [m for m in new if m in old]:
            a, b = new[mid], old[mid]
            if (a["flagged"], a["target"]) != (b["flagged"], b["target"]):
                print(f"{new_path.name}: {mid:22s} truth {a['truth_target']}: new {_verdict(a)} "
                      f"(score {a['anomaly_score']:.2f}), old {_verdict(b)} (score {b['anomaly_score']:.2f})")
            for side, r in (("new", a), ("old", b)):
                t = tally[(r["attack"], side)]
                t[0] += 1
                t[1] += int(r["flagged"])
                t[2] += int(r["flagged"] and r["target"] == r["truth_target"])
                seconds[(r["attack"], side)].append(float(r["seconds"]))
    print(f"{'attack':9s} {'side':4s} {'models':>6s} {'flagged':>7s} {'true target':>11s} {'mean s':>6s}")
    for (attack, side), (n, flagged, right) in sorted(tally.items()):
        s = seconds[(attack, side)]
        print(f"{attack:9s} {side:4s} {n:6d} {flagged:7d} {right:11d} {sum(s) / len(s):6.1f}")


if __name__ == "__main__":
    main()
