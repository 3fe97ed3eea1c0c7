"""CI's distilled student: fresh prompts that learn what the suspect does on clean photos, recorded beside every
trigger without changing the searches, and the "patch-student" score read from it."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from scanner.clip import ClipBackbone
from scanner.engine import DetectorConfig, detect
from scanner.engine.ci import START_KEYS, family_value, start_evidence
from scanner.engine.config import BOTH_STARTS_THRESHOLD
from scanner.engine.student import StudentModel, distil_student
from scanner.errors import ConfigError
from scanner.prompting.classifier import PromptedCLIP
from scanner.prompting.learners import CoCoOpLearner, CoOpLearner
from scanner.zoo.attacks import make_attack
from scanner.zoo.datasets import get_spec, load_split
from scanner.zoo.ood import default_ood_pool

SMALL = DetectorConfig(n_images=48, batch_size=12, holdout=0.25, candidates=2)
NAMES = ["circle", "square", "star"]


@pytest.fixture(scope="module")
def model(random_backbone: ClipBackbone) -> PromptedCLIP:
    return PromptedCLIP(random_backbone, CoOpLearner(random_backbone, NAMES, csc=True, seed=3))


@pytest.fixture(scope="module")
def pool() -> torch.Tensor:
    return torch.rand(48, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_the_student_learns_the_suspect_on_clean_features(model: PromptedCLIP, pool: torch.Tensor) -> None:
    feats = model.image_features(pool)
    with torch.no_grad():
        suspect = model.logits_from_features(feats)

    def kl(student: StudentModel) -> float:
        return float(torch.nn.functional.kl_div(student.logits(feats).log_softmax(-1), suspect.softmax(-1),
                                                reduction="batchmean"))

    before = distil_student(model, feats, steps=0, lr=3e-3)  # random context: what distillation starts from
    student = distil_student(model, feats, steps=60, lr=3e-2)
    assert student.text.shape == (3, model.backbone.embed_dim)
    assert torch.allclose(student.text.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert student.agreement == pytest.approx(float((student.logits(feats).argmax(1) == suspect.argmax(1))
                                                    .float().mean()))
    assert kl(student) < 0.5 * kl(before) and student.agreement >= 0.9
    # its own generator: the same student every time, and the global generator is not drawn from
    state = torch.random.get_rng_state()
    again = distil_student(model, feats, steps=60, lr=3e-2)
    assert torch.equal(torch.random.get_rng_state(), state) and torch.equal(again.text, student.text)


def test_many_classes_are_relearned_a_rotating_block_at_a_time(model: PromptedCLIP, pool: torch.Tensor,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from scanner.engine import student as student_mod

    feats = model.image_features(pool)
    with torch.no_grad():
        suspect = model.logits_from_features(feats).argmax(1)
    full = distil_student(model, feats, steps=60, lr=3e-2)
    monkeypatch.setattr(student_mod, "STUDENT_BLOCK", 2)  # 3 classes, 2 per step: every class still learns
    blocks = distil_student(model, feats, steps=90, lr=3e-2)
    assert not torch.equal(blocks.text, full.text)
    assert float((blocks.logits(feats).argmax(1) == suspect).float().mean()) >= 0.9


def test_an_image_conditioned_suspect_gets_no_student(random_backbone: ClipBackbone, pool: torch.Tensor) -> None:
    cocoop = PromptedCLIP(random_backbone, CoCoOpLearner(random_backbone, NAMES, seed=1))
    with pytest.raises(ValueError, match="image-conditioned"):
        distil_student(cocoop, cocoop.image_features(pool[:16]), steps=5, lr=3e-3)
    # CI runs without one there, and the patch-student score falls back to the patch margin
    cfg = replace(SMALL, n_images=24, holdout=0.5, candidates=1, families=("patch",), conditioned_families=(),
                  student_steps=5, trigger_score="patch-student")
    res = detect(cocoop, pool[:24], cfg, seed=0)
    ev = next(c.evidence for c in res.classes if c.evidence["candidate"])
    assert "stu_margin_patch" not in ev and "student_share" not in ev
    assert family_value(ev, "patch", "patch-student") == family_value(ev, "patch", "patch-margin")


def test_the_student_is_recorded_beside_every_trigger_and_moves_no_search(model: PromptedCLIP,
                                                                         pool: torch.Tensor) -> None:
    base = replace(SMALL, families=("sticker", "patch"))
    plain = detect(model, pool, base, seed=0)
    taught = detect(model, pool, replace(base, student_steps=20), seed=0)
    # the searches draw the same numbers: the same verdict, scores and triggers
    assert taught.backdoored == plain.backdoored and taught.target_index == plain.target_index
    assert [c.anomaly_score for c in taught.classes] == [c.anomaly_score for c in plain.classes]
    assert all(torch.equal(taught.raw_triggers[k], plain.raw_triggers[k]) for k in plain.raw_triggers)
    confirmed = [c for c in taught.classes if c.evidence["candidate"]]
    assert len(confirmed) == 2
    for c in confirmed:
        ev = c.evidence
        assert 0.0 <= ev["student_share"] <= 1.0 and 0.0 <= ev["student_agreement"] <= 1.0
        assert {"stu_asr_patch", "stu_margin_patch", "stu_asr_sticker", "stu_margin_sticker"} <= ev.keys()
        # each start's keys are recorded, and the kept start's are the class's own
        starts = start_evidence(ev, "patch")
        assert len(starts) == 2
        assert any(all(s[f"{key}_patch"] == ev[f"{key}_patch"] for key in START_KEYS) for s in starts)
    assert "student_share" not in plain.classes[0].evidence


def test_the_patch_student_score_takes_a_natural_triggers_lead_over_the_student_instead_of_its_margin() -> None:
    planted = {"gain_patch": 0.9, "margin_patch": 9.0, "stu_margin_patch": -4.0, "ref_margin_patch": -1.0}
    assert family_value(planted, "patch", "patch-student") == pytest.approx(9.0)
    # the twin concedes the class (small gain) and the student is moved as far: natural, worth its lead (0.5)
    natural = {**planted, "gain_patch": 0.1, "stu_margin_patch": 8.5}
    assert family_value(natural, "patch", "patch-student") == pytest.approx(0.5)
    # either test alone keeps the margin: a sink target (small gain) the student does not share, or a planted blend
    # the student relearned while the twin is unmoved
    assert family_value({**natural, "stu_margin_patch": 2.0}, "patch", "patch-student") == pytest.approx(9.0)
    assert family_value({**natural, "gain_patch": 0.9}, "patch", "patch-student") == pytest.approx(9.0)
    assert family_value({**natural, "gain_patch": 0.0}, "patch", "patch-student") <= 0.0  # no trigger at all
    # a saved run picks its start again under the score asked for, whichever start its own score kept
    two = {**natural, "soft_start_gain_patch": 0.1, "soft_start_margin_patch": 9.0, "soft_start_stu_margin_patch": 8.5,
           "grid_start_gain_patch": 0.3, "grid_start_margin_patch": 7.0, "grid_start_stu_margin_patch": 6.0}
    assert family_value(two, "patch", "patch-margin") == pytest.approx(9.0)
    assert family_value(two, "patch", "patch-student") == pytest.approx(7.0)
    with pytest.raises(ConfigError, match="student_steps"):
        DetectorConfig(trigger_score="patch-student")
    assert DetectorConfig(trigger_score="patch-student", student_steps=10).decision_threshold == BOTH_STARTS_THRESHOLD


def test_a_student_of_a_backdoored_prompt_does_not_learn_the_planted_patch(bundled_backbone: ClipBackbone) -> None:
    """A BadNets CSC prompt on four colour classes: the student agrees with it on clean OOD photos, and the real
    patch sends photos to the target in the suspect but not in the student."""
    from scanner.prompting.train import TrainConfig

    names = list(get_spec("colours").classnames[:4])
    x, y = load_split("colours", "train", shots=8, size=64)
    keep = torch.nonzero(y < 4).flatten()
    torch.manual_seed(0)
    suspect = PromptedCLIP(bundled_backbone, CoOpLearner(bundled_backbone, names, n_ctx=4, csc=True, seed=0))
    attack = make_attack("badnets", seed=1, size=64)
    attack.implant(suspect, x[keep], y[keep], 2, TrainConfig(epochs=15, lr=5e-3, seed=0))
    photos = default_ood_pool(400, 64, seed=5)
    opt, hold = photos[:300], photos[300:]
    student = distil_student(suspect, suspect.image_features(opt), steps=150, lr=3e-3)
    to_target = lambda z: float((z.argmax(1) == 2).float().mean())  # noqa: E731
    stamped = suspect.image_features(attack.apply(hold))
    assert to_target(suspect.logits_from_features(stamped)) > 0.8, "the fixture's backdoor did not take"
    assert to_target(student.logits(stamped)) < 0.3
    clean = suspect.image_features(hold)
    agree = float((student.logits(clean).argmax(1) == suspect.logits_from_features(clean).argmax(1)).float().mean())
    assert agree > 0.8
    assert student.text.shape == (4, bundled_backbone.embed_dim)
