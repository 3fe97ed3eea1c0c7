"""What a detector returns: a verdict, a suspected target and the per-class evidence behind it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ClassEvidence:
    """Evidence for one candidate target class."""

    index: int
    name: str
    # this class's decision statistic (higher = more suspicious): for CI the gain of its confirmed trigger (-1 when
    # not a candidate), for the other detectors its robust anomaly index among all classes
    anomaly_score: float
    # named measurements, e.g. asr (held-out OOD attack success of the reconstructed trigger), margin, norm
    evidence: dict[str, float] = field(default_factory=dict)


@dataclass
class DetectionResult:
    detector: str  # "ci", "ci-plain", "nc", "pixel"
    backdoored: bool
    target_index: int | None  # suspected target class (None when clean)
    anomaly_score: float  # the decisive score (max over classes)
    threshold: float
    classes: list[ClassEvidence]
    # reconstructed trigger per class index: an image-space tensor (3, S, S) in [0, 1] suitable for a PNG
    # (for additive triggers: 0.5 + delta scaled for visibility; the raw tensor is in ``raw_triggers``)
    trigger_images: dict[int, torch.Tensor] = field(default_factory=dict)
    # the same triggers in re-applicable raw form (C, S, S): C = 2 warp, 3 additive, 4 patch/blend;
    # ``scanner.engine.triggers.apply_raw(raw, images)`` stamps one on new images (repair uses them)
    raw_triggers: dict[int, torch.Tensor] = field(default_factory=dict)
    seed: int = 0
    runtime_s: float = 0.0
    reason: str = ""  # why the model was flagged (or not), in words, for reports
    ood_sha256: str = ""
    backbone_sha256: str = ""

    @property
    def trigger_forms(self) -> dict[int, str]:
        """Per class with a raw trigger, how it is applied: ``"warp"``, ``"additive"`` or ``"patch"``."""
        from scanner.engine.triggers import raw_form

        return {k: raw_form(v) for k, v in self.raw_triggers.items()}

    @property
    def target_name(self) -> str | None:
        if self.target_index is None:
            return None
        return self.classes[self.target_index].name
