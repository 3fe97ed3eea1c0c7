"""`scanner zoo info`: per-dataset quality of the bundled CLIP (zero-shot, 16-shot linear probe, CoOp)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from scanner.cli import main
from scanner.zoo.datasets import get_spec


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
    assert "probe-16" in res.output and "mean over 2 generated datasets: zero-shot" in res.output


def test_info_unknown_dataset_is_a_clear_error() -> None:
    res = CliRunner().invoke(main, ["zoo", "info", "--datasets", "sizes,nope"])
    assert res.exit_code == 2
    assert "unknown dataset 'nope'" in res.output and "expected one of" in res.output
