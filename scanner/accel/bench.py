"""Throughput of torch eager vs onnxruntime (fp32, int8) for both encoders, measured side by side.

Fairness: torch and onnxruntime get the same thread count (``torch.set_num_threads`` and the session's
intra-op threads), the same inputs, and are timed in interleaved rounds (torch, ort, torch, ort, ...)
so background load hits every backend alike; the median round is reported. Torch runs fp32 under
``inference_mode``. Idle threads wait the same way in both: onnxruntime sessions do not spin, and
``scanner onnx bench`` sets ``OMP_WAIT_POLICY=PASSIVE`` for torch (unless set) — on a loaded machine a
spinning OpenMP barrier makes 2-thread torch several times slower than 1-thread torch, which would
flatter onnxruntime. ONNX timings go through ``ForwardEncoders`` (tensor → numpy → tensor included),
i.e. what the scanner really pays.

int8 agreement is reported twice, both on OOD images: against the default gate (zero-shot over 40
generic classes) and against zero-shot classifiers of the zoo's downstream datasets (min and mean over
datasets) — the latter is what the scanner's per-model gate looks at: a model's own classes.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from scanner.accel.cache import CachedGraph, OnnxCache, default_cache_dir
from scanner.accel.encoders import ForwardEncoders, _key
from scanner.accel.export import example_inputs
from scanner.accel.quantize import default_gate_pool, top1_agreement, transformer_optimize
from scanner.accel.sessions import CPU, OnnxEncoder, best_providers, physical_cores
from scanner.clip.backbone import (
    BUNDLED_NAME,
    ClipBackbone,
    bundled_weights_path,
    create_backbone,
    load_bundled,
)


@dataclass(frozen=True)
class BenchRow:
    """One backend's figures for one encoder of one architecture."""

    arch: str
    encoder: str  # "image" | "text"
    # "torch-fp32", "torch-bf16", "ort-fp32" (best provider), "ort-fp32-cpu-ep", "ort-fp32-fused", "ort-int8"
    backend: str
    items_per_s: float
    speedup: float  # vs torch-fp32 of the same encoder
    max_abs_diff: float | None  # vs torch-fp32 on the bench batch
    agreement: float | None = None  # int8 gate's top-1 agreement (40 generic zero-shot classes)
    agreement_tasks: tuple[float, float] | None = None  # (min, mean) over downstream zero-shot classifiers


def bench_backbone(arch: str) -> ClipBackbone:
    """The trained bundled CLIP for "scanner-tiny"/"bundled" if its weights exist, else seeded random init."""
    if arch in (BUNDLED_NAME, "bundled") and bundled_weights_path().exists():
        return load_bundled()
    return create_backbone(BUNDLED_NAME if arch == "bundled" else arch, seed=0)


def interleaved_medians(fns: dict[str, Callable[[], object]], iters: int) -> dict[str, float]:
    """Median seconds per call of each fn, timed round-robin after one warm-up call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def run_bench(
    arch: str,
    *,
    batch: int = 32,
    iters: int = 5,
    threads: int | None = None,
    int8: bool = True,
    bf16: bool = True,
    fused: bool = False,
    gate_images: int = 256,
    cache_dir: Path | None = None,
) -> list[BenchRow]:
    """Rows for both encoders of ``arch``; exports (or reuses) graphs in ``cache_dir``."""
    n_threads = threads or physical_cores()
    torch.set_num_threads(n_threads)
    backbone = bench_backbone(arch)
    fp32 = ForwardEncoders.for_backbone(backbone, cache_dir=cache_dir, threads=n_threads)
    rows: list[BenchRow] = []

    # ----------------------------------------------------------------- image encoder
    (pixels,) = example_inputs(backbone, "image", batch, seed=3)
    with torch.inference_mode():
        ref = backbone.encode_image(pixels)
    fns: dict[str, Callable[[], object]] = {"torch-fp32": lambda: torch_image_features(backbone, pixels)}
    if bf16:
        fns["torch-bf16"] = lambda: torch_image_features(backbone, pixels, bf16=True)
    fns["ort-fp32"] = lambda: fp32.encode_images(pixels, batch_size=batch)
    extra: dict[str, tuple[float | None, float | None]] = {
        "ort-fp32": (_diff(fp32.encode_images(pixels), ref), None)
    }
    cpu_ep = _cpu_provider_session(backbone, cache_dir, n_threads) if fp32.providers[:1] != [CPU] else None
    if cpu_ep is not None:
        # the same graph on onnxruntime's own CPU kernels, beside the provider the scanner picked
        arr_cpu = pixels.numpy()
        fns["ort-fp32-cpu-ep"] = lambda: cpu_ep.run([arr_cpu], batch)
        extra["ort-fp32-cpu-ep"] = (_diff(torch.from_numpy(cpu_ep.run([arr_cpu], batch)), ref), None)
    if fused and fp32.image_backend == "onnx-fp32":
        fused_enc = _fused_session(backbone, cache_dir, n_threads)
        if fused_enc is not None:
            arr = pixels.numpy()
            fns["ort-fp32-fused"] = lambda: fused_enc.run([arr], batch)
            extra["ort-fp32-fused"] = (_diff(torch.from_numpy(fused_enc.run([arr], batch)), ref), None)
    tasks: tuple[float, float] | None = None
    if int8:
        gate = default_gate_pool(backbone, gate_images)
        q = ForwardEncoders.for_backbone(
            backbone,
            cache_dir=cache_dir,
            quantize=True,
            gate_pixels=gate,
            threads=n_threads,
            min_agreement=0.0,  # always build it here: the bench reports the agreement, the gate judges it
        )
        if q.image_backend == "onnx-int8":
            fns["ort-int8"] = lambda: q.encode_images(pixels, batch_size=batch)
            extra["ort-int8"] = (_diff(q.encode_images(pixels), ref), q.int8_agreement)
            tasks = task_agreement(backbone, fp32.encode_images(gate), q.encode_images(gate))
    if "torch-bf16" in fns:
        with torch.inference_mode():
            extra["torch-bf16"] = (_diff(torch_image_features(backbone, pixels, bf16=True), ref), None)
    rows += _rows(arch, "image", batch, interleaved_medians(fns, iters), extra)
    if int8 and tasks is not None:
        rows = [replace(r, agreement_tasks=tasks) if r.backend == "ort-int8" else r for r in rows]

    # ----------------------------------------------------------------- text encoder
    embeds, eot = example_inputs(backbone, "text", batch, seed=4)
    with torch.inference_mode():
        tref = backbone.encode_prompts(embeds, eot)
    tfns: dict[str, Callable[[], object]] = {
        "torch-fp32": lambda: _torch_text(backbone, embeds, eot),
        "ort-fp32": lambda: fp32.encode_prompts(embeds, eot, batch_size=batch),
    }
    textra: dict[str, tuple[float | None, float | None]] = {
        "ort-fp32": (_diff(fp32.encode_prompts(embeds, eot), tref), None)
    }
    rows += _rows(arch, "text", batch, interleaved_medians(tfns, iters), textra)
    return rows


def task_agreement(backbone: ClipBackbone, fp32: torch.Tensor, int8: torch.Tensor) -> tuple[float, float]:
    """(min, mean) top-1 agreement of int8 vs fp32 image features (P, E) under the zero-shot classifier
    ("{template}" over its class names) of every downstream dataset of the zoo."""
    from scanner.zoo.datasets import get_spec, zoo_datasets

    agree = []
    for name in zoo_datasets():
        spec = get_spec(name)
        with torch.inference_mode():
            text = backbone.encode_tokens(backbone.tokenize(spec.prompts())).float()  # (C, E)
        agree.append(top1_agreement(fp32, int8, text))
    return min(agree), statistics.fmean(agree)


def torch_image_features(backbone: ClipBackbone, pixels: torch.Tensor, *, bf16: bool = False) -> torch.Tensor:
    """Eager torch image features (B, E) fp32, under bf16 autocast on the pixels' device type if asked."""
    with torch.inference_mode(), torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=bf16):
        return backbone.encode_image(pixels).float()


def _torch_text(backbone: ClipBackbone, embeds: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return backbone.encode_prompts(embeds, eot)


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _cached_image_graph(backbone: ClipBackbone, cache_dir: Path | None) -> CachedGraph | None:
    """The fp32 image graph ``ForwardEncoders`` exported for ``backbone`` (None if absent or corrupt)."""
    return OnnxCache(cache_dir or default_cache_dir()).load(_key(backbone, "image", "fp32"))


def _cpu_provider_session(backbone: ClipBackbone, cache_dir: Path | None, threads: int) -> OnnxEncoder | None:
    graph = _cached_image_graph(backbone, cache_dir)
    return None if graph is None else OnnxEncoder(graph.data, threads=threads, providers=[CPU])


def _fused_session(backbone: ClipBackbone, cache_dir: Path | None, threads: int) -> OnnxEncoder | None:
    graph = _cached_image_graph(backbone, cache_dir)
    if graph is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "fused.onnx"
        transformer_optimize(graph.path, dst, backbone, "image")
        return OnnxEncoder(dst.read_bytes(), threads=threads)


def _rows(
    arch: str,
    encoder: str,
    batch: int,
    seconds: dict[str, float],
    extra: dict[str, tuple[float | None, float | None]],
) -> list[BenchRow]:
    base = batch / seconds["torch-fp32"]
    out = []
    for name, sec in seconds.items():
        rate = batch / sec
        diff, agree = extra.get(name, (None, None))
        out.append(
            BenchRow(arch, encoder, name, rate, rate / base, diff if name != "torch-fp32" else 0.0, agree)
        )
    return out


def format_rows(rows: list[BenchRow], threads: int, batch: int) -> str:
    """A fixed-width table, one line per (arch, encoder, backend)."""
    head = (
        f"threads={threads} (torch.set_num_threads and onnxruntime intra-op), batch={batch}, "
        f"median of interleaved rounds; ort-fp32 on {best_providers()[0]}, ort-int8 on {CPU}\n"
        f"{'arch':<14}{'encoder':<8}{'backend':<16}{'items/s':>10}{'× torch':>9}"
        f"{'max|Δ|':>11}{'top-1 agr':>11}{'tasks min/mean':>16}"
    )
    lines = [head]
    for r in rows:
        diff = "-" if r.max_abs_diff is None else f"{r.max_abs_diff:.2e}"
        agree = "-" if r.agreement is None else f"{r.agreement:.4f}"
        tasks = "-" if r.agreement_tasks is None else f"{r.agreement_tasks[0]:.3f}/{r.agreement_tasks[1]:.3f}"
        lines.append(
            f"{r.arch:<14}{r.encoder:<8}{r.backend:<16}{r.items_per_s:>10.1f}{r.speedup:>9.2f}{diff:>11}{agree:>11}"
            f"{tasks:>16}"
        )
    lines.append(
        "top-1 agr: int8 vs fp32 on OOD images, zero-shot over 40 generic classes; tasks: the same under each "
        "downstream dataset's zero-shot classifier (min/mean)"
    )
    return "\n".join(lines)
