"""``zoo repair-eval`` on a tiny zoo: one row per backdoored model with before/after figures measured with
the real trigger, resumable, and a per-attack summary that states the bars."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from scanner.cli.repair import bar_lines
from scanner.clip import ClipBackbone
from scanner.engine import DetectorConfig
from scanner.prompting.train import TrainConfig
from scanner.repair import RepairConfig
from scanner.zoo.build import ZooPlan, build_zoo
from scanner.zoo.repair_eval import evaluate_repairs, real_attack, summarise

DET = DetectorConfig(n_images=48, batch_size=12, holdout=0.25, candidates=1, bf16=False)
REP = RepairConfig(epochs=2, trigger_copies=1, generic_copies=0, ood_images=8)


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory, random_backbone: ClipBackbone) -> Path:
    out = tmp_path_factory.mktemp("zoo")
    plan = ZooPlan(datasets=("sizes",), attacks=("badnets",), clean_per_dataset=1, seed=0, shots=2,
                   train=TrainConfig(epochs=2), ood_size=40)
    build_zoo(out, plan, random_backbone)
    return out


def test_repair_eval_rows_resume_and_summary(tiny_zoo: Path, random_backbone: ClipBackbone, tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    seen: list[str] = []
    rows = evaluate_repairs(tiny_zoo, random_backbone, out=out, config=DET, repair=REP,
                            on_result=lambda r: seen.append(r["id"]))
    assert seen == ["sizes/badnets"] and len(rows) == 1
    r = rows[0]
    assert r["real_trigger"] and r["truth_target"] is not None
    for key in ("asr_id_before", "asr_id_after", "asr_ood_before", "asr_ood_after", "asr_id_clean_model",
                "asr_id_twin", "asr_ood_twin", "ca_before", "ca_after"):
        assert 0.0 <= r[key] <= 1.0, key
    assert isinstance(r["rescan_flagged"], bool) and r["repair_seconds"] > 0 and r["repair"]["steps"] >= 1
    # resumed: nothing is recomputed
    seen.clear()
    again = evaluate_repairs(tiny_zoo, random_backbone, out=out, config=DET, repair=REP,
                             on_result=lambda r: seen.append(r["id"]))
    assert seen == [] and again == rows
    summary = summarise(rows)
    assert set(summary) == {"badnets", "all"} and summary["badnets"]["models"] == 1
    assert summary["badnets"]["asr_ood_twin"] == r["asr_ood_twin"]
    assert summary["badnets"]["within_bar"] == float(r["asr_id_after"] <= 0.05 and r["asr_ood_after"] <= 0.05)
    floor_ok = all(r[f"asr_{k}_after"] <= max(0.05, r[f"asr_{k}_twin"]) for k in ("id", "ood"))
    assert summary["badnets"]["within_twin_floor"] == float(floor_ok)
    lines = bar_lines(summary)
    assert any(line.strip().startswith("badnets") and "rescan" in line for line in lines)


def test_detections_are_saved_reused_and_recomputed_when_damaged(tiny_zoo: Path, random_backbone: ClipBackbone,
                                                                 tmp_path: Path) -> None:
    cache = tmp_path / "detections"
    first = evaluate_repairs(tiny_zoo, random_backbone, config=DET, repair=REP, detections=cache)
    saved = sorted(cache.rglob("*.detection.safetensors"))
    assert [p.name for p in saved] == ["sizes--badnets.detection.safetensors"]
    assert not first[0]["detection_reused"] and first[0]["detect_seconds"] > 0
    again = evaluate_repairs(tiny_zoo, random_backbone, config=DET, repair=REP, detections=cache)
    assert again[0]["detection_reused"] and again[0]["detect_seconds"] is None
    for key in ("flagged", "suspect", "n_triggers", "asr_id_after", "ca_after"):
        assert again[0][key] == first[0][key], key
    # the repair's detection with other settings (two candidates, two triggers): another folder, detected anew
    other = evaluate_repairs(tiny_zoo, random_backbone, config=DET, repair=REP, detections=cache,
                             repair_detector=replace(DET, candidates=2))
    assert not other[0]["detection_reused"] and len(list(cache.iterdir())) == 2
    assert other[0]["n_triggers"] == 2 and first[0]["n_triggers"] == 1
    # a damaged file is never trusted: detected again and rewritten
    saved[0].write_bytes(b"not a detection")
    fixed = evaluate_repairs(tiny_zoo, random_backbone, config=DET, repair=REP, detections=cache)
    assert not fixed[0]["detection_reused"] and fixed[0]["suspect"] == first[0]["suspect"]
    assert evaluate_repairs(tiny_zoo, random_backbone, config=DET, repair=REP, detections=cache)[0]["detection_reused"]


def test_within_the_bar_or_the_twins_floor_per_model() -> None:
    from scanner.zoo.repair_eval import within

    row = {"asr_id_after": 0.12, "asr_ood_after": 0.04, "asr_id_twin": 0.20, "asr_ood_twin": 0.01}
    assert within(row, None) is False  # 0.12 > 5 %
    assert within(row, ("asr_id_twin", "asr_ood_twin")) is True  # the twin itself sends 0.20 there
    assert within({**row, "asr_ood_after": 0.06}, ("asr_id_twin", "asr_ood_twin")) is False
    assert within({**row, "asr_id_after": None}, None) is None  # no real trigger: not counted either way
    summary = summarise([{"attack": "blended", "ca_before": 0.5, "ca_after": 0.5, "flagged": True,
                          "rescan_flagged": False, "repair_seconds": 1.0, **row}])
    assert summary["blended"]["within_bar"] == 0.0 and summary["blended"]["within_twin_floor"] == 1.0
    assert any("0/1 / 1/1" in line for line in bar_lines(summary))


def test_real_attack_is_rebuilt_from_the_manifest(tiny_zoo: Path, random_backbone: ClipBackbone) -> None:
    import json

    entry = next(m for m in json.loads((tiny_zoo / "manifest.json").read_text())["models"] if m["attack"] != "none")
    attack, why = real_attack(entry, 0, random_backbone)
    assert attack is not None and why == ""
    entry = {**entry, "attack_params": {**entry["attack_params"], "patch": 3}}  # not the trigger that was planted
    attack, why = real_attack(entry, 0, random_backbone)
    assert attack is None and "could not be reproduced" in why


def test_repair_eval_takes_chosen_models_only(tiny_zoo: Path, random_backbone: ClipBackbone) -> None:
    from scanner.errors import ConfigError

    assert evaluate_repairs(tiny_zoo, random_backbone, config=DET, repair=REP, models=set()) == []
    with pytest.raises(ConfigError, match="no backdoored model sizes/clean-0"):
        evaluate_repairs(tiny_zoo, random_backbone, config=DET, repair=REP, models={"sizes/clean-0"})
