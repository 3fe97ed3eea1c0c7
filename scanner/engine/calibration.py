"""Fit the decision threshold on clean models for a target false-positive rate."""

from __future__ import annotations

import math
from collections.abc import Sequence


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
