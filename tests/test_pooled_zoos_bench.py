"""``benchmarks/pooled_zoos.py``: CI's figures over several judged zoos, and its row filters."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def _row(mid: str, learner: str, target: int | None, flagged: bool, score: float) -> dict[str, Any]:
    attack = "none" if target is None else "badnets"
    return {"id": mid, "dataset": mid.split("/")[0], "attack": attack, "learner": learner, "n_classes": 10,
            "detector": "ci", "truth_backdoored": target is not None, "truth_target": target, "flagged": flagged,
            "target": target if flagged else None, "anomaly_score": score, "threshold": 6.0, "dormant_margin": None,
            "dormant_lift": None, "seconds": 1.0,
            # the class that scores is the target, or class 0 for a clean model
            "class_scores": [score if k == (target or 0) else -1.0 for k in range(10)],
            "evidence": [{"natural_share": 0.1, "zero_shot_share": 0.1} for _ in range(10)]}


def _write(tmp_path: Path, rows: list[dict[str, Any]]) -> str:
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"config": {}, "rows": rows}))
    return str(path)


def test_the_learner_filter_compares_like_with_like(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    run_benchmark: Callable[..., None]) -> None:
    rows = [_row("a/badnets", "coop-csc", 3, True, 9.0), _row("a/clean-0", "coop-csc", None, True, 7.0),
            _row("a/clean-1", "cocoop", None, False, 1.0), _row("b/clean-1", "cocoop", None, False, 0.5)]
    path = _write(tmp_path, rows)
    run_benchmark("pooled_zoos", path, "--boot", "20")
    every = capsys.readouterr().out
    assert "fpr 0.333" in every  # one of three clean models, two of them CoCoOp
    run_benchmark("pooled_zoos", path, "--boot", "20", "--learner", "coop-csc")
    csc = capsys.readouterr().out
    assert "coop-csc models only" in csc and "fpr 1.000" in csc and "models   2" in csc
    with pytest.raises(SystemExit, match="no coop rows"):
        run_benchmark("pooled_zoos", path, "--boot", "20", "--learner", "coop")


def test_rows_with_a_student_are_decided_by_the_patch_student_score_too(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], run_benchmark: Callable[..., None]) -> None:
    def confirmed(row: dict[str, Any], k: int, margin: float, student: float, gain: float) -> dict[str, Any]:
        row["evidence"][k].update(candidate=1.0, gain_patch=gain, margin_patch=margin, stu_margin_patch=student,
                                  ref_margin_patch=-2.0, natural_margin=-3.0, twin_margin=-3.0)
        return row

    # a planted trigger neither the twin nor the student shares, and a natural one both share (a clean model over the
    # line: the twin concedes the class, and the student's margin is within 2 logits of the suspect's)
    rows = [confirmed(_row("a/badnets", "coop-csc", 3, True, 9.0), 3, 9.0, -4.0, 0.9),
            confirmed(_row("a/clean-0", "coop-csc", None, True, 8.0), 0, 8.0, 7.5, 0.1)]
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"config": {"student_steps": 300}, "rows": rows}))
    run_benchmark("pooled_zoos", str(path), "--boot", "20", "--lines", "default")
    today = capsys.readouterr().out
    assert "fpr 1.000" in today and "tpr 1.000" in today
    run_benchmark("pooled_zoos", str(path), "--boot", "20", "--lines", "default", "--trigger-score", "patch-student")
    student = capsys.readouterr().out
    assert "scored by patch-student" in student and "fpr 0.000" in student and "tpr 1.000" in student
    with pytest.raises(SystemExit, match="--lines default"):
        run_benchmark("pooled_zoos", str(path), "--trigger-score", "patch-student")
    path.write_text(json.dumps({"config": {}, "rows": rows}))
    with pytest.raises(SystemExit, match="no student"):
        run_benchmark("pooled_zoos", str(path), "--lines", "default", "--trigger-score", "patch-student")
