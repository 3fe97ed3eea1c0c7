"""Which open_clip architecture a CLIP state dict is, read from its tensor shapes.

OpenAI and open_clip share one key layout (``visual.conv1.weight``, ``transformer.resblocks.N...``,
``token_embedding.weight``, ``text_projection``...), so one shape reader serves both (and the HF converter,
which produces that layout). The shapes are compared with the configs open_clip ships.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import open_clip
import torch

from scanner.clip import BUNDLED_NAME, register_configs
from scanner.errors import BackboneError

#: Architectures we recognise from shapes (the OpenAI releases plus the bundled tiny CLIP).
CANDIDATE_ARCHS = (
    BUNDLED_NAME, "RN50", "RN101", "RN50x4", "RN50x16", "RN50x64",
    "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336",
)
_QUICKGELU = "-quickgelu"


@dataclass(frozen=True)
class ArchSignature:
    """The shape facts that tell CLIP architectures apart."""

    vision: str  # "vit" or "resnet"
    vision_layers: tuple[int, ...]  # (n,) for a ViT, per-stage block counts for a ResNet
    vision_width: int
    patch_size: int  # 0 for a ResNet
    image_size: int
    embed_dim: int
    context_length: int
    vocab_size: int
    text_width: int
    text_layers: int


def _count(sd: dict[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def signature_of_state_dict(sd: dict[str, torch.Tensor]) -> ArchSignature:
    """Read an :class:`ArchSignature` from an OpenAI/open_clip-layout state dict."""
    try:
        if "visual.conv1.weight" in sd and "visual.proj" in sd:
            conv = sd["visual.conv1.weight"]  # (width, 3, patch, patch)
            grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            vision, patch = "vit", int(conv.shape[-1])
            layers: tuple[int, ...] = (_count(sd, r"visual\.transformer\.resblocks\.(\d+)\."),)
            width, image = int(conv.shape[0]), patch * grid
        elif "visual.attnpool.positional_embedding" in sd:
            vision, patch = "resnet", 0
            layers = tuple(_count(sd, rf"visual\.layer{b}\.(\d+)\.") for b in (1, 2, 3, 4))
            width = int(sd["visual.layer1.0.conv1.weight"].shape[0])
            out = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            image = out * 32  # a ModifiedResNet downsamples by 32
        else:
            raise KeyError("visual.conv1.weight / visual.attnpool.positional_embedding")
        return ArchSignature(
            vision=vision, vision_layers=layers, vision_width=width, patch_size=patch, image_size=image,
            embed_dim=int(sd["text_projection"].shape[1]),
            context_length=int(sd["positional_embedding"].shape[0]),
            vocab_size=int(sd["token_embedding.weight"].shape[0]),
            text_width=int(sd["ln_final.weight"].shape[0]),
            text_layers=_count(sd, r"transformer\.resblocks\.(\d+)\."),
        )
    except (KeyError, IndexError) as exc:
        raise BackboneError(
            f"the weights are not in CLIP's OpenAI/open_clip key layout (missing {exc}); expected keys such "
            "as visual.conv1.weight, transformer.resblocks.0.attn.in_proj_weight, token_embedding.weight — "
            "check the declared format (openai | open_clip | hf)"
        ) from exc


def signature_of_config(cfg: dict[str, Any]) -> ArchSignature:
    """The :class:`ArchSignature` an open_clip model config describes."""
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    layers = v["layers"]
    is_resnet = isinstance(layers, list | tuple)
    image = v["image_size"]
    return ArchSignature(
        vision="resnet" if is_resnet else "vit",
        vision_layers=tuple(layers) if is_resnet else (int(layers),),
        vision_width=int(v["width"]),
        patch_size=0 if is_resnet else int(v["patch_size"]),
        image_size=int(image[0] if isinstance(image, list | tuple) else image),
        embed_dim=int(cfg["embed_dim"]),
        context_length=int(t.get("context_length", 77)),
        vocab_size=int(t.get("vocab_size", 49408)),
        text_width=int(t["width"]),
        text_layers=int(t["layers"]),
    )


def infer_arch(sd: dict[str, torch.Tensor], *, quick_gelu: bool = False) -> str:
    """The open_clip config name whose shapes match ``sd``; ``-quickgelu`` variant when asked and known.

    Raises :class:`BackboneError` naming what was found when no known architecture matches.
    """
    register_configs()
    sig = signature_of_state_dict(sd)
    for name in CANDIDATE_ARCHS:
        cfg = open_clip.get_model_config(name)
        if cfg is not None and signature_of_config(cfg) == sig:
            if quick_gelu and f"{name}{_QUICKGELU}" in open_clip.list_models():
                return f"{name}{_QUICKGELU}"
            return name
    raise BackboneError(
        f"the weights' shapes ({sig}) match none of the known CLIP architectures "
        f"({', '.join(CANDIDATE_ARCHS)}); declare the open_clip architecture explicitly (arch = \"...\")"
    )


def normalize_backbone_name(name: str) -> str:
    """OpenAI/Dassl spellings to open_clip's: ``ViT-B/16`` → ``ViT-B-16``, ``RN50`` stays."""
    return name.strip().replace("/", "-")
