"""Where int8 loses top-1 agreement: dynamic int8 on one group of matrix products at a time.

    python benchmarks/int8_sensitivity.py [--arch scanner-tiny,ViT-B-32] [--images 256]

The scanner serves an int8 image graph only when its top-1 agreement with fp32 on OOD images is >= 99%
(``scanner/accel/quantize.py``). This benchmark asks whether leaving a few sensitive products in fp32
(mixed precision) could pass that gate while keeping int8's speed. For each architecture it prints:

* the fp32 classifier's **top-1 / top-2 cosine margins** on the gate's OOD images (zero-shot over the 40
  generic gate classes): an image whose margin is smaller than the error int8 adds flips, whatever the
  quantiser does;
* for each group of weight products (attention input projection, attention output, MLP in, MLP out, the
  output projection), then all of them, then all but the output projection (the scanner's recipe,
  ``quantize_int8``): the mean feature error
  ``1 - cos(fp32, int8)``, the gate's agreement, the agreement under every downstream dataset's zero-shot
  classifier (min / mean), and images/s relative to the fp32 onnxruntime graph (same thread count,
  interleaved rounds, median).

Activation x activation products (attention scores) are never quantised (``MatMulConstBOnly``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import onnx
import torch

from scanner.accel.bench import _cached_image_graph, bench_backbone, interleaved_medians, task_agreement
from scanner.accel.encoders import ForwardEncoders
from scanner.accel.quantize import (
    default_gate_pool,
    default_gate_text_features,
    dynamic_int8,
    output_projection,
    top1_agreement,
)
from scanner.accel.sessions import CPU, OnnxEncoder

GROUPS = ("attn-in", "attn-out", "mlp-in", "mlp-out", "proj")


def product_group(node: str, output: list[str]) -> str:
    """The role of one MatMul/Gemm node of an open_clip ViT image tower, from its exported name; ``output`` is
    the tower's output projection (``output_projection``). "scores" are the attention's activation x activation
    products, which dynamic int8 never quantises."""
    if node in output:
        return "proj"
    if "/mlp/" in node:
        return "mlp-in" if "c_fc" in node else "mlp-out"
    if node.endswith("attn/MatMul"):
        return "attn-in"
    return "attn-out" if "Gemm" in node or "out_proj" in node else "scores"


def speed_ratio(fp32: OnnxEncoder, q: OnnxEncoder, x: torch.Tensor, rounds: int = 5) -> float:
    """images/s of ``q`` over ``fp32`` on the batch ``x`` (interleaved rounds, medians)."""
    arr = x.numpy()
    t = interleaved_medians({"fp32": lambda: fp32.run([arr], len(arr)), "q": lambda: q.run([arr], len(arr))}, rounds)
    return t["fp32"] / t["q"]


def run(arch: str, n_images: int, threads: int) -> None:
    torch.set_num_threads(threads)
    bb = bench_backbone(arch)
    ForwardEncoders.for_backbone(bb, threads=threads)  # exports (or reuses) the fp32 graph
    graph = _cached_image_graph(bb, None)
    if graph is None:
        raise SystemExit(f"{arch}: no fp32 image graph could be exported")
    pool = default_gate_pool(bb, n_images)  # (P, 3, S, S)
    text = default_gate_text_features(bb)  # (40, E)
    with torch.inference_mode():
        ref = torch.cat([bb.encode_image(pool[i : i + 64]) for i in range(0, n_images, 64)])  # (P, E)
    sims = torch.nn.functional.normalize(ref, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T  # (P, 40)
    top2 = sims.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]  # (P,)
    print(f"\n{arch}: fp32 top-1/top-2 cosine margin over {n_images} OOD images: median {float(margin.median()):.1e}, "
          f"5th percentile {float(margin.quantile(0.05)):.1e}; "
          f"spread of one image's 40 cosines {float(sims.std(-1).mean()):.1e}")
    src = onnx.load(str(graph.path), load_external_data=False)
    out = output_projection(src)
    names = [n.name for n in src.graph.node if n.op_type in ("MatMul", "Gemm")]
    sets = {g: [n for n in names if product_group(n, out) == g] for g in GROUPS}
    weights = [n for n in names if product_group(n, out) != "scores"]
    sets["all"] = weights
    sets["all but proj (default)"] = [n for n in weights if n not in out]
    sets["all but proj, attn-out"] = [n for n in sets["all but proj (default)"] if n not in sets["attn-out"]]
    fp32 = OnnxEncoder(graph.path, providers=[CPU], threads=threads)
    print(f"{'quantised':22s} {'products':>8s} {'mean 1-cos':>11s} {'gate agr':>9s} {'tasks min/mean':>15s} "
          f"{'x ort fp32':>10s}")
    with tempfile.TemporaryDirectory() as tmp:
        for label, nodes in sets.items():
            if not nodes:
                continue
            dst = Path(tmp) / "q.onnx"
            dynamic_int8(graph.path, dst, include=nodes)
            q = OnnxEncoder(dst, providers=[CPU], threads=threads)
            feats = torch.from_numpy(q.run([pool.numpy()], 64))
            err = float((1 - torch.nn.functional.cosine_similarity(ref, feats)).mean())
            lo, mean = task_agreement(bb, ref, feats)
            # speed only for the whole-tower mixes: one group alone is not a recipe anyone would run
            speed = f"{speed_ratio(fp32, q, pool[:32]):.2f}" if label.startswith("all") else "-"
            print(f"{label:22s} {len(nodes):8d} {err:11.2e} {top1_agreement(ref, feats, text):9.4f} "
                  f"{lo:7.3f}/{mean:.3f} {speed:>10s}", flush=True)
            del q
            dst.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="scanner-tiny,ViT-B-32")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    for arch in args.arch.split(","):
        run(arch.strip(), args.images, args.threads)


if __name__ == "__main__":
    main()
