"""``scanner onnx export`` and ``scanner onnx bench``: the ONNX encoder cache from the command line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import click

from scanner.cli import main

if TYPE_CHECKING:  # torch and open_clip load only when a command runs
    from scanner.clip.backbone import ClipBackbone


def _backbone(spec: str, arch: str | None) -> ClipBackbone:
    """BACKBONE: "bundled", an open_clip architecture name (seeded random init, for demos) or weights."""
    from scanner.clip.backbone import create_backbone, load_bundled

    path = Path(spec)
    if spec == "bundled":
        return load_bundled()
    if path.suffix == ".safetensors" and path.exists():
        from safetensors.torch import load_file

        if not arch:
            raise click.UsageError(
                f"{spec} is a weights file: say which architecture with --arch (e.g. ViT-B-16)"
            )
        return create_backbone(arch, {k: v.float() for k, v in load_file(str(path)).items()})
    return create_backbone(spec, seed=0)


@main.group()
def onnx() -> None:
    """ONNX export of the frozen encoders and onnxruntime benchmarks."""


@onnx.command("export")
@click.argument("backbone")
@click.option("--arch", default=None, help="Architecture of a BACKBONE weights file (.safetensors).")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="ONNX cache folder (default: $SCANNER_CACHE_DIR/onnx or ~/.cache/scanner/onnx).",
)
@click.option(
    "--quantize", is_flag=True, help="Also build the int8 image encoder and run its agreement gate."
)
def export_cmd(backbone: str, arch: str | None, cache_dir: Path | None, quantize: bool) -> None:
    """Export (or find cached) the image and text encoders of BACKBONE.

    BACKBONE is "bundled", an open_clip architecture name such as ViT-B-32 (random init, for demos) or a
    .safetensors weights file with --arch.
    """
    from scanner.accel import STATS, ForwardEncoders
    from scanner.accel.cache import default_cache_dir

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    bb = _backbone(backbone, arch)
    exports_before = STATS.exports_performed
    enc = ForwardEncoders.for_backbone(bb, cache_dir=cache_dir, quantize=quantize)
    click.echo(f"backbone {bb.name} sha256 {bb.content_hash()[:16]}…")
    click.echo(f"cache folder {cache_dir or default_cache_dir()}")
    click.echo(
        f"image encoder: {enc.image_backend}   text encoder: {enc.text_backend}   providers: {enc.providers}"
    )
    if enc.int8_agreement is not None:
        click.echo(f"int8 top-1 agreement with fp32: {enc.int8_agreement:.4f}")
    click.echo(
        f"graphs exported now: {STATS.exports_performed - exports_before} (0 = all found in the cache); "
        f"torch fallbacks: {enc.fallbacks}"
    )


@onnx.command("bench")
@click.option("--arch", "archs", default="scanner-tiny,ViT-B-32", show_default=True, help="Comma-separated.")
@click.option("--batch", default=32, show_default=True, type=click.IntRange(1))
@click.option("--iters", default=5, show_default=True, type=click.IntRange(1), help="Timed rounds.")
@click.option(
    "--threads", default=None, type=click.IntRange(1), help="Threads for both (default: physical cores)."
)
@click.option("--int8/--no-int8", default=True, show_default=True)
@click.option("--bf16/--no-bf16", default=True, show_default=True, help="Also time torch bf16 autocast.")
@click.option(
    "--fused/--no-fused", default=False, show_default=True, help="Also time ORT transformer fusions."
)
@click.option("--gate-images", default=256, show_default=True, type=click.IntRange(8))
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
def bench_cmd(
    archs: str,
    batch: int,
    iters: int,
    threads: int | None,
    int8: bool,
    bf16: bool,
    fused: bool,
    gate_images: int,
    cache_dir: Path | None,
) -> None:
    """Images/s (and prompts/s) of torch eager vs onnxruntime fp32/int8, parity and int8 agreement."""
    import os
    import sys

    if "torch" not in sys.modules:  # OpenMP reads it once, when torch loads (see scanner.accel.bench)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from scanner.accel.bench import format_rows, run_bench
    from scanner.accel.sessions import physical_cores

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    n = threads or physical_cores()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    click.echo(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, onnxruntime spinning off, "
               f"1-min load average {load:.1f} on {os.cpu_count()} CPUs")
    rows = []
    for arch in [a.strip() for a in archs.split(",") if a.strip()]:
        rows += run_bench(
            arch,
            batch=batch,
            iters=iters,
            threads=n,
            int8=int8,
            bf16=bf16,
            fused=fused,
            gate_images=gate_images,
            cache_dir=cache_dir,
        )
    click.echo(format_rows(rows, n, batch))
