"""CLIP backbones over open_clip: the bundled tiny CLIP and real architectures (ViT-B/16, RN50, ...)."""

from scanner.clip.backbone import (
    BUNDLED_NAME,
    ClipBackbone,
    bundled_weights_path,
    create_backbone,
    load_bundled,
    register_configs,
)

__all__ = [
    "BUNDLED_NAME",
    "ClipBackbone",
    "bundled_weights_path",
    "create_backbone",
    "load_bundled",
    "register_configs",
]
