"""The OOD pool: unlabelled images that come from no downstream dataset.

Default: random crops, scales and flips of the real photographs shipped inside scikit-image and
scikit-learn, resized to the backbone's input. Users may bring a folder of PNG/JPEG images instead.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from scanner.errors import DatasetError
from scanner.zoo.photos import load_photos, random_crop

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def default_ood_pool(n: int = 1000, size: int = 64, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) float in [0, 1], deterministic from ``seed``."""
    photos = load_photos()
    rng = np.random.default_rng([seed, 7919])
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        out[i] = np.asarray(random_crop(photos[int(rng.integers(len(photos)))], size, rng, 0.1, 1.0))
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255.0)


def load_ood_folder(folder: Path, size: int, limit: int | None = None) -> torch.Tensor:
    """Images of a user folder (recursive, PNG/JPEG, sorted by path), centre-cropped and resized."""
    if not folder.is_dir():
        raise DatasetError(f"OOD folder {folder} does not exist or is not a directory; pass --ood DIR with images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if limit is not None:
        files = files[:limit]
    if not files:
        raise DatasetError(
            f"OOD folder {folder} holds no images (expected *.png, *.jpg or *.jpeg); add images or omit --ood "
            "to use the bundled pool"
        )
    pixels, bad = read_images(files, size)
    if pixels.shape[0] == 0:
        names = [p.name for p in bad[:3]]
        raise DatasetError(f"none of the {len(files)} images in {folder} could be read (e.g. {names})")
    return pixels


def read_images(files: list[Path], size: int) -> tuple[torch.Tensor, list[Path]]:
    """The readable ``files`` centre-cropped and resized: (N, 3, size, size) in [0, 1] in the given order,
    and the files that could not be read (skipped)."""
    arrs = []
    bad: list[Path] = []
    for p in files:
        try:
            with Image.open(p) as f:
                im = f.convert("RGB")
            s = min(im.size)
            left, top = (im.width - s) // 2, (im.height - s) // 2
            im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.Resampling.BILINEAR)
            arrs.append(np.asarray(im, np.uint8))
        except (OSError, UnidentifiedImageError, ValueError):
            bad.append(p)
    if not arrs:
        return torch.zeros(0, 3, size, size), bad
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float().div_(255.0), bad


def pool_sha256(pool: torch.Tensor) -> str:
    """Content hash of an image pool (N, 3, S, S): identifies it in reports and caches."""
    t = pool.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(str(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()
