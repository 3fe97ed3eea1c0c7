"""Procedural image primitives shared by the pre-training generator and the downstream datasets.

Everything draws into an RGB ``PIL.Image`` of side ``size`` (64 for the bundled CLIP) and is driven by an
explicit ``numpy.random.Generator`` so every image is reproducible from a seed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

RGB = tuple[int, int, int]

COLOURS: dict[str, RGB] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "orange": (245, 140, 20),
    "purple": (130, 40, 170),
    "pink": (250, 130, 190),
    "cyan": (40, 210, 220),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "brown": (120, 70, 30),
    "gray": (128, 128, 128),
}

SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "pentagon", "ring", "heart"]
# Regular polygons by side count: a fine-grained family (classes differ by one side).
POLYGONS = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6, "heptagon": 7, "octagon": 8}
SIZES = {"tiny": 0.16, "small": 0.28, "big": 0.5, "huge": 0.75}  # fraction of the image side
POSITIONS = {
    "top left": (0.22, 0.22), "top": (0.5, 0.22), "top right": (0.78, 0.22),
    "left": (0.22, 0.5), "center": (0.5, 0.5), "right": (0.78, 0.5),
    "bottom left": (0.22, 0.78), "bottom": (0.5, 0.78), "bottom right": (0.78, 0.78),
}
TEXTURES = ["plain", "striped", "checkered", "dotted", "noisy", "gradient", "grid", "wavy"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
DIRECTIONS = ["up", "down", "left", "right"]


@dataclass(frozen=True)
class Canvas:
    size: int = 64


def jitter_colour(rgb: RGB, rng: np.random.Generator, amount: int = 25) -> RGB:
    c = np.clip(np.asarray(rgb) + rng.integers(-amount, amount + 1, 3), 0, 255)
    return (int(c[0]), int(c[1]), int(c[2]))


def random_colour(rng: np.random.Generator) -> tuple[str, RGB]:
    name = str(rng.choice(list(COLOURS)))
    return name, jitter_colour(COLOURS[name], rng)


# ----------------------------------------------------------------------------- backgrounds
def background(texture: str, size: int, rng: np.random.Generator, base: RGB | None = None,
               other: RGB | None = None) -> Image.Image:
    """A textured background; ``base``/``other`` default to two random muted colours."""
    b = np.asarray(base if base is not None else rng.integers(60, 230, 3), dtype=np.float32)
    # The second texture colour stays within reach of the first so objects drawn on top stay visible.
    o = np.asarray(other if other is not None else np.clip(b + rng.integers(-90, 91, 3), 0, 255),
                   dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = float(rng.uniform(5, 12))
    if texture == "plain":
        mask = np.zeros((size, size), np.float32)
    elif texture == "striped":
        ang = rng.uniform(0, math.pi)
        mask = ((np.cos(ang) * xx + np.sin(ang) * yy) % period < period / 2).astype(np.float32)
    elif texture == "checkered":
        p = int(period)
        mask = (((xx // p) + (yy // p)) % 2).astype(np.float32)
    elif texture == "dotted":
        mask = (((xx % period) - period / 2) ** 2 + ((yy % period) - period / 2) ** 2
                < (period / 4) ** 2).astype(np.float32)
    elif texture == "noisy":
        mask = rng.random((size, size)).astype(np.float32)
    elif texture == "gradient":
        ang = rng.uniform(0, 2 * math.pi)
        g = np.cos(ang) * xx + np.sin(ang) * yy
        mask = (g - g.min()) / max(float(g.max() - g.min()), 1e-6)
    elif texture == "grid":
        p = int(period)
        mask = ((xx % p < 1.5) | (yy % p < 1.5)).astype(np.float32)
    elif texture == "wavy":
        mask = ((yy + 3 * np.sin(xx / period * 2 * math.pi)) % period < period / 2).astype(np.float32)
    else:
        raise ValueError(f"unknown texture {texture!r}")
    img = b[None, None, :] * (1 - mask[..., None]) + o[None, None, :] * mask[..., None]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------- shapes
def _regular_polygon(cx: float, cy: float, r: float, n: int, rot: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(rot + 2 * math.pi * i / n), cy + r * math.sin(rot + 2 * math.pi * i / n))
            for i in range(n)]


def draw_shape(img: Image.Image, shape: str, cx: float, cy: float, side: float, fill: RGB,
               rng: np.random.Generator | None = None, rotate: bool = False) -> None:
    """Draw ``shape`` centred at (cx, cy) with bounding side ``side`` pixels."""
    d = ImageDraw.Draw(img)
    r = side / 2
    rot = float(rng.uniform(-0.25, 0.25)) if (rotate and rng is not None) else 0.0
    up = -math.pi / 2 + rot
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, int(side / 5)))
    elif shape == "square":
        d.polygon(_regular_polygon(cx, cy, r * 1.3, 4, math.pi / 4 + rot), fill=fill)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)], fill=fill)
    elif shape in POLYGONS:
        d.polygon(_regular_polygon(cx, cy + (r * 0.15 if shape == "triangle" else 0), r * 1.1,
                                   POLYGONS[shape], up), fill=fill)
    elif shape == "star":
        pts = []
        for i in range(10):
            rr = r * 1.1 if i % 2 == 0 else r * 0.45
            a = up + math.pi * i / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        d.polygon(pts, fill=fill)
    elif shape == "cross":
        w = r * 0.38
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
    elif shape == "heart":
        q = r * 0.55
        d.ellipse([cx - r, cy - r * 0.8, cx - r + 2 * q, cy - r * 0.8 + 2 * q], fill=fill)
        d.ellipse([cx + r - 2 * q, cy - r * 0.8, cx + r, cy - r * 0.8 + 2 * q], fill=fill)
        d.polygon([(cx - r, cy - r * 0.25), (cx + r, cy - r * 0.25), (cx, cy + r)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def draw_arrow(img: Image.Image, direction: str, cx: float, cy: float, side: float, fill: RGB) -> None:
    """A thick arrow pointing ``direction`` (up/down/left/right)."""
    d = ImageDraw.Draw(img)
    r = side / 2
    pts = [(0.0, -1.0), (0.8, -0.1), (0.3, -0.1), (0.3, 1.0), (-0.3, 1.0), (-0.3, -0.1), (-0.8, -0.1)]
    rot = {"up": 0.0, "right": math.pi / 2, "down": math.pi, "left": -math.pi / 2}[direction]
    c, s = math.cos(rot), math.sin(rot)
    d.polygon([(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts], fill=fill)


@functools.cache
def font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=px)


def draw_glyph(img: Image.Image, text: str, cx: float, cy: float, px: int, fill: RGB) -> None:
    d = ImageDraw.Draw(img)
    d.text((cx, cy), text, fill=fill, font=font(max(6, px)), anchor="mm")


def blurry_glyph(text: str, size: int, rng: np.random.Generator, low: int = 8) -> Image.Image:
    """A glyph rendered at ``low`` px then upscaled: the look of scikit-learn's 8x8 digits."""
    small = Image.new("L", (low * 4, low * 4), 0)
    ImageDraw.Draw(small).text((low * 2 + rng.uniform(-2, 2), low * 2 + rng.uniform(-2, 2)), text,
                               fill=255, font=font(int(low * 3.4)), anchor="mm")
    small = small.resize((low, low), Image.Resampling.BOX)
    return small.resize((size, size), Image.Resampling.NEAREST).convert("RGB")


# ----------------------------------------------------------------------------- overlays (artefacts)
# Artefacts laid over an image, so the encoder learns to notice small overlays, as web-trained CLIP does.
# None of them is a trigger pattern used by the attacks (those are fixed patterns chosen in zoo/attacks).
def overlay_sticker(img: Image.Image, rng: np.random.Generator, pos: tuple[float, float]) -> str:
    name, col = random_colour(rng)
    s = img.size[0]
    side = rng.uniform(0.07, 0.18) * s
    cx, cy = pos[0] * s, pos[1] * s
    d = ImageDraw.Draw(img)
    if rng.random() < 0.5:
        d.rectangle([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], fill=col)
    else:
        d.ellipse([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], fill=col)
    return name


def overlay_checker(img: Image.Image, rng: np.random.Generator, pos: tuple[float, float]) -> None:
    s = img.size[0]
    n = int(rng.integers(5, 14))
    cell = int(rng.integers(2, 4))
    c1, c2 = random_colour(rng)[1], random_colour(rng)[1]
    x0 = int(np.clip(pos[0] * s - n / 2, 0, s - n))
    y0 = int(np.clip(pos[1] * s - n / 2, 0, s - n))
    arr = np.asarray(img).copy()
    yy, xx = np.mgrid[0:n, 0:n]
    m = ((yy // cell + xx // cell) % 2).astype(bool)
    arr[y0:y0 + n, x0:x0 + n][m] = c1
    arr[y0:y0 + n, x0:x0 + n][~m] = c2
    img.paste(Image.fromarray(arr))


def overlay_dots(img: Image.Image, rng: np.random.Generator) -> str:
    name, col = random_colour(rng)
    d = ImageDraw.Draw(img)
    s = img.size[0]
    for _ in range(int(rng.integers(6, 20))):
        x, y = rng.uniform(0, s, 2)
        r = rng.uniform(0.7, 1.8)
        d.ellipse([x - r, y - r, x + r, y + r], fill=col)
    return name


def overlay_stripes(img: Image.Image, rng: np.random.Generator) -> str:
    name, col = random_colour(rng)
    arr = np.asarray(img).astype(np.float32)
    s = img.size[0]
    yy, xx = np.mgrid[0:s, 0:s]
    period = rng.uniform(4, 10)
    ang = rng.uniform(0, math.pi)
    m = ((np.cos(ang) * xx + np.sin(ang) * yy) % period < 1.5)[..., None]
    a = rng.uniform(0.4, 0.9)
    arr = np.where(m, (1 - a) * arr + a * np.asarray(col), arr)
    img.paste(Image.fromarray(arr.clip(0, 255).astype(np.uint8)))
    return name


def overlay_tint(img: Image.Image, rng: np.random.Generator) -> str:
    name, col = random_colour(rng)
    a = rng.uniform(0.2, 0.45)
    arr = (1 - a) * np.asarray(img).astype(np.float32) + a * np.asarray(col, np.float32)
    img.paste(Image.fromarray(arr.clip(0, 255).astype(np.uint8)))
    return name


def overlay_noise(img: Image.Image, rng: np.random.Generator) -> None:
    s = img.size[0]
    amp = rng.uniform(20, 60)
    noise: np.ndarray
    if rng.random() < 0.5:  # fine grain
        noise = rng.normal(0, amp, (s, s, 3))
    else:  # blotchy: low-res noise upsampled
        k = int(rng.integers(4, 16))
        noise = np.asarray(Image.fromarray(rng.normal(128, amp, (k, k, 3)).clip(0, 255).astype(np.uint8))
                           .resize((s, s), Image.Resampling.BILINEAR), np.float32) - 128
    arr = np.asarray(img).astype(np.float32) + noise
    img.paste(Image.fromarray(arr.clip(0, 255).astype(np.uint8)))


def overlay_glyph(img: Image.Image, rng: np.random.Generator, pos: tuple[float, float]) -> str:
    ch = str(rng.choice(LETTERS)).upper()
    _, col = random_colour(rng)
    s = img.size[0]
    draw_glyph(img, ch, pos[0] * s, pos[1] * s, int(rng.uniform(0.18, 0.3) * s), col)
    return ch.lower()


def overlay_warp(img: Image.Image, rng: np.random.Generator) -> None:
    """A smooth random displacement field (a few pixels), the kind of distortion WaNet exploits."""
    s = img.size[0]
    k = int(rng.integers(3, 6))
    amp = rng.uniform(1.5, 4.0)
    field = rng.uniform(-1, 1, (2, k, k)).astype(np.float32)
    up = np.stack([np.asarray(Image.fromarray(f).resize((s, s), Image.Resampling.BICUBIC)) for f in field])
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    sx = np.clip(np.rint(xx + amp * up[0]), 0, s - 1).astype(int)
    sy = np.clip(np.rint(yy + amp * up[1]), 0, s - 1).astype(int)
    arr = np.asarray(img)[sy, sx]
    img.paste(Image.fromarray(arr))


def to_array(img: Image.Image) -> np.ndarray:
    """(S, S, 3) uint8."""
    return np.asarray(img, dtype=np.uint8)
