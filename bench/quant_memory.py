"""Quantized-base LoRA training on a GPU: peak memory and speed per --base-precision, and the loss next to bf16's.

1. Memory and speed. For SD1.5 at 512 and SDXL at 1024 (the published architectures with random weights, built from
   the configs in sdlora/configs: nothing is downloaded) and each base precision (bf16 = `auto`, fp8, and int8/nf4
   where bitsandbytes is installed): set up as sdlora's training loop does (VAE fp32 and the base in bf16 on the
   GPU, then `sdlora.quantize.quantize_base`, then fp32 LoRAs on the UNet and text encoder(s) at the defaults, rank 16
   on attention), then train `--steps` steps at batch 1 with gradient checkpointing, random latents, under a memory
   cap (torch.cuda.set_per_process_memory_fraction: 4 GiB for SD1.5, 8 GiB for SDXL). Reported: whether it fits,
   the peak (torch.cuda.max_memory_allocated, loading included), the median ms/step (CUDA-synchronised) and what
   the base weights take. The step is replayed as a CUDA graph as sdlora's loop does (sdlora.graphs) where that
   captures; the result says whether it did.
2. Loss. SD1.5 trains `--loss-steps` steps with the bf16 base and with each quantized one: the same LoRA init, data
   (8 random latents, 8 captions), noise and timesteps at every step; the curves go to the JSON and a summary of how
   far apart they are to stdout.

    python bench/quant_memory.py --out quant.json                 # on the GPU: about 4 minutes
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
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

RESOLUTION = {"sd1": 512, "sdxl": 1024}
CAP_GIB = {"sd1": 4, "sdxl": 8}
CAPTIONS = ["a red circle on a blue background", "a green square", "a photo of a cat", "zxq, a yellow star",
            "a watercolor landscape", "a portrait of a woman", "a city street at night", "a bowl of fruit"]


def log(*args):
    print(*args, flush=True)


def bitsandbytes_version() -> str | None:
    try:
        import bitsandbytes

        return bitsandbytes.__version__
    except ImportError:
        return None


# --- models -----------------------------------------------------------------------------------------------------

def build(arch: str, device: str) -> dict:
    """The published architecture from sdlora's shipped configs, random weights, as a dict of bf16 CPU modules
    (built on `device` in fp32, the way from_config initialises it, then moved)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sdlora.models import shipped_config

    folder = shipped_config(arch)
    torch.manual_seed(0)
    parts = {}
    with torch.device(device):
        parts["unet"] = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        parts["vae"] = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
        parts["text_encoders"] = [CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))]
        if arch == "sdxl":
            parts["text_encoders"].append(CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2")))
    parts["tokenizers"] = [CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")]
    if arch == "sdxl":
        parts["tokenizers"].append(CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"))
    parts["scheduler_config"] = DDPMScheduler.load_config(folder, subfolder="scheduler")
    for name in ("unet", "vae"):
        parts[name] = parts[name].to("cpu", torch.bfloat16 if name == "unet" else torch.float32)
    parts["text_encoders"] = [te.to("cpu", torch.bfloat16) for te in parts["text_encoders"]]
    parts["sdxl"] = arch == "sdxl"
    return parts


def tiny() -> dict:
    from sdlora.models import load_base

    pipe = load_base("tiny").pipe
    return dict(unet=pipe.unet, vae=pipe.vae, text_encoders=[pipe.text_encoder], tokenizers=[pipe.tokenizer],
                scheduler_config=pipe.scheduler.config, sdxl=False)


# --- one training setup, as sdlora/train.py does it ---------------------------------------------------------------

class Setup:
    """Fresh copies of the master models on the device, the base stored in `precision`, LoRAs, optimizer, and a
    step function with static tensor inputs (so it can be replayed as a CUDA graph)."""

    def __init__(self, master: dict, precision: str, device: torch.device, dtype: torch.dtype, checkpointing: bool,
                 rank: int = 16, alpha: float = 8.0, seed: int = 0):
        from diffusers import DDPMScheduler

        from sdlora.lora import TEXT_TARGETS, UNET_TARGETS, add_adapters
        from sdlora.quantize import quantize_base, stored_bytes

        self.device, self.dtype, self.sdxl = device, dtype, master["sdxl"]
        # as sdlora's loop: the VAE resident in fp32, the text encoders and the UNet in the compute dtype
        self.vae = copy.deepcopy(master["vae"]).requires_grad_(False).to(device, torch.float32)
        self.text_encoders = [copy.deepcopy(te).requires_grad_(False).to(device, dtype)
                              for te in master["text_encoders"]]
        self.unet = copy.deepcopy(master["unet"]).requires_grad_(False).to(device, dtype)
        self.note = quantize_base(self.unet, self.text_encoders, "auto" if precision == "bf16" else precision)
        self.stored_gb = {"unet": round(stored_bytes(self.unet) / 1e9, 3),
                          "text_encoders": round(sum(stored_bytes(te) for te in self.text_encoders) / 1e9, 3)}
        torch.manual_seed(seed)
        self.unet_params = add_adapters(self.unet, UNET_TARGETS["attn"], rank, alpha)
        self.te_params = [p for te in self.text_encoders for p in add_adapters(te, TEXT_TARGETS["attn"], rank, alpha)]
        self.params = self.unet_params + self.te_params
        if checkpointing:
            def checkpoint(function, *args):  # sdlora/train.py's: no RNG state, which a CUDA graph cannot save
                return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, preserve_rng_state=False)

            self.unet.enable_gradient_checkpointing(checkpoint)
            for te in self.text_encoders:
                te.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False, "preserve_rng_state": False})
        for m in (self.unet, *self.text_encoders):
            m.train()
        fused = {"fused": True} if device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW([{"params": self.unet_params, "lr": 5e-4},
                                            {"params": self.te_params, "lr": 1e-4}], weight_decay=1e-2, **fused)
        self.noise_scheduler = DDPMScheduler.from_config(master["scheduler_config"])
        self.noise_scheduler.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(device)
        self.graphed = None

    def loss_and_grads(self, latents, noise, timesteps, time_ids, *ids):
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32,
                            cache_enabled=False):
            hidden, pooled = encode(self.text_encoders, ids)
            added = {"text_embeds": pooled, "time_ids": time_ids} if self.sdxl else None
            model_pred = self.unet(noisy_latents, timesteps, hidden, added_cond_kwargs=added).sample
        loss = F.mse_loss(model_pred.float(), noise.float())
        return loss.detach(), torch.autograd.grad(loss, self.params)

    def step(self, inputs: dict, graphs: bool) -> torch.Tensor:
        if self.graphed is None:
            self.graphed = _graphed(self, graphs)
        loss, grads = self.graphed(**inputs)
        for p, g in zip(self.params, grads):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        return loss.clone()


def _graphed(setup: Setup, graphs: bool):
    """sdlora's CUDA-graph replay (sdlora/graphs.py) around the step where it exists and `graphs` is on."""
    def fn(latents, noise, timesteps, time_ids, **ids):
        return setup.loss_and_grads(latents, noise, timesteps, time_ids, *[ids[k] for k in sorted(ids)])

    if not graphs:
        return fn
    try:
        from sdlora.graphs import Graphed
    except ImportError:
        setup.graph_failure = "no sdlora.graphs"
        return fn

    def failed(e):
        setup.graph_failure = f"{type(e).__name__}: {str(e)[:160]}"

    return Graphed(fn, enabled=True, on_fail=failed)


def graph_status(setup: Setup) -> str:
    if getattr(setup, "graph_failure", None):
        return f"eager ({setup.graph_failure})"
    return "captured" if getattr(setup.graphed, "captured", 0) else "eager"


def encode(text_encoders, ids):
    """As the pipelines encode prompts: SD1 the last hidden state; SDXL both encoders' penultimate hidden states side
    by side and the second encoder's pooled projection."""
    if len(text_encoders) == 1:
        return text_encoders[0](ids[0])[0], None
    hidden, pooled = [], None
    for token_ids, te in zip(ids, text_encoders):
        out = te(token_ids, output_hidden_states=True)
        pooled = out[0]
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled


def make_inputs(master: dict, resolution: int, steps: int, device, seed: int = 0) -> list[dict]:
    """Per step: one of 8 fixed random latents with its caption, and that step's noise and timestep; a function of
    (seed, step) only, so every precision sees the same."""
    gen = torch.Generator().manual_seed(seed)
    side = resolution // 8
    latents = torch.randn(8, 4, side, side, generator=gen)
    ids = [[tok(c, padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt").input_ids for c in CAPTIONS] for tok in master["tokenizers"]]
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
    out = []
    for k in range(steps):
        g = torch.Generator().manual_seed(seed * 1_000_003 + k)
        i = k % 8
        item = dict(latents=latents[i:i + 1], noise=torch.randn(1, 4, side, side, generator=g),
                    timesteps=torch.randint(0, 1000, (1,), generator=g), time_ids=time_ids)
        item.update({f"ids_{j}": enc[i] for j, enc in enumerate(ids)})
        out.append(item)
    return out


def to_device(item: dict, device, dtype) -> dict:
    out = {k: v.to(device) for k, v in item.items()}
    out["latents"], out["noise"] = out["latents"].to(dtype), out["noise"].to(dtype)
    return out


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- the two measurements ---------------------------------------------------------------------------------------

def memory_and_speed(master: dict, arch: str, precision: str, args, device, dtype) -> dict:
    resolution = args.resolution or RESOLUTION[arch]
    cap = CAP_GIB[arch] * 2**30
    result = {"family": arch, "resolution": resolution, "precision": precision, "batch_size": 1,
              "gradient_checkpointing": True, "cap_gib": CAP_GIB[arch] if device.type == "cuda" else None}
    setup = None
    inputs = [to_device(item, device, dtype) for item in make_inputs(master, resolution, args.steps, device)]
    free(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
        torch.cuda.reset_peak_memory_stats(device)
    t0, stage = time.perf_counter(), "setup"
    try:
        setup = Setup(master, precision, device, dtype, checkpointing=True)
        stage = "training"
        result.update(note=setup.note, stored_gb=setup.stored_gb, setup_s=round(time.perf_counter() - t0, 1))
        if device.type == "cuda":  # the base loaded in bf16, then quantized: the peak before training
            result["peak_setup_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            torch.cuda.reset_peak_memory_stats(device)
        times, losses = [], []
        for item in inputs:
            sync(device)
            t = time.perf_counter()
            losses.append(setup.step(item, graphs=args.graphs))
            sync(device)
            times.append(time.perf_counter() - t)
        losses = [float(v) for v in losses]
        measured = times[args.warmup:] or times
        result.update(fits=True, ms_per_step=round(1000 * statistics.median(measured), 1),
                      steps=len(times), cuda_graph=graph_status(setup),
                      loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4),
                      finite=all(math.isfinite(v) for v in losses))
    except torch.cuda.OutOfMemoryError as e:
        result.update(fits=False, failed_in=stage,
                      error=f"out of memory under the {CAP_GIB[arch]} GiB cap: {str(e).splitlines()[0][:200]}")
    except Exception as e:  # a mode that fails here is a result too; the other modes go on
        result.update(fits=False, failed_in=stage, error=f"{type(e).__name__}: {str(e)[:300]}")
    finally:
        if device.type == "cuda":
            peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if "peak_setup_gb" in result:
                result["peak_train_gb"] = peak
            result["peak_gb"] = max(peak, result.get("peak_setup_gb", 0))
            # what the caching allocator held from the driver at most (since setup): what the cap limits
            result["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
        del setup
        free(device)
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    return result


def loss_curves(master: dict, precisions: list[str], args, device, dtype) -> dict:
    resolution = args.resolution or RESOLUTION["sd1"]
    items = make_inputs(master, resolution, args.loss_steps, device, seed=1)
    out = {"family": "sd1", "model": "tiny" if args.smoke else "SD1.5 (random weights)", "resolution": resolution,
           "steps": args.loss_steps, "batch_size": 1,
           "lr": {"unet": 5e-4, "text_encoder": 1e-4}, "loss": "plain MSE against the noise", "curves": {},
           "ms_per_step": {}, "errors": {}}
    loras = {}
    for precision in precisions:
        free(device)
        setup = None
        try:
            setup = Setup(master, precision, device, dtype, checkpointing=False)
            losses, t0 = [], time.perf_counter()
            for item in items:
                losses.append(setup.step(to_device(item, device, dtype), graphs=args.graphs))
            sync(device)
            out["ms_per_step"][precision] = round(1000 * (time.perf_counter() - t0) / len(items), 1)
            out["curves"][precision] = [round(float(v), 5) for v in losses]
            out.setdefault("cuda_graph", {})[precision] = graph_status(setup)
            loras[precision] = torch.cat([p.detach().float().flatten().cpu() for p in setup.params])
            log(f"  loss {precision}: first {losses[0].item():.4f}, last {losses[-1].item():.4f}")
        except Exception as e:
            out["errors"][precision] = f"{type(e).__name__}: {str(e)[:300]}"
            log(f"  loss {precision} failed: {out['errors'][precision]}")
        finally:
            del setup
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
                    help="skip what is left after this many seconds (a safety net: a whole run takes about 4 min)")
    ap.add_argument("--plot", metavar="RESULTS_JSON", help="instead: draw the loss curves of a results file")
    ap.add_argument("--png", default="docs/quant-loss.png")
    args = ap.parse_args()
    if args.plot:
        return plot(args.plot, args.png)
    if not args.out:
        ap.error("--out is required")
    started = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.smoke:
        args.families, args.resolution = ["sd1"], 64
        args.steps, args.warmup, args.loss_steps = min(args.steps, 4), 1, min(args.loss_steps, 10)
    args.graphs = args.graphs and cuda
    if cuda:
        torch.backends.cudnn.benchmark = True  # as sdlora's loop sets it
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
            r = memory_and_speed(masters[arch], arch, precision, args, device, dtype)
            results["memory"].append(r)
            log(json.dumps(r))
            save()
        if arch == "sd1" and len(loss_precisions) > 1:
            if time.perf_counter() - started > args.budget_s:
                results["skipped"].append("loss curves: time budget")
            else:
                log(f"loss curves, {args.loss_steps} steps: {', '.join(loss_precisions)}")
                results["loss"] = loss_curves(masters["sd1"], loss_precisions, args, device, dtype)
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
