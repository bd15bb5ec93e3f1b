"""WD14-style taggers (SmilingWolf's wd-*-tagger models and their kind): an ONNX model run with onnxruntime and its
`selected_tags.csv`; tags over their thresholds, comma-separated, underscores turned to spaces."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
from PIL import Image

from sdlora.errors import UserError

RATING, GENERAL, CHARACTER = "9", "0", "4"  # the csv's category column
SIDE = 448  # the input side every SmilingWolf tagger takes (its input shape says so where it is fixed)
_WORD = re.compile(r"[^\W\d_]{2}")  # two letters in a row: a tag of words, not a face like ^_^ or o_o


class Tagger:
    """A WD14-style tagger in `folder` (an .onnx model and selected_tags.csv, columns tag_id,name,category,count;
    its rows in the order of the model's outputs)."""

    modes = ("tags",)

    def __init__(self, folder: Path, name: str, *, general_threshold: float, character_threshold: float,
                 batch_size: int = 0):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("a tagger needs onnxruntime", "pip install 'sdlora[caption]'") from None
        models = sorted(folder.glob("*.onnx"))
        if not models:
            raise UserError(f"no .onnx model in {folder}", "a tagger folder holds model.onnx and selected_tags.csv")
        self.name = name
        self.tags, self.categories = _read_tags(folder / "selected_tags.csv")
        self.thresholds = {GENERAL: general_threshold, CHARACTER: character_threshold}
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.model = ort.InferenceSession(str(folder / "model.onnx") if (folder / "model.onnx").is_file()
                                            else str(models[0]), providers=providers)
        put = self.model.get_inputs()[0]
        self.input = put.name
        self.side = put.shape[1] if isinstance(put.shape[1], int) else SIDE
        fixed = put.shape[0] if isinstance(put.shape[0], int) and put.shape[0] > 0 else 0  # some take one batch size
        self.batch_size = fixed or batch_size or (16 if "CUDAExecutionProvider" in providers else 4)

    def caption(self, images, mode: str = "tags") -> list[str]:
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = np.stack([prepare(image, self.side) for image in images[start:start + self.batch_size]])
            probs = self.model.run(None, {self.input: batch})[0]
            if probs.shape[-1] != len(self.tags):
                raise UserError(f"{self.name} gives {probs.shape[-1]} scores for {len(self.tags)} tags",
                                "use the selected_tags.csv that came with the model")
            out += [self._tags(p) for p in probs]
        return out

    def _tags(self, probs: np.ndarray) -> str:
        """Character tags over their threshold, then general ones, each most likely first; no rating."""
        found = [(self.categories[i] != CHARACTER, -float(p), self.tags[i]) for i, p in enumerate(probs)
                 if self.categories[i] in self.thresholds and p >= self.thresholds[self.categories[i]]]
        return ", ".join(tag for *_, tag in sorted(found))


def prepare(image: Image.Image, side: int = SIDE) -> np.ndarray:
    """A picture as these taggers take it (kohya-ss/sd-scripts finetune/tag_images_by_wd14_tagger.py does the same):
    padded to a square with white, resized to `side`, BGR, float32 0-255, height x width x channel."""
    image = image.convert("RGB")
    square = max(image.size)
    canvas = Image.new("RGB", (square, square), (255, 255, 255))
    canvas.paste(image, ((square - image.width) // 2, (square - image.height) // 2))
    canvas = canvas.resize((side, side), Image.Resampling.LANCZOS)
    return np.asarray(canvas, dtype=np.float32)[:, :, ::-1].copy()


def tag_text(name: str) -> str:
    """`long_hair` -> `long hair`; faces such as `^_^` and `o_o` stay as they are."""
    return name.replace("_", " ") if _WORD.search(name) else name


def _read_tags(path: Path) -> tuple[list[str], list[str]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return [tag_text(r["name"]) for r in rows], [r["category"].strip() for r in rows]
    except (OSError, KeyError, UnicodeDecodeError, csv.Error):
        raise UserError(f"{path} is not a tag list", "selected_tags.csv has the columns tag_id,name,category,count") \
            from None
