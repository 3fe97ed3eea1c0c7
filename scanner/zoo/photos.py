"""Real photographs shipped inside installed packages (scikit-image, scikit-learn): the offline world's only
natural images. They feed the OOD pool and, as backgrounds, part of the pre-training data."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

# Natural photographs only (no charts, synthetic test patterns, or text pages).
_SKIMAGE_PHOTOS = [
    "astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
    "gravel.png", "hubble_deep_field.jpg", "moon.png", "motorcycle_left.png", "motorcycle_right.png",
    "retina.jpg", "rocket.jpg", "clock_motion.png", "ihc.png",
]
_SKLEARN_PHOTOS = ["china.jpg", "flower.jpg"]


def _photo_paths() -> list[Path]:
    import skimage
    import sklearn.datasets

    sk = Path(skimage.__file__).parent / "data"
    sl = Path(sklearn.datasets.__file__).parent / "images"
    paths = [sk / n for n in _SKIMAGE_PHOTOS] + [sl / n for n in _SKLEARN_PHOTOS]
    return [p for p in paths if p.exists()]


@functools.cache
def load_photos() -> tuple[np.ndarray, ...]:
    """All bundled photographs as (H, W, 3) uint8 arrays, in a fixed order."""
    out = []
    for p in _photo_paths():
        with Image.open(p) as im:
            out.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    if not out:
        raise RuntimeError("no photographs found in scikit-image / scikit-learn installs")
    return tuple(out)


def random_crop(photo: np.ndarray, size: int, rng: np.random.Generator, min_frac: float = 0.15,
                max_frac: float = 0.9) -> Image.Image:
    """A random square crop (side a random fraction of the short edge), random flip, resized to ``size``."""
    h, w = photo.shape[:2]
    side = int(min(h, w) * rng.uniform(min_frac, max_frac))
    side = max(side, 8)
    y = int(rng.integers(0, h - side + 1))
    x = int(rng.integers(0, w - side + 1))
    crop = photo[y:y + side, x:x + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.Resampling.BILINEAR)
