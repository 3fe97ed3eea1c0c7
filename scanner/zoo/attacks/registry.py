"""Attack registry: the built-in four plus whatever plugins register through ``register_attacks``."""

from __future__ import annotations

from typing import Any

from scanner.errors import ConfigError
from scanner.zoo.attacks.badclip import BadCLIP
from scanner.zoo.attacks.badnets import BadNets
from scanner.zoo.attacks.base import Attack
from scanner.zoo.attacks.blended import Blended
from scanner.zoo.attacks.wanet import WaNet

BUILTIN_ATTACKS: dict[str, type[Attack]] = {a.name: a for a in (BadNets, Blended, WaNet, BadCLIP)}


def available_attacks() -> dict[str, type[Attack]]:
    """Name -> attack class, built-ins first, then plugin attacks (plugins cannot shadow a built-in)."""
    out = dict(BUILTIN_ATTACKS)
    try:
        from scanner.plugins import plugin_attacks
    except ImportError:  # plugin machinery not importable: built-ins only
        return out
    for cls in plugin_attacks():
        if cls.name in out and out[cls.name] is not cls:
            raise ConfigError(f"attack name {cls.name!r} is registered twice (built-in and a plugin); rename one")
        out[cls.name] = cls
    return out


def make_attack(name: str, **params: Any) -> Attack:
    attacks = available_attacks()
    if name not in attacks:
        raise ConfigError(f"unknown attack {name!r}; expected one of: {', '.join(attacks)}")
    return attacks[name](**params)
