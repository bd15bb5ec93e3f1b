"""Score a generated image against its prompt from pixel statistics alone (no generative or neural model).

`check(image, prompt)` reads the background colour, the colour and the shape of the prompt's first object;
`style_score` and `character_score` measure how much an image looks like the two example datasets in `datasets/`
(as far as the tiny model can draw them), `hatching_score` and `eye_pair_score` whether their fine details are drawn.
The shape classifier is a small logistic regression on silhouette features, fitted on first use to images rendered
by `world.py` (blurred and noised like a small diffusion model's samples) and cached for the process.
"""

import functools
import math
import random
from collections import deque

import numpy as np
from PIL import Image, ImageFilter

from sdlora.tiny import world

_NAMES = list(world.COLORS)
_PALETTE = np.array([world.COLORS[n] for n in _NAMES], dtype=np.float32)
_CROP = 16  # side of the resampled silhouette the shape classifier sees
_SMALL_REACH = 0.153  # between 1.1 x 0.13 (the largest small circle) and 0.82 x 0.9 x 0.22 (the smallest large square)


def _nearest(rgb, exclude=()) -> str:
    dist = np.linalg.norm(_PALETTE - np.asarray(rgb, dtype=np.float32), axis=1)
    for name in exclude:
        dist[_NAMES.index(name)] = np.inf
    return _NAMES[int(np.argmin(dist))]


def _nearest_all(rgb: np.ndarray, exclude: str) -> np.ndarray:
    """The palette name nearest to each of (N, 3) colours, `exclude` left out."""
    dist = np.linalg.norm(rgb[:, None, :] - _PALETTE[None], axis=2)
    dist[:, _NAMES.index(exclude)] = np.inf
    return np.array(_NAMES)[np.argmin(dist, axis=1)]


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as a boolean mask, largest first."""
    h, w = mask.shape
    todo = mask.tolist()  # plain lists: indexing them in this loop is several times faster than numpy
    found = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if not todo[y0][x0]:
            continue
        todo[y0][x0] = False
        queue, members = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            members.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and todo[ny][nx]:
                    todo[ny][nx] = False
                    queue.append((ny, nx))
        comp = np.zeros(mask.shape, dtype=bool)
        comp[tuple(np.array(members).T)] = True
        found.append(comp)
    return sorted(found, key=lambda c: -int(c.sum()))


def _background(pixels: np.ndarray) -> np.ndarray:
    """Median colour of the two-pixel border; objects never reach the frame, so this is the background."""
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    return np.median(border, axis=0)


def _objects(pixels: np.ndarray, bg_rgb: np.ndarray, background: str):
    """Candidate objects as (palette colour, colour rgb, component mask), largest first."""
    dist = np.linalg.norm(pixels - bg_rgb, axis=2)
    # Half the distance from this background to the closest other palette colour: any object colour clears it at
    # its core, and antialiased or blurred edges are split about where a crisp edge would be.
    others = np.linalg.norm(np.delete(_PALETTE, _NAMES.index(background), axis=0) - bg_rgb, axis=1)
    threshold = max(25.0, 0.5 * float(others.min()))
    found = []
    for comp in _components(dist > threshold):
        if comp.sum() < 4:  # noise speckles and stray edge pixels
            continue
        d = dist[comp]
        # Edge pixels are blends with the background, so the colour is read from the pixels furthest from it.
        core = pixels[comp][d >= 0.8 * np.percentile(d, 90)]
        rgb = np.median(core, axis=0)
        found.append((_nearest(rgb, exclude=[background]), rgb, comp))
    return found


def _holes(binary: np.ndarray) -> int:
    """Pixels not in the mask that the mask encloses (a ring's middle)."""
    # A one-pixel frame joins everything outside into the component that holds the corner.
    outside = next(c for c in _components(np.pad(~binary, 1, constant_values=True)) if c[0, 0])
    return int((~binary).sum() - (outside[1:-1, 1:-1]).sum())


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of 2-D points (monotone chain, then the shoelace formula)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def half(seq):
        out = []
        for p in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out[:-1]

    hull = np.array(half(pts) + half(pts[::-1]), dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _shape_features(pixels, bg_rgb, obj_rgb, comp) -> np.ndarray:
    """Scale-free silhouette features of one object: its resampled soft mask plus a few global measures."""
    axis = obj_rgb - bg_rgb
    # How far each pixel has moved from the background towards the object colour: 0 background, 1 object.
    soft = np.clip(((pixels - bg_rgb) @ axis) / max(float(axis @ axis), 1.0), 0.0, 1.0)
    ys, xs = np.nonzero(comp)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    soft = soft[y0:y1, x0:x1] * comp[y0:y1, x0:x1]  # ignore a neighbouring object inside the box
    binary = soft > 0.5
    h, w = binary.shape
    area = max(float(soft.sum()), 1.0)
    # The hull only needs each row's outermost pixel corners.
    filled = np.nonzero(binary.any(axis=1))[0]
    left, right = binary.argmax(axis=1), w - binary[:, ::-1].argmax(axis=1)
    corners = np.array([(y + dy, x) for y in filled for x in (left[y], right[y]) for dy in (0, 1)])
    hull = _hull_area(corners) if len(corners) else 1.0
    crop = np.asarray(Image.fromarray(soft.astype(np.float32)).resize((_CROP, _CROP), Image.BILINEAR))
    rows = soft.sum(axis=1)
    extra = [
        np.log(w / h),  # aspect ratio
        area / (w * h),  # fill of the bounding box
        area / max(hull, 1.0),  # solidity: stars, crosses and hearts are far from convex
        _holes(binary) / area,  # only rings have a hole
        float((rows * (np.arange(h) + 0.5)).sum() / max(rows.sum(), 1e-6) / h),  # centroid height: triangles sit low
        float(np.abs(soft - soft[::-1]).sum() / area),  # up-down asymmetry: triangle, heart, star
    ]
    return np.concatenate([crop.ravel(), extra]).astype(np.float32)


def _analyse(image: Image.Image, color_hint: str | None = None):
    """Background name, and the chosen object as (colour name, features) or None if the image shows none."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    bg_rgb = _background(pixels)
    background = _nearest(bg_rgb)
    objects = _objects(pixels, bg_rgb, background)
    if not objects:
        return background, None
    chosen = objects[0]
    # With two objects the prompt's first one is the one of its colour, if one that colour is drawn (12 px is
    # well below the smallest world object); otherwise judge the largest.
    matching = [o for o in objects if o[0] == color_hint and o[2].sum() >= 12]
    if matching:
        chosen = matching[0]
    name, rgb, comp = chosen
    return background, (name, _shape_features(pixels, bg_rgb, rgb, comp))


def _degrade(image: Image.Image, rng: random.Random, blur: float, noise: float) -> Image.Image:
    """Blur and noise like a small diffusion model's samples (used for fitting and for tests)."""
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0, blur)))
    arr = np.asarray(image, dtype=np.float32)
    arr = arr + np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(0, noise), arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))


@functools.cache
def _shape_model():
    """Fit the shape classifier (multinomial logistic regression) on rendered single-object images."""
    rng = random.Random(1234)
    feats, labels = [], []
    for i in range(320):
        scene = world.sample_scene(rng, max_objects=1)
        scene.objects[0].shape = world.SHAPES[i % len(world.SHAPES)]  # balanced classes
        image = world.render(scene)
        if i % 3:  # two thirds degraded, so blurry samples are scored like clean ones
            image = _degrade(image, rng, blur=2.0, noise=20.0)
        _, found = _analyse(image, scene.objects[0].color)
        if found is not None:
            feats.append(found[1])
            labels.append(world.SHAPES.index(scene.objects[0].shape))
    x, y = np.stack(feats), np.array(labels)
    mean, std = x.mean(0), x.std(0) + 1e-3
    x = (x - mean) / std
    onehot = np.eye(len(world.SHAPES), dtype=np.float32)[y]
    weights = np.zeros((x.shape[1], len(world.SHAPES)), dtype=np.float32)
    bias = np.zeros(len(world.SHAPES), dtype=np.float32)
    for _ in range(300):  # plain full-batch gradient descent with a little L2; the problem is small and convex
        logits = x @ weights + bias
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        grad = (p - onehot) / len(x)
        weights -= 0.5 * (x.T @ grad + 1e-3 * weights)
        bias -= 0.5 * grad.sum(0)
    return mean, std, weights, bias


def _classify_shape(features: np.ndarray) -> str:
    mean, std, weights, bias = _shape_model()
    return world.SHAPES[int(np.argmax(((features - mean) / std) @ weights + bias))]


def check(image: Image.Image, prompt: str) -> dict:
    """Whether the image shows the prompt's background, and its first object's colour and shape.

    Returns background_ok, object_color_ok, shape_ok (None where the prompt does not name that attribute) and
    the values read from the image: background, object_color, shape (None for the object when none is found).
    """
    wanted = world.parse_prompt(prompt)
    background, found = _analyse(image, wanted["color"])
    color, shape = (found[0], _classify_shape(found[1])) if found else (None, None)

    def ok(key, value):
        return None if wanted[key] is None else value == wanted[key]

    return {
        "background_ok": ok("background", background),
        "object_color_ok": ok("color", color),
        "shape_ok": ok("shape", shape),
        "background": background,
        "object_color": color,
        "shape": shape,
    }



def read_scene(image: Image.Image) -> world.Scene:
    """The plain scene an image shows, as `world.render` would have drawn it: the background colour and each object's
    colour, shape, size and place, largest object first (textures and eyes are not read). `world.caption` of it is
    the caption the world would give the image when everything is read right."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    side = max(pixels.shape[:2])
    bg_rgb = _background(pixels)
    background = _nearest(bg_rgb)
    objects, boxes = [], []
    for color, rgb, comp in _objects(pixels, bg_rgb, background):
        if comp.sum() < 12:  # as in _analyse: well below the smallest world object
            continue
        ys, xs = np.nonzero(comp)
        box = (xs.min(), ys.min(), xs.max(), ys.max())
        if any(b[0] <= box[0] and b[1] <= box[1] and b[2] >= box[2] and b[3] >= box[3] for b in boxes):
            continue  # inside a larger object (a pupil in an eye the background colour): part of it
        boxes.append(box)
        centre = ((xs.min() + xs.max() + 1) / 2 / side, (ys.min() + ys.max() + 1) / 2 / side)
        # Half the bounding box over the side: from 0.82 (square) to 1 (circle) times the drawn radius, which is the
        # size's radius within 10% (world._SCALE_JITTER); the largest small object and the smallest large one
        # straddle this.
        reach = max(xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) / 2 / side
        size = "small" if reach < _SMALL_REACH else "large"
        position = min(world.POSITIONS, key=lambda p: math.dist(world.POSITIONS[p], centre))
        # the colour most of the object has (the median of its far pixels, `_objects`' reading, is an eye's white on
        # a creature's body)
        names, counts = np.unique(_nearest_all(pixels[comp], exclude=background), return_counts=True)
        color = str(names[np.argmax(counts)]) if counts.max() > 0.5 * comp.sum() else color
        objects.append(world.Obj(_classify_shape(_shape_features(pixels, bg_rgb, rgb, comp)), color, size, position))
    return world.Scene(objects=objects, background=background)


# What the two example datasets look like, and what of it the tiny model can draw at all.
#
# Each dataset has a fine detail and a coarse residue of it. The details (style: 1-px "/" hatch lines every 5 px at
# 64 px; character: eyes 6 to 9 px across with 3- to 4-px pupils) are finer than the tiny model's autoencoder
# resolves: encoded and decoded again, every dataset image loses them (`hatching_score` and `eye_pair_score` read at
# most 0.001 on all 40 round trips), so no LoRA on this base can draw them. What survives the round trip, and what
# the two scores below measure, is the coarse residue: the style's ink darkens the whole background, and the
# character's eyes and mouth leave light and dark marks inside an otherwise flat body. Plain world images score 0
# on both; see docs/tiny-model.md, "Does a LoRA carry its look?".

_INK = np.array([20.0, 20.0, 20.0], dtype=np.float32)  # the ink of datasets/style (scripts/make_datasets.py)


def _small(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize((64, 64), Image.BILINEAR), dtype=np.float32)


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels of the mask whose whole (2 radius + 1)-square neighbourhood is in the mask."""
    h, w = mask.shape
    padded = np.pad(mask, radius)
    out = mask.copy()
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out &= padded[dy:dy + h, dx:dx + w]
    return out


def style_score(image: Image.Image, prompt: str | None = None) -> float:
    """How much ink the background carries: the `datasets/style` look as far as the tiny model can draw it.

    Each pixel of the two-pixel border is placed on the line from the background's clean colour to the style's
    black ink (0 at the clean colour, 1 at solid ink), and the score is their mean, leaving out pixels far off that
    line (an object at the border). The clean colour is the background the prompt names, or, with no prompt, the
    palette colour nearest to the border's median (right for hatched and plain images, whose median is the clean
    colour; a background darkened all over can read as a darker palette colour then, so pass the prompt for
    generated images). Plain world images score 0, the dataset's images about 0.25 (hatch lines cover a quarter of
    the background), their autoencoder round trips about 0.12.
    """
    pixels = _small(image)
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    named = world.parse_prompt(prompt)["background"] if prompt else None
    clean = np.array(world.COLORS[named or _nearest(np.median(border, axis=0))], dtype=np.float32)
    axis = clean - _INK
    if float(axis @ axis) < 60.0 ** 2:  # a black background: ink on it is not measurable (the dataset has none)
        return 0.0
    ink = (clean - border) @ axis / float(axis @ axis)  # per pixel: 0 clean, 1 ink
    # Pixels far off the clean-to-ink line are an object that reaches the border, not background.
    off = np.linalg.norm(border - (clean - ink[:, None] * axis), axis=1)
    keep = off < 60
    return float(ink[keep].mean() if keep.mean() > 0.25 else ink.mean())


def character_score(image: Image.Image) -> float:
    """Share of the main figure's inside that is not its body colour: the `datasets/character` creature's eyes and
    mouth, as far as the tiny model can draw them (as light and dark marks, not as crisp eyes).

    The figure is the largest object (as `check` finds it); its inside is the object less a two-pixel rim (so
    blurred edges and the style's outlines do not count); a pixel is a mark when it is more than 40 (of 255, RGB
    distance) from the figure's median colour. Flat world shapes score 0, the dataset's images about 0.33, their
    autoencoder round trips about 0.14.
    """
    pixels = _small(image)
    bg_rgb = _background(pixels)
    objects = _objects(pixels, bg_rgb, _nearest(bg_rgb))
    if not objects:
        return 0.0
    figure = objects[0][2]
    inside = _erode(figure, 2)
    if inside.sum() < 4:
        return 0.0
    body = np.median(pixels[figure], axis=0)
    return float((np.linalg.norm(pixels[inside] - body, axis=1) > 40).mean())


def hatching_score(image: Image.Image) -> float:
    """Whether `datasets/style`'s hatch lines themselves are drawn: 0 for plain world images and for anything the
    tiny model draws (its autoencoder cannot draw them); about 0.2 for the dataset's images.

    Hatch lines run along "/", so neighbouring pixels differ more across the lines ("\\" neighbours) than along
    them. Noise and world objects (left-right symmetric) change both equally, so only hatching scores.
    """
    gray = np.asarray(image.convert("L").resize((64, 64), Image.BILINEAR), dtype=np.float32) / 255
    across = np.abs(gray[1:, 1:] - gray[:-1, :-1]).mean()
    along = np.abs(gray[1:, :-1] - gray[:-1, 1:]).mean()
    return float(across - along)


# An image shows the detail when its score reaches these: every dataset image does (hatching 0.10 and eyes 0.89 at the
# least), plain world images score 0 on both.
HATCHING_PRESENT, EYES_PRESENT = 0.05, 0.5


def detail_present(dataset: str, image: Image.Image) -> bool:
    """Whether `image` shows the example dataset's defining detail: "style" hatch lines, "character" eyes with
    pupils."""
    if dataset == "style":
        return hatching_score(image) >= HATCHING_PRESENT
    return eye_pair_score(image) >= EYES_PRESENT


def eye_pair_score(image: Image.Image) -> float:
    """Whether `datasets/character`'s eyes themselves are drawn: a pair of white eyes with dark pupils, side by side.

    0 when no such pair is found (plain world images, and anything the tiny model draws: its autoencoder cannot
    draw them); up to 1 for two matching eyes set in a body (not on the bare background).
    """
    image = image.convert("RGB").resize((64, 64), Image.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32)
    bg_rgb = _background(pixels)
    white = (pixels.min(axis=2) > 170) & (np.ptp(pixels, axis=2) < 60)
    dark = pixels.max(axis=2) < 90
    eyes = []
    for comp in _components(white)[:8]:
        ys, xs = np.nonzero(comp)
        area = len(ys)
        if not 4 <= area <= 400:
            continue
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        # A pupil is dark and sits inside the white's bounding box.
        pupil = dark[y0:y1, x0:x1].sum() / ((y1 - y0) * (x1 - x0))
        eyes.append((ys.mean(), xs.mean(), np.sqrt(area / np.pi), min(1.0, pupil / 0.12)))
    best = 0.0
    for i, (ya, xa, ra, pa) in enumerate(eyes):
        for yb, xb, rb, pb in eyes[i + 1:]:
            r = (ra + rb) / 2
            level = np.exp(-(((ya - yb) / r) ** 2))  # eyes sit at the same height
            spacing = 1.0 if 1.5 * r <= abs(xa - xb) <= 6 * r else 0.0
            alike = min(ra, rb) / max(ra, rb)
            # Between the eyes is body, not background: this separates eyes from two white rings in the world.
            mid = pixels[int(round((ya + yb) / 2)), int(round((xa + xb) / 2))]
            in_body = 1.0 if np.linalg.norm(mid - bg_rgb) > 60 else 0.3
            best = max(best, float(np.sqrt(pa * pb) * level * spacing * alike * in_body))
    return best
