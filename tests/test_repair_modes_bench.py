"""``benchmarks/repair_modes.py``: the pre-registered judge of a repair mode pairs the rows and applies every
criterion (a candidate that is worse anywhere fails)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def _row(mid: str, attack: str, asr_id: float, asr_ood: float, ca: float, flagged: bool = False) -> dict[str, Any]:
    return {"id": mid, "attack": attack, "asr_id_after": asr_id, "asr_ood_after": asr_ood, "ca_before": 0.7,
            "ca_after": ca, "rescan_flagged": flagged}


def _run(tmp_path: Path, first: list[dict[str, Any]], second: list[dict[str, Any]],
         capsys: pytest.CaptureFixture[str], run_benchmark: Callable[..., None], *extra: str) -> str:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"rows": first}))
    b.write_text(json.dumps({"rows": second}))
    run_benchmark("repair_modes", f"{a}:{b}", *extra)
    return capsys.readouterr().out


def test_a_mode_at_least_as_good_everywhere_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   run_benchmark: Callable[..., None]) -> None:
    first = [_row("x/badnets", "badnets", 0.08, 0.1, 0.70), _row("x/blended", "blended", 0.02, 0.4, 0.75)]
    second = [_row("x/badnets", "badnets", 0.04, 0.1, 0.71), _row("x/blended", "blended", 0.02, 0.4, 0.75),
              _row("x/only-here", "blended", 0.9, 0.9, 0.1)]  # unpaired: left out, and said so
    out = _run(tmp_path, first, second, capsys, run_benchmark)
    assert "2 models repaired both ways" in out and "only-here" in out
    assert out.strip().endswith("reinit passes")


@pytest.mark.parametrize("change", ["asr", "ca", "rescan"])
def test_a_mode_worse_on_any_criterion_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            run_benchmark: Callable[..., None], change: str) -> None:
    first = [_row(f"x/{i}", "badnets", 0.05, 0.05, 0.70) for i in range(10)]
    second = [dict(r) for r in first]
    if change == "asr":
        second[0]["asr_ood_after"] = 0.5  # pooled mean above the first mode's, and by 0.045 in its attack
    elif change == "ca":
        for r in second:
            r["ca_after"] = 0.68  # 0.02 of clean accuracy lost against the first mode
    else:
        for r in second[:2]:
            r["rescan_flagged"] = True  # 8 of 10 re-scan clean
    out = _run(tmp_path, first, second, capsys, run_benchmark)
    assert out.strip().endswith("reinit fails") and "[FAILED]" in out


def test_a_ca_floor_accepts_a_cost_that_keeps_the_issue_s_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             run_benchmark: Callable[..., None]) -> None:
    first = [_row(f"x/{i}", "badnets", 0.05, 0.05, 0.70) for i in range(10)]
    second = [{**r, "ca_after": 0.685} for r in first]  # 0.015 below the first mode, within 2 points of before
    lower = [{**r, "ca_after": 0.675} for r in first]  # 0.025 lost: under the floor as well

    def verdict(candidate: list[dict[str, Any]], *extra: str) -> str:
        return _run(tmp_path, first, candidate, capsys, run_benchmark, *extra).strip().splitlines()[-1]

    assert verdict(second) == "reinit fails"
    assert verdict(second, "--ca-floor", "-0.02") == "reinit passes"
    assert verdict(lower, "--ca-floor", "-0.02") == "reinit fails"
