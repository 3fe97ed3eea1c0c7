"""Repair every backdoored model of a zoo and measure it against the manifest's ground truth.

Per backdoored model: detect (CI, the zoo-eval pool), repair with the dataset's few-shot training split
and the detection's reconstructed triggers, then measure with the *real* trigger (rebuilt from the
manifest, never shown to detection or repair): ASR-ID / ASR-OOD and clean accuracy before and after,
and the verdict of a re-scan of the repaired model. Rows are appended to a JSON file as they come, so
an interrupted evaluation resumes where it stopped.

BadCLIP learns its trigger with the prompt and the zoo does not store it; it is recovered by re-running
the zoo's (deterministic) implant and accepted only when it hashes to the manifest's ``trigger_sha256``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scanner.clip.backbone import ClipBackbone, state_dict_sha256
from scanner.engine import DetectionResult, DetectorConfig, detect
from scanner.errors import CheckpointError, ConfigError
from scanner.prompting.checkpoints import load_checkpoint
from scanner.prompting.classifier import PromptedCLIP
from scanner.prompting.learners import learner_from_config
from scanner.prompting.train import TrainConfig
from scanner.repair import RepairConfig, repair_prompt
from scanner.repair.pseudo import twin_text_features
from scanner.repair.saved_detection import SavedDetection, load_detection, save_detection
from scanner.zoo import attack_eval as E
from scanner.zoo.attacks import Attack, make_attack
from scanner.zoo.datasets import get_spec, load_split
from scanner.zoo.detect_eval import EVAL_SEED_OFFSET, load_manifest, write_rows
from scanner.zoo.ood import default_ood_pool, pool_sha256

ASR_OOD_SIZES = (300, 500)  # the builder's ASR-OOD pool sizes (quick, full); drawn from zoo seed + 1


def trigger_sha(attack: Attack, size: int) -> str:
    """The zoo builder's fingerprint of a trigger: its stamp on a grey image."""
    return pool_sha256(attack.apply(torch.full((1, 3, size, size), 0.5)))


def real_attack(entry: dict[str, Any], zoo_seed: int, backbone: ClipBackbone) -> tuple[Attack | None, str]:
    """The model's real trigger rebuilt from its manifest entry, or (None, why) when it cannot be."""
    size = backbone.image_size
    params = {k: v for k, v in (entry.get("attack_params") or {}).items()}
    try:
        attack = make_attack(entry["attack"], **params, size=size)
    except (ConfigError, TypeError, ValueError) as exc:
        return None, f"cannot rebuild attack {entry['attack']!r}: {exc}"
    expected = entry.get("trigger_sha256")
    if expected is None or trigger_sha(attack, size) == expected:
        return attack, ""
    # A learned trigger (BadCLIP): re-run the builder's implant with the same seeds.
    spec = get_spec(entry["dataset"])
    x_tr, y_tr = load_split(entry["dataset"], "train", shots=entry["shots"], seed=zoo_seed, size=size)
    torch.manual_seed(entry["seed"])
    learner = learner_from_config(backbone, list(spec.classnames), {"learner_type": entry["learner"]},
                                  seed=entry["seed"])
    attack.implant(PromptedCLIP(backbone, learner), x_tr, y_tr, entry["target_index"],
                   TrainConfig(seed=entry["seed"]))
    if trigger_sha(attack, size) != expected:
        return None, "the learned trigger could not be reproduced (hash differs from the manifest's)"
    return attack, ""


def asr_ood_pool(manifest: dict[str, Any], size: int) -> torch.Tensor:
    """The OOD pool the builder measured ASR-OOD on (identified by the manifest's ``ood_sha256``)."""
    pool = default_ood_pool(max(ASR_OOD_SIZES), size, seed=int(manifest["zoo"].get("seed", 0)) + 1)
    for n in ASR_OOD_SIZES:  # a smaller pool is a prefix of a larger one (one crop per image, in order)
        if pool_sha256(pool[:n]) == manifest["zoo"].get("ood_sha256"):
            return pool[:n]
    return pool[: ASR_OOD_SIZES[0]]


def _asr(model: PromptedCLIP, attack: Attack | None, x: torch.Tensor, y: torch.Tensor, ood: torch.Tensor,
         target: int) -> tuple[float | None, float | None]:
    if attack is None:
        return None, None
    return E.asr_in_distribution(model, attack, x, y, target), E.asr_ood(model, attack, ood, target)


@torch.no_grad()
def twin_asr(model: PromptedCLIP, attack: Attack | None, x: torch.Tensor, y: torch.Tensor, ood: torch.Tensor,
              target: int) -> tuple[float | None, float | None]:
    """Real-trigger ASR-ID / ASR-OOD of ``model``'s zero-shot twin (plain class-name prompts, ensembled):
    what the frozen encoders do with the trigger when no prompt was tuned — where it is high, the trigger
    carries class evidence of its own (a brownish blend on a colour task) and no prompt repair removes it."""
    if attack is None:
        return None, None
    twin = twin_text_features(model)  # (C, E)

    def share(pixels: torch.Tensor) -> float:
        feats = torch.nn.functional.normalize(model.image_features(attack.apply(pixels)), dim=-1)  # (N, E)
        return float(((feats @ twin.to(feats).T).argmax(dim=1) == target).float().mean())

    return share(x[y != target]), share(ood)


def suspects(res: DetectionResult | SavedDetection) -> tuple[int | None, list[torch.Tensor]]:
    """The class to treat as the target and the raw triggers to repair with (that class's first, then
    the other candidates' by anomaly score). Unflagged models: the most anomalous class with a trigger."""
    if isinstance(res, DetectionResult):
        res = SavedDetection.from_result(res, "")
    order = res.suspects()
    target = res.target_index if res.target_index is not None else (order[0] if order else None)
    return target, [res.raw_triggers[k] for k in order]


def config_key(config: DetectorConfig, seed: int, pool: torch.Tensor) -> str:
    """12 hex digits naming a detection's inputs besides the model: detector settings, seed and OOD pool."""
    blob = json.dumps({"config": _jsonable(config.__dict__), "seed": seed, "ood": pool_sha256(pool)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cached_detection(model: PromptedCLIP, model_id: str, pool: torch.Tensor, config: DetectorConfig, seed: int,
                     cache: Path | None) -> tuple[SavedDetection, float | None]:
    """CI's detection of ``model`` and its seconds; with ``cache``, one saved detection per model under
    ``cache/<config_key>/`` is reused (seconds None) when it was made on these exact prompt weights, and
    written otherwise. A damaged or foreign file is recomputed, never trusted."""
    model_sha = state_dict_sha256(model.learner.state_dict())
    path = None
    if cache is not None:
        path = cache / config_key(config, seed, pool) / (model_id.replace("/", "--") + ".detection.safetensors")
        if path.exists():
            try:
                det = load_detection(path)
                if det.model_sha256 == model_sha:
                    return det, None
            except CheckpointError:
                pass
    t0 = time.perf_counter()
    det = SavedDetection.from_result(detect(model, pool, config, seed=seed), model_sha)
    seconds = time.perf_counter() - t0
    if path is not None:
        save_detection(det, path)
    return det, seconds


def evaluate_repairs(zoo: Path, backbone: ClipBackbone, *, out: Path | None = None,
                     config: DetectorConfig | None = None, repair: RepairConfig | None = None, seed: int = 0,
                     on_result: Callable[[dict[str, Any]], None] | None = None,
                     models: Collection[str] | None = None, detections: Path | None = None,
                     repair_detector: DetectorConfig | None = None) -> list[dict[str, Any]]:
    """One row per backdoored model of the zoo (see module docstring), or of ``models`` (ids) only;
    resumable through ``out``. ``detections``: a folder where each model's detection is saved and reused
    by later runs with the same detector settings (comparing repair settings need not detect again).
    ``repair_detector``: settings of the detection that supplies the repair's triggers (e.g. more
    candidates than a scan uses); the re-scan always uses ``config``."""
    manifest = load_manifest(zoo)
    if models is not None:
        unknown = sorted(set(models) - {m["id"] for m in manifest["models"] if m["attack"] != "none"})
        if unknown:
            raise ConfigError(f"no backdoored model {', '.join(unknown)} in {zoo}; ids are the manifest's, "
                              "e.g. shapes/badnets")
    det_cfg = config or DetectorConfig()
    rep_cfg = repair or RepairConfig()
    zoo_seed = int(manifest["zoo"].get("seed", 0))
    size = backbone.image_size
    pool = default_ood_pool(det_cfg.n_images, size, seed=seed + EVAL_SEED_OFFSET)
    asr_pool = asr_ood_pool(manifest, size)
    settings = {"detector": _jsonable(det_cfg.__dict__), "repair": rep_cfg.to_dict(), "seed": seed,
                "ood_sha256": pool_sha256(pool)}
    if repair_detector is not None:
        settings["repair_detector"] = _jsonable(repair_detector.__dict__)
    rows: list[dict[str, Any]] = []
    if out is not None and out.exists():
        prev = json.loads(out.read_text())
        if prev.get("settings") == settings:
            rows = list(prev["rows"])
    done = {r["id"] for r in rows}
    for m in manifest["models"]:
        if m["attack"] == "none" or m["id"] in done or (models is not None and m["id"] not in models):
            continue
        clean = next((c for c in manifest["models"] if c["dataset"] == m["dataset"] and c["attack"] == "none"), None)
        row = repair_one(zoo, m, backbone, pool, asr_pool, det_cfg, rep_cfg, zoo_seed, seed, clean,
                         detections=detections, repair_detector=repair_detector)
        rows.append(row)
        if out is not None:
            write_rows(out, {"settings": settings, "rows": rows})
        if on_result is not None:
            on_result(row)
    return rows


def repair_one(zoo: Path, m: dict[str, Any], backbone: ClipBackbone, pool: torch.Tensor, asr_pool: torch.Tensor,
               det_cfg: DetectorConfig, rep_cfg: RepairConfig, zoo_seed: int, seed: int,
               clean: dict[str, Any] | None = None, *, detections: Path | None = None,
               repair_detector: DetectorConfig | None = None) -> dict[str, Any]:
    """Detect, repair, re-scan and measure one backdoored zoo model. ``clean``: the manifest entry of a
    clean model of the same dataset, whose real-trigger ASR is the floor a repair can reach (a trigger
    can send images to the target on a model that never saw it, e.g. when the target is a natural sink).
    ``flagged`` and ``suspect`` in the row come from the repair's detection (``repair_detector`` or
    ``det_cfg``); the re-scan uses ``det_cfg``."""
    size = backbone.image_size
    model = PromptedCLIP(backbone, load_checkpoint(zoo / m["path"], backbone).learner)
    x_tr, y_tr = load_split(m["dataset"], "train", shots=m["shots"], seed=zoo_seed, size=size)
    x_te, y_te = load_split(m["dataset"], "test", seed=zoo_seed, size=size)
    target = int(m["target_index"])
    attack, why = real_attack(m, zoo_seed, backbone)
    res, detect_s = cached_detection(model, m["id"], pool, repair_detector or det_cfg, seed, detections)
    suspect, triggers = suspects(res)
    rep = repair_prompt(model, x_tr, y_tr, triggers, rep_cfg, seed=seed, target=suspect, ood=pool)
    t0 = time.perf_counter()
    rescan = detect(rep.model, pool, det_cfg, seed=seed)
    rescan_s = time.perf_counter() - t0
    asr_id_b, asr_ood_b = _asr(model, attack, x_te, y_te, asr_pool, target)
    asr_id_a, asr_ood_a = _asr(rep.model, attack, x_te, y_te, asr_pool, target)
    asr_id_twin, asr_ood_twin = twin_asr(model, attack, x_te, y_te, asr_pool, target)
    asr_id_ref = asr_ood_ref = None
    if clean is not None:
        ref = PromptedCLIP(backbone, load_checkpoint(zoo / clean["path"], backbone).learner)
        asr_id_ref, asr_ood_ref = _asr(ref, attack, x_te, y_te, asr_pool, target)
    return {
        "id": m["id"], "dataset": m["dataset"], "attack": m["attack"], "learner": m["learner"],
        "n_classes": m["n_classes"], "truth_target": target, "real_trigger": attack is not None,
        "real_trigger_note": why, "flagged": res.backdoored, "suspect": suspect,
        "suspect_is_target": suspect == target, "n_triggers": len(triggers),
        "guarded": rep.guarded,
        "ca_before": E.clean_accuracy(model, x_te, y_te), "ca_after": E.clean_accuracy(rep.model, x_te, y_te),
        "asr_id_before": asr_id_b, "asr_id_after": asr_id_a, "asr_ood_before": asr_ood_b, "asr_ood_after": asr_ood_a,
        "asr_id_clean_model": asr_id_ref, "asr_ood_clean_model": asr_ood_ref,
        "asr_id_twin": asr_id_twin, "asr_ood_twin": asr_ood_twin,
        "rescan_flagged": rescan.backdoored, "rescan_target": rescan.target_index,
        "rescan_score": rescan.anomaly_score, "repair_seconds": rep.seconds, "detect_seconds": detect_s,
        "rescan_seconds": rescan_s, "detection_reused": detect_s is None, "repair": rep.to_dict(),
    }


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


#: the issue's per-attack ASR bar, also applied per model
ASR_BAR = 0.05


def within(row: dict[str, Any], floor_keys: tuple[str, str] | None) -> bool | None:
    """Whether a row's real-trigger ASR after repair, in and out of distribution, is at most the bar (5 %) or,
    with ``floor_keys`` (ID key, OOD key), at most the larger of the bar and that row's floor (the zero-shot
    twin's own ASR with the same trigger: what the frozen encoders do without any prompt). None when a figure
    is missing (no real trigger)."""
    after = [row.get("asr_id_after"), row.get("asr_ood_after")]
    floors = [row.get(floor_keys[0]), row.get(floor_keys[1])] if floor_keys else [0.0, 0.0]
    pairs = [(a, f) for a, f in zip(after, floors, strict=True) if a is not None and f is not None]
    if len(pairs) < 2:
        return None
    return all(float(a) <= max(ASR_BAR, float(f)) for a, f in pairs)


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per attack (and ``all``): means of every before/after figure, re-scan-clean share, seconds, and the
    shares of models whose ASR after repair is within the bar (``within_bar``) and within the larger of the bar
    and the twin's floor (``within_twin_floor``)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["attack"], []).append(r)
    groups["all"] = list(rows)
    out: dict[str, dict[str, Any]] = {}
    for name, rs in groups.items():
        if not rs:
            continue
        out[name] = {
            "models": len(rs),
            **{k: _mean([r.get(k) for r in rs]) for k in ("asr_id_before", "asr_id_after", "asr_ood_before",
                                                           "asr_ood_after", "asr_id_clean_model",
                                                           "asr_ood_clean_model", "asr_id_twin", "asr_ood_twin",
                                                           "ca_before", "ca_after")},
            "ca_change": _mean([r["ca_after"] - r["ca_before"] for r in rs]),
            "flagged_before": float(np.mean([r["flagged"] for r in rs])),
            "rescan_clean": float(np.mean([not r["rescan_flagged"] for r in rs])),
            "within_bar": _mean([within(r, None) for r in rs]),
            "within_twin_floor": _mean([within(r, ("asr_id_twin", "asr_ood_twin")) for r in rs]),
            "repair_seconds": float(np.mean([r["repair_seconds"] for r in rs])),
        }
    return out
