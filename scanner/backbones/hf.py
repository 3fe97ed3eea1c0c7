"""Hugging Face ``CLIPModel`` weights ↔ open_clip's CLIP layout, without ``transformers``.

HF splits attention into ``q_proj``/``k_proj``/``v_proj`` and names everything per module; open_clip (and
OpenAI) keep one packed ``in_proj_weight`` (3W, W) per block and store the projections transposed:
``visual.proj`` is (W_v, E) where HF's ``visual_projection.weight`` is (E, W_v). Only ViT CLIPs exist in
HF's format.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from scanner.errors import BackboneError

# (HF name inside a transformer layer, open_clip name inside a resblock); q/k/v are handled apart.
_LAYER_MAP = (
    ("self_attn.out_proj", "attn.out_proj"),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
)
# Whole-model renames: HF name → open_clip name.
_TOP_MAP = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",  # sic: HF's spelling
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "logit_scale": "logit_scale",
}
_TOWERS = (("vision_model.encoder.layers", "visual.transformer.resblocks"),
           ("text_model.encoder.layers", "transformer.resblocks"))
# Buffers some HF exports persist; they are recomputed, never weights.
_IGNORED = re.compile(r"^(text_model|vision_model)\.embeddings\.position_ids$")


def _layer_indices(sd: dict[str, torch.Tensor], prefix: str) -> list[int]:
    rx = re.compile(rf"{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := rx.match(k))})


def hf_to_open_clip(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a ``CLIPModel`` state dict to open_clip's CLIP keys; every HF key must be used."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in hf:
            raise BackboneError(
                f"the Hugging Face CLIP weights lack {key}; expected a complete CLIPModel checkpoint "
                "(model.safetensors or pytorch_model.bin from CLIPModel.save_pretrained)"
            )
        used.add(key)
        return hf[key]

    for src, dst in _TOP_MAP.items():
        out[dst] = take(src)
    out["visual.proj"] = take("visual_projection.weight").t().contiguous()  # (E, W) → (W, E)
    out["text_projection"] = take("text_projection.weight").t().contiguous()
    for hf_prefix, oc_prefix in _TOWERS:
        for i in _layer_indices(hf, hf_prefix):
            src, dst = f"{hf_prefix}.{i}", f"{oc_prefix}.{i}"
            for part in ("weight", "bias"):
                # open_clip packs q, k, v rows in that order: (3W, W) and (3W,)
                out[f"{dst}.attn.in_proj_{part}"] = torch.cat(
                    [take(f"{src}.self_attn.{p}_proj.{part}") for p in ("q", "k", "v")], dim=0)
                for hf_name, oc_name in _LAYER_MAP:
                    out[f"{dst}.{oc_name}.{part}"] = take(f"{src}.{hf_name}.{part}")
    unused = sorted(k for k in hf if k not in used and not _IGNORED.match(k))
    if unused:
        raise BackboneError(
            f"the Hugging Face CLIP weights hold keys this converter does not know ({', '.join(unused[:5])}"
            f"{'...' if len(unused) > 5 else ''}); only plain CLIPModel checkpoints are supported"
        )
    return out


def open_clip_to_hf(sd: dict[str, torch.Tensor], *, heads: int, vision_heads: int,
                    quick_gelu: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The inverse of :func:`hf_to_open_clip` for ViT CLIPs: HF state dict and its ``config.json``.

    ``heads``/``vision_heads`` are the attention head counts (not recoverable from shapes).
    """
    if "visual.proj" not in sd:
        raise BackboneError("only ViT CLIPs have a Hugging Face CLIPModel layout (ResNet CLIPs do not)")
    inv = {v: k for k, v in _TOP_MAP.items()}
    hf: dict[str, torch.Tensor] = {inv[k]: sd[k] for k in inv}
    hf["visual_projection.weight"] = sd["visual.proj"].t().contiguous()
    hf["text_projection.weight"] = sd["text_projection"].t().contiguous()
    counts = {}
    for hf_prefix, oc_prefix in _TOWERS:
        layers = _layer_indices(sd, oc_prefix)
        counts[oc_prefix] = len(layers)
        for i in layers:
            src, dst = f"{oc_prefix}.{i}", f"{hf_prefix}.{i}"
            for part in ("weight", "bias"):
                q, k, v = sd[f"{src}.attn.in_proj_{part}"].chunk(3, dim=0)
                for name, t in (("q", q), ("k", k), ("v", v)):
                    hf[f"{dst}.self_attn.{name}_proj.{part}"] = t.contiguous()
                for hf_name, oc_name in _LAYER_MAP:
                    hf[f"{dst}.{hf_name}.{part}"] = sd[f"{src}.{oc_name}.{part}"]
    vision_width = int(sd["visual.conv1.weight"].shape[0])
    text_width = int(sd["ln_final.weight"].shape[0])
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    patch = int(sd["visual.conv1.weight"].shape[-1])
    act = "quick_gelu" if quick_gelu else "gelu"
    config: dict[str, Any] = {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": int(sd["text_projection"].shape[1]),
        "logit_scale_init_value": 2.6592,
        "text_config": {
            "hidden_size": text_width,
            "intermediate_size": int(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
            "num_attention_heads": heads, "num_hidden_layers": counts["transformer.resblocks"],
            "max_position_embeddings": int(sd["positional_embedding"].shape[0]),
            "vocab_size": int(sd["token_embedding.weight"].shape[0]), "hidden_act": act,
            "layer_norm_eps": 1e-5,
        },
        "vision_config": {
            "hidden_size": vision_width,
            "intermediate_size": int(sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
            "num_attention_heads": vision_heads, "num_hidden_layers": counts["visual.transformer.resblocks"],
            "image_size": grid * patch, "patch_size": patch, "hidden_act": act, "layer_norm_eps": 1e-5,
        },
    }
    return hf, config


def hf_uses_quick_gelu(config: dict[str, Any]) -> bool:
    """Whether a CLIPModel ``config.json`` asks for QuickGELU (every OpenAI-derived checkpoint does)."""
    # HF's CLIP configs default to quick_gelu when the key is absent.
    acts = {str(config.get(t, {}).get("hidden_act", "quick_gelu")) for t in ("text_config", "vision_config")}
    if len(acts) != 1 or acts - {"quick_gelu", "gelu"}:
        raise BackboneError(
            f"unsupported Hugging Face CLIP activation(s) {sorted(acts)}; expected quick_gelu or gelu "
            "in both towers"
        )
    return acts == {"quick_gelu"}
