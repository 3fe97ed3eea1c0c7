"""``ForwardFeatures``: the forward-only encoder functions a scan injects into a ``PromptedCLIP``.

The engine stays pure torch: ``PromptedCLIP.use_forward_only(image_fn, text_fn)`` routes every encoder
call made *with gradients disabled* (the detector's share counting on clean and triggered held-out
images, ``predict``, CoOp/CoCoOp text features) through plain tensor-in/tensor-out functions; calls
that need gradients (trigger optimisation) stay in torch. This module supplies those functions from
``ForwardEncoders`` (onnxruntime, or torch when ONNX is impossible) for one backbone.

Clean-pool reuse: ``register_pool(pixels)`` marks the rows of an OOD pool as memoisable. Their
features are kept per (backbone content hash, backend, row content hash), process-wide, so a second
model on the same backbone and pool gets them without encoding anything (``STATS.pool_rows_encoded``
counts the rows actually encoded). Rows are matched by content, not by tensor identity, so any slice
of the pool (the detector's held-out split) hits; triggered images never match and are never kept.

int8: with ``int8=True`` the quantised image graph is used for a model only when its own class
predictions on the pool agree with fp32's on ≥ 99% of the images (``attach``): the gate is the
scanned model's top-1, not a proxy classifier's.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from scanner.accel.encoders import STATS, ForwardEncoders
from scanner.accel.quantize import INT8_MIN_AGREEMENT
from scanner.clip.backbone import ClipBackbone
from scanner.prompting.classifier import PromptedCLIP

log = logging.getLogger(__name__)

AccelMode = Literal["auto", "onnx", "torch"]
ACCEL_MODES: tuple[str, ...] = ("auto", "onnx", "torch")
#: images of the pool's tail (where the detector's held-out split lives) used by the per-model int8 gate
INT8_GATE_IMAGES = 256

_LOCK = threading.Lock()
_REGISTERED: set[bytes] = set()  # row hashes of registered pools
_REGISTERED_POOLS: set[str] = set()  # pool keys already registered (skip re-hashing)
_ROWS: dict[tuple[str, str], dict[bytes, torch.Tensor]] = {}  # (backbone hash, backend) -> row -> (E,)


def reset_feature_memo() -> None:
    """Forget registered pools and memoised rows (tests; ``scanner.accel.reset_registry`` calls it)."""
    with _LOCK:
        _REGISTERED.clear()
        _REGISTERED_POOLS.clear()
        _ROWS.clear()


def _row_hashes(pixels: torch.Tensor) -> list[bytes]:
    arr = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
    head = str(tuple(arr.shape[1:])).encode()
    return [hashlib.blake2b(head + row.tobytes(), digest_size=16).digest() for row in arr]


@dataclass
class AccelInfo:
    """What served a model's forward-only work; goes into ``ModelReport.accel``."""

    image: str  # "onnx-fp32", "onnx-int8", "torch" (chosen) or "torch-fallback" (ONNX impossible)
    text: str
    reasons: dict[str, str] = field(default_factory=dict)  # encoder -> why it fell back
    int8_agreement: float | None = None  # the model's top-1 agreement int8 vs fp32 (int8 requested)
    provider: str | None = None  # onnxruntime provider of the image session (None when torch serves it)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"image": self.image, "text": self.text}
        if self.provider is not None:
            out["provider"] = self.provider
        for which, why in sorted(self.reasons.items()):
            out[f"{which}_fallback_reason"] = why
        if self.int8_agreement is not None:
            out["int8_agreement"] = round(self.int8_agreement, 4)
        return out

    @property
    def fell_back(self) -> list[str]:
        """Encoders that wanted onnxruntime and got torch."""
        return [w for w, b in (("image", self.image), ("text", self.text)) if b == "torch-fallback"]


class _ImageFn:
    """Tensor in, tensor out: image features (B, E) fp32 of pixels (B, 3, S, S), registered rows memoised."""

    def __init__(self, encoders: ForwardEncoders) -> None:
        self.encoders = encoders

    @property
    def backend(self) -> str:
        return self.encoders.image_backend

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        hashes = _row_hashes(pixels)
        key = (self.encoders.content_hash, self.backend)
        with _LOCK:
            memo = _ROWS.setdefault(key, {})
            have = [memo.get(h) for h in hashes]
            keep = [h in _REGISTERED for h in hashes]
        missing = [i for i, f in enumerate(have) if f is None]
        if missing:
            idx = torch.tensor(missing, dtype=torch.long, device=pixels.device)
            fresh = self.encoders.encode_images(pixels.index_select(0, idx)).detach().cpu()  # (M, E)
            new_rows = 0
            with _LOCK:
                memo = _ROWS.setdefault((self.encoders.content_hash, self.backend), {})
                with torch.inference_mode(False):  # memo rows must outlive an inference_mode caller
                    for j, i in enumerate(missing):
                        have[i] = fresh[j]
                        if keep[i]:
                            memo[hashes[i]] = fresh[j].clone()
                            new_rows += 1
                STATS.pool_rows_encoded += new_rows
        if not have:
            return torch.zeros(0, self.encoders.backbone.embed_dim, device=pixels.device)
        return torch.stack([t for t in have if t is not None]).to(pixels.device)


class ForwardFeatures:
    """Forward-only image and text functions of one backbone (see the module docstring)."""

    def __init__(self, encoders: ForwardEncoders, *, int8: ForwardEncoders | None = None,
                 wanted_onnx: bool = True) -> None:
        self.encoders = encoders
        self.fp32 = _ImageFn(encoders)
        self.int8 = _ImageFn(int8) if int8 is not None and int8.image_backend == "onnx-int8" else None
        self.wanted_onnx = wanted_onnx

    @property
    def backbone(self) -> ClipBackbone:
        return self.encoders.backbone

    def register_pool(self, pixels: torch.Tensor, pool_key: str | None = None) -> None:
        """Let the features of these images (N, 3, S, S) be kept and reused by every later model.

        ``pool_key`` (e.g. the pool's sha256) skips re-hashing a pool registered before.
        """
        with _LOCK:
            if pool_key is not None and pool_key in _REGISTERED_POOLS:
                return
        hashes = _row_hashes(pixels)
        with _LOCK:
            _REGISTERED.update(hashes)
            if pool_key is not None:
                _REGISTERED_POOLS.add(pool_key)

    def encode_prompts(self, embeds: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """Text features (N, E) of prompt embeddings (N, L, D) with EOT rows (N,), in the caller's dtype."""
        return self.encoders.encode_prompts(embeds, eot_index).to(embeds.dtype)

    def _backend_label(self, backend: str, which: str) -> str:
        if backend == "torch" and self.wanted_onnx and which in self.encoders.fallback_reasons:
            return "torch-fallback"
        return backend

    def attach(self, model: PromptedCLIP, gate_pixels: torch.Tensor | None = None,
               min_agreement: float = INT8_MIN_AGREEMENT) -> AccelInfo:
        """Route ``model``'s forward-only encoder calls through these functions; what serves them.

        With an int8 image graph available and ``gate_pixels`` given, int8 serves the model only when
        the model's own top-1 class on those images agrees with fp32 on ≥ ``min_agreement`` of them.
        """
        image_fn, agreement = self.fp32, None
        if self.int8 is not None and gate_pixels is not None and gate_pixels.shape[0] > 0:
            agreement = self._agreement(model, gate_pixels)
            if agreement >= min_agreement:
                image_fn = self.int8
            else:
                log.info("int8 image encoder not used for this model: top-1 agreement with fp32 %.4f < %.4f",
                         agreement, min_agreement)
        model.use_forward_only(image_fn, self.encode_prompts)
        info = AccelInfo(self._backend_label(image_fn.backend, "image"),
                         self._backend_label(self.encoders.text_backend, "text"),
                         int8_agreement=agreement,
                         provider=next(iter(image_fn.encoders.providers), None))
        for which in info.fell_back:
            info.reasons[which] = self.encoders.fallback_reasons.get(which, "")
        return info

    def _agreement(self, model: PromptedCLIP, pixels: torch.Tensor) -> float:
        assert self.int8 is not None
        model.use_forward_only(None, self.encode_prompts)  # text features for CoCoOp's per-image prompts
        with torch.no_grad():
            ref = model.logits_from_features(self.fp32(pixels)).argmax(dim=1)
            cand = model.logits_from_features(self.int8(pixels)).argmax(dim=1)
        return float((ref == cand).float().mean())


def forward_features(backbone: ClipBackbone, mode: str = "auto", *, cache_dir: Path | None = None,
                     int8: bool = False, threads: int | None = None, device: str = "cpu") -> ForwardFeatures | None:
    """The forward-only functions of ``backbone`` for ``mode``; None means "let torch do it" (mode torch;
    mode auto without onnxruntime installed, or with the model on a GPU, where torch is faster).

    ``mode="onnx"`` always returns functions: when onnxruntime is missing or the export impossible they
    run torch (fp32), logged as a warning and reported as ``torch-fallback``. Never raises for ONNX
    trouble: a scan must complete without it.
    """
    if mode not in ACCEL_MODES:
        raise ValueError(f"accel mode must be one of {', '.join(ACCEL_MODES)}, got {mode!r}")
    if mode == "torch":
        return None
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        if mode == "auto":
            log.info("onnxruntime is not installed (%s); forward-only work runs in torch", exc)
            return None
        why = f"onnxruntime is not installed ({exc}); install scanner with onnxruntime or set accel = \"torch\""
        log.warning("%s; using torch", why)
        return ForwardFeatures(_torch_only(backbone, why))
    if mode == "auto" and device != "cpu":
        # On a GPU, torch is the faster forward path: on an H100 (ViT-B/16, batch 64) onnxruntime's CUDA
        # provider at fp32 parity gave 0.62x torch fp32 and 0.13x torch bf16 (the detector's default),
        # host copies included (benchmarks/cuda_bench.py). ``accel = "onnx"`` still forces it.
        log.info("model on %s: forward-only work runs in torch (faster there than onnxruntime)", device)
        return None
    try:
        fp32 = ForwardEncoders.for_backbone(backbone, cache_dir=cache_dir, threads=threads)
    except Exception as exc:  # an unforeseen failure of the ONNX machinery must not fail the scan
        why = f"ONNX set-up failed ({type(exc).__name__}: {exc})"
        log.warning("%s for backbone %s; using torch", why, backbone.name)
        return ForwardFeatures(_torch_only(backbone, why))
    q = None
    if int8 and fp32.image_backend == "onnx-fp32":
        try:
            # min_agreement 0: always build it; ``attach`` gates it per model on the model's own classes.
            q = ForwardEncoders.for_backbone(backbone, cache_dir=cache_dir, threads=threads, quantize=True,
                                             min_agreement=0.0)
        except Exception as exc:
            log.warning("int8 image encoder of %s unavailable (%s: %s); using fp32", backbone.name,
                        type(exc).__name__, exc)
    return ForwardFeatures(fp32, int8=q)


def _torch_only(backbone: ClipBackbone, why: str) -> ForwardEncoders:
    STATS.fallbacks += 2
    return ForwardEncoders(backbone, image=None, text=None, fallbacks=2,
                           fallback_reasons={"image": why, "text": why})

