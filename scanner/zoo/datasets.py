"""Downstream datasets of the offline world: few-shot train / held-out test splits, deterministic from a seed.

Eleven are generated (each varies the class attribute and randomises every other one: colour, size,
position, background) and one is real (scikit-learn's bundled handwritten digits). ``polygons`` and
``arrows`` are fine-grained: their classes differ in one small attribute.

Four more are *shifted* (``DatasetSpec.shift``): the same scenes seen out of focus, a camera condition
pre-training never shows (its only "blurry" images are pixelated low-resolution glyphs, whose caption phrase
the shifted templates borrow). The eleven in-distribution datasets draw from the
pre-training generator itself, so their plain templates are already the best text the frozen image tower
supports and few-shot prompt tuning has nothing to adapt to (``zoo info``; README). Real downstream sets are
not like that (CoOp's large gains are on EuroSAT, DTD, aircraft: imagery the web rarely captions), and the
shifted ones, like the real digits, are where a tuned prompt must carry what the plain template lacks. The
zoo's default datasets (:func:`zoo_datasets`) stay the twelve unshifted ones: the detector's lines were
fitted on those, and the full zoo's build time is a bar of its own.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter

from scanner.errors import DatasetError
from scanner.zoo import render as R

MAX_SHOTS = 16  # the train split holds this many images per class; `shots` takes the first k
_TEST_BUDGET = 2400  # test images per dataset (at most 50 per class)

Renderer = Callable[[np.random.Generator, int, int], Image.Image]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    classnames: tuple[str, ...]
    template: str  # zero-shot prompt, "{}" is the class name
    fine_grained: bool
    real: bool
    description: str
    shift: str | None = None  # how the images differ from the pre-training data ("blur"), None if they do not

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    def prompts(self) -> list[str]:
        return [self.template.format(c) for c in self.classnames]


# ----------------------------------------------------------------------------- renderers
def _rand_texture(rng: np.random.Generator, size: int) -> Image.Image:
    return R.background(R.TEXTURES[int(rng.integers(len(R.TEXTURES)))], size, rng)


def _one_object(rng: np.random.Generator, size: int, *, shape: str | None = None, colour: str | None = None,
                size_name: str | None = None, pos: str | None = None, texture: str | None = None) -> Image.Image:
    img = R.background(texture, size, rng) if texture is not None else _rand_texture(rng, size)
    shape = shape or str(rng.choice(R.SHAPES))
    col = R.jitter_colour(R.COLOURS[colour], rng) if colour else R.random_colour(rng)[1]
    sname = size_name or str(rng.choice(["small", "big"]))
    side = R.SIZES[sname] * size * rng.uniform(0.9, 1.1)
    if pos is None:
        cx, cy = rng.uniform(0.3, 0.7, 2) * size
    else:
        cx, cy = (np.asarray(R.POSITIONS[pos]) * size + rng.uniform(-2, 2, 2))
    R.draw_shape(img, shape, float(cx), float(cy), side, col, rng, rotate=True)
    return img


def _shapes(rng: np.random.Generator, k: int, size: int) -> Image.Image:
    return _one_object(rng, size, shape=R.SHAPES[k])


def _colours(rng: np.random.Generator, k: int, size: int) -> Image.Image:
    return _one_object(rng, size, colour=list(R.COLOURS)[k], texture="plain" if rng.random() < 0.5 else None)


def _textures(rng: np.random.Generator, k: int, size: int) -> Image.Image:
    return _one_object(rng, size, texture=R.TEXTURES[k], size_name="small")


def _letters(rng: np.random.Generator, k: int, size: int) -> Image.Image:
    img = _rand_texture(rng, size) if rng.random() < 0.5 else R.background("plain", size, rng)
    ch = R.LETTERS[k]
    R.draw_glyph(img, ch.upper() if rng.random() < 0.5 else ch, size / 2 + rng.uniform(-5, 5),
                 size / 2 + rng.uniform(-5, 5), int(size * rng.uniform(0.5, 0.75)), R.random_colour(rng)[1])
    return img


def _counts(rng: np.random.Generator, k: int, size: int) -> Image.Image:
    img = _rand_texture(rng, size)
    shape = str(rng.choice(R.SHAPES))
    col = R.random_colour(rng)[1]
    side = size * rng.uniform(0.17, 0.23)
    for c in rng.permutation(9)[: k + 1]:
        R.draw_shape(img, shape, (c % 3 + 0.5) / 3 * size + rng.uniform(-3, 3),
                     (c // 3 + 0.5) / 3 * size + rng.uniform(-3, 3), side, col, rng)
    return img


def _positions(rng: np.random.Generator, k: int, size: int) -> Image.Image:
    return _one_object(rng, size, pos=list(R.POSITIONS)[k], size_name="small")


def _sizes(rng: np.random.Generator, k: int, size: int) -> Image.Image:
    return _one_object(rng, size, size_name=list(R.SIZES)[k], pos="center")


_CS = [(c, s) for c in R.COLOURS for s in R.SHAPES]


def _colour_shape(rng: np.random.Generator, k: int, size: int) -> Image.Image:
    c, s = _CS[k]
    return _one_object(rng, size, shape=s, colour=c)


_PAIR_SHAPES = ["circle", "square", "triangle", "star", "cross"]
_PAIRS = [(a, b) for i, a in enumerate(_PAIR_SHAPES) for b in _PAIR_SHAPES[i + 1:]]


def _pairs(rng: np.random.Generator, k: int, size: int) -> Image.Image:
    img = _rand_texture(rng, size)
    a, b = _PAIRS[k]
    xs = rng.permutation([0.27, 0.73])
    side = size * rng.uniform(0.3, 0.4)
    for shape, x in ((a, xs[0]), (b, xs[1])):
        R.draw_shape(img, shape, x * size, size * rng.uniform(0.3, 0.7), side, R.random_colour(rng)[1], rng)
    return img


_POLY = list(R.POLYGONS)


def _polygons(rng: np.random.Generator, k: int, size: int) -> Image.Image:
    return _one_object(rng, size, shape=_POLY[k], size_name="big")


def _arrows(rng: np.random.Generator, k: int, size: int) -> Image.Image:
    img = _rand_texture(rng, size)
    cx, cy = rng.uniform(0.35, 0.65, 2) * size
    R.draw_arrow(img, R.DIRECTIONS[k], float(cx), float(cy), size * rng.uniform(0.45, 0.6), R.random_colour(rng)[1])
    return img


BLUR_SIGMA = (2.0, 3.0)  # Gaussian blur radius in pixels (of 64), drawn per image: out of focus, shapes still there


def _blurred(base: Renderer) -> Renderer:
    """``base``'s scenes out of focus; the radius comes from the same generator, so splits stay seeded."""

    def render(rng: np.random.Generator, k: int, size: int) -> Image.Image:
        img = base(rng, k, size)
        return img.filter(ImageFilter.GaussianBlur(float(rng.uniform(*BLUR_SIGMA)) * size / 64))

    return render


_SPECS: dict[str, tuple[DatasetSpec, Renderer | None]] = {}


def _add(spec: DatasetSpec, fn: Renderer | None) -> None:
    _SPECS[spec.name] = (spec, fn)


_add(DatasetSpec("shapes", tuple(R.SHAPES), "a {}.", False, False, "one shape of any colour/size/place"), _shapes)
_add(DatasetSpec("colours", tuple(R.COLOURS), "a {} shape.", False, False, "colour of one shape"), _colours)
_add(DatasetSpec("textures", tuple(R.TEXTURES), "a shape on a {} background.", False, False, "background texture"),
     _textures)
_add(DatasetSpec("letters", tuple(R.LETTERS), "the letter {}.", False, False, "one letter glyph"), _letters)
_add(DatasetSpec("counts", tuple(f"{w} shape" if i == 1 else f"{w} shapes" for i, w in enumerate(R.NUMBER_WORDS)
                                 if 1 <= i <= 6), "{}.", False, False, "how many identical shapes"), _counts)
_add(DatasetSpec("positions", tuple(R.POSITIONS), "a shape in the {}.", False, False, "where one shape sits"),
     _positions)
_add(DatasetSpec("sizes", tuple(R.SIZES), "a {} shape.", False, False, "how big one centred shape is"), _sizes)
_add(DatasetSpec("colour_shape", tuple(f"{c} {s}" for c, s in _CS), "a {}.", False, False,
                 "colour x shape, 120 classes (scale)"), _colour_shape)
_add(DatasetSpec("pairs", tuple(f"{a} and a {b}" for a, b in _PAIRS), "a {}.", False, False,
                 "scenes of two different shapes"), _pairs)
_add(DatasetSpec("polygons", tuple(_POLY), "a {}.", True, False, "regular polygons: classes differ by one side"),
     _polygons)
_add(DatasetSpec("arrows", tuple(f"arrow pointing {d}" for d in R.DIRECTIONS), "a {}.", True, False,
                 "arrow direction"), _arrows)
_add(DatasetSpec("digits", tuple(str(i) for i in range(10)), "a blurry image of the digit {}.", False, True,
                 "scikit-learn's 8x8 handwritten digits (real images)"), None)
# the shifted suite: templates use the pre-training's own phrase for blurred images ("a blurry image of ...")
for _base, _tpl in (("shapes", "a blurry image of a {}."), ("pairs", "a blurry image of a {}."),
                    ("polygons", "a blurry image of a {}."), ("letters", "a blurry image of the letter {}.")):
    _spec, _fn = _SPECS[_base]
    assert _fn is not None
    _add(DatasetSpec(f"blurry_{_base}", _spec.classnames, _tpl, _spec.fine_grained, False,
                     f"{_base} out of focus (Gaussian blur {BLUR_SIGMA[0]:g}-{BLUR_SIGMA[1]:g} px)", shift="blur"),
         _blurred(_fn))


def list_datasets() -> list[str]:
    """Every dataset: the twelve unshifted ones, then the shifted suite."""
    return list(_SPECS)


def zoo_datasets() -> list[str]:
    """The datasets a zoo is built on by default: the unshifted ones (see the module docstring)."""
    return [n for n, (spec, _) in _SPECS.items() if spec.shift is None]


def get_spec(name: str) -> DatasetSpec:
    if name not in _SPECS:
        raise DatasetError(f"unknown dataset {name!r}; expected one of: {', '.join(_SPECS)}")
    return _SPECS[name][0]


def _to_tensor(arrs: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float().div_(255.0)


def _name_seed(name: str) -> int:
    return zlib.crc32(name.encode())


@functools.cache
def _digits(size: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = (d.images / 16.0 * 255).clip(0, 255).astype(np.uint8)  # (N, 8, 8), bright ink on black
    up = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.NEAREST)) for im in imgs])
    return np.repeat(up[..., None], 3, axis=-1), d.target.astype(np.int64)


@functools.cache
def _split(name: str, split: str, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    spec, fn = _SPECS[name]
    per_test = max(10, min(50, _TEST_BUDGET // spec.n_classes))
    if fn is None:  # real digits: a seeded per-class split of the bundled images
        imgs, targets = _digits(size)
        rng = np.random.default_rng([seed, _name_seed(name)])
        idx_tr, idx_te = [], []
        for k in range(spec.n_classes):
            idx = rng.permutation(np.flatnonzero(targets == k))
            idx_tr.append(idx[:MAX_SHOTS])
            idx_te.append(idx[MAX_SHOTS:MAX_SHOTS + per_test])
        sel = np.concatenate(idx_tr if split == "train" else idx_te)
        # keep shot order class-interleaved: first k shots of every class come first
        return _to_tensor(list(imgs[sel])), torch.from_numpy(targets[sel])
    n_per = MAX_SHOTS if split == "train" else per_test
    rng = np.random.default_rng([seed, _name_seed(name), 0 if split == "train" else 1])
    arrs, labels = [], []
    for k in range(spec.n_classes):
        for _ in range(n_per):
            arrs.append(R.to_array(fn(rng, k, size)))
            labels.append(k)
    return _to_tensor(arrs), torch.tensor(labels)


def load_split(name: str, split: str = "train", *, shots: int | None = None, seed: int = 0,
               size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, S, S) in [0, 1] and labels (N,). ``shots`` (train only) keeps the first k per class."""
    spec = get_spec(name)
    if split not in ("train", "test"):
        raise DatasetError(f"unknown split {split!r}; expected 'train' or 'test'")
    if shots is not None and not 1 <= shots <= MAX_SHOTS:
        raise DatasetError(f"{shots} shots requested for {name}, but 1..{MAX_SHOTS} per class are available")
    x, y = _split(name, split, seed, size)
    if split == "train" and shots is not None:
        keep = torch.cat([torch.nonzero(y == k).flatten()[:shots] for k in range(spec.n_classes)])
        x, y = x[keep], y[keep]
    return x.clone(), y.clone()
