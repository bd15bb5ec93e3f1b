"""Transformers image-to-text captioners (Florence-2 and BLIP models): the model's own processor and `generate`,
decoded to one sentence per picture; batched in bf16 on a GPU."""

from __future__ import annotations

import json
from pathlib import Path

from sdlora.errors import UserError, first_line

# model_type -> the text each picture is captioned with (None: the picture alone). Florence-2 takes a task token.
# Only these two are tested (tests/test_caption.py); another kind is one line here once it is.
PROMPTS = {"florence2": "<DETAILED_CAPTION>", "blip": None}
MAX_NEW_TOKENS = 75  # what CLIP's text encoder reads of a caption


class ImageToText:
    """A transformers image-to-text model in `folder` (config.json, weights, processor files)."""

    modes = ("sentence",)

    def __init__(self, folder: Path, name: str, batch_size: int = 0):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        if model_type not in PROMPTS:
            raise UserError(f"{name} is a {model_type} model, not a captioner sdlora runs",
                            f"use one of these kinds: {', '.join(PROMPTS)}, or a WD14 tagger")
        self.name, self.prompt = name, PROMPTS[model_type]
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = torch.bfloat16 if self.device == "cuda" else torch.float32  # CPUs are slow at bf16
        self.batch_size = batch_size or (16 if self.device == "cuda" else 4)
        try:
            self.processor = AutoProcessor.from_pretrained(folder)
            self.model = AutoModelForImageTextToText.from_pretrained(folder, dtype=self.dtype).to(self.device).eval()
        except (OSError, ValueError) as error:
            raise UserError(f"could not load captioner {name}: {first_line(error)}",
                            "download the whole model again, or give a folder with its processor files") from None

    def caption(self, images, mode: str = "sentence") -> list[str]:
        import torch

        out = []
        for start in range(0, len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[start:start + self.batch_size]]
            text = None if self.prompt is None else [self.prompt] * len(batch)
            inputs = self.processor(images=batch, text=text, return_tensors="pt").to(self.device, self.dtype)
            with torch.inference_mode():
                ids = self.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, num_beams=3, do_sample=False)
            out += [" ".join(t.split()) for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
        return out
