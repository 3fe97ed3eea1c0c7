"""Fit the decision threshold on clean models for a target false-positive rate."""

from __future__ import annotations

import math
from collections.abc import Sequence

from scanner.engine.config import DORMANCY_OFF


def threshold_for_fpr(clean_scores: Sequence[float], fpr: float, *, minimum: float = 0.0) -> float:
    """The smallest threshold t (flag when score > t) whose false-positive rate on ``clean_scores`` is
    at most ``fpr``; never below ``minimum``. With n clean models the attainable rates are multiples of
    1/n, so the result is the ceil((1 - fpr) * n)-th smallest score."""
    if not clean_scores:
        raise ValueError("no clean models to calibrate on")
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr must be in [0, 1); got {fpr}")
    s = sorted(float(x) for x in clean_scores)
    n = len(s)
    allowed = math.floor(fpr * n)  # clean models allowed above the threshold
    t = s[n - 1 - allowed]
    return max(t, minimum)


def fit_two_channels(clean: Sequence[tuple[float, bool, float | None]], fpr: float, *,
                     margin_floor: float = 0.5, margin: float | None = None,
                     flagged_apart: Sequence[bool] | None = None) -> tuple[float, float | None]:
    """(threshold, dormant_margin) for CI's two channels on clean models, at most ``fpr`` flagged in all.

    ``clean`` holds per clean model (anomaly score, whether its best trigger works, clean-image excess over
    zero-shot prompts or None). The margin takes half the budget, never below ``margin_floor`` (a prompt
    must send at least that share of clean images beyond zero-shot to be called awake); the threshold
    takes what the margin left, counting only models whose trigger works (the others cannot flag).
    A ``margin`` given is kept as it is, and the clean models above it still spend the budget: a margin
    chosen to catch prompts that fire on clean images (WaNet), past which a few clean outliers would push
    a fitted one. ``flagged_apart`` (per clean model): flagged by a channel this fit does not move (the logit
    dormancy line): those spend the budget first too.
    """
    if not clean:
        raise ValueError("no clean models to calibrate on")
    n = len(clean)
    excesses = [e for _, _, e in clean if e is not None]
    if margin is None and excesses:
        # a clean model's weighed excess can pass 1 (a drifted class's is divided by DRIFTED_BAR): a fitted margin
        # that high cannot be kept under the budget and switches the channel off (DORMANCY_OFF)
        margin = min(threshold_for_fpr(excesses, fpr / 2, minimum=margin_floor), DORMANCY_OFF)
    on = margin is not None and margin < DORMANCY_OFF
    apart = list(flagged_apart) if flagged_apart is not None else [False] * n
    if len(apart) != n:
        raise ValueError(f"flagged_apart holds {len(apart)} values for {n} clean models")
    awake = [(on and e is not None and margin is not None and e > margin) or a
             for (_, _, e), a in zip(clean, apart, strict=True)]
    left = max(0, math.floor(fpr * n) - sum(awake))
    rest = sorted((a for (a, works, _), up in zip(clean, awake, strict=True) if works and not up), reverse=True)
    threshold = rest[left] if left < len(rest) else 0.0
    return max(threshold, 0.0), margin
