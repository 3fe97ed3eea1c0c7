"""How good the offline world is: zero-shot and few-shot CoOp accuracy of a backbone per dataset."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from scanner.clip.backbone import ClipBackbone
from scanner.prompting.classifier import PromptedCLIP
from scanner.prompting.learners import CoOpLearner
from scanner.prompting.train import TrainConfig, train_prompt
from scanner.zoo.attack_eval import clean_accuracy
from scanner.zoo.datasets import MAX_SHOTS, get_spec, list_datasets, load_split
from scanner.zoo.zeroshot import zero_shot_accuracy


def coop_accuracy(backbone: ClipBackbone, dataset: str, *, shots: int = 16, seed: int = 0,
                  cfg: TrainConfig | None = None) -> tuple[float, float]:
    """(held-out accuracy, training seconds) of a unified-context CoOp model tuned on ``shots`` per class."""
    spec = get_spec(dataset)
    x, y = load_split(dataset, "train", shots=shots, seed=seed, size=backbone.image_size)
    xt, yt = load_split(dataset, "test", seed=seed, size=backbone.image_size)
    model = PromptedCLIP(backbone, CoOpLearner(backbone, list(spec.classnames), seed=seed))
    t0 = time.perf_counter()
    train_prompt(model, x, y, cfg or TrainConfig(seed=seed))
    secs = time.perf_counter() - t0
    return clean_accuracy(model, xt, yt), secs


def dataset_table(backbone: ClipBackbone, *, seed: int = 0, coop: bool = True,
                  progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    rows = []
    for name in list_datasets():
        if progress is not None:
            progress(name)
        spec = get_spec(name)
        row: dict[str, Any] = {"dataset": name, "classes": spec.n_classes, "shots": MAX_SHOTS,
                               "fine_grained": spec.fine_grained, "real": spec.real,
                               "zero_shot": zero_shot_accuracy(backbone, name, seed=seed)}
        if coop:
            row["coop16"], row["coop_seconds"] = coop_accuracy(backbone, name, seed=seed)
        rows.append(row)
    return rows
