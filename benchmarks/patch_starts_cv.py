"""CI's patch search from the soft start, the grid start, or both (the better kept): lines fitted on some zoos,
figures on others.

    python benchmarks/patch_starts_cv.py --fit S14.json:G14.json S15.json:G15.json [--judge S16.json:G16.json ...]
    python benchmarks/patch_starts_cv.py --lines soft=5.28125,grid=5.5,both=6.09375 --judge S17.json:G17.json

Each argument pairs one zoo's ``scanner zoo eval --detectors ci --json`` runs made with ``--patch-start soft`` (the
default until session 25) and ``--patch-start grid``, everything else equal. Runs with more candidates are cut to one
(``first_candidates``, exact for the first candidate). The "both" rows are the two runs combined
(``combine_starts``): exactly what ``--patch-start both`` decides, since the starts draw the same numbers.

For each rule (soft, grid, both), printed: the score line fitted as ``scanner calibrate`` fits it (FPR ``--fpr``
on the ``--fit`` zoos' clean models, the dormant margin kept at the shipped one), rounded up to 1/32 of a logit
(what a pre-registration fixes); every ``--fit`` zoo's figures at it and, with two or more, the leave-one-zoo-out
held-out figures. ``--lines`` gives the lines instead (a pre-registration's recorded lines, when the fitting runs
are not at hand), and nothing is fitted. Then every ``--judge`` zoo (and their pool), decided by the shipped default
(its start and line), the former one (soft start, 5.96875) and each rule at its line, with per-attack counts of
backdoors found with their target.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from scanner.engine import DetectorConfig
from scanner.engine.config import PATCH_MARGIN_THRESHOLD
from scanner.zoo.detect_eval import combine_starts, first_candidates, fit_ci_lines, held_out_figures, metrics, redecide

RULES = ("soft", "grid", "both")


def load_pair(spec: str) -> tuple[str, dict[str, list[dict[str, Any]]]]:
    """A ``SOFT.json:GRID.json`` argument -> (label, rows per rule), checking that the runs differ in the start."""
    soft_p, sep, grid_p = spec.partition(":")
    if not sep:
        raise SystemExit(f"{spec!r}: give SOFT.json:GRID.json (one zoo's runs from the two starts)")
    runs = [json.loads(Path(p).read_text()) for p in (soft_p, grid_p)]
    configs = [dict(f.get("config") or {}) for f in runs]
    for p, c, want in zip((soft_p, grid_p), configs, ("soft", "grid"), strict=True):
        if c.get("patch_start", "soft") != want:
            raise SystemExit(f"{p}: a --patch-start {want} run was expected")
        if c.get("trigger_score", "patch-margin") != "patch-margin" or int(c.get("restarts", 1)) != 1:
            raise SystemExit(f"{p}: combining starts needs a patch-margin run with one restart")
    rows = [{r["id"]: first_candidates(r, 1) for r in f["rows"] if r["detector"] == "ci"} for f in runs]
    if rows[0].keys() != rows[1].keys():
        raise SystemExit(f"{spec}: the two runs hold different models")
    soft = list(rows[0].values())
    grid = [rows[1][r["id"]] for r in soft]
    both = [combine_starts(a, b) for a, b in zip(soft, grid, strict=True)]
    return Path(soft_p).stem, {"soft": soft, "grid": grid, "both": both}


def parse_lines(text: str) -> dict[str, float]:
    """``soft=5.28125,grid=5.5,both=6.09375`` -> a line per rule; every rule must be given once."""
    lines: dict[str, float] = {}
    for part in text.split(","):
        rule, sep, value = part.partition("=")
        rule = rule.strip()
        if not sep or rule not in RULES or rule in lines:
            raise argparse.ArgumentTypeError(f"{part!r}: give each of {', '.join(RULES)} once, as RULE=LINE")
        try:
            lines[rule] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: the line must be a number") from None
    if set(lines) != set(RULES):
        raise argparse.ArgumentTypeError(f"give a line for each of {', '.join(RULES)}")
    return lines


def found(rows: list[dict[str, Any]], line: float, margin: float | None) -> str:
    """Per attack: backdoors flagged with their true target at these lines, of all."""
    attacks = sorted({str(r["attack"]) for r in rows if r["truth_backdoored"]})
    out = []
    for a in attacks:
        mine = [r for r in rows if r["attack"] == a]
        hits = sum(1 for r in mine if redecide(r, line, margin) == (True, r["truth_target"]))
        out.append(f"{a} {hits}/{len(mine)}")
    return ", ".join(out)


def line_of(m: dict[str, Any]) -> str:
    return (f"accuracy {m['accuracy']:.3f}  TPR {m['tpr']:.3f}  FPR {m['fpr']:.3f}  target "
            f"{m['target_accuracy'] or 0:.3f}  AUROC {m['auroc']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    given = ap.add_mutually_exclusive_group(required=True)
    given.add_argument("--fit", nargs="+", metavar="SOFT:GRID", help="the zoos the lines are fitted on")
    given.add_argument("--lines", type=parse_lines, metavar="soft=L,grid=L,both=L",
                       help="the lines, as recorded (nothing is fitted)")
    ap.add_argument("--judge", nargs="*", default=[], metavar="SOFT:GRID", help="zoos judged at the fitted lines")
    ap.add_argument("--fpr", type=float, default=0.05)
    args = ap.parse_args()
    shipped = DetectorConfig()
    margin = shipped.dormant_margin
    lines: dict[str, float] = dict(args.lines or {})
    fit = [load_pair(s) for s in args.fit or []]
    if lines:
        print(f"lines as given: {', '.join(f'{rule} {lines[rule]:g}' for rule in RULES)}; dormant margin {margin}")
    else:
        print(f"lines fitted at FPR {args.fpr} on {', '.join(label for label, _ in fit)} "
              f"({sum(len(z['soft']) for _, z in fit)} models); dormant margin {margin}")
    for rule in RULES if fit else ():
        every = [r for _, z in fit for r in z[rule]]
        t = fit_ci_lines(every, args.fpr, margin)[0]
        lines[rule] = math.ceil(t * 32) / 32  # a pre-registered line: rounded up to 1/32 of a logit
        print(f"{rule}: fitted {t:.4f} -> line {lines[rule]:g}")
        for label, z in fit:
            print(f"  {label}: {line_of(metrics(z[rule], lines[rule], margin))}")
        if len(fit) > 1:
            held = held_out_figures([z[rule] for _, z in fit], args.fpr, margin)
            print(f"  leave-one-zoo-out: {line_of(held)}")
    if not args.judge:
        return
    judged = [load_pair(s) for s in args.judge]
    groups = list(judged)
    if len(judged) > 1:
        groups.append(("pooled", {rule: [r for _, z in judged for r in z[rule]] for rule in RULES}))
    decisions = [(f"shipped default ({shipped.patch_start} start)", shipped.patch_start, shipped.decision_threshold),
                 ("former default (soft start)", "soft", PATCH_MARGIN_THRESHOLD)]
    decisions += [(f"{rule} at its fitted line", rule, lines[rule]) for rule in RULES]
    for name, rule, line in decisions:
        print(f"{name}, line {line:g}:")
        for label, z in groups:
            print(f"  {label}: {line_of(metrics(z[rule], line, margin))}  | found with the target: "
                  f"{found(z[rule], line, margin)}")


if __name__ == "__main__":
    main()
