"""Forward-only acceleration: ONNX export of the frozen encoders and onnxruntime sessions cached per backbone.

Callers use ``ForwardEncoders.for_backbone(backbone)`` and ``cached_image_features``; gradients stay in torch.
"""

from scanner.accel.cache import CacheUnwritableError, OnnxCache, default_cache_dir
from scanner.accel.encoders import STATS, ForwardEncoders, cached_image_features, reset_registry
from scanner.accel.export import ExportError, export_encoder
from scanner.accel.quantize import INT8_MIN_AGREEMENT, top1_agreement
from scanner.accel.sessions import best_providers, select_providers

__all__ = [
    "INT8_MIN_AGREEMENT",
    "STATS",
    "CacheUnwritableError",
    "ExportError",
    "ForwardEncoders",
    "OnnxCache",
    "best_providers",
    "cached_image_features",
    "default_cache_dir",
    "export_encoder",
    "reset_registry",
    "select_providers",
    "top1_agreement",
]
