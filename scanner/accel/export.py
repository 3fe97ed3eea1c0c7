"""Export a backbone's two frozen encoders to ONNX, with a checker pass and a parity check vs torch.

Two graphs per backbone:

* image: ``pixels`` float32 (B, 3, S, S) in [0, 1] → ``features`` (B, E); the mean/std normalisation is
  inside the graph, exactly like ``ClipBackbone.encode_image``.
* text: ``embeds`` float32 (N, L, D) + ``eot_index`` int64 (N,) → ``features`` (N, E), exactly
  ``ClipBackbone.encode_prompts`` (so CoOp/CoCoOp prompt embeddings can be fed).

Both have a dynamic leading (batch) dimension; S, L and D are fixed by the architecture.

Exporter choice: both exporters of torch 2.14 translate every supported architecture with the same
parity (ViT-B-32 image: max abs diff ~3e-6 either way) and the same onnxruntime throughput, but the
legacy TorchScript exporter is ~10× faster to run (scanner-tiny image: 0.7 s vs 7-10 s on 2 busy cores),
which is paid on every cold cache, in CI and in tests. So the legacy exporter goes first — with the
``nn.MultiheadAttention`` fast path switched off while tracing, because it has no translation for the
fused ``aten::_native_multi_head_attention`` kernel that frozen ViT-B blocks take — and the torch.export
("dynamo") exporter is the automatic fallback for a model the legacy one rejects (and the path that keeps
working once the deprecated legacy exporter is removed). The exporter actually used is recorded with the
file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from torch import nn

from scanner.clip.backbone import ClipBackbone
from scanner.errors import BackboneError

log = logging.getLogger(__name__)

Which = Literal["image", "text"]
ENCODERS: tuple[Which, ...] = ("image", "text")
#: opsets of the two exporters (dynamo: its default translation table); part of the cache key
OPSET = 18
LEGACY_OPSET = 17
#: the exporter policy (legacy first, dynamo as fallback); part of the cache key
EXPORTER = "legacy+dynamo-fallback"
#: the issue's parity bar, fp32 vs torch on random inputs
PARITY_ATOL = 1e-4
INPUT_NAMES: dict[Which, tuple[str, ...]] = {"image": ("pixels",), "text": ("embeds", "eot_index")}
OUTPUT_NAME = "features"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ExportError(BackboneError):
    """A backbone encoder could not be exported to ONNX, or the export does not match torch."""

    category = "export"


class ImageEncoderGraph(nn.Module):
    """The module that is traced for the image graph: pixels (B, 3, S, S) in [0, 1] → features (B, E)."""

    def __init__(self, backbone: ClipBackbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_image(pixels)


class TextEncoderGraph(nn.Module):
    """The module traced for the text graph: embeds (N, L, D) + eot_index (N,) → features (N, E)."""

    def __init__(self, backbone: ClipBackbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, embeds: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_prompts(embeds, eot_index)


@dataclass(frozen=True)
class ExportResult:
    """What one export produced: the file, the exporter that made it, its parity and timing."""

    path: Path
    which: Which
    exporter: str  # "dynamo" or "legacy"
    opset: int
    parity_max_abs_diff: float
    seconds: float


def example_inputs(
    backbone: ClipBackbone, which: Which, batch: int, *, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Random but realistic inputs: uniform pixels, or embeddings of random tokens with a random EOT row.

    Text embeddings come from the backbone's own token table so their scale matches real prompts.
    """
    g = torch.Generator().manual_seed(seed)
    if which == "image":
        s = backbone.image_size
        return (torch.rand(batch, 3, s, s, generator=g),)
    length = backbone.context_length
    vocab = backbone.token_embedding.num_embeddings
    tokens = torch.randint(0, vocab, (batch, length), generator=g)  # (N, L)
    eot = torch.randint(1, length, (batch,), generator=g)  # (N,) int64
    with torch.no_grad():
        embeds = backbone.token_embedding(tokens).float()  # (N, L, D)
    return embeds, eot


def graph_module(backbone: ClipBackbone, which: Which) -> nn.Module:
    """The eval-mode module whose forward is exported for ``which``."""
    module: nn.Module = ImageEncoderGraph(backbone) if which == "image" else TextEncoderGraph(backbone)
    return module.eval()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' progress prints, warnings and onnxscript's log chatter; failures still raise."""
    chatty = logging.getLogger("onnxscript")
    level = chatty.level
    chatty.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        chatty.setLevel(level)


@contextlib.contextmanager
def _mha_fastpath(enabled: bool) -> Iterator[None]:
    # The legacy exporter has no symbolic for the fused MHA kernel that frozen modules take. This flips
    # process-wide torch state for the duration of the trace; callers serialise exports (encoders._LOCK).
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def _export_dynamo(module: nn.Module, which: Which, args: tuple[torch.Tensor, ...], path: Path) -> None:
    batch = torch.export.Dim("batch")
    if which == "image":
        dynamic: dict[str, dict[int, torch.export.Dim]] = {"pixels": {0: batch}}
    else:
        dynamic = {"embeds": {0: batch}, "eot_index": {0: batch}}
    torch.onnx.export(
        module,
        args,
        str(path),
        input_names=list(INPUT_NAMES[which]),
        output_names=[OUTPUT_NAME],
        dynamic_shapes=dynamic,
        dynamo=True,
        opset_version=OPSET,
        external_data=False,
        verbose=False,
    )


def _export_legacy(module: nn.Module, which: Which, args: tuple[torch.Tensor, ...], path: Path) -> None:
    axes = {name: {0: "batch"} for name in (*INPUT_NAMES[which], OUTPUT_NAME)}
    with _mha_fastpath(False):
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=list(INPUT_NAMES[which]),
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
            dynamo=False,
            opset_version=17,
        )


def run_onnx(path_or_bytes: Path | bytes, which: Which, inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
    """Run a graph once on the CPU provider (used by the parity check; sessions.py serves real work)."""
    import onnxruntime as ort

    src = str(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    feed = {name: t.numpy() for name, t in zip(INPUT_NAMES[which], inputs, strict=True)}
    return np.asarray(sess.run([OUTPUT_NAME], feed)[0])


def parity(backbone: ClipBackbone, which: Which, path: Path, *, batch: int = 3, seed: int = 1) -> float:
    """Max abs difference between onnxruntime (CPU provider) and torch on a batch the export never saw."""
    return parity_of(backbone, which, lambda inputs: run_onnx(path, which, inputs), batch=batch, seed=seed)


def parity_of(backbone: ClipBackbone, which: Which, run: Callable[[tuple[torch.Tensor, ...]], np.ndarray], *,
              batch: int, seed: int) -> float:
    """Max abs difference between ``run`` (inputs of ``which`` -> features (B, E)) and torch fp32 on random
    inputs drawn with ``seed``; inf when the shapes differ."""
    inputs = example_inputs(backbone, which, batch, seed=seed)
    with torch.inference_mode():
        ref = graph_module(backbone, which)(*inputs).float().numpy()
    out = run(inputs)
    if out.shape != ref.shape:
        return float("inf")
    return float(np.abs(out - ref).max())


def export_encoder(
    backbone: ClipBackbone,
    which: Which,
    path: Path,
    *,
    atol: float = PARITY_ATOL,
    exporters: Sequence[str] = ("legacy", "dynamo"),
) -> ExportResult:
    """Export one encoder of ``backbone`` to ``path``; check it with onnx.checker and against torch.

    ``exporters`` are tried in order until one succeeds. Raises ExportError when none can translate the
    model, the checker rejects the graph, or the parity difference exceeds ``atol``. ``path`` may hold a
    partial file after a failure.
    """
    t0 = time.perf_counter()
    module = graph_module(backbone, which)
    # Batch 2 (not 1) so the exporter does not specialise the dynamic dimension to a constant.
    args = example_inputs(backbone, which, 2)
    errors: list[str] = []
    exporter = ""
    available = {"legacy": _export_legacy, "dynamo": _export_dynamo}
    for name in exporters:
        fn = available[name]
        try:
            with _quiet():
                fn(module, which, args, path)
            exporter = name
            break
        except Exception as exc:  # any exporter failure means "try the next one"
            text = _ANSI.sub("", str(exc)).strip()  # the dynamo exporter colours its messages
            first = (text.splitlines() or [type(exc).__name__])[0][:300]
            errors.append(f"{name}: {type(exc).__name__}: {first}")
            log.debug("%s exporter failed on the %s encoder of %s", name, which, backbone.name, exc_info=True)
    if not exporter:
        raise ExportError(
            f"the {which} encoder of backbone {backbone.name!r} could not be exported to ONNX "
            f"({'; '.join(errors)}); the scanner will use torch for it (slower, same results)"
        )
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ExportError(
            f"the exported {which} graph of {backbone.name!r} fails the ONNX checker: "
            f"{str(exc).splitlines()[0]}; the scanner will use torch for it"
        ) from exc
    diff = parity(backbone, which, path)
    if not diff <= atol:  # also catches NaN
        raise ExportError(
            f"the exported {which} graph of {backbone.name!r} differs from torch by {diff:.3g} "
            f"(expected ≤ {atol:g}); it was discarded and torch is used instead"
        )
    return ExportResult(
        path, which, exporter, OPSET if exporter == "dynamo" else LEGACY_OPSET, diff, time.perf_counter() - t0
    )
