"""A frozen CLIP backbone (open_clip architecture) with the two entry points prompt learning needs.

Images enter as float tensors in [0, 1] (B, 3, S, S) at the model's resolution: normalisation happens
inside, so triggers and attacks live in pixel space. Text enters either as token ids or as prompt
*embeddings* (N, L, D) plus the end-of-text position of each row, which is what CoOp-style learners feed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from scanner.errors import BackboneError

BUNDLED_NAME = "scanner-tiny"
_CONFIG_DIR = Path(__file__).parent / "configs"
_WEIGHTS_DIR = Path(__file__).parent / "weights"
# The statistics open_clip uses for OpenAI-style models; the bundled model is trained with the same.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@functools.cache
def register_configs() -> None:
    """Make the project's model configs known to open_clip (idempotent)."""
    open_clip.add_model_config(_CONFIG_DIR)


def bundled_weights_path() -> Path:
    return _WEIGHTS_DIR / f"{BUNDLED_NAME}.safetensors"


def state_dict_sha256(sd: dict[str, torch.Tensor]) -> str:
    """Content hash of a state dict: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class ClipBackbone(nn.Module):
    """A frozen open_clip CLIP plus the metadata the rest of the scanner needs."""

    # open_clip's CLIP exposes its towers as plain attributes; typed loosely on purpose.
    model: Any
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: nn.Module, name: str, *, mean: Sequence[float] = OPENAI_MEAN,
                 std: Sequence[float] = OPENAI_STD) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._tokenizer = open_clip.SimpleTokenizer(context_length=self.context_length)
        self._hash: str | None = None
        self.freeze()

    # ----------------------------------------------------------------- metadata
    @property
    def context_length(self) -> int:
        return int(self.model.context_length)

    @property
    def text_width(self) -> int:
        return int(self.model.token_embedding.weight.shape[1])

    @property
    def embed_dim(self) -> int:
        proj = self.model.text_projection
        if isinstance(proj, nn.Linear):
            return int(proj.out_features)
        return int(proj.shape[1])

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, tuple | list) else size)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.model.token_embedding

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    def content_hash(self) -> str:
        """sha256 of the encoder weights: identifies the backbone across processes (cached)."""
        if self._hash is None:
            self._hash = state_dict_sha256(self.model.state_dict())
        return self._hash

    def freeze(self) -> None:
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> ClipBackbone:
        # The encoders are frozen and always in eval mode (no dropout) whatever the caller does.
        super().train(mode)
        self.model.eval()
        return self

    # ----------------------------------------------------------------- text
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids (N, L) with SOT first and EOT (the largest id) after the text; truncates."""
        return self._tokenizer(list(texts))

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text features (N, E), not normalised; ``tokens`` (N, L) may sit on any device (the tokenizer
        makes CPU tensors)."""
        return self.model.encode_text(tokens.to(self.token_embedding.weight.device))

    def encode_prompts(self, embeds: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """Text features (N, E) from prompt embeddings (N, L, D); ``eot_index`` (N,) picks the EOT row.

        ``L`` may be shorter than the context length as long as it covers every EOT row: the text transformer is
        causal, so the EOT row never reads the padding after it, and cutting the padding away changes nothing
        but the cost (``PromptLearner.encode`` cuts at the last EOT)."""
        m = self.model
        n = embeds.shape[1]  # L
        x = embeds + m.positional_embedding[:n].to(embeds.dtype)
        mask = m.attn_mask
        x = m.transformer(x, attn_mask=None if mask is None else mask[:n, :n])
        x = m.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot_index]
        proj = m.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    # ----------------------------------------------------------------- image
    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean) / self.std

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image features (B, E), not normalised, from pixels in [0, 1] (B, 3, S, S)."""
        return self.model.encode_image(self.normalize(pixels))


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _quiet_random_init() -> Iterator[None]:
    """open_clip warns on the root logger whenever it builds a model without downloading weights;
    here that is always the case (weights come from local files afterwards), so the warning is noise."""
    f = _DropRandomInitWarning()
    logging.getLogger().addFilter(f)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(f)


def create_backbone(name: str, state_dict: dict[str, torch.Tensor] | None = None, *,
                    seed: int | None = None) -> ClipBackbone:
    """Build an open_clip architecture by config name; load ``state_dict`` if given, else random init."""
    register_configs()
    if name not in open_clip.list_models():
        raise BackboneError(
            f"unknown backbone architecture {name!r}; expected one of open_clip's configs "
            f"(e.g. {BUNDLED_NAME}, ViT-B-16, RN50)"
        )
    if seed is not None:
        torch.manual_seed(seed)
    with _quiet_random_init():
        model = open_clip.create_model(name, pretrained=None)
    if state_dict is not None:
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise BackboneError(f"weights do not match the {name} architecture: {first}") from exc
    return ClipBackbone(model, name)


def read_fp32_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors state dict as fp32 (the bundled weights are stored in fp16 to keep the wheel small;
    computation is fp32). Raises safetensors' error or OSError on an unreadable file."""
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(path)).items()}


@functools.cache
def _bundled_state() -> dict[str, torch.Tensor]:
    path = bundled_weights_path()
    if not path.exists():
        raise BackboneError(
            f"the bundled CLIP weights are missing at {path}; rebuild them with `scanner zoo pretrain`"
        )
    return read_fp32_weights(path)


def load_bundled() -> ClipBackbone:
    """The bundled tiny CLIP, frozen (a fresh module each call; weights are read from disk once)."""
    return create_backbone(BUNDLED_NAME, _bundled_state())
