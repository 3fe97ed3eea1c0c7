"""Torch eager vs onnxruntime (fp32, int8) throughput for both encoders; same as ``scanner onnx bench``.

Usage: python benchmarks/onnx_bench.py --arch scanner-tiny,ViT-B-32 --batch 32 --iters 5 --threads 2
"""

from __future__ import annotations

from scanner.cli.onnx import bench_cmd

if __name__ == "__main__":
    bench_cmd()
