"""Few-shot prompt tuning of a :class:`PromptedCLIP`: only the prompt learner is optimised.

The encoders are frozen, so when batches are not transformed the image features of the training set
are computed once and every step runs only the text encoder (plus the meta-net for CoCoOp). A
``batch_transform`` hook (used by attacks to poison batches) forces per-batch image encoding.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from scanner.errors import ConfigError
from scanner.prompting.classifier import PromptedCLIP

#: (images (b, 3, S, S), labels (b,), generator) -> (images (b', 3, S, S), labels (b',)); must not
#: touch the model. Called once per batch with the training run's generator (reproducible poisoning).
BatchTransform = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


UNLABELLED = -1  # the label of an outlier image: no class (train_prompt pulls it to the uniform distribution)


@dataclass(frozen=True)
class TrainConfig:
    """Few-shot prompt-tuning settings. Defaults were measured on the bundled tiny CLIP (see README)."""

    epochs: int = 40  # passes over the few-shot set (CoOp uses 50-200 with SGD; AdamW converges faster)
    lr: float = 3e-3  # peak learning rate
    batch_size: int = 32  # images per step
    optimizer: str = "adamw"  # "adamw" or "sgd" (momentum 0.9, CoOp's choice)
    weight_decay: float = 0.0  # decaying the context towards 0 has no meaning for prompt vectors
    warmup_steps: int = 5  # linear warm-up before the cosine decay to 0
    seed: int = 0  # shuffling order and the generator handed to batch_transform
    bf16: bool = False  # CPU bf16 autocast: faster on AMX/AVX512-BF16 CPUs; the prompt stays fp32
    feature_batch_size: int = 256  # images per image-encoder call when precomputing features
    # weight of KgCoOp's pull (Yao et al., CVPR 2023): squared distance of the learned text features from a
    # given anchor (train_prompt's text_anchor, e.g. the zero-shot twin's), summed over E, mean over classes
    anchor_weight: float = 0.0
    # weight of the outlier-exposure term (Hendrycks et al., ICLR 2019) for rows labelled UNLABELLED: cross-entropy
    # to the uniform distribution, mean over those rows, added to the labelled rows' mean cross-entropy
    outlier_weight: float = 0.5
    # a guarded class (e.g. a repair's suspected backdoor target): for every labelled row of another class,
    # guard_weight times -log(1 - p_guard) is added (mean over those rows), a cost on sending that row to the guarded
    # class on top of cross-entropy's; None: no such term
    guard_class: int | None = None
    guard_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.feature_batch_size < 1:
            raise ConfigError(
                f"epochs, batch_size and feature_batch_size must be >= 1; got {self.epochs}, "
                f"{self.batch_size}, {self.feature_batch_size}"
            )
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0; got {self.lr}")
        if not self.anchor_weight >= 0:
            raise ConfigError(f"anchor_weight must be >= 0; got {self.anchor_weight}")
        if not self.outlier_weight >= 0:
            raise ConfigError(f"outlier_weight must be >= 0; got {self.outlier_weight}")
        if not self.guard_weight >= 0:
            raise ConfigError(f"guard_weight must be >= 0; got {self.guard_weight}")
        if self.guard_class is not None and self.guard_class < 0:
            raise ConfigError(f"guard_class must be a class index >= 0 or None; got {self.guard_class}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"optimizer must be 'adamw' or 'sgd'; got {self.optimizer!r}")


@dataclass
class TrainRecord:
    """What a training run did: per-epoch mean loss and training accuracy, steps and wall time."""

    losses: list[float] = field(default_factory=list)  # mean cross-entropy per epoch
    accuracies: list[float] = field(default_factory=list)  # training accuracy per epoch (on what was fed)
    steps: int = 0
    seconds: float = 0.0
    precomputed_features: bool = False  # True when the image encoder ran once, not per batch
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else math.nan

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _autocast(enabled: bool, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    # autocast is per device type: a "cpu" context would leave CUDA kernels in fp32
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def _schedule(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _loss(logits: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Mean cross-entropy of the labelled rows of ``logits`` (B, C), plus ``cfg.outlier_weight`` times the mean
    cross-entropy to the uniform distribution of the rows labelled ``UNLABELLED`` (a term only when there are any),
    plus ``cfg.guard_weight`` times the mean of -log(1 - p_guard) over the labelled rows of other classes."""
    known = y >= 0
    loss = F.cross_entropy(logits[known], y[known]) if bool(known.any()) else logits.new_zeros(())
    if not bool(known.all()):
        loss = loss - cfg.outlier_weight * F.log_softmax(logits[~known], dim=-1).mean()
    if cfg.guard_class is not None and cfg.guard_weight > 0:
        other = known & (y != cfg.guard_class)
        if bool(other.any()):
            logp = F.log_softmax(logits[other], dim=-1)  # (b, C)
            # log(1 - p_guard) = logsumexp over the other classes' log-probabilities: exact where p_guard -> 1
            rest = torch.cat([logp[:, :cfg.guard_class], logp[:, cfg.guard_class + 1:]], dim=1)  # (b, C - 1)
            loss = loss - cfg.guard_weight * torch.logsumexp(rest, dim=1).mean()
    return loss


def train_prompt(model: PromptedCLIP, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, *,
                 progress: bool = False, batch_transform: BatchTransform | None = None,
                 text_anchor: torch.Tensor | None = None) -> TrainRecord:
    """Tune ``model.learner`` on a few-shot set, in place; the backbone is never modified.

    images: (N, 3, S, S) float in [0, 1]; labels: (N,) class indices into ``model.classnames``, or
    ``UNLABELLED`` (-1) for an outlier that belongs to no class: its predicted distribution is pulled to the
    uniform one (outlier exposure, weight ``cfg.outlier_weight``). They may stay on the CPU with the model on a
    GPU: batches are moved to the model's device.
    text_anchor: normalised text features (n_cls, E) that ``cfg.anchor_weight`` pulls the learned ones to
    (for image-conditioned learners, each image's set of class features is pulled).
    Returns the run's :class:`TrainRecord`; the model is left in eval mode.
    """
    if images.ndim != 4 or labels.ndim != 1 or images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ConfigError(
            f"expected images (N, 3, S, S) and labels (N,) with N >= 1; got {tuple(images.shape)} and "
            f"{tuple(labels.shape)}"
        )
    labels = labels.long()
    if cfg.guard_class is not None and cfg.guard_class >= model.n_cls:
        raise ConfigError(f"guard_class {cfg.guard_class} is not a class index of this model (0..{model.n_cls - 1})")
    if int(labels.min()) < UNLABELLED or int(labels.max()) >= model.n_cls or not bool((labels >= 0).any()):
        raise ConfigError(
            f"labels must lie in [0, {model.n_cls}) ({UNLABELLED} marks an outlier; at least one row needs a class); "
            f"found {int(labels.min())}..{int(labels.max())}"
        )
    anchor: torch.Tensor | None = None
    if text_anchor is not None and cfg.anchor_weight > 0:
        if tuple(text_anchor.shape) != (model.n_cls, model.backbone.embed_dim):
            raise ConfigError(f"text_anchor must be (n_cls, E) = ({model.n_cls}, {model.backbone.embed_dim}); "
                              f"got {tuple(text_anchor.shape)}")
        anchor = F.normalize(text_anchor.detach().float(), dim=-1).to(model.device)
    params = [p for p in model.learner.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the prompt learner has no trainable parameters (all have requires_grad=False)")

    gen = torch.Generator().manual_seed(cfg.seed)
    n = images.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    opt: torch.optim.Optimizer
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, total, cfg.warmup_steps))

    record = TrainRecord(config=asdict(cfg), precomputed_features=batch_transform is None)
    start = time.perf_counter()
    dev = model.device
    features: torch.Tensor | None = None
    if batch_transform is None:
        # The image encoder is frozen: its outputs are constants of the optimisation. (N, E) fp32.
        with torch.no_grad(), _autocast(cfg.bf16, dev):
            features = torch.cat([model.encode_images(images[i:i + cfg.feature_batch_size].to(dev)).float()
                                  for i in range(0, n, cfg.feature_batch_size)])

    model.train()
    bar = tqdm(range(cfg.epochs), desc="prompt tuning", unit="epoch", disable=not progress, leave=False)
    try:
        for _epoch in bar:
            order = torch.randperm(n, generator=gen)
            loss_sum, correct, seen, rows = 0.0, 0, 0, 0  # seen: labelled rows; rows: every row
            for i in range(0, n, cfg.batch_size):
                idx = order[i:i + cfg.batch_size]
                y = labels[idx]
                if features is not None:
                    feats = features[idx.to(dev)]
                else:
                    assert batch_transform is not None
                    x, y = batch_transform(images[idx], y, gen)
                    with torch.no_grad(), _autocast(cfg.bf16, dev):
                        feats = model.encode_images(x.to(dev)).float()
                    y = y.long()
                y = y.to(dev)
                with _autocast(cfg.bf16, dev):
                    if anchor is None:
                        logits = model.logits_from_features(feats)
                    else:
                        txt = model.text_features(feats)  # (C, E), or (b, C, E) when image-conditioned
                        logits = model.logits_from_text(feats, txt)
                loss = _loss(logits.float(), y, cfg)
                if anchor is not None:
                    loss = loss + cfg.anchor_weight * (txt.float() - anchor).square().sum(-1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                record.steps += 1
                loss_sum += float(loss.detach()) * y.shape[0]
                rows += y.shape[0]
                correct += int((logits.detach().argmax(-1) == y).sum())  # outliers (-1) never count as right
                seen += int((y >= 0).sum())
            record.losses.append(loss_sum / rows)
            record.accuracies.append(correct / max(seen, 1))
            bar.set_postfix(loss=f"{record.losses[-1]:.3f}", acc=f"{record.accuracies[-1]:.2f}")
    finally:
        bar.close()
        model.eval()
    record.seconds = time.perf_counter() - start
    return record
