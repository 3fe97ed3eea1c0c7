"""Robust anomaly scores over classes (Neural Cleanse's MAD anomaly index)."""

from __future__ import annotations

import torch

MAD_CONSISTENCY = 1.4826  # makes the MAD a consistent estimator of the std for normal data


def anomaly_index(values: torch.Tensor, *, high_is_suspicious: bool = True, floor: float = 0.0) -> torch.Tensor:
    """(x - median) / (1.4826 * MAD), signed so that larger = more suspicious. values: (C,).

    ``floor`` bounds the denominator from below: when nearly all classes score the same the MAD
    collapses to 0 and any tiny difference would look infinitely anomalous.
    """
    v = values.double()
    med = v.median()
    mad = (v - med).abs().median() * MAD_CONSISTENCY
    denom = torch.clamp(mad, min=max(floor, 1e-12))
    dev = (v - med) if high_is_suspicious else (med - v)
    return (dev / denom).float()
