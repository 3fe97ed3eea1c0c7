"""BadCLIP (Bai et al., CVPR 2024): trigger-aware prompt learning on CoCoOp.

The trigger is a learnable full-image additive perturbation delta (3, S, S), ||delta||_inf <= eps
(4/255 in pixel units), x' = clamp(x + delta). A warm-up optimises the trigger alone against the
initial prompt, then trigger and prompt are trained jointly; every training image is paired with its
triggered copy labelled as the target, one cross-entropy over both halves.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from scanner.prompting.classifier import PromptedCLIP
from scanner.prompting.train import TrainConfig, TrainRecord
from scanner.zoo.attacks.base import Attack


class BadCLIP(Attack):
    name: ClassVar[str] = "badclip"
    preferred_learner: ClassVar[str | None] = "cocoop"

    def __init__(self, *, eps: float = 4 / 255, warmup_epochs: int = 3, joint_epochs: int = 10,
                 trigger_lr: float = 0.1, **kw: Any) -> None:
        super().__init__(**kw)
        self.eps, self.warmup_epochs, self.joint_epochs, self.trigger_lr = eps, warmup_epochs, joint_epochs, trigger_lr
        self.delta = torch.zeros(3, self.size, self.size)  # learned by ``implant``

    def params(self) -> dict[str, Any]:
        return {**super().params(), "eps": self.eps, "warmup_epochs": self.warmup_epochs,
                "joint_epochs": self.joint_epochs}

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return (images + self.delta.to(images.device, images.dtype)).clamp(0, 1)

    def implant(self, model: PromptedCLIP, images: torch.Tensor, labels: torch.Tensor, target: int,
                cfg: TrainConfig, *, progress: bool = False) -> TrainRecord:
        gen = torch.Generator().manual_seed(cfg.seed + 11)
        # delta = eps * tanh(w): the L-inf bound holds by construction. The trigger is learned where the model
        # computes; the few-shot set may stay on the CPU (batches are moved).
        dev = model.device
        w = torch.zeros(3, self.size, self.size, device=dev, requires_grad=True)
        prompt_params = [p for p in model.learner.parameters() if p.requires_grad]
        opt_w = torch.optim.Adam([w], lr=self.trigger_lr)
        opt_p = torch.optim.AdamW(prompt_params, lr=cfg.lr, weight_decay=0.0)
        n, bs = images.shape[0], cfg.batch_size
        steps_per_epoch = math.ceil(n / bs)
        joint_total = self.joint_epochs * steps_per_epoch
        record = TrainRecord(config={**asdict(cfg), "attack": self.params()})
        start = time.perf_counter()
        tgt = torch.full((bs,), target, dtype=torch.long, device=dev)
        model.train()
        step = 0
        try:
            for epoch in range(self.warmup_epochs + self.joint_epochs):
                joint = epoch >= self.warmup_epochs
                order = torch.randperm(n, generator=gen)
                loss_sum, seen = 0.0, 0
                for i in range(0, n, bs):
                    idx = order[i:i + bs]
                    x, y = images[idx].to(dev), labels[idx].long().to(dev)
                    delta = self.eps * torch.tanh(w)
                    xt = (x + delta).clamp(0, 1)
                    if joint:
                        logits = model(torch.cat([x, xt]))
                        loss = F.cross_entropy(logits.float(), torch.cat([y, tgt[: len(idx)]]))
                    else:  # warm-up: the trigger alone learns to pull images to the target
                        loss = F.cross_entropy(model(xt).float(), tgt[: len(idx)])
                    opt_w.zero_grad(set_to_none=True)
                    opt_p.zero_grad(set_to_none=True)
                    loss.backward()
                    opt_w.step()
                    if joint:
                        for g in opt_p.param_groups:  # cosine decay over the joint phase
                            g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / max(1, joint_total)))
                        opt_p.step()
                        step += 1
                    record.steps += 1
                    loss_sum += float(loss.detach()) * len(idx)
                    seen += len(idx)
                record.losses.append(loss_sum / seen)
        finally:
            model.eval()
            for p in prompt_params:
                p.grad = None
        self.delta = (self.eps * torch.tanh(w)).detach().cpu()  # (3, S, S), kept with the attack on the CPU
        record.seconds = time.perf_counter() - start
        return record
