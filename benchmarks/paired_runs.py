"""Two CI runs on the same models, side by side, each decided at its own run's lines or at the default ones.

    python benchmarks/paired_runs.py NEW.json OLD.json [NEW2.json OLD2.json ...] [--learners cocoop] [--default-lines]

Pairs of ``scanner zoo eval --json`` files (the first of each pair is the run under test, the second what
it is compared with; a pair may come from different zoos than the next pair). Only the models both files
of a pair hold are compared (filtered by learner when asked). Every row is decided at the lines its run recorded
(its threshold and dormant margin, and the run's rule D line); with ``--default-lines`` it is re-scored by the
default trigger score and family bonus and re-decided at the default lines (``DetectorConfig().decision_threshold``,
``dormant_margin``, ``dormant_lift``), so that rows saved under older lines compare fairly. Printed per model
where the verdicts differ, then per attack for each side: models, flagged, flagged with the true target, and the mean
detection seconds; then how far the scores moved (new - old: mean, least, most) and how far the most drifted
class's clean margin lift (rule D's input) did.
Session 26 compared fp32 with bf16 searches this way (``scanner zoo eval --precision fp32``).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from scanner.engine.config import DetectorConfig
from scanner.zoo.detect_eval import decided_as_run, decided_by, rows_of, top_lift


def _decided(path: Path, learners: set[str] | None, default_lines: bool) -> dict[str, dict[str, Any]]:
    cfg = DetectorConfig()
    data = json.loads(path.read_text())
    rows = [r for r in rows_of(data) if r["detector"] == "ci" and (learners is None or r["learner"] in learners)]
    if not default_lines:
        return {r["id"]: decided_as_run(r) for r in rows}
    return {r["id"]: decided_by(r, cfg) for r in rows}


def _verdict(r: dict[str, Any]) -> str:
    if not r["flagged"]:
        return "clean"
    return f"flagged {r['target']}" + (" (true target)" if r["target"] == r["truth_target"] else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="NEW.json OLD.json pairs")
    ap.add_argument("--learners", default=None, help="compare only these learners' models (e.g. cocoop)")
    ap.add_argument("--default-lines", action="store_true", help="decide every row at the default lines")
    args = ap.parse_args()
    if len(args.files) % 2:
        ap.error("give the files in pairs: NEW.json OLD.json ...")
    learners = set(args.learners.split(",")) if args.learners else None
    tally: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    seconds: dict[tuple[str, str], list[float]] = defaultdict(list)
    shifts: list[float] = []
    lift_shifts: list[float] = []
    for new_path, old_path in zip(args.files[::2], args.files[1::2], strict=True):
        new, old = (_decided(p, learners, args.default_lines) for p in (new_path, old_path))
        for mid in [m for m in new if m in old]:
            a, b = new[mid], old[mid]
            shifts.append(float(a["anomaly_score"]) - float(b["anomaly_score"]))
            la, lb = top_lift(a), top_lift(b)
            if la is not None and lb is not None:
                lift_shifts.append(la[1] - lb[1])
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
    for name, d in (("score", shifts), ("most drifted class's clean margin lift", lift_shifts)):
        if d:
            print(f"{name}, new - old over {len(d)} models: mean {sum(d) / len(d):+.3f}, least {min(d):+.3f}, "
                  f"most {max(d):+.3f}")


if __name__ == "__main__":
    main()
