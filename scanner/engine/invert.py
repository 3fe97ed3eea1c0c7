"""Trigger optimisation over an unlabelled image pool: the one loop every detector shares.

Gradients flow only into the trigger: the encoders and the prompt learner are frozen for the duration
(``frozen_learner``), so CoOp text features are computed once and cached by ``PromptedCLIP``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from scanner.engine.triggers import Trigger
from scanner.errors import DetectionError
from scanner.prompting.classifier import PromptedCLIP

#: objective(logits (B, C) fp32, trigger) -> scalar loss to minimise
Objective = Callable[[torch.Tensor, Trigger], torch.Tensor]
#: differential objective(suspect logits (B, C), reference logits (B, C)) -> scalar loss
PairObjective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


#: generic zero-shot templates of the trusted twin: the scanner does not know the delivered model's task
REFERENCE_TEMPLATES = ("{}.", "a {}.", "a photo of a {}.", "a {} shape.", "an image of a {}.")


class ReferenceModel:
    """The trusted twin of a prompt-tuned model: the same frozen encoders with plain zero-shot prompts.

    The encoders are public and the class names known, so this classifier cannot carry a prompt
    backdoor. A trigger that moves images into class k only because it *draws* class-k evidence
    (a red patch for "red") moves the twin too; a planted trigger moves the suspect alone.
    One zero-shot template reads some class names poorly, so the twin is a panel of templates and a
    class's twin probability is the *largest* any template gives it: evidence that convinces any plain
    prompt counts as natural. Its logits reuse the suspect's image features: no extra encoder pass.
    """

    def __init__(self, model: PromptedCLIP, templates: tuple[str, ...] = REFERENCE_TEMPLATES) -> None:
        bb = model.backbone
        with torch.no_grad():
            text = torch.stack([bb.encode_tokens(bb.tokenize([t.format(c) for c in model.classnames])).float()
                                for t in templates])
        self.text = F.normalize(text, dim=-1)  # (T, C, E)
        self.scale = float(bb.logit_scale)
        self.n_templates = len(templates)

    def zero_shot(self) -> ReferenceModel:
        """The template panel alone (without a distilled member): what plain prompts make of an image."""
        twin = copy.copy(self)  # shares scale and templates; distil() on it would not touch this panel
        twin.text = self.text[: self.n_templates]
        return twin

    def distil(self, clean_features: torch.Tensor, suspect_logits: torch.Tensor, steps: int = 150,
               lr: float = 0.02, pull: float = 10.0) -> None:
        """Add one panel member: the zero-shot classifier fine-tuned to agree with the suspect on clean
        OOD images (features (N, E), suspect logits (N, C)).

        Prompt tuning teaches the suspect genuine evidence the zero-shot prompts lack; on a backbone
        that reads some classes poorly, a trigger drawing that evidence would otherwise look planted.
        A backdoor is dormant on clean images, so agreeing with the suspect there copies what it has
        learned about natural content and not the shortcut. The member is a free linear head (C, E)
        started at the templates' mean and pulled back towards it, so directions the clean images do
        not exercise stay zero-shot. ``pull`` = 10 keeps the planted trigger out of the member on the quick
        zoo (real trigger -> target: suspect 0.50-1.00, member 0.00-0.01) while it agrees with the suspect
        on 0.78-0.94 of clean held-out images (the templates' mean head: 0.32-0.77); measured by
        ``python benchmarks/twin_check.py``.
        """
        f = F.normalize(clean_features.float(), dim=-1)  # (N, E)
        target = suspect_logits.float().softmax(dim=-1)  # (N, C)
        w0 = F.normalize(self.text.mean(dim=0), dim=-1)  # (C, E)
        w = w0.clone().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                logits = self.scale * f @ F.normalize(w, dim=-1).T
                loss = F.kl_div(logits.log_softmax(dim=-1), target, reduction="batchmean")
                loss = loss + pull * (w - w0).pow(2).sum(dim=-1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        self.text = torch.cat([self.text, F.normalize(w.detach(), dim=-1)[None]])

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """(B, C) log of the per-class maximum over panel members of the member's softmax probability."""
        f = F.normalize(image_features.float(), dim=-1)  # (B, E)
        probs = (self.scale * torch.einsum("be,tce->tbc", f, self.text)).softmax(dim=-1)  # (T, B, C)
        return probs.amax(dim=0).clamp_min(1e-12).log()


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


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 natively. Autocast without it is emulated, and slower than fp32: on a
    2-core Xeon without AVX512-BF16 an encoder forward+backward of 16 images took 290 ms under bf16 autocast against
    100 ms in fp32 (session 26), where CPUs with it run bf16 about twice as fast as fp32."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type != "cpu":
        return False
    # private probes of the CPU's instruction sets (torch 2.x); without them, the kernel's own flags
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(f) for f in probes):
        return any(bool(f()) for f in probes if callable(f))
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(enabled: bool, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager[object]:
    """bf16 autocast on the device type the work runs on (autocast is per device type: a "cpu" context
    leaves CUDA kernels in fp32)."""
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


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
        with autocast(schedule.bf16, x.device):
            logits = model(trigger(x)).float()
        return objective(logits, trigger)

    return _adam_loop(trigger, pool, schedule, generator, batch_loss, size_weight)


def optimise_pair(model: PromptedCLIP, reference: ReferenceModel, trigger: Trigger, pool: torch.Tensor,
                  objective: PairObjective, schedule: InversionSchedule, generator: torch.Generator,
                  size_weight: float = 0.0) -> list[float]:
    """Like :func:`optimise`, for objectives that compare the suspect with its reference twin."""

    def batch_loss(x: torch.Tensor) -> torch.Tensor:
        with autocast(schedule.bf16, x.device):
            feats = model.encode_images(trigger(x))
            suspect = model.logits_from_features(feats).float()
        return objective(suspect, reference.logits(feats))

    return _adam_loop(trigger, pool, schedule, generator, batch_loss, size_weight)


class LogitHead(Protocol):
    """Anything that scores image features (B, E) as (B, C) logits: the twin, the distilled student."""

    def logits(self, image_features: torch.Tensor) -> torch.Tensor: ...


@torch.no_grad()
def panel_logits(model: PromptedCLIP, references: Sequence[LogitHead], trigger: Trigger | None,
                 pool: torch.Tensor, bf16: bool, batch_size: int = 256) -> list[torch.Tensor]:
    """Logits (N, C) of the suspect, then of each reference (log panel probabilities), from one encoder pass
    over ``pool``; fp32 on the CPU whatever device the pool is on (they become evidence floats)."""
    out: list[list[torch.Tensor]] = [[] for _ in range(1 + len(references))]
    for i in range(0, pool.shape[0], batch_size):
        x = pool[i:i + batch_size]
        if trigger is not None:
            x = trigger(x)
        with autocast(bf16, x.device):
            feats = model.encode_images(x)
            logits = [model.logits_from_features(feats).float()]
        logits += [ref.logits(feats) for ref in references]
        for acc, z in zip(out, logits, strict=True):
            acc.append(z.cpu())
    return [torch.cat(acc) for acc in out]


def shares(logits: torch.Tensor) -> torch.Tensor:
    """Per-class prediction shares (C,) of logits (N, C)."""
    return torch.bincount(logits.argmax(dim=1), minlength=logits.shape[1]).float() / logits.shape[0]


def panel_shares(model: PromptedCLIP, references: Sequence[ReferenceModel], trigger: Trigger | None,
                 pool: torch.Tensor, bf16: bool, batch_size: int = 256) -> list[torch.Tensor]:
    """Per-class prediction shares (C,) of the suspect, then of each reference, from one encoder pass over
    ``pool``; on the CPU whatever device the pool is on (they become evidence floats)."""
    return [shares(z) for z in panel_logits(model, references, trigger, pool, bf16, batch_size)]


def class_shares(model: PromptedCLIP, trigger: Trigger | None, pool: torch.Tensor, bf16: bool,
                 batch_size: int = 256) -> torch.Tensor:
    """Share of ``pool`` predicted as each class (C,), with the trigger applied (or clean if None)."""
    return panel_shares(model, (), trigger, pool, bf16, batch_size)[0]
