"""Attacks: triggers stamp what they claim, poisoning relabels, the registry accepts plugin attacks."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from scanner.errors import ConfigError
from scanner.zoo.attacks import BUILTIN_ATTACKS, Attack, available_attacks, make_attack
from scanner.zoo.attacks.badnets import BadNets
from scanner.zoo.attacks.blended import Blended


@pytest.fixture()
def images() -> torch.Tensor:
    return torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_the_four_attacks_are_built_in() -> None:
    assert set(BUILTIN_ATTACKS) == {"badnets", "blended", "wanet", "badclip"}


@pytest.mark.parametrize("name", ["badnets", "blended", "wanet"])
def test_triggers_are_deterministic_and_stay_in_range(name: str, images: torch.Tensor) -> None:
    a, b = make_attack(name, seed=1), make_attack(name, seed=1)
    out = a.apply(images)
    assert out.shape == images.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.equal(out, b.apply(images))
    assert not torch.equal(out, images)
    # the trigger is fixed by the seed (BadNets' default checker pattern is seed-free; its random one is not)
    params = {"pattern": "random"} if name == "badnets" else {}
    assert not torch.equal(make_attack(name, seed=1, **params).apply(images),
                           make_attack(name, seed=2, **params).apply(images))


def test_badnets_changes_only_its_patch(images: torch.Tensor) -> None:
    out = BadNets(patch=8, position="bottom-right").apply(images)
    changed = (out != images).any(dim=1)  # (B, S, S)
    assert changed[:, 55:63, 55:63].all()
    changed[:, 55:63, 55:63] = False
    assert not changed.any()


def test_blended_is_a_convex_mix(images: torch.Tensor) -> None:
    atk = Blended(alpha=0.2)
    torch.testing.assert_close(atk.apply(images), 0.8 * images + 0.2 * atk.pattern)


def test_poison_appends_relabelled_triggered_copies(images: torch.Tensor) -> None:
    atk = make_attack("badnets", poison_rate=0.5)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    x, y = atk.poison(images, labels, target=2, generator=torch.Generator().manual_seed(0))
    assert x.shape[0] == 9 and torch.equal(y[:6], labels) and (y[6:] == 2).all()
    assert torch.equal(x[:6], images)


def test_wanet_adds_noise_mode_samples_with_true_labels(images: torch.Tensor) -> None:
    atk = make_attack("wanet", poison_rate=0.5, noise_rate=1.0)
    labels = torch.arange(6)
    x, y = atk.poison(images, labels, target=5, generator=torch.Generator().manual_seed(0))
    assert x.shape[0] == 12 and (y[6:9] == 5).all() and set(y[9:].tolist()) <= set(labels.tolist())


def test_unknown_attack_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown attack .nope.*badnets"):
        make_attack("nope")


class StripeAttack(Attack):
    """An example third-party attack: a magenta stripe along the top edge."""

    name: ClassVar[str] = "stripe-example"

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        out = images.clone()
        out[:, :, :3, :] = torch.tensor([1.0, 0.0, 1.0]).view(3, 1, 1)
        return out


def test_a_plugin_attack_is_registered_through_the_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    from scanner import plugins
    from scanner.hookspecs import hookimpl

    class ExamplePlugin:
        @hookimpl
        def register_attacks(self, register):  # type: ignore[no-untyped-def]
            register(StripeAttack)

    pm = plugins.load_plugins()
    pm.register(ExamplePlugin(), name="example-attack-plugin")
    try:
        assert available_attacks()["stripe-example"] is StripeAttack
        atk = make_attack("stripe-example")
        assert (atk.apply(torch.zeros(1, 3, 8, 8))[0, :, 0, 0] == torch.tensor([1.0, 0.0, 1.0])).all()
    finally:
        pm.unregister(name="example-attack-plugin")
