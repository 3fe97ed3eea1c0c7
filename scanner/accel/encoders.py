"""``ForwardEncoders``: the one entry point the detector and the zoo use for forward-only encoder work.

It hands out onnxruntime sessions for a backbone's frozen image and text encoders (exported once per
backbone content hash, cached on disk, shared process-wide) and falls back to torch, per encoder, when
export or loading is impossible — logged as a warning and counted. Gradients never go through here.

Counters in ``STATS`` (process-wide) make the sharing testable: a second model on the same backbone
finds the registry entry (no export, no new session) and ``cached_image_features`` encodes a given
pool once per backbone per process.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch

from scanner.accel.cache import CachedGraph, CacheKey, CacheUnwritableError, OnnxCache, default_cache_dir
from scanner.accel.export import (
    ENCODERS,
    EXPORTER,
    OPSET,
    PARITY_ATOL,
    Which,
    export_encoder,
    parity_of,
)
from scanner.accel.quantize import (
    INT8_MIN_AGREEMENT,
    INT8_RECIPE,
    default_gate_pool,
    default_gate_text_features,
    quantize_int8,
    top1_agreement,
)
from scanner.accel.sessions import CPU, OnnxEncoder, int8_providers, provider_choice
from scanner.clip.backbone import ClipBackbone
from scanner.errors import ScannerError

log = logging.getLogger(__name__)

#: ``hook(event, labels)``; events: "onnx_export", "onnx_session", "torch_fallback", "pool_encode"
MetricsHook = Callable[[str, Mapping[str, str]], None]
Prefer = Literal["onnx", "torch"]


@dataclass
class AccelStats:
    """Process-wide counters (read by tests and forwarded to Prometheus by the callers)."""

    exports_performed: int = 0  # graphs produced (exported or quantised) by this process
    sessions_created: int = 0  # onnxruntime sessions opened by this process
    fallbacks: int = 0  # encoders served by torch because ONNX was impossible
    pool_encodes: int = 0  # cache misses of cached_image_features
    pool_rows_encoded: int = 0  # rows of registered pools encoded by ForwardFeatures (memo misses)

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)


STATS = AccelStats()
_LOCK = threading.RLock()
_REGISTRY: dict[tuple[Any, ...], ForwardEncoders] = {}
_POOL_FEATURES: dict[tuple[str, str, str], torch.Tensor] = {}
_TEMP_ROOT: list[Path] = []


def reset_registry() -> None:
    """Forget every shared session and cached pool feature of this process (tests, long daemons)."""
    from scanner.accel.features import reset_feature_memo

    with _LOCK:
        _REGISTRY.clear()
        _POOL_FEATURES.clear()
    reset_feature_memo()


def _temp_cache_root() -> Path:
    # One private temp cache per process, removed at exit: the fallback for an unwritable cache folder.
    if not _TEMP_ROOT:
        root = Path(tempfile.mkdtemp(prefix="scanner-onnx-"))
        atexit.register(shutil.rmtree, root, True)
        _TEMP_ROOT.append(root)
    return _TEMP_ROOT[0]


def _key(backbone: ClipBackbone, which: Which, variant: str, extra: str = "") -> CacheKey:
    return CacheKey(
        backbone_hash=backbone.content_hash(),
        arch=backbone.name,
        which=which,
        variant=variant,
        exporter=EXPORTER,
        opset=OPSET,
        ort_version=ort.__version__,
        torch_version=torch.__version__,
        onnx_version=onnx.__version__,
        extra=extra,
    )


class ForwardEncoders:
    """Forward-only image and text encoders of one backbone: onnxruntime where possible, torch otherwise.

    Build with ``ForwardEncoders.for_backbone``; instances are shared per (backbone hash, options).
    """

    def __init__(
        self,
        backbone: ClipBackbone,
        *,
        image: OnnxEncoder | None,
        text: OnnxEncoder | None,
        image_variant: str = "fp32",
        int8_agreement: float | None = None,
        fallbacks: int = 0,
        fallback_reasons: Mapping[str, str] | None = None,
        metrics_hook: MetricsHook | None = None,
    ) -> None:
        self.backbone = backbone  # kept for the torch fallback
        self._image = image
        self._text = text
        self.image_variant = image_variant
        #: top-1 agreement of int8 vs fp32 measured by the gate (None when int8 was not tried)
        self.int8_agreement = int8_agreement
        #: encoders of this instance served by torch because ONNX export/loading/running failed
        self.fallbacks = fallbacks
        #: why each torch-served encoder is not on onnxruntime ("image"/"text" -> message)
        self.fallback_reasons: dict[str, str] = dict(fallback_reasons or {})
        self.metrics_hook = metrics_hook

    # ----------------------------------------------------------------- construction
    @classmethod
    def for_backbone(
        cls,
        backbone: ClipBackbone,
        *,
        cache_dir: Path | None = None,
        prefer: Prefer = "onnx",
        quantize: bool = False,
        metrics_hook: MetricsHook | None = None,
        gate_pixels: torch.Tensor | None = None,
        gate_text: torch.Tensor | None = None,
        min_agreement: float = INT8_MIN_AGREEMENT,
        threads: int | None = None,
    ) -> ForwardEncoders:
        """The shared encoders of ``backbone`` (exported, cached and opened on first use).

        ``cache_dir``: ONNX cache folder (default ``default_cache_dir()``); when it cannot be written a
        per-process temp folder is used instead. ``prefer="torch"`` skips ONNX entirely. ``quantize``
        tries an int8 image graph, kept only when its top-1 agreement with fp32 on ``gate_pixels``
        (default: 256 bundled OOD images) against ``gate_text`` (default: 40 "a photo of a …" prompts)
        is ≥ ``min_agreement``. ``threads``: intra-op threads (default: physical cores).
        """
        if prefer not in ("onnx", "torch"):
            raise ValueError(f"prefer must be 'onnx' or 'torch', got {prefer!r}")
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        gate_key = _gate_key(gate_pixels, gate_text)
        reg_key = (
            backbone.content_hash(),
            backbone.name,
            prefer,
            quantize,
            str(root.expanduser()),
            gate_key,
            min_agreement,
            threads,
            provider_choice(),  # SCANNER_ONNX_PROVIDER: sessions on another provider are other entries
        )
        with _LOCK:
            found = _REGISTRY.get(reg_key)
            if found is not None:
                if metrics_hook is not None and found.metrics_hook is None:
                    found.metrics_hook = metrics_hook
                return found
            if prefer == "torch":
                enc = cls(backbone, image=None, text=None, metrics_hook=metrics_hook)
            else:
                enc = _build(
                    cls,
                    backbone,
                    root,
                    quantize=quantize,
                    hook=metrics_hook,
                    gate_pixels=gate_pixels,
                    gate_text=gate_text,
                    gate_key=gate_key,
                    min_agreement=min_agreement,
                    threads=threads,
                )
            _REGISTRY[reg_key] = enc
            return enc

    # ----------------------------------------------------------------- properties
    @property
    def content_hash(self) -> str:
        return self.backbone.content_hash()

    @property
    def image_backend(self) -> str:
        """ "onnx-fp32", "onnx-int8" or "torch"."""
        return f"onnx-{self.image_variant}" if self._image is not None else "torch"

    @property
    def text_backend(self) -> str:
        """ "onnx-fp32" or "torch"."""
        return "onnx-fp32" if self._text is not None else "torch"

    @property
    def providers(self) -> list[str]:
        """onnxruntime providers of the image session (empty when torch serves it)."""
        return self._image.providers if self._image is not None else []

    # ----------------------------------------------------------------- encoding
    def encode_images(self, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Image features (B, E) float32 from pixels in [0, 1] (B, 3, S, S), on the input's device."""
        s = self.backbone.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ValueError(
                f"expected pixels of shape (B, 3, {s}, {s}) for {self.backbone.name}, "
                f"got {tuple(pixels.shape)}"
            )
        if self._image is not None:
            try:
                arr = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
                return torch.from_numpy(self._image.run([arr], batch_size)).to(pixels.device)
            except Exception as exc:  # an onnxruntime failure must not fail the scan
                self._image = None
                self._runtime_fallback("image", exc)
        return self._torch_batches(
            lambda x: self.backbone.encode_image(x), [pixels], batch_size, pixels.device
        )

    def encode_prompts(
        self, embeds: torch.Tensor, eot_index: torch.Tensor, batch_size: int = 256
    ) -> torch.Tensor:
        """Text features (N, E) float32 from prompt embeddings (N, L, D) and EOT positions (N,)."""
        length, width = self.backbone.context_length, self.backbone.text_width
        if (
            embeds.ndim != 3
            or tuple(embeds.shape[1:]) != (length, width)
            or eot_index.shape != embeds.shape[:1]
        ):
            raise ValueError(
                f"expected embeds (N, {length}, {width}) and eot_index (N,), got "
                f"{tuple(embeds.shape)} and {tuple(eot_index.shape)}"
            )
        if self._text is not None:
            try:
                e = embeds.detach().to("cpu", torch.float32).contiguous().numpy()
                i = eot_index.detach().to("cpu", torch.int64).contiguous().numpy()
                return torch.from_numpy(self._text.run([e, i], batch_size)).to(embeds.device)
            except Exception as exc:
                self._text = None
                self._runtime_fallback("text", exc)
        return self._torch_batches(
            lambda e, i: self.backbone.encode_prompts(e, i), [embeds, eot_index], batch_size, embeds.device
        )

    def _torch_batches(
        self,
        fn: Callable[..., torch.Tensor],
        inputs: list[torch.Tensor],
        batch_size: int,
        out_device: torch.device,
    ) -> torch.Tensor:
        dev = next(self.backbone.parameters()).device
        outs = []
        # no_grad, not inference_mode: the features may later meet tensors that require grad. fp32 like
        # the onnxruntime path, whatever autocast the caller runs under.
        with torch.no_grad(), torch.autocast(dev.type, enabled=False):
            for start in range(0, int(inputs[0].shape[0]), batch_size):
                chunk = [t[start : start + batch_size].to(dev) for t in inputs]
                outs.append(fn(*chunk).float())
        if not outs:
            return torch.zeros(0, self.backbone.embed_dim, device=out_device)
        return torch.cat(outs).to(out_device)

    def _runtime_fallback(self, which: Which, exc: Exception) -> None:
        log.warning(
            "onnxruntime failed on the %s encoder of %s (%s: %s); using torch from now on",
            which,
            self.backbone.name,
            type(exc).__name__,
            exc,
        )
        self.fallbacks += 1
        self.fallback_reasons[which] = f"onnxruntime failed while running: {type(exc).__name__}: {exc}"
        _count_fallback(which, "runtime", self.metrics_hook)


# --------------------------------------------------------------------- building
def _gate_key(pixels: torch.Tensor | None, text: torch.Tensor | None) -> str:
    import hashlib

    h = hashlib.sha256(b"gate-v1")
    for t in (pixels, text):
        if t is None:
            h.update(b"default")
        else:
            c = t.detach().to("cpu", torch.float32).contiguous()
            h.update(str(tuple(c.shape)).encode())
            h.update(c.numpy().tobytes())
    return h.hexdigest()[:32]


def _count_fallback(which: str, reason: str, hook: MetricsHook | None) -> None:
    STATS.fallbacks += 1
    if hook is not None:
        hook("torch_fallback", {"encoder": which, "reason": reason})


def _produce_graph(
    cache: OnnxCache, key: CacheKey, produce: Callable[[Path], dict[str, Any]], hook: MetricsHook | None
) -> CachedGraph:
    """Get or produce through ``cache``; an unwritable folder switches to the per-process temp cache."""
    try:
        graph = cache.get_or_create(key, produce)
    except CacheUnwritableError as exc:
        temp = OnnxCache(_temp_cache_root())
        log.warning("%s; exporting to the temporary folder %s for this process instead", exc, temp.root)
        graph = temp.get_or_create(key, produce)
    if graph.produced:
        STATS.exports_performed += 1
        if hook is not None:
            hook("onnx_export", {"encoder": key.which, "variant": key.variant})
    return graph


def session_parity(backbone: ClipBackbone, which: Which, enc: OnnxEncoder, *, batch: int = 2) -> float:
    """Max abs difference between the session ``enc`` (whatever its provider) and torch fp32 on random
    inputs the export never saw. The export's own check ran on the CPU provider; another provider may
    compute differently (OpenVINO's default bf16, CUDA's TF32), so each such session is checked too."""
    return parity_of(backbone, which, lambda inputs: enc.run([t.numpy() for t in inputs], batch), batch=batch, seed=5)


def _open(
    graph: CachedGraph,
    which: str,
    threads: int | None,
    hook: MetricsHook | None,
    *,
    check: tuple[ClipBackbone, Which] | None = None,
    providers: list[str] | None = None,
) -> OnnxEncoder:
    """A session on ``graph``. With ``check`` (an fp32 graph of that backbone's encoder), a session on a
    provider other than the CPU one must match torch within ``PARITY_ATOL`` or is reopened on the CPU
    provider, with a warning: the scanner's scores must not depend on which provider ran them.
    ``providers``: as ``OnnxEncoder`` (default: the best available)."""
    enc = OnnxEncoder(graph.data, threads=threads, providers=providers)
    if check is not None and enc.providers[0] != CPU:
        diff = session_parity(check[0], check[1], enc)
        if not diff <= PARITY_ATOL:
            log.warning(
                "%s on the %s encoder of %s differs from torch by %.2e (> %.0e); using the CPU provider",
                enc.providers[0],
                which,
                check[0].name,
                diff,
                PARITY_ATOL,
            )
            enc = OnnxEncoder(graph.data, threads=threads, providers=[CPU])
    STATS.sessions_created += 1
    if hook is not None:
        hook("onnx_session", {"encoder": which})
    return enc


def _build(
    cls: type[ForwardEncoders],
    backbone: ClipBackbone,
    root: Path,
    *,
    quantize: bool,
    hook: MetricsHook | None,
    gate_pixels: torch.Tensor | None,
    gate_text: torch.Tensor | None,
    gate_key: str,
    min_agreement: float,
    threads: int | None,
) -> ForwardEncoders:
    cache = OnnxCache(root)
    sessions: dict[str, OnnxEncoder | None] = {}
    graphs: dict[str, CachedGraph] = {}
    fallbacks = 0
    reasons: dict[str, str] = {}
    for which in ENCODERS:

        def produce(tmp: Path, which: Which = which) -> dict[str, Any]:
            res = export_encoder(backbone, which, tmp)
            return {
                "exporter": res.exporter,
                "opset": res.opset,
                "parity_max_abs_diff": res.parity_max_abs_diff,
                "export_seconds": round(res.seconds, 3),
            }

        try:
            graphs[which] = _produce_graph(cache, _key(backbone, which, "fp32"), produce, hook)
            sessions[which] = _open(graphs[which], which, threads, hook, check=(backbone, which))
        except (ScannerError, OSError, RuntimeError, ValueError) as exc:
            reason = getattr(exc, "category", type(exc).__name__)
            log.warning(
                "ONNX is unavailable for the %s encoder of %s: %s — using torch (slower, same results)",
                which,
                backbone.name,
                exc,
            )
            sessions[which] = None
            fallbacks += 1
            reasons[which] = str(exc)
            _count_fallback(which, str(reason), hook)
    image_variant, agreement = "fp32", None
    if quantize and sessions.get("image") is not None:
        try:
            int8, agreement = _int8_image(
                backbone,
                cache,
                graphs["image"],
                sessions["image"],
                hook=hook,
                gate_pixels=gate_pixels,
                gate_text=gate_text,
                gate_key=gate_key,
                threads=threads,
            )
            if agreement >= min_agreement:
                sessions["image"], image_variant = int8, "int8"
                log.info("int8 image encoder of %s accepted (top-1 agreement %.4f)", backbone.name, agreement)
            else:
                log.warning(
                    "int8 image encoder of %s rejected: top-1 agreement with fp32 %.4f < %.4f; keeping fp32",
                    backbone.name,
                    agreement,
                    min_agreement,
                )
        except (ScannerError, OSError, RuntimeError, ValueError) as exc:
            log.warning("int8 quantisation of %s failed (%s); keeping fp32", backbone.name, exc)
    return cls(
        backbone,
        image=sessions["image"],
        text=sessions["text"],
        image_variant=image_variant,
        int8_agreement=agreement,
        fallbacks=fallbacks,
        fallback_reasons=reasons,
        metrics_hook=hook,
    )


def _int8_image(
    backbone: ClipBackbone,
    cache: OnnxCache,
    fp32: CachedGraph,
    fp32_session: OnnxEncoder | None,
    *,
    hook: MetricsHook | None,
    gate_pixels: torch.Tensor | None,
    gate_text: torch.Tensor | None,
    gate_key: str,
    threads: int | None,
) -> tuple[OnnxEncoder, float]:
    """The int8 image session and its measured top-1 agreement (stored in the sidecar, measured once)."""
    assert fp32_session is not None

    def produce(tmp: Path) -> dict[str, Any]:
        quantize_int8(fp32.path, tmp)
        pixels = gate_pixels if gate_pixels is not None else default_gate_pool(backbone)
        text = gate_text if gate_text is not None else default_gate_text_features(backbone)
        arr = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
        ref = fp32_session.run([arr], 64)  # (P, E)
        cand = OnnxEncoder(tmp, threads=threads, providers=int8_providers()).run([arr], 64)  # (P, E)
        agree = top1_agreement(torch.from_numpy(ref), torch.from_numpy(cand), text)
        cos = _min_cosine(ref, cand)
        return {
            "top1_agreement": agree,
            "gate_images": int(arr.shape[0]),
            "gate_classes": int(text.shape[0]),
            "min_cosine": cos,
        }

    graph = _produce_graph(cache, _key(backbone, "image", "int8", extra=f"{INT8_RECIPE}:{gate_key}"), produce, hook)
    return _open(graph, "image-int8", threads, hook, providers=int8_providers()), float(graph.meta["top1_agreement"])


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12
    return float((num / den).min())


# --------------------------------------------------------------------- pool features
def cached_image_features(encoders: ForwardEncoders, pixels: torch.Tensor, pool_key: str) -> torch.Tensor:
    """Features (P, E) of an image pool, encoded once per (backbone hash, backend, pool key) per process.

    ``pool_key`` identifies the pool's content (e.g. ``scanner.zoo.ood.pool_sha256(pixels)``); the caller
    vouches that equal keys mean equal pixels. Returns a fresh copy each call.
    """
    key = (encoders.content_hash, encoders.image_backend, pool_key)
    with _LOCK:
        feats = _POOL_FEATURES.get(key)
        if feats is None:
            feats = encoders.encode_images(pixels).detach().cpu()
            _POOL_FEATURES[key] = feats
            STATS.pool_encodes += 1
            if encoders.metrics_hook is not None:
                encoders.metrics_hook("pool_encode", {"backend": encoders.image_backend})
    return feats.clone().to(pixels.device)
