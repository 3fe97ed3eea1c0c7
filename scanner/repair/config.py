"""Repair settings: one frozen dataclass, a comment per field."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from scanner.engine.config import FAMILIES
from scanner.errors import ConfigError

MODES = ("finetune", "reinit")
OOD_LABELS = ("zero-shot", "model", "outlier")


@dataclass(frozen=True)
class RepairConfig:
    """How a backdoored prompt is re-aligned. Defaults were measured on the quick zoo (see README)."""

    # reinit: a fresh context, tuned on the repair set (the encoders are frozen and public, so the delivered prompt is
    # all a provider could plant a backdoor in); finetune: start from the delivered prompt. reinit is the default
    # since session 28: pre-registered and judged on 33 unseen BadNets / Blended models (seed-19 and seed-20 zoos),
    # ASR-ID / ASR-OOD after 0.050 / 0.124 against finetune's 0.060 / 0.152, clean accuracy +0.046 against +0.042,
    # 32 of 33 re-scanned clean both ways (`python benchmarks/repair_modes.py`, docs/preregistrations.md)
    mode: str = "reinit"
    epochs: int = 10  # passes over the repair set (clean images + their triggered and overlaid copies)
    reinit_epochs: int = 25  # passes when mode = "reinit" (a fresh prompt needs the zoo's full schedule)
    lr: float = 2e-3  # peak learning rate (AdamW, warm-up then cosine, as prompt tuning)
    batch_size: int = 32  # images per step
    max_steps: int = 400  # cap on optimiser steps
    max_steps_conditioned: int = 150  # the cap for CoCoOp-like learners (a step encodes batch x classes prompts)
    trigger_copies: int = 2  # copies of every clean image carrying a reconstructed trigger, true label kept
    generic_copies: int = 1  # copies carrying a random generic overlay (patch, blend, noise, warp), true label
    max_shift: int = 6  # random translation (px) of a reconstructed trigger per copy: the real one may sit elsewhere
    ood_images: int = 192  # unlabelled OOD images added to the repair set (pseudo-labelled), with their copies
    # who labels them: "zero-shot" (the trusted twin), "model" (the delivered one) or "outlier": no one, a photo of
    # none of the classes whose prediction is pulled to the uniform distribution (outlier exposure, as its copies')
    ood_labels: str = "zero-shot"
    # pick the OOD images from the whole pool with a per-class quota of ceil(ood_images / classes) of their pseudo-
    # labels (repair/pseudo.py, balanced_pick) instead of its first ood_images: plain prompts have sink classes
    ood_balance: bool = False
    # label no OOD photo (nor its copies) with the suspected target: each takes its labeller's best other class. A
    # photo of none of the classes has no right answer, and the attacker's class is the one answer it must not get:
    # a repaired prompt whose sink for unknown photos is the target sends triggered photos there, trigger or not.
    # The default since session 29: pre-registered, judged on the 22 BadNets / Blended models of the seed-18 p7 zoo,
    # ASR-ID / ASR-OOD after 0.051 / 0.020 against 0.052 / 0.177, clean accuracy +0.036 against +0.041, 22 of 22
    # re-scanned clean both ways (`python benchmarks/repair_modes.py`, docs/preregistrations.md). Outlier photos
    # (ood_labels = "outlier") carry no class, so there is nothing to avoid: it is ignored there
    ood_avoid_target: bool = True
    max_triggers: int = 8  # reconstructed triggers used at most (the suspected target's first)
    min_per_class: int = 2  # fewest labelled images per class a repair accepts
    # a second pass: CI's inversion run against the repaired prompt for the suspected target (needs the OOD
    # images), its triggers stamped like the reconstructed ones (repair/reinvert.py); () skips it. Off: on the
    # quick zoo's three misses (docs/history.md, session 13) patch + blend took shapes/badnets ASR-ID 0.17 -> 0.10 and
    # colours/blended ASR-OOD 0.39 -> 0.26 and left colours/wanet at 0.21, for an inversion per family more
    reinvert_families: tuple[str, ...] = ()
    reinvert_images: int = 1000  # OOD images that inversion uses (its optimisation split: 80 %)
    reinvert_epochs: int = 3  # passes of the second round (capped at half the first's step cap)
    bf16: bool = False  # bfloat16 autocast for the one image-encoder pass and the prompt steps
    # KgCoOp-style pull of the repaired text features to the zero-shot twin's (train.TrainConfig.anchor_weight).
    # Off: it raises clean accuracy but brings the twin's own reading of the trigger with it (docs/history.md, session
    # 15: 6 seed-6 models at 8, CA 0.656 -> 0.696, ASR-ID 0.051 -> 0.198)
    twin_anchor: float = 0.0
    # weight of a cost on sending an image of another class to the suspected target (train.TrainConfig.guard_weight:
    # -log(1 - p_target), on clean, triggered, overlaid and OOD rows alike). What a repair must bring down is the
    # share of non-target images predicted as the target, trigger or not: on hard datasets the target is also where
    # the repaired prompt's own mistakes go. 0 = off. 3 is the default since session 30: pre-registered, judged on
    # the 33 BadNets / Blended / WaNet models of the seed-21 p7 zoo, ASR-ID / ASR-OOD after 0.050 / 0.023 against
    # 0.052 / 0.023, clean accuracy +0.064 against +0.066, 30 of 33 re-scanned clean both ways; on the 23 models whose
    # suspect is the real target, ASR-ID 0.019 -> 0.009 (`python benchmarks/repair_modes.py`, docs/preregistrations.md)
    target_guard: float = 3.0
    # check the guarded class (target_guard, ood_avoid_target) against the labelled images (repair/reference.py): the
    # class whose prompt drifted furthest from a fresh prompt tuned on them replaces the detection's suspect when it
    # stands out further. One more reinit tuning pass (CoOp learners only). Off: its pre-registered test failed on the
    # 33 seed-22 p7 backdoors (ASR-ID / ASR-OOD after 0.030 / 0.059 against 0.028 / 0.036, re-scan clean 27 against
    # 28 of 33; one 4-class model, sizes/badnets, lost its right suspect; docs/preregistrations.md, session 31)
    reference_suspect: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown repair mode {self.mode!r}; expected one of {', '.join(MODES)}")
        for name in ("epochs", "reinit_epochs", "batch_size", "max_steps", "max_steps_conditioned", "max_triggers",
                     "min_per_class", "reinvert_images", "reinvert_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"repair {name} must be >= 1; got {getattr(self, name)}")
        if self.ood_labels not in OOD_LABELS:
            raise ConfigError(f"ood_labels must be one of {', '.join(OOD_LABELS)}; got {self.ood_labels!r}")
        if self.ood_balance and self.ood_labels == "outlier":
            raise ConfigError("ood_balance needs pseudo-labels to balance; outlier photos have none (choose "
                              "ood_labels zero-shot or model)")
        if min(self.trigger_copies, self.generic_copies, self.max_shift, self.ood_images) < 0:
            raise ConfigError("trigger_copies, generic_copies, max_shift and ood_images must be >= 0")
        bad = [f for f in self.reinvert_families if f not in FAMILIES]
        if bad:
            raise ConfigError(f"reinvert_families must be a subset of {', '.join(FAMILIES)}; got {bad}")
        if not self.target_guard >= 0:
            raise ConfigError(f"repair target_guard must be >= 0; got {self.target_guard}")
        if not self.twin_anchor >= 0:
            raise ConfigError(f"repair twin_anchor must be >= 0; got {self.twin_anchor}")
        if not self.lr > 0:
            raise ConfigError(f"repair lr must be > 0; got {self.lr}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able settings (tuples as lists, as JSON reads them back)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
