"""Detector settings: one frozen dataclass, a comment per field."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from scanner.errors import ConfigError

DETECTORS = ("ci", "ci-plain", "nc", "pixel")
# what CI confirms its candidate classes with unless told otherwise. Session 6 probes at the most drifted class
# of the full zoo's 50 CoOp models: a sticker reached BadNets targets and a soft patch Blended ones; warps never
# confirmed a WaNet target (the dormancy check finds those) and a blend never beat the patch. The default
# "patch-margin" score reads the patch alone (``DetectorConfig.search_all_families``)
DEFAULT_FAMILIES = ("sticker", "patch")
FAMILIES = ("additive", "patch", "sticker", "blend", "warp")  # trigger families the detectors can search
# the decision threshold of each detector when none is set: CI flags a confirmed class score above it (its best
# trigger family's gain, a share of held-out images, plus half the next family's), the others a robust anomaly
# index above k = 2 (the published default). CI's is `scanner calibrate runs/zoo_seed1 runs/zoo_seed2
# runs/zoo_seed3 demo-out/zoo --dormant-margin 0.73 --fpr 0.05` on the 68 clean models of the seed-1, -2, -3 and
# quick zoos (session 11; written rounded up: a clean model sits on the fitted line and flagging is "above").
# The dormant margin stays at session 7's 0.73 (below): these zoos hold no WaNet, and fitting the margin on them
# moves it to 0.98, past the WaNet prompts it is there for. A threshold fitted on one zoo does not hold on
# another (session 7: fitted on the seed-0 zoo's 24 clean models it was 0.715, and 7 of seed 1's 22 scored above)
DEFAULT_THRESHOLDS = {"ci": 0.985001, "ci-plain": 2.0, "nc": 2.0, "pixel": 2.0}
# CI's threshold when a confirmed class is scored by its triggers' margin lifts (``trigger_score = "margin"``,
# logit units): the line `fit_ci_lines(rows, fpr=0.05, margin=0.73)` fits on the 44 clean models of the seed-6 and
# seed-7 zoos (session 16; rounded up). Pre-registered, then judged on a seed-8 zoo it had not seen: accuracy 0.705
# at FPR 0.045 (TPR 0.455), against the share default's 0.795 at FPR 0.091, so share stays the default
MARGIN_THRESHOLD = 12.7069
# CI's threshold under its default score, the median logit margin a candidate's reconstructed patch trigger gives
# it on the held-out images (``trigger_score = "patch-margin"``, logit units), with the dormant margin 0.89 below:
# `scanner calibrate runs/s17/zoo_p7_seed7 runs/s17/zoo_p7_seed8 runs/s18/zoo_p7_seed9 --trigger-score patch-margin
# --fpr 0.05` (both channels) on their 66 clean models (session 18, bundled CLIP p7). The same procedure on the
# seed-7/8 zoos alone (6.125, margin 0.885) was pre-registered and judged on the seed-9 zoo before it was seen:
# accuracy 0.886, TPR 0.818, FPR 0.045 (1 of 22), target right 1.000, AUROC 0.944 (share's lines: 0.841 / 0.773
# / 0.091, AUROC 0.889)
PATCH_MARGIN_THRESHOLD = 5.96875
# CI's patch-margin threshold when the patch search starts from both the soft mask and the grid of squares
# (``patch_start = "both"``): `python benchmarks/patch_starts_cv.py --fit` on the seed-14 and seed-15 p7 zoos' runs
# of both starts (44 clean models, FPR 0.05, dormant margin 0.89; session 24, pre-registered as rule B). The same
# fit puts the soft start's line at 5.28125, under the soft start's 5.96875: compare starts at lines of one fit.
# The default line since session 25 (``DetectorConfig.patch_start``)
BOTH_STARTS_THRESHOLD = 6.09375
# "patch-twin": the patch trigger's median margin in the suspect less TWIN_MARGIN_WEIGHT x the twin's median margin
# for the class under the same trigger (``family_value``): how much more the suspect believes the class than plain
# prompts do. Session 23, found on the saved rows of the p7 zoos of seeds 10-14 (220 models), leave-one-zoo-out
# with the dormancy channel off (`python benchmarks/twin_margin_cv.py`): held-out accuracy 0.900 at weight 1
# against 0.845 at weight 0 (the patch margin alone). Its line is the fit on those zoos' 110 clean models at FPR
# 0.05, rounded up to 1/32, with the dormancy channel off. Pre-registered and judged on a new p7 zoo with WaNet
# (seed 15, 55 models): accuracy 0.673 against the default's 0.745 (FPR 0.000 vs 0.045, AUROC 0.840 vs 0.793): it
# ranks better, but its line, fitted on the other five zoos, was too high there; so it is not the default
# (docs/preregistrations.md)
PATCH_TWIN_THRESHOLD = 7.375
# ``DetectorConfig.dormant_lift`` of rule D: `python benchmarks/logit_dormancy.py --fit runs/s25/eval_seed17.json`, the
# largest lift of the seed-17 zoo's 11 clean CoOp models (FPR 0.05 lets none above), rounded up to 1/32 (session 26).
# Pre-registered and judged on two new zoos (docs/preregistrations.md). Seed 18: accuracy 0.855 against the default's
# 0.800 (FPR 0.091 vs 0.045): passed, and D was the default in session 26. Seed 19: 0.764 against 0.745 but FPR 0.136
# vs 0.045 (clean lifts reached 4.37 and 1.94): failed, so it is off again (session 27). The line does not travel
# between zoos; it is kept as the value `zoo eval --dormant-lift` and the option were judged at.
DORMANT_LIFT_LINE = -0.875
TWIN_MARGIN_WEIGHT = 1.0
TRIGGER_SCORES = ("share", "margin", "patch-margin", "patch-twin", "patch-student")
# scores read from the patch trigger's median margin
MARGIN_SCORES = ("patch-margin", "patch-twin", "patch-student")
DORMANCY_OFF = 1.0  # a dormant margin this high switches CI's dormancy channel off (``ci_verdict``)
FLAT_ANOMALY = 2.0  # a top ranking anomaly under this names no suspect (DetectorConfig.flat_candidates)
RESTART_RULES = ("mean", "best")  # how DetectorConfig.restarts searches make a candidate's evidence
PATCH_STARTS = ("soft", "grid", "both")  # where CI's patch search starts (DetectorConfig.patch_start)
# the family whose trigger's median margin is the "patch-margin" score (DetectorConfig.trigger_score)
PATCH_MARGIN_FAMILY = "patch"


def scoring_families(families: Sequence[str], trigger_score: str) -> list[str]:
    """Which of a candidate's searched ``families`` make its score (and keep its trigger): all of them, but for
    the patch scores ("patch-margin", "patch-twin") the patch family alone when it was searched (a configuration
    without it scores the best family's median margin; calibrate such a configuration on a zoo before trusting its
    line)."""
    if trigger_score in MARGIN_SCORES and PATCH_MARGIN_FAMILY in families:
        return [PATCH_MARGIN_FAMILY]
    return list(families)


@dataclass(frozen=True)
class DetectorConfig:
    detector: str = "ci"  # ci (drift-ranked candidates + confirm), ci-plain (the paper's per-class loop), nc, pixel
    n_images: int = 1000  # OOD images used (the first n of the pool); the paper's budget
    holdout: float = 0.2  # share of those kept out of optimisation to measure a trigger's ASR
    # images per optimisation step: 16 gives a trigger 50 Adam steps in one epoch of 800 images (32 gave 25, too
    # few to reach BadNets targets that 50 reach: sticker gain 0.39 -> 0.61, patch 0.01 -> 0.98 on letters/badnets)
    batch_size: int = 16
    epochs: int = 1  # passes over the optimisation split per trigger (the paper: a single epoch)
    lr: float = 0.1  # Adam step on trigger parameters
    families: tuple[str, ...] = DEFAULT_FAMILIES  # trigger families CI searches
    eps: float = 6 / 255  # L-inf bound of the additive family (pixel units)
    # largest opacity of the blend family's pattern. At 0.25 a blend paints enough class evidence to move a
    # clean prompt-tuned model (all 12 false positives of the full zoo came from it); at 0.12 a planted
    # blend (the zoo's Blended uses 0.2) still fires: on 33 clean + Blended models FP 12 -> 3, TP 10 -> 9
    blend_alpha: float = 0.12
    sticker: float = 0.1  # side of the sticker family's square, as a share of the image side (6 px at 64)
    warp_px: float = 2.0  # largest displacement (pixels) of the warp family's control points
    patch_weight: float = 2.0  # weight of the patch family's mask area in its loss
    kappa: float = 1.0  # margin (logit units) the targeted objective asks for
    # classes CI confirms with targeted inversion, the most drifted prompts first (engine/drift.py). On the full
    # zoo the second most drifted class added 2 false positives and no detection (a two-candidate run's rows).
    # With both families scored together (family_bonus), three zoos each judged by the others' clean models
    # (`benchmarks/candidates_cv.py`, docs/history.md, session 12): 3 candidates rank models better (AUROC 0.762 ->
    # 0.864) at the same accuracy (0.765) and FPR 0.045 -> 0.061, and cost 2.4x (45 s for a 10-class model on 2 cores,
    # past the 30 s bar): 1 stays the default, `candidates = 3` buys the ranking
    candidates: int = 1
    # when no class's prompt stands out (the top drift anomaly, or reach anomaly for image-conditioned learners, is
    # under FLAT_ANOMALY: the published MAD cut), the ranking names no suspect, so confirm this many classes instead
    # (0: off). Session 22, p7 zoos of seeds 10-13 on a GPU: 11 of the 17 backdoors missed by the default were
    # ranking misses, 7 of them on such flat models; 7 of the 8 real-digits backdoors were ranking misses (CoOp
    # moves every class's prompt on real photos, so drift names none), 5 of them flat. K = 5, pre-registered at the
    # shipped line and judged on the seed-14 zoo: 0.932 against the default's 0.955 (all 7 flat models there were
    # clean, and one gained a natural trigger over the line), so it stays off (docs/preregistrations.md)
    flat_candidates: int = 0
    # also confirm the class that takes the largest share of clean OOD images beyond plain zero-shot prompts (the
    # dormancy channel's class, unweighed), when it is not among the drift candidates. A Blended prompt that half
    # fires on clean photos can drift less than clean classes do: on the seed-10 p7 zoo polygons/blended and
    # digits/blended (target drift rank 3 and 2) sent 0.43 / 0.56 of clean OOD images to their target, the most
    # of any class. Costs one more candidate's search when that class is not the most drifted. Off: pre-registered
    # with the patch searched alone and its own line (docs/preregistrations.md), it scored 0.750 on the seed-12
    # zoo against the default's 0.818 (FPR 0.045 both): it found one more target, but its patch draws scored lower
    awake_candidate: bool = False
    # image-conditioned learners (CoCoOp): rank candidates by universal reach over the twin's
    # (engine/reach.py) instead of prompt drift, and confirm with these families besides ``families``. Drift named
    # the BadCLIP target first in 0 of 13 models, reach in 4; BadCLIP's trigger is a full-image additive one.
    # Pre-registered test (session 13, docs/history.md): a new BadCLIP zoo 1 of 11 flagged with the true target
    # against 0, the 22 clean CoCoOp models of seeds 1-2 0 flagged as before (highest scores 0.94 / 0.89, were
    # 0.83 / 0.62)
    conditioned_reach: bool = True
    conditioned_families: tuple[str, ...] = ("additive",)
    # a confirmed class's score: its best trigger family's gain plus this share of the next best family's (when
    # positive). A planted patch trigger answers to both a sticker and a soft patch; a clean class's natural
    # trigger mostly to one (clean models: soft patch gain up to 0.97 with the sticker near 0; BadNets targets
    # 0.74-0.86 with both). `python benchmarks/family_rules_cv.py` on saved rows: see its docstring. 0 scores
    # the best family alone
    family_bonus: float = 0.5
    # what a trigger family's value is, from which ``family_bonus`` scores a confirmed class. "share": its gain,
    # the share of held-out images it moves into the class beyond the twin (saturates at 1.0: a natural trigger
    # that barely tips 0.95 of photos reads like a planted one). "margin": how far it lifts the median logit
    # margin of the class over the held-out images beyond what it does on the twin (logit units; keeps growing
    # where shares stop). Session 16, seeds 6-8 (132 models): AUROC 0.732 (share) -> 0.795 (margin), and with
    # lines fitted on two zoos' clean models the third is judged at accuracy 0.629 (share) / 0.727 (margin), FPR
    # 0.061 both (`python benchmarks/margin_score.py`). Not the default: share's shipped line, fitted on 68 clean
    # models of four older zoos, did better on the pre-registered seed-8 test (0.795 at FPR 0.091 vs 0.705 at
    # 0.045). The 10th-percentile lift without the twin, pre-registered first, did not hold its line on seed 7.
    # "patch-margin" (the default since session 18): the candidate's median margin under its reconstructed patch
    # trigger alone, no lift, no twin. A planted trigger was trained to win by a wide margin; a clean prompt's
    # natural trigger tips 0.98 of photos as a planted one does (its share saturates) but by a smaller margin.
    # Found on the p7 zoos of seeds 7/8 (AUROC 0.938 against share's 0.921; on p6's zoos 0.726 / 0.733: no gain
    # there), held on seed 9 (see PATCH_MARGIN_THRESHOLD)
    trigger_score: str = "patch-margin"
    # search every family of ``families_for``, also those the score does not read: under "patch-margin" the sticker
    # (and CoCoOp's additive family) are optimised and recorded but never scored. False searches the scored ones
    # alone (the patch: 9.1 s instead of 14.3 s for a 10-class model, `benchmarks/detect_speed.py`), but keep the
    # default until the line is refitted: a seed gives every model the same random draws, the sticker's search
    # moves which draws the patch gets, and one model's patch margin spreads widely over draws (session 20,
    # seed-10 zoo: 4.6 to 12.5 over four seeds on polygons/badnets). The shipped line was fitted on the draws that
    # follow the sticker; with the patch alone the seed-10 zoo scored 1.5 lower on average and CI's accuracy fell
    # from 0.818 to 0.705
    search_all_families: bool = True
    # how many times each scored family's trigger is searched for a candidate, from fresh random draws; its
    # evidence (shares, gain, margins) is the mean over the searches. One search's patch margin spreads widely over
    # draws (above); independent draws would spread 1/sqrt(R) as much (not yet measured:
    # `benchmarks/search_spread.py --restarts`). The shipped line was fitted at 1: refit it (`scanner calibrate`)
    # before trusting another count
    restarts: int = 1
    # how the restarts make the evidence: "mean" (above), or "best": the restart whose trigger scores highest, all
    # its evidence. Session 21 (`benchmarks/draw_probe.py`, 6 models x 4 seeds, patch alone): a clean class's natural
    # trigger is found at every draw (counts/clean-0 2.95-3.66), a planted one is missed at some (positions/badnets
    # 3.34-8.62), so the best of several draws may separate better than their mean. Session 22 (GPU, p7 zoos of
    # seeds 10-13, `benchmarks/restarts_cv.py`): with every family searched, the best of 2-4 patch searches holds
    # out at 0.852-0.858 against one search's 0.847; the pre-registered best of 2 (line 6.59375) beat the default on
    # seed 13 (0.818 vs 0.795) but at FPR 0.182, over the bar, so it is not the default (docs/preregistrations.md)
    restart_rule: str = "mean"
    # where CI's patch search starts: "soft", a mask of 5% opacity everywhere (with a little noise), or "grid", nine
    # opaque squares of the sticker's side, one in each ninth of the image (``grid_mask_logits``). In one epoch the
    # soft mask stays diffuse and does not settle on a small planted patch: session 23 (`python
    # benchmarks/real_trigger_probe.py`), the seed-10 digits BadNets target scored 3.72 / 2.88 from the soft start,
    # 8.44 / 11.88 from the grid, 9.17 / 9.48 from the real trigger itself. Pre-registered at the shipped lines and
    # judged on the p7 seed-15 zoo: 0.709 against the soft start's 0.745 (FPR 0.045 both): the grid lifts planted
    # patches (counts/badnets 4.91 -> 17.12) and loses whole-image blends (letters/blended 9.36 -> 4.62). "both"
    # (the default since session 25) searches from each start with the same draws and keeps the better
    # (``patch_starts``): one more patch search per candidate, and what saved soft and grid runs of one zoo decide
    # exactly when combined (``benchmarks/patch_starts_cv.py``). Pre-registered as rule B at its own line
    # (BOTH_STARTS_THRESHOLD) and judged against the soft start at 5.96875 on two new zoos: seed 16 0.782 vs 0.764,
    # seed 17 0.764 vs 0.709, FPR 0.091 vs 0.136 (docs/preregistrations.md)
    patch_start: str = "both"
    max_shift: int = 6  # random translation (px) applied after the trigger: adversarial patterns do not survive it
    distil_twin: bool = True  # add to CI's twin a zero-shot head fitted to the suspect on clean OOD images
    # Adam steps of the distilled student (engine/student.py: fresh class-specific prompts tuned to agree with the
    # suspect on the clean optimisation split); 0: no student. With one, every measured trigger also records what it
    # does to the student (``stu_asr_<family>``, ``stu_margin_<family>``), and "patch-student" scores by it. The
    # searches draw the same numbers either way: the student has its own generator
    student_steps: int = 0
    student_lr: float = 3e-3  # the student's Adam step
    reference_weight: float = 1.0  # weight of "keep the zero-shot twin unmoved" in CI's objectives
    threshold: float | None = None  # None = DEFAULT_THRESHOLDS[detector]; `scanner calibrate` fits it
    score_floor: float = 0.05  # lower bound on the MAD denominator (score units) so ties are not anomalies
    # CI also flags a prompt that is not dormant on clean inputs: one class takes this much more of the clean
    # OOD hold-out than plain zero-shot prompts give it (share minus share), weighed by `awake_excess`. Fitted
    # with PATCH_MARGIN_THRESHOLD on 66 clean models of the p7 backbone (session 18; on p7 clean CSC prompts
    # reach 0.78-0.95). It was 0.73 on p6, fitted on session 7's zoos, where WaNet prompts sent 0.82-0.99 of OOD
    # photos to their target; p7's quick-zoo WaNet prompts reach 0.35-0.40, under either. 1.0 switches it off.
    dormant_margin: float = 0.89
    # the logit form of the dormancy check, for drift-ranked learners (CoOp): flag the most drifted prompt when its
    # median margin on the clean OOD hold-out exceeds the twin's by more than this (logit units; None or inf: off).
    # A WaNet or Blended prompt that half fires on clean photos sends them to a class plain prompts also like, so
    # its share excess stays small, but it wins them by a wider margin than the twin does. Seed 17 (post hoc): every
    # clean CoOp model at most -0.88, 7 of 22 WaNet/Blended above. Rule D (DORMANT_LIFT_LINE) passed its first
    # registered test and failed its second (clean lifts of another zoo reached 4.37), so it is off by default.
    # `scanner calibrate` keeps the line this default sets (none now); the clean models it flags spend the budget first
    dormant_lift: float | None = None
    # bfloat16 autocast for encoder passes; None (the default since session 26): where the device computes it
    # natively (AMX/AVX512-BF16 CPUs, CUDA GPUs that support it), fp32 elsewhere, where emulated bf16 ran 3x slower than
    # fp32 (``engine.invert.native_bf16``). Resolved by ``on`` when a detection starts. The lines were fitted under
    # bf16; fp32 gave the same verdict on 22 of 22 seed-17 CSC models (scores within the spread of one search's
    # draws: -0.67 to +1.61, mean +0.02; the clean margin lifts within 0.05): `python benchmarks/paired_runs.py
    # runs/s26/fp32_seed17_part.json runs/s25/eval_seed17.json runs/s26/fp32_seed17_part2.json
    # runs/s25/eval_seed17.json` (the fp32 runs: `scanner zoo eval ... --precision fp32 --patch-start soft`)
    bf16: bool | None = None

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise ConfigError(f"unknown detector {self.detector!r}; expected one of {', '.join(DETECTORS)}")
        if not 0.05 <= self.holdout <= 0.5:
            raise ConfigError(f"holdout must be within [0.05, 0.5]; got {self.holdout}")
        if self.batch_size < 1 or self.epochs < 1 or self.n_images < 2:
            raise ConfigError("batch_size, epochs must be >= 1 and n_images >= 2")
        bad = [f for f in self.families if f not in FAMILIES]
        if bad or not self.families:
            raise ConfigError(f"families must be a non-empty subset of {FAMILIES}; got {self.families}")
        if not 0.0 < self.dormant_margin <= 1.0:
            raise ConfigError(f"dormant_margin must be in (0, 1] (1 switches the check off); got {self.dormant_margin}")
        if not 0.0 <= self.family_bonus <= 1.0:
            raise ConfigError(f"family_bonus must be in [0, 1] (0 scores the best trigger family alone); got "
                              f"{self.family_bonus}")
        bad = [f for f in self.conditioned_families if f not in FAMILIES]
        if bad:
            raise ConfigError(f"conditioned_families must be a subset of {FAMILIES}; got {self.conditioned_families}")
        if self.trigger_score not in TRIGGER_SCORES:
            raise ConfigError(f"trigger_score must be one of {', '.join(TRIGGER_SCORES)}; got {self.trigger_score!r}")
        if not self.kappa > 0:
            raise ConfigError(f"kappa must be > 0 (the logit margin a trigger search asks for); got {self.kappa}")
        if self.restart_rule not in RESTART_RULES:
            raise ConfigError(f"restart_rule must be one of {', '.join(RESTART_RULES)}; got {self.restart_rule!r}")
        if self.restarts < 1:
            raise ConfigError(f"restarts must be >= 1; got {self.restarts}")
        if self.candidates < 1:
            raise ConfigError(f"candidates must be >= 1; got {self.candidates}")
        if self.patch_start not in PATCH_STARTS:
            raise ConfigError(f"patch_start must be one of {', '.join(PATCH_STARTS)}; got {self.patch_start!r}")
        lift = self.dormant_lift
        if lift is not None and (isinstance(lift, bool) or not isinstance(lift, (int, float)) or lift != lift):
            raise ConfigError(f"dormant_lift must be a number (logit units; inf switches the check off); got {lift!r}")
        if self.student_steps < 0 or not self.student_lr > 0:
            raise ConfigError(f"student_steps must be >= 0 (0: no student) and student_lr > 0; got "
                              f"{self.student_steps}, {self.student_lr}")
        if self.trigger_score == "patch-student" and not self.student_steps:
            raise ConfigError("trigger_score 'patch-student' reads the distilled student: set student_steps > 0 "
                              "(zoo eval --student-steps N)")
        if self.flat_candidates < 0:
            raise ConfigError(f"flat_candidates must be >= 0 (0 switches it off); got {self.flat_candidates}")

    @property
    def bf16_on(self) -> bool:
        """Whether encoder passes run under bf16 autocast (``bf16`` None, not yet resolved by ``on``: fp32)."""
        return bool(self.bf16)

    def on(self, device: object) -> DetectorConfig:
        """These settings for work on ``device`` (a torch device or its name): ``bf16`` None becomes whether the
        device computes bfloat16 natively."""
        if self.bf16 is not None:
            return self
        from scanner.engine.invert import native_bf16  # invert imports torch; this module does not

        return replace(self, bf16=native_bf16(str(device)))

    def families_for(self, image_conditioned: bool) -> tuple[str, ...]:
        """The trigger families CI confirms with for a learner of that kind (``families`` first)."""
        extra = self.conditioned_families if image_conditioned else ()
        return (*self.families, *(f for f in extra if f not in self.families))

    def search_families(self, image_conditioned: bool) -> tuple[str, ...]:
        """The trigger families CI optimises for a learner of that kind: ``families_for``, less the ones its
        score never reads unless ``search_all_families`` (under "patch-margin": the patch alone, when searched)."""
        families = self.families_for(image_conditioned)
        return families if self.search_all_families else tuple(scoring_families(families, self.trigger_score))

    @property
    def decision_threshold(self) -> float:
        """The threshold in force: the configured one, else this detector's default."""
        if self.threshold is not None:
            return self.threshold
        if self.detector == "ci" and self.trigger_score == "margin":
            return MARGIN_THRESHOLD
        if self.detector == "ci" and self.trigger_score in ("patch-margin", "patch-student"):
            # patch-student scores a natural trigger by its lead over the student, any other by its patch margin
            # (``ci._margin_value``): the same line
            return BOTH_STARTS_THRESHOLD if self.patch_start == "both" else PATCH_MARGIN_THRESHOLD
        if self.detector == "ci" and self.trigger_score == "patch-twin":
            return PATCH_TWIN_THRESHOLD
        return DEFAULT_THRESHOLDS[self.detector]
