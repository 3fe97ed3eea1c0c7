"""Derived graph variants: int8 dynamic quantisation (with its acceptance gate) and transformer fusions.

int8 acceptance is measured as **top-1 agreement**: for a pool of images, zero-shot-style logits are the
cosine similarities between each image's features and a fixed set of text features (C classes);
agreement is the fraction of images whose argmax class is the same with fp32 and with int8 image
features. The int8 graph is used only when agreement ≥ ``INT8_MIN_AGREEMENT`` (the issue's bar, 99%).
Only the image encoder is quantised: it carries the bulk of forward-only work (the OOD pool, ASR checks,
clean predictions) while the text encoder sees a few prompts per model, so quantising it would buy
nothing and add error to every class embedding.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch

from scanner.clip.backbone import ClipBackbone

log = logging.getLogger(__name__)

INT8_MIN_AGREEMENT = 0.99
#: generic class names for the default gate's zero-shot text features
GATE_CLASSES = (
    "cat",
    "dog",
    "bird",
    "horse",
    "car",
    "truck",
    "airplane",
    "ship",
    "flower",
    "tree",
    "house",
    "bridge",
    "mountain",
    "beach",
    "road",
    "person",
    "face",
    "hand",
    "chair",
    "table",
    "bottle",
    "cup",
    "book",
    "clock",
    "apple",
    "banana",
    "pizza",
    "fish",
    "butterfly",
    "bicycle",
    "train",
    "building",
    "sky",
    "rock",
    "grass",
    "snow",
    "water",
    "street",
    "window",
    "door",
)


def top1_agreement(reference: torch.Tensor, candidate: torch.Tensor, text_features: torch.Tensor) -> float:
    """Fraction of rows whose argmax class agrees: features (P, E), (P, E) vs text features (C, E)."""
    if reference.shape != candidate.shape or reference.ndim != 2 or reference.shape[0] == 0:
        raise ValueError(
            f"expected two non-empty (P, E) feature tensors of one shape, got "
            f"{tuple(reference.shape)} and {tuple(candidate.shape)}"
        )
    text = torch.nn.functional.normalize(text_features.float(), dim=-1)  # (C, E)
    ref = torch.nn.functional.normalize(reference.float(), dim=-1) @ text.T  # (P, C)
    cand = torch.nn.functional.normalize(candidate.float(), dim=-1) @ text.T  # (P, C)
    return float((ref.argmax(-1) == cand.argmax(-1)).float().mean())


def default_gate_text_features(backbone: ClipBackbone) -> torch.Tensor:
    """Text features (C, E) of "a photo of a {class}." over ``GATE_CLASSES``, from the torch encoder."""
    tokens = backbone.tokenize([f"a photo of a {c}." for c in GATE_CLASSES])
    with torch.inference_mode():
        return backbone.encode_tokens(tokens).float()


def default_gate_pool(backbone: ClipBackbone, n: int = 256) -> torch.Tensor:
    """(n, 3, S, S) images of the bundled OOD pool at the backbone's resolution (seed 0)."""
    from scanner.zoo.ood import default_ood_pool

    return default_ood_pool(n=n, size=backbone.image_size, seed=0)


#: names the int8 recipe in the cache key, so a graph quantised by an older recipe is never reused
INT8_RECIPE = "dyn-s8-perchannel-fp32-output-projection"


def output_projection(model: onnx.ModelProto) -> list[str]:
    """Name of the last matrix product before the graph's output (the tower's output projection), found by
    walking back from the output through elementwise and shape ops; [] when there is none.

    It is one product per image (a single token, ViT: 768 x 512), so keeping it in fp32 costs nothing, yet
    quantised it adds nearly half of int8's feature error: ViT-B-32 mean 1 - cos on 1,024 OOD images 6.6e-5
    for it alone, 1.4e-4 with every product quantised, 7.8e-5 with all but this one; top-1 agreement 0.973 ->
    0.983 (``benchmarks/int8_sensitivity.py``).
    """
    producer = {out: node for node in model.graph.node for out in node.output}
    frontier = collections.deque(o.name for o in model.graph.output)  # breadth first: the nearest product
    seen: set[str] = set()
    while frontier:
        name = frontier.popleft()
        node = producer.get(name)
        if node is None or name in seen:
            continue
        seen.add(name)
        if node.op_type in ("MatMul", "Gemm"):
            return [node.name]
        frontier.extend(i for i in node.input if i in producer)
    return []


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantisation of MatMul/Gemm weights (activations quantised per batch at run time).

    Per-channel weights keep the error of the wide projections small; the output projection stays fp32
    (``output_projection``); the graph is otherwise unchanged.
    """
    dynamic_int8(src, dst, exclude=output_projection(onnx.load(str(src), load_external_data=False)))


def dynamic_int8(src: Path, dst: Path, *, include: list[str] | None = None, exclude: list[str] | None = None) -> None:
    """onnxruntime's dynamic int8 (int8 per-channel weights) on the MatMul/Gemm nodes named in ``include``
    (all when None) less those in ``exclude``, written to ``dst``; its console chatter muted."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _root_info_muted():
        warnings.simplefilter("ignore")
        quantize_dynamic(
            src,
            dst,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul", "Gemm"],
            nodes_to_quantize=quantizer_names(include) if include is not None else None,
            nodes_to_exclude=quantizer_names(exclude or []),
        )


def quantizer_names(nodes: list[str]) -> list[str]:
    """``nodes`` as onnxruntime's dynamic quantiser knows them: it first rewrites each Gemm into a MatMul
    named ``<gemm>_MatMul`` (plus an Add), so a Gemm is named both ways."""
    return [n for node in nodes for n in (node, f"{node}_MatMul")]


@contextlib.contextmanager
def _root_info_muted() -> Iterator[None]:
    # onnxruntime.quantization logs one INFO line per skipped node, and generic advice at WARNING,
    # on the *root* logger; neither is actionable for a scanner user.
    before = logging.root.manager.disable
    logging.disable(max(before, logging.WARNING))
    try:
        yield
    finally:
        logging.disable(before)


def transformer_optimize(src: Path, dst: Path, backbone: ClipBackbone, which: str) -> dict[str, int]:
    """onnxruntime's transformer fusions (LayerNorm/SkipLayerNorm/BiasGelu/Attention); fused-op counts.

    Not in the default path: on this project's CPU it gave no measurable gain over ORT_ENABLE_ALL for
    ViT-B-32 (see ``scanner onnx bench``, which measures it side by side), so it is kept as an option.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    model = backbone.model
    tower: object = getattr(model.visual, "transformer", None) if which == "image" else model.transformer
    # 0 lets the optimizer infer the sizes (e.g. a ResNet image tower has no transformer).
    width = int(getattr(tower, "width", 0))
    heads = _heads(tower)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        opt = optimize_model(
            str(src), model_type="vit" if which == "image" else "clip", num_heads=heads, hidden_size=width
        )
        opt.save_model_to_file(str(dst))
    return {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}


def _heads(transformer: object) -> int:
    blocks = getattr(transformer, "resblocks", None)
    if not blocks:
        return 0  # let the optimizer infer (e.g. ResNet towers have no transformer)
    attn = getattr(blocks[0], "attn", None)
    return int(getattr(attn, "num_heads", 0))
