"""The toy world: 64x64 scenes of one or two flat shapes on a grey background, prompts that describe them, and an
exact preference oracle: a text-to-image domain small enough that the true reward is known.

Prompts (6 colours x 3 shapes; 1,170 prompts in all):
    "a red circle"                          one object, no position: it should sit near the centre
    "a red circle on the left"              one object on a named side (on the left|right, at the top|bottom)
    "a red circle left of a blue square"    two objects of different colours and a relation (left of, right of,
                                            above, below)
`split_prompts` holds out a fixed ~20% of scenes, chosen by a hash of the scene ("B above A" is hashed as "A below
B", so both wordings of a scene fall on the same side).

`render` draws a clean scene, 4x supersampled and box-filtered, so every pixel is an exact mix of the grey background
and ONE named colour. `degrade(img, kind, rng, strength=1.0, prompt=None)` makes it worse; strength in [0, 1] scales
how bad (0 returns the image unchanged):
    blur      Gaussian blur of radius BLUR_RADIUS * sqrt(strength) px
    noise     Gaussian pixel noise of sigma NOISE_SIGMA * strength
    smear     motion blur (the objects streak translucently over the background), SMEAR_LENGTH * strength px long,
              in a random direction
    recolour  a part (strength of it, by area, cut off from a random side) of one named object painted in a named
              colour that is not in the prompt; at 1 the whole object
    move      the objects moved strength of the way to a wrong place: an object on a named side towards the mirror
              place on the opposite side; a pair rotated by strength * 180 degrees about its midpoint (swapped at 1);
              an unpositioned object strength * CENTRE_TOLERANCE further off-centre
    drop      a part (strength of it, by area) of one named object erased; at 1 the object is gone
recolour, move and drop act on the prompt's objects when `prompt` is given, else on the two largest colour regions.

The oracle. Every pixel is read as  pixel = BACKGROUND + t * (COLOURS[k] - BACKGROUND) + residual,  k the named colour
whose background-to-colour line passes nearest; a lookup table over RGB quantised to 33 levels a channel holds k,
the ink (t ramped from 0.1 to 0.9, gated off by a residual from INK_GATE[0] to INK_GATE[1]: an off-palette pixel is no
object's) and the residual. `score(images, prompts)` in [0, 1] is sqrt(fidelity * quality); `score_terms` gives
every term as (N,) arrays in [0, 1]:
    presence    product over the named objects of min(1, ink of the object's colour / (PRESENCE_SHARE * the area a
                clean render of it has)): one object missing of two is no scene at all
    shape       presence-weighted mean over the objects of the shape match: the overlap (IoU) of the object's solid
                ink with the named shape (a disc, a square, an apex-up triangle as wide as high) centred in its
                extent box and inscribed in a square of the box's area; 0 up to SHAPE_BAND[shape][0], 1 from
                SHAPE_BAND[shape][1]. Clean renders overlap their own shape by >= 0.81 (triangle) / 0.95 (circle,
                square) and the others' by <= 0.81 / 0.60; an oval, a rectangle, a notched, egg-shaped or pinched
                blob overlaps less than a clean one
    purity      the share of all ink that is in the named colours (a recoloured or extra object lowers it)
    placement   from the objects' ink centroids. unpositioned: 1 - (distance from the centre / CENTRE_TOLERANCE)^2;
                a named side: 0.5 + (offset from the centre towards the side) / (2 OFFSET), i.e. 1 where a render
                puts it, 0.5 at the centre, 0 at the mirror place; a relation A-B: 0.5 + (B - A along the named
                direction) / (4 OFFSET), i.e. 1 as rendered, 0.5 level, 0 swapped. Judged in proportion to the
                objects' presence (a missing object is presence's loss only)
    fidelity    presence * shape * purity * placement
    sharpness   from the edge width w = sum |grad ink| / sum |grad ink|^2 (px; for a step blurred to width w it is w,
                whatever the objects' size and shape): 1 up to EDGE_WIDTH[0], 0 from EDGE_WIDTH[1]
    background  exp(-mean over pixels of max(residual - RESIDUAL_FREE, 0) / BACKGROUND_SCALE): noise and
                off-palette colour lower it
    quality     sharpness * background
It is vectorised over images: about 3,200 images/s on one CPU core (bench/bench_oracle.py). Only 64x64 RGB images in
[0, 255] are scored; anything else is refused with a message that says what was expected.
"""
import functools
import hashlib
import itertools
import re

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 64
BACKGROUND = np.array([240, 240, 240], dtype=np.float32)
COLOURS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 75, 215),
           "yellow": (235, 205, 35), "purple": (140, 55, 185), "orange": (245, 135, 30)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom")
RELATIONS = ("left of", "right of", "above", "below")
DEGRADATIONS = ("blur", "noise", "smear", "recolour", "move", "drop")

# Scene geometry, in fractions of the image. An object's half-size r is 0.2 alone and 0.16 in a pair (+-5%); its area
# is AREA[shape] * r^2 (a square's half side is 0.9 r, so the three shapes look about as big). A placed object sits
# OFFSET from the centre towards its side; a pair sits OFFSET either side of the centre (2 * OFFSET apart).
RADIUS = {1: 0.2, 2: 0.16}
AREA = {"circle": np.pi, "square": 1.8 ** 2, "triangle": 2.0}
OFFSET = 0.23
JITTER = 0.04  # uniform jitter of every centre, per axis
CENTRE_TOLERANCE = 0.26  # distance from the centre at which an unpositioned object's placement reaches 0

# The oracle's constants (the module docstring says how each term uses them).
INK_GATE = (30, 70)  # residual up to which a pixel's ink counts fully, and from which not at all
PRESENCE_SHARE = 0.85  # share of a clean render's area that counts as fully present (sizes vary +-10%)
# IoU with the named template: (0 up to, 1 from). A clean square overlaps the disc by <= 0.81 and a clean circle the
# square by <= 0.80 (pi/4 with anti-aliasing); circles and squares overlap the triangle by <= 0.60.
SHAPE_BAND = {"circle": (0.82, 0.92), "square": (0.80, 0.92), "triangle": (0.62, 0.78)}
EDGE_WIDTH = (1.8, 7.0)  # px; clean renders measure 1.1-1.7, blur of radius 1 about 2.8, of radius 2 about 5.3
RESIDUAL_FREE = 4  # the lookup table's rounding: a pixel of a clean render is within this of its line
BACKGROUND_SCALE = 10  # noise of sigma 5 gives a mean excess residual of about 3.5, of sigma 20 about 15

# The degradations' strength-1 sizes.
BLUR_RADIUS = 2.0  # px
NOISE_SIGMA = 20.0  # of 255
SMEAR_LENGTH = 16.0  # px
_DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1),  # (x, y), y down
               "left of": (1, 0), "right of": (-1, 0), "above": (0, 1), "below": (0, -1)}  # relation: from A to B

_OBJECT = r"an? (\w+) (\w+)"
_PATTERNS = [
    (re.compile(rf"^{_OBJECT}$"), "single"),
    (re.compile(rf"^{_OBJECT} (?:on the|at the) (\w+)$"), "position"),
    (re.compile(rf"^{_OBJECT} (left of|right of|above|below) {_OBJECT}$"), "relation"),
]


class VocabularyError(ValueError):
    """A prompt outside the toy grammar or vocabulary; the message lists the vocabulary."""


def vocabulary():
    return (f"colours {', '.join(COLOURS)}; shapes {', '.join(SHAPES)}; positions 'on the left|right', "
            f"'at the top|bottom'; relations {', '.join(RELATIONS)}")


def _parse(prompt):
    """Prompt -> (objects ((colour, shape), ...), position or None, relation or None); cached."""
    if not isinstance(prompt, str):
        raise VocabularyError(f"a prompt must be a string, got {type(prompt).__name__} {prompt!r}")
    return _parse_text(prompt)


@functools.lru_cache(maxsize=4096)
def _parse_text(prompt):
    text = " ".join(prompt.strip().lower().split())
    for pattern, kind in _PATTERNS:
        m = pattern.match(text)
        if not m:
            continue
        g = m.groups()
        objects = ((g[0], g[1]),) if kind != "relation" else ((g[0], g[1]), (g[3], g[4]))
        for colour, shape in objects:
            if colour not in COLOURS or shape not in SHAPES:
                raise VocabularyError(f"prompt {prompt!r}: unknown colour or shape in '{colour} {shape}'. "
                                      f"Vocabulary: {vocabulary()}")
        position = g[2] if kind == "position" else None
        if position is not None and position not in POSITIONS:
            raise VocabularyError(f"prompt {prompt!r}: unknown position '{position}'. Vocabulary: {vocabulary()}")
        if len(objects) == 2 and objects[0][0] == objects[1][0]:
            raise VocabularyError(f"prompt {prompt!r}: the two objects must differ in colour (the oracle tells them "
                                  f"apart by colour). Vocabulary: {vocabulary()}")
        return objects, position, g[2] if kind == "relation" else None
    raise VocabularyError(f"prompt {prompt!r} does not follow the toy grammar ('a red circle', 'a red circle on the "
                          f"left', 'a red circle left of a blue square'). Vocabulary: {vocabulary()}")


def parse_prompt(prompt):
    """Prompt -> dict(objects=[(colour, shape), ...], position=str|None, relation=str|None)."""
    objects, position, relation = _parse(prompt)
    return dict(objects=list(objects), position=position, relation=relation)


def _named(colour, shape):
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"


def all_prompts():
    """Every prompt of the world, in a fixed order."""
    objects = [(c, s) for c in COLOURS for s in SHAPES]
    prompts = [_named(c, s) for c, s in objects]
    prompts += [f"{_named(c, s)} {'on the' if p in ('left', 'right') else 'at the'} {p}" for c, s in objects
                for p in POSITIONS]
    prompts += [f"{_named(c1, s1)} {r} {_named(c2, s2)}" for (c1, s1), (c2, s2) in itertools.permutations(objects, 2)
                if c1 != c2 for r in RELATIONS]
    return prompts


def is_held_out(prompt):
    """A fixed ~20% of scenes, by hash: they never appear in any training set. A relation is hashed in one
    orientation ("B above A" as "A below B"), so the two wordings of a scene share a side of the split."""
    objects, position, relation = _parse(prompt)
    if relation in ("right of", "above"):
        objects, relation = objects[::-1], {"right of": "left of", "above": "below"}[relation]
    key = repr((objects, position, relation))
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % 5 == 0


def split_prompts():
    prompts = all_prompts()
    return [p for p in prompts if not is_held_out(p)], [p for p in prompts if is_held_out(p)]


# ----------------------------------------------------------------------------------------------------------------
# Rendering

def _centres(spec, rng):
    """Object centres (x, y), fractions of the image, that satisfy the prompt, with jitter."""
    j = lambda: rng.uniform(-JITTER, JITTER, 2)  # noqa: E731
    if spec["relation"]:
        d = np.array(_DIRECTIONS[spec["relation"]], dtype=float)
        return [0.5 - OFFSET * d + j(), 0.5 + OFFSET * d + j()]
    d = np.array(_DIRECTIONS[spec["position"]] if spec["position"] else (0, 0), dtype=float)
    return [0.5 + OFFSET * d + j()]


def render(prompt, rng, size=SIZE):
    """A clean render of the prompt as a PIL image: drawn at 4x, box-filtered down (exact anti-aliasing)."""
    spec = parse_prompt(prompt)
    scale = 4
    big = Image.new("RGB", (size * scale, size * scale), tuple(int(v) for v in BACKGROUND))
    draw = ImageDraw.Draw(big)
    radius = RADIUS[len(spec["objects"])] * size * scale
    for (colour, shape), (cx, cy) in zip(spec["objects"], _centres(spec, rng)):
        r = radius * rng.uniform(0.95, 1.05)
        x, y = cx * size * scale, cy * size * scale
        if shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle((x - 0.9 * r, y - 0.9 * r, x + 0.9 * r, y + 0.9 * r), fill=COLOURS[colour])
        else:  # apex up, area centroid at (x, y)
            draw.polygon([(x, y - 4 * r / 3), (x - r, y + 2 * r / 3), (x + r, y + 2 * r / 3)], fill=COLOURS[colour])
    return big.resize((size, size), Image.BOX)


# ----------------------------------------------------------------------------------------------------------------
# Pixels as background + ink of one named colour (shared by `degrade` and the oracle's lookup table)

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)  # (K, 3)
_INK_DIRECTION = _PALETTE - BACKGROUND  # (K, 3)


def _decompose(pixels):
    """(..., 3) float RGB -> nearest colour index k, ink in [0, 1] and the residual (RGB distance from the nearest
    point on the line from BACKGROUND to COLOURS[k])."""
    v = pixels - BACKGROUND  # (..., 3)
    t = np.clip(v @ _INK_DIRECTION.T / (_INK_DIRECTION ** 2).sum(-1), 0, 1)  # (..., K)
    off = v[..., None, :] - t[..., None] * _INK_DIRECTION  # (..., K, 3)
    dist = np.sqrt((off ** 2).sum(-1))  # (..., K)
    k = dist.argmin(-1)
    return k, np.take_along_axis(t, k[..., None], -1)[..., 0], np.take_along_axis(dist, k[..., None], -1)[..., 0]


# Lookup table over RGB quantised to q = (v + 4) // 8, i.e. 33 levels a channel at 0, 8, ..., 248, 255 (the
# background's 240 is a level). The oracle's ink is t ramped from 0.1 to 0.9, so faint noise on the background is no
# ink (a blurred edge's ink total is unchanged), and gated by the residual (a pixel far from every background-colour
# line is noise or an off-palette colour, not an object).
def _lookup_table():
    levels = np.minimum(np.arange(33) * 8, 255).astype(np.float32)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)  # (33^3, 3)
    nearest, t, residual = _decompose(grid)
    ink = np.clip((t - 0.1) / 0.8, 0, 1) * np.clip((INK_GATE[1] - residual) / (INK_GATE[1] - INK_GATE[0]), 0, 1)
    return nearest.astype(np.uint8), ink.astype(np.float32), residual.astype(np.float32)


_LUT_NEAREST, _LUT_INK, _LUT_RESIDUAL = _lookup_table()  # (33^3,) each


# ----------------------------------------------------------------------------------------------------------------
# Degradations

def _to_image(a):
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def _shift(a, dy, dx, fill=0.0):
    """a (H, W, ...) translated by whole pixels, uncovered pixels set to fill."""
    out = np.full_like(a, fill)
    h, w = a.shape[:2]
    if abs(dy) >= h or abs(dx) >= w:
        return out
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = a[max(-dy, 0):h - max(dy, 0),
                                                                   max(-dx, 0):w - max(dx, 0)]
    return out


def _objects(nearest, ink, prompt):
    """Colour indices of the objects to act on: the prompt's colours that are in the image, or (no prompt) the two
    largest colour regions."""
    names = list(COLOURS)
    area = np.array([(ink * (nearest == k)).sum() for k in range(len(names))])
    if prompt is not None:
        return [names.index(c) for c, _ in parse_prompt(prompt)["objects"] if area[names.index(c)] >= 4]
    return [int(k) for k in np.argsort(-area)[:2] if area[k] >= 20]


def _part(ink, fraction, rng):
    """Per-pixel weights (H, W) in [0, 1] covering `fraction` of the ink, cut by a line from a random side."""
    axis, flip = int(rng.integers(2)), bool(rng.random() < 0.5)
    profile = ink.sum(1 - axis)  # ink per row (axis 0) or column (axis 1)
    profile = profile[::-1] if flip else profile
    before = np.cumsum(profile) - profile
    taken = np.clip((fraction * profile.sum() - before) / np.maximum(profile, 1e-9), 0, 1)
    taken = taken[::-1] if flip else taken
    return taken[:, None] if axis == 0 else taken[None, :]


def _smear(a, length, angle):
    """Mean of the image shifted along a line of `length` px centred on each pixel (bg fills the edges)."""
    steps = np.linspace(-length / 2, length / 2, int(round(length)) + 1)
    return np.mean([_shift(a, int(round(t * np.sin(angle))), int(round(t * np.cos(angle))), BACKGROUND)
                    for t in steps], 0)


def _move_vectors(centres, unpositioned, strength, rng):
    """New centres (fractions of the image) that put the objects in a wrong place, strength of the way there."""
    if len(centres) == 2:  # rotate the pair about its midpoint: at strength 1 the relation is reversed
        mid, angle = centres.mean(0), np.pi * strength * rng.choice([-1, 1])
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        return mid + (centres - mid) @ rot.T
    offset = centres[0] - 0.5
    if unpositioned:  # off-centre, away from where it is (a random way if it is at the centre)
        norm, angle = np.hypot(*offset), rng.uniform(0, 2 * np.pi)
        way = offset / norm if norm > 0.01 else np.array([np.cos(angle), np.sin(angle)])
        return (0.5 + offset + strength * CENTRE_TOLERANCE * way)[None]
    return (0.5 + offset * (1 - 2 * strength))[None]  # towards the mirror place across the centre


def degrade(img, kind, rng, strength=1.0, prompt=None):
    """A worse version of an image (see the module docstring for each kind); strength in [0, 1]."""
    if kind not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {kind!r}; known: {', '.join(DEGRADATIONS)}")
    if not 0 <= strength <= 1:
        raise ValueError(f"degrade strength must be in [0, 1], got {strength}")
    img = img.convert("RGB")
    if strength == 0:
        return img.copy()
    a = np.asarray(img, dtype=np.float32)
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(radius=BLUR_RADIUS * float(np.sqrt(strength))))
    if kind == "noise":
        return _to_image(a + rng.normal(0, NOISE_SIGMA * strength, a.shape))
    if kind == "smear":
        return _to_image(_smear(a, SMEAR_LENGTH * strength, rng.uniform(0, np.pi)))
    nearest, ink, _ = _decompose(a)
    objects = _objects(nearest, ink, prompt)
    if not objects:  # nothing of the named colours left to act on
        return img.copy()
    layers = [ink * (nearest == k) for k in objects]  # (H, W) each
    if kind == "move":
        h, w = ink.shape
        ys, xs = np.mgrid[0:h, 0:w]
        centres = np.array([[(lay * xs).sum() / lay.sum() / w, (lay * ys).sum() / lay.sum() / h] for lay in layers])
        unpositioned = (parse_prompt(prompt)["position"] is None if prompt is not None
                        else np.hypot(*(centres[0] - 0.5)) < OFFSET / 2)
        moved = _move_vectors(centres, unpositioned, strength, rng)
        for k, lay in zip(objects, layers):  # lift every object off, then put each down in its new place
            a = a - lay[..., None] * _INK_DIRECTION[k]
        for k, lay, old, new in zip(objects, layers, centres, moved):
            dx, dy = np.rint((new - old) * (w, h)).astype(int)
            alpha = _shift(lay, dy, dx)[..., None]
            a = a * (1 - alpha) + alpha * _PALETTE[k]
        return _to_image(a)
    which = int(rng.integers(len(objects)))
    k, part = objects[which], layers[which] * _part(layers[which], strength, rng)
    if kind == "drop":
        return _to_image(a - part[..., None] * _INK_DIRECTION[k])
    named = parse_prompt(prompt)["objects"] if prompt is not None else []
    taken = {list(COLOURS).index(c) for c, _ in named} | set(objects)
    other = rng.choice([j for j in range(len(COLOURS)) if j not in taken])
    return _to_image(a + part[..., None] * (_PALETTE[other] - _PALETTE[k]))


# ----------------------------------------------------------------------------------------------------------------
# The oracle

def _checked(a, what):
    if a.ndim == 3 and a.shape == (SIZE, SIZE, 3):
        raise ValueError(f"oracle: {what} is one image {a.shape}; pass a batch (N, {SIZE}, {SIZE}, 3) or a list")
    if a.ndim != 4 or a.shape[1:] != (SIZE, SIZE, 3):
        hint = " (channels last, not (N, 3, H, W))" if a.ndim == 4 and a.shape[1] == 3 else ""
        raise ValueError(f"oracle: images must be {SIZE}x{SIZE} RGB, an array (N, {SIZE}, {SIZE}, 3){hint} in "
                         f"[0, 255] or a list of {SIZE}x{SIZE} PIL images; {what} has shape {a.shape}. Resize to "
                         f"{SIZE}x{SIZE} first: the oracle's constants are for that size")
    if a.dtype.kind not in "uif":
        raise ValueError(f"oracle: {what} has dtype {a.dtype}; expected uint8 or float RGB in [0, 255]")
    if a.dtype != np.uint8 and a.size:
        lo, hi = float(a.min()), float(a.max())
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 255:
            raise ValueError(f"oracle: {what} has values in [{lo}, {hi}]; expected RGB in [0, 255] (clip first)")
        if a.dtype.kind == "f" and hi <= 1 and np.any(a != np.round(a)):
            raise ValueError(f"oracle: {what} looks like RGB in [0, 1]; expected [0, 255] (multiply by 255)")
    return a


def as_array(images, size=SIZE):
    """PIL images, or an array (N, H, W, 3) in [0, 255], -> float32 (N, size, size, 3). Other sizes and layouts
    are refused: the oracle's constants are for 64x64 images."""
    if size != SIZE:
        raise ValueError(f"oracle: only {SIZE}x{SIZE} images are scored, not {size}x{size}")
    return _pixels(images).astype(np.float32)


def _pixels(images):
    """Validated images -> (N, 64, 64, 3) uint8 (floats rounded)."""
    if isinstance(images, Image.Image):
        raise ValueError("oracle: got one PIL image; pass a list of images (and a list of prompts)")
    if isinstance(images, (list, tuple)):
        for i, im in enumerate(images):
            if isinstance(im, Image.Image) and im.size != (SIZE, SIZE):
                raise ValueError(f"oracle: image {i} is {im.size[0]}x{im.size[1]}; the oracle scores {SIZE}x{SIZE} "
                                 f"images (resize first)")
        a = [np.asarray(im.convert("RGB")) if isinstance(im, Image.Image) else np.asarray(im) for im in images]
        if not a:
            return np.zeros((0, SIZE, SIZE, 3), np.uint8)
        shapes = {x.shape for x in a}
        if len(shapes) > 1:
            raise ValueError(f"oracle: images of different shapes {sorted(shapes)}; each must be ({SIZE}, {SIZE}, 3)")
        a = np.stack(a)
    else:
        a = np.asarray(images)
    a = _checked(a, "the batch")
    return a if a.dtype == np.uint8 else np.rint(a).astype(np.uint8)


def _edge_width(ink):
    """(N, H, W) -> (N,) edge width in px: sum |grad| / sum |grad|^2 (a step blurred to width w gives w)."""
    dx = ink[:, :-1, 1:] - ink[:, :-1, :-1]
    dy = ink[:, 1:, :-1] - ink[:, :-1, :-1]
    g2 = dx * dx + dy * dy
    return np.sqrt(g2).sum((1, 2)) / np.maximum(g2.sum((1, 2)), 1e-6)


def _template_overlap(named, solid, kind):
    """IoU (N, 2) of each object's solid ink with its named shape, kind (N, 2) indexing SHAPES: a disc, a square or
    an apex-up triangle (as wide as high), centred in the object's extent box and as large as a square of the box's
    area: an oval or a rectangle is no match. The box's centre and size come from the column and row profiles (a
    column's share is its largest ink over two vertically adjacent pixels, so an isolated noise pixel does not widen
    it; rows alike). The template has anti-aliased edges (0.5 on the boundary), from the signed distance in px."""
    columns = np.minimum(named[:, :, 1:], named[:, :, :-1]).max(2)  # (N, 2, W)
    rows = np.minimum(named[..., 1:], named[..., :-1]).max(3)  # (N, 2, H)
    coords = np.arange(SIZE) + 0.5
    width, height = np.maximum(columns.sum(-1), 1e-6), np.maximum(rows.sum(-1), 1e-6)  # (N, 2)
    x = coords - ((columns * coords).sum(-1) / width)[..., None, None]  # (N, 2, 1, W) from the box centre
    y = coords[:, None] - ((rows * coords).sum(-1) / height)[..., None, None]  # (N, 2, H, 1)
    a = np.sqrt(width * height)[..., None, None] / 2  # half size
    kind = kind[..., None, None]
    distance = np.where(kind == 0, a - np.sqrt(x ** 2 + y ** 2),  # disc
                        np.where(kind == 1, a - np.maximum(np.abs(x), np.abs(y)),  # square
                                 np.minimum((y + a - 2 * np.abs(x)) / np.sqrt(5), a - y)))  # apex (0, -a), (+-a, a)
    template = np.clip(distance + 0.5, 0, 1)
    return np.minimum(solid, template).sum((2, 3)) / np.maximum(np.maximum(solid, template).sum((2, 3)), 1e-6)


def score_terms(images, prompts):
    """Every oracle term, (N,) float arrays in [0, 1], keyed by name (see the module docstring)."""
    pixels = _pixels(images)  # (N, H, W, 3) uint8
    if isinstance(prompts, str):
        raise ValueError("oracle: prompts must be a list of strings, one per image, not one string")
    n = len(pixels)
    if len(prompts) != n:
        raise ValueError(f"oracle: {n} images but {len(prompts)} prompts; pass one prompt per image")
    specs = [_parse(p) for p in prompts]  # (objects, position, relation) each
    names = list(COLOURS)

    # Per pixel, from the lookup table: nearest named colour, ink (gated by the residual) and residual.
    q = (pixels.astype(np.uint16) + 4) >> 3  # (N, H, W, 3) in 0..32
    index = (q[..., 0] * 33 + q[..., 1]) * 33 + q[..., 2]  # (N, H, W), < 33^3 fits uint16
    nearest, ink, residual = _LUT_NEAREST[index], _LUT_INK[index], _LUT_RESIDUAL[index]  # (N, H, W) each

    # The (up to two) named objects: slot 1 repeats slot 0 with weight 0 for single-object prompts.
    two = np.array([len(s[0]) == 2 for s in specs])  # (N,)
    weight = np.stack([np.where(two, 0.5, 1.0), np.where(two, 0.5, 0.0)], 1)  # (N, 2)
    slots = [(s[0][0], s[0][-1]) for s in specs]
    colour = np.array([[names.index(c) for c, _ in o] for o in slots], dtype=np.uint8).reshape(n, 2)
    kind = np.array([[SHAPES.index(sh) for _, sh in o] for o in slots], dtype=np.int64).reshape(n, 2)
    radius = np.where(two, RADIUS[2], RADIUS[1]) * SIZE  # (N,) px
    expected = np.array([[AREA[sh] for _, sh in o] for o in slots]).reshape(n, 2) * radius[:, None] ** 2
    named = ink[:, None] * (nearest[:, None] == colour[:, :, None, None])  # (N, 2, H, W)
    area = named.sum((2, 3))  # (N, 2)

    # Presence: enough ink of the object's colour.
    presence = np.clip(area / (PRESENCE_SHARE * expected), 0, 1)  # (N, 2)
    # Shape: the overlap of the solid ink (ramped from 0.3 to 0.7: an edge pixel counts in part, noise-dimmed ink
    # fully) with the named shape fitted to the object's extent box.
    solid = np.clip((named - 0.3) / 0.4, 0, 1)  # (N, 2, H, W)
    overlap = _template_overlap(named, solid, kind)  # (N, 2)
    band = np.array([SHAPE_BAND[s] for s in SHAPES])[kind]  # (N, 2, 2)
    shape = np.clip((overlap - band[..., 0]) / (band[..., 1] - band[..., 0]), 0, 1)
    presence_t = np.where(two, presence.prod(1), presence[:, 0])
    shape_t = (weight * presence * shape).sum(1) / np.maximum((weight * presence).sum(1), 1e-6)
    # Purity: the named colours' share of all ink.
    all_ink = ink.sum((1, 2))
    purity = np.where(all_ink > 1, np.clip(((weight > 0) * area).sum(1) / np.maximum(all_ink, 1e-6), 0, 1), 1.0)

    # Placement, from the ink centroids (x, y) in fractions of the image (an absent one is put at the centre; its
    # placement is not judged, below).
    xs = (np.arange(SIZE) + 0.5) / SIZE
    present = area > 1
    safe = np.maximum(area, 1e-6)
    centre = np.stack([np.where(present, named.sum(2) @ xs / safe, 0.5),
                       np.where(present, named.sum(3) @ xs / safe, 0.5)], -1)  # (N, 2 objects, 2 coords)
    # The named side, or the direction from A to B ("left" is a stand-in for unpositioned prompts, never used).
    direction = np.array([_DIRECTIONS[s[1] or s[2] or "left"] for s in specs], dtype=np.float64).reshape(n, 2)
    offset = centre[:, 0] - 0.5  # (N, 2)
    at_centre = 1 - (np.hypot(offset[:, 0], offset[:, 1]) / CENTRE_TOLERANCE) ** 2
    on_side = 0.5 + (offset * direction).sum(1) / (2 * OFFSET)
    related = 0.5 + ((centre[:, 1] - centre[:, 0]) * direction).sum(1) / (4 * OFFSET)
    positioned = np.array([s[1] is not None for s in specs])
    placement = np.clip(np.where(two, related, np.where(positioned, on_side, at_centre)), 0, 1)
    # Judged in proportion to the objects' presence: a missing object is presence's loss, not placement's too.
    judged = np.where(two, presence.min(1), presence[:, 0])
    placement = 1 - judged * (1 - placement)

    # Quality: sharp edges and nothing off-palette.
    sharpness = np.clip((EDGE_WIDTH[1] - _edge_width(ink)) / (EDGE_WIDTH[1] - EDGE_WIDTH[0]), 0, 1)
    background = np.exp(-np.maximum(residual - RESIDUAL_FREE, 0).mean((1, 2)) / BACKGROUND_SCALE)

    fidelity = presence_t * shape_t * purity * placement
    quality = sharpness * background
    terms = dict(presence=presence_t, shape=shape_t, purity=purity, placement=placement, sharpness=sharpness,
                 background=background, fidelity=fidelity, quality=quality)
    return {k: v.astype(np.float64) for k, v in terms.items()}


def score(images, prompts):
    """Oracle preference in [0, 1] per image: sqrt(fidelity * quality)."""
    return combine(score_terms(images, prompts))


def combine(terms):
    """The oracle score from score_terms' output."""
    return np.sqrt(terms["fidelity"] * terms["quality"])


# ----------------------------------------------------------------------------------------------------------------
# Torch images (samplers and trainers score decoded images with these)

def tensor_pixels(images):
    """Images (B, 3, H, W) in [-1, 1], a torch tensor -> uint8 (B, 64, 64, 3), what the oracle scores (resized
    with antialiasing when they are another size)."""
    import torch.nn.functional as F
    images = images.float()
    if images.shape[-2:] != (SIZE, SIZE):
        images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", antialias=True)
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def score_tensor(images, prompts):
    """Oracle (B,) float32 torch tensor of images (B, 3, H, W) in [-1, 1], on their device."""
    import torch
    return torch.tensor(score(tensor_pixels(images), prompts), dtype=torch.float32, device=images.device)


def vocabulary_problem(prompts):
    """None if every prompt is a toy-world prompt, else the error message of the first that is not."""
    try:
        for prompt in prompts:
            _parse(prompt)
    except VocabularyError as e:
        return str(e)
    return None
