"""Zoo evaluation: saved rows are reused and only re-decided when decision settings change; both CI
channels are re-decided from recorded evidence exactly as the engine decides; calibration fits both."""

from __future__ import annotations

import json
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from scanner.cli import main
from scanner.clip import ClipBackbone
from scanner.engine import DetectorConfig
from scanner.engine.calibration import fit_two_channels
from scanner.engine.config import DORMANT_LIFT_LINE
from scanner.errors import ConfigError
from scanner.prompting.train import TrainConfig
from scanner.zoo import detect_eval
from scanner.zoo.build import ZooPlan, build_zoo
from scanner.zoo.detect_eval import combined_score, evaluate_zoo, metrics, redecide

SMALL = DetectorConfig(n_images=48, batch_size=12, holdout=0.25, candidates=1,
                       families=("additive", "patch"))


def _row(anomalies: list[float], gains: list[float], natural: list[float], zero_shot: list[float], *,
         truth: int | None) -> dict[str, Any]:
    ev = [{"score": g, "natural_share": n, "zero_shot_share": z} for g, n, z in zip(gains, natural, zero_shot,
                                                                                     strict=True)]
    return {"id": "x", "detector": "ci", "class_scores": anomalies, "anomaly_score": max(anomalies),
            "evidence": ev, "threshold": 2.0, "flagged": False, "target": None, "truth_backdoored": truth is not None,
            "truth_target": truth, "n_classes": len(anomalies), "seconds": 1.0, "attack": "x", "dataset": "d"}


def test_redecide_follows_the_engine_rule() -> None:
    # CI rows: a class's score is its confirmed trigger's gain (-1 = not a candidate)
    awake = _row([0.1, 0.1, 0.1], [0.1, 0.1, 0.1], [0.1, 0.85, 0.05], [0.3, 0.02, 0.68], truth=1)
    assert redecide(awake, 0.6, 0.8) == (True, 1)  # 0.83 beyond zero-shot
    assert redecide(awake, 0.6, None) == (False, None)
    weak = _row([0.3, -1.0, -1.0], [0.3, -1.0, -1.0], [0.3, 0.3, 0.4], [0.3, 0.3, 0.4], truth=None)
    assert redecide(weak, 0.6, 0.8) == (False, None)  # its best trigger moves too few images
    strong = _row([0.9, -1.0, -1.0], [0.9, -1.0, -1.0], [0.3, 0.3, 0.4], [0.3, 0.3, 0.4], truth=0)
    assert redecide(strong, 0.6, 0.8) == (True, 0) and redecide(strong, 0.95, 0.8) == (False, None)
    m = metrics([awake, weak, strong], threshold=0.6, dormant_margin=0.8)
    assert m["accuracy"] == 1.0 and m["fpr"] == 0.0 and m["target_accuracy"] == 1.0
    assert m["auroc_combined"] == 1.0
    # an anomalously drifted prompt is held to a lower bar, as in the engine (awake_excess)
    half = _row([0.1, 0.1, 0.1], [0.1, 0.1, 0.1], [0.1, 0.6, 0.3], [0.3, 0.05, 0.65], truth=1)
    assert redecide(half, 0.6, 0.8) == (False, None)  # 0.55 beyond zero-shot: under the margin
    for e, a in zip(half["evidence"], [0.0, 5.0, 1.0], strict=True):
        e["drift_anomaly"] = a
    assert redecide(half, 0.6, 0.8) == (True, 1)
    # weighed up past 1 (0.55 / DRIFTED_BAR = 0.92 -> with 0.7 beyond zero-shot, 1.17): margin 1 is still off
    half["evidence"][1]["natural_share"] = 0.75
    assert redecide(half, 0.6, 0.99) == (True, 1) and redecide(half, 0.6, 1.0) == (False, None)
    assert combined_score(half, 0.6, 1.0) < 1.0 < combined_score(half, 0.6, 0.99)
    # the plain protocol's rows: an anomaly index, and a trigger that must move half the images
    plain = {**_row([9.0, 0.4, 0.3], [0.3, 0.1, 0.1], [0.3, 0.3, 0.4], [0.3, 0.3, 0.4], truth=None),
             "detector": "ci-plain"}
    assert redecide(plain, 2.0, None) == (False, None)
    assert redecide({**plain, "evidence": [{**e, "score": 0.9} for e in plain["evidence"]]}, 2.0, None) == (True, 0)


def test_leave_one_out_decides_each_group_by_the_others_lines() -> None:
    from scanner.zoo.detect_eval import leave_one_out

    flat = [0.3, 0.3]
    a_clean = _row([0.3, -1.0], [0.3, -1.0], flat, flat, truth=None)
    b_clean = _row([0.8, -1.0], [0.8, -1.0], flat, flat, truth=None)
    b_bad = _row([-1.0, 0.6], [-1.0, 0.6], flat, flat, truth=1)
    decided, lines = leave_one_out([[a_clean], [b_clean, b_bad]], fpr=0.0, margin=0.9)
    assert lines == [(0.8, 0.9), (0.3, 0.9)]  # group A judged by B's clean model, B by A's
    assert [(r["flagged"], r["target"], r["threshold"]) for r in decided] == \
        [(False, None, 0.8), (True, 0, 0.3), (True, 1, 0.3)]
    from scanner.zoo.detect_eval import held_out_figures

    fig = held_out_figures([[a_clean], [b_clean, b_bad]], fpr=0.0, margin=0.9)
    assert fig["lines"] == lines and fig["line_all"] == (0.8, 0.9)
    assert fig["fpr"] == 0.5 and fig["tpr"] == 1.0  # B's clean model is over A's line
    assert fig["auroc_all"] == 0.5  # the backdoored 0.6 scores between the clean 0.3 and 0.8


def test_backdoors_that_fail_on_ood_images_are_reported_apart() -> None:
    from scanner.zoo.detect_eval import WORKS_ON_OOD, report

    clean = {**_row([0.1, 0.1], [0.1, 0.1], [0.5, 0.5], [0.5, 0.5], truth=None), "id": "d/clean"}
    hit = {**_row([0.9, -1.0], [0.9, -1.0], [0.1, 0.1], [0.1, 0.1], truth=0), "id": "d/hit", "flagged": True,
           "target": 0}
    dud = {**_row([0.1, -1.0], [0.1, -1.0], [0.1, 0.1], [0.1, 0.1], truth=1), "id": "d/dud"}
    manifest = {"models": [{"id": "d/clean", "asr_ood": None}, {"id": "d/hit", "asr_ood": 0.97},
                           {"id": "d/dud", "asr_ood": WORKS_ON_OOD - 0.01}]}
    split = report([clean, hit, dud], manifest)["ci"]["by_ood_asr"]
    works, fails = split[f"asr-ood>={WORKS_ON_OOD:g}"], split[f"asr-ood<{WORKS_ON_OOD:g}"]
    assert works["models"] == 2 and works["accuracy"] == 1.0 and works["tpr"] == 1.0
    assert fails["models"] == 2 and fails["tpr"] == 0.0 and fails["fpr"] == 0.0
    assert "by_ood_asr" not in report([clean, hit, dud])["ci"]


def test_two_channel_calibration_spends_the_budget_once() -> None:
    # 20 clean models: (anomaly, trigger works, excess)
    clean = [(float(i), i % 2 == 0, 0.05 * i) for i in range(20)]
    t, margin = fit_two_channels(clean, fpr=0.1)
    assert margin is not None and margin >= 0.5
    flagged = sum((a > t and works) or (e is not None and e > margin) for a, works, e in clean)
    assert flagged <= 2
    assert fit_two_channels([(1.0, True, None)], fpr=0.0) == (1.0, None)
    with pytest.raises(ValueError):
        fit_two_channels([], fpr=0.05)
    # a margin given is kept; the clean models above it spend the budget before the threshold gets any
    # excesses 0.85, 0.9, 0.95 are over 0.82: three models spend more than the budget of two, so the line sits
    # on the highest working score left (16; flagging is "above")
    assert fit_two_channels(clean, fpr=0.1, margin=0.82) == (16.0, 0.82)
    # none over 0.99: two of the working scores (18, 16, 14, ...) may pass the line
    assert fit_two_channels(clean, fpr=0.1, margin=0.99) == (14.0, 0.99)
    # clean excesses past 1 (a drifted class's weighed excess): the fitted margin stops at 1, which switches the
    # channel off, and the threshold gets the whole budget (two of 18, 16, 14, ... above it)
    high = [(a, w, 1.2 + e) for a, w, e in clean]
    assert fit_two_channels(high, fpr=0.1) == (14.0, 1.0)
    # models flagged by a channel the fit keeps (the logit dormancy line) spend the budget first: one of them
    # leaves one of the two places, so one working score (18) may pass the line
    apart = [i == 3 for i in range(20)]
    assert fit_two_channels(clean, fpr=0.1, margin=0.99, flagged_apart=apart) == (16.0, 0.99)
    with pytest.raises(ValueError, match="flagged_apart holds 1 values for 20"):
        fit_two_channels(clean, fpr=0.1, flagged_apart=[True])


def test_calibration_keeps_the_logit_dormancy_line_and_counts_its_clean_flags() -> None:
    from scanner.zoo.detect_eval import fit_ci_lines

    def row(i: int, lift: float) -> dict[str, Any]:
        r = _row([float(i), -1.0], [float(i), -1.0], [0.1, 0.1], [0.1, 0.1], truth=None)
        for k, e in enumerate(r["evidence"]):
            e.update(natural_margin=lift if k == 0 else -5.0, twin_margin=0.0, drift_anomaly=3.0 if k == 0 else 0.0)
        return r

    rows = [row(i, 1.0 if i == 0 else -5.0) for i in range(20)]  # model 0's drifted prompt lifts past -0.875
    assert fit_ci_lines(rows, 0.1, margin=0.99) == (17.0, 0.99)  # two of 19, 18, ... above
    assert fit_ci_lines(rows, 0.1, margin=0.99, lift=-0.875) == (18.0, 0.99)  # model 0 took one place
    m = metrics(rows, threshold=18.0, dormant_margin=0.99, dormant_lift=-0.875)
    assert m["fpr"] == 0.1  # model 0 (rule D) and model 19 (its score)


def test_a_row_carries_its_logit_dormancy_line_through_every_re_decision() -> None:
    from scanner.zoo.detect_eval import decided_as_run, decided_at, rows_of

    # no trigger, no clean-share excess: only rule D (the drifted class 0 lifts 1 logit over the twin) can flag
    row = _row([-1.0, -1.0], [-1.0, -1.0], [0.1, 0.1], [0.1, 0.1], truth=0)
    for k, e in enumerate(row["evidence"]):
        e.update(natural_margin=1.0 if k == 0 else -5.0, twin_margin=0.0, drift_anomaly=3.0 if k == 0 else 0.0)
    on = decided_at(row, 2.0, 0.9, -0.875)
    assert (on["flagged"], on["target"], on["dormant_lift"]) == (True, 0, -0.875)
    assert (decided_at(row, 2.0, 0.9)["flagged"], decided_at(row, 2.0, 0.9)["dormant_lift"]) == (False, None)
    # remade from its evidence at its own lines, it keeps rule D (a row of a run with D on stays flagged by D)
    again = decided_as_run({**on, "flagged": False, "target": None})
    assert (again["flagged"], again["target"], again["dormant_lift"]) == (True, 0, -0.875)
    # rows written before rows recorded the line take their file's, or the pre-D "off" where the file predates it
    bare = {k: v for k, v in row.items() if k != "dormant_lift"}
    assert rows_of({"config": {"dormant_lift": -0.875}, "rows": [bare]})[0]["dormant_lift"] == -0.875
    assert rows_of({"config": {"threshold": 2.0}, "rows": [bare]})[0]["dormant_lift"] is None
    assert rows_of({"rows": [bare]})[0]["dormant_lift"] is None
    assert rows_of({"config": {"dormant_lift": None}, "rows": [on]})[0]["dormant_lift"] == -0.875  # its own


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory, bundled_backbone: ClipBackbone) -> Path:
    # the bundled backbone: ``scanner calibrate`` evaluates with it
    root = tmp_path_factory.mktemp("eval-zoo")
    plan = ZooPlan(datasets=("sizes",), attacks=("badnets",), clean_per_dataset=1, seed=0,
                   train=TrainConfig(epochs=1), ood_size=40)
    build_zoo(root, plan, bundled_backbone)
    return root


def test_saved_rows_are_re_decided_not_re_run(zoo: Path, bundled_backbone: ClipBackbone, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "eval.json"
    share = replace(SMALL, trigger_score="share")  # the family bonus below scores shares
    first = evaluate_zoo(zoo, bundled_backbone, ["ci"], out=out, config=share, accel="torch")
    assert len(first) == 2 and all("zero_shot_share" in e for r in first for e in r["evidence"])
    assert all(r["dormant_margin"] == SMALL.dormant_margin for r in first)
    assert all(r["dormant_lift"] == SMALL.dormant_lift for r in first)  # every line a row was decided at
    from scanner.engine.invert import native_bf16

    assert json.loads(out.read_text())["config"]["bf16"] is native_bf16("cpu")  # the precision the searches ran at

    def no_detect(*args: object, **kw: object) -> None:
        raise AssertionError("a saved row was searched again")

    monkeypatch.setattr(detect_eval, "detect", no_detect)
    stricter = DetectorConfig(**{**share.__dict__, "threshold": 1e9, "dormant_margin": 1.0, "dormant_lift": None})
    again = evaluate_zoo(zoo, bundled_backbone, ["ci"], out=out, config=stricter, accel="torch")
    assert [r["evidence"] for r in again] == [r["evidence"] for r in first]
    assert not any(r["flagged"] for r in again) and all(r["threshold"] == 1e9 for r in again)
    # so is the logit dormancy line: under any lift, every drift-ranked model is flagged at its most drifted prompt
    believed = evaluate_zoo(zoo, bundled_backbone, ["ci"], out=out, accel="torch",
                            config=replace(stricter, dormant_lift=-1e9))
    assert all(r["learner"] != "cocoop" for r in believed)
    for r in believed:
        drift = [e["drift_anomaly"] for e in r["evidence"]]
        assert r["flagged"] and r["target"] == drift.index(max(drift))
    # the family bonus is a decision setting too: saved rows are re-scored from their recorded per-family gains
    best_only = DetectorConfig(**{**share.__dict__, "family_bonus": 0.0})
    rescored = evaluate_zoo(zoo, bundled_backbone, ["ci"], out=out, config=best_only, accel="torch")
    for r, r0 in zip(rescored, first, strict=True):
        for k, e in enumerate(r["evidence"]):
            gains = [e[f"gain_{f}"] for f in SMALL.families] if e["candidate"] else None
            assert r["class_scores"][k] == (max(gains) if gains else r0["class_scores"][k])
        assert r["anomaly_score"] == max(r["class_scores"])


def test_saved_rows_are_rescored_by_margin_and_old_rows_refused() -> None:
    from scanner.zoo.detect_eval import rescore_ci

    ev = [{"candidate": 1.0, "gain_sticker": 0.2, "gain_patch": 0.9, "margin_sticker": -3.0, "margin_patch": 4.0,
           "natural_margin": -8.0, "ref_margin_sticker": -1.0, "ref_margin_patch": -3.0, "twin_margin": -2.0},
          {"candidate": 0.0, "natural_margin": -1.0, "twin_margin": 0.0}]
    row = {"id": "x/badnets", "detector": "ci", "class_scores": [1.0, -1.0], "evidence": ev}
    assert rescore_ci(row, 0.5)["class_scores"] == pytest.approx([0.9 + 0.5 * 0.2, -1.0])
    by_margin = rescore_ci(row, 0.5, "margin")
    # sticker: lift 5 in the suspect, 1 in the twin -> 4; patch: lift 12, the twin's -1 does not count -> 12
    assert by_margin["class_scores"] == pytest.approx([12.0 + 0.5 * 4.0, -1.0])
    assert by_margin["anomaly_score"] == pytest.approx(14.0) and by_margin["evidence"][0]["score"] == 14.0
    old = {**row, "evidence": [{k: v for k, v in e.items() if "margin" not in k} for e in ev]}
    with pytest.raises(ConfigError, match="written before CI recorded margins"):
        rescore_ci(old, 0.5, "margin")


def test_calibrate_writes_both_channels(zoo: Path, tmp_path: Path) -> None:
    out, toml = tmp_path / "eval.json", tmp_path / "scanner.toml"
    toml.write_text('ood_size = 500\n[detector_options]\nbatch_size = 16\n')
    res = CliRunner().invoke(main, ["calibrate", str(zoo), "--eval-json", str(out), "--config", str(toml),
                                    "--n-images", "48", "--fpr", "0.0"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    saved = tomllib.loads(toml.read_text())
    assert saved["ood_size"] == 500 and saved["detector_options"]["batch_size"] == 16  # other keys kept
    # written rounded up, never below the fitted line (the clean model on it must stay unflagged)
    assert report["threshold"] <= saved["threshold"] <= report["threshold"] + 1e-6
    margin = saved["detector_options"]["dormant_margin"]
    assert report["dormant_margin"] <= margin <= report["dormant_margin"] + 1e-6
    assert report["at_threshold"]["fpr"] == 0.0


def test_calibrate_pools_the_clean_models_of_several_zoos(zoo: Path, tmp_path: Path) -> None:
    toml = tmp_path / "scanner.toml"
    args = ["calibrate", str(zoo), str(zoo), "--eval-json", str(tmp_path / "a.json"), "--eval-json",
            str(tmp_path / "b.json"), "--config", str(toml), "--n-images", "48", "--fpr", "0.0"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["clean_models"] == 2  # one clean model per copy of the zoo
    bad = CliRunner().invoke(main, args[:4] + args[6:])  # two zoos, one --eval-json
    assert bad.exit_code == 2 and "one --eval-json per zoo" in bad.output


def test_calibrate_can_keep_the_dormant_margin(zoo: Path, tmp_path: Path) -> None:
    toml = tmp_path / "scanner.toml"
    args = ["calibrate", str(zoo), "--eval-json", str(tmp_path / "a.json"), "--config", str(toml), "--n-images",
            "48", "--fpr", "0.0", "--dormant-margin", "0.95"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["dormant_margin"] == 0.95
    assert tomllib.loads(toml.read_text())["detector_options"]["dormant_margin"] == 0.95
    bad = CliRunner().invoke(main, [*args, "--detector", "nc"])
    assert bad.exit_code == 2 and "ci detector only" in bad.output


def test_the_cli_offers_the_engines_trigger_scores() -> None:
    from scanner.cli._shared import TRIGGER_SCORES as CLI_SCORES
    from scanner.engine.config import TRIGGER_SCORES

    assert CLI_SCORES == TRIGGER_SCORES


def test_calibrate_under_the_margin_score_writes_it_beside_its_threshold(zoo: Path, tmp_path: Path) -> None:
    toml = tmp_path / "scanner.toml"
    args = ["calibrate", str(zoo), "--eval-json", str(tmp_path / "a.json"), "--config", str(toml), "--n-images",
            "48", "--fpr", "0.0", "--dormant-margin", "0.95", "--trigger-score", "margin"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    saved = tomllib.loads(toml.read_text())
    assert saved["detector_options"]["trigger_score"] == "margin"  # the threshold is in its units
    rows = json.loads((tmp_path / "a.json").read_text())["rows"]
    clean = [r["anomaly_score"] for r in rows if not r["truth_backdoored"]]
    assert saved["threshold"] >= max(clean)  # fitted at FPR 0 on the margin scores
    assert all(r["evidence"][r["class_scores"].index(r["anomaly_score"])].get("margin_patch") is not None
               for r in rows if r["anomaly_score"] > -1)


def test_fitted_lines_are_written_rounded_up() -> None:
    from scanner.cli.calibrate import _round_up

    fitted = 0.7200000286102295  # a float32 share: the clean model on the line has exactly this excess
    assert fitted < _round_up(fitted) <= fitted + 1e-6
    assert _round_up(0.72) == 0.72 and _round_up(0.1234564) == 0.123457


def test_eval_help_states_the_default_threshold_in_force() -> None:
    from scanner.engine import DetectorConfig

    res = CliRunner().invoke(main, ["zoo", "eval", "--help"])
    text = " ".join(res.output.split())  # click wraps help lines
    assert DetectorConfig().trigger_score == "patch-margin"
    assert res.exit_code == 0 and f"CI: patch margin {DetectorConfig().decision_threshold:g}" in text


def test_a_run_with_more_candidates_holds_every_smaller_runs_evidence(zoo: Path, bundled_backbone: ClipBackbone,
                                                                     tmp_path: Path) -> None:
    from scanner.zoo.detect_eval import first_candidates, rescore_ci

    one = evaluate_zoo(zoo, bundled_backbone, ["ci"], config=SMALL, accel="torch")
    two_cfg = DetectorConfig(**{**SMALL.__dict__, "candidates": 2})
    res = CliRunner().invoke(main, ["zoo", "eval", str(zoo), "--detectors", "ci", "--candidates", "2", "--n-images",
                                    "48", "--accel", "torch", "--json", str(tmp_path / "two.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "two.json").read_text())["config"]["candidates"] == 2
    two = evaluate_zoo(zoo, bundled_backbone, ["ci"], config=two_cfg, accel="torch")
    for a, b in zip(one, two, strict=True):
        assert sum(e["candidate"] for e in b["evidence"]) == min(2, b["n_classes"])
        cut = first_candidates(b, 1)
        assert cut["class_scores"] == a["class_scores"] and cut["anomaly_score"] == a["anomaly_score"]
        assert [e["candidate"] for e in cut["evidence"]] == [e["candidate"] for e in a["evidence"]]
        # the cut row's evidence is the one-candidate run's, key for key: a class it no longer confirms keeps no
        # trigger search's keys (so the runs of two starts, cut alike, combine: combine_starts)
        assert [set(e) for e in cut["evidence"]] == [set(e) for e in a["evidence"]]
        # re-scored with another bonus, the cut row still scores only its one confirmed class
        assert rescore_ci(cut, 0.0)["class_scores"] == rescore_ci(a, 0.0)["class_scores"]


def test_an_awake_candidate_run_answers_for_the_drift_candidates_alone(zoo: Path, bundled_backbone: ClipBackbone,
                                                                        tmp_path: Path) -> None:
    from scanner.zoo.detect_eval import first_candidates

    res = CliRunner().invoke(main, ["zoo", "eval", str(zoo), "--detectors", "ci", "--awake-candidate", "--kappa", "8",
                                    "--restarts", "2", "--restart-rule", "best", "--n-images", "48", "--accel", "torch",
                                    "--patch-start", "grid", "--json", str(tmp_path / "awake.json")])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "awake.json").read_text())
    assert saved["config"]["awake_candidate"] is True and saved["config"]["kappa"] == 8.0
    assert saved["config"]["restarts"] == 2 and saved["config"]["restart_rule"] == "best"
    assert saved["config"]["patch_start"] == "grid"
    one = evaluate_zoo(zoo, bundled_backbone, ["ci"], config=SMALL, accel="torch")
    rows = evaluate_zoo(zoo, bundled_backbone, ["ci"], config=replace(SMALL, awake_candidate=True), accel="torch")
    for a, row in zip(one, rows, strict=True):
        ev = row["evidence"]
        excess = [e["natural_share"] - e["zero_shot_share"] for e in ev]
        awake = max(range(len(ev)), key=lambda k: (excess[k], -k))  # first of the largest, as torch.argmax
        drift = {k for k, e in enumerate(a["evidence"]) if e["candidate"]}
        assert {k for k, e in enumerate(ev) if e["candidate"]} == drift | {awake}
        both = first_candidates(row, 1, awake=True)
        assert both["class_scores"] == row["class_scores"]
        cut = first_candidates(row, 1)  # the drift candidate alone: searched first, so a one-candidate run's
        assert cut["class_scores"] == a["class_scores"]
        if awake not in drift:
            with pytest.raises(ConfigError, match="--awake-candidate"):
                first_candidates(row, len(ev), awake=True)
    # a file written before the field existed resumes as a run with its default (no awake candidate)
    old = tmp_path / "old.json"
    CliRunner().invoke(main, ["zoo", "eval", str(zoo), "--detectors", "ci", "--n-images", "48", "--accel", "torch",
                              "--json", str(old)])
    data = json.loads(old.read_text())
    del data["config"]["awake_candidate"]
    old.write_text(json.dumps(data))
    again = CliRunner().invoke(main, ["zoo", "eval", str(zoo), "--detectors", "ci", "--n-images", "48", "--accel",
                                      "torch", "--json", str(old)])
    assert again.exit_code == 0 and json.loads(old.read_text())["rows"] == data["rows"]


def test_a_best_of_restarts_run_answers_for_every_smaller_count(zoo: Path, bundled_backbone: ClipBackbone) -> None:
    from scanner.zoo.detect_eval import first_restarts

    base = replace(SMALL, search_all_families=False)
    one = evaluate_zoo(zoo, bundled_backbone, ["ci"], config=base, accel="torch")
    three = evaluate_zoo(zoo, bundled_backbone, ["ci"], config=replace(base, restarts=3, restart_rule="best"),
                         accel="torch")
    lifted = 0
    for a, row in zip(one, three, strict=True):
        cut = first_restarts(row, 1, base.family_bonus, base.trigger_score)
        assert cut["class_scores"] == pytest.approx(a["class_scores"])  # one candidate: its first draw is the same
        assert first_restarts(row, 3, base.family_bonus, base.trigger_score)["class_scores"] == \
            pytest.approx(row["class_scores"])
        lifted += max(row["class_scores"][k] - a["class_scores"][k] for k, e in enumerate(row["evidence"])
                      if e["candidate"]) > 0
        with pytest.raises(ConfigError, match="--restarts 4"):
            first_restarts(row, 4, base.family_bonus, base.trigger_score)
    assert lifted > 0  # a later restart did better somewhere: the cut is not the whole run


def test_soft_and_grid_runs_combine_into_the_both_starts_run(zoo: Path, bundled_backbone: ClipBackbone) -> None:
    from scanner.zoo.detect_eval import combine_starts

    # rule D on (an option): combining the starts must keep its line too
    soft, grid, both = (evaluate_zoo(zoo, bundled_backbone, ["ci"], accel="torch",
                                     config=replace(SMALL, patch_start=s, dormant_lift=DORMANT_LIFT_LINE))
                        for s in ("soft", "grid", "both"))
    for a, b, row in zip(soft, grid, both, strict=True):
        combined = combine_starts(a, b, threshold=row["threshold"])  # a "both" run's own line (BOTH_STARTS_THRESHOLD)
        assert combined["threshold"] == row["threshold"] != a["threshold"]
        assert combined["dormant_lift"] == row["dormant_lift"] == DORMANT_LIFT_LINE  # rule D's line is kept
        assert combined["class_scores"] == pytest.approx(row["class_scores"])
        assert (combined["flagged"], combined["target"]) == (row["flagged"], row["target"])
        for e, want in zip(combined["evidence"], row["evidence"], strict=True):
            assert {k: v for k, v in e.items() if k.endswith("_start_patch")} == pytest.approx(
                {k: v for k, v in want.items() if k.endswith("_start_patch")})
    # rows of two different searches (another seed) are refused, not merged
    other = evaluate_zoo(zoo, bundled_backbone, ["ci"], config=replace(SMALL, patch_start="grid"), seed=1,
                         accel="torch")
    with pytest.raises(ConfigError, match="--patch-start alone"):
        combine_starts(soft[0], other[0])
    with pytest.raises(ConfigError, match="not one model"):
        combine_starts(soft[0], grid[1])


def test_flat_candidates_confirm_more_classes_only_where_no_class_stands_out(zoo: Path, tmp_path: Path) -> None:
    from scanner.zoo.detect_eval import is_flat

    out = tmp_path / "flat.json"
    res = CliRunner().invoke(main, ["zoo", "eval", str(zoo), "--detectors", "ci", "--flat-candidates", "2",
                                    "--n-images", "48", "--accel", "torch", "--json", str(out)])
    assert res.exit_code == 0, res.output
    saved = json.loads(out.read_text())
    assert saved["config"]["flat_candidates"] == 2
    for row in saved["rows"]:
        confirmed = sum(e["candidate"] for e in row["evidence"])
        assert confirmed == (min(2, row["n_classes"]) if is_flat(row) else 1), row["id"]


def test_shards_split_a_zoo_and_report_joins_them_as_one_run(zoo: Path, bundled_backbone: ClipBackbone,
                                                             tmp_path: Path) -> None:
    from scanner.zoo.detect_eval import load_manifest

    ids = [m["id"] for m in load_manifest(zoo)["models"]]
    whole = evaluate_zoo(zoo, bundled_backbone, ["ci"], config=SMALL, accel="torch")
    parts = [tmp_path / "s1.json", tmp_path / "s2.json"]
    for k, part in enumerate(parts, start=1):
        rows = evaluate_zoo(zoo, bundled_backbone, ["ci"], out=part, config=SMALL, accel="torch", shard=(k, 2))
        assert [r["id"] for r in rows] == ids[k - 1::2] and all(r["device"] == "cpu" for r in rows)
    merged = tmp_path / "merged.json"
    res = CliRunner().invoke(main, ["zoo", "report", *map(str, parts), "--zoo", str(zoo), "--json", str(merged)])
    assert res.exit_code == 0, res.output
    assert "2 rows from 2 file(s)" in res.output and "== ci: accuracy" in res.output
    joined = json.loads(merged.read_text())["rows"]
    # a seeded search does not depend on which process ran it: the shards hold the whole run's rows
    assert sorted((r["id"], r["anomaly_score"], r["target"]) for r in joined) == \
        sorted((r["id"], r["anomaly_score"], r["target"]) for r in whole)
    # a shard listed twice adds nothing
    again = CliRunner().invoke(main, ["zoo", "report", str(parts[0]), str(parts[0])])
    assert again.exit_code == 0 and "1 rows from 2 file(s)" in again.output


def test_report_refuses_files_that_measured_different_things(tmp_path: Path) -> None:
    from scanner.zoo.detect_eval import merge_rows

    base = {"ood_sha256": "a" * 64, "config": _config(), "accel": "auto", "rows": [_row([1.0], [0.5], [0.1], [0.1],
                                                                                          truth=None)]}
    a, b, c, junk = (tmp_path / n for n in ("a.json", "b.json", "c.json", "junk.json"))
    a.write_text(json.dumps(base))
    b.write_text(json.dumps({**base, "ood_sha256": "b" * 64}))
    c.write_text(json.dumps({**base, "config": {**_config(), "lr": 0.5}}))
    junk.write_text("{not json")
    assert len(merge_rows([a])["rows"]) == 1
    # a decision setting is not a search setting: files that differ only there are merged
    d = tmp_path / "d.json"
    d.write_text(json.dumps({**base, "config": {**_config(), "threshold": 3.0}}))
    assert len(merge_rows([a, d])["rows"]) == 1
    for other, words in ((b, "another OOD pool"), (c, "other search settings"), (junk, "not a `scanner zoo eval")):
        res = CliRunner().invoke(main, ["zoo", "report", str(a), str(other)])
        assert res.exit_code == 2 and words in res.output, res.output


def _config() -> dict[str, Any]:
    from scanner.zoo.detect_eval import _config_dict

    return _config_dict(SMALL)


def test_eval_rejects_a_bad_shard_or_an_absent_device(zoo: Path) -> None:
    import torch

    base = ["zoo", "eval", str(zoo), "--detectors", "ci", "--n-images", "48"]
    for spec in ("3/2", "0/2", "half"):
        res = CliRunner().invoke(main, [*base, "--shard", spec])
        assert res.exit_code == 2 and "K/N" in res.output, res.output
    res = CliRunner().invoke(main, [*base, "--device", "gpu"])
    assert res.exit_code == 2 and "cpu, cuda, cuda:N or mps" in res.output
    if not torch.cuda.is_available():
        res = CliRunner().invoke(main, [*base, "--device", "cuda"])
        assert res.exit_code == 2 and "torch sees no such CUDA GPU" in res.output, res.output


def test_a_results_file_of_another_zoo_is_refused_not_resumed(zoo: Path, bundled_backbone: ClipBackbone,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    evaluate_zoo(zoo, bundled_backbone, ["ci"], out=out, config=SMALL, accel="torch", shard=(1, 2))
    saved = json.loads(out.read_text())
    assert saved["zoo"]["seed"] == 0 and saved["shard"] == "1/2"
    # another seed's zoo has the same model ids: its verdicts must not pass for this zoo's
    other = {**saved, "zoo": {**saved["zoo"], "seed": 7}}
    out.write_text(json.dumps(other))
    res = CliRunner().invoke(main, ["zoo", "eval", str(zoo), "--detectors", "ci", "--n-images", "48",
                                    "--json", str(out)])
    assert res.exit_code == 2 and "another zoo (seed 7" in res.output, res.output
    assert json.loads(out.read_text()) == other  # nothing lost
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps(saved))
    res = CliRunner().invoke(main, ["zoo", "report", str(mine), str(out)])
    assert res.exit_code == 2 and "another zoo" in res.output
    out.write_text(json.dumps({**saved, "rows": [{"id": "x"}]}))
    res = CliRunner().invoke(main, ["zoo", "report", str(out)])
    assert res.exit_code == 2 and "lack model ids" in res.output


def test_a_run_of_a_new_family_joins_a_saved_run_as_one_run_of_all(zoo: Path, bundled_backbone: ClipBackbone,
                                                                     tmp_path: Path) -> None:
    from scanner.engine.ci import class_score
    from scanner.errors import ConfigError
    from scanner.zoo.added_family import add_family_run

    def run(name: str, cfg: DetectorConfig) -> dict[str, Any]:
        evaluate_zoo(zoo, bundled_backbone, ["ci"], out=tmp_path / name, config=cfg, accel="torch")
        return dict(json.loads((tmp_path / name).read_text()))

    share = replace(SMALL, trigger_score="share")  # scores checked below as class_score of the gains
    saved = run("saved.json", replace(share, candidates=2))
    probe = run("probe.json", replace(share, families=("blend",)))
    whole = run("whole.json", replace(share, families=("additive", "patch", "blend")))
    joined = add_family_run(saved, probe)
    assert joined["config"]["families"] == ["additive", "patch", "blend"] and joined["config"]["candidates"] == 1
    assert len(joined["rows"]) == len(whole["rows"]) == 2
    for j, w in zip(joined["rows"], whole["rows"], strict=True):
        for k, (ej, ew) in enumerate(zip(j["evidence"], w["evidence"], strict=True)):
            assert ej["candidate"] == ew["candidate"]
            if not ej["candidate"]:
                assert j["class_scores"][k] == -1.0
                continue
            # the saved families' evidence is what one run of all the families records; the new one is added
            assert {key: ej[key] for key in ej if key.endswith(("_additive", "_patch"))} == \
                {key: ew[key] for key in ew if key.endswith(("_additive", "_patch"))}
            assert {"gain_blend", "asr_blend", "size_blend"} <= ej.keys()
            gains = [ej[f"gain_{f}"] for f in ("additive", "patch", "blend")]
            assert j["class_scores"][k] == pytest.approx(class_score(gains, SMALL.family_bonus))
    with pytest.raises(ConfigError, match="no family"):
        add_family_run(saved, saved)
    with pytest.raises(ConfigError, match="confirmed 2 classes"):
        add_family_run(probe, saved)
    with pytest.raises(ConfigError, match="other settings"):
        add_family_run(saved, {**probe, "config": {**probe["config"], "lr": 0.5}})
    with pytest.raises(ConfigError, match="another zoo"):
        add_family_run(saved, {**probe, "ood_sha256": "0" * 64})


def test_eval_refuses_an_unknown_trigger_family(zoo: Path) -> None:
    res = CliRunner().invoke(main, ["zoo", "eval", str(zoo), "--detectors", "ci", "--families", "sticker,hologram"])
    assert res.exit_code != 0 and "families must be" in res.output
    res = CliRunner().invoke(main, ["zoo", "eval", str(zoo), "--detectors", "ci", "--conditioned-families", "hologram"])
    assert res.exit_code != 0 and "conditioned_families must be" in res.output


def test_eval_picks_models_by_learner(zoo: Path) -> None:
    from scanner.errors import ConfigError
    from scanner.zoo.detect_eval import shard_models

    models = [{"id": f"m{i}", "learner": lr} for i, lr in enumerate(["coop-csc", "cocoop", "coop", "cocoop"])]
    assert [m["id"] for m in shard_models(models, None, {"cocoop"})] == ["m1", "m3"]
    assert [m["id"] for m in shard_models(models, (2, 2), {"cocoop", "coop"})] == ["m2"]  # m1, m2, m3 -> 2nd of 2
    with pytest.raises(ConfigError, match="no model of this zoo was tuned by"):
        shard_models(models, None, {"maple"})
    res = CliRunner().invoke(main, ["zoo", "eval", str(zoo), "--detectors", "ci", "--learners", "maple"])
    assert res.exit_code == 2 and "no model of this zoo was tuned by ['maple']" in res.output, res.output


def test_eval_picks_models_by_attack(zoo: Path) -> None:
    from scanner.errors import ConfigError
    from scanner.zoo.detect_eval import shard_models

    models = [{"id": f"m{i}", "learner": lr, "attack": a}
              for i, (lr, a) in enumerate([("coop-csc", "none"), ("cocoop", "none"), ("coop-csc", "wanet"),
                                           ("coop-csc", "badnets")])]
    assert [m["id"] for m in shard_models(models, None, None, {"none", "wanet"})] == ["m0", "m1", "m2"]
    assert [m["id"] for m in shard_models(models, None, {"coop-csc"}, {"none", "wanet"})] == ["m0", "m2"]
    with pytest.raises(ConfigError, match="no model of this zoo was of the attacks"):
        shard_models(models, None, None, {"trojan"})
    res = CliRunner().invoke(main, ["zoo", "eval", str(zoo), "--detectors", "ci", "--attacks", "trojan"])
    assert res.exit_code == 2 and "of the attacks ['trojan']; its attacks:" in res.output, res.output


def test_calibrate_keeps_the_settings_files_dormancy_line(zoo: Path, tmp_path: Path) -> None:
    toml = tmp_path / "scanner.toml"
    toml.write_text(f"[detector_options]\ndormant_lift = {DORMANT_LIFT_LINE}\n")
    args = ["calibrate", str(zoo), "--eval-json", str(tmp_path / "a.json"), "--config", str(toml), "--n-images",
            "48", "--fpr", "0.0"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["dormant_lift"] == DORMANT_LIFT_LINE  # rule D on, as the file set it
    assert tomllib.loads(toml.read_text())["detector_options"]["dormant_lift"] == DORMANT_LIFT_LINE  # kept
    toml.write_text('[detector_options]\ndormant_lift = "high"\n')
    bad = CliRunner().invoke(main, args)
    assert bad.exit_code == 2 and "dormant_lift must be a number" in bad.output
    toml.write_text("threshold = [\n")
    broken = CliRunner().invoke(main, args)
    assert broken.exit_code == 2 and "is not valid TOML" in broken.output
