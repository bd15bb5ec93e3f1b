"""Does a LoRA trained on an example dataset carry its look? Train the README quickstart on each example dataset,
then score generations at strengths 0, 0.5 and 1 with the model-free scores in sdlora/tiny/checker.py.

    python bench/lora_effect.py [--steps N] [--prompts 24] [--runs /tmp/lora-effect] [--out docs/lora-effect.json]

Each dataset is trained by the quickstart command itself (`sdlora train datasets/NAME --base tiny --trigger T --out
RUN`, default settings unless --steps is given), timed from start to exit. Then, for held-out prompts led by the
trigger, one image per prompt and strength (25 steps, guidance 5, 64 px, seed = prompt index) is scored with the
dataset's score (`style_score` with the prompt, `character_score`), with the detail detectors (`hatching_score`,
`eye_pair_score`) and by whether the detail is there at all (`detail_present`). The same prompts without the trigger,
at strength 0 and 1, say how much the LoRA changes what it should leave alone. For scale, the same scores of the dataset's own images (at 64 px) and of their round trips
through the base model's autoencoder (the most any LoRA on this base can draw) are recorded too.

Writes the numbers as JSON (--out), a strength grid per dataset (docs/quickstart-NAME-grid.png, columns strength
0 / 0.5 / 1, rows seeds 0-2, the first prompt), the first 8 dataset images above their autoencoder round trips
(docs/quickstart-NAME-round-trip.png), and prints a summary.
"""

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdlora.generate import Previewer, grid
from sdlora.tiny import checker, world

ROOT = Path(__file__).resolve().parents[1]
DATASETS = {"style": "zkstyle", "character": "zqchar"}
STRENGTHS = (0.0, 0.5, 1.0)
STEPS, GUIDANCE = 25, 5.0  # as sdlora.tiny.eval


def score(name: str, image: Image.Image, prompt: str) -> float:
    """The dataset's own look, as far as the tiny model can draw it (see sdlora/tiny/checker.py)."""
    return checker.style_score(image, prompt) if name == "style" else checker.character_score(image)


def detail(name: str, image: Image.Image) -> float:
    """Whether the dataset's fine detail itself (hatch lines, eyes with pupils) is drawn."""
    return checker.hatching_score(image) if name == "style" else checker.eye_pair_score(image)


def prompts_for(name: str, trigger: str, n: int, seed: int = 12345) -> list[str]:
    """Held-out prompts in the world's words, each led by the trigger (the character replaces the shape)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        bg, color = rng.sample([c for c in world.COLORS if c not in ("white", "black")], 2)
        if name == "character":
            out.append(f"{trigger}, a {color} creature on a {bg} background")
        else:
            size, shape = rng.choice(["small", "large"]), rng.choice(world.SHAPES)
            out.append(f"{trigger}, a {size} {color} {shape} on a {bg} background")
    return out


def summary(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(v.mean()), 4), "sem": round(float(v.std(ddof=1) / np.sqrt(len(v))), 4),
            "per_image": [round(float(x), 4) for x in v]}


def measure(prev: Previewer, lora: str, name: str, prompts: list[str], strengths=STRENGTHS,
            steps: int = STEPS, guidance: float = GUIDANCE) -> dict:
    """Scores of one image per prompt (seed = its index) at each strength: {strength: {score, detail, present}},
    `present` the share of images that show the dataset's detail (checker.detail_present)."""
    out, images_at = {}, {}
    for s in strengths:
        prev.set_loras([(lora, s)])
        images = images_at[s] = prev.images(prompts, list(range(len(prompts))), steps=steps, guidance_scale=guidance)
        out[f"{s:g}"] = {"score": summary([score(name, im, p) for im, p in zip(images, prompts)]),
                         "detail": summary([detail(name, im) for im in images]),
                         "present": round(float(np.mean([checker.detail_present(name, im) for im in images])), 4)}
    return out, images_at


def without_trigger(prev: Previewer, lora: str, name: str, prompts: list[str], trigger: str) -> dict:
    """The same prompts with the trigger taken out, at strength 0 and 1: how much the LoRA changes what it should
    leave alone (the detail's presence and score, and the mean pixel change, 0-255)."""
    plain = [p.replace(f"{trigger}, ", "") for p in prompts]
    out, images = {}, {}
    for s in (0.0, 1.0):
        prev.set_loras([(lora, s)])
        images[s] = prev.images(plain, list(range(len(plain))), steps=STEPS, guidance_scale=GUIDANCE)
        out[f"{s:g}"] = {"score": summary([score(name, im, p) for im, p in zip(images[s], plain)]),
                         "present": round(float(np.mean([checker.detail_present(name, im) for im in images[s]])), 4)}
    out["mean_pixel_change"] = pixel_change(images[0.0], images[1.0])
    return out


def pixel_change(before: list[Image.Image], after: list[Image.Image]) -> float:
    """Mean absolute pixel difference (0-255) between two lists of images, pair by pair."""
    return round(float(np.mean([np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean()
                                for a, b in zip(before, after)])), 2)


@torch.no_grad()
def round_trip(vae, image: Image.Image) -> Image.Image:
    """Encode and decode through the base's autoencoder: what the best possible LoRA could make the model draw."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    x = x.to(vae.device, vae.dtype)
    y = vae.decode(vae.encode(x).latent_dist.mean).sample[0].float().clamp(-1, 1)
    return Image.fromarray(((y.permute(1, 2, 0) + 1) * 127.5).round().byte().cpu().numpy())


def references(prev: Previewer, name: str, picture: Path | None = None) -> dict:
    """Scores of the dataset's own images (at 64 px, as training sees them) and of their autoencoder round trips;
    `picture`: save the first 8 of each as two rows (dataset images on top, round trips below)."""
    files = sorted((ROOT / "datasets" / name).glob("*.png"))
    images = [Image.open(f).convert("RGB").resize((64, 64), Image.LANCZOS) for f in files]
    captions = [f.with_suffix(".txt").read_text().strip() for f in files]
    trips = [round_trip(prev.pipe.vae, im) for im in images]
    if picture:
        sheet = grid([images[:8], trips[:8]], [""] * 8)
        sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST).save(picture)
    return {kind: {"score": summary([score(name, im, c) for im, c in zip(group, captions)]),
                   "detail": summary([detail(name, im) for im in group]),
                   "present": round(float(np.mean([checker.detail_present(name, im) for im in group])), 4)}
            for kind, group in (("dataset", images), ("autoencoder_round_trip", trips))}


def load() -> float:
    return round(os.getloadavg()[0], 2)


def machine() -> dict:
    import diffusers

    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "platform": platform.platform()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=0, help="training steps; 0 = the CLI's default")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--runs", default="/tmp/lora-effect", help="where the training runs go (replaced)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "lora-effect.json"))
    ap.add_argument("--grids", default=str(ROOT / "docs"), help="folder for quickstart-NAME-grid.png ('' = none)")
    ap.add_argument("--datasets", default=",".join(DATASETS))
    args = ap.parse_args()
    results = {"machine": machine(), "generation": {"steps": STEPS, "guidance": GUIDANCE, "size": 64,
                                                     "scheduler": "EulerDiscreteScheduler", "prompts": args.prompts},
               "datasets": {}}
    for name in args.datasets.split(","):
        trigger = DATASETS[name]
        run = Path(args.runs) / name
        if run.exists():
            subprocess.run(["rm", "-rf", str(run)], check=True)
        run.parent.mkdir(parents=True, exist_ok=True)
        cmd = ["sdlora", "train", f"datasets/{name}", "--base", "tiny", "--trigger", trigger, "--out", str(run)] + \
              (["--steps", str(args.steps)] if args.steps else [])
        load_before = load()
        t0 = time.time()
        with open(str(run) + ".log", "w") as log:
            subprocess.run([sys.executable, "-m", "sdlora"] + cmd[1:], check=True, cwd=ROOT, stdout=log, stderr=log)
        train_s = time.time() - t0
        events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
        start = next(e for e in events if e["type"] == "start")
        losses = [e["loss_ema"] for e in events if e["type"] == "progress" and "loss_ema" in e]
        entry = {"command": " ".join(cmd), "steps": start["total_steps"], "batch_size": start["config"]["batch_size"],
                 "train_wall_s": round(train_s, 1), "load_before_train": load_before, "load_after_train": load(),
                 "final_loss_ema": round(losses[-1], 4) if losses else None}
        print(f"{name}: trained {entry['steps']} steps in {train_s:.0f} s "
              f"(load {load_before} -> {entry['load_after_train']})", flush=True)

        prev = Previewer("tiny", device="cpu")
        prev.pipe.set_progress_bar_config(disable=True)
        lora = str(run / "lora.safetensors")
        prompts = prompts_for(name, trigger, args.prompts)
        t1 = time.time()
        entry["strengths"], with_trigger = measure(prev, lora, name, prompts)
        entry["generate_wall_s"] = round(time.time() - t1, 1)
        entry["without_trigger"] = without_trigger(prev, lora, name, prompts, trigger)
        entry["with_trigger_mean_pixel_change"] = pixel_change(with_trigger[0.0], with_trigger[1.0])
        entry["load_after_generate"] = load()
        picture = Path(args.grids) / f"quickstart-{name}-round-trip.png" if args.grids else None
        entry["references"] = references(prev, name, picture)
        if picture:
            entry["round_trip_picture"] = {"file": picture.name,
                                           "rows": "dataset images at 64 px, then their round trips"}
        entry["prompts"] = prompts
        if args.grids:
            grid = prev.strength_grid(lora, prompts[0], STRENGTHS, (0, 1, 2), steps=STEPS, guidance_scale=GUIDANCE)
            path = Path(args.grids) / f"quickstart-{name}-grid.png"
            grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(path)
            entry["grid"] = {"file": path.name, "prompt": prompts[0], "columns": "strength 0, 0.5, 1",
                             "rows": "seeds 0, 1, 2"}
        results["datasets"][name] = entry
        s, r = entry["strengths"], entry["references"]
        print(f"{name}: score at 0 / 0.5 / 1 = " + " / ".join(f"{s[k]['score']['mean']:.3f}" for k in s) +
              f"; dataset {r['dataset']['score']['mean']:.3f}, "
              f"round trip {r['autoencoder_round_trip']['score']['mean']:.3f}; "
              f"detail at 1 {s['1']['detail']['mean']:.3f} (dataset {r['dataset']['detail']['mean']:.3f}, "
              f"round trip {r['autoencoder_round_trip']['detail']['mean']:.3f}); detail present at 0 / 0.5 / 1 = " +
              " / ".join(f"{s[k]['present']:.0%}" for k in s) +
              f" (round trips {r['autoencoder_round_trip']['present']:.0%}); without the trigger at 1: "
              f"{entry['without_trigger']['1']['present']:.0%}, pixel change "
              f"{entry['without_trigger']['mean_pixel_change']} (with it {entry['with_trigger_mean_pixel_change']})",
              flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
