"""Re-align a backdoored prompt: prompt-tune on correctly labelled clean *and triggered* images.

``repair_prompt(model, images, labels, triggers, cfg, seed=...)`` is pure over tensors and a model: the
input model is left untouched and a new :class:`PromptedCLIP` (same frozen backbone, a new learner) is
returned with before/after measures. Only the prompt learner is optimised, so the encoders stay
bit-identical. The reconstructed triggers come from a detection (``DetectionResult.raw_triggers``);
they are stamped on copies of the user's labelled images *under their true labels*, so the prompt
unlearns the shortcut instead of only hiding it.

Modes: ``finetune`` starts from the delivered prompt (the paper's re-alignment); ``reinit`` starts from a
fresh context and re-tunes on the same set. ``reinit`` is legitimate here because the encoders are frozen
and public: a prompt backdoor lives in the prompt alone, so discarding it and re-tuning on trusted
labelled data cannot keep it — at the cost of the provider's tuning (clean accuracy then reflects the
user's few-shot data).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from scanner.engine.triggers import raw_form
from scanner.errors import ConfigError, DatasetError
from scanner.prompting.classifier import PromptedCLIP
from scanner.prompting.learners import learner_from_config
from scanner.prompting.train import UNLABELLED, TrainConfig, train_prompt
from scanner.repair.augment import generic_overlays, stamp_triggers
from scanner.repair.config import RepairConfig
from scanner.repair.pseudo import balanced_pick, model_labels, twin_text_features, zero_shot_labels
from scanner.repair.reference import GuardChoice, choose_guard
from scanner.repair.reinvert import residual_triggers

MEASURE_SEED_OFFSET = 7717  # the fixed draw of triggered images for before/after measures


@dataclass
class RepairMeasure:
    """What can be measured on the user's labelled images (the repair's own data: optimistic after)."""

    clean_accuracy: float  # accuracy on the labelled images
    triggered_accuracy: float | None  # accuracy on the same images carrying a reconstructed trigger (true labels)
    target_share: float | None  # share of those (true class != suspected target) predicted as the suspected target

    def to_dict(self) -> dict[str, float | None]:
        return {"clean_accuracy": self.clean_accuracy, "triggered_accuracy": self.triggered_accuracy,
                "target_share": self.target_share}


@dataclass
class RepairResult:
    """The repaired model and what the repair did."""

    model: PromptedCLIP  # same backbone object, a new prompt learner
    mode: str
    before: RepairMeasure
    after: RepairMeasure
    n_images: int  # labelled clean images given
    n_trained: int  # images in the repair set (clean + triggered + generic copies)
    trigger_forms: list[str]  # raw form of every reconstructed trigger used
    target_index: int | None  # the suspected target the measures refer to
    steps: int
    epochs: int
    seconds: float
    seed: int
    config: dict[str, Any] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    residual_forms: list[str] = field(default_factory=list)  # raw form of each trigger re-inverted after pass one
    # the class guarded, checked against the labelled images (``cfg.reference_suspect``, repair/reference.py)
    guard_choice: GuardChoice | None = None

    @property
    def guarded(self) -> int | None:
        """The class the repair guarded and kept out of the OOD pseudo-labels: the checked choice when there is one,
        else the suspected target."""
        return self.guard_choice.guarded if self.guard_choice is not None else self.target_index

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (everything but the model)."""
        return {
            "mode": self.mode, "before": self.before.to_dict(), "after": self.after.to_dict(),
            "n_images": self.n_images, "n_trained": self.n_trained, "trigger_forms": list(self.trigger_forms),
            "target_index": self.target_index, "steps": self.steps, "epochs": self.epochs,
            "seconds": round(self.seconds, 3), "seed": self.seed, "config": dict(self.config),
            "residual_forms": list(self.residual_forms),
            "guard_choice": None if self.guard_choice is None else self.guard_choice.to_dict(),
            "losses": [round(v, 5) for v in self.losses],
        }


def validate_repair_data(model: PromptedCLIP, images: torch.Tensor, labels: torch.Tensor,
                         cfg: RepairConfig) -> None:
    """DatasetError (what is wrong, what to do) unless ``images`` / ``labels`` can repair ``model``."""
    size = model.backbone.image_size
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise DatasetError(f"repair images must be RGB (N, 3, {size}, {size}); got {shape}")
    if images.shape[-2:] != (size, size):
        raise DatasetError(f"repair images are {images.shape[-2]}x{images.shape[-1]}; the backbone takes {size}x{size}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DatasetError(f"labels must be (N,) with N = {images.shape[0]}; got {tuple(labels.shape)}")
    if not torch.isfinite(images).all() or float(images.min()) < 0 or float(images.max()) > 1:
        raise DatasetError("repair images must hold finite pixel values in [0, 1]")
    if images.shape[0] and (int(labels.min()) < 0 or int(labels.max()) >= model.n_cls):
        raise DatasetError(f"labels must lie in [0, {model.n_cls}); found {int(labels.min())}..{int(labels.max())}")
    counts = torch.bincount(labels.long(), minlength=model.n_cls) if images.shape[0] else torch.zeros(model.n_cls)
    short = [(model.classnames[k], int(counts[k])) for k in range(model.n_cls) if counts[k] < cfg.min_per_class]
    if short:
        listed = ", ".join(f"{n!r} ({c})" for n, c in short[:6]) + (" …" if len(short) > 6 else "")
        raise DatasetError(
            f"too few labelled images: every class needs at least {cfg.min_per_class} (few-shot is enough, "
            f"16 per class is typical); these have fewer: {listed}. Add images for them"
        )


def _validate_triggers(triggers: Sequence[torch.Tensor], size: int, device: torch.device) -> list[torch.Tensor]:
    out = []
    for i, raw in enumerate(triggers):
        try:
            raw_form(raw)
        except ValueError as exc:
            raise ConfigError(f"reconstructed trigger {i}: {exc}") from exc
        if raw.shape[-1] != size:
            raise ConfigError(f"reconstructed trigger {i} is {raw.shape[-1]} px; the backbone takes {size} px")
        if not torch.isfinite(raw).all():
            raise ConfigError(f"reconstructed trigger {i} holds non-finite values")
        out.append(raw.detach().float().to(device))
    return out


@torch.no_grad()
def measure(model: PromptedCLIP, images: torch.Tensor, labels: torch.Tensor, triggered: torch.Tensor | None,
            target: int | None) -> RepairMeasure:
    """Clean accuracy, and with a triggered copy of ``images`` its accuracy and target share."""
    pred = model.predict(images).argmax(dim=1)
    clean = float((pred == labels).float().mean())
    if triggered is None or triggered.shape[0] == 0:
        return RepairMeasure(clean, None, None)
    tp = model.predict(triggered).argmax(dim=1)
    acc = float((tp == labels).float().mean())
    share = None
    if target is not None:
        keep = labels != target
        share = float((tp[keep] == target).float().mean()) if bool(keep.any()) else None
    return RepairMeasure(clean, acc, share)


def _new_model(model: PromptedCLIP, mode: str, seed: int) -> PromptedCLIP:
    """A new learner of the same type and shape on the same backbone: a copy (finetune) or fresh (reinit)."""
    old = model.learner
    learner = learner_from_config(model.backbone, old.classnames, old.config(), seed=seed)
    learner.init = old.init
    if mode == "finetune":
        learner.load_state_dict(old.state_dict())
    return PromptedCLIP(model.backbone, learner.to(old.ctx.device))


def ood_part(model: PromptedCLIP, ood: torch.Tensor, cfg: RepairConfig, target: int | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The unlabelled photos a repair trains on, (k, 3, S, S), and their labels (k,): the first ``cfg.ood_images``
    of ``ood`` (M, 3, S, S) labelled by ``cfg.ood_labels`` (``UNLABELLED`` for "outlier"), or with
    ``cfg.ood_balance`` picked from all of them by a class quota; never ``target`` with ``cfg.ood_avoid_target``."""
    if cfg.ood_labels == "outlier":  # no class at all: pulled to the uniform distribution
        extra = ood[: cfg.ood_images]
        return extra, torch.full((extra.shape[0],), UNLABELLED, dtype=torch.long)
    avoid = target if cfg.ood_avoid_target else None
    labeller = zero_shot_labels if cfg.ood_labels == "zero-shot" else model_labels
    if cfg.ood_balance:  # the whole pool labelled, then a class quota (pseudo.balanced_pick)
        every = labeller(model, ood, avoid=avoid).cpu()  # (M,)
        pick = balanced_pick(every, cfg.ood_images, model.n_cls)
        return ood[pick.to(ood.device)], every[pick]
    extra = ood[: cfg.ood_images]
    return extra, labeller(model, extra, avoid=avoid).cpu()


def repair_prompt(model: PromptedCLIP, images: torch.Tensor, labels: torch.Tensor,
                  triggers: Sequence[torch.Tensor], cfg: RepairConfig | None = None, *, seed: int = 0,
                  target: int | None = None, ood: torch.Tensor | None = None) -> RepairResult:
    """Re-align ``model``'s prompt with correctly labelled clean and triggered images.

    images: (N, 3, S, S) in [0, 1], labels: (N,) class indices (few-shot: >= ``cfg.min_per_class`` per
    class); triggers: reconstructed raw triggers (C, S, S) (``DetectionResult.raw_triggers`` values,
    the suspected target's first); target: the suspected target class (for the target-share measure);
    ood: unlabelled images (M, 3, S, S) — with ``cfg.ood_images`` > 0 the first of them join the repair
    set under pseudo-labels (``cfg.ood_labels``: the zero-shot twin's, by default, never ``target``:
    ``cfg.ood_avoid_target``; ``ood_part``), with the same triggered / overlaid copies: a triggered photo must not
    land in the target either. When
    ``cfg.reinvert_families`` is not empty and a ``target`` and ``ood`` images are given, a second pass
    follows: CI's inversion is run against the repaired prompt and what still sends photos into the target
    is stamped and unlearned too (``repair/reinvert.py``). With ``cfg.target_guard`` > 0 and a ``target``, every
    row of another class also pays ``target_guard`` * -log(1 - p_target) (``TrainConfig.guard_weight``): the
    target must not take the repaired prompt's mistakes either. With ``cfg.reference_suspect`` (CoOp learners), the
    guarded and avoided class is checked against ``images``: the class whose prompt drifted furthest from a fresh
    prompt tuned on them replaces ``target`` when it stands out further (``repair/reference.py``); the measures keep
    ``target``.
    Returns a :class:`RepairResult` holding a *new* model; ``model`` is not modified. Same seed and
    inputs give the same repair.
    """
    cfg = cfg or RepairConfig()
    start = time.perf_counter()
    labels = labels.long()
    validate_repair_data(model, images, labels, cfg)
    trigs = _validate_triggers(list(triggers)[: cfg.max_triggers], model.backbone.image_size, images.device)
    if ood is not None and cfg.ood_images > 0:
        size = model.backbone.image_size
        if ood.ndim != 4 or tuple(ood.shape[1:]) != (3, size, size):
            raise DatasetError(f"OOD images must be (M, 3, {size}, {size}); got {tuple(ood.shape)}")
        if not torch.isfinite(ood).all() or float(ood.min()) < 0 or float(ood.max()) > 1:
            raise DatasetError("OOD images must hold finite pixel values in [0, 1]")
    if target is not None and not 0 <= target < model.n_cls:
        raise ConfigError(f"target {target} is not a class index of this model (0..{model.n_cls - 1})")
    images = images.float()
    choice = choose_guard(model, images, labels, cfg, seed, ood, target) if cfg.reference_suspect else None
    guarded = choice.guarded if choice is not None else target  # guarded and kept out of the OOD pseudo-labels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        eval_gen = torch.Generator().manual_seed(seed + MEASURE_SEED_OFFSET)
        probe = stamp_triggers(images, trigs, 1, 0, eval_gen) if trigs else None
        before = measure(model, images, labels, probe, target)

        copies = cfg.trigger_copies if trigs else 0
        base_x, base_y = images, labels
        if ood is not None and cfg.ood_images > 0:
            extra, pseudo = ood_part(model, ood.to(images), cfg, guarded)
            base_x, base_y = torch.cat([images, extra]), torch.cat([labels, pseudo.to(labels.device)])
        parts = [base_x, stamp_triggers(base_x, trigs, copies, cfg.max_shift, gen),
                 generic_overlays(base_x, cfg.generic_copies, gen)]
        x = torch.cat(parts)
        y = torch.cat([base_y, base_y.repeat(copies), base_y.repeat(cfg.generic_copies)])
        repaired = _new_model(model, cfg.mode, seed)
        epochs = cfg.epochs if cfg.mode == "finetune" else cfg.reinit_epochs
        steps_per_epoch = math.ceil(x.shape[0] / cfg.batch_size)
        cap = cfg.max_steps_conditioned if model.learner.image_conditioned else cfg.max_steps
        epochs = max(1, min(epochs, cap // steps_per_epoch))
        train_cfg = TrainConfig(epochs=epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=seed, bf16=cfg.bf16,
                                anchor_weight=cfg.twin_anchor, guard_class=guarded,
                                guard_weight=cfg.target_guard)
        anchor = twin_text_features(model) if cfg.twin_anchor > 0 else None
        record = train_prompt(repaired, x, y, train_cfg, text_anchor=anchor)
        steps, losses = record.steps, list(record.losses)
        residual: list[torch.Tensor] = []
        if cfg.reinvert_families and guarded is not None and ood is not None:
            # what still sends photos into the guarded class after the first pass joins the set (repair/reinvert.py)
            residual = residual_triggers(repaired, guarded, ood.to(images), cfg.reinvert_families,
                                         cfg.reinvert_images, gen)
            copies = cfg.trigger_copies or 1
            x = torch.cat([x, stamp_triggers(base_x, residual, copies, cfg.max_shift, gen)])
            y = torch.cat([y, base_y.repeat(copies)])
            per_epoch = math.ceil(x.shape[0] / cfg.batch_size)
            second = max(1, min(cfg.reinvert_epochs, (cap // 2) // per_epoch))  # its own cap: half the first's
            record = train_prompt(repaired, x, y, replace(train_cfg, epochs=second), text_anchor=anchor)
            steps, losses, epochs = steps + record.steps, losses + list(record.losses), epochs + second
        after = measure(repaired, images, labels, probe, target)
    return RepairResult(
        model=repaired, mode=cfg.mode, before=before, after=after, n_images=images.shape[0], n_trained=x.shape[0],
        trigger_forms=[raw_form(t) for t in trigs], target_index=target, steps=steps, epochs=epochs,
        seconds=time.perf_counter() - start, seed=seed, config=cfg.to_dict(), losses=losses,
        residual_forms=[raw_form(t) for t in residual], guard_choice=choice,
    )
