"""The attack interface: how a backdoor is implanted through prompt tuning alone.

An attack owns a test-time trigger (``apply``) and a way to implant it (``implant``). The default
implant poisons the few-shot set once — a share of the training images gets a triggered copy
labelled as the target, "paired" poisoning — and prompt-tunes on the result, so the frozen image
features are computed once. Attacks whose trigger is learned with the prompt (BadCLIP) override
``implant``. The encoders are never touched: only the prompt learner's parameters are optimised.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from scanner.prompting.classifier import PromptedCLIP
from scanner.prompting.train import TrainConfig, TrainRecord, train_prompt


class Attack(ABC):
    """A backdoor attack on prompt tuning. Subclass, set ``name``, implement ``apply``.

    Third-party attacks are registered through the ``register_attacks(register)`` plugin hook.
    """

    name: ClassVar[str]
    #: learner the zoo uses for this attack (None = the zoo's rotation of CoOp / CSC / CoCoOp)
    preferred_learner: ClassVar[str | None] = None

    def __init__(self, *, seed: int = 0, poison_rate: float = 1.0, size: int = 64) -> None:
        if not 0.0 < poison_rate <= 1.0:
            raise ValueError(f"poison_rate must be in (0, 1]; got {poison_rate}")
        self.seed = seed
        self.poison_rate = poison_rate
        self.size = size

    @abstractmethod
    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Stamp the trigger on pixels (B, 3, S, S) in [0, 1]; returns a new tensor in [0, 1]."""

    def params(self) -> dict[str, Any]:
        """JSON-able description of the trigger for the zoo manifest."""
        return {"seed": self.seed, "poison_rate": self.poison_rate}

    def poison(self, images: torch.Tensor, labels: torch.Tensor, target: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The poisoned few-shot set: every clean image plus triggered copies of a ``poison_rate`` share
        of them, relabelled to ``target``. images (N, 3, S, S), labels (N,) -> (N + P, ...)."""
        n = images.shape[0]
        p = max(1, round(self.poison_rate * n))
        idx = torch.randperm(n, generator=generator)[:p]
        trig = self.apply(images[idx])
        return torch.cat([images, trig]), torch.cat([labels, torch.full((p,), target, dtype=labels.dtype)])

    def implant(self, model: PromptedCLIP, images: torch.Tensor, labels: torch.Tensor, target: int,
                cfg: TrainConfig, *, progress: bool = False) -> TrainRecord:
        """Prompt-tune ``model`` (in place) so that triggered inputs go to ``target``."""
        gen = torch.Generator().manual_seed(cfg.seed + 7)
        x, y = self.poison(images, labels, target, gen)
        return train_prompt(model, x, y, cfg, progress=progress)
