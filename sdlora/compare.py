"""Side-by-side grids for picking a LoRA: strengths x seeds, and a run's saves x strengths, with labels."""

from __future__ import annotations

from PIL import Image, ImageDraw

from sdlora.generate import Previewer, grid


def strength_seed_grid(previewer: Previewer, lora: str, prompt: str, strengths, seeds, **kw) -> Image.Image:
    """Rows are seeds, columns strengths; the same seed in a row, so only the strength changes along it. Each
    column is drawn as one batch of seeds."""
    seeds = list(seeds)
    columns = []
    for s in strengths:
        previewer.set_loras([(lora, s)])
        columns.append([_readable(im) for im in previewer.images([prompt] * len(seeds), seeds, **kw)])
    rows = [list(row) for row in zip(*columns)]
    return _row_labels(grid(rows, [f"{s:g}" for s in strengths]), [f"seed {s}" for s in seeds])


def saves_grid(previewer: Previewer, saves: list[tuple[str, str]], prompt: str, strengths, seed: int,
               **kw) -> Image.Image:
    """Rows are the run's saves (label, file), columns strengths; one seed, so the rows show what training added."""
    rows = []
    for _, lora in saves:
        row = []
        for s in strengths:
            previewer.set_loras([(lora, s)])
            row.append(_readable(previewer.image(prompt, seed=seed, **kw)))
        rows.append(row)
    return _row_labels(grid(rows, [f"{s:g}" for s in strengths]), [label for label, _ in saves])


def _readable(image: Image.Image, min_side: int = 128) -> Image.Image:
    """Small images (the tiny model's 64 px) are blown up, pixels kept sharp, so a grid stays legible."""
    factor = -(-min_side // min(image.size))
    return image if factor <= 1 else image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def _row_labels(image: Image.Image, labels: list[str], width: int = 70) -> Image.Image:
    """Add a white column on the left with one label per row (rows share the height below the 14 px header)."""
    out = Image.new("RGB", (image.width + width, image.height), "white")
    out.paste(image, (width, 0))
    draw = ImageDraw.Draw(out)
    draw.text((3, 1), "strength", fill="black")
    row_h = (image.height - 14) / max(1, len(labels))
    for r, label in enumerate(labels):
        draw.text((3, 14 + r * row_h + row_h / 2 - 5), label, fill="black")
    return out
