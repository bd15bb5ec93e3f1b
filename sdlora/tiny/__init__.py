"""The embedded tiny base model: an SD1.x-family diffusers folder small enough to train on a laptop CPU.

`MODEL_DIR` is a standard diffusers folder: `StableDiffusionPipeline.from_pretrained(MODEL_DIR)` loads it with no
network. `scripts/make_tiny.py` writes it; `sdlora/tiny/NOTES.md` says how its weights were made.
"""

from pathlib import Path

MODEL_DIR = str(Path(__file__).parent / "model")
