"""The detection engine: reproducible, and loud (DetectionError) rather than silently clean on bad input."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest
import torch

from scanner.clip import ClipBackbone
from scanner.engine import DetectorConfig, detect
from scanner.engine.calibration import threshold_for_fpr
from scanner.engine.ci import _BestTriggers, _decide_ci, _gains_text, family_value, restart_key
from scanner.engine.result import DetectionResult
from scanner.engine.scoring import anomaly_index
from scanner.errors import ConfigError, DetectionError
from scanner.prompting.classifier import PromptedCLIP
from scanner.prompting.learners import CoOpLearner

SMALL = DetectorConfig(n_images=48, batch_size=12, holdout=0.25, candidates=2)


@pytest.fixture(scope="module")
def model(random_backbone: ClipBackbone) -> PromptedCLIP:
    return PromptedCLIP(random_backbone, CoOpLearner(random_backbone, ["circle", "square", "star"], csc=True))


@pytest.fixture(scope="module")
def pool() -> torch.Tensor:
    return torch.rand(48, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("detector", ["ci", "ci-plain", "nc", "pixel"])
def test_same_seed_same_verdict_and_scores(model: PromptedCLIP, pool: torch.Tensor, detector: str) -> None:
    cfg = DetectorConfig(**{**SMALL.__dict__, "detector": detector})
    a = detect(model, pool, cfg, seed=5)
    b = detect(model, pool, cfg, seed=5)
    assert a.backdoored == b.backdoored and a.target_index == b.target_index
    assert [c.anomaly_score for c in a.classes] == [c.anomaly_score for c in b.classes]
    assert len(a.classes) == 3 and a.detector == detector
    assert a.ood_sha256 and a.backbone_sha256 == model.backbone.content_hash()
    assert all(t.shape == (3, 64, 64) for t in a.trigger_images.values())
    if detector == "ci":  # clean-image shares of the suspect and of plain zero-shot prompts, per class
        for key in ("natural_share", "zero_shot_share"):
            shares = [c.evidence[key] for c in a.classes]
            assert all(0.0 <= v <= 1.0 for v in shares) and abs(sum(shares) - 1.0) < 1e-5


def test_the_model_is_left_as_it_was(model: PromptedCLIP, pool: torch.Tensor) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.learner.parameters()]
    detect(model, pool, SMALL, seed=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert flags == [p.requires_grad for p in model.learner.parameters()]


def test_bad_pools_are_errors_not_clean(model: PromptedCLIP, pool: torch.Tensor) -> None:
    with pytest.raises(DetectionError, match="at least"):
        detect(model, pool[:10], SMALL)
    with pytest.raises(DetectionError, match="32x32 images but the backbone takes 64x64"):
        detect(model, torch.rand(48, 3, 32, 32), SMALL)
    with pytest.raises(DetectionError, match="RGB images"):
        detect(model, torch.rand(48, 64, 64), SMALL)
    with pytest.raises(DetectionError, match="finite pixel values"):
        detect(model, pool * 2, SMALL)


def test_one_class_model_and_nan_weights_are_errors(random_backbone: ClipBackbone, pool: torch.Tensor) -> None:
    one = PromptedCLIP(random_backbone, CoOpLearner(random_backbone, ["circle"]))
    with pytest.raises(DetectionError, match="1 class"):
        detect(one, pool, SMALL)
    broken = PromptedCLIP(random_backbone, CoOpLearner(random_backbone, ["circle", "square"]))
    with torch.no_grad():
        broken.learner.ctx.fill_(float("nan"))
    with pytest.raises(DetectionError, match="non-finite"):
        detect(broken, pool, SMALL)


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="unknown detector"):
        DetectorConfig(detector="magic")
    with pytest.raises(ConfigError, match="families"):
        DetectorConfig(families=("hologram",))
    with pytest.raises(ConfigError, match="dormant_margin"):
        DetectorConfig(dormant_margin=0.0)
    with pytest.raises(ConfigError, match="family_bonus"):
        DetectorConfig(family_bonus=1.5)
    with pytest.raises(ConfigError, match="trigger_score must be one of share, margin"):
        DetectorConfig(trigger_score="auroc")


def test_each_score_has_its_own_default_threshold() -> None:
    from scanner.engine.config import BOTH_STARTS_THRESHOLD, DEFAULT_THRESHOLDS, MARGIN_THRESHOLD
    from scanner.engine.config import PATCH_MARGIN_THRESHOLD as PM

    # the default: the patch margin, its patch searched from both starts (session 25)
    assert DetectorConfig().decision_threshold == BOTH_STARTS_THRESHOLD
    assert DetectorConfig(trigger_score="share").decision_threshold == DEFAULT_THRESHOLDS["ci"]
    assert DetectorConfig(trigger_score="margin").decision_threshold == MARGIN_THRESHOLD  # logit units, not shares
    assert DetectorConfig(trigger_score="margin", threshold=3.0).decision_threshold == 3.0  # a fitted line wins
    assert DetectorConfig(trigger_score="patch-margin", patch_start="soft").decision_threshold == PM
    from scanner.engine.config import PATCH_TWIN_THRESHOLD

    assert DetectorConfig(trigger_score="patch-twin").decision_threshold == PATCH_TWIN_THRESHOLD != PM
    # the patch search from both starts scores higher than from one: its line was fitted on runs of both
    assert DetectorConfig(patch_start="both").decision_threshold == BOTH_STARTS_THRESHOLD > PM
    assert DetectorConfig(patch_start="grid").decision_threshold == PM
    assert DetectorConfig(patch_start="both", threshold=4.0).decision_threshold == 4.0


def test_a_confirmed_class_keeps_its_trigger_whatever_its_score() -> None:
    from scanner.engine.ci import _BestTriggers
    from scanner.engine.triggers import PatchTrigger

    best = _BestTriggers(torch.full((2,), -1.0))  # -1 marks "not confirmed", not a floor
    first, better = (PatchTrigger(16, torch.Generator().manual_seed(s)) for s in (0, 1))
    best.offer(0, -3.5, first)  # a median margin below -1: the trigger is still the class's evidence
    assert 0 in best.raw and float(best.score[0]) == -3.5
    best.offer(0, -4.0, better)
    assert torch.equal(best.raw[0], first.raw().cpu())  # a worse one does not replace it
    best.offer(0, 2.0, better)
    assert torch.equal(best.raw[0], better.raw().cpu()) and 1 not in best.raw


def test_a_clean_verdicts_reason_names_the_confirmed_candidate_not_an_unconfirmed_class(model: PromptedCLIP) -> None:
    cfg = DetectorConfig(trigger_score="patch-margin")
    best = _BestTriggers(torch.tensor([-1.0, -3.5, -1.0]))  # class 1 confirmed with a median margin of -3.5
    evidence: dict[int, dict[str, float]] = {k: {"candidate": float(k == 1)} for k in range(3)}
    res = _decide_ci(model, cfg, best, torch.full((3,), 1 / 3), evidence, 0, 0.0, torch.zeros(3), torch.zeros(3))
    assert not res.backdoored
    assert "best score is -3.500, for 'square'" in res.reason  # not class 0's "not confirmed" -1
    # the rule itself: an unconfirmed class's -1 never passes a line for a trigger that was not searched
    from scanner.engine.ci import ci_verdict, confirmed_mask

    v = ci_verdict(best.score, torch.zeros(3), None, -2.0, 0.9, confirmed_mask(evidence))
    assert not v.flagged and v.trigger_class == 1
    assert ci_verdict(best.score, torch.zeros(3), None, -2.0, 0.9).flagged  # without the mask it would flag


def test_the_patch_margin_score_reads_the_patch_family_when_it_was_searched() -> None:
    from scanner.engine.ci import family_value, scoring_families

    assert scoring_families(("sticker", "patch"), "patch-margin") == ["patch"]
    assert scoring_families(("sticker",), "patch-margin") == ["sticker"]  # no patch: the best family's margin
    assert scoring_families(("sticker", "patch"), "share") == ["sticker", "patch"]
    # a patch that moves no image into the class scores at most 0, however far the class wins clean photos
    assert family_value({"margin_patch": 6.3, "gain_patch": -0.18}, "patch", "patch-margin") == 0.0
    assert family_value({"margin_patch": -2.0, "gain_patch": 0.0}, "patch", "patch-margin") == -2.0
    assert family_value({"margin_patch": 6.3, "gain_patch": 0.4}, "patch", "patch-margin") == 6.3
    # "patch-twin": less the twin's margin under the same trigger (weighed), gated by the gain alike
    ev = {"margin_patch": 6.3, "ref_margin_patch": 2.0, "gain_patch": 0.4}
    assert family_value(ev, "patch", "patch-twin", 1.0) == pytest.approx(4.3)
    assert family_value(ev, "patch", "patch-twin", 0.5) == pytest.approx(5.3)
    assert family_value({**ev, "ref_margin_patch": -3.0}, "patch", "patch-twin", 1.0) == pytest.approx(9.3)
    assert family_value({**ev, "gain_patch": -0.1}, "patch", "patch-twin", 1.0) == 0.0
    assert family_value(ev, "patch", "patch-twin", 0.0) == family_value(ev, "patch", "patch-margin")
    assert scoring_families(("sticker", "patch"), "patch-twin") == ["patch"]


def _decision(model: PromptedCLIP, scores: list[float], excess: list[float], drift: list[float] | None = None,
              **cfg: Any) -> DetectionResult:
    best = _BestTriggers(torch.tensor(scores))
    natural = torch.full((3,), 1 / 3)
    evidence: dict[int, dict[str, float]] = {k: {} for k in range(3)}
    cfg = {"trigger_score": "share", **cfg}  # scores in share units unless a test says otherwise
    return _decide_ci(model, DetectorConfig(**cfg), best, natural, evidence, 0, 0.0, torch.tensor(excess),
                      torch.tensor(drift or [0.0, 0.0, 0.0]))


def test_a_prompt_awake_on_clean_images_is_flagged_even_without_a_trigger(model: PromptedCLIP) -> None:
    flat = [0.1, 0.1, 0.1]  # no reconstructed trigger works
    awake = _decision(model, flat, [-0.3, 0.9, -0.6])
    assert awake.backdoored and awake.target_index == 1 and "not dormant" in awake.reason
    assert not _decision(model, flat, [-0.3, 0.7, -0.4]).backdoored  # within the margin
    assert not _decision(model, flat, [-0.3, 0.9, -0.6], dormant_margin=1.0).backdoored  # switched off
    # an anomalously drifted class's excess is weighed up past 1 (0.7 / DRIFTED_BAR); margin 1 still means off
    one_drifted = [0.0, 5.0, 0.0]
    assert _decision(model, flat, [-0.3, 0.7, -0.4], one_drifted, dormant_margin=0.99).backdoored
    assert not _decision(model, flat, [-0.3, 0.7, -0.4], one_drifted, dormant_margin=1.0).backdoored
    # a working trigger names its own class first
    both = _decision(model, [0.05, 0.06, 1.2], [-0.3, 0.9, -0.6])
    assert both.backdoored and both.target_index == 2 and "reconstructed trigger" in both.reason
    assert "no reconstructed trigger works" in _decision(model, flat, [0.0, 0.0, 0.0]).reason
    # the trigger channel is a gain threshold: just over it flags, just under it does not
    assert _decision(model, [-1.0, 0.61, -1.0], [0.0, 0.0, 0.0], threshold=0.6).backdoored
    assert not _decision(model, [-1.0, 0.59, -1.0], [0.0, 0.0, 0.0], threshold=0.6).backdoored
    # the most drifted prompt is held to a lower bar (DRIFTED_BAR x the margin), only when its drift is anomalous
    half = [-0.3, 0.1, 0.55]
    assert not _decision(model, flat, half, [0.0, 1.0, 1.5]).backdoored  # drift anomaly below k
    drifted = _decision(model, flat, half, [0.0, 1.0, 9.0])
    assert drifted.backdoored and drifted.target_index == 2 and "drifted" in drifted.reason
    assert not _decision(model, flat, half, [9.0, 1.0, 0.0]).backdoored  # another class drifted


def test_trigger_gain_measures_each_model_from_its_own_start() -> None:
    from scanner.engine.ci import trigger_gain

    # a planted trigger on a class plain prompts already make the OOD sink: the suspect's prompt pushed the class
    # away from clean photos (0.02) and the trigger brings them back (0.99); the twin barely moves (0.81 -> 0.85)
    assert trigger_gain(0.99, 0.85, 0.02, 0.81) == pytest.approx(0.93)
    # a trigger that draws class evidence moves both models alike: no gain
    assert trigger_gain(0.9, 0.8, 0.1, 0.0) == pytest.approx(0.0)
    # the twin moving *away* from the class is not counted in the suspect's favour
    assert trigger_gain(0.7, 0.1, 0.1, 0.3) == pytest.approx(0.6)


def test_a_class_answering_to_both_trigger_families_scores_higher() -> None:
    from scanner.engine.ci import class_score

    # a planted patch trigger: the sticker and the soft patch both move most held-out images into the class
    assert class_score([0.8, 0.6], 0.5) == pytest.approx(1.1)
    # a clean class's natural trigger answers to one family: its score is that family's gain
    assert class_score([-0.01, 0.97], 0.5) == pytest.approx(0.97)
    assert class_score([0.8, 0.6], 0.0) == pytest.approx(0.8)  # no bonus: the best family alone
    assert class_score([0.4], 0.5) == pytest.approx(0.4)  # one family searched
    assert class_score([0.3, 0.2, 0.9], 1.0) == pytest.approx(1.2)  # only the next best counts
    with pytest.raises(ValueError, match="at least one"):
        class_score([], 0.5)


def test_each_confirmed_class_is_scored_from_its_families_gains(model: PromptedCLIP, pool: torch.Tensor) -> None:
    from scanner.engine.ci import class_score

    for bonus in (0.0, 0.5):
        cfg = DetectorConfig(**{**SMALL.__dict__, "family_bonus": bonus, "trigger_score": "share"})
        res = detect(model, pool, cfg, seed=0)
        confirmed = [c for c in res.classes if c.evidence["candidate"]]
        assert len(confirmed) == cfg.candidates
        for c in confirmed:
            gains = [c.evidence[f"gain_{f}"] for f in cfg.families]
            assert c.anomaly_score == pytest.approx(class_score(gains, bonus))
        assert res.anomaly_score == max(c.anomaly_score for c in res.classes)


def test_saved_rows_are_redecided_by_the_engine_rule(model: PromptedCLIP) -> None:
    from scanner.zoo.detect_eval import redecide

    cases = [([0.1, 0.1, 0.1], [-0.3, 0.9, -0.6], [0.0, 0.0, 0.0]),
             ([-1.0, 0.95, -1.0], [0.0, 0.0, 0.0], [0.0, 5.0, 0.0]),
             ([-1.0, 0.65, -1.0], [0.0, 0.0, 0.0], [0.0, 5.0, 0.0]),
             ([0.1, 0.1, 0.1], [-0.3, 0.1, 0.55], [0.0, 1.0, 9.0]),
             ([0.1, 0.1, 0.1], [-0.3, 0.1, 0.55], [9.0, 1.0, 0.0])]
    for gains, excess, drift in cases:
        res = _decision(model, gains, excess, drift)
        ev = [{"natural_share": max(0.0, e), "zero_shot_share": max(0.0, -e), "drift_anomaly": d}
              for e, d in zip(excess, drift, strict=True)]
        row = {"detector": "ci", "class_scores": gains, "evidence": ev}
        cfg = DetectorConfig()
        assert redecide(row, cfg.decision_threshold, cfg.dormant_margin) == (res.backdoored, res.target_index)


def test_the_logit_dormancy_check_flags_the_most_drifted_prompt_believed_beyond_the_twin(model: PromptedCLIP) -> None:
    from scanner.engine.ci import MarginDormancy, ci_verdict

    flat = torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64)  # no trigger works; nothing awake by share
    calm = torch.zeros(3)
    drift = torch.tensor([0.5, 6.0, 1.0])  # class 1's prompt drifted most
    lift = torch.tensor([3.0, -0.5, 2.0], dtype=torch.float64)  # class 0 lifts more, but only the drifted one counts
    v = ci_verdict(flat, calm, drift, 0.6, 0.89, None, MarginDormancy(lift, drift, -0.875))
    assert (v.flagged, v.target, v.channel) == (True, 1, "believed")
    assert not ci_verdict(flat, calm, drift, 0.6, 0.89, None, MarginDormancy(lift, drift, -0.5)).flagged  # at it
    assert not ci_verdict(flat, calm, drift, 0.6, 0.89).flagged  # off
    # the trigger channel comes first, and keeps its own target
    strong = torch.tensor([0.9, -1.0, -1.0], dtype=torch.float64)
    v = ci_verdict(strong, calm, drift, 0.6, 0.89, None, MarginDormancy(lift, drift, -0.875))
    assert (v.target, v.channel) == (0, "trigger")
    # the engine's decision says why, in the margins it read
    evidence: dict[int, dict[str, float]] = {k: {"natural_margin": float(lift[k]) - 2.0, "twin_margin": -2.0}
                                             for k in range(3)}
    res = _decide_ci(model, DetectorConfig(trigger_score="share", dormant_lift=-0.875), _BestTriggers(flat.clone()),
                     torch.full((3,), 1 / 3), evidence, 0, 0.0, calm, drift, MarginDormancy(lift, drift, -0.875))
    assert res.backdoored and res.target_index == 1
    assert "'square'" in res.reason and "median margin -2.50" in res.reason and "lift -0.50 > -0.875" in res.reason


def test_the_engine_reads_the_logit_dormancy_line_and_saved_rows_re_decide_it(model: PromptedCLIP,
                                                                              pool: torch.Tensor) -> None:
    from scanner.zoo.detect_eval import margin_dormancy, redecide

    assert DetectorConfig().dormant_lift is None  # rule D failed its second registered test (session 27)
    base = DetectorConfig(**{**SMALL.__dict__, "candidates": 1, "families": ("patch",), "dormant_lift": None})
    off = detect(model, pool, base, seed=0)
    assert not off.backdoored  # random weights: no trigger works, nothing awake by share
    ev = [c.evidence for c in off.classes]
    top = max(range(3), key=lambda k: ev[k]["drift_anomaly"])
    lift = ev[top]["natural_margin"] - ev[top]["twin_margin"]
    for line in (lift - 1.0, lift + 1.0):  # a line under the most drifted prompt's lift flags it, one over does not
        res = detect(model, pool, replace(base, dormant_lift=line), seed=0)
        assert [c.evidence for c in res.classes] == ev  # the line decides; it searches nothing
        assert res.backdoored == (line < lift)
        if line < lift:
            assert res.target_index == top and "lift" in res.reason
        row = {"detector": "ci", "class_scores": [c.anomaly_score for c in res.classes], "evidence": ev}
        assert redecide(row, base.decision_threshold, base.dormant_margin, line) == (res.backdoored,
                                                                                    res.target_index)
    assert not detect(model, pool, replace(base, dormant_lift=math.inf), seed=0).backdoored  # inf: off
    # image-conditioned learners are ranked by reach, not drift: the check is not theirs
    assert margin_dormancy({"evidence": [{**e, "reach_anomaly": 0.0} for e in ev]}, -100.0) is None
    assert margin_dormancy({"evidence": [{"drift_anomaly": 1.0}]}, -100.0) is None  # rows from before the margins


def test_bf16_is_used_where_the_cpu_computes_it_natively(model: PromptedCLIP, pool: torch.Tensor,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    from scanner.engine import invert
    from scanner.engine.invert import native_bf16

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else None
    if flags is not None:  # torch's probe and the kernel's flags agree
        assert native_bf16("cpu") == ("avx512_bf16" in flags or "amx_bf16" in flags)
    assert DetectorConfig().bf16 is None and DetectorConfig().on("cpu").bf16 is native_bf16("cpu")
    assert DetectorConfig(bf16=True).on("cpu").bf16 is True and DetectorConfig(bf16=False).on("cpu").bf16 is False
    # detect resolves the setting when it starts: a CPU said to lack bf16 runs every encoder pass in fp32
    seen: list[bool] = []
    real = invert.autocast

    def spy(enabled: bool, device: torch.device | str = "cpu") -> Any:
        seen.append(bool(enabled))
        return real(enabled, device)

    monkeypatch.setattr(invert, "native_bf16", lambda device="cpu": False)
    monkeypatch.setattr(invert, "autocast", spy)
    cfg = DetectorConfig(**{**SMALL.__dict__, "bf16": None, "candidates": 1, "families": ("patch",)})
    detect(model, pool, cfg, seed=0)
    assert seen and not any(seen)
    seen.clear()
    monkeypatch.setattr(invert, "native_bf16", lambda device="cpu": True)
    detect(model, pool, cfg, seed=0)
    assert seen and all(seen)


def test_anomaly_index_and_calibration() -> None:
    a = anomaly_index(torch.tensor([0.1, 0.12, 0.11, 0.9]))
    assert int(a.argmax()) == 3 and float(a[3]) > 10
    low = anomaly_index(torch.tensor([50.0, 48.0, 52.0, 5.0]), high_is_suspicious=False)
    assert int(low.argmax()) == 3
    flat = anomaly_index(torch.tensor([0.5, 0.5, 0.5, 0.51]), floor=0.05)
    assert float(flat.max()) < 1
    assert threshold_for_fpr([0.5, 1.0, 1.5, 2.0], 0.0) == 2.0
    assert threshold_for_fpr([0.5, 1.0, 1.5, 2.0], 0.25) == 1.5
    assert threshold_for_fpr([0.5, 1.0], 0.0, minimum=2.0) == 2.0


def test_shifted_trigger_translates_the_triggered_image() -> None:
    from scanner.engine.triggers import AdditiveTrigger, ShiftedTrigger

    gen = torch.Generator().manual_seed(0)
    inner = AdditiveTrigger(16, 0.1, gen)
    shifted = ShiftedTrigger(inner, 3, torch.Generator().manual_seed(1))
    x = torch.rand(2, 3, 16, 16, generator=gen)
    out = shifted(x)
    base = inner(x)
    matches = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)
               if torch.equal(out, torch.roll(base, shifts=(dy, dx), dims=(-2, -1)))]
    assert matches, "the output is not a translation of the inner trigger's output"
    assert shifted.image().shape == (3, 16, 16) and shifted.family == "additive"


def test_class_drift_names_the_one_prompt_pulled_away_from_plain_prompts() -> None:
    from scanner.engine.drift import class_drift

    gen = torch.Generator().manual_seed(0)
    plain = torch.nn.functional.normalize(torch.randn(3, 6, 32, generator=gen), dim=-1)  # (T, C, E)
    mean = plain.mean(dim=0)
    assert torch.allclose(class_drift(mean, plain), torch.zeros(6), atol=1e-6)  # plain prompts do not drift
    shared = 0.05 * torch.nn.functional.normalize(torch.randn(32, generator=gen), dim=0)
    unit = torch.nn.functional.normalize(mean, dim=-1)
    assert float(class_drift(unit + shared, plain).max()) < 0.025  # a shift all classes share (norm 0.05) is removed
    # every prompt tuned a little, one pulled towards a trigger direction
    tuned = torch.nn.functional.normalize(mean, dim=-1) + 0.05 * torch.randn(6, 32, generator=gen)
    tuned[4] += 0.6 * torch.nn.functional.normalize(torch.randn(32, generator=gen), dim=0)
    drift = class_drift(tuned, plain)
    assert int(drift.argmax()) == 4 and float(anomaly_index(drift)[4]) > 3


def test_prompt_drift_reads_every_learner(random_backbone: ClipBackbone) -> None:
    from scanner.engine.drift import prompt_drift
    from scanner.engine.invert import ReferenceModel
    from scanner.prompting.learners import CoCoOpLearner

    names = ["circle", "square", "star"]
    feats = torch.randn(20, random_backbone.embed_dim, generator=torch.Generator().manual_seed(0))
    for learner in (CoOpLearner(random_backbone, names, csc=True), CoCoOpLearner(random_backbone, names)):
        model = PromptedCLIP(random_backbone, learner)
        drift = prompt_drift(model, ReferenceModel(model).text, feats)
        assert drift.shape == (3,) and bool(torch.isfinite(drift).all())
        assert torch.equal(drift, prompt_drift(model, ReferenceModel(model).text, feats))  # deterministic


def test_margins_say_how_decisively_each_class_wins() -> None:
    from scanner.engine.margins import class_margins, margin_quantiles

    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 2.5], [1.0, 1.0, -1.0]])  # (N=3, C=3)
    m = class_margins(logits)
    assert m.tolist() == [[2.0, -2.0, -3.0], [-2.5, -0.5, 0.5], [0.0, 0.0, -2.0]]  # a tie wins by nothing
    assert (m.argmax(dim=1) == logits.argmax(dim=1)).all() or m[2, 0] == m[2, 1]
    q = margin_quantiles(m)  # (2, C): 10th percentile, median
    assert q.shape == (2, 3) and q[1].tolist() == [0.0, -0.5, -2.0]
    with pytest.raises(ValueError, match="two classes"):
        class_margins(torch.zeros(4, 1))


def test_confirmed_triggers_record_their_margins(model: PromptedCLIP, pool: torch.Tensor) -> None:
    res = detect(model, pool, SMALL, seed=0)  # every family searched (the default)
    for c in res.classes:  # every class: how its prompt and the twin's win the clean hold-out
        assert {"natural_margin", "natural_margin10", "twin_margin"} <= set(c.evidence)
        assert c.evidence["natural_margin10"] <= c.evidence["natural_margin"]
        if c.evidence["candidate"]:
            for fam in SMALL.families:
                ev = c.evidence
                assert ev[f"margin10_{fam}"] <= ev[f"margin_{fam}"] and "ref_margin_" + fam in ev
                # a median margin above 0 means the trigger wins more than half of the held-out images
                assert (ev[f"margin_{fam}"] > 0) == (ev[f"asr_{fam}"] > 0.5) or ev[f"asr_{fam}"] == 0.5


def test_the_margin_score_scores_confirmed_classes_by_their_margin_lifts(model: PromptedCLIP,
                                                                         pool: torch.Tensor) -> None:
    from scanner.engine.ci import class_score

    share = detect(model, pool, DetectorConfig(**{**SMALL.__dict__, "trigger_score": "share"}), seed=0)
    margin = detect(model, pool, DetectorConfig(**{**SMALL.__dict__, "trigger_score": "margin"}), seed=0)
    for s, m in zip(share.classes, margin.classes, strict=True):
        assert s.evidence["candidate"] == m.evidence["candidate"]  # the same classes are confirmed
        if not m.evidence["candidate"]:
            assert m.anomaly_score == -1.0
            continue
        ev = m.evidence  # lift of the median margin in the suspect beyond the twin's (when positive)
        lifts = [(ev[f"margin_{f}"] - ev["natural_margin"]) - max(0.0, ev[f"ref_margin_{f}"] - ev["twin_margin"])
                 for f in SMALL.families]
        assert m.anomaly_score == pytest.approx(class_score(lifts, SMALL.family_bonus))
        gains = [s.evidence[f"gain_{f}"] for f in SMALL.families]
        assert s.anomaly_score == pytest.approx(class_score(gains, SMALL.family_bonus))
    assert margin.threshold == DetectorConfig(trigger_score="margin").decision_threshold
    confirmed = next(c for c in margin.classes if c.evidence["candidate"])
    assert "margin lift" in _gains_text(confirmed.evidence, "margin")
    assert "margin lift" not in _gains_text(confirmed.evidence, "share")


def test_the_patch_margin_score_is_the_patch_triggers_median_margin(model: PromptedCLIP, pool: torch.Tensor) -> None:
    from scanner.zoo.detect_eval import rescore_ci

    # every family searched (the default), so the patch draws the same random numbers as under "share"
    cfg = DetectorConfig(**{**SMALL.__dict__, "trigger_score": "patch-margin"})
    share = detect(model, pool, DetectorConfig(**{**SMALL.__dict__, "trigger_score": "share"}), seed=0)
    res = detect(model, pool, cfg, seed=0)
    confirmed = [k for k, c in enumerate(res.classes) if c.evidence["candidate"]]
    assert confirmed == [k for k, c in enumerate(share.classes) if c.evidence["candidate"]]
    for k in confirmed:
        ev = res.classes[k].evidence
        expected = ev["margin_patch"] if ev["gain_patch"] > 0 else min(ev["margin_patch"], 0.0)
        assert res.classes[k].anomaly_score == pytest.approx(expected)  # the patch family alone
        assert ev["margin_patch"] == pytest.approx(share.classes[k].evidence["margin_patch"])  # same search
        assert "median margin" in _gains_text(ev, "patch-margin")
    assert res.threshold == cfg.decision_threshold
    # saved share rows re-scored by the patch margin give what a patch-margin run scores
    row = {"detector": "ci", "id": "m", "class_scores": [c.anomaly_score for c in share.classes],
           "evidence": [c.evidence for c in share.classes]}
    again = rescore_ci(row, SMALL.family_bonus, "patch-margin")
    assert DetectorConfig().trigger_score == "patch-margin"  # the default since session 18
    for k in confirmed:
        assert again["class_scores"][k] == pytest.approx(res.classes[k].anomaly_score)
    # and by "patch-twin", what a patch-twin run scores (the same searches: only the score differs)
    twin = detect(model, pool, replace(cfg, trigger_score="patch-twin"), seed=0)
    rescored = rescore_ci(row, SMALL.family_bonus, "patch-twin")
    for k in confirmed:
        ev = twin.classes[k].evidence
        assert ev["margin_patch"] == pytest.approx(res.classes[k].evidence["margin_patch"])
        assert twin.classes[k].anomaly_score == pytest.approx(family_value(ev, "patch", "patch-twin"))
        assert rescored["class_scores"][k] == pytest.approx(twin.classes[k].anomaly_score)
        assert "twin's" in _gains_text(ev, "patch-twin")
    assert rescore_ci(row, SMALL.family_bonus, "patch-twin", 0.0)["class_scores"] == again["class_scores"]


def test_ci_can_search_only_the_families_its_score_reads(model: PromptedCLIP, pool: torch.Tensor) -> None:
    from scanner.engine.ci import confirmed_families

    # by default every configured family is searched: the shipped line was fitted on the patch's draws after the
    # sticker's, though the patch-margin score reads the patch alone
    assert SMALL.trigger_score == "patch-margin" and SMALL.families == ("sticker", "patch")
    assert SMALL.search_families(False) == SMALL.families and SMALL.search_families(True) == (*SMALL.families,
                                                                                              "additive")
    only = replace(SMALL, search_all_families=False)
    assert only.search_families(False) == only.search_families(True) == ("patch",)
    assert replace(only, trigger_score="share").search_families(False) == SMALL.families  # share reads them all
    assert replace(only, families=("sticker",)).search_families(False) == ("sticker",)  # no patch: as configured
    res = detect(model, pool, only, seed=0)
    confirmed = [c for c in res.classes if c.evidence["candidate"]]
    assert len(confirmed) == SMALL.candidates
    for c in res.classes:
        ev = c.evidence
        if not ev["candidate"]:
            assert c.anomaly_score == -1.0 and confirmed_families(ev) == []
            continue
        assert confirmed_families(ev) == ["patch"]
        expected = ev["margin_patch"] if ev["gain_patch"] > 0 else min(ev["margin_patch"], 0.0)
        assert c.anomaly_score == pytest.approx(expected)
        assert c.index in res.trigger_images and c.index in res.raw_triggers  # the patch is what repair gets
    assert "sticker" not in res.reason
    # the patch searched first draws what it draws alone: only the random stream tells the two searches apart
    first = detect(model, pool, replace(SMALL, families=("patch", "sticker"), candidates=1), seed=0)
    alone = detect(model, pool, replace(only, candidates=1), seed=0)
    k = next(c.index for c in alone.classes if c.evidence["candidate"])
    assert first.classes[k].evidence["margin_patch"] == alone.classes[k].evidence["margin_patch"]


def test_restarts_average_the_scored_family_over_fresh_searches(model: PromptedCLIP, pool: torch.Tensor) -> None:
    one = replace(SMALL, search_all_families=False, candidates=1)
    two = replace(one, restarts=2)
    r1, r2 = detect(model, pool, one, seed=0), detect(model, pool, two, seed=0)
    k = next(c.index for c in r1.classes if c.evidence["candidate"])
    assert next(c.index for c in r2.classes if c.evidence["candidate"]) == k  # ranking needs no search
    e1, e2 = r1.classes[k].evidence, r2.classes[k].evidence
    # the first restart draws what a single search draws, so the second's figures are what the mean leaves
    second_margin = 2 * e2["margin_patch"] - e1["margin_patch"]
    second_share = 2 * e2["asr_patch"] - e1["asr_patch"]
    assert math.isfinite(second_margin) and second_margin != pytest.approx(e1["margin_patch"])
    assert -1e-6 <= second_share <= 1 + 1e-6
    expected = e2["margin_patch"] if e2["gain_patch"] > 0 else min(e2["margin_patch"], 0.0)
    assert r2.classes[k].anomaly_score == pytest.approx(expected)  # scored from the mean evidence
    assert k in r2.raw_triggers  # one of the two triggers is kept for the report and repair
    # "best": the evidence of the restart whose trigger scored highest, whole
    rb = detect(model, pool, replace(two, restart_rule="best"), seed=0)
    eb = rb.classes[k].evidence
    assert eb["margin_patch"] == pytest.approx(max(e1["margin_patch"], second_margin), abs=1e-4)
    assert eb["asr_patch"] in (pytest.approx(e1["asr_patch"]), pytest.approx(second_share, abs=1e-4))
    # each restart's own value is recorded (the first is the single search's), and "best" scores their best
    v1 = e1["margin_patch"] if e1["gain_patch"] > 0 else min(e1["margin_patch"], 0.0)
    assert restart_key("patch", 0) not in e1 and eb[restart_key("patch", 0)] == pytest.approx(v1)
    assert e2[restart_key("patch", 1)] == eb[restart_key("patch", 1)]  # the rule does not change what was drawn
    assert rb.classes[k].anomaly_score == pytest.approx(max(eb[restart_key("patch", i)] for i in range(2)))
    with pytest.raises(ConfigError, match="restart_rule"):
        DetectorConfig(restart_rule="median")
    with pytest.raises(ConfigError, match="restarts"):
        DetectorConfig(restarts=0)


def test_both_patch_starts_decide_what_a_soft_and_a_grid_run_decide_combined(model: PromptedCLIP,
                                                                             pool: torch.Tensor) -> None:
    base = replace(SMALL, families=("sticker", "patch"), candidates=2)
    soft, grid, both = (detect(model, pool, replace(base, patch_start=s), seed=0) for s in ("soft", "grid", "both"))
    confirmed = [c.index for c in both.classes if c.evidence["candidate"]]
    assert len(confirmed) == 2 and confirmed == [c.index for c in soft.classes if c.evidence["candidate"]]
    for k in confirmed:
        es, eg, eb = soft.classes[k].evidence, grid.classes[k].evidence, both.classes[k].evidence
        # each start's value is the separate run's score for the class, and the class keeps the better one
        assert eb["soft_start_patch"] == pytest.approx(soft.classes[k].anomaly_score)
        assert eb["grid_start_patch"] == pytest.approx(grid.classes[k].anomaly_score)
        assert both.classes[k].anomaly_score == pytest.approx(max(soft.classes[k].anomaly_score,
                                                                  grid.classes[k].anomaly_score))
        better = eg if grid.classes[k].anomaly_score > soft.classes[k].anomaly_score else es
        assert eb["size_patch"] == pytest.approx(better["size_patch"])  # the whole evidence of the better start
        # the starts draw the same numbers: the sticker searched before them, and the next candidate's searches
        # after them, are what the single-start runs found
        assert eb["margin_sticker"] == es["margin_sticker"] == eg["margin_sticker"]
        assert "soft_start_patch" not in es and "grid_start_patch" not in eg
    assert soft.classes[confirmed[0]].evidence["size_patch"] != grid.classes[confirmed[0]].evidence["size_patch"]
    # the model's score is its best class's: the better of the two runs' model scores
    assert both.anomaly_score == pytest.approx(max(soft.anomaly_score, grid.anomaly_score))
    with pytest.raises(ConfigError, match="patch_start"):
        DetectorConfig(patch_start="all")


def test_flat_models_confirm_more_candidates(model: PromptedCLIP, pool: torch.Tensor,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from scanner.engine import ci

    base = replace(SMALL, search_all_families=False, candidates=1, flat_candidates=3)
    ranked = detect(model, pool, base, seed=0)
    top = max(c.evidence["drift_anomaly"] for c in ranked.classes)
    # a drift anomaly above the cut names a suspect: one candidate, as without the option
    monkeypatch.setattr(ci, "FLAT_ANOMALY", top - 1e-3)
    named = detect(model, pool, base, seed=0)
    assert sum(c.evidence["candidate"] for c in named.classes) == 1
    # under it nothing stands out: the three most drifted classes are confirmed, the first as a one-candidate run
    monkeypatch.setattr(ci, "FLAT_ANOMALY", top + 1e-3)
    flat = detect(model, pool, base, seed=0)
    order = sorted(range(model.n_cls), key=lambda k: -flat.classes[k].evidence["drift_anomaly"])
    assert {k for k, c in enumerate(flat.classes) if c.evidence["candidate"]} == set(order[:3])
    assert flat.classes[order[0]].evidence["margin_patch"] == named.classes[order[0]].evidence["margin_patch"]
    with pytest.raises(ConfigError, match="flat_candidates"):
        DetectorConfig(flat_candidates=-1)


def test_the_awake_candidate_is_the_class_clean_images_fall_into_most(model: PromptedCLIP,
                                                                      pool: torch.Tensor) -> None:
    base = replace(SMALL, search_all_families=False, candidates=1)
    steps: list[tuple[str, int, int]] = []
    res = detect(model, pool, replace(base, awake_candidate=True), seed=0,
                 progress=lambda stage, done, total: steps.append((stage, done, total)))
    ev = [c.evidence for c in res.classes]
    drift_top = max(range(len(ev)), key=lambda k: ev[k]["drift_anomaly"])
    excess = torch.tensor([e["natural_share"] for e in ev]) - torch.tensor([e["zero_shot_share"] for e in ev])
    awake_top = int(torch.argmax(excess))
    confirmed = {k for k, e in enumerate(ev) if e["candidate"]}
    assert confirmed == {drift_top, awake_top}
    assert all(res.classes[k].anomaly_score != -1.0 or ev[k]["gain_patch"] <= 0 for k in confirmed)
    # the progress counts one step per candidate's family and ends where it said it would
    confirms = [s for s in steps if s[0].startswith("confirm:")]
    assert len(confirms) == len(confirmed) and confirms[-1][1] == confirms[-1][2] == len(confirmed)
    # the drift candidate is searched first, from the same draws as a run without the awake candidate
    alone = detect(model, pool, base, seed=0)
    assert alone.classes[drift_top].evidence["margin_patch"] == ev[drift_top]["margin_patch"]
    assert DetectorConfig().awake_candidate is False


@pytest.mark.parametrize("bad", [{"kappa": 0.0}, {"kappa": -1.0}, {"restarts": 0}, {"candidates": 0}])
def test_search_settings_out_of_range_are_refused_with_their_name(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match=next(iter(bad))):
        DetectorConfig(**bad)  # type: ignore[arg-type]


def test_a_search_leaves_nothing_behind(model: PromptedCLIP, pool: torch.Tensor) -> None:
    from scanner.engine.ci import invert_for, measure_trigger, split_pool, trusted_twin
    from scanner.engine.invert import frozen_learner, panel_logits, shares

    # a later search must not score differently because an earlier one ran: same seed, same evidence, and the
    # pool, the suspect and the twin unchanged
    cfg = replace(SMALL, search_all_families=False).on("cpu")
    opt_x, hold_x = split_pool(pool, cfg)
    before = pool.clone()
    with frozen_learner(model):
        ref, _ = trusted_twin(model, opt_x, cfg)
        z0 = panel_logits(model, (ref,), None, hold_x, cfg.bf16_on)  # 2 x (N, C)
        natural, twin_natural = (shares(z) for z in z0)
        evidence = []
        for _ in range(2):
            trig = invert_for(model, ref, 0, "patch", opt_x, cfg, torch.Generator().manual_seed(0))
            ev, _ = measure_trigger(model, ref, trig, 0, "patch", hold_x, float(natural[0]), float(twin_natural[0]),
                                    cfg.bf16_on)
            evidence.append(ev)
            z1 = panel_logits(model, (ref,), None, hold_x, cfg.bf16_on)
            assert all(torch.equal(a, b) for a, b in zip(z0, z1, strict=True))
    assert evidence[0] == evidence[1]
    assert torch.equal(pool, before)


def test_the_settings_help_states_cis_default_line() -> None:
    from dataclasses import fields

    from scanner.settings import Settings

    doc = next(f.metadata["doc"] for f in fields(Settings) if f.name == "threshold")
    assert f"CI {DetectorConfig().decision_threshold:g}," in doc  # the text spells out the engine's constant
