"""The zoo builder: manifest with ground truth, both checkpoint formats, resumable, refuses foreign zoos."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from scanner.clip import ClipBackbone
from scanner.errors import ConfigError, DatasetError
from scanner.prompting.checkpoints import load_checkpoint
from scanner.prompting.train import TrainConfig
from scanner.zoo.build import ZooPlan, build_zoo, clean_accuracies, plan_jobs, summarise
from scanner.zoo.datasets import zoo_datasets


def _plan(**kw: object) -> ZooPlan:
    base = {"datasets": ("sizes",), "attacks": ("badnets", "blended"), "clean_per_dataset": 1, "seed": 0,
            "train": TrainConfig(epochs=1), "ood_size": 40}
    base.update(kw)
    return ZooPlan(**base)  # type: ignore[arg-type]


def test_build_writes_models_and_a_manifest_then_resumes(tmp_path: Path, random_backbone: ClipBackbone) -> None:
    before = {k: v.clone() for k, v in random_backbone.state_dict().items()}
    calls: list[bool] = []
    manifest = build_zoo(tmp_path, _plan(), random_backbone, on_model=lambda i, n, e: calls.append(e is not None))
    assert calls == [True, True, True]
    ids = [m["id"] for m in manifest["models"]]
    assert ids == ["sizes/clean-0", "sizes/badnets", "sizes/blended"]
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["models"] == manifest["models"]
    formats = {m["format"] for m in manifest["models"]}
    assert formats == {"dassl", "safetensors"}
    for m in manifest["models"]:
        assert (tmp_path / m["path"]).exists()
        assert 0.0 <= m["ca"] <= 1.0
        ck = load_checkpoint(tmp_path / m["path"], random_backbone)
        assert ck.learner.learner_type == m["learner"]
        if m["attack"] == "none":
            assert m["target_index"] is None and m["asr_id"] is None
        else:
            assert 0 <= m["target_index"] < 4 and m["target_name"] == ck.classnames[m["target_index"]]
            assert 0.0 <= m["asr_ood"] <= 1.0
    # the frozen encoders are bit-identical after three trainings
    after = random_backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # resuming builds nothing
    calls.clear()
    build_zoo(tmp_path, _plan(), random_backbone, on_model=lambda i, n, e: calls.append(e is not None))
    assert calls == [False, False, False]
    assert set(summarise(manifest)) == {"none", "badnets", "blended"}
    # clean CA by (dataset, learner), pooled over zoos; a folder without a manifest adds nothing
    clean = manifest["models"][0]
    assert clean_accuracies([tmp_path, tmp_path / "missing", tmp_path]) == {
        ("sizes", clean["learner"]): [clean["ca"], clean["ca"]]}


def test_a_model_missing_from_disk_is_rebuilt(tmp_path: Path, random_backbone: ClipBackbone) -> None:
    manifest = build_zoo(tmp_path, _plan(attacks=()), random_backbone)
    path = tmp_path / manifest["models"][0]["path"]
    import shutil

    shutil.rmtree(path)
    calls: list[bool] = []
    build_zoo(tmp_path, _plan(attacks=()), random_backbone, on_model=lambda i, n, e: calls.append(e is not None))
    assert calls == [True] and path.exists()


def test_a_folder_with_another_zoo_is_refused(tmp_path: Path, random_backbone: ClipBackbone) -> None:
    build_zoo(tmp_path, _plan(attacks=()), random_backbone)
    before = (tmp_path / "manifest.json").read_text()
    with pytest.raises(ConfigError, match="different zoo"):
        build_zoo(tmp_path, _plan(attacks=(), seed=1), random_backbone)
    assert (tmp_path / "manifest.json").read_text() == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="not empty"):
        build_zoo(other, _plan(attacks=()), random_backbone)


def test_the_demo_caches_a_zoo_per_backbone(tmp_path: Path, random_backbone: ClipBackbone) -> None:
    from scanner.demo import zoo_folder

    mine = random_backbone.content_hash()
    assert zoo_folder(tmp_path, mine) == tmp_path / "zoo"  # nothing cached yet
    build_zoo(tmp_path / "zoo", _plan(attacks=()), random_backbone)
    assert zoo_folder(tmp_path, mine) == tmp_path / "zoo"  # reused
    # new bundled weights: a folder of their own, the old zoo left as it is (the demo never deletes models)
    other = "f" * 64
    assert zoo_folder(tmp_path, other) == tmp_path / f"zoo-{other[:12]}"
    assert (tmp_path / "zoo" / "manifest.json").exists()


def test_the_demo_tallies_verdicts_against_the_manifest_and_apart_where_a_trigger_fails_on_photos() -> None:
    from scanner.demo import verdict_lines

    truth: dict[str, dict[str, Any]] = {"a--clean": {"attack": "none", "target_index": None, "asr_ood": None},
             "a--badnets": {"attack": "badnets", "target_index": 3, "asr_ood": 0.97},
             "a--blended": {"attack": "blended", "target_index": 1, "asr_ood": 0.91},
             "a--wanet": {"attack": "wanet", "target_index": 2, "asr_ood": 0.32}}

    def rep(name: str, verdict: str, target: int | None = None) -> dict[str, Any]:
        return {"path": f"/reg/{name}", "verdict": verdict, "target_index": target,
                "target_class": None if target is None else f"c{target}", "duration_s": 1.0}

    reports = [rep("a--clean", "clean"), rep("a--badnets", "backdoored", 3), rep("a--blended", "backdoored", 0),
               rep("a--wanet", "clean")]
    lines = verdict_lines(reports, truth)
    by_name = {ln.split()[0]: ln for ln in lines[:4]}
    assert by_name["a--badnets"].rstrip().endswith("ok  (1.0s)") and "ASR-OOD 0.97" in by_name["a--badnets"]
    assert "MISS" in by_name["a--blended"]  # flagged, but with the wrong class: not found
    assert "MISS" in by_name["a--wanet"] and "ASR-OOD 0.32" in by_name["a--wanet"]
    assert "ok" in by_name["a--clean"] and "ASR-OOD" not in by_name["a--clean"]
    assert lines[4] == "  2/4 verdicts match the ground truth"
    assert lines[5].startswith("  2/3 among the clean models and the backdoors whose trigger works on OOD photos")
    # every backdoor working on photos: no second tally
    assert len(verdict_lines(reports[:3], truth)) == 4


def test_plans_are_validated_and_targets_fixed_by_the_seed() -> None:
    with pytest.raises(DatasetError, match="unknown dataset"):
        ZooPlan.make(["nope"], None, None, 0, quick=True)
    with pytest.raises(ConfigError, match="unknown attack"):
        ZooPlan.make(["shapes"], ["nope"], None, 0, quick=True)
    quick = ZooPlan.make(None, None, None, 0, quick=True)
    jobs = plan_jobs(quick)
    assert len(jobs) == 10 and sum(j.attack == "none" for j in jobs) == 2
    assert [j.target_index for j in plan_jobs(quick)] == [j.target_index for j in jobs]
    full = plan_jobs(ZooPlan.make(None, None, None, 0, quick=False))
    assert len(full) >= 60 and sum(j.attack == "none" for j in full) >= 20
    # CoCoOp is never planned on the 120-class dataset (too slow on 2 cores)
    assert not any(j.dataset == "colour_shape" and j.learner == "cocoop" for j in full)
    # the default zoo is the unshifted datasets: the shifted suite measures adaptation, not backdoors
    assert {j.dataset for j in full} == set(zoo_datasets()) and not any(j.dataset.startswith("blurry_") for j in full)
