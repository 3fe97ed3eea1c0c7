"""CI's figures over several judged zoos at once, with bootstrap intervals: one zoo of 55 models is one draw.

    python benchmarks/pooled_zoos.py runs/s26/eval_seed18.json runs/s26/eval_seed19.json [--lines own|default]
        [--boot 2000] [--seed 0]
    python benchmarks/pooled_zoos.py runs/s26/eval_seed18.json:runs/s26/zoo_p7_seed18 ... --min-asr-ood 0.5

Each file is a ``scanner zoo eval --detectors ci --json`` run of its own zoo. ``--lines own`` (the default) takes
every row's verdict at the lines its run decided it at (``decided_as_run``: threshold, dormant margin and rule D's
line); ``--lines default`` re-decides every row at today's default settings (``DetectorConfig()``: family bonus,
trigger score, threshold, dormant margin, rule D), re-scored from the recorded evidence, never searched again.
Printed per zoo and pooled: accuracy, TPR, FPR, target right on flagged backdoors, AUROC of the trigger score, and
backdoors found with their target per attack. The pooled line gives 95 % percentile intervals from ``--boot``
resamples of the models, drawn within each zoo (so every resample keeps each zoo's size and its clean share).

``--min-asr-ood X`` keeps only the backdoors whose real trigger sends at least X of triggered OOD photos to the
target (the zoo manifest's ``asr_ood``; give each file's zoo as ``FILE:ZOO_DIR``), with every clean model: CI
reads OOD photos alone, and a planted trigger that does not fire on them is not the threat it is built for (the
paper's: a trigger that works "even for OOD data"). How many backdoors each zoo drops is printed.

``--trigger-score NAME`` (with ``--lines default``) decides by another score at its own default line: e.g.
``patch-student`` on runs made with ``scanner zoo eval --student-steps N``, paired with today's score on the same
rows (the student moves no search, so one run holds both).

``--learner NAME`` keeps only the rows of one learner (``coop-csc``, ``coop``, ``cocoop``): a p7 zoo's backdoors are
all CSC-CoOp while half its clean models are CoCoOp, which CI rarely flags, so the CSC rows alone compare like with
like (their FPR is over the clean CSC models only).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from scanner.engine.config import TRIGGER_SCORES, DetectorConfig
from scanner.zoo.detect_eval import decided_as_run, decided_by, metrics, rows_of

FIGURES = ("accuracy", "tpr", "fpr", "target_accuracy", "auroc")


def load(path: Path, lines: str, trigger_score: str | None = None) -> list[dict[str, Any]]:
    """The CI rows of one file, each carrying the verdict at the chosen lines (``trigger_score``: today's default
    settings with that score instead, at its own default line)."""
    data = json.loads(path.read_text())
    rows = [r for r in rows_of(data) if r["detector"] == "ci"]
    if not rows:
        raise SystemExit(f"{path}: no CI rows (run `scanner zoo eval ZOO --detectors ci --json {path}`)")
    if lines == "own":
        return [decided_as_run(r) for r in rows]
    cfg = DetectorConfig()
    if trigger_score is not None:
        steps = int((data.get("config") or {}).get("student_steps") or 0)
        if trigger_score == "patch-student" and not steps:
            raise SystemExit(f"{path}: its run distilled no student (run `scanner zoo eval ... --student-steps N`)")
        cfg = replace(cfg, trigger_score=trigger_score, student_steps=steps)
    return [decided_by(r, cfg) for r in rows]


def effective(rows: list[dict[str, Any]], zoo: Path | None, min_asr_ood: float) -> tuple[list[dict[str, Any]], int]:
    """``rows`` less the backdoors whose real trigger's ASR on OOD photos (``zoo``'s manifest) is under
    ``min_asr_ood``, and how many were dropped."""
    if zoo is None:
        raise SystemExit("--min-asr-ood needs each file's zoo: give FILE:ZOO_DIR")
    manifest = zoo / "manifest.json"
    if not manifest.is_file():
        raise SystemExit(f"{zoo}: no manifest.json (give the folder `scanner zoo build` wrote)")
    asr = {m["id"]: m.get("asr_ood") for m in json.loads(manifest.read_text())["models"]}
    missing = [r["id"] for r in rows if r["id"] not in asr]
    if missing:
        raise SystemExit(f"{zoo}: its manifest lacks {', '.join(missing[:3])}: is it the zoo these rows came from?")
    kept = [r for r in rows if not r["truth_backdoored"] or (asr[r["id"]] or 0.0) >= min_asr_ood]
    return kept, len(rows) - len(kept)


def found(rows: list[dict[str, Any]]) -> str:
    """Backdoors flagged with their real target, per attack."""
    hit: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for r in rows:
        if r["truth_backdoored"]:
            total[r["attack"]] += 1
            hit[r["attack"]] += int(bool(r["flagged"]) and r["target"] == r["truth_target"])
    return " / ".join(f"{a} {hit[a]} of {total[a]}" for a in sorted(total))


def line(name: str, m: dict[str, Any]) -> str:
    vals = "  ".join(f"{k} {m[k]:.3f}" if m.get(k) is not None else f"{k} -" for k in FIGURES)
    return f"  {name:24s} models {m['models']:3d}  {vals}"


def intervals(zoos: list[list[dict[str, Any]]], boot: int, seed: int) -> dict[str, tuple[float, float]]:
    """95 % percentile intervals of the pooled figures, models resampled within each zoo."""
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = defaultdict(list)
    for _ in range(boot):
        sample = [z[i] for z in zoos for i in rng.integers(0, len(z), len(z))]
        if len({bool(r["truth_backdoored"]) for r in sample}) < 2:
            continue  # AUROC needs both kinds
        m = metrics(sample)
        for k in FIGURES:
            if m.get(k) is not None:
                draws[k].append(float(m[k]))
    return {k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for k, v in draws.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="zoo eval JSON files, each FILE or FILE:ZOO_DIR")
    ap.add_argument("--lines", choices=("own", "default"), default="own")
    ap.add_argument("--boot", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-asr-ood", type=float, default=None,
                    help="keep only backdoors whose real trigger reaches this ASR on OOD photos (needs ZOO_DIR)")
    ap.add_argument("--learner", default=None, help="keep only the rows of this learner (e.g. coop-csc)")
    ap.add_argument("--trigger-score", choices=TRIGGER_SCORES, default=None,
                    help="with --lines default: decide by this score (at its default line) instead of today's")
    args = ap.parse_args()
    if args.trigger_score is not None and args.lines != "default":
        raise SystemExit("--trigger-score re-decides rows: give it with --lines default")
    specs = [(Path(f), Path(z) if z else None) for f, _, z in (spec.partition(":") for spec in args.files)]
    zoos = [load(p, args.lines, args.trigger_score) for p, _ in specs]
    if args.learner is not None:
        zoos = [[r for r in rows if r["learner"] == args.learner] for rows in zoos]
        empty = [str(p) for (p, _), rows in zip(specs, zoos, strict=True) if not rows]
        if empty:
            raise SystemExit(f"no {args.learner} rows in {', '.join(empty)} (learners are named as in the rows: "
                             "coop, coop-csc, cocoop)")
    dropped = [0] * len(zoos)
    if args.min_asr_ood is not None:
        for i, (_, zoo) in enumerate(specs):
            zoos[i], dropped[i] = effective(zoos[i], zoo, args.min_asr_ood)
    print(f"CI at the {'lines each run decided at' if args.lines == 'own' else 'default settings of today'}"
          + (f", scored by {args.trigger_score}" if args.trigger_score is not None else "")
          + (f", backdoors with ASR-OOD >= {args.min_asr_ood} only" if args.min_asr_ood is not None else "")
          + (f", {args.learner} models only" if args.learner is not None else "") + ":")
    for (p, _), rows, d in zip(specs, zoos, dropped, strict=True):
        print(line(p.stem, metrics(rows)) + f"  found: {found(rows)}"
              + (f"  ({d} backdoors under the ASR-OOD line left out)" if args.min_asr_ood is not None else ""))
    pooled = [r for z in zoos for r in z]
    print(line(f"pooled ({len(zoos)} zoos)", metrics(pooled)) + f"  found: {found(pooled)}")
    ci = intervals(zoos, args.boot, args.seed)
    print("  95 % intervals (" + str(args.boot) + " resamples within zoos): "
          + "  ".join(f"{k} [{lo:.3f}, {hi:.3f}]" for k, (lo, hi) in ci.items()))


if __name__ == "__main__":
    main()
