"""Run detectors over every model of a zoo and measure them against the manifest's ground truth.

The detectors never see the ground truth: the manifest's labels are read only here, after the verdict.
Results are appended to a JSON file as they come, so an interrupted evaluation resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from scanner.clip.backbone import ClipBackbone
from scanner.engine import DetectorConfig, detect
from scanner.engine.config import DORMANCY_OFF, TWIN_MARGIN_WEIGHT
from scanner.errors import ConfigError
from scanner.prompting.checkpoints import load_checkpoint
from scanner.prompting.classifier import PromptedCLIP
from scanner.zoo.build import MANIFEST
from scanner.zoo.ood import default_ood_pool, pool_sha256

if TYPE_CHECKING:
    from scanner.accel.features import ForwardFeatures
    from scanner.engine.ci import MarginDormancy

INT8_GATE_IMAGES = 256  # scanner.accel.features.INT8_GATE_IMAGES (not imported: onnxruntime stays optional)
# detector settings added after evaluation files were first written, at the value that gives the behaviour from
# before they existed: a saved run without the field resumes as a run with this value (whatever the default is now)
FIELD_ADDED: dict[str, Any] = {"search_all_families": True, "restarts": 1, "awake_candidate": False,
                               "restart_rule": "mean", "flat_candidates": 0, "patch_start": "soft",
                               "dormant_lift": None, "student_steps": 0, "student_lr": 3e-3}
EVAL_SEED_OFFSET = 12345  # the detector's OOD pool is drawn apart from the zoo's ASR pool


def load_manifest(zoo: Path) -> dict[str, Any]:
    path = zoo / MANIFEST
    if not path.exists():
        raise ConfigError(f"{zoo} holds no {MANIFEST}; build one with `scanner zoo build {zoo}`")
    return dict(json.loads(path.read_text()))


def parse_shard(spec: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N): the K-th of N interleaved slices of a zoo's models (1 <= K <= N)."""
    try:
        k, n = (int(v) for v in spec.split("/"))
    except ValueError:
        raise ConfigError(f"shard must look like K/N (e.g. 2/4); got {spec!r}") from None
    if not 1 <= k <= n:
        raise ConfigError(f"shard K/N needs 1 <= K <= N; got {spec!r}")
    return k, n


def shard_models(models: Sequence[dict[str, Any]], shard: tuple[int, int] | None,
                 learners: Collection[str] | None = None,
                 attacks: Collection[str] | None = None) -> list[dict[str, Any]]:
    """The manifest models of ``shard`` (K, N): every N-th model from the K-th, so that each slice mixes
    datasets, attacks and learners as the whole zoo does (and a slice cut short still says something);
    with ``learners``, only the models tuned by one of them (e.g. ``{"cocoop"}``), with ``attacks`` only the
    models of one of those attacks ("none": the clean ones). ConfigError when no model of ``models`` is kept."""
    for field, wanted, what in (("learner", learners, "tuned by"), ("attack", attacks, "of the attacks")):
        if wanted is None:
            continue
        known = {m[field] for m in models}
        if not set(wanted) & known:
            raise ConfigError(f"no model of this zoo was {what} {sorted(wanted)}; its {field}s: "
                              f"{', '.join(sorted(known))}")
        models = [m for m in models if m[field] in wanted]
    if shard is None:
        return list(models)
    k, n = shard
    return [m for i, m in enumerate(models) if i % n == k - 1]


def evaluate_zoo(zoo: Path, backbone: ClipBackbone, detectors: Sequence[str], *, out: Path | None = None,
                 config: DetectorConfig | None = None, seed: int = 0, ood: torch.Tensor | None = None,
                 on_result: Callable[[dict[str, Any]], None] | None = None, accel: str = "auto",
                 accel_int8: bool = False, cache_dir: Path | None = None, device: str = "cpu",
                 shard: tuple[int, int] | None = None, learners: Collection[str] | None = None,
                 attacks: Collection[str] | None = None) -> list[dict[str, Any]]:
    """Per (model, detector) rows: verdict, suspected target, anomaly score, seconds, ground truth.

    ``accel`` ("auto" | "onnx" | "torch") picks what does the forward-only encoder work, as in a scan
    (``scanner.accel.features``); the pool's clean features are encoded once for the whole zoo.
    ``cache_dir`` is the ONNX cache folder (default ``scanner.accel.default_cache_dir()``).
    ``device`` runs the searches there (the backbone is moved there for the run and back to the CPU
    after); ``shard`` (K, N) evaluates only that slice of the models (``shard_models``), so that several
    processes or machines can share a zoo and ``merge_rows`` can join their files; ``learners`` and
    ``attacks`` keep only the models tuned by those learners, or of those attacks ("none": clean).
    """
    manifest = load_manifest(zoo)
    # resolved for the device, so that the file records the precision its searches ran at
    base = (config or DetectorConfig()).on(device)
    pool = ood if ood is not None else default_ood_pool(base.n_images, backbone.image_size,
                                                         seed=seed + EVAL_SEED_OFFSET)
    pool_hash = pool_sha256(pool)
    feats = _forward_features(backbone, accel, accel_int8, cache_dir, pool, pool_hash, device)
    rows: list[dict[str, Any]] = []
    if out is not None and out.exists():
        prev = json.loads(out.read_text())
        _check_same_zoo(prev.get("zoo"), manifest.get("zoo"), out)
        # a field the file does not record did not exist when it was written: that run behaved as FIELD_ADDED says
        saved_cfg = {**FIELD_ADDED, **prev["config"]} if prev.get("config") else {}
        if (prev.get("ood_sha256") == pool_hash and _evidence_config(saved_cfg)
                == _evidence_config(_config_dict(base)) and prev.get("accel", "torch") == accel):
            # the same searches: keep their evidence, and decide it again if the decision settings differ
            rows = [decided_by(r, base) for r in rows_of(prev)]
    done = {(r["id"], r["detector"]) for r in rows}
    header = {"zoo": manifest.get("zoo"), "ood_sha256": pool_hash, "config": _config_dict(base), "accel": accel,
              "device": device, "shard": None if shard is None else f"{shard[0]}/{shard[1]}"}
    pool = pool.to(device)
    try:
        for m in shard_models(manifest["models"], shard, learners, attacks):
            ckpt = None
            for det in detectors:
                if (m["id"], det) in done:
                    continue
                if ckpt is None:
                    ckpt = load_checkpoint(zoo / m["path"], backbone)
                row = _evaluate_one(m, det, PromptedCLIP(backbone, ckpt.learner).to(device), pool, base, seed,
                                    feats, accel_int8)
                rows.append(row)
                if out is not None:
                    write_rows(out, {**header, "rows": rows})
                if on_result is not None:
                    on_result(row)
    finally:
        backbone.to("cpu")  # the caller's backbone, where it was given
    return rows


def _evaluate_one(m: dict[str, Any], det: str, model: PromptedCLIP, pool: torch.Tensor, base: DetectorConfig,
                  seed: int, feats: ForwardFeatures | None, accel_int8: bool) -> dict[str, Any]:
    """One detector's row for manifest model ``m`` (``model`` already on the pool's device)."""
    info: dict[str, Any] = {"image": "torch", "text": "torch"}
    if feats is not None:
        gate = pool[: base.n_images][-INT8_GATE_IMAGES:] if accel_int8 else None
        info = feats.attach(model, gate).to_dict()
    cfg = DetectorConfig(**{**_config_dict(base), "detector": det})
    t0 = time.perf_counter()
    res = detect(model, pool, cfg, seed=seed)
    return {
        "id": m["id"], "dataset": m["dataset"], "attack": m["attack"], "learner": m["learner"],
        "n_classes": m["n_classes"], "truth_backdoored": m["attack"] != "none",
        "truth_target": m["target_index"], "detector": det, "flagged": res.backdoored,
        "target": res.target_index, "anomaly_score": res.anomaly_score, "threshold": res.threshold,
        "dormant_margin": cfg.dormant_margin if det == "ci" else None,
        "dormant_lift": cfg.dormant_lift if det == "ci" else None,
        "seconds": time.perf_counter() - t0, "device": pool.device.type,
        "class_scores": [c.anomaly_score for c in res.classes],
        "evidence": [c.evidence for c in res.classes], "accel": info,
    }


def _check_same_zoo(saved: dict[str, Any] | None, zoo: dict[str, Any] | None, path: Path) -> None:
    """Refuse rows of another zoo: zoos share model ids ("shapes/badnets"), so a resumed file of another
    seed would pass its verdicts off as this zoo's (files written before the zoo was recorded pass)."""
    if saved is not None and zoo is not None and saved != zoo:
        raise ConfigError(f"{path} holds the evaluation of another zoo (seed {saved.get('seed')}, backbone "
                          f"{str(saved.get('backbone_sha256'))[:12]}), not this one (seed {zoo.get('seed')}, "
                          f"backbone {str(zoo.get('backbone_sha256'))[:12]}); give another --json path")


def merge_rows(files: Sequence[Path]) -> dict[str, Any]:
    """One evaluation file from several (shards, or runs of different detectors): their rows must come from
    the same OOD pool and the same search settings, else they measure different things and cannot be
    merged. A (model, detector) pair held by two files is kept once (the first file's)."""
    if not files:
        raise ConfigError("no evaluation files to merge")
    merged: dict[str, Any] | None = None
    seen: set[tuple[str, str]] = set()
    for path in files:
        try:
            data = json.loads(path.read_text())
            rows = data["rows"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is not a `scanner zoo eval --json` file ({type(exc).__name__}: {exc})") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) and {"id", "detector"} <= r.keys() for r in rows):
            raise ConfigError(f"{path} is not a `scanner zoo eval --json` file (its rows lack model ids or detectors)")
        rows = rows_of(data)
        if merged is None:
            # shard and device describe one process; each row records its own device
            merged = {k: v for k, v in data.items() if k not in ("rows", "shard", "device")} | {"rows": []}
        else:
            _check_same_zoo(data.get("zoo"), merged.get("zoo"), path)
        if data.get("ood_sha256") != merged.get("ood_sha256"):
            raise ConfigError(f"{path} was evaluated on another OOD pool ({str(data.get('ood_sha256'))[:12]}, not "
                              f"{str(merged.get('ood_sha256'))[:12]}): evaluate both with the same --seed "
                              "and --n-images on the same backbone")
        elif _evidence_config(data.get("config") or {}) != _evidence_config(merged.get("config") or {}):
            raise ConfigError(f"{path} was evaluated with other search settings than {files[0]}; "
                              "merge only runs of one configuration")
        for r in rows:
            key = (r["id"], r["detector"])
            if key not in seen:
                seen.add(key)
                merged["rows"].append(r)
    assert merged is not None
    return merged


def _forward_features(backbone: ClipBackbone, accel: str, int8: bool, cache_dir: Path | None, pool: torch.Tensor,
                      pool_hash: str, device: str) -> ForwardFeatures | None:
    if accel == "torch":
        return None
    from scanner.accel.features import forward_features

    feats = forward_features(backbone, accel, cache_dir=cache_dir, int8=int8, device=device)
    if feats is not None:
        feats.register_pool(pool, pool_hash)
    return feats


#: settings that only decide from recorded evidence: changing them re-decides saved rows, never re-runs them
DECISION_FIELDS = ("threshold", "dormant_margin", "family_bonus", "trigger_score", "dormant_lift")


def _evidence_config(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in DECISION_FIELDS}


def decided_by(row: dict[str, Any], cfg: DetectorConfig) -> dict[str, Any]:
    """A saved row re-scored and decided by ``cfg``'s decision settings: its threshold and, for CI, its family
    bonus, trigger score and dormancy lines (what a resumed run with new decision settings does)."""
    margin = cfg.dormant_margin if row["detector"] == "ci" else None
    return decided_at(rescore_ci(row, cfg.family_bonus, cfg.trigger_score), cfg.decision_threshold, margin,
                      cfg.dormant_lift)


def decided_at(row: dict[str, Any], threshold: float, dormant_margin: float | None,
               dormant_lift: float | None = None) -> dict[str, Any]:
    """``row`` carrying the verdict ``redecide`` takes at these lines, and the lines themselves."""
    flagged, target = redecide(row, threshold, dormant_margin, dormant_lift)
    return {**row, "flagged": flagged, "target": target, "threshold": threshold, "dormant_margin": dormant_margin,
            "dormant_lift": dormant_lift}


def decided_as_run(row: dict[str, Any], threshold: float | None = None) -> dict[str, Any]:
    """``row`` decided again at the lines its own run decided it at (``threshold`` replaces the score line
    when given): what a row remade from its evidence (starts combined, a family added) must keep, so that
    the logit dormancy line of a run made with rule D on is not dropped on the way."""
    return decided_at(row, float(row["threshold"] if threshold is None else threshold), row.get("dormant_margin"),
                      row.get("dormant_lift"))


def rows_of(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of a ``scanner zoo eval --json`` file, each carrying every line it was decided at. Rows written
    before a row recorded the logit dormancy line take their file's (its settings header; ``FIELD_ADDED``'s
    where the header predates the setting too): one run decides all its rows at one line."""
    lift = {**FIELD_ADDED, **(data.get("config") or {})}["dormant_lift"]
    rows: list[dict[str, Any]] = data["rows"]
    return [r if "dormant_lift" in r or r.get("detector") != "ci" else {**r, "dormant_lift": lift} for r in rows]


def leave_one_out(groups: Sequence[Sequence[dict[str, Any]]], fpr: float, margin: float | None = None
                  ) -> tuple[list[dict[str, Any]], list[tuple[float, float | None]]]:
    """Every group's rows decided by CI's lines fitted (``fit_ci_lines``; ``margin`` kept when given) on the
    clean models of the *other* groups (zoos, datasets): verdicts no fitted line has seen. Returns the
    decided rows, group after group, and each group's (threshold, margin)."""
    decided: list[dict[str, Any]] = []
    lines: list[tuple[float, float | None]] = []
    for i, held in enumerate(groups):
        t, m = fit_ci_lines([r for j, g in enumerate(groups) if j != i for r in g], fpr, margin)
        lines.append((t, m))
        decided += [decided_at(r, t, m) for r in held]
    return decided, lines


def held_out_figures(groups: Sequence[Sequence[dict[str, Any]]], fpr: float, margin: float | None = None
                     ) -> dict[str, Any]:
    """What the benchmarks print for a leave-one-out judgement of CI rows: ``metrics`` of the pooled held-out
    verdicts (``leave_one_out``), the lines each group was judged by (``lines``), the lines fitted on every
    group's clean models (``line_all``), and AUROC over all rows of the trigger score (``auroc_all``) and of
    both channels at ``line_all`` (``auroc_both_all``)."""
    decided, fitted = leave_one_out(groups, fpr, margin)
    every = [r for g in groups for r in g]
    t_all, m_all = fit_ci_lines(every, fpr, margin)
    y = [bool(r["truth_backdoored"]) for r in every]
    return {**metrics(decided), "lines": fitted, "line_all": (t_all, m_all),
            "auroc_all": _auroc(y, [float(r["anomaly_score"]) for r in every]),
            "auroc_both_all": _auroc(y, [combined_score(r, t_all, m_all) for r in every])}


def _rescored(row: dict[str, Any], family_bonus: float, trigger_score: str,
              value_of: Callable[[int, dict[str, Any], str], float]) -> dict[str, Any]:
    """A CI row with each confirmed candidate's score remade by the engine's ``candidate_score`` from
    ``value_of(k, evidence, family)`` over its scoring families; other classes, and rows of other detectors, are
    left as they are (-1: not confirmed, or cut away by ``first_candidates``)."""
    from scanner.engine.ci import candidate_score, confirmed_families, scoring_families

    if row["detector"] != "ci":
        return row
    scores = [float(x) for x in row["class_scores"]]
    evidence = []
    for k, e in enumerate(row.get("evidence") or []):
        fams = scoring_families(confirmed_families(e), trigger_score)
        if fams and e.get("candidate", 1.0):
            scores[k] = candidate_score([value_of(k, e, f) for f in fams], family_bonus, trigger_score)
            e = {**e, "score": scores[k]}
        evidence.append(e)
    return {**row, "class_scores": scores, "anomaly_score": max(scores), "evidence": evidence}


def rescore_ci(row: dict[str, Any], family_bonus: float, trigger_score: str = "share",
               twin_weight: float = TWIN_MARGIN_WEIGHT) -> dict[str, Any]:
    """A CI row with each confirmed class's score recomputed from its recorded per-family values (gains, or
    margin lifts with ``trigger_score="margin"``, the patch trigger's median margin with "patch-margin": the
    engine's ``family_value``) by the engine's ``candidate_score``; other classes keep their score (-1: not
    confirmed, or cut away by ``first_candidates``); "patch-twin" weighs the twin's margin by ``twin_weight``.
    Rows of other detectors come back unchanged; ConfigError for rows that do not record
    margins (written before session 16) when a margin score is asked for."""
    from scanner.engine.ci import family_value

    def value(k: int, e: dict[str, Any], family: str) -> float:
        try:
            return family_value(e, family, trigger_score, twin_weight)
        except KeyError as exc:
            raise ConfigError(f"row {row.get('id')!r} records no {exc.args[0]!r}: it was written before CI recorded "
                              f"margins; re-run it to score it by {trigger_score!r}") from None

    return _rescored(row, family_bonus, trigger_score, value)


def _config_dict(cfg: DetectorConfig) -> dict[str, Any]:
    """The settings as JSON reads them back (tuples as lists), so a saved run's config compares equal."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()}


def write_rows(path: Path, data: dict[str, Any]) -> None:
    """Write an evaluation file atomically (a reader never sees half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _auroc(labels: list[bool], scores: list[float]) -> float | None:
    if len(set(labels)) < 2:
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def _dormancy_inputs(row: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(excess (C,), drift anomaly (C,) or None) from a CI row's evidence: each class's clean-image share minus
    plain zero-shot prompts'; None for rows that do not record it (baselines, rows written before it was)."""
    ev = row.get("evidence") or []
    if not ev or not all("zero_shot_share" in e and "natural_share" in e for e in ev):
        return None
    excess = torch.tensor([float(e["natural_share"]) - float(e["zero_shot_share"]) for e in ev])
    drift = torch.tensor([float(e["drift_anomaly"]) for e in ev]) if all("drift_anomaly" in e for e in ev) else None
    return excess, drift


def margin_dormancy(row: dict[str, Any], line: float | None) -> MarginDormancy | None:
    """The logit dormancy check (``MarginDormancy``) of a CI row at ``line``, from its evidence: None when the
    check is off (``line`` None), for rows of reach-ranked learners (CoCoOp: they record ``reach_anomaly``) and for
    rows that do not record the margins."""
    from scanner.engine.ci import MarginDormancy

    if line is None:
        return None
    ev = row.get("evidence") or []
    keys = ("natural_margin", "twin_margin", "drift_anomaly")
    if not ev or any("reach_anomaly" in e or not all(k in e for k in keys) for e in ev):
        return None
    lift = torch.tensor([float(e["natural_margin"]) - float(e["twin_margin"]) for e in ev], dtype=torch.float64)
    return MarginDormancy(lift, torch.tensor([float(e["drift_anomaly"]) for e in ev]), line)


def top_lift(row: dict[str, Any]) -> tuple[int, float] | None:
    """(the most drifted class, its clean margin lift over the twin): what rule D reads in a CI row, whatever its
    line; None where ``margin_dormancy`` has no check (reach-ranked rows, rows without the margins)."""
    check = margin_dormancy(row, 0.0)  # the line decides nothing here: only the lift is read
    return None if check is None else check.at_top()


def clean_excess(row: dict[str, Any]) -> tuple[float, int] | None:
    """(largest clean-image share beyond plain zero-shot prompts, its class) from a CI row's evidence, weighed
    as the engine weighs it (``awake_excess``: an anomalously drifted prompt is held to a lower bar); None for
    rows that do not record it (baselines, rows written before it was recorded)."""
    from scanner.engine.ci import awake_excess

    inputs = _dormancy_inputs(row)
    if inputs is None:
        return None
    ex, drift = inputs
    if drift is not None:
        ex = awake_excess(ex, drift)
    k = int(torch.argmax(ex))
    return float(ex[k]), k


def trigger_check(row: dict[str, Any]) -> tuple[int, float, bool]:
    """(most suspicious class, its score, whether its trigger works) of a row. Only the plain protocol has a
    gain gate beside its anomaly index; CI's score is the gain itself, the baselines have none."""
    from scanner.engine.ci import MIN_GAIN

    scores = [float(v) for v in row["class_scores"]]
    top = int(np.argmax(scores))
    ev = row.get("evidence") or []
    works = float(ev[top].get("score", MIN_GAIN)) >= MIN_GAIN if ev and row["detector"] == "ci-plain" else True
    return top, scores[top], works


def fit_ci_lines(rows: Sequence[dict[str, Any]], fpr: float, margin: float | None = None,
                 lift: float | None = None) -> tuple[float, float | None]:
    """CI's (score threshold, dormant margin) fitted on the clean models among ``rows`` for ``fpr``
    (``fit_two_channels`` on each clean row's trigger score and clean-image excess; a ``margin`` given is
    kept and only the threshold fitted). ``lift``: the logit dormancy line in force (``dormant_lift``), kept;
    the clean models it flags spend the budget first."""
    from scanner.engine.calibration import fit_two_channels

    per_model = []
    apart = []
    for r in rows:
        if not r["truth_backdoored"]:
            _, anomaly, works = trigger_check(r)
            awake = clean_excess(r)
            per_model.append((anomaly, works, None if awake is None else awake[0]))
            check = margin_dormancy(r, lift)
            apart.append(check is not None and check.suspect() is not None)
    return fit_two_channels(per_model, fpr, margin=margin, flagged_apart=apart)


def ranking_anomaly(row: dict[str, Any]) -> list[float]:
    """(C,) what CI ranked a CI row's classes by: the reach anomaly where it was recorded (image-conditioned
    learners ranked by reach), else the drift anomaly."""
    ev = row["evidence"]
    key = "reach_anomaly" if all("reach_anomaly" in e for e in ev) else "drift_anomaly"
    return [float(e[key]) for e in ev]


def is_flat(row: dict[str, Any]) -> bool:
    """Whether no class of a CI row stands out in CI's ranking (``DetectorConfig.flat_candidates``)."""
    from scanner.engine.config import FLAT_ANOMALY

    return max(ranking_anomaly(row)) < FLAT_ANOMALY


def first_candidates(row: dict[str, Any], c: int, awake: bool = False) -> dict[str, Any]:
    """A CI row as a run confirming only its ``c`` most drifted classes (and, with ``awake``, the class clean
    images fall into most beyond plain prompts: ``DetectorConfig.awake_candidate``) would have written it.

    The engine confirms candidates in rank order (``torch.argsort(rank, descending, stable)``: the drift
    anomaly, or the reach anomaly for image-conditioned models ranked by reach) with one generator, so the
    first c confirmations of a run with more candidates are exactly a c-candidate run's: one run answers
    "how many candidates?" for every smaller count. The awake class is confirmed after them, so with ``awake``
    its search drew other random numbers than a run with c drift candidates would give it (same distribution).
    """
    ev = row["evidence"]
    rank = torch.tensor(ranking_anomaly(row))  # (C,)
    keep = {int(k) for k in torch.argsort(rank, descending=True, stable=True)[:c]}
    if awake:
        inputs = _dormancy_inputs(row)
        if inputs is None:
            raise ConfigError(f"row {row.get('id')!r} records no clean-image shares to find its awake class by")
        keep.add(int(torch.argmax(inputs[0])))  # the clean-image excess, as the engine picks the awake class
        if not all(ev[k].get("candidate") for k in keep):
            raise ConfigError(f"row {row.get('id')!r} did not confirm the classes asked for: run it with "
                              f"--candidates {c} --awake-candidate or more")
    scores = [float(s) if k in keep else -1.0 for k, s in enumerate(row["class_scores"])]
    from scanner.engine.ci import confirmed_families

    # a class no longer confirmed loses its trigger searches' keys: what a run that did not confirm it wrote
    evidence = [{**e, "candidate": 1.0} if k in keep
                else {**_without_families(e, confirmed_families(e)), "candidate": 0.0, "score": -1.0}
                for k, e in enumerate(ev)]
    return {**row, "class_scores": scores, "anomaly_score": max(scores), "evidence": evidence}


def _without_families(evidence: dict[str, Any], families: Sequence[str]) -> dict[str, Any]:
    """A class's evidence without the keys of these trigger families' searches (every one ends in ``_<family>``)."""
    ends = tuple(f"_{fam}" for fam in families)
    return {k: v for k, v in evidence.items() if not ends or not k.endswith(ends)}


def first_restarts(row: dict[str, Any], r: int, family_bonus: float, trigger_score: str) -> dict[str, Any]:
    """A CI row of a ``restart_rule = "best"`` run with R >= ``r`` restarts, as a run with ``r`` restarts would
    have scored it: each confirmed class's scoring families take the best of their first ``r`` restart values
    (``restart_key``), and the engine's ``candidate_score`` makes the class's score. Exact for the first
    candidate, whose restart i draws the same numbers at any restart count; a later candidate's searches drew
    other numbers than an r-restart run would have given it (same distribution). Only a "best" run's rows cut
    this way (a "mean" run's evidence is no restart's): the caller checks the run's config. ConfigError for
    rows recording fewer than ``r`` restarts."""
    from scanner.engine.ci import restart_key

    def value(k: int, e: dict[str, Any], family: str) -> float:
        if restart_key(family, r - 1) not in e:
            raise ConfigError(f"row {row.get('id')!r} records fewer than {r} restarts for class {k}: run it "
                              f"with --restarts {r} --restart-rule best or more")
        return max(float(e[restart_key(family, i)]) for i in range(r))

    return _rescored(row, family_bonus, trigger_score, value)


def combine_starts(soft: dict[str, Any], grid: dict[str, Any], threshold: float | None = None) -> dict[str, Any]:
    """A CI row as a ``patch_start = "both"`` run would have written it, from the same model's rows of a soft and
    a grid run (same seed, same settings but the start; cut alike: ``first_candidates``).

    The starts draw the same random numbers, so the runs differ in the patch family's evidence alone and each
    confirmed class keeps the start whose score is higher (soft on ties), recording both as the engine does
    (``<start>_start_patch``). Exact for a patch-margin run, whose class score is the patch family's value.
    ConfigError when the rows are not two starts of one search (another model, other candidates, other evidence
    outside the patch family). ``seconds`` is both runs' (more than one "both" run takes: ranking and the other
    families' searches ran twice). The row is decided at ``threshold`` (default: the soft row's line; a "both" run
    with no line configured decides at ``BOTH_STARTS_THRESHOLD``) and the soft row's dormancy lines."""
    def fixed(e: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in _without_families(e, ("patch",)).items() if k != "score"}

    if soft["id"] != grid["id"] or len(soft["evidence"]) != len(grid["evidence"]):
        raise ConfigError(f"rows {soft['id']!r} and {grid['id']!r} are not one model's")
    if any(fixed(a) != fixed(b) for a, b in zip(soft["evidence"], grid["evidence"], strict=True)):
        raise ConfigError(f"row {soft['id']!r}: the two runs differ outside the patch search (another seed, pool, "
                          "candidate count or setting); combine runs that differ in --patch-start alone")
    scores: list[float] = []
    evidence: list[dict[str, Any]] = []
    for k, (a, b) in enumerate(zip(soft["evidence"], grid["evidence"], strict=True)):
        sa, sb = float(soft["class_scores"][k]), float(grid["class_scores"][k])
        if not a.get("candidate") or "margin_patch" not in a:
            scores.append(sa)
            evidence.append(a)
            continue
        scores.append(max(sa, sb))
        evidence.append({**(b if sb > sa else a), "soft_start_patch": sa, "grid_start_patch": sb})
    row = {**soft, "class_scores": scores, "anomaly_score": max(scores), "evidence": evidence,
           "seconds": float(soft["seconds"]) + float(grid["seconds"])}
    return decided_as_run(row, threshold)


def redecide(row: dict[str, Any], threshold: float, dormant_margin: float | None,
             dormant_lift: float | None = None) -> tuple[bool, int | None]:
    """(flagged, target) the detector would have returned at ``threshold`` / ``dormant_margin`` (and, for CI,
    ``dormant_lift``: the logit dormancy line, None off), re-taken from the row's recorded evidence by the engine's
    own rule (``ci_verdict`` for CI rows; the anomaly index and its gain gate, as ``_decide_plain`` takes them, for
    the others)."""
    from scanner.engine.ci import ci_verdict, confirmed_mask

    inputs = _dormancy_inputs(row) if row["detector"] == "ci" and dormant_margin is not None else None
    if inputs is not None and dormant_margin is not None:
        # float64, as the engine holds scores: a score a hair over the line stays over it
        scores = torch.tensor([float(x) for x in row["class_scores"]], dtype=torch.float64)
        v = ci_verdict(scores, *inputs, threshold, dormant_margin,
                       confirmed_mask(row["evidence"]), margin_dormancy(row, dormant_lift))
        return v.flagged, v.target
    top, anomaly, works = trigger_check(row)
    if anomaly > threshold and works:
        return True, top
    return False, None


def combined_score(row: dict[str, Any], threshold: float, dormant_margin: float | None) -> float:
    """One number per model for AUROC over both CI channels: how far past its line the stronger channel
    is (> 1 flags), the trigger channel counting only when its trigger works."""
    _, anomaly, works = trigger_check(row)
    score = anomaly / threshold if works and threshold > 0 else 0.0
    awake = clean_excess(row) if dormant_margin is not None else None
    if awake is not None and dormant_margin and dormant_margin < DORMANCY_OFF:
        score = max(score, awake[0] / dormant_margin)
    return score


def metrics(rows: Sequence[dict[str, Any]], threshold: float | None = None,
            dormant_margin: float | None = None, dormant_lift: float | None = None) -> dict[str, Any]:
    """Accuracy, AUROC, TPR, FPR, target accuracy and timing of one detector's rows.

    With ``threshold``, ``dormant_margin`` and/or ``dormant_lift`` every row is re-decided from its recorded
    evidence (``redecide``: calibration sweeps; a line not given is off there); otherwise the detector's own
    verdicts are used. ``auroc`` ranks models by the anomaly score alone, ``auroc_combined`` by
    ``combined_score`` (the trigger and share dormancy channels).
    """
    if not rows:
        return {}
    redo = threshold is not None or dormant_margin is not None or dormant_lift is not None

    def decided(r: dict[str, Any]) -> tuple[bool, int | None]:
        if not redo:
            return bool(r["flagged"]), r["target"]
        return redecide(r, float(r["threshold"]) if threshold is None else threshold, dormant_margin, dormant_lift)

    verdicts = [decided(r) for r in rows]
    labels = [bool(r["truth_backdoored"]) for r in rows]
    flags = [v[0] for v in verdicts]
    tp = [(r, v) for r, v, lab in zip(rows, verdicts, labels, strict=True) if lab and v[0]]
    target_ok = [r for r, v in tp if v[1] == r["truth_target"]]
    neg = [f for f, lab in zip(flags, labels, strict=True) if not lab]
    n_pos = sum(labels)
    by_classes: dict[int, list[float]] = {}
    for r in rows:
        by_classes.setdefault(int(r["n_classes"]), []).append(float(r["seconds"]))
    margin = dormant_margin if redo else _row_margin(rows)
    return {
        "models": len(rows),
        "accuracy": float(np.mean([f == lab for f, lab in zip(flags, labels, strict=True)])),
        "auroc": _auroc(labels, [float(r["anomaly_score"]) for r in rows]),
        "auroc_combined": _auroc(labels, [combined_score(r, float(r["threshold"]) if threshold is None else threshold,
                                                         margin) for r in rows]),
        "tpr": len(tp) / n_pos if n_pos else None,
        "fpr": (sum(neg) / len(neg)) if neg else None,
        "target_accuracy": (len(target_ok) / len(tp)) if tp else None,
        "seconds_mean": float(np.mean([r["seconds"] for r in rows])),
        "seconds_by_classes": {k: float(np.mean(v)) for k, v in sorted(by_classes.items())},
    }


def _row_margin(rows: Sequence[dict[str, Any]]) -> float | None:
    """The dormant margin the rows were decided with (recorded in the row's config), if any."""
    values = {float(r["dormant_margin"]) for r in rows if r.get("dormant_margin") is not None}
    return values.pop() if len(values) == 1 else None


def breakdown(rows: Sequence[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    """``metrics`` per value of ``key`` ("attack" or "dataset"); clean models join every dataset group."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r[key]), []).append(r)
    return {k: metrics(v) for k, v in sorted(groups.items())}


#: a backdoor "works on OOD" when its real trigger sends at least this share of the zoo's OOD images to its
#: target (the manifest's ASR-OOD): the threat CI is built for. Models under it are reported apart, so that an
#: attack that failed to reach OOD images is not read as a detector miss (nor hidden among the hits)
WORKS_ON_OOD = 0.5


def by_ood_asr(rows: Sequence[dict[str, Any]], asr_ood: dict[str, float | None]) -> dict[str, dict[str, Any]]:
    """``metrics`` over the clean models with the backdoors that work on OOD images, and again with those that
    do not (ASR-OOD under ``WORKS_ON_OOD``); ``asr_ood`` maps model id -> the manifest's ASR-OOD."""
    clean = [r for r in rows if not r["truth_backdoored"]]
    works = [r for r in rows if r["truth_backdoored"] and (asr_ood.get(r["id"]) or 0.0) >= WORKS_ON_OOD]
    fails = [r for r in rows if r["truth_backdoored"] and (asr_ood.get(r["id"]) or 0.0) < WORKS_ON_OOD]
    out = {f"asr-ood>={WORKS_ON_OOD:g}": metrics(clean + works) if works else {}}
    out[f"asr-ood<{WORKS_ON_OOD:g}"] = metrics(clean + fails) if fails else {}
    return {k: v for k, v in out.items() if v}


def report(rows: Sequence[dict[str, Any]], manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything ``scanner zoo eval`` prints, per detector; with the zoo's ``manifest``, also split by whether
    each backdoor works on OOD images (``by_ood_asr``)."""
    asr = {m["id"]: m.get("asr_ood") for m in manifest["models"]} if manifest is not None else None
    out: dict[str, Any] = {}
    for det in sorted({r["detector"] for r in rows}):
        rs = [r for r in rows if r["detector"] == det]
        out[det] = {"overall": metrics(rs), "by_attack": breakdown(rs, "attack"),
                    "by_dataset": breakdown(rs, "dataset")}
        if asr is not None:
            out[det]["by_ood_asr"] = by_ood_asr(rs, asr)
    return out
