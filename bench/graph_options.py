"""Do the training options run under the CUDA-graph step, and train as the eager step does?

For each option (masked loss with regularisation pictures, Prodigy, schedule-free AdamW, Adafactor, EMA, debiased
estimation with a timestep range, clip skip, v-prediction with a zero-terminal-SNR schedule, and plain AdamW for
reference) the tiny base trains the same short run twice on one
GPU, with `cuda_graphs` on and off, same seed, through sdlora's own entry point. Recorded per run: how many step
graphs were captured (0 = the step ran eagerly), any warning, the wall time, and every step's loss; compared: the
largest per-step loss difference between the two runs, relative to the loss.

    python bench/graph_options.py --out results.json [--steps 40] [--cases NAME ...]

The dataset is datasets/character at the tiny model's 64 px; for the masked case half its pictures get a mask (the
left half of the picture), and regularisation pictures are plain world scenes (sdlora.tiny.world).
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdlora.config import build_config
from sdlora.tiny import world
from sdlora.train import train

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "adamw (reference)": {},
    "masked loss + reg pictures": {"masked_loss": True, "prior_loss_weight": 0.5},
    "prodigy": {"optimizer": "prodigy"},
    "adamw-schedulefree": {"optimizer": "adamw-schedulefree"},
    "adafactor": {"optimizer": "adafactor"},
    "ema": {"ema_decay": 0.99},
    "debiased + timestep range": {"debiased_estimation": True, "timestep_min": 200, "timestep_max": 900},
    "clip skip 2": {"clip_skip": 2},
    # the tiny base predicts epsilon; trained as v-prediction with a zero-terminal-SNR schedule, it runs that code path
    "v-prediction, zero terminal SNR": {"prediction_type": "v_prediction", "zero_terminal_snr": "on"},
}


def make_data(root: Path) -> tuple[Path, Path, Path]:
    plain = root / "plain"
    shutil.copytree(ROOT / "datasets" / "character", plain)
    masked = root / "masked"
    shutil.copytree(plain, masked)
    for i, picture in enumerate(sorted(masked.glob("*.png"))):
        if i % 2 == 0:
            mask = np.zeros((128, 128), dtype=np.uint8)
            mask[:, :64] = 255
            Image.fromarray(mask).save(picture.with_name(picture.stem + "_mask.png"))
    reg = root / "reg"
    reg.mkdir()
    images, captions = world.make_batch(12, seed=5, patterns=False)
    for i, (image, text) in enumerate(zip(images, captions)):
        image.save(reg / f"{i:02d}.png")
        (reg / f"{i:02d}.txt").write_text(text)
    return plain, masked, reg


def run(name: str, options: dict, graphs: bool, data: tuple, steps: int, work: Path) -> dict:
    plain, masked, reg = data
    extra = dict(options)
    if extra.get("masked_loss"):
        extra.update(dataset=str(masked), reg_data=str(reg))
    config = build_config(dataset=str(extra.pop("dataset", plain)), base="tiny", trigger="zqchar", steps=steps,
                          batch_size=4, seed=0, cuda_graphs=graphs, sample_every=steps, save_every=steps, **extra)
    run_dir = work / f"{len(list(work.iterdir())):02d}"
    t = time.perf_counter()
    train(config, run_dir, progress_bar=False)
    wall = time.perf_counter() - t
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    progress = [e for e in events if e.get("type") == "progress"]
    return {
        "case": name, "cuda_graphs": graphs, "wall_s": round(wall, 1),
        "graphs_captured": max((e.get("graphs", 0) for e in progress), default=0),
        "warnings": [e.get("message") for e in events if e.get("type") == "warning"],
        "losses": {e["step"]: e["loss"] for e in progress},
        "done": any(e.get("type") == "done" for e in events),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--cases", nargs="*", default=list(CASES), help="a subset of: " + ", ".join(CASES))
    args = ap.parse_args()
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "steps": args.steps, "runs": [], "compare": {}}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp))
        work = Path(tmp) / "runs"
        work.mkdir()
        for name in args.cases:
            options = CASES[name]
            pair = [run(name, options, graphs, data, args.steps, work) for graphs in (True, False)]
            results["runs"] += pair
            steps = sorted(set(pair[0]["losses"]) & set(pair[1]["losses"]))
            diffs = [abs(pair[0]["losses"][s] - pair[1]["losses"][s]) / max(abs(pair[1]["losses"][s]), 1e-8)
                     for s in steps]
            results["compare"][name] = {
                "graphs_captured": pair[0]["graphs_captured"], "steps_compared": len(steps),
                "max_rel_loss_diff": round(max(diffs), 4) if diffs else None,
                "median_rel_loss_diff": round(float(np.median(diffs)), 4) if diffs else None,
                "wall_s_graphs_vs_eager": [pair[0]["wall_s"], pair[1]["wall_s"]],
                "warnings_with_graphs": pair[0]["warnings"],
            }
            print(name, json.dumps(results["compare"][name]), flush=True)
            Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
