"""How good the offline world is: zero-shot, few-shot linear-probe and few-shot CoOp accuracy of a backbone
per dataset.

The linear probe says how much class information the frozen image features carry beyond what the text
prior gives: prompt tuning only moves the text side, so where a 16-shot probe does not beat zero-shot,
16-shot CoOp has little to find either (measured on the bundled CLIP: see the model card).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from statistics import fmean
from typing import Any

import numpy as np
import torch

from scanner.clip.backbone import ClipBackbone
from scanner.prompting.classifier import PromptedCLIP
from scanner.prompting.learners import CoOpLearner
from scanner.prompting.train import TrainConfig, train_prompt
from scanner.zoo.attack_eval import clean_accuracy
from scanner.zoo.datasets import MAX_SHOTS, get_spec, list_datasets, load_split
from scanner.zoo.zeroshot import image_features, zero_shot_accuracy

PROBE_C = (0.1, 1.0, 10.0, 100.0)  # inverse L2 strengths the probe chooses from by cross-validation


def linear_probe_accuracy(backbone: ClipBackbone, dataset: str, *, shots: int = 16, seed: int = 0) -> float:
    """Held-out accuracy of a logistic-regression probe on L2-normalised frozen image features (E,) of
    ``shots`` training images per class; its L2 strength is picked from ``PROBE_C`` by 4-fold
    cross-validation on those shots alone (CLIP's linear-probe protocol, without a validation split)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    x, y = load_split(dataset, "train", shots=shots, seed=seed, size=backbone.image_size)
    xt, yt = load_split(dataset, "test", seed=seed, size=backbone.image_size)

    def feats(pixels: torch.Tensor) -> np.ndarray:
        f = torch.nn.functional.normalize(image_features(backbone, pixels).float(), dim=-1)  # (N, E)
        return f.numpy().astype(np.float64)

    fx, fy = feats(x), y.numpy()
    folds = StratifiedKFold(n_splits=max(2, min(4, shots)), shuffle=True, random_state=seed)
    cv = [float(np.mean(cross_val_score(LogisticRegression(C=c, max_iter=2000), fx, fy, cv=folds))) for c in PROBE_C]
    probe = LogisticRegression(C=PROBE_C[int(np.argmax(cv))], max_iter=2000).fit(fx, fy)
    return float((probe.predict(feats(xt)) == yt.numpy()).mean())


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


def dataset_table(backbone: ClipBackbone, *, seed: int = 0, coop: bool = True, probe: bool = True,
                  datasets: Sequence[str] | None = None,
                  progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """One row per dataset (all, or ``datasets`` in that order): classes, shots, zero-shot accuracy, and
    16-shot linear-probe and CoOp accuracy unless switched off. Unknown names raise ``DatasetError``."""
    names = list(datasets) if datasets else list_datasets()
    for name in names:
        get_spec(name)  # an unknown name fails before any measuring
    rows = []
    for name in names:
        if progress is not None:
            progress(name)
        spec = get_spec(name)
        row: dict[str, Any] = {"dataset": name, "classes": spec.n_classes, "shots": MAX_SHOTS,
                               "fine_grained": spec.fine_grained, "real": spec.real, "shift": spec.shift,
                               "zero_shot": zero_shot_accuracy(backbone, name, seed=seed)}
        if probe:
            row["linear_probe16"] = linear_probe_accuracy(backbone, name, shots=MAX_SHOTS, seed=seed)
        if coop:
            row["coop16"], row["coop_seconds"] = coop_accuracy(backbone, name, seed=seed)
        rows.append(row)
    return rows


# (label, which rows) of the means ``zoo info`` prints; the zero-shot bar is over the generated ones
SUMMARY_GROUPS: tuple[tuple[str, Callable[[dict[str, Any]], bool]], ...] = (
    ("generated, as in pre-training", lambda r: not r["real"] and r.get("shift") is None),
    ("generated, shifted", lambda r: not r["real"] and r.get("shift") is not None),
    ("generated", lambda r: not r["real"]),
    ("all", lambda r: True),
)


def summary_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per non-empty group of :data:`SUMMARY_GROUPS`: mean zero-shot, probe and CoOp accuracy and
    CoOp's mean gain over zero-shot (a column is left out where a row of the group lacks it)."""
    lines = []
    for label, member in SUMMARY_GROUPS:
        group = [r for r in rows if member(r)]
        if not group:
            continue
        parts = [f"zero-shot {fmean(r['zero_shot'] for r in group):.3f}"]
        for key, name in (("linear_probe16", "probe-16"), ("coop16", "CoOp-16")):
            if all(r.get(key) is not None for r in group):
                parts.append(f"{name} {fmean(r[key] for r in group):.3f}")
        if all(r.get("coop16") is not None for r in group):
            parts.append(f"CoOp - zero-shot {fmean(r['coop16'] - r['zero_shot'] for r in group):+.3f}")
        lines.append(f"mean over {len(group)} ({label}): " + ", ".join(parts))
    return lines
