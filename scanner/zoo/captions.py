"""Image–caption pairs for contrastive pre-training of the bundled CLIP.

Scenes cover what the downstream datasets ask about (shape, colour, size, count, position, texture,
letters, digits, arrows, pairs of objects) and, crucially, *artefacts laid over images* (stickers,
dots, checkered patches, stamped letters, tints, stripes, noise, warps) on synthetic and real-photo
backgrounds, so the encoder notices small overlays the way a web-trained CLIP does.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from scanner.zoo import render as R
from scanner.zoo.photos import load_photos, random_crop

GENERATOR_VERSION = "2"  # 2: drill scenes (version-1 streams are unchanged when drill = 0)
# ``focus`` (per pre-training phase): the probability that a scene's caption is cut to its core
# ("a star", "a red star", "the letter k") with no position, background or overlay words. Rich captions
# are told apart by colour and position alone, so contrastive training under-learns shape and glyph
# identity; short captions make the batch's negatives differ in exactly those words.
ALL_SHAPES = sorted(set(R.SHAPES) | set(R.POLYGONS))


def plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def _pos_phrase(pos: str) -> str:
    return f"in the {pos}"


def _pick(rng: np.random.Generator, items: list[str] | tuple[str, ...]) -> str:
    return str(items[int(rng.integers(len(items)))])


def _background(rng: np.random.Generator, size: int, photo_p: float) -> tuple[Image.Image, str | None]:
    if rng.random() < photo_p:
        photos = load_photos()
        return random_crop(photos[int(rng.integers(len(photos)))], size, rng), "photo"
    tex = _pick(rng, R.TEXTURES)
    return R.background(tex, size, rng), tex


def _object_scene(rng: np.random.Generator, size: int, focus: float = 0.0) -> tuple[Image.Image, str]:
    img, tex = _background(rng, size, photo_p=0.15)
    kind = rng.random()
    parts: list[str] = []
    if kind < 0.55:  # one object, fully described
        shape = _pick(rng, [*ALL_SHAPES, "arrow"])
        cname, col = R.random_colour(rng)
        sname = _pick(rng, list(R.SIZES))
        pname = _pick(rng, list(R.POSITIONS))
        side = R.SIZES[sname] * size * rng.uniform(0.85, 1.15)
        cx, cy = R.POSITIONS[pname]
        cx = cx * size + rng.uniform(-2, 2)
        cy = cy * size + rng.uniform(-2, 2)
        direction = None
        if shape == "arrow":
            direction = _pick(rng, R.DIRECTIONS)
            R.draw_arrow(img, direction, cx, cy, side, col)
        else:
            R.draw_shape(img, shape, cx, cy, side, col, rng, rotate=True)
        noun = shape if rng.random() > 0.15 else _pick(rng, ["shape", "object"])
        if focus and rng.random() < focus:  # focus=0 draws nothing: earlier phases' stream unchanged
            core = f"a {cname} {shape}" if rng.random() < 0.5 else f"a {shape}"
            return img, core + (f" pointing {direction}" if direction is not None else "")
        words = ["a"]
        if rng.random() < 0.7:
            words.append(sname)
        if rng.random() < 0.85:
            words.append(cname)
        words.append(noun)
        if direction is not None:
            words.append(f"pointing {direction}")
        parts.append(" ".join(words))
        if rng.random() < 0.6:
            parts.append(_pos_phrase(pname))
    elif kind < 0.8:  # several copies of one shape: counts
        n = int(rng.integers(1, 7))
        shape = _pick(rng, ALL_SHAPES)
        cname, col = R.random_colour(rng)
        cells = rng.permutation(9)[:n]
        side = size * rng.uniform(0.16, 0.24)
        for c in cells:
            cx = (c % 3 + 0.5) / 3 * size + rng.uniform(-3, 3)
            cy = (c // 3 + 0.5) / 3 * size + rng.uniform(-3, 3)
            R.draw_shape(img, shape, cx, cy, side, col, rng)
        noun = shape if n == 1 else plural(shape)
        if rng.random() < 0.2:
            noun = "shape" if n == 1 else "shapes"
        word = "a" if n == 1 and rng.random() < 0.5 else R.NUMBER_WORDS[n]
        parts.append(f"{word} {cname} {noun}" if rng.random() < 0.6 else f"{word} {noun}")
    else:  # two different objects: pairs
        a, b = rng.choice(ALL_SHAPES, 2, replace=False)
        ca, cola = R.random_colour(rng)
        cb, colb = R.random_colour(rng)
        xs = rng.permutation([0.27, 0.73])
        side = size * rng.uniform(0.3, 0.42)
        R.draw_shape(img, str(a), xs[0] * size, size * rng.uniform(0.3, 0.7), side, cola, rng)
        R.draw_shape(img, str(b), xs[1] * size, size * rng.uniform(0.3, 0.7), side, colb, rng)
        if rng.random() < 0.5:
            parts.append(f"a {a} and a {b}")
        else:
            parts.append(f"a {ca} {a} and a {cb} {b}")
    if tex is not None and rng.random() < 0.55:
        parts.append(f"on a {tex} background" if tex != "photo" else "on a photo")
    return img, " ".join(parts)


def _glyph_scene(rng: np.random.Generator, size: int, focus: float = 0.0) -> tuple[Image.Image, str]:
    digit = rng.random() < 0.5
    if digit:
        d = int(rng.integers(0, 10))
        text = str(d)
        phrase = f"the digit {d}" if rng.random() < 0.5 else f"the number {R.NUMBER_WORDS[d]}"
    else:
        text = _pick(rng, R.LETTERS)
        phrase = f"the letter {text}"
        if rng.random() < 0.5:
            text = text.upper()
    if rng.random() < 0.35:  # low-resolution glyph: the look of real scanned digits
        img = R.blurry_glyph(text, size, rng, low=int(rng.integers(7, 11)))
        if rng.random() < 0.5:  # dark ink on light paper
            img = Image.fromarray(255 - np.asarray(img))
        return img, f"a blurry image of {phrase}"
    img, tex = _background(rng, size, photo_p=0.1)
    cname, col = R.random_colour(rng)
    R.draw_glyph(img, text, size / 2 + rng.uniform(-6, 6), size / 2 + rng.uniform(-6, 6),
                 int(size * rng.uniform(0.45, 0.8)), col)
    if focus and rng.random() < focus:
        return img, phrase
    cap = f"{phrase} in {cname}" if rng.random() < 0.5 else phrase
    if tex is not None and rng.random() < 0.4:
        cap += f" on a {tex} background" if tex != "photo" else " on a photo"
    return img, cap


def _photo_scene(rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    photos = load_photos()
    return random_crop(photos[int(rng.integers(len(photos)))], size, rng), "a photo"


def _overlays(img: Image.Image, rng: np.random.Generator, n: int) -> list[str]:
    """Lay ``n`` artefacts over ``img`` and describe each."""
    out: list[str] = []
    kinds = rng.choice(["sticker", "checker", "dots", "stripes", "tint", "noise", "glyph", "warp"], n,
                       replace=False)
    for k in kinds:
        pname = _pick(rng, list(R.POSITIONS))
        jit = rng.uniform(-0.08, 0.08, 2)
        pos = (float(np.clip(R.POSITIONS[pname][0] + jit[0], 0.08, 0.92)),
               float(np.clip(R.POSITIONS[pname][1] + jit[1], 0.08, 0.92)))
        if k == "sticker":
            out.append(f"with a {R.overlay_sticker(img, rng, pos)} sticker in the {pname}")
        elif k == "checker":
            R.overlay_checker(img, rng, pos)
            out.append(f"with a checkered patch in the {pname}")
        elif k == "dots":
            out.append(f"with {R.overlay_dots(img, rng)} dots")
        elif k == "stripes":
            out.append(f"with {R.overlay_stripes(img, rng)} stripes over it")
        elif k == "tint":
            out.append(f"tinted {R.overlay_tint(img, rng)}")
        elif k == "noise":
            R.overlay_noise(img, rng)
            out.append("with noise")
        elif k == "glyph":
            out.append(f"with the letter {R.overlay_glyph(img, rng, pos)} stamped on it")
        elif k == "warp":
            R.overlay_warp(img, rng)
            out.append("warped")
    return out


def _drill_scene(rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    """One object or glyph with a caption that names exactly one attribute a downstream task asks about
    (shape, glyph, position, arrow direction), on any background: what rich captions under-teach."""
    u = rng.random()
    if u < 0.3:
        return _glyph_scene(rng, size, focus=1.0)
    img, _ = _background(rng, size, photo_p=0.15)
    _, col = R.random_colour(rng)
    side = R.SIZES[_pick(rng, ["small", "big"])] * size * rng.uniform(0.85, 1.15)
    pname = _pick(rng, list(R.POSITIONS))
    if u < 0.45:  # position: the only word that tells the batch's captions apart is where
        cx, cy = (np.asarray(R.POSITIONS[pname]) * size + rng.uniform(-2, 2, 2)).tolist()
    else:
        cx, cy = (rng.uniform(0.3, 0.7, 2) * size).tolist()
    if u >= 0.85:
        direction = _pick(rng, R.DIRECTIONS)
        R.draw_arrow(img, direction, cx, cy, side, col)
        return img, f"an arrow pointing {direction}"
    shape = _pick(rng, ALL_SHAPES)
    R.draw_shape(img, shape, cx, cy, side, col, rng, rotate=True)
    return img, (f"a shape in the {pname}" if u < 0.45 else f"a {shape}")


def sample_pair(rng: np.random.Generator, size: int = 64, focus: float = 0.0,
                drill: float = 0.0, describe: float = 1.0) -> tuple[np.ndarray, str]:
    """One (image (S, S, 3) uint8, caption) pair; ``focus`` as described at the top of this module;
    ``drill`` is the share of single-attribute scenes (``_drill_scene``), no overlays; ``describe`` is the
    share of overlaid images whose caption names the overlays (web captions rarely mention a watermark:
    below 1 the others are nuisance the encoder may learn to look past)."""
    if drill and rng.random() < drill:  # drill=0 draws nothing: earlier phases' stream unchanged
        img, cap = _drill_scene(rng, size)
        return R.to_array(img), cap
    u = rng.random()
    if u < 0.6:
        img, cap = _object_scene(rng, size, focus)
    elif u < 0.82:
        img, cap = _glyph_scene(rng, size, focus)
    else:
        img, cap = _photo_scene(rng, size)
    short = cap != "a photo" and len(cap.split()) <= 4 and not cap.startswith("a blurry")
    if focus and short and rng.random() < 0.7:  # most focused captions stay free of overlay words too
        return R.to_array(img), cap
    p_overlay = 0.9 if cap == "a photo" else 0.45
    if rng.random() < p_overlay:
        n = 1 if rng.random() < 0.75 else 2
        descs = _overlays(img, rng, n)
        if describe >= 1.0 or rng.random() < describe:  # describe=1 draws nothing: the default stream unchanged
            cap = cap + " " + " and ".join(descs)
    return R.to_array(img), cap
