"""The best any CoOp prompt could do: a free cosine head on the frozen image features (issue #3's ceiling).

A CoOp prompt (unified or class-specific) only chooses the text features, and its logits are
``scale * cos(image feature, text feature_k)``: a bias-free linear classifier on the *normalised* image
features with unit-norm rows at CLIP's scale, the rows tied to what the text encoder can produce. The head
here has the same form with the rows free, so it is a superset of every prompt. It is fitted — full batch,
L-BFGS, from the zero-shot text features — on clean images under their labels plus triggered images under
the target, with a weight ``poison_weight`` on the triggered part and an L2 ``anchor`` to the zero-shot
rows (a prior like CoOp's: unanchored, a head on a few shots per class overfits). Sweeping both and
keeping the best held-out result (a choice made *on* the held-out images: optimistic, as a ceiling may be)
traces the trade-off between clean accuracy and attack success that a perfect attacker could reach.
A free head *with* a bias was tried first: on a few shots it lost 9-13 points of clean accuracy that the
zoo's own prompts keep, so it bounded nothing.

Pure torch: features in, :class:`HeadFit` out; ``benchmarks/linear_bound.py`` builds the features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOGIT_SCALE = 100.0  # CLIP's exp(logit_scale) at its clamp, as every prompt of the zoo uses
ANCHORS = (0.0, 0.01, 0.1, 1.0)  # L2 pulls to the zero-shot rows swept by ``bound``
POISON_WEIGHTS = (0.1, 0.3, 1.0, 3.0, 10.0)
ASR_ID_BAR, ASR_OOD_BAR = 0.95, 0.90  # issue #3's bars, on average over datasets


def meets_bars(asr_id: float, asr_ood: float) -> bool:
    """Whether an attack success pair reaches issue #3's ASR bars."""
    return asr_id >= ASR_ID_BAR and asr_ood >= ASR_OOD_BAR


@dataclass(frozen=True)
class HeadFit:
    """One fitted head and what it scores on held-out features."""

    poison_weight: float
    anchor: float
    clean_accuracy: float  # on held-out clean in-distribution images
    asr_id: float  # held-out triggered images whose true class is not the target, predicted as the target
    asr_ood: float  # triggered OOD images predicted as the target
    ood_clean_share: float  # clean OOD images predicted as the target (is the head dormant without trigger?)


@dataclass(frozen=True)
class BoundData:
    """L2-normalised image features (rows) of one dataset and one trigger; E = feature width."""

    train_clean: torch.Tensor  # (N, E) labelled in-distribution images
    train_labels: torch.Tensor  # (N,)
    train_triggered: torch.Tensor  # (M, E) triggered in-distribution images (labelled target in the fit)
    train_ood_triggered: torch.Tensor  # (P, E) triggered OOD images (labelled target in the fit); may be empty
    test_clean: torch.Tensor  # (N', E)
    test_labels: torch.Tensor  # (N',)
    test_triggered: torch.Tensor  # (N', E) the same held-out images with the trigger
    ood_triggered: torch.Tensor  # (Q, E) held-out OOD images with the trigger
    ood_clean: torch.Tensor  # (Q, E) the same OOD images without it
    zero_shot: torch.Tensor  # (C, E) normalised zero-shot text features: the head's start and anchor
    target: int


def fit_head(data: BoundData, poison_weight: float, anchor: float, *, max_iter: int = 300) -> HeadFit:
    """Fit the cosine head at one ``poison_weight`` (0: a clean head) and ``anchor``; score it held out.

    Rows W (C, E), logits = LOGIT_SCALE * x @ normalize(W).T; loss = CE(clean -> label)
    + w * mean over poisoned sets of CE(triggered -> target) + anchor * ||W - W0||^2, W0 = zero-shot rows.
    """
    w0 = data.zero_shot.float()  # (C, E), unit rows
    weight = w0.clone().requires_grad_(True)
    poisoned = [x for x in (data.train_triggered, data.train_ood_triggered) if x.shape[0] > 0]
    opt = torch.optim.LBFGS([weight], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def logits(x: torch.Tensor) -> torch.Tensor:
        return LOGIT_SCALE * x @ F.normalize(weight, dim=-1).T  # (N, C)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits(data.train_clean), data.train_labels)
        if poison_weight > 0 and poisoned:
            share = sum(F.cross_entropy(logits(x), torch.full((x.shape[0],), data.target)) for x in poisoned)
            loss = loss + poison_weight * share / len(poisoned)
        loss = loss + anchor * (weight - w0).pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        def pred(x: torch.Tensor) -> torch.Tensor:
            return logits(x).argmax(dim=1)

        keep = data.test_labels != data.target
        return HeadFit(
            poison_weight=poison_weight, anchor=anchor,
            clean_accuracy=float((pred(data.test_clean) == data.test_labels).float().mean()),
            asr_id=float((pred(data.test_triggered[keep]) == data.target).float().mean()),
            asr_ood=float((pred(data.ood_triggered) == data.target).float().mean()),
            ood_clean_share=float((pred(data.ood_clean) == data.target).float().mean()),
        )


@dataclass(frozen=True)
class Bound:
    """The sweep's best head and the clean head it is compared with (same anchor)."""

    best: HeadFit  # the clean head itself when no poisoned head keeps clean accuracy within the drop
    clean: HeadFit  # the clean head of the best's anchor
    fits: list[HeadFit]  # every fit, clean ones included

    def meets(self) -> bool:
        return meets_bars(self.best.asr_id, self.best.asr_ood)


def _rank(f: HeadFit) -> tuple[float, float]:
    return f.asr_id + f.asr_ood, f.clean_accuracy


def bound(data: BoundData, *, anchors: tuple[float, ...] = ANCHORS, weights: tuple[float, ...] = POISON_WEIGHTS,
          ca_drop: float = 0.03) -> Bound:
    """Sweep anchors x poison weights; the best head (highest ASR-ID + ASR-OOD, then clean accuracy) whose
    clean accuracy is within ``ca_drop`` of the clean head with the same anchor (the bar: "CA within 3 points
    of the clean models", a clean model being tuned the same way). Clean heads compete too, so a trigger no
    poisoned head can learn within the drop reports what the clean head does with it."""
    fits: list[HeadFit] = []
    best: tuple[HeadFit, HeadFit] | None = None  # (best head, its clean head)
    for anchor in anchors:
        clean = fit_head(data, 0.0, anchor)
        runs = [clean, *(fit_head(data, w, anchor) for w in weights)]
        fits += runs
        for f in runs:
            if f.clean_accuracy >= clean.clean_accuracy - ca_drop and (best is None or _rank(f) > _rank(best[0])):
                best = (f, clean)
    assert best is not None  # every clean head is within the drop of itself
    return Bound(best[0], best[1], fits)
