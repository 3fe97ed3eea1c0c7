"""On a CUDA machine: encoder throughput (torch CPU / torch CUDA fp32, bf16 / onnxruntime CPU and CUDA
providers) and detection time per model (CPU vs CUDA) for the bundled CLIP and full-size architectures.

    python benchmarks/cuda_bench.py [--archs ViT-B-16,RN50] [--batch 64] [--iters 10] [--json OUT]

Everything is measured side by side in one run on one machine:

* **Encoders** (random-init ViT-B/16 and RN50; the work depends on the shapes, not the weights):
  images/s at ``--batch``, median of interleaved rounds. onnxruntime goes through ``ForwardEncoders`` (the
  scanner's own path, host copies included); its CUDA provider is used when the installed onnxruntime has
  one. Parity is onnxruntime vs torch fp32 on the same device with TF32 off.
* **Detection**: ``detect`` (CI, the product's default configuration, 1,000 OOD images) on a 10-class
  and a 120-class CSC-CoOp model of the bundled CLIP, on CPU and on CUDA; and on a 10-class CoOp model
  of each full-size architecture on CUDA (224 px pool). Prompts are untrained: the cost depends on the
  shapes of the work, not the prompt's values.

Exits with a message where torch sees no GPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from scanner.accel.bench import interleaved_medians, torch_image_features
from scanner.accel.encoders import ForwardEncoders
from scanner.accel.sessions import CUDA, best_providers
from scanner.clip.backbone import ClipBackbone, create_backbone, load_bundled
from scanner.engine import DetectorConfig, detect
from scanner.prompting.classifier import PromptedCLIP
from scanner.prompting.learners import CoOpLearner
from scanner.zoo.datasets import get_spec
from scanner.zoo.ood import default_ood_pool


def _sync() -> None:
    torch.cuda.synchronize()


def _median_rounds(fns: dict[str, Callable[[], object]], iters: int) -> dict[str, float]:
    """Median seconds per call of each fn (interleaved rounds), each call waiting for the GPU to finish."""

    def synced(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            out = fn()
            _sync()
            return out

        return run

    return interleaved_medians({k: synced(fn) for k, fn in fns.items()}, iters)


def encoder_rows(arch: str, batch: int, iters: int, cache: Path) -> list[dict[str, Any]]:
    """images/s of each backend for the image encoder of ``arch``, and parity of onnxruntime."""
    cpu_bb = create_backbone(arch, seed=0).eval()
    gpu_bb = create_backbone(arch, seed=0).eval().to("cuda")
    s = cpu_bb.image_size
    x_cpu = torch.rand(batch, 3, s, s, generator=torch.Generator().manual_seed(3))
    x_gpu = x_cpu.to("cuda")
    enc = ForwardEncoders.for_backbone(cpu_bb, cache_dir=cache)
    fns: dict[str, Callable[[], object]] = {
        "torch-cuda-fp32": lambda: torch_image_features(gpu_bb, x_gpu),
        "torch-cuda-bf16": lambda: torch_image_features(gpu_bb, x_gpu, bf16=True),
        f"ort-{'cuda' if CUDA in enc.providers else 'cpu'}-fp32": lambda: enc.encode_images(x_gpu, batch_size=batch),
        "torch-cpu-fp32": lambda: torch_image_features(cpu_bb, x_cpu),
    }
    # torch on the CPU is slow at full size: fewer rounds keep the run short (still the median)
    secs = _median_rounds({k: v for k, v in fns.items() if k != "torch-cpu-fp32"}, iters)
    secs.update(_median_rounds({"torch-cpu-fp32": fns["torch-cpu-fp32"]}, max(1, iters // 5)))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref = torch_image_features(gpu_bb, x_gpu)
    ort = enc.encode_images(x_gpu, batch_size=batch)
    parity = {
        "ort_vs_torch_cuda_fp32": float((ort - ref).abs().max()),
        "torch_cpu_vs_cuda_fp32": float((torch_image_features(cpu_bb, x_cpu).to("cuda") - ref).abs().max()),
        "torch_bf16_vs_fp32": float((torch_image_features(gpu_bb, x_gpu, bf16=True) - ref).abs().max()),
    }
    torch.backends.cudnn.allow_tf32 = True
    base = batch / secs["torch-cuda-fp32"]
    return [{"arch": arch, "encoder": "image", "backend": k, "images_per_s": batch / v,
             "x_torch_cuda_fp32": batch / v / base, "providers": enc.providers if k.startswith("ort") else None,
             **({"parity": parity} if k.startswith("ort") else {})} for k, v in secs.items()]


def _coop(bb: ClipBackbone, dataset: str) -> PromptedCLIP:
    return PromptedCLIP(bb, CoOpLearner(bb, list(get_spec(dataset).classnames), csc=True, seed=0))


def _time_detect(model: PromptedCLIP, pool: torch.Tensor, cfg: DetectorConfig) -> tuple[float, bool]:
    t0 = time.perf_counter()
    r = detect(model, pool, cfg, seed=0)
    if pool.is_cuda:
        _sync()
    return time.perf_counter() - t0, r.backdoored


def detect_rows(archs: list[str], n_images: int) -> list[dict[str, Any]]:
    cfg = DetectorConfig(n_images=n_images)
    rows: list[dict[str, Any]] = []
    tiny = load_bundled()
    pool = default_ood_pool(n_images, tiny.image_size, seed=0)
    warm = _coop(tiny, "shapes")
    _time_detect(warm.to("cuda"), pool.to("cuda"), DetectorConfig(n_images=n_images, families=("additive",),
                                                                    candidates=1))
    warm.to("cpu")  # the models share the backbone: new learners are built on the CPU
    for dataset in ("shapes", "colour_shape"):
        model = _coop(tiny, dataset)
        for device in ("cpu", "cuda"):
            sec, flagged = _time_detect(model.to(device), pool.to(device), cfg)
            rows.append({"arch": "scanner-tiny (bundled)", "classes": model.n_cls, "device": device,
                         "seconds": sec, "backdoored": flagged})
        model.to("cpu")
    for arch in archs:
        bb = create_backbone(arch, seed=0).eval()
        big_pool = default_ood_pool(n_images, bb.image_size, seed=0).to("cuda")
        model = _coop(bb, "shapes").to("cuda")
        sec, flagged = _time_detect(model, big_pool, cfg)
        rows.append({"arch": arch, "classes": model.n_cls, "device": "cuda", "seconds": sec,
                     "backdoored": flagged})
        del model, big_pool
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="ViT-B-16,RN50")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--n-images", type=int, default=1000)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: encoders, detect")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cuda_bench: torch sees no CUDA GPU here; run it on a GPU machine")
    import onnxruntime

    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    skip = set(args.skip.split(","))
    env = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
           "onnxruntime": onnxruntime.__version__, "ort_providers": onnxruntime.get_available_providers(),
           "scanner_providers": best_providers(), "cpu_threads": torch.get_num_threads()}
    print(json.dumps(env))
    out: dict[str, Any] = {"env": env}
    # one part failing (an export, an architecture) must not lose the other's figures
    if "encoders" not in skip:
        out["encoders"] = []
        for arch in archs:
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    out["encoders"] += encoder_rows(arch, args.batch, args.iters, Path(tmp))
            except Exception:
                traceback.print_exc()
        print(f"{'arch':<10}{'backend':<18}{'images/s':>10}{'x torch-cuda-fp32':>19}")
        for r in out["encoders"]:
            print(f"{r['arch']:<10}{r['backend']:<18}{r['images_per_s']:>10.1f}{r['x_torch_cuda_fp32']:>19.2f}"
                  + (f"   parity {r['parity']}" if "parity" in r else ""))
    if "detect" not in skip:
        try:
            out["detect"] = detect_rows(archs, args.n_images)
        except Exception:
            traceback.print_exc()
        print(f"{'arch':<24}{'classes':>8}{'device':>8}{'s/model':>9}")
        for r in out.get("detect", []):
            print(f"{r['arch']:<24}{r['classes']:>8}{r['device']:>8}{r['seconds']:>9.1f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
