"""`scanner zoo info`: per-dataset quality of the bundled CLIP (zero-shot, 16-shot linear probe, CoOp)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from scanner.cli import main
from scanner.zoo.datasets import get_spec
from scanner.zoo.quality import summary_lines


def test_info_measures_the_named_datasets() -> None:
    res = CliRunner().invoke(main, ["zoo", "info", "--json", "--no-coop", "--datasets", "sizes,digits"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [r["dataset"] for r in rows] == ["sizes", "digits"]
    for r in rows:
        assert r["classes"] == get_spec(r["dataset"]).n_classes and "coop16" not in r
        # better than chance on held-out images: the probe really learned from the 16 shots
        assert 1 / r["classes"] < r["linear_probe16"] <= 1.0 and 0.0 <= r["zero_shot"] <= 1.0
    assert rows[1]["real"] and not rows[0]["real"]


def test_info_table_prints_the_generated_mean() -> None:
    res = CliRunner().invoke(main, ["zoo", "info", "--no-coop", "--no-probe", "--datasets", "sizes,arrows"])
    assert res.exit_code == 0, res.output
    assert "probe-16" in res.output and "mean over 2 (generated, as in pre-training): zero-shot" in res.output
    assert "shifted" not in res.output and "CoOp - zero-shot" not in res.output  # no such rows, no CoOp column


def test_summary_groups_in_distribution_shifted_and_real_rows_and_states_coop_gain() -> None:
    rows = [
        {"dataset": "a", "real": False, "shift": None, "zero_shot": 0.9, "coop16": 0.8},
        {"dataset": "b", "real": False, "shift": "blur", "zero_shot": 0.2, "coop16": 0.5},
        {"dataset": "c", "real": True, "shift": None, "zero_shot": 0.1, "coop16": 0.4},
    ]
    lines = summary_lines(rows)
    assert lines == [
        "mean over 1 (generated, as in pre-training): zero-shot 0.900, CoOp-16 0.800, CoOp - zero-shot -0.100",
        "mean over 1 (generated, shifted): zero-shot 0.200, CoOp-16 0.500, CoOp - zero-shot +0.300",
        "mean over 2 (generated): zero-shot 0.550, CoOp-16 0.650, CoOp - zero-shot +0.100",
        "mean over 3 (all): zero-shot 0.400, CoOp-16 0.567, CoOp - zero-shot +0.167",
    ]
    # a group where one row lacks CoOp states zero-shot only
    assert summary_lines([{"real": False, "shift": None, "zero_shot": 0.5}]) == [
        "mean over 1 (generated, as in pre-training): zero-shot 0.500",
        "mean over 1 (generated): zero-shot 0.500",
        "mean over 1 (all): zero-shot 0.500",
    ]


def test_info_unknown_dataset_is_a_clear_error() -> None:
    res = CliRunner().invoke(main, ["zoo", "info", "--datasets", "sizes,nope"])
    assert res.exit_code == 2
    assert "unknown dataset 'nope'" in res.output and "expected one of" in res.output
