"""CI's ranking for image-conditioned prompts: universal reach over the twin's, and the extra families."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from scanner.clip import ClipBackbone
from scanner.engine import DetectorConfig, detect
from scanner.engine.invert import ReferenceModel
from scanner.engine.reach import class_reach, reach_ratio
from scanner.errors import ConfigError
from scanner.prompting.classifier import PromptedCLIP
from scanner.prompting.learners import CoCoOpLearner, CoOpLearner

SMALL = DetectorConfig(n_images=48, batch_size=12, holdout=0.25, families=("sticker",))
NAMES = ["circle", "square", "star", "arrow"]


@pytest.fixture(scope="module")
def pool() -> torch.Tensor:
    return torch.rand(48, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_class_reach_is_the_l1_norm_of_each_class_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(3, 1, 3, 4, 4, generator=gen)  # one linear response per class
    delta = torch.zeros(1, 3, 4, 4, requires_grad=True)
    x = torch.rand(5, 3, 4, 4, generator=gen)
    # log_probs[n, k] = <w_k, x_n + delta>: d mean_n / d delta = w_k
    log_probs = torch.stack([((x + delta) * w).sum(dim=(1, 2, 3)) for w in weights], dim=1)  # (5, 3)
    assert torch.allclose(class_reach(log_probs, delta), weights.abs().sum(dim=(1, 2, 3, 4)))


def test_reach_ratio_is_finite_and_reproducible(random_backbone: ClipBackbone, pool: torch.Tensor) -> None:
    model = PromptedCLIP(random_backbone, CoCoOpLearner(random_backbone, NAMES, seed=1)).eval()
    twin = ReferenceModel(model).zero_shot()
    a = reach_ratio(model, twin, pool[:8], bf16=False)
    assert a.shape == (4,) and bool(torch.isfinite(a).all()) and bool((a > 0).all())
    assert torch.equal(a, reach_ratio(model, twin, pool[:8], bf16=False))
    assert all(p.grad is None for p in model.parameters())  # only the shared delta was differentiated


def test_ci_ranks_image_conditioned_prompts_by_reach_and_adds_their_families(random_backbone: ClipBackbone,
                                                                             pool: torch.Tensor) -> None:
    cocoop = PromptedCLIP(random_backbone, CoCoOpLearner(random_backbone, NAMES, seed=1))
    res = detect(cocoop, pool, SMALL, seed=0)
    ev = [c.evidence for c in res.classes]
    assert all({"reach_ratio", "reach_anomaly", "prompt_drift", "drift_anomaly"} <= e.keys() for e in ev)
    cand = [k for k, e in enumerate(ev) if e["candidate"]]
    assert cand == [max(range(4), key=lambda k: ev[k]["reach_anomaly"])]
    assert {"gain_sticker", "gain_additive"} <= ev[cand[0]].keys()  # sticker, then the conditioned family
    assert "gain_additive" not in ev[(cand[0] + 1) % 4]

    # switched off: drift ranks, the configured families alone
    plain = detect(cocoop, pool, replace(SMALL, conditioned_reach=False, conditioned_families=()), seed=0)
    pev = [c.evidence for c in plain.classes]
    assert not any("reach_ratio" in e for e in pev)
    k = next(i for i, e in enumerate(pev) if e["candidate"])
    assert k == max(range(4), key=lambda i: pev[i]["drift_anomaly"])
    assert "gain_additive" not in pev[k] and "gain_sticker" in pev[k]

    # a class-specific prompt keeps drift and its configured families
    csc = PromptedCLIP(random_backbone, CoOpLearner(random_backbone, NAMES, csc=True))
    cev = [c.evidence for c in detect(csc, pool, SMALL, seed=0).classes]
    assert not any("reach_ratio" in e or "gain_additive" in e for e in cev)


def test_conditioned_families_are_validated() -> None:
    assert DetectorConfig().families_for(False) == DetectorConfig().families
    assert DetectorConfig(families=("additive", "patch")).families_for(True) == ("additive", "patch")
    assert DetectorConfig().families_for(True) == (*DetectorConfig().families, "additive")
    with pytest.raises(ConfigError, match="conditioned_families"):
        DetectorConfig(conditioned_families=("hologram",))
