"""The first steps of a fresh process, one by one: each batch shape's eager calls and CUDA graph capture, then replays.

A whole run pays these once per bucket shape; this times them with the GPU drained after each, in a fresh process
per attention setting (`torch`: torch's own order, which sdlora's step keeps, cuDNN's kernels first on an H200;
`flash`, `cudnn`, `efficient`: that backend's first, then cuDNN's). SD1.5 at 512, UNet + text-encoder LoRA, batch 8,
then a short batch of 6, as the whole run's square dataset gives. The settings alternate, twice each by default.

The first process on a machine pays about 12 s more: CUDA compiling, for this GPU, kernels that cuDNN generates at
run time, which it then keeps in ~/.nv/ComputeCache (on an H200: 12.1 s for the first batch-8 call on a fresh
machine, 2.5 s in the next process, 16 s with CUDA_CACHE_DISABLE=1; docs/benchmarks.md, Choices measured). Compare
processes that start with the same cache.

    python bench/warmup.py --out warmup.json [--backends torch flash] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def one(backend: str, steps: int, tiny: bool) -> dict:
    import torch

    from train_speed import Sdlora, attention_named, build, time_ids, timed, token_ids

    device = "cuda" if torch.cuda.is_available() else "cpu"
    family, px = ("tiny", 64) if tiny else ("sd1", 512)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = {"backend": backend, "device": device, "family": family, "calls": []}
    t = time.perf_counter()
    ours = Sdlora(build(family, device), True, 8, px, device)
    sync()
    out["build_s"] = time.perf_counter() - t
    ours.attention = attention_named(backend)

    def batch_of(batch: int) -> dict:
        """The step's inputs for `batch` random cached latents and captions."""
        g = torch.Generator().manual_seed(batch)
        mean = torch.randn(batch, 4, px // 8, px // 8, generator=g).to(device)
        std = torch.rand(batch, 4, px // 8, px // 8, generator=g).to(device) * 0.1
        gens = [torch.Generator().manual_seed(i) for i in range(batch)]
        return ours.inputs(mean, std, token_ids(ours.pipe, batch, device), time_ids(batch, px, device), gens=gens)

    def first_steps_then_steady() -> list[float]:
        for batch in (8, 6, 8, 6, 8, 6, 8, 6):  # two shapes: eager, eager, capture, replay each
            inputs = batch_of(batch)
            t = time.perf_counter()
            ours.step(inputs)
            sync()
            out["calls"].append({"batch": batch, "s": time.perf_counter() - t, "graphs": ours.step_fn.run.captured})
        inputs = batch_of(8)
        return timed(lambda: ours.step(inputs), steps, device)

    ms = first_steps_then_steady()
    out["steady_ms"] = sorted(ms)[len(ms) // 2]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--backends", nargs="+", default=["torch", "flash"], choices=["torch", "flash", "cudnn", "efficient"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test on the tests' small model")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one backend
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.steps, args.tiny)))
        return
    results = []
    for backend in args.backends * args.repeats:  # a fresh process each, the settings alternating
        proc = subprocess.run([sys.executable, __file__, "--out", args.out, "--one", backend, "--steps",
                               str(args.steps), *(["--tiny"] if args.tiny else [])],
                              capture_output=True, text=True, cwd=Path(__file__).parent)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        results.append(json.loads(lines[-1]) if lines else {"backend": backend, "error": proc.stderr[-2000:]})
        r = results[-1]
        if "calls" in r:
            print(f"{backend:8s} build {r['build_s']:.1f} s; calls (batch: s) "
                  + ", ".join(f"{c['batch']}: {c['s']:.2f}" for c in r["calls"]) + f"; steady {r['steady_ms']:.1f} ms")
        else:
            print(backend, "error", r["error"][-800:])
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
