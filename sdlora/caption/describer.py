"""The tiny world's describer: reads a picture drawn in `sdlora/tiny/world.py`'s style (world renders, the example
datasets) with `sdlora/tiny/checker.py` and writes the world's caption for it, so drafting runs with no download."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from sdlora.tiny import checker, world

_TEXTURED = 0.1  # a background is textured when this share of its border is far from the border's median colour


class Describer:
    """`tiny-world`: background colour, and each object's size, colour, shape and place."""

    name = "tiny-world"
    modes = ("sentence", "tags")
    batch_size = 1

    def caption(self, images, mode: str) -> list[str]:
        return [describe(image, mode) for image in images]


def describe(image: Image.Image, mode: str = "sentence") -> str:
    """`a small red star at the top left on a blue background` (sentence) or `small red star, top left, blue
    background` (tags): the world's caption of what `checker.read_scene` reads. Textures and eyes are not named."""
    scene = checker.read_scene(_plain(image))
    if mode == "sentence":
        return world.caption(scene) if scene.objects else f"a {scene.background} background"
    tags = [t for o in scene.objects for t in (f"{o.size} {o.color} {o.shape}", o.position)]
    return ", ".join(dict.fromkeys(tags + [f"{scene.background} background"]))


def _plain(image: Image.Image) -> Image.Image:
    """The picture at the world's 64 px; on a textured background (the style example's hatching) also a 5 px median,
    which removes lines a pixel or two wide and keeps the shapes."""
    small = image.convert("RGB").resize((64, 64), Image.Resampling.BOX)
    pixels = np.asarray(small, dtype=np.float32)
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3)])
    far = np.linalg.norm(border - np.median(border, axis=0), axis=1) > 60
    return small.filter(ImageFilter.MedianFilter(5)) if far.mean() > _TEXTURED else small
