"""A detection saved to disk, so a repair can reuse it instead of running the detector again.

One ``.safetensors`` file (never a pickle): the raw reconstructed triggers as tensors ``raw.<class>``
and string metadata — format name and version, the scanned model's content hash (a saved detection
only applies to the exact model it was made on), verdict, suspected target, per-class anomaly scores
and class names, detector, threshold, seed and OOD-pool hash. ``scanner scan-once --report-dir`` writes
one per model (artefact ``detection``); ``scanner repair --save-detection`` writes the one it ran.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from scanner.engine.result import DetectionResult
from scanner.engine.triggers import raw_form
from scanner.errors import CheckpointError

FORMAT_NAME = "scanner-detection"
FORMAT_VERSION = 1
FILE_NAME = "detection.safetensors"
_MAX_BYTES = 64 * 1024 * 1024


@dataclass
class SavedDetection:
    """What a repair needs from a detection."""

    model_sha256: str
    detector: str
    backdoored: bool
    target_index: int | None
    anomaly_scores: list[float]  # per class index
    classnames: list[str]
    raw_triggers: dict[int, torch.Tensor]  # class index -> raw trigger (C, S, S), see engine.triggers.apply_raw
    threshold: float = 0.0
    anomaly_score: float = 0.0
    seed: int = 0
    ood_sha256: str = ""
    source: str = "detected"  # "detected" (run now) or the path it was read from
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_result(cls, result: DetectionResult, model_sha256: str) -> SavedDetection:
        return cls(
            model_sha256=model_sha256, detector=result.detector, backdoored=result.backdoored,
            target_index=result.target_index, anomaly_scores=[float(c.anomaly_score) for c in result.classes],
            classnames=[c.name for c in result.classes],
            raw_triggers={int(k): v.detach().float().cpu() for k, v in result.raw_triggers.items()},
            threshold=float(result.threshold), anomaly_score=float(result.anomaly_score), seed=result.seed,
            ood_sha256=result.ood_sha256,
        )

    def suspects(self) -> list[int]:
        """Classes with a raw trigger: the flagged target first, then by anomaly score (highest first)."""
        order = sorted(self.raw_triggers, key=lambda k: -self.anomaly_scores[k] if k < len(self.anomaly_scores)
                       else 0.0)
        if self.target_index is not None and self.target_index in order:
            order.remove(self.target_index)
            order.insert(0, self.target_index)
        return order


def save_detection(det: SavedDetection, path: Path) -> Path:
    """Write ``det`` as one safetensors file (atomically); returns ``path``."""
    from safetensors.torch import save_file

    from scanner.prompting.checkpoints import atomic_write

    path = Path(path)
    tensors = {f"raw.{k}": v.detach().float().cpu().contiguous() for k, v in det.raw_triggers.items()}
    meta = {
        "format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "model_sha256": det.model_sha256,
        "detector": det.detector, "backdoored": json.dumps(det.backdoored),
        "target_index": json.dumps(det.target_index), "anomaly_scores": json.dumps(det.anomaly_scores),
        "classnames": json.dumps(det.classnames), "threshold": json.dumps(det.threshold),
        "anomaly_score": json.dumps(det.anomaly_score), "seed": json.dumps(det.seed), "ood_sha256": det.ood_sha256,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


def load_detection(path: Path) -> SavedDetection:
    """Read a saved detection (safe: safetensors only); CheckpointError when it is not one."""
    from scanner.safeload import safe_load_safetensors

    path = Path(path)
    tensors, meta = safe_load_safetensors(path, max_bytes=_MAX_BYTES)
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{path} is not a saved detection (no {FORMAT_NAME!r} metadata); pass the {FILE_NAME} that "
            "`scanner scan-once --report-dir` or `scanner repair --save-detection` wrote"
        )
    if int(meta.get("format_version", "0")) > FORMAT_VERSION:
        raise CheckpointError(f"{path} is a newer saved-detection format; upgrade the scanner")
    try:
        raw: dict[int, torch.Tensor] = {}
        for key, value in tensors.items():
            if not key.startswith("raw."):
                continue
            raw_form(value)
            raw[int(key.removeprefix("raw."))] = value.float()
        return SavedDetection(
            model_sha256=meta["model_sha256"], detector=meta.get("detector", ""),
            backdoored=bool(json.loads(meta["backdoored"])), target_index=json.loads(meta["target_index"]),
            anomaly_scores=[float(v) for v in json.loads(meta["anomaly_scores"])],
            classnames=list(json.loads(meta["classnames"])), raw_triggers=raw,
            threshold=float(json.loads(meta.get("threshold", "0"))),
            anomaly_score=float(json.loads(meta.get("anomaly_score", "0"))),
            seed=int(json.loads(meta.get("seed", "0"))), ood_sha256=meta.get("ood_sha256", ""), source=str(path),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: the saved detection is damaged ({type(exc).__name__}: {exc})") from exc


def find_detection(report: Path, model_sha256: str) -> Path:
    """The saved detection for the model with ``model_sha256``: ``report`` itself when it is a file, else
    the matching ``detection.safetensors`` under a ``scan-once --report-dir`` folder."""
    report = Path(report)
    if report.is_file():
        return report
    if not report.is_dir():
        raise CheckpointError(f"--report {report} does not exist")
    seen = 0
    for p in sorted(report.rglob(FILE_NAME)):
        seen += 1
        try:
            if load_detection(p).model_sha256 == model_sha256:
                return p
        except CheckpointError:
            continue
    raise CheckpointError(
        f"{report} holds {seen} saved detection(s) but none for this model (content hash {model_sha256[:12]}…); "
        "scan this exact file with `scanner scan-once --report-dir DIR`, or omit --report to detect now"
    )
