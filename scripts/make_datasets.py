"""Write the two example LoRA datasets in datasets/ (style and character), byte for byte the same on every run.

    python scripts/make_datasets.py            # regenerates datasets/style and datasets/character
    python scripts/make_datasets.py --out DIR  # somewhere else (the tests compare that with the committed files)

Each image is a 128 px PNG with a same-stem .txt caption. Both use the scenes, palette and caption grammar of
`sdlora/tiny/world.py`, so the only new thing a LoRA can learn from them is the look or the figure.
"""

import argparse
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so it runs from a checkout, installed or not
from sdlora.tiny.world import COLORS, POSITIONS, Obj, Scene, caption, dilate, render, sample_scene

SIZE = 128  # saved image side
COUNT = 20  # images per dataset
_SS = 2  # drawn at twice the size, then downsampled, for antialiased edges
_INK = (20, 20, 20)


def _save(out: Path, index: int, image: Image.Image, text: str) -> None:
    # Plain PNG with no metadata: Pillow writes no timestamp, so the bytes depend on the pixels only.
    image.save(out / f"{index:02d}.png", format="PNG", optimize=True)
    (out / f"{index:02d}.txt").write_text(text + "\n", encoding="utf-8")


def style_image(scene: Scene) -> Image.Image:
    """A world scene in the "zkstyle" look: thick ink outlines and "/" hatching over the background."""
    side = SIZE * _SS
    image = Image.new("RGB", (side, side), COLORS[scene.background])
    draw = ImageDraw.Draw(image)
    spacing, width = 10 * _SS, 2 * _SS
    for c in range(-side, 2 * side, spacing):
        draw.line([(c, 0), (c - side, side)], fill=_INK, width=width)  # x + y = const: runs along "/"
    # The objects' silhouette, from the world renderer itself (everything white on black).
    silhouette = Scene([Obj(o.shape, "white", o.size, o.position, o.offset, o.scale) for o in scene.objects], "black")
    mask = np.asarray(render(silhouette, side, supersample=1).convert("L")) > 127
    pixels = np.array(image)
    pixels[dilate(mask, 3 * _SS)] = _INK
    pixels[mask] = np.asarray(render(scene, side, supersample=1))[mask]
    return Image.fromarray(pixels).resize((SIZE, SIZE), Image.LANCZOS)


def make_style(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(101)
    for i in range(COUNT):
        scene = sample_scene(rng)
        while scene.background == "black":  # black ink would vanish on it
            scene = sample_scene(rng)
        _save(out, i, style_image(scene), "zkstyle, " + caption(scene))


# Body radius (fraction of the side) per size; feet reach 1.1 radii below the centre, so corners still fit.
_BODY = {"small": 0.16, "large": 0.22}


def character_image(body: str, size: str, position: str, background: str, look: tuple[float, float]) -> Image.Image:
    """The "zqchar" creature: a round body, two big white eyes with black pupils looking `look`, and two feet."""
    side = SIZE * _SS
    image = Image.new("RGB", (side, side), COLORS[background])
    draw = ImageDraw.Draw(image)
    px, py = POSITIONS[position]
    cx, cy, r = px * side, py * side, _BODY[size] * side
    color = COLORS[body]
    feet = tuple(int(v * 0.6) for v in color)  # a darker shade, so the feet read as feet

    def ellipse(x, y, rx, ry, fill):
        draw.ellipse((cx + (x - rx) * r, cy + (y - ry) * r, cx + (x + rx) * r, cy + (y + ry) * r), fill=fill)

    for x in (-0.45, 0.45):
        ellipse(x, 0.9, 0.3, 0.2, feet)
    ellipse(0, 0, 1.0, 0.95, color)
    for x in (-0.4, 0.4):
        ellipse(x, -0.2, 0.32, 0.36, COLORS["white"])
        ellipse(x + look[0], -0.2 + look[1], 0.16, 0.16, _INK)
    draw.arc((cx - 0.25 * r, cy + 0.15 * r, cx + 0.25 * r, cy + 0.5 * r), 20, 160, fill=_INK, width=2 * _SS)
    return image.resize((SIZE, SIZE), Image.LANCZOS)


def make_character(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(202)
    bodies = [c for c in COLORS if c not in ("white", "black")]  # the eyes and pupils must stand out
    for i in range(COUNT):
        body = bodies[i % len(bodies)]  # every body colour at least once
        background = rng.choice([c for c in COLORS if c != body])
        size, position = rng.choice(list(_BODY)), rng.choice(list(POSITIONS))
        look = (rng.uniform(-0.1, 0.1), rng.uniform(-0.1, 0.1))
        image = character_image(body, size, position, background, look)
        # Caption what should stay changeable (colour, size, place, background), in the world's own words.
        text = caption(Scene([Obj("creature", body, size, position)], background))
        _save(out, i, image, "zqchar, " + text)


def main(out: Path) -> None:
    make_style(out / "style")
    make_character(out / "character")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "datasets")
    main(parser.parse_args().out)
