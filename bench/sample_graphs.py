"""Samples drawn during training with the UNet replayed as CUDA graphs against the same samples drawn eagerly.

sdlora.sampling.Sampler, as the training loop calls it, on the published architecture (random weights, LoRA added by
sdlora.step.build_step with its B matrices made non-zero so the adapter changes the output), two prompts at the
family's resolution, 25 Euler steps: seconds per round (median of `--rounds`, after a first round that captures the
graphs) and the difference between the two ways' images (0-255 scale), plus the peak GPU memory of each.

    python bench/sample_graphs.py --family sd1 [--rounds 3]       # on the GPU
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="sd1", choices=("sd1", "sdxl"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    from accelerate import Accelerator
    from full_size_check import build

    from sdlora.config import TrainConfig
    from sdlora.rundir import EventLog
    from sdlora.sampling import SampleGraphs, Sampler
    from sdlora.step import build_step

    acc = Accelerator(mixed_precision="bf16")
    pipe = build(args.family, "cpu")
    resolution = {"sd1": 512, "sdxl": 1024}[args.family]
    config = TrainConfig(dataset="-", steps=100, resolution=resolution)
    step = build_step(acc, pipe, config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    prompts = ["zxq, a yellow square on a green background", "zxq, a blue circle on a green background"]
    result = {"family": args.family, "resolution": resolution, "device": torch.cuda.get_device_name(),
              "torch": torch.__version__}
    images = {}
    for mode in ("eager", "graphs"):
        run_dir = Path(tempfile.mkdtemp(prefix=f"samples-{mode}-"))
        sampler = Sampler(acc, pipe, step.trained, config, prompts, resolution, run_dir, EventLog(run_dir),
                          SampleGraphs(pipe.unet, torch.bfloat16) if mode == "graphs" else None)
        graphs = sampler.graphs
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for r in range(args.rounds + 1):
            t = time.perf_counter()
            sampler(r)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        images[mode] = [np.asarray(Image.open(run_dir / "samples" / f"step-{args.rounds:06d}-{i}.png"), dtype=np.float64)
                        for i in range(len(prompts))]
        result[mode] = {"first_round_s": round(times[0], 3), "round_s": round(statistics.median(times[1:]), 3),
                        "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                        "captured": graphs.run.captured if graphs else 0,
                        "low_memory": sampler.low_memory}
        print(mode, result[mode], flush=True)
    diffs = [np.abs(a - b) for a, b in zip(images["eager"], images["graphs"])]
    result["mean_abs_diff_0_255"] = round(float(np.mean([d.mean() for d in diffs])), 4)
    result["max_abs_diff_0_255"] = round(float(max(d.max() for d in diffs)), 1)
    print(json.dumps(result), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
