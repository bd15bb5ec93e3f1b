"""Measure how well a tiny base model follows prompts: generate for held-out prompts, score with the model-free checker.

    python -m sdlora.tiny.eval --model DIR --n 300 [--steps 25 --guidance 5 --json PATH --grid PATH]

Prompts are full single-object captions ("a small red star at the top left on a blue background") of scenes drawn
from seeds the pretraining pool never uses (`pretrain.EVAL_SEED_BASE`). Each image is scored by `checker.check` for
background colour, object colour and shape. Prints a summary and writes it, with every prompt's result, as JSON.
"""

import argparse
import json
import random
import time
from collections import defaultdict

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from sdlora.tiny import MODEL_DIR, checker, world

EVAL_SEED_BASE = 10**9  # same as pretrain.EVAL_SEED_BASE (not imported: that module pulls in scripts/)
TARGETS = {"background": 0.95, "object_color": 0.90, "shape": 0.80}


def heldout_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(EVAL_SEED_BASE + seed)
    return [world.caption(world.sample_scene(rng, max_objects=1)) for _ in range(n)]


def generate(pipe, prompts, seed, steps, guidance, size, batch):
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        generators = [torch.Generator("cpu").manual_seed(seed * 1_000_000 + start + i) for i in range(len(chunk))]
        images += pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                       generator=generators).images
    return images


def grid(images, cols=8, scale=2) -> Image.Image:
    side = images[0].width * scale
    rows = (len(images) + cols - 1) // cols
    out = Image.new("RGB", (cols * side, rows * side), "white")
    for i, im in enumerate(images):
        out.paste(im.resize((side, side), Image.NEAREST), ((i % cols) * side, (i // cols) * side))
    return out


def evaluate(model: str, n: int = 300, steps: int = 25, guidance: float = 5.0, size: int = 64, seed: int = 0,
             batch: int = 100, device: str = "cpu", scheduler: str = ""):
    """Generate for `n` held-out prompts and score them; returns (summary dict, per-prompt results, images).
    `scheduler`: a diffusers scheduler class to sample with instead of the model's own (its config kept)."""
    pipe = StableDiffusionPipeline.from_pretrained(model).to(device)
    if scheduler:
        import diffusers

        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts = heldout_prompts(n, seed)
    t = time.time()
    images = generate(pipe, prompts, seed, steps, guidance, size, batch)
    gen_s = time.time() - t
    results = [{"prompt": p, **checker.check(im, p)} for p, im in zip(prompts, images)]
    summary = {key: sum(r[f"{key}_ok"] for r in results) / n for key in TARGETS}
    per_shape = defaultdict(list)
    for r in results:
        per_shape[world.parse_prompt(r["prompt"])["shape"]].append(r["shape_ok"])
    summary.update(
        passed={key: summary[key] >= target for key, target in TARGETS.items()}, targets=TARGETS,
        shape_by_shape={s: round(sum(v) / len(v), 3) for s, v in sorted(per_shape.items())},
        n=n, steps=steps, guidance=guidance, size=size, seed=seed, model=str(model), device=str(device),
        dtype=str(pipe.unet.dtype), generate_s=round(gen_s, 1), scheduler=type(pipe.scheduler).__name__,
    )
    return summary, results, images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=MODEL_DIR, help="diffusers folder (default: the embedded tiny model)")
    ap.add_argument("--n", type=int, default=300, help="number of held-out prompts")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0, help="picks the held-out prompts and the generation noise")
    ap.add_argument("--batch", type=int, default=100, help="prompts per pipeline call")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scheduler", default="", help="sample with this diffusers scheduler class (default: the model's)")
    ap.add_argument("--json", help="write the summary and per-prompt results here")
    ap.add_argument("--grid", help="write the first 64 samples as an 8x8 PNG grid here (prompts in the JSON)")
    args = ap.parse_args()
    summary, results, images = evaluate(args.model, args.n, args.steps, args.guidance, args.size, args.seed,
                                        args.batch, args.device, args.scheduler)
    for key, target in TARGETS.items():
        print(f"{key:13s} {summary[key]:6.1%}  (target {target:.0%})  {'ok' if summary['passed'][key] else 'SHORT'}")
    print("shape by shape: " + ", ".join(f"{s} {v:.0%}" for s, v in summary["shape_by_shape"].items()))
    print(f"{args.n} prompts, {args.steps} steps, guidance {args.guidance}, {args.size} px, {summary['scheduler']}, {summary['dtype']} on "
          f"{summary['device']}, generation {summary['generate_s']} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "results": results}, f, indent=1)
    if args.grid:
        grid(images[:64]).save(args.grid)


if __name__ == "__main__":
    main()
