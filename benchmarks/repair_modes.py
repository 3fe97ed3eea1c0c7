"""Two repair modes on the same models, side by side, and the pre-registered test of making the second the default.

    python benchmarks/repair_modes.py A.json:B.json [C.json:D.json ...] [--names finetune,reinit]

Each pair is two ``scanner zoo repair-eval --out`` files of the same models repaired two ways (e.g. ``--mode
finetune`` and ``--mode reinit`` with the same ``--detections``); rows are paired by zoo file and model id, and a
model missing from either side is left out (and counted). Printed per attack and pooled: mean ASR-ID and ASR-OOD
with the real trigger after repair, mean clean-accuracy change, and how many repaired models re-scan clean, for
each mode; then the criteria of docs/preregistrations.md ("Repair: reinit as the default mode", session 28), with
the second mode as the candidate:

1. pooled: its mean ASR-ID after and ASR-OOD after each at most the first mode's;
2. per attack: neither of its mean ASRs after above the first mode's by more than ``--asr-slack`` (0.02);
3. per attack: its mean clean-accuracy change at least the first mode's minus ``--ca-slack`` (0.01), or, with
   ``--ca-floor X``, at least X (the issue's own bar is -0.02: clean accuracy within 2 points of before);
4. at least ``--rescan`` (0.90) of its repaired models re-scan clean.

The same criteria judged the OOD-photo labels that avoid the suspected target (session 29, ``--names
reinit,avoid-target --ca-floor -0.02``).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

Row = dict[str, Any]
FIGURES = ("asr_id_after", "asr_ood_after", "ca_change", "rescan_clean")


def rows_by_id(path: Path) -> dict[str, Row]:
    data = json.loads(path.read_text())
    return {r["id"]: r for r in data["rows"]}


def paired(pairs: list[tuple[Path, Path]]) -> tuple[list[tuple[Row, Row]], list[str]]:
    """(rows of both modes, paired by model; ids present on one side only, as ``file:id``)."""
    both: list[tuple[Row, Row]] = []
    lone: list[str] = []
    for a_path, b_path in pairs:
        a, b = rows_by_id(a_path), rows_by_id(b_path)
        both += [(a[k], b[k]) for k in sorted(a.keys() & b.keys())]
        lone += [f"{a_path}:{k}" for k in sorted(a.keys() - b.keys())]
        lone += [f"{b_path}:{k}" for k in sorted(b.keys() - a.keys())]
    return both, lone


def figures(rows: list[Row]) -> dict[str, float]:
    """Mean ASRs after repair and clean-accuracy change; share of repaired models that re-scan clean."""
    return {"asr_id_after": float(np.mean([r["asr_id_after"] for r in rows])),
            "asr_ood_after": float(np.mean([r["asr_ood_after"] for r in rows])),
            "ca_change": float(np.mean([r["ca_after"] - r["ca_before"] for r in rows])),
            "rescan_clean": float(np.mean([not r["rescan_flagged"] for r in rows])),
            "models": float(len(rows))}


def judge(groups: dict[str, tuple[dict[str, float], dict[str, float]]], asr_slack: float, ca_slack: float,
          rescan: float, ca_floor: float | None = None) -> list[tuple[str, bool]]:
    """The four criteria, each (what it says, held); ``groups`` maps "all" and each attack to (first, second)."""
    first, second = groups["all"]
    out = [(f"pooled ASR-ID after {second['asr_id_after']:.3f} <= {first['asr_id_after']:.3f} and ASR-OOD after "
            f"{second['asr_ood_after']:.3f} <= {first['asr_ood_after']:.3f}",
            second["asr_id_after"] <= first["asr_id_after"] and second["asr_ood_after"] <= first["asr_ood_after"])]
    for attack, (f, s) in groups.items():
        if attack == "all":
            continue
        worst = max(s["asr_id_after"] - f["asr_id_after"], s["asr_ood_after"] - f["asr_ood_after"])
        out.append((f"{attack}: ASRs after at most {asr_slack} above the first mode's (worst {worst:+.3f})",
                    worst <= asr_slack + 1e-12))
        near = s["ca_change"] >= f["ca_change"] - ca_slack - 1e-12
        floor = ca_floor is not None and s["ca_change"] >= ca_floor - 1e-12
        out.append((f"{attack}: CA change {s['ca_change']:+.3f} >= {f['ca_change']:+.3f} - {ca_slack}"
                    + (f" or >= {ca_floor:+.3f}" if ca_floor is not None else ""), near or floor))
    n = int(second["models"])
    clean = round(second["rescan_clean"] * n)
    out.append((f"re-scan clean {clean} of {n} >= {rescan:.2f}", clean >= rescan * n - 1e-9))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pairs", nargs="+", help="FIRST.json:SECOND.json, two repair-eval runs of the same models")
    ap.add_argument("--names", default="finetune,reinit", help="the two modes' names, for the printout")
    ap.add_argument("--asr-slack", type=float, default=0.02)
    ap.add_argument("--ca-slack", type=float, default=0.01)
    ap.add_argument("--ca-floor", type=float, default=None,
                    help="a CA change at least this holds criterion 3 too (e.g. -0.02, the issue's bar)")
    ap.add_argument("--rescan", type=float, default=0.90)
    args = ap.parse_args()
    pairs = []
    for spec in args.pairs:
        a, sep, b = spec.partition(":")
        if not sep or not a or not b:
            raise SystemExit(f"{spec!r}: give FIRST.json:SECOND.json")
        pairs.append((Path(a), Path(b)))
    names = args.names.split(",")
    both, lone = paired(pairs)
    if not both:
        raise SystemExit("no model is in both files of any pair")
    by_attack: dict[str, list[tuple[Row, Row]]] = defaultdict(list)
    for a, b in both:
        by_attack[a["attack"]].append((a, b))
    groups = {k: (figures([a for a, _ in v]), figures([b for _, b in v])) for k, v in sorted(by_attack.items())}
    groups["all"] = (figures([a for a, _ in both]), figures([b for _, b in both]))
    print(f"{len(both)} models repaired both ways" + (f"; on one side only: {', '.join(lone)}" if lone else ""))
    print(f"each cell: {names[0]} / {names[1]}")
    print(f"{'attack':9s} {'n':>3s}  " + "  ".join(f"{f:>15s}" for f in FIGURES))
    for attack, (f, s) in groups.items():
        cells = "  ".join(f"{f[k]:6.3f} / {s[k]:6.3f}" for k in FIGURES)
        print(f"{attack:9s} {int(f['models']):3d}  {cells}")
    print(f"\ncriteria for {names[1]} as the default (docs/preregistrations.md):")
    verdicts = judge(groups, args.asr_slack, args.ca_slack, args.rescan, args.ca_floor)
    for text, held in verdicts:
        print(f"  [{'held' if held else 'FAILED'}] {text}")
    print(f"{names[1]} {'passes' if all(h for _, h in verdicts) else 'fails'}")


if __name__ == "__main__":
    main()
