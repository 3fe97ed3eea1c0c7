"""The detection engine: pure torch (a model and tensors in, a result dataclass out; no I/O).

``detect(model, ood, config, seed=...)`` validates its inputs and runs the configured detector:
``ci`` (CLIP-Inspector, drift-ranked candidates + confirm), ``ci-plain`` (the paper's per-class loop), ``nc``
(Neural Cleanse) or ``pixel`` (Pixel-Backdoor).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from scanner.engine.baselines import run_neural_cleanse, run_pixel
from scanner.engine.ci import run_ci, run_ci_plain
from scanner.engine.config import DETECTORS, DetectorConfig
from scanner.engine.result import ClassEvidence, DetectionResult
from scanner.errors import DetectionError, ScannerError
from scanner.prompting.classifier import PromptedCLIP

__all__ = ["DETECTORS", "ClassEvidence", "DetectionResult", "DetectorConfig", "detect", "validate_pool"]

_RUNNERS = {"ci": run_ci, "ci-plain": run_ci_plain, "nc": run_neural_cleanse, "pixel": run_pixel}


def validate_pool(model: PromptedCLIP, ood: torch.Tensor, cfg: DetectorConfig) -> torch.Tensor:
    """The pool as float32 (N, 3, S, S) in [0, 1], or a DetectionError saying what is wrong."""
    size = model.backbone.image_size
    if not isinstance(ood, torch.Tensor) or ood.ndim != 4 or ood.shape[1] != 3:
        shape = tuple(ood.shape) if isinstance(ood, torch.Tensor) else type(ood).__name__
        raise DetectionError(f"the OOD pool must be RGB images (N, 3, {size}, {size}); got {shape}")
    if ood.shape[-2:] != (size, size):
        raise DetectionError(
            f"the OOD pool holds {ood.shape[-2]}x{ood.shape[-1]} images but the backbone takes {size}x{size}; "
            "resize the pool (load_ood_folder does) to the backbone's input size"
        )
    n = min(ood.shape[0], cfg.n_images)
    n_hold = max(1, round(cfg.holdout * n))
    if n - n_hold < cfg.batch_size:
        raise DetectionError(
            f"the OOD pool has {ood.shape[0]} images; with a {cfg.holdout:.0%} hold-out at least "
            f"{int(cfg.batch_size / (1 - cfg.holdout)) + 2} are needed for one batch of {cfg.batch_size} "
            "(the default budget is 1,000) — add images to the pool"
        )
    x = ood.float()
    if not torch.isfinite(x).all() or float(x.min()) < 0 or float(x.max()) > 1:
        raise DetectionError("the OOD pool must hold finite pixel values in [0, 1]")
    return x


def detect(model: PromptedCLIP, ood: torch.Tensor, config: DetectorConfig | None = None, *, seed: int = 0,
           progress: Callable[[str, int, int], None] | None = None) -> DetectionResult:
    """Run the configured detector on ``model`` with the unlabelled pool ``ood`` (N, 3, S, S) in [0, 1].

    Same seed and inputs give the same result. Raises DetectionError (never returns a silent "clean")
    when the inputs are unusable or the optimisation fails.
    """
    cfg = config or DetectorConfig()
    if model.n_cls < 2:
        raise DetectionError(
            f"the model has {model.n_cls} class; a backdoor target is only defined among two or more classes"
        )
    pool = validate_pool(model, ood, cfg)
    cfg = cfg.on(pool.device)  # bf16 where the device computes it natively, unless the settings say
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            result = _RUNNERS[cfg.detector](model, pool, cfg, seed, progress)
        except ScannerError:
            raise
        except (RuntimeError, ValueError, IndexError) as exc:
            raise DetectionError(f"the model's forward pass failed during detection: {exc}") from exc
    from scanner.zoo.ood import pool_sha256

    result.ood_sha256 = pool_sha256(pool[: cfg.n_images])
    result.backbone_sha256 = model.backbone.content_hash()
    return result
