"""Backdoor attacks on prompt tuning (the encoders stay bit-identical)."""

from scanner.zoo.attacks.base import Attack
from scanner.zoo.attacks.registry import BUILTIN_ATTACKS, available_attacks, make_attack

__all__ = ["BUILTIN_ATTACKS", "Attack", "available_attacks", "make_attack"]
