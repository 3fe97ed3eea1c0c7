"""Contrastive pre-training of the bundled tiny CLIP (symmetric InfoNCE, learnable logit scale).

The recipe is a sequence of *phases* (warm restarts): each phase re-creates AdamW, warms up, then
decays its own learning rate with a cosine; between phases the weights pass through fp16, exactly as
they are stored, so a phase can be resumed from a shipped file and the result is the same as an
uninterrupted run. The data stream is a pure function of (seed, global step), whichever worker
renders a step, and training is deterministic on CPU for a fixed thread count. On a GPU
(``device="cuda"``) the rendering is the bottleneck (one core renders ~2 batches of 256 a second, the
GPU steps in ~10 ms), so ``workers`` render steps in parallel. ``scanner zoo pretrain`` wraps
:func:`pretrain`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from scanner.clip.backbone import BUNDLED_NAME, ClipBackbone, create_backbone
from scanner.zoo.captions import GENERATOR_VERSION, sample_pair


def contrastive_loss(logits: torch.Tensor, captions: list[str] | None) -> torch.Tensor:
    """Symmetric InfoNCE over ``logits`` (B, B), matching pairs on the diagonal.

    With ``captions`` given, every pair whose caption is *identical* counts as a positive (the target
    row is uniform over them). Focused captions ("a star") repeat many times in a batch of 256; plain
    InfoNCE calls the other stars negatives and so teaches the encoders to tell apart images the
    caption says are the same, which fights exactly the shape/glyph identity focus is meant to teach.
    """
    n = logits.shape[0]
    if captions is None:
        labels = torch.arange(n, device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    key = torch.tensor([ids[c] for c in captions], device=logits.device)  # (B,) caption identity
    same = (key[:, None] == key[None, :]).float()  # (B, B), symmetric, diagonal 1
    target = same / same.sum(1, keepdim=True)
    i2t = -(target * F.log_softmax(logits, 1)).sum(1).mean()
    t2i = -(target * F.log_softmax(logits.t(), 1)).sum(1).mean()
    return 0.5 * (i2t + t2i)


@dataclass(frozen=True)
class Phase:
    """One warm restart of the recipe."""

    steps: int  # optimiser steps
    lr: float  # peak AdamW learning rate
    focus: float = 0.0  # share of scenes whose caption is cut to its core (captions.py)
    caption_aware: bool = False  # identical captions are positives, not negatives (contrastive_loss)
    drill: float = 0.0  # share of single-attribute scenes (captions._drill_scene)
    describe: float = 1.0  # share of overlaid images whose caption names the overlays (captions.sample_pair)


@dataclass(frozen=True)
class PretrainConfig:
    seed: int = 0
    phases: tuple[Phase, ...] = (
        Phase(700, 1e-3), Phase(700, 5e-4), Phase(500, 5e-4, focus=0.6),
        Phase(1200, 3e-4, focus=0.7, caption_aware=True), Phase(800, 3e-4, focus=0.7, caption_aware=True, drill=0.5),
        Phase(1000, 3e-4, focus=0.7, caption_aware=True, drill=0.6),
        # phase 7 (session 17) ran on an H100 (benchmarks/gpu_pretrain.py): 87 % as many pairs as phases 1-6, in
        # 196 s; less drill than phase 6 so texture and count captions come back
        Phase(4250, 3e-4, focus=0.7, caption_aware=True, drill=0.3),
    )
    batch_size: int = 256  # image–caption pairs per step (also the number of InfoNCE negatives + 1)
    weight_decay: float = 0.1  # on matrices only (not on norms, biases, embeddings, logit scale)
    warmup: int = 50  # linear warm-up steps at the start of each phase
    bf16: bool = True  # autocast (CPU: ~2x faster on AMX/AVX512-BF16 CPUs); master weights stay fp32
    threads: int = 2
    device: str = "cpu"  # torch device for the training steps
    # processes rendering batches (each renders whole steps: worker w of W renders steps w, w + W, ...);
    # one overlaps rendering with the 2-core CPU's training, a GPU wants as many as there are free cores
    workers: int = 1

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0 renders in the training process); got {self.workers}")

    @property
    def steps(self) -> int:
        return self.steps_before(len(self.phases))

    def steps_before(self, phase: int) -> int:
        """Optimiser steps the first ``phase`` phases take (the global step phase ``phase`` starts at)."""
        return sum(p.steps for p in self.phases[:phase])


class _PairStream(torch.utils.data.IterableDataset[tuple[torch.Tensor, list[str]]]):
    """Batches of (images (B, 3, S, S) float in [0,1], captions) for global steps [start, stop)."""

    def __init__(self, seed: int, batch_size: int, size: int, start: int, stop: int, focus: float,
                 drill: float, describe: float = 1.0) -> None:
        self.seed, self.bs, self.size, self.start, self.stop = seed, batch_size, size, start, stop
        self.focus, self.drill, self.describe = focus, drill, describe

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[str]]]:
        # Worker w of W renders every W-th step from start + w; the loader takes one batch from each
        # worker in turn, so the steps come back in order and the stream does not depend on W.
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for step in range(self.start + w, self.stop, n):
            rng = np.random.default_rng([self.seed, step])
            pairs = [sample_pair(rng, self.size, self.focus, self.drill, self.describe) for _ in range(self.bs)]
            imgs = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).float() / 255.0
            yield imgs, [p[1] for p in pairs]


def _param_groups(model: torch.nn.Module, wd: float) -> list[dict[str, object]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name or "ln" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def _through_fp16(model: torch.nn.Module) -> None:
    """Round the weights to fp16 and back, as storing and reloading a phase's result does."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())


def _run_phase(bb: ClipBackbone, cfg: PretrainConfig, start: int, phase: Phase,
               on_step: Callable[[int, float, float], None] | None, losses: list[float]) -> None:
    model: Any = bb.model
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    steps, lr = phase.steps, phase.lr
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)

    def lr_at(i: int) -> float:
        if i < cfg.warmup:
            return lr * (i + 1) / cfg.warmup
        t = (i - cfg.warmup) / max(1, steps - cfg.warmup)
        return lr * 0.5 * (1 + math.cos(math.pi * t))

    stream = _PairStream(cfg.seed, cfg.batch_size, bb.image_size, start, start + steps, phase.focus, phase.drill,
                         phase.describe)
    # Workers render the next batches while torch trains on this one.
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.workers,
                                         prefetch_factor=4 if cfg.workers else None,
                                         pin_memory=cfg.device.startswith("cuda"))
    for i, (imgs, caps) in enumerate(loader):
        for g in opt.param_groups:
            g["lr"] = lr_at(i)
        imgs = imgs.to(cfg.device, non_blocking=True)  # (B, 3, S, S)
        tokens = bb.tokenize(caps).to(cfg.device)  # (B, L)
        with torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.bf16):
            img_f = model.encode_image(bb.normalize(imgs))  # (B, E)
            txt_f = model.encode_text(tokens)  # (B, E)
        img_f = F.normalize(img_f.float(), dim=-1)
        txt_f = F.normalize(txt_f.float(), dim=-1)
        logits = model.logit_scale.exp() * img_f @ txt_f.t()  # (B, B): matching pairs on the diagonal
        loss = contrastive_loss(logits, caps if phase.caption_aware else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # CLIP's clamp: temperature no lower than 1/100
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if on_step is not None:
            on_step(start + i, losses[-1], model.logit_scale.exp().item())
    _through_fp16(model)


def pretrain(cfg: PretrainConfig, on_step: Callable[[int, float, float], None] | None = None, *,
             resume: dict[str, torch.Tensor] | None = None, start_phase: int = 0
             ) -> tuple[ClipBackbone, dict[str, object]]:
    """Train the bundled architecture (from scratch, or from ``resume`` = the weights after
    ``start_phase`` phases); returns the frozen backbone and a training record."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    bb = create_backbone(BUNDLED_NAME, resume, seed=cfg.seed)
    t0 = time.time()
    losses: list[float] = []
    start = cfg.steps_before(start_phase)
    bb.to(cfg.device)
    try:
        for phase in cfg.phases[start_phase:]:
            _run_phase(bb, cfg, start, phase, on_step, losses)
            start += phase.steps
    finally:
        bb.to("cpu")  # a backbone is handed out on the CPU, where learners are built
    bb.freeze()
    record: dict[str, object] = {
        "config": asdict(cfg),
        "generator_version": GENERATOR_VERSION,
        "pairs_seen": cfg.steps * cfg.batch_size,
        "train_seconds": round(time.time() - t0, 1),
        "resumed_at_phase": start_phase,
        "final_loss": float(np.mean(losses[-20:])) if losses else None,
        "torch_version": torch.__version__,
    }
    return bb, record


def save_weights(bb: ClipBackbone, path: Path, record: dict[str, object]) -> str:
    """Write fp16 safetensors (atomically) and return the content hash of the fp32-restored weights."""
    from safetensors.torch import save_file

    sd = {k: v.detach().half().contiguous() for k, v in bb.model.state_dict().items()}
    meta = {"architecture": BUNDLED_NAME, "record": json.dumps(record)}
    tmp = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(tmp), metadata=meta)
    tmp.replace(path)
    restored = create_backbone(BUNDLED_NAME, {k: v.float() for k, v in sd.items()})
    return restored.content_hash()
