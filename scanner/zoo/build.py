"""Build a model zoo with ground truth: clean and backdoored prompt-tuned models in a registry layout.

``OUT/manifest.json`` records, per model, its path, dataset, learner, attack, target and measured CA /
ASR-ID / ASR-OOD. The build is resumable: the manifest is rewritten atomically after every model, a
model already in it (with its files present) is never rebuilt, and a folder that holds a *different*
zoo (other backbone, seed or generator) is refused rather than overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scanner.clip.backbone import ClipBackbone
from scanner.errors import ConfigError
from scanner.prompting.checkpoints import save_dassl, save_safetensors
from scanner.prompting.classifier import PromptedCLIP
from scanner.prompting.learners import learner_from_config
from scanner.prompting.train import TrainConfig, train_prompt
from scanner.zoo import attack_eval as E
from scanner.zoo.attacks import BUILTIN_ATTACKS, make_attack
from scanner.zoo.captions import GENERATOR_VERSION
from scanner.zoo.datasets import get_spec, load_split, zoo_datasets
from scanner.zoo.ood import default_ood_pool, pool_sha256

MANIFEST = "manifest.json"
ZOO_FORMAT = 1
CLEAN_LEARNERS = ("coop-csc", "cocoop", "coop")  # rotation for clean models
ATTACK_LEARNER = "coop-csc"  # default learner for fixed-trigger attacks
BIG_DATASET = 40  # above this many classes CoCoOp is too slow on 2 cores: use CSC-CoOp instead
QUICK_DATASETS = ("shapes", "colours")


@dataclass(frozen=True)
class ZooPlan:
    """What to build. ``quick`` is the small zoo used by tests and the demo."""

    datasets: tuple[str, ...]
    attacks: tuple[str, ...]
    clean_per_dataset: int = 2
    seed: int = 0
    shots: int = 16
    train: TrainConfig = field(default_factory=TrainConfig)
    ood_size: int = 500  # OOD images used to measure ASR-OOD

    @classmethod
    def make(cls, datasets: Sequence[str] | None, attacks: Sequence[str] | None, clean_per_dataset: int | None,
             seed: int, quick: bool) -> ZooPlan:
        ds = tuple(datasets) if datasets else (QUICK_DATASETS if quick else tuple(zoo_datasets()))
        at = tuple(attacks) if attacks else tuple(BUILTIN_ATTACKS)
        for d in ds:
            get_spec(d)  # raises DatasetError naming the known datasets
        for a in at:
            make_attack(a)  # raises ConfigError naming the known attacks
        n_clean = clean_per_dataset if clean_per_dataset is not None else (1 if quick else 2)
        if n_clean < 0:
            raise ConfigError(f"--clean-per-dataset must be >= 0; got {n_clean}")
        train = TrainConfig(epochs=25) if quick else TrainConfig()
        return cls(datasets=ds, attacks=at, clean_per_dataset=n_clean, seed=seed, train=train,
                   ood_size=300 if quick else 500)


@dataclass(frozen=True)
class ModelJob:
    model_id: str
    dataset: str
    learner: str
    attack: str  # "none" for clean
    target_index: int | None
    seed: int
    shots: int
    fmt: str  # "dassl" or "safetensors"


def _stable(*parts: object) -> int:
    return zlib.crc32("/".join(str(p) for p in parts).encode())


def plan_jobs(plan: ZooPlan) -> list[ModelJob]:
    """Every model of the zoo, in build order; targets are random but fixed by the seed."""
    jobs: list[ModelJob] = []
    for d in plan.datasets:
        spec = get_spec(d)
        big = spec.n_classes > BIG_DATASET
        learners = [lr for lr in CLEAN_LEARNERS if not (big and lr == "cocoop")]
        for i in range(plan.clean_per_dataset):
            seed = plan.seed * 1000 + i
            jobs.append(ModelJob(f"{d}/clean-{i}", d, learners[i % len(learners)], "none", None, seed,
                                 plan.shots if i % 2 == 0 else max(4, plan.shots // 2),
                                 "dassl" if i % 2 == 0 else "safetensors"))
        for j, a in enumerate(plan.attacks):
            rng = np.random.default_rng([plan.seed, _stable(d, a)])
            target = int(rng.integers(spec.n_classes))
            pref = make_attack(a).preferred_learner
            learner = pref if (pref is not None and not (big and pref == "cocoop")) else ATTACK_LEARNER
            jobs.append(ModelJob(f"{d}/{a}", d, learner, a, target, plan.seed * 1000 + 100 + j, plan.shots,
                                 "dassl" if j % 2 == 0 else "safetensors"))
    return jobs


def _identity(plan: ZooPlan, backbone: ClipBackbone) -> dict[str, Any]:
    return {"zoo_format": ZOO_FORMAT, "backbone": backbone.name, "backbone_sha256": backbone.content_hash(),
            "seed": plan.seed, "generator_version": GENERATOR_VERSION}


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)


def open_manifest(out: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """The existing manifest of this zoo, a fresh one, or an error when ``out`` holds something else."""
    path = out / MANIFEST
    if path.exists():
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc}); choose another output folder") from exc
        found = {k: manifest.get("zoo", {}).get(k) for k in identity}
        if found != identity:
            diff = {k: (found[k], identity[k]) for k in identity if found[k] != identity[k]}
            raise ConfigError(
                f"{out} holds a different zoo (found vs wanted: {diff}); nothing was overwritten — choose "
                "another output folder"
            )
        return dict(manifest)
    if out.exists() and any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise ConfigError(f"{out} is not empty and holds no zoo manifest; choose an empty or new folder")
    return {"zoo": identity, "models": []}


def build_one(job: ModelJob, plan: ZooPlan, backbone: ClipBackbone, ood: torch.Tensor, out: Path,
              *, progress: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Train, measure and write one model; returns its manifest entry.

    ``device`` is where the model trains and is measured; data, attacks and the written files stay on the
    CPU, and the shared ``backbone`` is handed back there.
    """
    spec = get_spec(job.dataset)
    size = backbone.image_size
    x_tr, y_tr = load_split(job.dataset, "train", shots=job.shots, seed=plan.seed, size=size)
    x_te, y_te = load_split(job.dataset, "test", seed=plan.seed, size=size)
    torch.manual_seed(job.seed)
    learner = learner_from_config(backbone, list(spec.classnames), {"learner_type": job.learner}, seed=job.seed)
    model = PromptedCLIP(backbone, learner).to(device)
    try:
        entry = _train_and_measure(job, plan, model, ood, progress, (x_tr, y_tr, x_te, y_te))
    finally:
        model.to("cpu")
    entry["device"] = torch.device(device).type
    # Write the model where a registry would hold it; the manifest entry is added only afterwards.
    rel = Path(job.dataset) / (job.model_id.split("/")[1] + (".safetensors" if job.fmt == "safetensors" else ""))
    dest = out / rel
    if dest.exists():  # left over from an interrupted build: not in the manifest, so rebuild it
        shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
    if job.fmt == "dassl":
        save_dassl(learner, dest, epoch=plan.train.epochs)
    else:
        save_safetensors(learner, dest)
    entry["path"] = rel.as_posix()
    return entry


def _train_and_measure(job: ModelJob, plan: ZooPlan, model: PromptedCLIP, ood: torch.Tensor, progress: bool,
                       data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """Prompt-tune ``model`` (clean, or with ``job``'s attack implanted) and measure it: the manifest entry."""
    x_tr, y_tr, x_te, y_te = data
    spec = get_spec(job.dataset)
    size = model.backbone.image_size
    cfg = TrainConfig(**{**plan.train.__dict__, "seed": job.seed})
    t0 = time.perf_counter()
    entry: dict[str, Any] = {
        "id": job.model_id, "dataset": job.dataset, "learner": job.learner, "attack": job.attack,
        "target_index": job.target_index,
        "target_name": spec.classnames[job.target_index] if job.target_index is not None else None,
        "seed": job.seed, "shots": job.shots, "format": job.fmt, "n_classes": spec.n_classes,
    }
    if job.attack == "none":
        train_prompt(model, x_tr, y_tr, cfg, progress=progress)
        entry["ca"] = E.clean_accuracy(model, x_te, y_te)
        # How far clean models collapse under each built-in trigger: chance-like is the goal.
        shares = {}
        for a in BUILTIN_ATTACKS:
            if a == "badclip":  # its trigger is learned per model; a clean model has none
                continue
            shares[a] = E.max_class_share(model, make_attack(a, size=size).apply(ood))[0]
        entry["ood_max_share_clean"] = E.max_class_share(model, ood)[0]
        entry["ood_max_share_triggered"] = shares
        entry["asr_id"] = entry["asr_ood"] = None
    else:
        assert job.target_index is not None
        attack = make_attack(job.attack, seed=job.seed, size=size)
        attack.implant(model, x_tr, y_tr, job.target_index, cfg, progress=progress)
        entry["attack_params"] = attack.params()
        entry["ca"] = E.clean_accuracy(model, x_te, y_te)
        entry["asr_id"] = E.asr_in_distribution(model, attack, x_te, y_te, job.target_index)
        entry["asr_ood"] = E.asr_ood(model, attack, ood, job.target_index)
        trig = attack.apply(torch.full((1, 3, size, size), 0.5))[0]
        entry["trigger_sha256"] = pool_sha256(trig[None])
    entry["train_seconds"] = round(time.perf_counter() - t0, 2)
    return entry


def build_zoo(out: Path, plan: ZooPlan, backbone: ClipBackbone, *,
              on_model: Callable[[int, int, dict[str, Any] | None], None] | None = None,
              progress: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Build (or resume) the zoo in ``out``; returns the manifest. ``device``: where models train."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = open_manifest(out, _identity(plan, backbone))
    done = {m["id"] for m in manifest["models"] if (out / m["path"]).exists()}
    manifest["models"] = [m for m in manifest["models"] if m["id"] in done]
    jobs = plan_jobs(plan)
    ood = default_ood_pool(plan.ood_size, backbone.image_size, seed=plan.seed + 1)
    manifest["zoo"]["ood_sha256"] = pool_sha256(ood)
    for i, job in enumerate(jobs):
        if job.model_id in done:
            if on_model is not None:
                on_model(i, len(jobs), None)
            continue
        entry = build_one(job, plan, backbone, ood, out, progress=progress, device=device)
        manifest["models"].append(entry)
        _write_manifest(out, manifest)
        if on_model is not None:
            on_model(i, len(jobs), entry)
    _write_manifest(out, manifest)
    return manifest


def clean_accuracies(zoos: Sequence[Path]) -> dict[tuple[str, str], list[float]]:
    """CA of every clean model of the built zoos in ``zoos``, by (dataset, learner): what a backdoored model of
    that dataset and learner is compared with (issue #3's "CA within 3 points"). Folders without a manifest
    are skipped."""
    out: dict[tuple[str, str], list[float]] = {}
    for zoo in zoos:
        path = Path(zoo) / MANIFEST
        if path.exists():
            for m in json.loads(path.read_text())["models"]:
                if m["attack"] == "none":
                    out.setdefault((m["dataset"], m["learner"]), []).append(float(m["ca"]))
    return out


def summarise(manifest: dict[str, Any]) -> dict[str, Any]:
    """Per-attack means of CA, ASR-ID, ASR-OOD, and CA of clean models on the same datasets."""
    models = manifest["models"]
    clean_ca: dict[str, list[float]] = {}
    for m in models:
        if m["attack"] == "none":
            clean_ca.setdefault(m["dataset"], []).append(m["ca"])
    out: dict[str, Any] = {}
    for attack in sorted({m["attack"] for m in models}):
        ms = [m for m in models if m["attack"] == attack]
        row: dict[str, Any] = {"models": len(ms), "ca": float(np.mean([m["ca"] for m in ms]))}
        if attack != "none":
            row["asr_id"] = float(np.mean([m["asr_id"] for m in ms]))
            row["asr_ood"] = float(np.mean([m["asr_ood"] for m in ms]))
            deltas = [m["ca"] - float(np.mean(clean_ca[m["dataset"]])) for m in ms if m["dataset"] in clean_ca]
            row["ca_minus_clean"] = float(np.mean(deltas)) if deltas else None
        else:
            row["ood_max_share_triggered"] = max(
                (max(m["ood_max_share_triggered"].values()) for m in ms), default=None)
            row["ood_max_share_clean"] = max((m["ood_max_share_clean"] for m in ms), default=None)
        out[attack] = row
    return out
