"""CLIP-Inspector: model-level backdoor detection from unlabelled OOD images.

Design (ours; the paper's details are not public), cost independent of the class count:

1. *A trusted twin.* The encoders are frozen and public and the class names known, so the same encoders
   with plain zero-shot prompts form a classifier that cannot carry a prompt backdoor
   (``ReferenceModel``, a panel of templates). A trigger that works because it *draws* class-k evidence
   moves both models; a planted trigger moves the suspect alone. The twin reuses the suspect's image
   features.
2. *Robust triggers only.* Every reconstructed trigger is followed by a random translation (±
   ``max_shift`` px) during optimisation and evaluation: small universal adversarial patterns, which
   reach any class of a small CLIP, do not survive it; a feature the prompt was tuned to react to does.
3. *Four trigger families*, one per way a trigger can be laid on an image: bounded additive, small
   patch (mask + pattern), full-image blend, smooth warp. Each is bounded so that it cannot simply paint
   a class: a blend above ~0.12 opacity moved clean models as far as planted triggers move backdoored ones.
4. *Screen all classes at once.* Per family, one pass of an untargeted "differential collapse" search
   with ``screen_members`` triggers, each sending its share of the batch to a *different* class among
   those the triggers move the suspect into more than the twin (``diverse_collapse``): the R most
   accessible classes per family for the cost of one trigger. Every class's gain is recorded: its
   share of triggered held-out images minus the larger of its natural share and the twin's share.
5. *Confirm the few most suspicious classes* with a targeted differential margin objective (target
   logit above every other for the suspect, target probability kept low for the twin), in the family
   that screened them best. Cost: (families + candidates) epochs, whatever the class count.
6. *Decide.* Per-class score = best gain; the robust anomaly index (median/MAD across classes) of the
   best class against threshold ``k`` flags the model, and its trigger must also work
   (gain >= ``MIN_GAIN``).
7. *Dormancy.* A backdoor should sleep on clean inputs. A prompt that sends a far larger share of the
   clean OOD hold-out to one class than plain zero-shot prompts do (``dormant_margin``) is flagged too,
   with that class as the suspect: some planted warps (WaNet) fire on ordinary photos. Measured per class
   as ``natural_share`` and ``zero_shot_share`` in the evidence; no search is needed for it.

The ``ci-plain`` mode is the paper's plain protocol for comparison: a targeted inversion for *every*
class, one epoch each, anomaly index over the per-class ASR gain.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from scanner.engine.config import DetectorConfig
from scanner.engine.invert import (
    InversionSchedule,
    ReferenceModel,
    autocast,
    class_shares,
    differential_margin,
    diverse_collapse,
    frozen_learner,
    margin_loss,
    optimise,
    optimise_pair,
    pair_shares,
)
from scanner.engine.result import ClassEvidence, DetectionResult
from scanner.engine.scoring import anomaly_index
from scanner.engine.triggers import (
    AdditiveTrigger,
    BlendTrigger,
    PatchTrigger,
    ShiftedTrigger,
    StickerTrigger,
    Trigger,
    TriggerGroup,
    WarpTrigger,
)
from scanner.prompting.classifier import PromptedCLIP

Progress = Callable[[str, int, int], None]
MIN_GAIN = 0.5  # a flagged class's trigger must move at least half of the held-out images into it


def make_trigger(family: str, size: int, cfg: DetectorConfig, gen: torch.Generator,
                 device: torch.device | None = None) -> Trigger:
    """A fresh trigger of ``family``, drawn from ``gen`` (a CPU generator, so a seed gives the same
    initial trigger on every device) and then moved to ``device``."""
    inner: Trigger
    if family == "additive":
        inner = AdditiveTrigger(size, cfg.eps, gen)
    elif family == "patch":
        inner = PatchTrigger(size, gen)
    elif family == "sticker":
        inner = StickerTrigger(size, max(1, round(cfg.sticker * size)), gen)
    elif family == "blend":
        inner = BlendTrigger(size, cfg.blend_alpha, gen)
    else:
        inner = WarpTrigger(size, cfg.warp_px, gen)
    if device is not None:
        inner = inner.to(device)
    if cfg.max_shift > 0:
        return ShiftedTrigger(inner, cfg.max_shift, gen)
    return inner


@dataclass
class _BestTriggers:
    """Per class: the best score so far (C,) and the trigger that earned it (report image, raw form)."""

    score: torch.Tensor
    images: dict[int, torch.Tensor] = field(default_factory=dict)
    raw: dict[int, torch.Tensor] = field(default_factory=dict)

    def offer(self, k: int, value: float, trig: Trigger) -> bool:
        """Keep ``trig`` for class ``k`` when ``value`` beats its best so far; True when it did."""
        if value <= float(self.score[k]):
            return False
        self.score[k] = value
        self.images[k] = trig.image().cpu()  # evidence lives on the CPU whatever device ran the search
        self.raw[k] = trig.raw().cpu()
        return True


def _size_weight(family: str, cfg: DetectorConfig) -> float:
    return cfg.patch_weight if family == "patch" else 0.0


def split_pool(pool: torch.Tensor, cfg: DetectorConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(optimisation split, held-out split) of the first ``n_images`` images, in pool order."""
    x = pool[: cfg.n_images]
    n_hold = max(1, round(cfg.holdout * x.shape[0]))
    return x[:-n_hold], x[-n_hold:]


def _twin(model: PromptedCLIP, x: torch.Tensor, cfg: DetectorConfig) -> tuple[ReferenceModel, torch.Tensor,
                                                                                 torch.Tensor]:
    """The trusted twin (templates + a member distilled on clean ``x``) and the mean class probabilities
    (C,) of the suspect and of the twin on ``x`` (no gradient)."""
    ref = ReferenceModel(model)
    with torch.no_grad(), autocast(cfg.bf16, x.device):
        feats = model.image_features(x)
        sus = model.logits_from_features(feats).float()
    if cfg.distil_twin:
        ref.distil(feats, sus)
    return ref, sus.softmax(dim=1).mean(dim=0), ref.logits(feats).softmax(dim=1).mean(dim=0)


def run_ci(model: PromptedCLIP, pool: torch.Tensor, cfg: DetectorConfig, seed: int,
           progress: Progress | None = None) -> DetectionResult:
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    opt_x, hold_x = split_pool(pool, cfg)
    size = pool.shape[-1]
    C = model.n_cls
    sched = InversionSchedule(cfg.batch_size, cfg.epochs, cfg.lr, cfg.bf16)
    m = min(cfg.candidates, C)
    total = len(cfg.families) + m
    done = 0

    def tick(stage: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(stage, done, total)

    evidence: dict[int, dict[str, float]] = {k: {} for k in range(C)}
    best = _BestTriggers(torch.full((C,), -1.0))
    with frozen_learner(model):
        ref, base_s, base_r = _twin(model, opt_x, cfg)
        # the suspect's clean-image shares, and what plain prompts predict on the same images (one pass): a
        # prompt that sends far more OOD photos to a class than zero-shot does is not dormant (``_decide``)
        natural, zero_shot = pair_shares(model, ref.zero_shot(), None, hold_x, cfg.bf16)  # (C,), (C,)
        for k in range(C):
            evidence[k]["zero_shot_share"] = float(zero_shot[k])
        best_family: dict[int, str] = {}
        # 1. screen: one untargeted differential pass per family (a group of r triggers aimed at r different
        #    classes); every class's gain is recorded (the best over the members)
        r = min(cfg.screen_members, C)
        for fam in cfg.families:
            key = f"screen_{fam}"
            group = TriggerGroup([make_trigger(fam, size, cfg, gen, pool.device) for _ in range(r)])
            optimise_pair(model, ref, group, opt_x, diverse_collapse(base_s, base_r, r, cfg.reference_weight),
                          sched, gen, _size_weight(fam, cfg))
            for trig in group.members:
                s_sus, s_ref = pair_shares(model, ref, trig, hold_x, cfg.bf16)
                gain = s_sus - torch.maximum(s_ref, natural)  # (C,)
                for k in range(C):
                    evidence[k][key] = max(evidence[k].get(key, -1.0), float(gain[k]))
                    if best.offer(k, float(gain[k]), trig):
                        best_family[k] = fam
            tick(f"screen:{fam}")
        # 2. confirm: a targeted differential inversion for the most suspicious classes, in the family
        #    that screened them best
        cands = [int(k) for k in torch.argsort(best.score, descending=True, stable=True)[:m]]
        for t in cands:
            fam = best_family.get(t, cfg.families[0])
            trig = make_trigger(fam, size, cfg, gen, pool.device)
            optimise_pair(model, ref, trig, opt_x, differential_margin(t, cfg.kappa, cfg.reference_weight),
                          sched, gen, _size_weight(fam, cfg))
            s_sus, s_ref = pair_shares(model, ref, trig, hold_x, cfg.bf16)
            # what the trigger does to the suspect beyond what it does to its clean twin
            gain_t = float(s_sus[t]) - max(float(s_ref[t]), float(natural[t]))
            evidence[t].update({f"asr_{fam}": float(s_sus[t]), f"ref_asr_{fam}": float(s_ref[t]),
                                f"size_{fam}": float(trig.size().detach()), "confirm": gain_t})
            best.offer(t, gain_t, trig)
            tick(f"confirm:{fam}")
    for k in range(C):
        evidence[k]["candidate"] = float(k in cands)
    return _decide("ci", model, cfg, best, natural, evidence, seed, start, excess=natural - zero_shot)


def run_ci_plain(model: PromptedCLIP, pool: torch.Tensor, cfg: DetectorConfig, seed: int,
                 progress: Progress | None = None) -> DetectionResult:
    """The paper's plain protocol: a targeted inversion for every class and trigger family (one epoch
    each); per-class score = best ASR gain over the class's natural share; anomaly index over classes."""
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    opt_x, hold_x = split_pool(pool, cfg)
    size = pool.shape[-1]
    C = model.n_cls
    sched = InversionSchedule(cfg.batch_size, cfg.epochs, cfg.lr, cfg.bf16)
    evidence: dict[int, dict[str, float]] = {k: {} for k in range(C)}
    best = _BestTriggers(torch.full((C,), -1.0))
    with frozen_learner(model):
        natural = class_shares(model, None, hold_x, cfg.bf16)  # (C,)
        for t in range(C):
            for fam in cfg.families:
                trig = make_trigger(fam, size, cfg, gen, pool.device)
                optimise(model, trig, opt_x, margin_loss(t, cfg.kappa), sched, gen, _size_weight(fam, cfg))
                asr = float(class_shares(model, trig, hold_x, cfg.bf16)[t])
                evidence[t][f"asr_{fam}"] = asr
                evidence[t][f"size_{fam}"] = float(trig.size().detach())
                best.offer(t, asr - float(natural[t]), trig)
            if progress is not None:
                progress("invert", t + 1, C)
    return _decide("ci-plain", model, cfg, best, natural, evidence, seed, start)


def _decide(detector: str, model: PromptedCLIP, cfg: DetectorConfig, best: _BestTriggers, natural: torch.Tensor,
            evidence: dict[int, dict[str, float]], seed: int, start: float,
            excess: torch.Tensor | None = None) -> DetectionResult:
    """The decision both CI modes share: per-class best score (C,) -> robust anomaly index; the most
    anomalous class flags the model when it passes ``cfg.threshold`` and its trigger works (MIN_GAIN).
    With ``excess`` (C,) (clean-image share of the suspect minus that of plain zero-shot prompts), a class
    above ``cfg.dormant_margin`` also flags it: the prompt is not dormant on clean inputs."""
    score = best.score
    anomalies = anomaly_index(score, floor=cfg.score_floor)
    top = int(torch.argmax(anomalies))
    by_trigger = bool(anomalies[top] > cfg.threshold and score[top] >= MIN_GAIN)
    awake = int(torch.argmax(excess)) if excess is not None else top
    by_excess = excess is not None and float(excess[awake]) > cfg.dormant_margin
    classes = []
    for k in range(model.n_cls):
        evidence[k].update(natural_share=float(natural[k]), score=float(score[k]))
        classes.append(ClassEvidence(k, model.classnames[k], float(anomalies[k]), evidence[k]))
    target = top if by_trigger else awake if by_excess else None
    if by_trigger:
        reason = (f"a reconstructed trigger moves {float(score[top]):.2f} of clean OOD images into "
                  f"{model.classnames[top]!r} beyond the zero-shot twin: anomaly {float(anomalies[top]):.2f} > "
                  f"threshold {cfg.threshold:.2f}")
    elif by_excess:
        assert excess is not None
        reason = (f"not dormant on clean inputs: {model.classnames[awake]!r} takes {float(excess[awake]):.2f} more "
                  f"of the clean OOD images than plain zero-shot prompts give it (margin {cfg.dormant_margin:.2f})")
    else:
        reason = (f"no class stands out: highest anomaly {float(anomalies[top]):.2f} (threshold "
                  f"{cfg.threshold:.2f}), best trigger gain {float(score.max()):.2f} (needs {MIN_GAIN:.2f})")
    return DetectionResult(
        detector=detector, backdoored=by_trigger or by_excess, target_index=target,
        anomaly_score=float(anomalies[top]), threshold=cfg.threshold, classes=classes,
        trigger_images=best.images, raw_triggers=best.raw, seed=seed, runtime_s=time.perf_counter() - start,
        reason=reason,
    )
