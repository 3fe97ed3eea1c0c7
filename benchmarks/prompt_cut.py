"""What cutting the padding after the last EOT saves: text features of CoCoOp prompts and a CI scan, side by side.

    python benchmarks/prompt_cut.py [--archs scanner-tiny,ViT-B-16] [--batch 32] [--iters 3] [--scan]

The text transformer is causal, so a prompt's EOT row never reads the padding after it, and
``PromptLearner.encode`` hands the encoder only the rows up to the last EOT (``text_length``) instead of the
whole context (32 tokens on the bundled CLIP, 77 on OpenAI's). Per architecture (random-init weights; the cost
depends on the shapes alone), a 10-class CoCoOp learner (n_ctx 4, the ``shapes`` class names) encodes ``--batch``
images' prompts forward and backward (one step of CoCoOp training, repair or a CI search), cut and full,
interleaved; printed: seconds per step, the ratio, and the largest feature difference. ``--scan`` also times
``detect`` (today's default CI, after an untimed warm-up) on the quick zoo's ``shapes/badclip`` model (the bundled
CLIP) ``--scan-iters`` times each way and checks that the first two scans' verdict and score agree (the zoo is
built by ``./dev demo`` into ``demo-out/zoo``, or give ``--model``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from scanner.clip.backbone import create_backbone, load_bundled
from scanner.engine import DetectorConfig, detect
from scanner.prompting.checkpoints import load_checkpoint
from scanner.prompting.classifier import PromptedCLIP
from scanner.prompting.learners import CoCoOpLearner, PromptLearner
from scanner.zoo.datasets import get_spec
from scanner.zoo.ood import default_ood_pool


def _both(learner: PromptLearner, run: Callable[[], float], iters: int) -> tuple[float, float]:
    """Mean seconds of ``run`` with the prompt cut and with the whole context, ``iters`` times each, in the
    order cut, full, full, cut, ... so that neither side always runs first."""
    cut, full = learner.text_length, learner.backbone.context_length
    t_cut: list[float] = []
    t_full: list[float] = []
    for i in range(iters):
        pair = ((cut, t_cut), (full, t_full))
        for n, out in pair if i % 2 == 0 else pair[::-1]:
            learner.text_length = n
            out.append(run())
    learner.text_length = cut
    return sum(t_cut) / iters, sum(t_full) / iters


def step_times(arch: str, batch: int, iters: int) -> None:
    bb = load_bundled() if arch == "scanner-tiny" else create_backbone(arch, seed=0)
    learner = CoCoOpLearner(bb, list(get_spec("shapes").classnames), n_ctx=4, seed=0)
    img = torch.randn(batch, bb.embed_dim, generator=torch.Generator().manual_seed(0))

    def step() -> float:
        t0 = time.perf_counter()
        learner.zero_grad(set_to_none=True)
        learner.text_features(img).float().pow(2).sum().backward()
        return time.perf_counter() - t0

    step()  # warm-up
    cut = learner.text_length
    with torch.no_grad():
        a = learner.text_features(img)
        learner.text_length = bb.context_length
        b = learner.text_features(img)
        learner.text_length = cut
    t_cut, t_full = _both(learner, step, iters)
    print(f"{arch:12s} rows {learner.text_length:2d} of {bb.context_length:2d}  {batch} images x 10 classes, "
          f"forward + backward: cut {t_cut:6.3f} s  full {t_full:6.3f} s  full/cut {t_full / t_cut:4.2f}x  "
          f"max |diff| {float((a - b).abs().max()):.1e}", flush=True)


def scan_times(model_path: Path, iters: int) -> None:
    bb = load_bundled()
    model = PromptedCLIP(bb, load_checkpoint(model_path, bb).learner).eval()
    cfg = DetectorConfig().on("cpu")
    pool = default_ood_pool(cfg.n_images, bb.image_size, seed=0)
    # warm-up, not timed: the one-time work (encoder sessions, the clean pool's features) lands here
    detect(model, pool, replace(cfg, families=("additive",), conditioned_families=()), seed=0)
    results = []

    def scan() -> float:
        t0 = time.perf_counter()
        results.append(detect(model, pool, cfg, seed=0))
        return time.perf_counter() - t0

    t_cut, t_full = _both(model.learner, scan, iters)
    cut, full = results[:2]
    same = (cut.backdoored, cut.target_index) == (full.backdoored, full.target_index)
    print(f"CI on {model_path}: cut {t_cut:6.1f} s  full {t_full:6.1f} s  full/cut {t_full / t_cut:4.2f}x  "
          f"verdict {'the same' if same else 'DIFFERENT'} ({cut.backdoored}, target {cut.target_index}); "
          f"score {cut.anomaly_score:.4f} vs {full.anomaly_score:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="scanner-tiny,ViT-B-16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--scan", action="store_true", help="also time CI on a CoCoOp model both ways")
    ap.add_argument("--model", type=Path, default=Path("demo-out/zoo/shapes/badclip.safetensors"))
    ap.add_argument("--scan-iters", type=int, default=2, help="scans each way (order cut, full, full, cut, ...)")
    args = ap.parse_args()
    print(f"threads {torch.get_num_threads()}")
    for arch in [a.strip() for a in args.archs.split(",") if a.strip()]:
        step_times(arch, args.batch, args.iters)
    if args.scan:
        if not args.model.exists():
            raise SystemExit(f"{args.model}: no such model; run ./dev demo (it builds demo-out/zoo) or give --model")
        scan_times(args.model, args.scan_iters)


if __name__ == "__main__":
    main()
