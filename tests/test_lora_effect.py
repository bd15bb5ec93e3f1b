"""A LoRA trained on an example dataset carries its look, and strength blends it: a cheap version of
bench/lora_effect.py (docs/tiny-model.md, "Does a LoRA carry its look?").

The full measurement trains the quickstart (600 steps, UNet lr 5e-4, cosine) and scores 24 prompts at 25 steps;
here each dataset trains 120 steps at a constant 2e-3 and 10 prompts are drawn at 12 steps (about 30 s per
dataset on 2 CPU cores). The style is read by its hatching detector (the trigger alone, at strength 0, already
draws the base's dots, which the style score counts as ink), the character by its score; the bound is loose:
strength 1 must beat strength 0 by 0.03, where this run shows about 0.09 (style) and 0.37 (character).
"""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lora_effect", ROOT / "bench" / "lora_effect.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

pytestmark = pytest.mark.slow  # 120 steps on each example dataset


@pytest.fixture(scope="module")
def previewer():
    from sdlora.generate import Previewer

    prev = Previewer("tiny", device="cpu")
    prev.pipe.set_progress_bar_config(disable=True)
    return prev


# Seen on CPU with training seed 0 (the one used here), strength 0 / 0.5 / 1: style hatching 0.000 / 0.000 / 0.094;
# character score 0.008 / 0.215 / 0.381.
@pytest.mark.parametrize("name, measure, margin, present", [("style", "detail", 0.03, 0.6),
                                                            ("character", "score", 0.03, 0.0)])
def test_lora_carries_its_look_and_strength_blends_it(name, measure, margin, present, tmp_path, previewer):
    from sdlora.config import build_config
    from sdlora.train import train

    trigger = bench.DATASETS[name]
    config = build_config(dataset=str(ROOT / "datasets" / name), base="tiny", trigger=trigger, steps=120,
                          unet_lr=2e-3, lr_scheduler="constant", sample_every=120, save_every=120, sample_steps=1)
    lora = train(config, tmp_path / "run", progress_bar=False)
    scores, _ = bench.measure(previewer, str(lora), name, bench.prompts_for(name, trigger, 10), steps=12)
    s0, s_half, s1 = (scores[k][measure]["mean"] for k in ("0", "0.5", "1"))
    print(f"{name}: {measure} at strength 0 / 0.5 / 1 = {s0:.3f} / {s_half:.3f} / {s1:.3f}")
    assert s1 > s0 + margin, "at strength 1 the dataset's look is not there (or strength 0 already has it)"
    assert s0 - 0.005 <= s_half <= s1, "strength 0.5 does not fall between strengths 0 and 1"
    # the detail itself (the style's "/" hatching): in most images at strength 1, in none at 0
    assert scores["1"]["present"] >= present and scores["0"]["present"] == 0, (scores["0"]["present"],
                                                                              scores["1"]["present"])
