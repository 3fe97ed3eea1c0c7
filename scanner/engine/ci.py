"""CLIP-Inspector: model-level backdoor detection from unlabelled OOD images.

Design (ours; the paper's details are not public), cost independent of the class count:

1. *A trusted twin.* The encoders are frozen and public and the class names known, so the same encoders
   with plain zero-shot prompts form a classifier that cannot carry a prompt backdoor
   (``ReferenceModel``, a panel of templates plus a head distilled on clean images). A trigger that works
   because it *draws* class-k evidence moves both models; a planted trigger moves the suspect alone.
2. *Rank classes by prompt drift* (``engine/drift.py``, no image optimised): a backdoor can live only in
   the prompt, and the target's prompt must pull its text feature towards the trigger, away from where
   plain prompts put the class. The ``candidates`` most drifted classes are the suspects. On the full
   zoo this named the planted target first in 29 of 37 backdoored CoOp models (2 of 11 CoCoOp); the
   untargeted search it replaced (one collapse per trigger family) rarely did: every clean prompt-tuned
   model of the small bundled CLIP has natural triggers (``benchmarks/natural_triggers.py``: a random
   overlay sends >= 80 % of OOD photos to one class in 13 of 13 clean CoOp models) that a collapse
   slides into first. Image-conditioned prompts (CoCoOp) have no class-specific context to drift: they
   are ranked by the universal reach of a tiny shared perturbation over the twin's (``engine/reach.py``)
   and confirmed with ``conditioned_families`` (an additive trigger, BadCLIP's kind) besides the others.
3. *Confirm each candidate* with a targeted differential margin objective (target logit above every
   other for the suspect, target probability kept low for the twin) in each trigger family
   (``DetectorConfig.search_families``; default: a sticker and a soft patch, plus ``conditioned_families``
   for CoCoOp; the default score reads the patch alone, and ``search_all_families = False`` searches it
   alone), each trigger followed by a random translation (``max_shift`` px) so that small universal
   adversarial patterns, which reach any class of a small CLIP, do not survive. Cost: candidates x
   families epochs, whatever the class count.
4. *Decide.* A trigger's gain is how far it moves held-out images into the class in the suspect (its
   share with the trigger minus its natural share) beyond how far it moves them in the twin (the same,
   measured on the twin, counted only when positive; ``trigger_gain``). Each model is measured against
   its own starting point, so a class that plain prompts already make the sink of OOD photos (the twin
   sends 0.8 of them there) still shows a planted trigger that the suspect's prompt had pushed away from
   clean photos. A candidate's score is its best family's gain plus ``family_bonus`` times the next
   family's (``class_score``): a planted trigger tends to answer to both families, a clean class's
   natural trigger to one. With ``trigger_score = "margin"`` a family's value is its margin lift instead of its
   gain (``family_value``): shares saturate at 1.0, margins do not. With ``"patch-margin"`` the candidate's
   score is the median logit margin its patch trigger gives it over the held-out images (``candidate_score``).
   The default score since session 18 is ``"patch-margin"``, its patch searched from two starts since session 25
   (``BOTH_STARTS_THRESHOLD``; one start's line is ``PATCH_MARGIN_THRESHOLD``, share's
   ``DEFAULT_THRESHOLDS["ci"]``). The model is flagged when the best score passes the threshold (refitted by
   ``scanner calibrate``); ``ci_verdict``.
5. *Dormancy.* A backdoor should sleep on clean inputs. A prompt that sends a far larger share of the
   clean OOD hold-out to one class than plain zero-shot prompts do (``dormant_margin``) is flagged too,
   with that class as the suspect: some planted warps (WaNet) fire on ordinary photos. The most drifted
   prompt, when its drift is anomalous, is held to a lower bar (``awake_excess``). Measured per class
   as ``natural_share`` and ``zero_shot_share`` in the evidence; no search is needed for it. Its logit form
   (``DetectorConfig.dormant_lift``, rule D: an option, off by default; ``MarginDormancy``) reads the most
   drifted prompt of a drift-ranked model: flagged when it wins the clean hold-out by a wider median margin
   than the twin gives the class (``natural_margin`` - ``twin_margin``), since a half-firing planted prompt
   takes photos plain prompts also send there, so its share excess stays small while its margin does not.
6. *The distilled student* (an option, ``DetectorConfig.student_steps``; ``engine/student.py``): fresh prompts
   tuned to agree with the suspect on the clean optimisation split relearn the evidence clean photos exercise,
   natural triggers included, and not a sleeping planted patch. Every measured trigger records what it does to
   the student too, and the ``"patch-student"`` score takes a trigger that both the twin and the student concede
   as natural (``_margin_value``).

The ``ci-plain`` mode is the paper's plain protocol for comparison: a targeted inversion for *every*
class, one epoch each, anomaly index over the per-class ASR gain.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from scanner.engine.config import (
    DORMANCY_OFF,
    FLAT_ANOMALY,
    MARGIN_SCORES,
    PATCH_MARGIN_FAMILY,
    TWIN_MARGIN_WEIGHT,
    DetectorConfig,
    scoring_families,
)
from scanner.engine.drift import DRIFT_FLOOR, prompt_drift
from scanner.engine.invert import (
    InversionSchedule,
    LogitHead,
    ReferenceModel,
    autocast,
    class_shares,
    differential_margin,
    frozen_learner,
    margin_loss,
    optimise,
    optimise_pair,
    panel_logits,
    shares,
)
from scanner.engine.margins import class_margins, margin_quantiles
from scanner.engine.reach import REACH_IMAGES, reach_ratio
from scanner.engine.result import ClassEvidence, DetectionResult
from scanner.engine.scoring import anomaly_index
from scanner.engine.student import StudentModel, distil_student
from scanner.engine.triggers import (
    AdditiveTrigger,
    BlendTrigger,
    PatchTrigger,
    ShiftedTrigger,
    StickerTrigger,
    Trigger,
    WarpTrigger,
    grid_mask_logits,
)
from scanner.prompting.classifier import PromptedCLIP

Progress = Callable[[str, int, int], None]
MIN_GAIN = 0.5  # ci-plain: a flagged class's trigger must move at least half of the held-out images into it
DRIFT_K = 2.0  # the most drifted prompt counts as drifted when its drift's robust anomaly index passes k = 2
# a drifted class is called awake at this share of the dormant margin: two weak signals together (full zoo,
# margin 0.8: WaNet 5 -> 8 of 12 flagged, no new false positive; excess bars 0.40-0.50 give the same verdicts,
# 0.30 adds a false positive)
DRIFTED_BAR = 0.6
# what a search from each start records of its trigger (``_search_from_starts``): enough for any margin score
START_KEYS = ("gain", "margin", "stu_margin", "ref_margin")
# "patch-student": a patch trigger is natural when its gain over the twin is under NATURAL_GAIN and the suspect's median
# margin under it leads the student's by under NATURAL_LEAD logits (``_margin_value``). Set by reasoning before the
# judge (docs/preregistrations.md, session 32): 0.2 is the gain under which session 29 found three of five CSC false
# positives, 2 logits a small part of the shipped line (6.09)
NATURAL_GAIN = 0.2
NATURAL_LEAD = 2.0


def awake_excess(excess: torch.Tensor, drift_anomaly: torch.Tensor) -> torch.Tensor:
    """(C,) what the dormancy check compares with the margin: each class's clean-image share beyond plain
    zero-shot prompts (``excess``), divided by ``DRIFTED_BAR`` for the most drifted class when its drift is
    anomalous (``drift_anomaly`` (C,) >= ``DRIFT_K``)."""
    out = excess.clone()
    top = int(torch.argmax(drift_anomaly))
    if float(drift_anomaly[top]) >= DRIFT_K:
        out[top] = out[top] / DRIFTED_BAR
    return out


def trigger_gain(triggered: float, twin_triggered: float, natural: float, twin_natural: float) -> float:
    """How far a trigger moves held-out images into its class in the suspect (share with the trigger minus
    the natural share) beyond how far it moves them in the twin (the same on the twin, when positive).
    The same in logit units is the margin lift (``family_value``): the median margin of the class instead of
    its share, which keeps growing once every image is moved."""
    return (triggered - natural) - max(0.0, twin_triggered - twin_natural)


def confirmed_families(evidence: dict[str, float]) -> list[str]:
    """The trigger families a class was confirmed with, in search order (its ``gain_<family>`` keys)."""
    return [key[5:] for key in evidence if key.startswith("gain_")]


def restart_key(family: str, i: int) -> str:
    """The evidence key of restart ``i``'s (0-based) value for ``family`` (recorded when ``restarts`` > 1)."""
    return f"restart{i}_{family}"


def family_value(evidence: dict[str, float], family: str, trigger_score: str,
                 twin_weight: float = TWIN_MARGIN_WEIGHT) -> float:
    """A confirmed class's value for one trigger family, read from its evidence: the gain (``"share"``), the
    margin lift (``"margin"``: ``trigger_gain`` of the median margins), the median margin itself
    (``"patch-margin"``, which scores the patch family's: ``scoring_families``; at most 0 when the trigger's
    gain is not positive) or that margin less ``twin_weight`` times the twin's median margin for the class
    under the same trigger (``"patch-twin"``, gated alike). KeyError when the evidence predates what that score
    needs."""
    if trigger_score == "margin":
        return trigger_gain(evidence[f"margin_{family}"], evidence[f"ref_margin_{family}"],
                            evidence["natural_margin"], evidence["twin_margin"])
    if trigger_score in MARGIN_SCORES:
        # a saved search from several starts: the best start under this score, whichever one its run kept (the
        # run kept the best under its own score, so for that score this is the kept start's value)
        starts = start_evidence(evidence, family)
        if starts:
            return max(_margin_value(ev, family, trigger_score, twin_weight) for ev in starts)
        return _margin_value(evidence, family, trigger_score, twin_weight)
    return evidence[f"gain_{family}"]


def start_evidence(evidence: Mapping[str, float], family: str) -> list[dict[str, float]]:
    """One evidence dict per recorded start of ``family``'s search (``START_KEYS`` of each start overlaid on the
    class's evidence); empty when the evidence records no start's keys (one start, or rows before session 32)."""
    suffix = f"_start_margin_{family}"
    starts = [key[: -len(suffix)] for key in evidence if key.endswith(suffix)]
    return [{**evidence, **{f"{key}_{family}": evidence[f"{s}_start_{key}_{family}"] for key in START_KEYS
                            if f"{s}_start_{key}_{family}" in evidence}} for s in starts]


def _margin_value(evidence: Mapping[str, float], family: str, trigger_score: str, twin_weight: float) -> float:
    """``family_value`` of one search under a margin score (``MARGIN_SCORES``)."""
    margin = evidence[f"margin_{family}"]
    if trigger_score == "patch-student" and f"stu_margin_{family}" in evidence:  # none: image-conditioned
        # a natural trigger draws evidence of the class: plain prompts concede the class too (a small gain over the
        # twin) and so does a student that relearned the prompts from clean photos alone (its margin close to the
        # suspect's). Such a trigger is worth the suspect's lead over the student, not its margin. Either test alone
        # fails: planted triggers on sink targets have small gains (session 29), and the student relearns a planted
        # noise blend (its feature shift is one clean photos exercise)
        lead = margin - evidence[f"stu_margin_{family}"]
        if evidence[f"gain_{family}"] < NATURAL_GAIN and lead < NATURAL_LEAD:
            margin = lead
    if trigger_score == "patch-twin":
        # a natural trigger draws the class's evidence, so plain prompts concede the class too (the twin's margin
        # rises with the suspect's); a planted one convinces the suspect alone (the twin's margin stays low)
        margin -= twin_weight * evidence[f"ref_margin_{family}"]
    # a trigger that moves no held-out image into the class beyond the twin is no trigger: a class that wins clean
    # photos by a wide margin already (a colour task's "gray" on OOD photos) keeps that margin under it
    return margin if evidence[f"gain_{family}"] > 0 else min(margin, 0.0)


def candidate_score(values: Sequence[float], bonus: float, trigger_score: str) -> float:
    """A confirmed class's score from its scoring families' ``family_value``s: ``class_score`` for "share" and
    "margin"; the best value for the patch scores (the patch family's alone when it was searched)."""
    if trigger_score in MARGIN_SCORES:
        return max(values)
    return class_score(values, bonus)


def class_score(gains: Sequence[float], bonus: float) -> float:
    """A confirmed class's score from its trigger families' gains: the best, plus ``bonus`` times the next
    best when that is positive (one family alone scores its gain)."""
    ranked = sorted(gains, reverse=True)
    if not ranked:
        raise ValueError("a confirmed class needs at least one trigger family's gain")
    return ranked[0] + bonus * max(ranked[1], 0.0) if len(ranked) > 1 else ranked[0]


@dataclass(frozen=True)
class CIVerdict:
    """CI's decision from its two channels; ``target`` is None when not flagged."""

    flagged: bool
    target: int | None
    channel: str | None  # "trigger", "awake", "believed" or None
    trigger_class: int  # the class with the best confirmed gain
    awake_class: int  # the class with the largest weighed clean-image excess
    weighed: torch.Tensor  # (C,) the weighed excess the dormancy check compared with the margin


@dataclass(frozen=True)
class MarginDormancy:
    """What the logit form of the dormancy check reads (``DetectorConfig.dormant_lift``): ``lift`` (C,), each
    class's median margin on the clean OOD hold-out in the suspect less the twin's (logit units); ``rank`` (C,),
    the prompt-drift anomaly that names the class it is read at (its argmax); ``line``: flag above it."""

    lift: torch.Tensor
    rank: torch.Tensor
    line: float

    def at_top(self) -> tuple[int, float]:
        """(the most drifted class, its lift): what the check reads."""
        k = int(torch.argmax(self.rank))
        return k, float(self.lift[k])

    def suspect(self) -> int | None:
        """The most drifted class when its lift passes the line, else None."""
        k, lift = self.at_top()
        return k if lift > self.line else None


def ci_verdict(gains: torch.Tensor, excess: torch.Tensor, drift_anomaly: torch.Tensor | None, threshold: float,
               dormant_margin: float, confirmed: torch.Tensor | None = None,
               believed: MarginDormancy | None = None) -> CIVerdict:
    """The CI decision rule, on tensors alone (the engine and the re-decision of saved rows both call it).

    ``gains`` (C,): best confirmed trigger gain per class (-1 where not confirmed); ``excess`` (C,): clean
    share minus plain zero-shot share; ``drift_anomaly`` (C,) or None; ``confirmed`` (C,) bool or None: the
    classes a trigger was searched for. The trigger channel comes first: the best confirmed class's gain above
    ``threshold``; else the dormancy channel: the weighed excess above ``dormant_margin`` (off at 1); else, when
    ``believed`` is given (drift-ranked learners with ``dormant_lift`` set), its logit form: the most drifted
    class's clean margin lift over the twin above its line.
    """
    if confirmed is not None and bool(confirmed.any()):
        # a margin score can fall below the -1 that marks unconfirmed classes: those never stand for the trigger
        top = int(torch.argmax(gains.masked_fill(~confirmed, float("-inf"))))
    else:
        top = int(torch.argmax(gains))
    weighed = awake_excess(excess, drift_anomaly) if drift_anomaly is not None else excess.clone()
    awake = int(torch.argmax(weighed))
    if float(gains[top]) > threshold:
        return CIVerdict(True, top, "trigger", top, awake, weighed)
    # a margin of 1 switches the channel off: the weighed excess of an anomalously drifted class can pass 1
    # (``awake_excess`` divides it by DRIFTED_BAR), so "above 1" is not "never"
    if dormant_margin < DORMANCY_OFF and float(weighed[awake]) > dormant_margin:
        return CIVerdict(True, awake, "awake", top, awake, weighed)
    suspect = believed.suspect() if believed is not None else None
    if suspect is not None:
        return CIVerdict(True, suspect, "believed", top, awake, weighed)
    return CIVerdict(False, None, None, top, awake, weighed)


def confirmed_mask(evidence: Mapping[int, Mapping[str, float]] | Sequence[Mapping[str, float]]) -> torch.Tensor | None:
    """(C,) bool from per-class evidence (the engine's dict, or a saved row's list): the classes marked as
    confirmed candidates; None when none is marked (rows written before candidates were recorded)."""
    flags = [bool(evidence[k].get("candidate", 0.0)) for k in range(len(evidence))]
    return torch.tensor(flags) if any(flags) else None


def patch_starts(family: str, cfg: DetectorConfig) -> tuple[str, ...]:
    """Where ``family``'s searches start: the patch family's ``cfg.patch_start`` ("both": soft, then grid), one
    start for every other family ("soft": no other family has a choice)."""
    if family != "patch":
        return ("soft",)
    return ("soft", "grid") if cfg.patch_start == "both" else (cfg.patch_start,)


def make_trigger(family: str, size: int, cfg: DetectorConfig, gen: torch.Generator,
                 device: torch.device | None = None, start: str | None = None) -> Trigger:
    """A fresh trigger of ``family``, drawn from ``gen`` (a CPU generator, so a seed gives the same
    initial trigger on every device) and then moved to ``device``. ``start`` ("soft" or "grid", default
    ``cfg.patch_start``; "both" reads as "soft") is where a patch trigger's mask begins."""
    inner: Trigger
    if family == "additive":
        inner = AdditiveTrigger(size, cfg.eps, gen)
    elif family == "patch":
        patch = PatchTrigger(size, gen)
        if (start or cfg.patch_start) == "grid":
            patch.start_at(grid_mask_logits(size, max(1, round(cfg.sticker * size))))
        inner = patch
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
    """Per class: the best score so far (C,) float64 and the trigger that earned it (report image, raw form)."""

    score: torch.Tensor
    images: dict[int, torch.Tensor] = field(default_factory=dict)
    raw: dict[int, torch.Tensor] = field(default_factory=dict)

    def offer(self, k: int, value: float, trig: Trigger) -> None:
        """Keep ``trig`` for class ``k`` when it is the class's first or ``value`` beats its best so far (the
        -1 a class starts at marks "not confirmed", not a floor: a margin score can be lower)."""
        if k in self.raw and value <= float(self.score[k]):
            return
        self.score[k] = value
        self.images[k] = trig.image().cpu()  # evidence lives on the CPU whatever device ran the search
        self.raw[k] = trig.raw().cpu()

    def settle(self, k: int, value: float) -> None:
        """Class ``k``'s final score once all its triggers were offered (the trigger kept is the best one's)."""
        self.score[k] = value


def _size_weight(family: str, cfg: DetectorConfig) -> float:
    return cfg.patch_weight if family == "patch" else 0.0


def invert_for(model: PromptedCLIP, twin: ReferenceModel, target: int, family: str, x: torch.Tensor,
               cfg: DetectorConfig, gen: torch.Generator, trigger: Trigger | None = None) -> Trigger:
    """A ``family`` trigger optimised on clean images ``x`` (N, 3, S, S) to send them into ``target`` in
    ``model`` while keeping ``twin`` unmoved (CI's differential margin, one schedule of ``cfg``). ``trigger``, when
    given, is optimised instead of a fresh one (a probe's own start, made with ``make_trigger`` from ``gen``)."""
    trig = trigger if trigger is not None else make_trigger(family, x.shape[-1], cfg, gen, x.device)
    optimise_pair(model, twin, trig, x, differential_margin(target, cfg.kappa, cfg.reference_weight),
                  InversionSchedule(cfg.batch_size, cfg.epochs, cfg.lr, cfg.bf16_on), gen, _size_weight(family, cfg))
    return trig


def split_pool(pool: torch.Tensor, cfg: DetectorConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(optimisation split, held-out split) of the first ``n_images`` images, in pool order."""
    x = pool[: cfg.n_images]
    n_hold = max(1, round(cfg.holdout * x.shape[0]))
    return x[:-n_hold], x[-n_hold:]


def trusted_twin(model: PromptedCLIP, x: torch.Tensor, cfg: DetectorConfig) -> tuple[ReferenceModel, torch.Tensor]:
    """The trusted twin (templates + a member distilled on clean ``x``) and the image features of ``x`` (N, E)."""
    ref = ReferenceModel(model)
    with torch.no_grad(), autocast(cfg.bf16_on, x.device):
        feats = model.image_features(x)
        sus = model.logits_from_features(feats).float()
    if cfg.distil_twin:
        ref.distil(feats, sus)
    return ref, feats


def run_ci(model: PromptedCLIP, pool: torch.Tensor, cfg: DetectorConfig, seed: int,
           progress: Progress | None = None) -> DetectionResult:
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    opt_x, hold_x = split_pool(pool, cfg)
    C = model.n_cls
    conditioned = model.learner.image_conditioned
    families = cfg.search_families(conditioned)
    done = 0
    evidence: dict[int, dict[str, float]] = {k: {} for k in range(C)}
    # per class: best confirmed score; -1 = not confirmed. float64 holds candidate_score's Python float as it is, so a
    # saved row re-scored from its evidence (``rescore_ci``) gets the very score the engine recorded
    best = _BestTriggers(torch.full((C,), -1.0, dtype=torch.float64))
    with frozen_learner(model):
        ref, feats = trusted_twin(model, opt_x, cfg)
        plain = ref.zero_shot()
        # no fixed class prompts to relearn in an image-conditioned learner
        student = (distil_student(model, feats, cfg.student_steps, cfg.student_lr)
                   if cfg.student_steps and not conditioned else None)
        # one pass over the clean hold-out: the suspect's shares, plain prompts' (a prompt that sends far more OOD
        # photos to a class than zero-shot does is not dormant, ``ci_verdict``) and the twin's (where each
        # trigger's effect on the twin is measured from, ``trigger_gain``), and the student's when there is one
        heads: tuple[LogitHead, ...] = (plain, ref) if student is None else (plain, ref, student)
        z_sus, z_plain, z_twin, *z_stu = panel_logits(model, heads, None, hold_x, cfg.bf16_on)  # 3 or 4 x (N, C)
        natural, zero_shot, twin_natural = shares(z_sus), shares(z_plain), shares(z_twin)  # 3 x (C,)
        # how decisively each class wins the clean hold-out, suspect and twin: (2, C) each (10th pct, median)
        nat_q, twin_q = margin_quantiles(class_margins(z_sus)), margin_quantiles(class_margins(z_twin))
        drift = prompt_drift(model, plain.text, feats)  # (C,)
        drift_anomaly = anomaly_index(drift, floor=DRIFT_FLOOR)  # (C,)
        for k in range(C):
            evidence[k].update(zero_shot_share=float(zero_shot[k]), twin_share=float(twin_natural[k]),
                               prompt_drift=float(drift[k]), drift_anomaly=float(drift_anomaly[k]),
                               natural_margin10=float(nat_q[0, k]), natural_margin=float(nat_q[1, k]),
                               twin_margin=float(twin_q[1, k]))
        rank = drift_anomaly  # (C,) what orders the candidates
        if conditioned and cfg.conditioned_reach:
            # an image-conditioned prompt has no class-specific context to drift: rank by universal reach
            reach = reach_ratio(model, plain, opt_x[:REACH_IMAGES], cfg.bf16_on)  # (C,)
            rank = anomaly_index(reach, floor=DRIFT_FLOOR)
            for k in range(C):
                evidence[k].update(reach_ratio=float(reach[k]), reach_anomaly=float(rank[k]))
        m = min(cfg.candidates, C)
        if cfg.flat_candidates and float(rank.max()) < FLAT_ANOMALY:
            m = max(m, min(cfg.flat_candidates, C))  # no class stands out: confirm more of them
        cands = [int(k) for k in torch.argsort(rank, descending=True, stable=True)[:m]]
        excess = natural - zero_shot  # (C,) clean-image share beyond plain prompts: the dormancy check's input
        if cfg.awake_candidate:
            # the class clean photos fall into most beyond plain prompts (not weighed: ``awake_excess``)
            awake_top = int(torch.argmax(excess))
            cands += [awake_top] if awake_top not in cands else []
        total = len(cands) * len(families)  # progress counts families; one searched several times counts once
        scoring = scoring_families(families, cfg.trigger_score)
        for t in cands:
            values: list[float] = []  # per scoring family: what the class is scored from (cfg.trigger_score)
            if student is not None:
                # the clean hold-out as the student reads it (from the pass above)
                evidence[t].update(student_share=float(shares(z_stu[0])[t]),
                                   student_margin=float(margin_quantiles(class_margins(z_stu[0])[:, t:t + 1])[1, 0]),
                                   student_agreement=student.agreement)
            for fam in families:
                # a scored family is searched ``restarts`` times from fresh draws; its evidence is their mean or the
                # best one's (``restart_rule``)
                runs = [_search_from_starts(model, ref, t, fam, opt_x, hold_x, cfg, gen, evidence[t],
                                            (float(natural[t]), float(twin_natural[t])), student)
                        for _ in range(cfg.restarts if fam in scoring else 1)]
                # each restart's own value (a run's keys are all of this family's, so the class keys it also reads
                # are the same before and after the family's evidence is written below), and the restart whose
                # trigger did best on its own: kept for the report and repair, and with restart_rule "best" its
                # evidence is the family's
                own, (top_ev, trig) = _best_search(runs, evidence[t], fam, cfg.trigger_score)
                if cfg.restart_rule == "best":
                    evidence[t].update(top_ev)
                else:
                    evidence[t].update({key: sum(ev[key] for ev, _ in runs) / len(runs) for key in runs[0][0]})
                if len(runs) > 1:
                    # in search order, so that a saved run can be cut to fewer restarts (``first_restarts``: the
                    # first candidate's restart i draws the same numbers at any count)
                    evidence[t].update({restart_key(fam, i): v for i, v in enumerate(own)})
                if fam in scoring:
                    value = family_value(evidence[t], fam, cfg.trigger_score)
                    best.offer(t, value, trig)
                    values.append(value)
                done += 1
                if progress is not None:
                    progress(f"confirm:{model.classnames[t]}:{fam}", done, total)
            best.settle(t, candidate_score(values, cfg.family_bonus, cfg.trigger_score))
    for k in range(C):
        evidence[k]["candidate"] = float(k in cands)
    # the logit form of dormancy reads the most drifted prompt, so it is for drift-ranked learners alone
    believed = (MarginDormancy(nat_q[1] - twin_q[1], drift_anomaly, cfg.dormant_lift)
                if cfg.dormant_lift is not None and rank is drift_anomaly else None)
    return _decide_ci(model, cfg, best, natural, evidence, seed, start, excess, drift_anomaly, believed)


def _search_from_starts(model: PromptedCLIP, ref: ReferenceModel, t: int, fam: str, opt_x: torch.Tensor,
                        hold_x: torch.Tensor, cfg: DetectorConfig, gen: torch.Generator, known: dict[str, float],
                        shares_t: tuple[float, float], student: StudentModel | None = None
                        ) -> tuple[dict[str, float], Trigger]:
    """One search of ``fam``'s trigger for class ``t``: from each of the family's starts (``patch_starts``), the
    measured trigger whose value is highest (the first of equals), with every start's value recorded as
    ``<start>_start_<fam>`` when there are several, with what a margin score of any kind reads of it
    (``<start>_start_<key>_<fam>``: the gain, the median margin and, with a ``student``, its median margin), so that
    a saved run can pick its start again under another score. ``known``: the class's evidence so far (what a
    value reads besides the family's own keys); ``shares_t``: the class's clean shares in the suspect and the
    twin."""
    starts = patch_starts(fam, cfg)
    fork = gen.get_state()
    tried: list[tuple[dict[str, float], Trigger]] = []
    for i, start in enumerate(starts):
        if i:
            # every start draws the same numbers (the pattern, the batches, the shifts): the starts differ in the
            # mask they begin from alone, so a "both" run decides what a soft and a grid run combined decide, and
            # the generator leaves in the same state whichever start ran last
            gen.set_state(fork)
        trig = make_trigger(fam, opt_x.shape[-1], cfg, gen, opt_x.device, start)
        invert_for(model, ref, t, fam, opt_x, cfg, gen, trig)
        tried.append(measure_trigger(model, ref, trig, t, fam, hold_x, *shares_t, cfg.bf16_on, student))
    if len(tried) == 1:
        return tried[0]
    own, (top_ev, trig) = _best_search(tried, known, fam, cfg.trigger_score)
    per_start = {f"{start}_start_{key}_{fam}": ev[f"{key}_{fam}"]
                 for start, (ev, _) in zip(starts, tried, strict=True) for key in START_KEYS if f"{key}_{fam}" in ev}
    return {**top_ev, **per_start, **{f"{start}_start_{fam}": v for start, v in zip(starts, own, strict=True)}}, trig


def _best_search(searches: Sequence[tuple[dict[str, float], Trigger]], known: dict[str, float], fam: str,
                 trigger_score: str) -> tuple[list[float], tuple[dict[str, float], Trigger]]:
    """Each measured search's own ``family_value`` (read with the class's evidence so far, ``known``) and the
    search whose value is highest (the first of equals)."""
    own = [family_value({**known, **ev}, fam, trigger_score) for ev, _ in searches]
    return own, searches[max(range(len(searches)), key=own.__getitem__)]


def measure_trigger(model: PromptedCLIP, ref: ReferenceModel, trig: Trigger, t: int, fam: str, hold_x: torch.Tensor,
                    natural: float, twin_natural: float, bf16: bool, student: StudentModel | None = None
                    ) -> tuple[dict[str, float], Trigger]:
    """What ``trig`` does to class ``t`` on the held-out images, as evidence keys of family ``fam``; ``natural``
    and ``twin_natural`` are the class's clean shares in the suspect and the twin; with a ``student``, what it
    does to the student too (the same encoder pass)."""
    heads: tuple[LogitHead, ...] = (ref,) if student is None else (ref, student)
    zt_sus, zt_ref, *zt_stu = panel_logits(model, heads, trig, hold_x, bf16)  # 2 or 3 x (N, C)
    s_sus, s_ref = shares(zt_sus), shares(zt_ref)
    # what the trigger does to the suspect beyond what it does to its clean twin
    gain = trigger_gain(float(s_sus[t]), float(s_ref[t]), natural, twin_natural)
    # the same trigger's margins at t (10th pct, median): they keep growing where the shares saturate
    m_sus = margin_quantiles(class_margins(zt_sus)[:, t:t + 1])[:, 0]  # (2,)
    m_ref = margin_quantiles(class_margins(zt_ref)[:, t:t + 1])[:, 0]  # (2,)
    ev = {f"asr_{fam}": float(s_sus[t]), f"ref_asr_{fam}": float(s_ref[t]),
          f"size_{fam}": float(trig.size().detach()), f"gain_{fam}": gain, f"margin10_{fam}": float(m_sus[0]),
          f"margin_{fam}": float(m_sus[1]), f"ref_margin_{fam}": float(m_ref[1])}
    if zt_stu:
        ev[f"stu_asr_{fam}"] = float(shares(zt_stu[0])[t])
        ev[f"stu_margin_{fam}"] = float(margin_quantiles(class_margins(zt_stu[0])[:, t:t + 1])[1, 0])
    return ev, trig


def run_ci_plain(model: PromptedCLIP, pool: torch.Tensor, cfg: DetectorConfig, seed: int,
                 progress: Progress | None = None) -> DetectionResult:
    """The paper's plain protocol: a targeted inversion for every class and trigger family (one epoch
    each); per-class score = best ASR gain over the class's natural share; anomaly index over classes."""
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    opt_x, hold_x = split_pool(pool, cfg)
    size = pool.shape[-1]
    C = model.n_cls
    sched = InversionSchedule(cfg.batch_size, cfg.epochs, cfg.lr, cfg.bf16_on)
    evidence: dict[int, dict[str, float]] = {k: {} for k in range(C)}
    best = _BestTriggers(torch.full((C,), -1.0, dtype=torch.float64))  # as in ``run_ci``
    with frozen_learner(model):
        natural = class_shares(model, None, hold_x, cfg.bf16_on)  # (C,)
        for t in range(C):
            for fam in cfg.families:
                trig = make_trigger(fam, size, cfg, gen, pool.device)
                optimise(model, trig, opt_x, margin_loss(t, cfg.kappa), sched, gen, _size_weight(fam, cfg))
                asr = float(class_shares(model, trig, hold_x, cfg.bf16_on)[t])
                evidence[t][f"asr_{fam}"] = asr
                evidence[t][f"size_{fam}"] = float(trig.size().detach())
                best.offer(t, asr - float(natural[t]), trig)
            if progress is not None:
                progress("invert", t + 1, C)
    return _decide_plain(model, cfg, best, natural, evidence, seed, start)


def _decide_ci(model: PromptedCLIP, cfg: DetectorConfig, best: _BestTriggers, natural: torch.Tensor,
               evidence: dict[int, dict[str, float]], seed: int, start: float, excess: torch.Tensor,
               drift_anomaly: torch.Tensor, believed: MarginDormancy | None = None) -> DetectionResult:
    """CI's decision (``ci_verdict``) and its reason. ``excess`` (C,): the suspect's clean-image share minus
    that of plain zero-shot prompts; ``drift_anomaly`` (C,); ``believed``: the logit dormancy check, when on."""
    score = best.score
    thr = cfg.decision_threshold
    v = ci_verdict(score, excess, drift_anomaly, thr, cfg.dormant_margin, confirmed_mask(evidence), believed)
    top, awake = v.trigger_class, v.awake_class
    name = model.classnames[top]
    values = _gains_text(evidence[top], cfg.trigger_score)
    if v.channel == "trigger":
        reason = (f"reconstructed triggers move held-out clean OOD images into {name!r} beyond what they do to the "
                  f"zero-shot twin ({values}): score {float(score[top]):.3f} > threshold "
                  f"{thr:.3f}; the prompt of {name!r} drifted from plain prompts with anomaly "
                  f"{evidence[top].get('drift_anomaly', float('nan')):.2f}")
    elif v.channel == "awake":
        drifted = bool(v.weighed[awake] != excess[awake])
        reason = (f"not dormant on clean inputs: {model.classnames[awake]!r} takes {float(excess[awake]):.2f} more of "
                  f"the clean OOD images than plain zero-shot prompts give it (margin {cfg.dormant_margin:.2f}"
                  + (f", x{DRIFTED_BAR:.2f} for a prompt that drifted with anomaly {float(drift_anomaly[awake]):.2f})"
                     if drifted else ")"))
    elif v.channel == "believed" and believed is not None and v.target is not None:
        k = v.target
        reason = (f"not dormant on clean inputs: the most drifted prompt, {model.classnames[k]!r} (anomaly "
                  f"{float(drift_anomaly[k]):.2f}), wins clean OOD images by a median margin "
                  f"{evidence[k]['natural_margin']:.2f} against the zero-shot twin's {evidence[k]['twin_margin']:.2f}: "
                  f"lift {float(believed.lift[k]):.2f} > {believed.line:.3f}")
    else:
        reason = (f"no reconstructed trigger works: the best score is {float(score[top]):.3f}, for {name!r} "
                  f"({values}; threshold {thr:.3f}); no class is awake on clean images")
    return _result("ci", model, best, score, natural, evidence, v.flagged, v.target, thr, reason, seed, start)


def _gains_text(ev: dict[str, float], trigger_score: str = "share") -> str:
    """'sticker gain 0.85, patch gain 0.53' from a class's evidence: the shares of held-out images each
    family's trigger moves into it beyond the twin (the score adds ``family_bonus`` x the second best); with the
    margin score each family's margin lift follows its gain ('patch gain 0.53, margin lift 11.20')."""
    parts = [f"{f} gain {ev[f'gain_{f}']:.2f}"
             + (f", margin lift {family_value(ev, f, 'margin'):.2f}" if trigger_score == "margin" else "")
             + (f", median margin {ev[f'margin_{f}']:.2f}"
                if trigger_score in MARGIN_SCORES and f == PATCH_MARGIN_FAMILY else "")
             + (f", twin's {ev[f'ref_margin_{f}']:.2f}"
                if trigger_score == "patch-twin" and f == PATCH_MARGIN_FAMILY else "")
             for f in confirmed_families(ev)]
    return ", ".join(parts) if parts else "not confirmed"


def _decide_plain(model: PromptedCLIP, cfg: DetectorConfig, best: _BestTriggers, natural: torch.Tensor,
                  evidence: dict[int, dict[str, float]], seed: int, start: float) -> DetectionResult:
    """The plain protocol's decision: per-class best gain (C,) -> robust anomaly index; the most anomalous
    class flags the model when it passes the threshold k and its trigger works (``MIN_GAIN``)."""
    score = best.score
    anomalies = anomaly_index(score, floor=cfg.score_floor)
    top = int(torch.argmax(anomalies))
    thr = cfg.decision_threshold
    flagged = bool(anomalies[top] > thr and score[top] >= MIN_GAIN)
    if flagged:
        reason = (f"a reconstructed trigger moves {float(score[top]):.2f} of clean OOD images into "
                  f"{model.classnames[top]!r}: anomaly {float(anomalies[top]):.2f} > threshold {thr:.2f}")
    else:
        reason = (f"no class stands out: highest anomaly {float(anomalies[top]):.2f} (threshold {thr:.2f}), "
                  f"best trigger gain {float(score.max()):.2f} (needs {MIN_GAIN:.2f})")
    return _result("ci-plain", model, best, anomalies, natural, evidence, flagged, top if flagged else None, thr,
                   reason, seed, start)


def _result(detector: str, model: PromptedCLIP, best: _BestTriggers, per_class: torch.Tensor, natural: torch.Tensor,
            evidence: dict[int, dict[str, float]], flagged: bool, target: int | None, threshold: float, reason: str,
            seed: int, start: float) -> DetectionResult:
    """The result both modes share; ``per_class`` (C,) is each class's decision statistic."""
    classes = []
    for k in range(model.n_cls):
        evidence[k].update(natural_share=float(natural[k]), score=float(best.score[k]))
        classes.append(ClassEvidence(k, model.classnames[k], float(per_class[k]), evidence[k]))
    return DetectionResult(
        detector=detector, backdoored=flagged, target_index=target, anomaly_score=float(per_class.max()),
        threshold=threshold, classes=classes, trigger_images=best.images, raw_triggers=best.raw, seed=seed,
        runtime_s=time.perf_counter() - start, reason=reason,
    )
