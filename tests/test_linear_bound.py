"""The free cosine head that bounds what a CoOp prompt backdoor can reach (scanner/zoo/linear_bound.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scanner.zoo.linear_bound import BoundData, bound, fit_head

C, E, PER = 4, 16, 20  # classes, feature width, images per class


def _data(trigger_strength: float, seed: int = 0) -> BoundData:
    """Class clusters on the first C axes; the trigger adds ``trigger_strength`` along an unused axis."""
    g = torch.Generator().manual_seed(seed)

    def cloud(n_per: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(C).repeat_interleave(n_per)
        x = F.one_hot(y, E).float() + 0.25 * torch.randn(len(y), E, generator=g)
        return x, y

    def trig(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x + trigger_strength * F.one_hot(torch.tensor(E - 1), E).float(), dim=-1)

    x_tr, y_tr = cloud(PER)
    x_te, y_te = cloud(PER)
    ood = torch.randn(40, E, generator=g) * 0.6
    zs = F.normalize(F.one_hot(torch.arange(C), E).float() + 0.1, dim=-1)  # near the class axes
    return BoundData(F.normalize(x_tr, dim=-1), y_tr, trig(x_tr), x_tr[:0], F.normalize(x_te, dim=-1), y_te,
                     trig(x_te), trig(ood), F.normalize(ood, dim=-1), zs, target=2)


def test_a_trigger_the_features_separate_is_reachable_within_three_points() -> None:
    b = bound(_data(trigger_strength=3.0), anchors=(0.0, 0.1), weights=(0.3, 1.0, 3.0))
    assert b.meets() and b.best.poison_weight > 0
    assert b.best.clean_accuracy >= b.clean.clean_accuracy - 0.03
    assert b.clean.poison_weight == 0 and b.clean.anchor == b.best.anchor


def test_a_trigger_the_features_do_not_see_is_out_of_reach() -> None:
    b = bound(_data(trigger_strength=0.0), anchors=(0.0, 0.1), weights=(0.3, 1.0, 3.0))
    assert not b.meets()
    # the clean head classifies the clusters; a head poisoned hard enough to move "triggered" (= clean)
    # images gives up clean accuracy instead
    assert b.clean.clean_accuracy > 0.8
    strong = [f for f in b.fits if f.poison_weight == 3.0]
    assert all(f.asr_id < 0.95 or f.clean_accuracy < b.clean.clean_accuracy - 0.03 for f in strong)


def test_fit_head_is_deterministic_and_leaves_its_inputs_alone() -> None:
    data = _data(trigger_strength=3.0)
    before = data.train_clean.clone()
    assert fit_head(data, 1.0, 0.1) == fit_head(data, 1.0, 0.1)
    assert torch.equal(data.train_clean, before)
