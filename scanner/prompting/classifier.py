"""A prompt-tuned CLIP classifier: frozen backbone + prompt learner -> logits over the learner's classes."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from scanner.clip.backbone import ClipBackbone
from scanner.prompting.learners import PromptEncoder, PromptLearner

#: forward-only image encoder: pixels (B, 3, S, S) in [0, 1] -> features (B, E)
ImageEncoder = Callable[[torch.Tensor], torch.Tensor]


class PromptedCLIP(nn.Module):
    """logits = exp(logit_scale) * cos(image feature, text feature of each class).

    Pixels are float in [0, 1] (B, 3, S, S); the backbone normalises. For learners whose prompts do not
    depend on the image (CoOp), the text features are cached whenever no gradient can flow into the
    learner (grad disabled, or its parameters frozen as during trigger inversion); the cache is keyed by
    the version counters of the learner's tensors, so an optimiser step or ``load_state_dict``
    invalidates it.

    Forward-only encoders (e.g. onnxruntime sessions from ``scanner.accel``) can be injected with
    :meth:`use_forward_only`; they serve every encoder call made while gradients are disabled.
    """

    def __init__(self, backbone: ClipBackbone, learner: PromptLearner) -> None:
        super().__init__()
        if learner.backbone is not backbone:
            raise ValueError("the learner was built on a different ClipBackbone instance than the one given")
        self.backbone = backbone
        self.learner = learner
        self._text_cache: tuple[tuple[object, ...], torch.Tensor] | None = None
        self.forward_images: ImageEncoder | None = None

    def use_forward_only(self, images: ImageEncoder | None, prompts: PromptEncoder | None = None) -> None:
        """Serve encoder calls made with gradients disabled by ``images`` (pixels -> image features) and
        ``prompts`` (prompt embeddings, EOT rows -> text features); None restores the backbone.

        Calls that may need gradients (trigger optimisation, prompt tuning) always use the backbone, so
        the functions need no autograd: plain tensor in, tensor out, fp32 or the caller's dtype.
        """
        self.forward_images = images
        self.learner.forward_prompts = prompts
        self._text_cache = None

    @property
    def device(self) -> torch.device:
        """Where the model computes (its backbone's device)."""
        return self.backbone.mean.device

    @property
    def classnames(self) -> list[str]:
        return self.learner.classnames

    @property
    def n_cls(self) -> int:
        return self.learner.n_cls

    # ----------------------------------------------------------------- features
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image features (B, E), not normalised, from pixels (B, 3, S, S) in [0, 1]."""
        if self.forward_images is not None and not torch.is_grad_enabled():
            return self.forward_images(pixels)
        return self.backbone.encode_image(pixels)

    def _cache_key(self) -> tuple[object, ...]:
        tensors = [*self.learner.parameters(), *self.learner.buffers()]
        return (tuple((id(t), t._version) for t in tensors), torch.is_autocast_enabled(self.learner.ctx.device.type),
                self.learner.ctx.device)

    def text_features(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised text features: (n_cls, E), or (B, n_cls, E) for image-conditioned learners."""
        if self.learner.image_conditioned:
            return F.normalize(self.learner.text_features(image_features), dim=-1)
        cacheable = not torch.is_grad_enabled() or not any(p.requires_grad for p in self.learner.parameters())
        if not cacheable:
            self._text_cache = None
            return F.normalize(self.learner.text_features(), dim=-1)
        key = self._cache_key()
        if self._text_cache is not None and self._text_cache[0] == key:
            cached = self._text_cache[1]
            # A tensor made under inference_mode cannot enter autograd (e.g. trigger inversion).
            if not cached.is_inference() or torch.is_inference_mode_enabled():
                return cached
        with torch.no_grad():
            feats = F.normalize(self.learner.text_features(), dim=-1)
        self._text_cache = (key, feats)
        return feats

    def logits_from_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_cls) from image features (B, E) (raw or normalised) — skips the image encoder."""
        # normalise before the text side: the order of the autograd graph fixes the order in which
        # gradients into the features are summed, and a learned trigger (BadCLIP) must train bit-identically
        img = F.normalize(image_features, dim=-1)
        return self._scaled_cosines(img, self.text_features(image_features))

    def logits_from_text(self, image_features: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_cls) from image features (B, E) and this model's ``text_features`` of them
        ((n_cls, E), or (B, n_cls, E) when image-conditioned): for callers that also need the text side."""
        return self._scaled_cosines(F.normalize(image_features, dim=-1), txt)

    def _scaled_cosines(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        scale = self.backbone.logit_scale
        if txt.ndim == 3:  # image-conditioned: one set of class features per image
            return scale * torch.einsum("be,bke->bk", img, txt.to(img.dtype))
        return scale * img @ txt.to(img.dtype).T

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_cls) from pixels (B, 3, S, S) in [0, 1]."""
        return self.logits_from_features(self.encode_images(pixels))

    # ----------------------------------------------------------------- batched inference
    # Inputs may live elsewhere than the model (a data set on the CPU, the model on a GPU): each batch is
    # moved to the model, and the result comes back to where the inputs were.
    def image_features(self, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Image features (N, E) of many images, in batches, without autograd."""
        dev = self.device
        with torch.inference_mode():
            return torch.cat([self.encode_images(pixels[i:i + batch_size].to(dev)).float()
                              for i in range(0, pixels.shape[0], batch_size)]).to(pixels.device)

    def predict(self, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Logits (N, n_cls) for many images, in batches under inference_mode (argmax = predicted class)."""
        dev = self.device
        with torch.inference_mode():
            return torch.cat([self(pixels[i:i + batch_size].to(dev)).float()
                              for i in range(0, pixels.shape[0], batch_size)]).to(pixels.device)
