"""Readers that turn a user's local CLIP weight file into an open_clip-layout state dict.

Every reader goes through :mod:`scanner.safeload`: nothing here unpickles or executes a file directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from scanner.backbones.hf import hf_to_open_clip, hf_uses_quick_gelu
from scanner.clip.backbone import OPENAI_MEAN, OPENAI_STD
from scanner.errors import BackboneError, CheckpointError
from scanner.safeload import (
    DEFAULT_MAX_BYTES,
    is_torchscript_archive,
    load_torchscript_tensors,
    safe_load_safetensors,
    safe_torch_load,
)

BackboneFormat = Literal["openai", "open_clip", "hf", "bundled"]
FORMATS: tuple[str, ...] = get_args(BackboneFormat)
#: Weight files a Hugging Face CLIPModel folder may hold, in order of preference (safetensors first).
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Tensors of OpenAI's TorchScript module tree that are not weights (the causal mask is rebuilt by
# open_clip) and ints the OpenAI state dict carries.
_OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")


@dataclass(frozen=True)
class Weights:
    """What a reader found: open_clip-layout tensors (fp32) and what the file says about the model."""

    state_dict: dict[str, torch.Tensor]
    quick_gelu: bool | None  # None: the file does not say (open_clip state dicts)
    mean: tuple[float, float, float] | None = None  # preprocessing the file declares, if any
    std: tuple[float, float, float] | None = None


def detect_format(path: Path) -> BackboneFormat:
    """Guess the format of ``path``: HF folder, TorchScript/OpenAI archive, or open_clip state dict.

    OpenAI and open_clip state dicts share a key layout; a plain ``.pt`` whose name is one of OpenAI's
    release names (``ViT-B-16.pt``, ``RN50.pt``...) counts as OpenAI (QuickGELU), anything else as open_clip.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").exists():
            return "hf"
        raise BackboneError(
            f"{path} is a folder without config.json; expected a Hugging Face CLIPModel folder "
            "(config.json + model.safetensors) or a weight file"
        )
    if path.suffix == ".safetensors":
        return "open_clip"
    if is_torchscript_archive(path):
        return "openai"
    stem = path.stem
    if path.suffix == ".pt" and (stem.startswith(("ViT-", "RN")) and "openai" not in stem.lower()
                                 and "laion" not in stem.lower()):
        return "openai"
    return "open_clip"


def _as_float_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    # open_clip training checkpoints wrap the weights: {"epoch", "state_dict": {"module.visual...": ...}}
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: expected a state dict of CLIP tensors, found {type(obj).__name__}")
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue
        name = str(k)
        if name.startswith("module."):
            name = name[len("module."):]
        # OpenAI ships fp16; the scanner computes in fp32.
        out[name] = v.float() if v.is_floating_point() else v
    return out


def read_openai(path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Weights:
    """OpenAI's ``ViT-B-16.pt``: a TorchScript archive (read, never run) or a plain state dict."""
    path = Path(path)
    raw: Any = (load_torchscript_tensors(path, max_bytes=max_bytes) if is_torchscript_archive(path)
                else safe_torch_load(path, max_bytes=max_bytes))
    return _openai_weights(_as_float_dict(raw, path))


def _openai_weights(sd: dict[str, torch.Tensor]) -> Weights:
    sd = {k: v for k, v in sd.items() if k not in _OPENAI_EXTRAS and not k.endswith("attn_mask")}
    return Weights(sd, quick_gelu=True, mean=OPENAI_MEAN, std=OPENAI_STD)


def read_open_clip(path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Weights:
    """An open_clip state dict: ``.safetensors``, or ``.bin``/``.pt`` via the safe torch loader."""
    path = Path(path)
    if path.suffix == ".safetensors":
        tensors, _meta = safe_load_safetensors(path, max_bytes=max_bytes)
        return Weights(_as_float_dict(tensors, path), quick_gelu=None)
    sd = _as_float_dict(safe_torch_load(path, max_bytes=max_bytes), path)
    if any(k in sd for k in _OPENAI_EXTRAS):
        # Only OpenAI's own state dicts carry these ints: it is an OpenAI (QuickGELU) file after all.
        return _openai_weights(sd)
    return Weights(sd, quick_gelu=None)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BackboneError(f"{path}: cannot read JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise BackboneError(f"{path}: expected a JSON object")
    return data


def hf_weight_file(folder: Path) -> Path:
    """The weight file of an HF folder (``model.safetensors`` preferred over ``pytorch_model.bin``)."""
    for name in HF_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise BackboneError(
        f"{folder}: no {' or '.join(HF_WEIGHT_FILES)}; sharded or other HF checkpoints are not supported — "
        "save the CLIPModel as one file"
    )


def _triple(value: Any, where: Path) -> tuple[float, float, float]:
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, int | float) for v in value)):
        raise BackboneError(f"{where}: image_mean/image_std must be three numbers, found {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


def read_hf(folder: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Weights:
    """A Hugging Face ``CLIPModel`` folder: ``config.json`` + weights (+ ``preprocessor_config.json``)."""
    folder = Path(folder)
    config = _read_json(folder / "config.json")
    if config.get("model_type", "clip") != "clip":
        raise BackboneError(
            f"{folder}/config.json: model_type is {config.get('model_type')!r}; expected a CLIPModel ('clip')"
        )
    wfile = hf_weight_file(folder)
    if wfile.suffix == ".safetensors":
        tensors: dict[str, torch.Tensor] = safe_load_safetensors(wfile, max_bytes=max_bytes)[0]
    else:
        tensors = _as_float_dict(safe_torch_load(wfile, max_bytes=max_bytes), wfile)
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in hf_to_open_clip(tensors).items()}
    mean = std = None
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        pcfg = _read_json(pre)
        if "image_mean" in pcfg:
            mean = _triple(pcfg["image_mean"], pre)
        if "image_std" in pcfg:
            std = _triple(pcfg["image_std"], pre)
    return Weights(sd, quick_gelu=hf_uses_quick_gelu(config), mean=mean, std=std)


def read_weights(path: Path, fmt: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Weights:
    """Dispatch on ``fmt`` (``openai`` | ``open_clip`` | ``hf``)."""
    readers = {"openai": read_openai, "open_clip": read_open_clip, "hf": read_hf}
    if fmt not in readers:
        raise BackboneError(f"unknown backbone format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return readers[fmt](Path(path), max_bytes=max_bytes)
