"""The backbone store: bundled CLIP plus user-declared OpenAI / open_clip / Hugging Face weight files."""

from scanner.backbones.arch import infer_arch, normalize_backbone_name
from scanner.backbones.formats import BackboneFormat, Weights, detect_format, read_weights
from scanner.backbones.hf import hf_to_open_clip, open_clip_to_hf
from scanner.backbones.store import (
    BackboneEntry,
    BackboneStore,
    build_backbone,
    bundled_entry,
    clear_cache,
    entry_from_table,
    file_sha256,
    parse_backbone_flag,
)

__all__ = [
    "BackboneEntry",
    "BackboneFormat",
    "BackboneStore",
    "Weights",
    "build_backbone",
    "bundled_entry",
    "clear_cache",
    "detect_format",
    "entry_from_table",
    "file_sha256",
    "hf_to_open_clip",
    "infer_arch",
    "normalize_backbone_name",
    "open_clip_to_hf",
    "parse_backbone_flag",
    "read_weights",
]
