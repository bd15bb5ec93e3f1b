"""Quantized-base LoRA training on a GPU: peak memory and speed per --base-precision, and the loss next to bf16's.

Everything here runs the step `sdlora train` runs, through sdlora's own code: `sdlora.step.build_step` with a
TrainConfig(base_precision=..., gradient_checkpointing=True (False for int8, whose bitsandbytes layers break
torch.utils.checkpoint on CUDA: sdlora refuses that pair), batch_size=1, train_text_encoder=True, sdlora's other
defaults) under an accelerate Accelerator (bf16 on the GPU). build_step puts the VAE (fp32) and the base (bf16) on the
GPU, stores the base in the precision asked for (`sdlora.quantize.quantize_base`; gradient checkpointing is forced for an
fp8 or nf4 base), adds fp32 LoRAs on the UNet and text encoder(s) (rank 16 on attention, initialised from the config's
seed), makes fused AdamW and the cosine schedule, and on a GPU replays the forward+backward as a CUDA graph
(sdlora.graphs) where that captures; the result says whether it did. Each step gets what the training loop feeds it:
a cached latent distribution (mean, std), noise and timestep from `sdlora.batches.step_randomness`, and the captions' token ids.

1. Memory and speed. For SD1.5 at 512 and SDXL at 1024 (the published architectures with random weights, built from
   the configs in sdlora/configs: nothing is downloaded) and each base precision (bf16 = `auto`, fp8, and int8/nf4
   where bitsandbytes is installed): `--steps` steps under a memory cap (torch.cuda.set_per_process_memory_fraction:
   4 GiB for SD1.5, 8 GiB for SDXL). Reported: whether it fits, the peak (torch.cuda.max_memory_allocated, loading
   included), the median ms/step (CUDA-synchronised) and what the base weights take (sdlora.quantize.stored_bytes,
   LoRA parameters not counted).
2. Loss. SD1.5 trains `--loss-steps` steps with the bf16 base and with each quantized one: the same LoRA init, data
   (8 random latents, 8 captions), noise and timesteps at every step; the loss is sdlora's (Min-SNR-5 weighted MSE
   against the noise); the curves go to the JSON and a summary of how far apart they are to stdout.

    python bench/quant_memory.py --out quant.json                 # on the GPU: a few minutes
    python bench/quant_memory.py --smoke --out /tmp/smoke.json    # the same code on a CPU with the tiny model
    python bench/quant_memory.py --plot quant.json --png docs/quant-loss.png   # the loss plot (needs matplotlib)

The cap counts PyTorch's allocations only; a real card also holds the CUDA context (~0.5 GB).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]  # full_size_check needs tests/

import torch  # noqa: E402

RESOLUTION = {"sd1": 512, "sdxl": 1024}
CAP_GIB = {"sd1": 4, "sdxl": 8}
CAPTIONS = ["a red circle on a blue background", "a green square", "a photo of a cat", "zxq, a yellow star",
            "a watercolor landscape", "a portrait of a woman", "a city street at night", "a bowl of fruit"]


def checkpointing(precision: str) -> bool:
    """What sdlora trains each base precision with here: checkpointing on, except int8 (TrainConfig.validate refuses it)."""
    return precision != "int8"


def log(*args):
    print(*args, flush=True)


def bitsandbytes_version() -> str | None:
    try:
        import bitsandbytes

        return bitsandbytes.__version__
    except ImportError:
        return None


# --- models -----------------------------------------------------------------------------------------------------

def build(arch: str, device: str):
    """The published architecture with random weights (bench/full_size_check.py builds it on `device`), as a pipeline
    on the CPU: UNet and text encoders in bf16, the VAE in fp32. Each run trains a deep copy of it. build_step
    trains with DDPM whatever scheduler the pipeline carries."""
    from full_size_check import build as build_full

    pipe = build_full(arch, device)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to("cpu", torch.float32 if name == "vae" else torch.bfloat16)
    return pipe


def tiny():
    from sdlora.models import load_base

    return load_base("tiny").pipe


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


# --- one training setup: sdlora's own step ------------------------------------------------------------------------

class Run:
    """A fresh copy of the master pipeline trained by `sdlora.step.build_step`, as `sdlora train` sets it up."""

    def __init__(self, master, precision: str, resolution: int, steps: int, cuda: bool, graphs: bool):
        from accelerate import Accelerator

        from sdlora.config import TrainConfig
        from sdlora.quantize import stored_bytes
        from sdlora.step import build_step

        self.config = TrainConfig(dataset="-", base_precision="auto" if precision == "bf16" else precision,
                                  gradient_checkpointing=checkpointing(precision), batch_size=1,
                                  resolution=resolution, steps=steps,
                                  train_text_encoder=True, cuda_graphs=graphs)
        self.config.validate()  # as `sdlora train` does first: a mode this machine cannot run stops here
        self.accelerator = Accelerator(mixed_precision="bf16" if cuda else "no", cpu=not cuda)
        self.pipe = copy.deepcopy(master)  # build_step moves, quantizes and adapts the models in place
        self.fails = []
        self.step_fn = build_step(self.accelerator, self.pipe, self.config, on_fail=self.fails.append)
        self.note = self.step_fn.base_storage

        def base_gb(models, lora) -> float:  # the frozen base as stored, without the LoRA parameters
            return round((sum(stored_bytes(m) for m in models) - sum(p.numel() * p.element_size() for p in lora))
                         / 1e9, 3)

        self.stored_gb = {"unet": base_gb([self.pipe.unet], self.step_fn.unet_params),  # the text encoders train here
                          "text_encoders": base_gb(self.step_fn.text_encoders, self.step_fn.te_params)}

    def step(self, inputs: dict) -> torch.Tensor:
        """One optimizer update; the loss as a tensor on the device (not read: that would wait for the GPU)."""
        return self.step_fn([inputs])

    def graph_status(self) -> str:
        if self.fails:
            e = self.fails[0]
            return f"eager ({type(e).__name__}: {str(e)[:160]})"
        return "captured" if self.step_fn.run.captured else "eager"

    def lora(self) -> torch.Tensor:
        return torch.cat([p.detach().float().flatten().cpu() for p in self.step_fn.params])


def make_inputs(master, resolution: int, steps: int, device, seed: int = 0) -> list[dict]:
    """Per step, the dict `Step.loss_and_grads` takes, as sdlora's training loop builds it: one of 8 fixed random
    latents (a cached latent distribution: mean = latent / scaling factor, std 0) with its caption's token ids, and
    that step's eps, noise and timestep from `sdlora.batches.step_randomness`, drawn from a generator seeded by (seed, step);
    a function of (seed, step) only, so every precision sees the same."""
    from sdlora.batches import step_randomness, token_ids
    from sdlora.objectives import DDPM

    gen = torch.Generator().manual_seed(seed)
    side = resolution // 8
    mean = (torch.randn(8, 1, 4, side, side, generator=gen) / master.vae.config.scaling_factor).to(device)
    std = torch.zeros(1, 4, side, side, device=device)
    tokenizers = [master.tokenizer] + ([master.tokenizer_2] if is_sdxl(master) else [])
    objective = DDPM(master.scheduler.config)
    ids = [[token_ids(tok, [c], device) for c in CAPTIONS] for tok in tokenizers]
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32,
                            device=device)
    out = []
    for k in range(steps):
        i = k % 8
        item = {"mean": mean[i], "std": std,
                **step_randomness(mean[i].shape[1:], [torch.Generator().manual_seed(seed * 1_000_003 + k)], objective,
                                   device)}
        if is_sdxl(master):
            item["time_ids"] = time_ids
        item.update({f"ids_{j}": enc[i] for j, enc in enumerate(ids)})
        out.append(item)
    return out


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- the two measurements ---------------------------------------------------------------------------------------

def memory_and_speed(master, arch: str, precision: str, args, device) -> dict:
    cuda = device.type == "cuda"
    resolution = args.resolution or RESOLUTION[arch]
    cap = CAP_GIB[arch] * 2**30
    result = {"family": arch, "resolution": resolution, "precision": precision, "batch_size": 1,
              "gradient_checkpointing": checkpointing(precision), "cap_gib": CAP_GIB[arch] if cuda else None}
    run = None
    inputs = make_inputs(master, resolution, args.steps, device)
    free(device)
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
        torch.cuda.reset_peak_memory_stats(device)
    t0, stage = time.perf_counter(), "setup"
    try:
        run = Run(master, precision, resolution, args.steps, cuda, args.graphs)
        stage = "training"
        result.update(note=run.note, stored_gb=run.stored_gb, setup_s=round(time.perf_counter() - t0, 1))
        if cuda:  # the base loaded in bf16, then quantized, the LoRAs and optimizer made: the peak before training
            result["peak_setup_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            torch.cuda.reset_peak_memory_stats(device)
        times, losses = [], []
        for item in inputs:
            sync(device)
            t = time.perf_counter()
            losses.append(run.step(item))
            sync(device)
            times.append(time.perf_counter() - t)
        losses = torch.stack(losses).tolist()  # read once, after the timed steps
        measured = times[args.warmup:] or times
        result.update(fits=True, ms_per_step=round(1000 * statistics.median(measured), 1),
                      steps=len(times), cuda_graph=run.graph_status(),
                      loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4),
                      finite=all(math.isfinite(v) for v in losses))
    except torch.cuda.OutOfMemoryError as e:
        result.update(fits=False, failed_in=stage,
                      error=f"out of memory under the {CAP_GIB[arch]} GiB cap: {str(e).splitlines()[0][:200]}")
    except Exception as e:  # a mode that fails here is a result too; the other modes go on
        result.update(fits=False, failed_in=stage, error=f"{type(e).__name__}: {str(e)[:300]}")
    finally:
        if cuda:
            peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if "peak_setup_gb" in result:
                result["peak_train_gb"] = peak
            result["peak_gb"] = max(peak, result.get("peak_setup_gb", 0))
            # what the caching allocator held from the driver at most (since setup): what the cap limits
            result["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
        del run, inputs
        free(device)
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    return result


def loss_curves(master, precisions: list[str], args, device) -> dict:
    from sdlora.config import TrainConfig

    defaults = TrainConfig()
    resolution = args.resolution or RESOLUTION["sd1"]
    items = make_inputs(master, resolution, args.loss_steps, device, seed=1)
    out = {"family": "sd1", "model": "tiny" if args.smoke else "SD1.5 (random weights)", "resolution": resolution,
           "steps": args.loss_steps, "batch_size": 1,
           "gradient_checkpointing": {p: checkpointing(p) for p in precisions},
           "lr": {"unet": defaults.unet_lr, "text_encoder": defaults.text_encoder_lr,
                  "schedule": f"{defaults.lr_scheduler}, warmup {defaults.warmup_fraction:g} of the steps"},
           "loss": f"sdlora's: MSE against the noise, Min-SNR-{defaults.min_snr_gamma:g} weighted", "curves": {},
           "ms_per_step": {}, "errors": {}}
    loras = {}
    for precision in precisions:
        free(device)
        run = None
        try:
            run = Run(master, precision, resolution, args.loss_steps, device.type == "cuda", args.graphs)
            losses, t0 = [], time.perf_counter()
            for item in items:
                losses.append(run.step(item))
            losses = torch.stack(losses).tolist()  # waits for the last step
            out["ms_per_step"][precision] = round(1000 * (time.perf_counter() - t0) / len(items), 1)
            out["curves"][precision] = [round(v, 5) for v in losses]
            out.setdefault("cuda_graph", {})[precision] = run.graph_status()
            loras[precision] = run.lora()
            log(f"  loss {precision}: first {losses[0]:.4f}, last {losses[-1]:.4f}")
        except Exception as e:
            out["errors"][precision] = f"{type(e).__name__}: {str(e)[:300]}"
            log(f"  loss {precision} failed: {out['errors'][precision]}")
        finally:
            del run
    del items
    ref = out["curves"].get("bf16")
    out["summary"] = {}
    for precision, curve in out["curves"].items():
        if precision == "bf16" or ref is None or len(curve) != len(ref):
            continue
        diffs = [abs(a - b) for a, b in zip(curve, ref)]
        out["summary"][precision] = {
            "mean_abs_diff": round(statistics.fmean(diffs), 5),
            "mean_abs_diff_relative": round(statistics.fmean(diffs) / statistics.fmean(ref), 4),
            "ema_last": round(ema(curve)[-1], 5), "bf16_ema_last": round(ema(ref)[-1], 5),
            "first_20_mean": round(statistics.fmean(curve[:20]), 5),
            "last_20_mean": round(statistics.fmean(curve[-20:]), 5),
            "bf16_last_20_mean": round(statistics.fmean(ref[-20:]), 5),
            # how far the trained LoRA weights ended from the bf16 run's, relative to their size
            "lora_relative_diff": round(float((loras[precision] - loras["bf16"]).norm() / loras["bf16"].norm()), 4),
        }
    return out


def ema(values, beta: float = 0.9) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else beta * acc + (1 - beta) * v
        out.append(acc)
    return out


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def table(rows: list[dict]) -> str:
    lines = ["| model | base precision | fits | peak GPU memory | ms/step | base weights (UNet + TE) | CUDA graph |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        stored = r.get("stored_gb")
        weights = f"{stored['unet']} + {stored['text_encoders']} GB" if stored else "-"
        fits = "yes" if r.get("fits") else "NO"
        lines.append(f"| {r['family']} @ {r['resolution']} | {r['precision']} | {fits} (cap {r.get('cap_gib')} GiB) | "
                     f"{r.get('peak_gb', '-')} GiB | {r.get('ms_per_step', '-')} | {weights} | "
                     f"{r.get('cuda_graph', r.get('error', '-'))[:60]} |")
    return "\n".join(lines)


def plot(results_file: str, png: str) -> None:
    """Top: each run's loss (faint: per step; bold: EMA 0.95). Bottom: each quantized run's loss minus the bf16
    run's at the same step (same noise and timestep, so the per-step difference is what the base's storage did)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(results_file).read_text())["loss"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), dpi=120, sharex=True,
                                      gridspec_kw={"height_ratios": [2, 1]})
    colors = {"bf16": "black", "fp8": "tab:blue", "int8": "tab:green", "nf4": "tab:red"}
    ref = data["curves"].get("bf16")
    for precision, curve in data["curves"].items():
        color = colors.get(precision)
        top.plot(curve, color=color, alpha=0.15, linewidth=0.8)
        top.plot(ema(curve, 0.95), color=color, linewidth=1.8, label=f"{precision} base")
        if ref is not None and precision != "bf16":
            bottom.plot([a - b for a, b in zip(curve, ref)], color=color, linewidth=0.9, label=f"{precision} - bf16")
    top.set_ylabel("loss (MSE); bold: EMA 0.95")
    top.set_title(f"LoRA training on a {data.get('model', data['family'])} base stored in each precision\n"
                  f"same LoRA init, data, noise and timesteps ({data['resolution']} px, batch {data['batch_size']})",
                  fontsize=9)
    top.legend()
    bottom.axhline(0, color="black", linewidth=0.6)
    bottom.set_ylabel("loss difference")
    bottom.set_xlabel("step")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(png)
    print(png)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="results JSON to write")
    ap.add_argument("--smoke", action="store_true", help="CPU, the tiny model at 64 px, few steps")
    ap.add_argument("--families", nargs="+", default=["sd1", "sdxl"], choices=sorted(RESOLUTION))
    ap.add_argument("--precisions", nargs="+", default=["bf16", "fp8", "nf4", "int8"])
    ap.add_argument("--steps", type=int, default=20, help="steps per memory/speed run")
    ap.add_argument("--warmup", type=int, default=4, help="first steps left out of the median (warmup, capture)")
    ap.add_argument("--loss-steps", type=int, default=200)
    ap.add_argument("--loss-precisions", nargs="+", default=["bf16", "fp8", "nf4"])
    ap.add_argument("--resolution", type=int, default=0, help="override the families' resolution")
    ap.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True,
                    help="replay the step as a CUDA graph, as sdlora's loop does (GPU only)")
    ap.add_argument("--budget-s", type=float, default=400,
                    help="skip what is left after this many seconds (a safety net)")
    ap.add_argument("--plot", metavar="RESULTS_JSON", help="instead: draw the loss curves of a results file")
    ap.add_argument("--png", default="docs/quant-loss.png")
    args = ap.parse_args()
    if args.plot:
        return plot(args.plot, args.png)
    if not args.out:
        ap.error("--out is required")
    started = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.smoke
    # an explicit index: torch.cuda.set_per_process_memory_fraction refuses a bare "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if args.smoke:
        args.families, args.resolution = ["sd1"], 64
        args.steps, args.warmup, args.loss_steps = min(args.steps, 4), 1, min(args.loss_steps, 10)
    args.graphs = args.graphs and cuda
    bnb = bitsandbytes_version()
    precisions = [p for p in args.precisions if bnb or p not in ("int8", "nf4")]
    loss_precisions = [p for p in args.loss_precisions if bnb or p not in ("int8", "nf4")]
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
               "bitsandbytes": bnb, "smoke": args.smoke, "memory": [], "loss": None, "skipped": []}
    if not bnb:
        msg = "bitsandbytes is not installed: int8 and nf4 are skipped (pip install bitsandbytes to measure them)"
        log(msg)
        results["skipped"].append(msg)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(results, indent=2))

    masters = {}
    for arch in args.families:  # SD1.5 first: its memory runs and the loss curves, then SDXL
        t0 = time.perf_counter()
        masters[arch] = tiny() if args.smoke else build(arch, "cuda" if cuda else "cpu")
        free(device)
        log(f"{arch}: built in {time.perf_counter() - t0:.1f} s")
        for precision in precisions:
            if time.perf_counter() - started > args.budget_s:
                results["skipped"].append(f"{arch} {precision}: time budget")
                continue
            r = memory_and_speed(masters[arch], arch, precision, args, device)
            results["memory"].append(r)
            log(json.dumps(r))
            save()
        if arch == "sd1" and len(loss_precisions) > 1:
            if time.perf_counter() - started > args.budget_s:
                results["skipped"].append("loss curves: time budget")
            else:
                log(f"loss curves, {args.loss_steps} steps: {', '.join(loss_precisions)}")
                results["loss"] = loss_curves(masters["sd1"], loss_precisions, args, device)
                log(json.dumps(results["loss"]["summary"], indent=2))
                save()
        del masters[arch]
        free(device)
    results["total_s"] = round(time.perf_counter() - started, 1)
    save()
    log(table(results["memory"]))
    log(f"total {results['total_s']} s; wrote {out}")


if __name__ == "__main__":
    main()
