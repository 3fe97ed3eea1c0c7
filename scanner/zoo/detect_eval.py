"""Run detectors over every model of a zoo and measure them against the manifest's ground truth.

The detectors never see the ground truth: the manifest's labels are read only here, after the verdict.
Results are appended to a JSON file as they come, so an interrupted evaluation resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from scanner.clip.backbone import ClipBackbone
from scanner.engine import DetectorConfig, detect
from scanner.errors import ConfigError
from scanner.prompting.checkpoints import load_checkpoint
from scanner.prompting.classifier import PromptedCLIP
from scanner.zoo.build import MANIFEST
from scanner.zoo.ood import default_ood_pool, pool_sha256

if TYPE_CHECKING:
    from scanner.accel.features import ForwardFeatures

INT8_GATE_IMAGES = 256  # scanner.accel.features.INT8_GATE_IMAGES (not imported: onnxruntime stays optional)
EVAL_SEED_OFFSET = 12345  # the detector's OOD pool is drawn apart from the zoo's ASR pool


def load_manifest(zoo: Path) -> dict[str, Any]:
    path = zoo / MANIFEST
    if not path.exists():
        raise ConfigError(f"{zoo} holds no {MANIFEST}; build one with `scanner zoo build {zoo}`")
    return dict(json.loads(path.read_text()))


def evaluate_zoo(zoo: Path, backbone: ClipBackbone, detectors: Sequence[str], *, out: Path | None = None,
                 config: DetectorConfig | None = None, seed: int = 0, ood: torch.Tensor | None = None,
                 on_result: Callable[[dict[str, Any]], None] | None = None, accel: str = "auto",
                 accel_int8: bool = False, cache_dir: Path | None = None) -> list[dict[str, Any]]:
    """Per (model, detector) rows: verdict, suspected target, anomaly score, seconds, ground truth.

    ``accel`` ("auto" | "onnx" | "torch") picks what does the forward-only encoder work, as in a scan
    (``scanner.accel.features``); the pool's clean features are encoded once for the whole zoo.
    ``cache_dir`` is the ONNX cache folder (default ``scanner.accel.default_cache_dir()``).
    """
    manifest = load_manifest(zoo)
    base = config or DetectorConfig()
    pool = ood if ood is not None else default_ood_pool(base.n_images, backbone.image_size,
                                                         seed=seed + EVAL_SEED_OFFSET)
    pool_hash = pool_sha256(pool)
    feats = _forward_features(backbone, accel, accel_int8, cache_dir, pool, pool_hash)
    rows: list[dict[str, Any]] = []
    if out is not None and out.exists():
        prev = json.loads(out.read_text())
        if (prev.get("ood_sha256") == pool_hash and prev.get("config") == _config_dict(base)
                and prev.get("accel", "torch") == accel):
            rows = list(prev["rows"])
    done = {(r["id"], r["detector"]) for r in rows}
    for m in manifest["models"]:
        ckpt = None
        for det in detectors:
            if (m["id"], det) in done:
                continue
            if ckpt is None:
                ckpt = load_checkpoint(zoo / m["path"], backbone)
            model = PromptedCLIP(backbone, ckpt.learner)
            info: dict[str, Any] = {"image": "torch", "text": "torch"}
            if feats is not None:
                gate = pool[: base.n_images][-INT8_GATE_IMAGES:] if accel_int8 else None
                info = feats.attach(model, gate).to_dict()
            cfg = DetectorConfig(**{**_config_dict(base), "detector": det})
            t0 = time.perf_counter()
            res = detect(model, pool, cfg, seed=seed)
            row = {
                "id": m["id"], "dataset": m["dataset"], "attack": m["attack"], "learner": m["learner"],
                "n_classes": m["n_classes"], "truth_backdoored": m["attack"] != "none",
                "truth_target": m["target_index"], "detector": det, "flagged": res.backdoored,
                "target": res.target_index, "anomaly_score": res.anomaly_score, "threshold": res.threshold,
                "seconds": time.perf_counter() - t0,
                "class_scores": [c.anomaly_score for c in res.classes],
                "evidence": [c.evidence for c in res.classes], "accel": info,
            }
            rows.append(row)
            if out is not None:
                _write(out, {"ood_sha256": pool_hash, "config": _config_dict(base), "accel": accel, "rows": rows})
            if on_result is not None:
                on_result(row)
    return rows


def _forward_features(backbone: ClipBackbone, accel: str, int8: bool, cache_dir: Path | None, pool: torch.Tensor,
                      pool_hash: str) -> ForwardFeatures | None:
    if accel == "torch":
        return None
    from scanner.accel.features import forward_features

    feats = forward_features(backbone, accel, cache_dir=cache_dir, int8=int8)
    if feats is not None:
        feats.register_pool(pool, pool_hash)
    return feats


def _config_dict(cfg: DetectorConfig) -> dict[str, Any]:
    d = dict(cfg.__dict__)
    d["families"] = list(d["families"])
    return d


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _auroc(labels: list[bool], scores: list[float]) -> float | None:
    if len(set(labels)) < 2:
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def metrics(rows: Sequence[dict[str, Any]], threshold: float | None = None) -> dict[str, Any]:
    """Accuracy, AUROC, TPR, FPR, target accuracy and timing of one detector's rows.

    ``threshold`` re-decides every row on its anomaly score (for calibration sweeps); otherwise the
    detector's own verdicts are used.
    """
    if not rows:
        return {}

    def flag(r: dict[str, Any]) -> bool:
        return bool(r["flagged"]) if threshold is None else r["anomaly_score"] > threshold

    labels = [bool(r["truth_backdoored"]) for r in rows]
    flags = [flag(r) for r in rows]
    pos = [r for r, lab in zip(rows, labels, strict=True) if lab]
    neg = [r for r, lab in zip(rows, labels, strict=True) if not lab]
    tp = [r for r in pos if flag(r)]
    target_ok = [r for r in tp if r["target"] == r["truth_target"]] if threshold is None else [
        r for r in tp if int(np.argmax(r["class_scores"])) == r["truth_target"]]
    by_classes: dict[int, list[float]] = {}
    for r in rows:
        by_classes.setdefault(int(r["n_classes"]), []).append(float(r["seconds"]))
    return {
        "models": len(rows),
        "accuracy": float(np.mean([f == lab for f, lab in zip(flags, labels, strict=True)])),
        "auroc": _auroc(labels, [float(r["anomaly_score"]) for r in rows]),
        "tpr": len(tp) / len(pos) if pos else None,
        "fpr": (sum(flag(r) for r in neg) / len(neg)) if neg else None,
        "target_accuracy": (len(target_ok) / len(tp)) if tp else None,
        "seconds_mean": float(np.mean([r["seconds"] for r in rows])),
        "seconds_by_classes": {k: float(np.mean(v)) for k, v in sorted(by_classes.items())},
    }


def breakdown(rows: Sequence[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    """``metrics`` per value of ``key`` ("attack" or "dataset"); clean models join every dataset group."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r[key]), []).append(r)
    return {k: metrics(v) for k, v in sorted(groups.items())}


def report(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Everything ``scanner zoo eval`` prints, per detector."""
    out: dict[str, Any] = {}
    for det in sorted({r["detector"] for r in rows}):
        rs = [r for r in rows if r["detector"] == det]
        out[det] = {"overall": metrics(rs), "by_attack": breakdown(rs, "attack"),
                    "by_dataset": breakdown(rs, "dataset")}
    return out
