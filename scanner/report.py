"""One report schema for every output (text, JSON, SARIF, HTML, state DB, webhook, metrics).

``ModelReport`` is the verdict on one model (a checkpoint file or a model directory); ``ScanReport`` is a
run over a path. Everything a user reads is derived from ``ScanReport.to_dict()``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import time
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1


class Verdict(enum.StrEnum):
    CLEAN = "clean"
    BACKDOORED = "backdoored"
    UNSAFE = "unsafe"  # would execute code outside the allow-list to load; never loaded
    ERROR = "error"  # could not be scanned (corrupt, missing backbone, detector failure)
    SKIPPED = "skipped"  # not scanned on purpose (accepted risk, unsupported); never reads as clean

    @property
    def flagged(self) -> bool:
        return self in (Verdict.BACKDOORED, Verdict.UNSAFE)


class ExitCode(enum.IntEnum):
    """Documented exit codes of ``scan-once`` and ``hook`` (2 is click's usage error)."""

    CLEAN = 0
    FLAGGED = 1
    USAGE = 2
    ERROR = 3
    NOTHING_SCANNABLE = 4


@dataclass
class ClassScore:
    """Per-class evidence from the detector."""

    index: int
    name: str
    anomaly_score: float
    # free-form named evidence (asr, margin, trigger_norm, ...), all floats for JSON/SARIF friendliness
    evidence: dict[str, float] = field(default_factory=dict)


@dataclass
class ModelReport:
    path: str
    verdict: Verdict
    adapter: str | None = None
    sha256: str | None = None  # content hash of the model (file, or directory manifest)
    target_class: str | None = None
    target_index: int | None = None
    anomaly_score: float | None = None
    threshold: float | None = None
    class_scores: list[ClassScore] = field(default_factory=list)
    message: str = ""
    category: str | None = None  # error/unsafe category, e.g. "checkpoint", "unsafe", "backbone"
    unsafe_globals: list[str] = field(default_factory=list)
    backbone: str | None = None
    backbone_sha256: str | None = None
    detector: str | None = None
    seed: int | None = None
    ood_sha256: str | None = None
    duration_s: float = 0.0
    # paths (relative to a report dir) of evidence artefacts, e.g. trigger PNGs
    artefacts: dict[str, str] = field(default_factory=dict)
    # what served forward-only encoder work: {"image": "onnx-fp32" | "onnx-int8" | "torch" |
    # "torch-fallback", "text": ..., "<encoder>_fallback_reason": why, "int8_agreement": top-1 agreement}
    accel: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["verdict"] = self.verdict.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelReport:
        d = dict(d)
        d["verdict"] = Verdict(d["verdict"])
        d["class_scores"] = [ClassScore(**c) for c in d.get("class_scores", [])]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class ScanReport:
    root: str
    models: list[ModelReport] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    scanner_version: str = ""

    def counts(self) -> dict[str, int]:
        out = {v.value: 0 for v in Verdict}
        for m in self.models:
            out[m.verdict.value] += 1
        return out

    def exit_code(self) -> ExitCode:
        """0 all scanned clean; 1 any flagged; 3 any error and none flagged; 4 nothing scannable."""
        verdicts = [m.verdict for m in self.models]
        if any(v.flagged for v in verdicts):
            return ExitCode.FLAGGED
        if any(v is Verdict.ERROR for v in verdicts):
            return ExitCode.ERROR
        if not any(v is Verdict.CLEAN for v in verdicts):
            return ExitCode.NOTHING_SCANNABLE
        return ExitCode.CLEAN

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "scanner_version": self.scanner_version,
            "root": self.root,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "summary": {"counts": self.counts(), "exit_code": int(self.exit_code())},
            "models": [m.to_dict() for m in self.models],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScanReport:
        return cls(
            root=d["root"],
            models=[ModelReport.from_dict(m) for m in d.get("models", [])],
            started_at=d.get("started_at", 0.0),
            finished_at=d.get("finished_at"),
            scanner_version=d.get("scanner_version", ""),
        )
