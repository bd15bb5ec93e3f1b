"""Data-parallel scaling of `sdlora train` on the GPUs of one host: 1 GPU x batch 8, 2 GPUs x batch 8, and
1 GPU x batch 16 (the same global batch as 2 x 8, for the loss curves), same code, same data, one call.

    python bench/multi_gpu.py --out DIR [--steps 300]      # on a 2-GPU machine: SD1.5 architecture at 512
    python bench/multi_gpu.py --out DIR --tiny             # CPU smoke test (2 processes over gloo, tiny model)

Writes DIR/results.json, DIR/loss.png (loss per step of 2 x B8 against 1 x B16) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ["HF_HUB_OFFLINE"] = "1"

from PIL import Image, ImageDraw  # noqa: E402

from sdlora.rundir import read_events  # noqa: E402


def images_per_s(events: list[dict], warmup: int = 10) -> float:
    """Throughput between the first progress event past `warmup` steps and the last one."""
    start = next(e for e in events if e["type"] == "start")
    progress = [e for e in events if e["type"] == "progress" and e["step"] >= warmup]
    first, last = progress[0], progress[-1]
    return (last["step"] - first["step"]) * start["global_batch"] / (last["time"] - first["time"])


def loss_plot(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """A small line plot drawn with Pillow (no plotting library needed)."""
    w, h, pad = 640, 360, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    points = [p for c in curves.values() for p in c]
    x_max = max(s for s, _ in points)
    lo, hi = min(v for _, v in points), max(v for _, v in points)
    colors = ["#d62728", "#1f77b4", "#2ca02c"]
    d.rectangle([pad, pad // 2, w - pad // 2, h - pad], outline="black")
    for n, (label, curve) in enumerate(curves.items()):
        xy = [(pad + (w - 1.5 * pad) * s / x_max, h - pad - (h - 1.5 * pad) * (v - lo) / (hi - lo + 1e-9))
              for s, v in curve]
        d.line(xy, fill=colors[n % 3], width=2)
        d.text((pad + 10, pad // 2 + 5 + 14 * n), label, fill=colors[n % 3])
    d.text((pad, h - pad + 5), f"step 0 .. {x_max}   loss (EMA) {lo:.3f} .. {hi:.3f}", fill="black")
    img.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from full_size_check import build, draw_dataset

    if args.tiny:
        base, resolution, batch = "tiny", 64, 2
    else:
        base, resolution, batch = str(out / "sd15"), 512, 8
        if not (out / "sd15" / "model_index.json").exists():
            build("sd1", "cpu").save_pretrained(base)
    # one bucket and 32 images: every batch of 8 or 16 is full, so each step of each run trains the same images per
    # GPU (with mixed aspect ratios one GPU trains short batches at each bucket's end that two GPUs top up)
    data = draw_dataset(out / "data-square", resolution, n=32, square=True)
    results = {"device": None, "runs": {}}
    for gpus, b in ((1, batch), (2, batch), (1, 2 * batch)):
        name = f"{gpus}x{b}"
        run = out / f"run-{name}"
        cmd = [sys.executable, "-m", "sdlora", "train", str(data), "--base", base, "--out", str(run), "--quiet",
               "--steps", str(args.steps), "--batch-size", str(b), "--no-auto-memory", "--sample-every", "100000",
               "--save-every", "100000", "--sample-steps", "10", "--gpus", str(gpus)]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.time() - t0
        if proc.returncode:
            print(proc.stderr[-3000:])
            raise SystemExit(f"{name} failed")
        events = read_events(run)
        start = next(e for e in events if e["type"] == "start")
        results["device"] = start["device"]
        results["runs"][name] = {
            "gpus": gpus, "batch_per_gpu": b, "global_batch": start["global_batch"], "wall_s": round(wall, 1),
            # past the first third: each bucket shape's first calls (eager, then the CUDA graph capture) are over
            "images_per_s": round(images_per_s(events, warmup=args.steps // 3), 2),
            "peak_memory_gb": max(e.get("memory_gb", 0) for e in events if e["type"] == "progress"),
            "loss_ema": [(e["step"], e["loss_ema"]) for e in events if e["type"] == "progress"]}
        print(name, {k: v for k, v in results["runs"][name].items() if k != "loss_ema"}, flush=True)
    r = results["runs"]
    results["speedup_2_vs_1"] = round(r[f"2x{batch}"]["images_per_s"] / r[f"1x{batch}"]["images_per_s"], 3)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    loss_plot({f"2 GPUs x B{batch}": r[f"2x{batch}"]["loss_ema"], f"1 GPU x B{2 * batch}": r[f"1x{2 * batch}"]["loss_ema"]},
              out / "loss.png")
    print("| run | global batch | images/s | peak GB | wall s |\n|---|---|---|---|---|")
    for name, v in r.items():
        print(f"| {name} | {v['global_batch']} | {v['images_per_s']} | {v['peak_memory_gb']} | {v['wall_s']} |")
    print(f"2 GPUs / 1 GPU at B{batch} per GPU: {results['speedup_2_vs_1']}x")


if __name__ == "__main__":
    main()
