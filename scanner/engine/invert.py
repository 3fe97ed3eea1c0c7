"""Trigger optimisation over an unlabelled image pool: the one loop every detector shares.

Gradients flow only into the trigger: the encoders and the prompt learner are frozen for the duration
(``frozen_learner``), so CoOp text features are computed once and cached by ``PromptedCLIP``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scanner.engine.triggers import Trigger
from scanner.errors import DetectionError
from scanner.prompting.classifier import PromptedCLIP

#: objective(logits (B, C) fp32, trigger) -> scalar loss to minimise
Objective = Callable[[torch.Tensor, Trigger], torch.Tensor]
#: differential objective(suspect logits (B, C), reference logits (B, C)) -> scalar loss
PairObjective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ReferenceModel:
    """The trusted twin of a prompt-tuned model: the same frozen encoders with plain zero-shot prompts.

    The encoders are public and the class names known, so this classifier cannot carry a prompt
    backdoor. A trigger that moves images into class k only because it *draws* class-k evidence
    (a red patch for "red") moves the reference too; a planted trigger moves the suspect alone.
    Its logits reuse the suspect's image features: no extra encoder pass.
    """

    def __init__(self, model: PromptedCLIP, template: str = "a {}.") -> None:
        bb = model.backbone
        with torch.no_grad():
            text = bb.encode_tokens(bb.tokenize([template.format(c) for c in model.classnames]))
        self.text = F.normalize(text.float(), dim=-1)  # (C, E)
        self.scale = float(bb.logit_scale)

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(image_features.float(), dim=-1) @ self.text.T


def differential_margin(target: int, kappa: float, weight: float = 1.0) -> PairObjective:
    """Suspect: target logit above every other (margin); reference: target probability kept low."""

    def f(suspect: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        z_t = suspect[:, target]
        other = suspect.clone()
        other[:, target] = -math.inf
        push = F.relu(other.max(dim=1).values - z_t + kappa).mean()
        keep = reference.softmax(dim=1)[:, target].mean()
        return push + weight * keep

    return f


def differential_collapse(weight: float = 1.0) -> PairObjective:
    """Untargeted: send the batch to the class the suspect favours *more than the reference does*.

    Natural sinks (classes both models give OOD images) cancel out, so the search slides into a
    planted shortcut when there is one, instead of into the most popular class.
    """

    def f(suspect: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        ps, pr = suspect.softmax(dim=1), reference.softmax(dim=1)
        k = int((ps.mean(dim=0) - pr.mean(dim=0)).argmax())
        ce = F.cross_entropy(suspect, torch.full((suspect.shape[0],), k, dtype=torch.long))
        return ce + weight * pr[:, k].mean()

    return f


@contextlib.contextmanager
def frozen_learner(model: PromptedCLIP) -> Iterator[None]:
    """Freeze the prompt learner (restoring its flags afterwards) and keep the model in eval mode."""
    params = list(model.learner.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    for p in params:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)


def autocast(enabled: bool) -> contextlib.AbstractContextManager[object]:
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def margin_loss(target: int, kappa: float) -> Objective:
    """Targeted margin: mean over images of max(max_{j != t} z_j - z_t + kappa, 0) (C&W style).

    Once an image is kappa past the boundary it stops contributing, so the trigger is not pushed
    to ever-larger margins on easy images: what remains is the hardest images' gap to the target.
    """

    def f(logits: torch.Tensor, trigger: Trigger) -> torch.Tensor:
        z_t = logits[:, target]
        other = logits.clone()
        other[:, target] = -math.inf
        return F.relu(other.max(dim=1).values - z_t + kappa).mean()

    return f


@dataclass(frozen=True)
class InversionSchedule:
    batch_size: int
    epochs: int
    lr: float
    bf16: bool


def _adam_loop(trigger: Trigger, pool: torch.Tensor, schedule: InversionSchedule, generator: torch.Generator,
               batch_loss: Callable[[torch.Tensor], torch.Tensor],
               size_weight: float | Callable[[int], float]) -> list[float]:
    """Adam on the trigger's parameters over ``pool`` (N, 3, S, S): one step per batch of clean images,
    ``batch_loss(x)`` + weight * trigger.size(); raises DetectionError when the loss stops being finite."""
    opt = torch.optim.Adam(trigger.parameters(), lr=schedule.lr, betas=(0.5, 0.9))
    n = pool.shape[0]
    losses: list[float] = []
    step = 0
    for _ in range(schedule.epochs):
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - schedule.batch_size + 1, schedule.batch_size):
            loss = batch_loss(pool[order[i:i + schedule.batch_size]])
            w = size_weight(step) if callable(size_weight) else size_weight
            if w:
                loss = loss + w * trigger.size()
            if not torch.isfinite(loss):
                raise DetectionError(
                    f"the trigger optimisation diverged (loss {float(loss.detach())} at step {step}); the "
                    "model's forward produces non-finite values — check the checkpoint for NaN/inf weights"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
    return losses


def optimise(model: PromptedCLIP, trigger: Trigger, pool: torch.Tensor, objective: Objective,
             schedule: InversionSchedule, generator: torch.Generator,
             size_weight: float | Callable[[int], float] = 0.0) -> list[float]:
    """Optimise ``trigger`` for ``objective`` on the suspect's logits; returns the per-step losses.
    ``size_weight`` adds weight * trigger.size() to the loss (a constant or a function of the step)."""

    def batch_loss(x: torch.Tensor) -> torch.Tensor:
        with autocast(schedule.bf16):
            logits = model(trigger(x)).float()
        return objective(logits, trigger)

    return _adam_loop(trigger, pool, schedule, generator, batch_loss, size_weight)


def optimise_pair(model: PromptedCLIP, reference: ReferenceModel, trigger: Trigger, pool: torch.Tensor,
                  objective: PairObjective, schedule: InversionSchedule, generator: torch.Generator,
                  size_weight: float = 0.0) -> list[float]:
    """Like :func:`optimise`, for objectives that compare the suspect with its reference twin."""

    def batch_loss(x: torch.Tensor) -> torch.Tensor:
        with autocast(schedule.bf16):
            feats = model.encode_images(trigger(x))
            suspect = model.logits_from_features(feats).float()
        return objective(suspect, reference.logits(feats))

    return _adam_loop(trigger, pool, schedule, generator, batch_loss, size_weight)


@torch.no_grad()
def _shares(model: PromptedCLIP, reference: ReferenceModel | None, trigger: Trigger | None, pool: torch.Tensor,
            bf16: bool, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class prediction shares (C,) of the suspect and (zeros when None) of the reference."""
    cs = torch.zeros(model.n_cls)
    cr = torch.zeros(model.n_cls)
    for i in range(0, pool.shape[0], batch_size):
        x = pool[i:i + batch_size]
        if trigger is not None:
            x = trigger(x)
        with autocast(bf16):
            feats = model.encode_images(x)
            ps = model.logits_from_features(feats).float().argmax(dim=1)
        cs += torch.bincount(ps, minlength=model.n_cls).float()
        if reference is not None:
            cr += torch.bincount(reference.logits(feats).argmax(dim=1), minlength=model.n_cls).float()
    return cs / pool.shape[0], cr / pool.shape[0]


def pair_shares(model: PromptedCLIP, reference: ReferenceModel, trigger: Trigger | None, pool: torch.Tensor,
                bf16: bool, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Shares of ``pool`` predicted as each class by the suspect and by the reference: ((C,), (C,))."""
    return _shares(model, reference, trigger, pool, bf16, batch_size)


def class_shares(model: PromptedCLIP, trigger: Trigger | None, pool: torch.Tensor, bf16: bool,
                 batch_size: int = 256) -> torch.Tensor:
    """Share of ``pool`` predicted as each class (C,), with the trigger applied (or clean if None)."""
    return _shares(model, None, trigger, pool, bf16, batch_size)[0]
