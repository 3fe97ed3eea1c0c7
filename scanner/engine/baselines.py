"""Neural Cleanse and Pixel-Backdoor, adapted to a prompt-tuned CLIP with unlabelled OOD images.

Same pool, same image budget (one epoch per class over the optimisation split) and same decision
interface as CI. Both were designed for ordinary classifiers with in-distribution data; here the
targeted loss is cross-entropy to the candidate class on OOD images.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from scanner.engine.ci import split_pool
from scanner.engine.config import DetectorConfig
from scanner.engine.invert import InversionSchedule, Objective, class_shares, frozen_learner, optimise
from scanner.engine.result import ClassEvidence, DetectionResult
from scanner.engine.scoring import anomaly_index
from scanner.engine.triggers import PatchTrigger, PixelTrigger, Trigger
from scanner.prompting.classifier import PromptedCLIP

Progress = Callable[[str, int, int], None]


def _ce_to(target: int) -> Objective:
    def f(logits: torch.Tensor, trigger: Trigger) -> torch.Tensor:
        return F.cross_entropy(logits, torch.full((logits.shape[0],), target, dtype=torch.long,
                                                  device=logits.device))

    return f


class _AdaptiveWeight:
    """NC's schedule for the size weight: raise it while the trigger already succeeds, lower it otherwise.

    ``observe`` is fed the batch ASR after each step; the weight used at step s is ``self(s)``.
    """

    def __init__(self, init: float, asr_goal: float, up: float = 1.5, down: float = 1.5 ** 1.5) -> None:
        self.w, self.goal, self.up, self.down = init, asr_goal, up, down

    def __call__(self, step: int) -> float:
        return self.w

    def observe(self, asr: float) -> None:
        self.w = self.w * self.up if asr >= self.goal else self.w / self.down


def _per_class(model: PromptedCLIP, pool: torch.Tensor, cfg: DetectorConfig, seed: int, name: str,
               make: Callable[[int, torch.Generator], Trigger], size_of: Callable[[Trigger], float],
               weight0: float, asr_goal: float, progress: Progress | None) -> DetectionResult:
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    opt_x, hold_x = split_pool(pool, cfg)
    C = model.n_cls
    sched = InversionSchedule(cfg.batch_size, cfg.epochs, cfg.lr, cfg.bf16_on)
    sizes = torch.zeros(C)
    asrs = torch.zeros(C)
    images: dict[int, torch.Tensor] = {}
    raw: dict[int, torch.Tensor] = {}
    with frozen_learner(model):
        for t in range(C):
            trig = make(pool.shape[-1], gen).to(pool.device)
            weight = _AdaptiveWeight(weight0, asr_goal)
            ce = _ce_to(t)

            def objective(logits: torch.Tensor, tr: Trigger, t: int = t, w: _AdaptiveWeight = weight,
                          ce: Objective = ce) -> torch.Tensor:
                w.observe(float((logits.detach().argmax(1) == t).float().mean()))
                return ce(logits, tr)

            optimise(model, trig, opt_x, objective, sched, gen, size_weight=weight)
            sizes[t] = size_of(trig)
            asrs[t] = class_shares(model, trig, hold_x, cfg.bf16_on)[t]
            images[t] = trig.image().cpu()
            raw[t] = trig.raw().cpu()
            if progress is not None:
                progress("invert", t + 1, C)
    # Small triggers are suspicious: the anomaly index is taken on the low side of the sizes.
    anomalies = anomaly_index(sizes, high_is_suspicious=False, floor=1e-6)
    top = int(torch.argmax(anomalies))
    flagged = bool(anomalies[top] > cfg.decision_threshold)
    classes = [ClassEvidence(k, model.classnames[k], float(anomalies[k]),
                             {"trigger_size": float(sizes[k]), "asr": float(asrs[k])}) for k in range(C)]
    return DetectionResult(
        detector=name, backdoored=flagged, target_index=top if flagged else None,
        anomaly_score=float(anomalies[top]), threshold=cfg.decision_threshold, classes=classes, trigger_images=images,
        raw_triggers=raw, seed=seed, runtime_s=time.perf_counter() - start,
    )


def run_neural_cleanse(model: PromptedCLIP, pool: torch.Tensor, cfg: DetectorConfig, seed: int,
                       progress: Progress | None = None) -> DetectionResult:
    """Mask + pattern per class; decision on the masks' L1 norms (MAD, low side)."""
    return _per_class(model, pool, cfg, seed, "nc", lambda s, g: PatchTrigger(s, g, init_cover=0.1),
                      lambda tr: float(tr.mask().detach().sum()) if isinstance(tr, PatchTrigger) else 0.0,
                      weight0=1e-3 * 64, asr_goal=0.99, progress=progress)


def run_pixel(model: PromptedCLIP, pool: torch.Tensor, cfg: DetectorConfig, seed: int,
              progress: Progress | None = None) -> DetectionResult:
    """P+ / P- patterns per class; decision on the number of changed pixels (MAD, low side)."""
    return _per_class(model, pool, cfg, seed, "pixel", lambda s, g: PixelTrigger(s, g),
                      lambda tr: float(tr.changed_pixels()) if isinstance(tr, PixelTrigger) else 0.0,
                      weight0=1e-2, asr_goal=0.9, progress=progress)
