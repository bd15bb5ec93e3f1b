"""Does a LoRA trained on an example dataset carry its look? Train the README quickstart on each example dataset,
then score generations at strengths 0, 0.5 and 1 with the model-free metrics in sdlora/tiny/checker.py.

    python bench/lora_effect.py [--steps N] [--prompts 24] [--out docs/lora-effect.json]

Writes the numbers as JSON, a strength grid per dataset (docs/quickstart-<name>-grid.png) and prints a table.
"""

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sdlora.generate import Previewer
from sdlora.tiny import checker, world

DATASETS = {"style": ("zkstyle", checker.style_score), "character": ("zqchar", checker.character_score)}


def prompts_for(name: str, trigger: str, n: int, seed: int = 12345) -> list[str]:
    """Held-out prompts in the world's words, each led by the trigger (the character replaces the shape)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        bg, color = rng.sample([c for c in world.COLORS if c not in ("white", "black")], 2)
        if name == "character":
            out.append(f"{trigger}, a {color} creature on a {bg} background")
        else:
            out.append(f"{trigger}, a {rng.choice(['small', 'large'])} {color} {rng.choice(world.SHAPES)} on a {bg} background")
    return out


def measure(run_dir: Path, name: str, n_prompts: int, strengths=(0.0, 0.5, 1.0)) -> dict:
    trigger, score = DATASETS[name]
    prev = Previewer("tiny", device="cpu")
    lora = str(run_dir / "lora.safetensors")
    scores = {}
    for s in strengths:
        prev.set_loras([(lora, s)])
        scores[s] = [score(prev.image(p, seed=i, steps=25, guidance_scale=5.0))
                     for i, p in enumerate(prompts_for(name, trigger, n_prompts))]
    return {str(s): float(np.mean(v)) for s, v in scores.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=0, help="0 = the CLI's default")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--runs", default="runs/lora-effect")
    ap.add_argument("--out", default="docs/lora-effect.json")
    args = ap.parse_args()
    results = {}
    for name, (trigger, _) in DATASETS.items():
        run = Path(args.runs) / name
        cmd = [sys.executable, "-m", "sdlora", "train", f"datasets/{name}", "--base", "tiny", "--trigger", trigger,
               "--out", str(run), "--quiet"] + (["--steps", str(args.steps)] if args.steps else [])
        t0 = time.time()
        subprocess.run(cmd, check=True)
        train_s = time.time() - t0
        results[name] = {"train_wall_s": round(train_s, 1), "scores": measure(run, name, args.prompts)}
        prev = Previewer("tiny", device="cpu")
        prompt = prompts_for(name, trigger, 1)[0]
        prev.strength_grid(str(run / "lora.safetensors"), prompt, (0.0, 0.5, 1.0), (0, 1, 2),
                           steps=25, guidance_scale=5.0).resize((3 * 128, 3 * 128 + 28)).save(
            Path(args.out).parent / f"quickstart-{name}-grid.png")
        print(name, results[name], flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
