"""On a GPU machine: continue the bundled CLIP's pre-training with one more phase, sized to a time budget.

    python benchmarks/gpu_pretrain.py OUT_DIR [--seconds 300] [--workers 15] [--max-steps 8000]
                                              [--train-rate 21]

The script first times how fast ``--workers`` processes render batches of 256, then sizes the new phase
to fill ``--seconds`` at the slower of that rate and ``--train-rate`` (steps/s of the training loop; on
an H100 with 16 cores: render 35-39 batches/s, training 21.7 steps/s, so the loop, not the rendering,
sets the pace), as a multiple of 250 steps, and trains it from the shipped weights (``start_phase`` = the
shipped recipe's phase count). The phase it ran is printed and written to ``OUT_DIR/record.json`` so that
it can be added to :class:`PretrainConfig` if the weights are adopted. The weights go to
``OUT_DIR/weights.safetensors``, also split into 10 MB parts (``weights.part-aa``, ...) for transports
that cap file sizes; ``cat weights.part-* > weights.safetensors`` restores them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from scanner.clip.backbone import bundled_weights_path, read_fp32_weights
from scanner.zoo.pretrain import Phase, PretrainConfig, _PairStream, pretrain, save_weights

NEXT_PHASE = Phase(0, 3e-4, focus=0.7, caption_aware=True, drill=0.3)  # steps filled in from the budget


def _render_one(step: int) -> None:
    # one step of the training stream itself (a worker's whole job: 256 pairs rendered and stacked)
    cfg, p = PretrainConfig(), NEXT_PHASE
    next(iter(_PairStream(cfg.seed, cfg.batch_size, 64, step, step + 1, p.focus, p.drill, p.describe)))


def render_rate(workers: int) -> float:
    """Batches of 256 per second that ``workers`` processes render together."""
    with mp.get_context("fork").Pool(workers) as pool:
        t = time.perf_counter()
        pool.map(_render_one, range(2 * workers))
        return 2 * workers / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--workers", type=int, default=15)
    ap.add_argument("--max-steps", type=int, default=8000)
    ap.add_argument("--train-rate", type=float, default=21.0, help="steps/s of the training loop")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    rate = render_rate(args.workers)
    steps = int(min(args.max_steps, max(500, min(rate, args.train_rate) * args.seconds // 250 * 250)))
    base = PretrainConfig()
    phase = replace(NEXT_PHASE, steps=steps)
    cfg = replace(base, phases=(*base.phases, phase), device=args.device, workers=args.workers)
    print(f"render rate {rate:.1f} batches/s with {args.workers} workers -> phase {asdict(phase)}", flush=True)

    log: list[tuple[int, float, float, float]] = []
    t0 = time.time()

    def on_step(step: int, loss: float, scale: float) -> None:
        log.append((step, loss, scale, time.time() - t0))
        if len(log) % 250 == 0:
            print(f"step {step} loss {np.mean([r[1] for r in log[-50:]]):.3f} scale {scale:.1f} "
                  f"{len(log) / (time.time() - t0):.1f} steps/s", flush=True)

    state = read_fp32_weights(bundled_weights_path())
    bb, record = pretrain(cfg, on_step, resume=state, start_phase=len(base.phases))
    record["render_batches_per_s"] = round(rate, 2)
    record["steps_per_s"] = round(len(log) / max(1e-9, log[-1][3]), 2) if log else None
    dest = args.out / "weights.safetensors"
    digest = save_weights(bb, dest, record)
    (args.out / "record.json").write_text(json.dumps({**record, "sha256": digest}, indent=2))
    (args.out / "losses.json").write_text(json.dumps(log))
    subprocess.run(["split", "-b", "10M", str(dest), str(args.out / "weights.part-")], check=True)
    print(f"wrote {dest} sha256 {digest[:16]} in {time.time() - t0:.0f} s; record {json.dumps(record)}", flush=True)


if __name__ == "__main__":
    main()
