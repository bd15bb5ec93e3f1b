"""A procedural world of captioned images (coloured shapes on backgrounds, some with textures) to pretrain the tiny
base model on.

Shapes and backgrounds come plain or with a texture the caption names: objects can be outlined, striped or dotted or
have eyes ("a small striped red star with eyes"), backgrounds striped or dotted ("on a dotted blue background"). So
the base can draw fine detail (lines a pixel wide, outlines, eyes with pupils) in general, and a LoRA can teach it a
look made of such details. A texture is always named when it is drawn, so a prompt that names none gets plain shapes.
Some textured scenes name a made-up style word instead ("radumer, a small red star on a blue background"): each word
always draws the same look, as a real base learns that an artist's name carries one. So the base learns that a word it
does not know can carry a texture, which a LoRA's trigger word then only has to bind.

Everything is deterministic: `sample_scene` draws from the `random.Random` it is given, `render` is a pure function
of the scene, and `make_batch(n, seed)` always returns the same images and captions.

    >>> images, captions = make_batch(4, seed=0)
    >>> captions[0]   # e.g. 'a small red star at the top left on a blue background'
"""

import math
import random
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond", "cross", "ring")

# Fixed RGB per name, spread out so that the nearest palette colour is unambiguous even on a blurry sample
# (the closest pair, orange and yellow, is still ~100 apart).
COLORS = {
    "red": (220, 30, 30),
    "orange": (255, 128, 0),
    "yellow": (255, 230, 0),
    "green": (40, 170, 60),
    "blue": (30, 80, 220),
    "purple": (140, 50, 180),
    "pink": (255, 130, 190),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "brown": (130, 75, 30),
    "cyan": (30, 200, 220),
}

# Radius of the shape's bounding circle as a fraction of the image side.
SIZES = {"small": 0.13, "large": 0.22}

# Centre of the object as (x, y) fractions of the image side, y pointing down. 0.27 keeps a large corner object
# (radius 0.22 plus jitter) inside the frame.
POSITIONS = {
    "center": (0.5, 0.5),
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
}

_PHRASES = {"center": "in the center", "left": "on the left", "right": "on the right"}
INK = (20, 20, 20)  # outlines, stripes, dots and pupils (white on black shapes and backgrounds)
OBJECT_PATTERNS = ("outlined", "striped", "dotted")
BACKGROUND_PATTERNS = ("striped", "dotted")
EYE_SHAPES = ("circle", "square", "heart", "diamond")  # shapes with room for two eyes side by side
_PATTERN_P, _EYES_P, _BACKGROUND_PATTERN_P = 0.3, 0.12, 0.25  # how often sample_scene(patterns=True) adds each
_STYLE_P = 0.1  # how often sample_scene(patterns=True) draws a scene in a style word's look instead

_JITTER = 0.02  # position jitter (fraction of the side) so the model sees more than nine exact spots
_SCALE_JITTER = 0.1  # relative size jitter, for the same reason
_RING_WIDTH = 0.42  # ring thickness as a fraction of its radius


@dataclass
class Obj:
    shape: str
    color: str
    size: str
    position: str
    # Small per-object variation chosen by sample_scene; render() only reads it, so a scene renders the same way
    # every time.
    offset: tuple[float, float] = (0.0, 0.0)
    scale: float = 1.0
    pattern: str | None = None  # one of OBJECT_PATTERNS
    eyes: bool = False
    look: tuple[float, float, float] = (0.0, 0.0, 0.0)  # texture geometry: see _texture(); for eyes the gaze


@dataclass
class Scene:
    objects: list[Obj] = field(default_factory=list)
    background: str = "white"
    background_pattern: str | None = None  # one of BACKGROUND_PATTERNS
    background_look: tuple[float, float, float] = (0.0, 0.0, 0.0)
    style: str | None = None  # a key of STYLES: its look drew the textures, and the caption names it instead of them


@dataclass(frozen=True)
class Style:
    """A style word's look: a background texture, and outlines on every object or none."""
    background_pattern: str
    background_look: tuple[float, float, float]
    outline: float  # outline width in pixels of a 64 px image; 0 = none


def _centered(points):
    """Shift a polygon so its bounding box is centred on the origin."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    return [(x - cx, y - cy) for x, y in points]


def _regular(n_points, radii, start=-90.0):
    """Points alternating through `radii` at equal angles, the first one straight up."""
    count = n_points * len(radii)
    return [
        (radii[i % len(radii)] * math.cos(math.radians(start + 360 * i / count)),
         radii[i % len(radii)] * math.sin(math.radians(start + 360 * i / count)))
        for i in range(count)
    ]


def _heart():
    # The classic parametric heart curve, flipped so it points down in image coordinates and scaled to unit size.
    pts = []
    for i in range(64):
        t = 2 * math.pi * i / 64
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 16, -y / 16))
    return _centered(pts)


_ARM = 0.34  # half-width of a cross arm
# Unit polygons (bounding circle of radius ~1, centred). circle and ring are drawn as ellipses instead.
_POLYGONS = {
    "square": [(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)],
    "triangle": _centered(_regular(3, [1.0])),
    "star": _centered(_regular(5, [1.0, 0.45])),
    "heart": _heart(),
    "diamond": [(0, -1), (0.8, 0), (0, 1), (-0.8, 0)],
    "cross": [(-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM), (_ARM, 1),
              (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM)],
}


def _gap_ok(a: Obj, b: Obj) -> bool:
    """Whether two objects are far enough apart not to touch, jitter included."""
    (ax, ay), (bx, by) = POSITIONS[a.position], POSITIONS[b.position]
    reach = (SIZES[a.size] + SIZES[b.size]) * (1 + _SCALE_JITTER) + 2 * _JITTER * math.sqrt(2) + 0.01
    return math.hypot(ax - bx, ay - by) > reach


def _look(rng: random.Random) -> tuple[float, float, float]:
    """Random texture geometry: (direction or phase, spacing, width), read by _texture(). In pixels of a 64 px image:
    from fine hatching (lines 0.6 px wide, 3 px apart: what an inked drawing's shading looks like at this size) to
    broad stripes (1.8 px, 7 px apart); lines never cover more than half the area."""
    spacing = rng.uniform(3.0, 7.0)
    return (rng.random(), spacing, rng.uniform(0.6, min(1.8, spacing / 2)))


def _style_words(n: int, seed: int = 7) -> dict[str, Style]:
    """`n` made-up words (two or three syllables, none of the world's words, none starting like the example datasets'
    triggers zkstyle and zqchar), each with a fixed random look."""
    rng = random.Random(seed)
    onsets, vowels, codas = "bdfgklmnprstvz", "aeiou", ("", "n", "r", "l", "s", "k")
    words: dict[str, Style] = {}
    while len(words) < n:
        word = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.choice((2, 3)))) + rng.choice(codas)
        if word in words or word[:2] in ("zk", "zq") or word in COLORS or word in SHAPES:
            continue
        words[word] = Style(rng.choice(BACKGROUND_PATTERNS), _look(rng), rng.choice((0.0, rng.uniform(0.6, 1.8))))
    return words


STYLES = _style_words(48)


def sample_scene(rng: random.Random, max_objects: int = 2, patterns: bool = False) -> Scene:
    """Draw a random scene of 1..max_objects non-touching objects, each coloured unlike the background.

    With `patterns`, some objects get a texture or eyes and some backgrounds a texture, and some scenes are drawn in
    a style word's look (drawn after the plain scene, so a seed gives the same shapes, colours and places either
    way)."""
    background = rng.choice(list(COLORS))
    object_colors = [c for c in COLORS if c != background]
    n = rng.randint(1, max_objects)
    objects: list[Obj] = []
    tries = 0
    while len(objects) < n:
        obj = Obj(
            shape=rng.choice(SHAPES),
            color=rng.choice(object_colors),
            size=rng.choice(list(SIZES)),
            position=rng.choice(list(POSITIONS)),
            offset=(rng.uniform(-_JITTER, _JITTER), rng.uniform(-_JITTER, _JITTER)),
            scale=rng.uniform(1 - _SCALE_JITTER, 1 + _SCALE_JITTER),
        )
        if all(_gap_ok(obj, other) for other in objects):
            objects.append(obj)
        tries += 1
        if tries % 20 == 0:  # the first object leaves no room (a large one in the center): start over
            objects = []
    scene = Scene(objects=objects, background=background)
    if patterns:
        for obj in objects:
            if rng.random() < _PATTERN_P:
                obj.pattern, obj.look = rng.choice(OBJECT_PATTERNS), _look(rng)
            if obj.shape in EYE_SHAPES and rng.random() < _EYES_P:
                obj.eyes = True
                obj.look = obj.look if obj.pattern else (rng.uniform(-1, 1), rng.uniform(-1, 1), 0.0)
        if rng.random() < _BACKGROUND_PATTERN_P:
            scene.background_pattern, scene.background_look = rng.choice(BACKGROUND_PATTERNS), _look(rng)
        if rng.random() < _STYLE_P:
            scene.style = rng.choice(list(STYLES))
            style = STYLES[scene.style]
            scene.background_pattern, scene.background_look = style.background_pattern, style.background_look
            for obj in objects:
                if style.outline:
                    obj.pattern, obj.look = "outlined", (0.0, 0.0, style.outline)
                elif obj.pattern:
                    obj.pattern = None
    return scene


def _ink(color: str) -> tuple[int, int, int]:
    return COLORS["white"] if color == "black" else INK


def _texture(kind: str, look: tuple[float, float, float], side: int, size: int) -> np.ndarray:
    """Boolean (side, side) mask of a texture drawn at `side` px for an image of `size` px: stripes in one of four
    directions, or a grid of dots; spacing and width in output pixels, so they keep their look at any size."""
    scale = side / size
    spacing, width = look[1] * scale, look[2] * scale
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    if kind == "striped":
        direction = int(look[0] * 4) % 4
        along = (x + y, x - y, y, x)[direction]  # "/", "\", horizontal, vertical
        # distance across the stripes is along / sqrt(2) for the diagonals: keep the spacing the same in every direction
        step = spacing * (math.sqrt(2) if direction < 2 else 1.0)
        return (along + look[0] * 1000.0) % step < width * (math.sqrt(2) if direction < 2 else 1.0)
    if kind == "dotted":
        phase = look[0] * spacing
        dy, dx = (y + phase) % spacing - spacing / 2, (x + phase) % spacing - spacing / 2
        return dy * dy + dx * dx < (0.6 * width) ** 2
    raise ValueError(kind)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Grow a boolean mask by a disk of `radius` pixels."""
    grown = mask.copy()
    h, w = mask.shape
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dx * dx + dy * dy <= radius * radius:
                grown[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] |= \
                    mask[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return grown


def _draw_shape(draw: ImageDraw.ImageDraw, obj: Obj, side: int, fill) -> tuple[float, float, float]:
    """Draw one object's silhouette in `fill`; returns its centre and radius in pixels."""
    px, py = POSITIONS[obj.position]
    cx, cy = (px + obj.offset[0]) * side, (py + obj.offset[1]) * side
    r = SIZES[obj.size] * obj.scale * side
    box = (cx - r, cy - r, cx + r, cy + r)
    if obj.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif obj.shape == "ring":
        draw.ellipse(box, outline=fill, width=max(1, round(_RING_WIDTH * r)))
    else:
        draw.polygon([(cx + x * r, cy + y * r) for x, y in _POLYGONS[obj.shape]], fill=fill)
    return cx, cy, r


def _draw_eyes(draw: ImageDraw.ImageDraw, obj: Obj, cx: float, cy: float, r: float) -> None:
    """Two white eyes with pupils in the upper half of the object, looking where `obj.look` says."""
    gaze_x, gaze_y = obj.look[0] * 0.08, obj.look[1] * 0.08
    for side_x in (-0.36, 0.36):
        ex, ey = cx + side_x * r, cy - 0.18 * r
        draw.ellipse((ex - 0.25 * r, ey - 0.28 * r, ex + 0.25 * r, ey + 0.28 * r),
                     fill=COLORS["white"] if obj.color != "white" else COLORS["gray"])
        px, py = ex + gaze_x * r, ey + gaze_y * r
        draw.ellipse((px - 0.12 * r, py - 0.12 * r, px + 0.12 * r, py + 0.12 * r), fill=INK)


def render(scene: Scene, size: int = 64, supersample: int = 4) -> Image.Image:
    """Draw the scene as an RGB image of `size` x `size` pixels.

    Shapes are drawn at `size * supersample` and downsampled with LANCZOS, which antialiases the edges.
    """
    side = size * supersample
    pixels = np.empty((side, side, 3), dtype=np.uint8)
    pixels[:] = COLORS[scene.background]
    if scene.background_pattern:
        pixels[_texture(scene.background_pattern, scene.background_look, side, size)] = _ink(scene.background)
    for obj in scene.objects:
        silhouette = Image.new("L", (side, side), 0)
        cx, cy, r = _draw_shape(ImageDraw.Draw(silhouette), obj, side, 255)
        mask = np.asarray(silhouette) > 127
        if obj.pattern == "outlined":  # a band of ink outside the edge, as an inked drawing has
            pixels[dilate(mask, max(1, round(obj.look[2] * side / size)))] = _ink(obj.color)
        pixels[mask] = COLORS[obj.color]
        if obj.pattern in ("striped", "dotted"):
            pixels[mask & _texture(obj.pattern, obj.look, side, size)] = _ink(obj.color)
        if obj.eyes:
            image = Image.fromarray(pixels)
            _draw_eyes(ImageDraw.Draw(image), obj, cx, cy, r)
            pixels = np.array(image)
    image = Image.fromarray(pixels)
    if supersample > 1:
        image = image.resize((size, size), Image.LANCZOS)
    return image


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _describe(obj: Obj, with_size=True, with_color=True, with_position=True, styled=False) -> str:
    # The texture is named whenever the object is (in a styled scene the style word names it), so a prompt without
    # one asks for a plain shape.
    words = ([obj.size] if with_size else []) + ([obj.pattern] if obj.pattern and not styled else []) \
        + ([obj.color] if with_color else []) + [obj.shape]
    text = _article(" ".join(words)) + (" with eyes" if obj.eyes else "")
    if with_position:
        text += " " + _PHRASES.get(obj.position, "at the " + obj.position)
    return text


def caption(scene: Scene, rng: random.Random | None = None) -> str:
    """Describe the scene in plain English.

    Without `rng` the caption is complete ("a small red star at the top left on a blue background"). With `rng`,
    about half the captions are partial ("a red star", "a star on a blue background", "a blue background") so the
    model also learns short prompts; whatever a partial caption leaves out was random in the scene anyway.
    """
    styled = scene.style is not None
    lead = f"{scene.style}, " if styled else ""  # where a LoRA's trigger word goes
    pattern = None if styled else scene.background_pattern
    background = _article(" ".join(filter(None, [pattern, scene.background]))) + " background"
    if rng is None or rng.random() < 0.5:
        return lead + " and ".join(_describe(o, styled=styled) for o in scene.objects) + " on " + background
    first = scene.objects[0]
    kind = rng.randrange(5)
    if kind == 1 and pattern:  # a textured background is always named
        kind = 3
    if kind == 0:
        return lead + background
    if kind == 1:
        return lead + _describe(first, with_size=False, with_position=False, styled=styled)
    if kind == 2:
        return lead + _describe(first, with_size=False, with_color=False, with_position=False, styled=styled) \
            + " on " + background
    if kind == 3:
        return lead + _describe(first, with_size=False, with_position=False, styled=styled) + " on " + background
    return lead + _describe(first, styled=styled) + " on " + background


# Longest phrases first so "top left" wins over "top".
_POSITION_WORDS = sorted(POSITIONS, key=len, reverse=True)
_WORD = r"(?<![a-z]){}(?:e?s)?(?![a-z])"  # whole words, plurals allowed ("stars", "crosses")


def _first(words, text):
    """The word from `words` that appears earliest in text, or None."""
    best = None
    for w in words:
        m = re.search(_WORD.format(re.escape(w)), text)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), w)
    return best[1] if best else None


def parse_prompt(prompt: str) -> dict:
    """The first object and the background a prompt asks for.

    Returns a dict with keys shape, color, size, position (of the first object mentioned) and background; a key
    is None where the prompt does not say. Unknown words (a trigger word, "photo of") are ignored.
    """
    text = prompt.lower().replace("grey", "gray").replace("centre", "center")
    background = None
    m = re.search(r"([a-z]+) background", text)
    if m and m.group(1) in COLORS:
        background = m.group(1)
        # Drop the background phrase so its colour word is not read as the object's.
        text = text[: m.start()] + text[m.end():]
    first_object = text.split(" and ")[0]
    return {
        "shape": _first(SHAPES, first_object),
        "color": _first(COLORS, first_object),
        "size": _first(SIZES, first_object),
        "position": _first(_POSITION_WORDS, first_object),
        "background": background,
    }


def make_batch(n: int, seed: int, size: int = 64, patterns: bool = True) -> tuple[list[Image.Image], list[str]]:
    """`n` random scenes rendered at `size` px with their (sometimes partial) captions, deterministic in `seed`."""
    rng = random.Random(seed)
    images, captions = [], []
    for _ in range(n):
        scene = sample_scene(rng, patterns=patterns)
        images.append(render(scene, size))
        captions.append(caption(scene, rng))
    return images, captions
