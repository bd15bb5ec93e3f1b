"""Training speed of sdlora's step against a step written the way diffusers' LoRA example scripts write it, on the
same random-init full-size architectures, in one process; then a whole `sdlora train` and the memory limits.

    python bench/train_speed.py --out DIR                    # on a GPU: all configurations, whole run, memory
    python bench/train_speed.py --out DIR --only sd1-b1-unet # one configuration
    python bench/train_speed.py --out DIR --tiny             # CPU smoke test on the tests' small SD1 model

Also: --adapters-too locon loha lokr dora ... (sdlora's step training each adapter type, beside its LoRA),
--profile (GPU time per step by kernel family, and the top kernels), --channels-last-too, --sdpa-too torch
cudnn efficient flash, --cudnn-benchmark-too (variants of sdlora's step), --whole-env "" DIR (the whole run also in a
bench/clean_env.py folder: only what an install of sdlora holds).

reference: peft LoRA r16 (alpha 16) on to_q/to_k/to_v/to_out.0 (and q/k/v/out_proj of the text encoders when they
train), frozen bf16 base, fp32 LoRA parameters under bf16 autocast, torch AdamW, the VAE encoding the images and the
text encoder running every step, the loss read back each step for the progress bar (as the examples log it).
sdlora: `sdlora.step.build_step` with sdlora's defaults for the same job (r16, attention targets, Min-SNR 5 in both)
and the step `sdlora train` runs: cached latents (mean/std) and, for a frozen text encoder, cached embeddings; fused
AdamW; the base's norms in bf16; the forward+backward replayed as a CUDA graph.

Per configuration: ms/step (median over windows of steps timed with CUDA events, after warm-up), images/s, peak
memory, FLOPs per step (torch.utils.flop_counter), achieved TFLOP/s and its fraction of a bf16 matmul ceiling measured
in the same process, and one step of each from the same state: loss and LoRA gradients compared.
Writes DIR/results.json and prints markdown tables. SD3.5 and FLUX.1's step against diffusers' SD3/FLUX LoRA
scripts': bench/full_size_flow.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# --adapters-too: each adapter type with sdlora's options for it, at the configuration's rank and targets
# (loha-matched: half the ranks, LoCon's parameter count, as LoHa holds two pairs of factors per layer)
ADAPTER_CASES = {"locon": {"adapter": "locon"}, "loha": {"adapter": "loha"}, "lokr": {"adapter": "lokr"},
                 "loha-matched": {"adapter": "loha", "rank": 8, "alpha": 4.0, "conv_rank": 4, "conv_alpha": 2.0},
                 "lokr-full": {"adapter": "lokr", "lokr_full_matrix": True}, "dora": {"adapter": "dora"},
                 "dora-conv": {"adapter": "dora", "dora_conv": True}}
CONFIGS = {  # name: (family, resolution, batch, train text encoder)
    "sd1-b1-unet": ("sd1", 512, 1, False),
    "sd1-b1-unet+te": ("sd1", 512, 1, True),
    "sd1-b8-unet": ("sd1", 512, 8, False),
    "sd1-b8-unet+te": ("sd1", 512, 8, True),
    "sdxl-b1-unet": ("sdxl", 1024, 1, False),
    "sdxl-b4-unet": ("sdxl", 1024, 4, False),
}
RANK = 16
SNR_GAMMA = 5.0


def build(family: str, device: str):
    if family == "tiny":
        from test_families import build_pipeline

        return build_pipeline("sd1").to(device)
    from full_size_check import build as build_full

    return build_full(family, device)


def matmul_ceiling(device: str) -> float:
    """bf16 dense matmul TFLOP/s on this GPU (8192^3, best of a few)."""
    if device != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            a @ b
        end.record()
        end.synchronize()
        best = max(best, 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e12)
    return best


def token_ids(pipe, batch: int, device: str) -> list[torch.Tensor]:
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if getattr(pipe, "tokenizer_2", None) else [])
    captions = [f"a photo of zxq number {i}, a red circle on a blue background" for i in range(batch)]
    from sdlora.batches import token_ids as ids_of

    return [ids_of(t, captions, torch.device(device)) for t in tokenizers]


def time_ids(batch: int, resolution: int, device: str) -> torch.Tensor:
    return torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch, dtype=torch.float32,
                        device=device)


# --- the reference: a LoRA step as diffusers' examples (train_text_to_image_lora[_sdxl].py, train_dreambooth_lora.py)

class Reference:
    def __init__(self, pipe, train_te: bool, device: str):
        from diffusers import DDPMScheduler
        from peft import LoraConfig

        self.pipe, self.train_te, self.device = pipe, train_te, device
        self.sdxl = getattr(pipe, "text_encoder_2", None) is not None
        self.text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if self.sdxl else [])
        self.dtype = torch.bfloat16 if device == "cuda" else torch.float32
        pipe.unet.requires_grad_(False).to(device, self.dtype)
        # the SDXL example keeps the VAE in fp32 (fp16/bf16 SDXL VAEs overflow); the SD1.5 one casts it
        pipe.vae.requires_grad_(False).to(device, torch.float32 if self.sdxl else self.dtype)
        for te in self.text_encoders:
            te.requires_grad_(False).to(device, self.dtype)
        pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                         target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        if train_te:
            for te in self.text_encoders:
                _add_te_adapter(te, LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                               target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
        self.models = [pipe.unet] + (self.text_encoders if train_te else [])
        self.params = [p for m in self.models for p in m.parameters() if p.requires_grad]
        for p in self.params:  # cast_training_params(..., dtype=torch.float32)
            p.data = p.data.float()
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    def encode(self, ids: list[torch.Tensor]):
        if not self.sdxl:
            return self.text_encoders[0](ids[0], return_dict=False)[0], None
        hidden, pooled = [], None
        for te, i in zip(self.text_encoders, ids):
            out = te(i, output_hidden_states=True)
            pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    def loss(self, latents, noise, timesteps, ids, time_ids):
        from diffusers.training_utils import compute_snr

        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(self.device, self.dtype, enabled=self.device == "cuda"):
            hidden, pooled = self.encode(ids)
            cond = {"text_embeds": pooled, "time_ids": time_ids} if self.sdxl else None
            pred = self.pipe.unet(noisy, timesteps, hidden, added_cond_kwargs=cond, return_dict=False)[0]
        snr = compute_snr(self.noise_scheduler, timesteps)
        weights = torch.stack([snr, SNR_GAMMA * torch.ones_like(timesteps)], dim=1).min(dim=1)[0] / snr
        loss = F.mse_loss(pred.float(), noise.float(), reduction="none")
        return (loss.mean(dim=list(range(1, len(loss.shape)))) * weights).mean()

    def step(self, pixels, ids, time_ids) -> float:
        vae = self.pipe.vae
        with torch.no_grad():
            latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor
        latents = latents.to(self.dtype)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  device=latents.device).long()
        loss = self.loss(latents, noise, timesteps, ids, time_ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.detach().item()  # train_loss += avg_loss.item() in the examples


def _add_te_adapter(te, lora_config):
    try:
        te.add_adapter(lora_config)  # transformers' PEFT integration, as the examples call it
    except Exception:  # older peft than transformers wants: the same injection through peft directly
        from peft import inject_adapter_in_model

        inject_adapter_in_model(lora_config, te)


# --- sdlora: the real step

class Sdlora:
    def __init__(self, pipe, train_te: bool, batch: int, resolution: int, device: str, **overrides):
        from accelerate import Accelerator

        from sdlora.config import TrainConfig
        from sdlora.step import build_step

        self.pipe, self.device = pipe, device
        self.sdxl = getattr(pipe, "text_encoder_2", None) is not None
        self.config = TrainConfig(dataset="-", train_text_encoder=train_te, batch_size=batch, resolution=resolution,
                                  steps=10_000, **overrides)
        self.accelerator = Accelerator(mixed_precision="bf16" if device == "cuda" else "no", cpu=device != "cuda")
        self.fails = []
        self.step_fn = build_step(self.accelerator, pipe, self.config, on_fail=self.fails.append)
        self.cudnn_benchmark = False  # sdlora's step leaves torch's default (off); a variant times it on
        self.attention = None  # attention kernels' order (attention_kernels); None: torch's own, as sdlora runs

    def inputs(self, mean, std, ids, time_ids, hidden=None, pooled=None, gens=None) -> dict:
        from sdlora.batches import step_randomness

        out = {"mean": mean, "std": std,
               **step_randomness(mean.shape[1:], gens, self.step_fn.objective, torch.device(self.device))}
        if self.sdxl:
            out["time_ids"] = time_ids
        if self.config.train_text_encoder:
            out.update({f"ids_{j}": i for j, i in enumerate(ids)})
        else:
            out["hidden"] = hidden
            if self.sdxl:
                out["pooled"] = pooled
        return out

    def step(self, inputs) -> torch.Tensor:
        benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, self.cudnn_benchmark
        try:
            with attention_kernels(self.attention):  # what a capture records; a replay runs those kernels
                return self.step_fn([inputs])
        finally:
            torch.backends.cudnn.benchmark = benchmark


def timed(fn, steps: int, device: str, windows: int = 5) -> list[float]:
    """ms per step over `windows` windows of `steps` // `windows` steps each, timed with CUDA events."""
    per = max(1, steps // windows)
    out = []
    for _ in range(windows):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(per):
                fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / per)
        else:
            t = time.perf_counter()
            for _ in range(per):
                fn()
            out.append((time.perf_counter() - t) * 1e3 / per)
    return out


def attention_kernels(order: list | None):
    """A context in which attention (scaled_dot_product_attention) tries its kernels in `order` (SDPBackend values);
    None keeps torch's own order, which sdlora's step uses: on the GPUs measured it picks cuDNN's kernels, which ran
    the step faster than PyTorch's flash kernels first (docs/benchmarks.md)."""
    import contextlib

    if order is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch before 2.6 cannot order them: its own order then
        return contextlib.nullcontext()


def attention_named(backend: str) -> list | None:
    """An order of attention kernels for Sdlora.attention: 'torch' = torch's own (cuDNN's first on Hopper); 'flash',
    'cudnn' or 'efficient' = that backend's kernels first, then cuDNN's, flash, efficient, math (so only the calls
    `backend` refuses change hands; a list without cuDNN sent the calls flash refused to the slower
    memory-efficient kernels). sdlora's step keeps torch's own."""
    if backend == "torch":
        return None
    from torch.nn.attention import SDPBackend

    return list(dict.fromkeys([getattr(SDPBackend, backend.upper() + "_ATTENTION"), SDPBackend.CUDNN_ATTENTION,
                               SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]))


def kernel_profile(fn, steps: int = 3, top: int = 30) -> dict:
    """GPU time per step by kernel family and the top kernels, from torch.profiler over eager steps (a graph replay
    runs the same kernels)."""
    import re

    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    kernels = [(e.key, e.self_device_time_total / steps / 1e3, e.count // steps) for e in prof.key_averages()
               if e.self_device_time_total > 0]
    families = {"attention": r"flash|fmha|attn|attention|sdpa", "normalization": r"norm",
                "convolution": r"conv|fprop|dgrad|wgrad|implicit|nhwc|nchw",
                "matmul": r"gemm|cutlass|nvjet|cublas|xmma|sm90", "copy and cast": r"copy|memcpy|memset|cast"}
    by_family = {}
    for name, ms, _ in kernels:
        family = next((f for f, pattern in families.items() if re.search(pattern, name, re.I)), "elementwise and other")
        by_family[family] = by_family.get(family, 0.0) + ms
    kernels.sort(key=lambda k: -k[1])
    return {"total_ms": sum(k[1] for k in kernels), "by_family_ms": by_family,
            "top": [{"kernel": n[:160], "ms": ms, "calls": c} for n, ms, c in kernels[:top]]}


def flops_of(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def run_config(name: str, steps: int, warmup: int, ceiling: float, device: str, tiny: bool,
               autotune_too: bool = False, channels_last_too: bool = False, sdpa_too: tuple = (),
               profile: bool = False, adapters_too: tuple = (), on_part=lambda result: None) -> dict:
    """One configuration's timings; `on_part` gets the result so far after each variant, so a run cut short keeps
    them."""
    family, resolution, batch, train_te = CONFIGS[name]
    if tiny:
        family, resolution = "tiny", 64
    result = {"config": name, "family": family, "resolution": resolution, "batch": batch, "text_encoder": train_te}
    gen = torch.Generator().manual_seed(0)
    pixels = (torch.rand(batch, 3, resolution, resolution, generator=gen) * 2 - 1).to(device)

    # reference
    torch.manual_seed(0)
    ref = Reference(build(family, device), train_te, device)
    ids = token_ids(ref.pipe, batch, device)
    tids = time_ids(batch, resolution, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        ref.step(pixels, ids, tids)
    ms = timed(lambda: ref.step(pixels, ids, tids), steps, device)
    result["reference"] = {"ms_per_step": statistics.median(ms), "ms_windows": ms,
                           "peak_gb": _peak_gb(device), "flops": flops_of(lambda: ref.step(pixels, ids, tids))}
    # one step from a shared state, for the comparison below: LoRA weights (B made non-zero), latents, noise, t
    vae = ref.pipe.vae
    with torch.no_grad():
        dist = vae.encode(pixels.to(vae.dtype)).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
    g = torch.Generator().manual_seed(1)
    eps = torch.randn(mean.shape, generator=g).to(device)
    latents = ((mean + std * eps) * vae.config.scaling_factor).to(ref.dtype)
    noise = torch.randn(mean.shape, generator=g).to(device, ref.dtype)
    timesteps = torch.randint(0, 1000, (batch,), generator=g).to(device)
    with torch.no_grad():
        for p_name, p in _lora(ref.models).items():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    shared_state = {k: v.detach().cpu().clone() for k, v in _lora(ref.models).items()}
    ref.optimizer.zero_grad()
    ref_loss = ref.loss(latents, noise, timesteps, ids, tids)
    ref_loss.backward()
    ref_grads = {k: p.grad.detach().float().cpu() for k, p in _lora(ref.models).items()}
    ref = vae = None  # free the reference's models before building ours
    _free(device)

    # sdlora (alpha = rank in the comparison only, so that both scale the update alike; it does not change the speed)
    torch.manual_seed(0)
    ours = Sdlora(build(family, device), train_te, batch, resolution, device)
    vae = ours.pipe.vae
    with torch.no_grad():  # what the latent cache holds
        dist = vae.encode(pixels.float()).latent_dist
        c_mean, c_std = dist.mean, dist.std
    hidden = pooled = None
    if not train_te:  # what the text cache holds
        with torch.no_grad():
            hidden, pooled = ours.step_fn.family.encode(ours.step_fn.text_encoders, ids)
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
    ours_inputs = lambda: ours.inputs(c_mean, c_std, ids, tids, hidden, pooled, gens)  # noqa: E731

    def measure(side: Sdlora, held: int = 0) -> dict:
        """Warm-up (each shape's eager calls, then the capture), then the timed steps; the peak counts from before
        the warm-up, since a CUDA graph takes its memory at its capture. `held`: bytes other sides still hold (a
        variant is measured while sdlora's own step, model and graphs are alive), not counted."""
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        for _ in range(warmup):
            side.step(ours_inputs())
        if device == "cuda":
            torch.cuda.synchronize()
        warmup_s = time.perf_counter() - t
        ms = timed(lambda: side.step(ours_inputs()), steps, device)
        return {"ms_per_step": statistics.median(ms), "ms_windows": ms, "peak_gb": _peak_gb(device) - held / 2**30,
                "warmup_s": warmup_s}

    result["sdlora"] = {**measure(ours), "warmup_steps": warmup, "graphs": ours.step_fn.run.captured,
                        "graph_failures": [repr(e)[:300] for e in ours.fails], "trained_params": _trained(ours)}
    # variants of the same step, each built fresh, measured (and profiled) the same way: cuDNN timing every
    # convolution algorithm on first use of a shape; the UNet in channels-last memory format (not sdlora's default:
    # docs/benchmarks.md); attention kernels in another order (the graphs keep the kernels picked at capture); other
    # adapter types (sdlora's options for each, the same rank and targets)
    keep = lambda v: None  # noqa: E731
    variants = []
    if autotune_too:
        variants.append(("sdlora_cudnn_benchmark", {}, lambda v: setattr(v, "cudnn_benchmark", True)))
    if channels_last_too:  # the base's weights: the adapters keep their layout
        variants.append(("sdlora_channels_last", {}, lambda v: v.pipe.unet.to(memory_format=torch.channels_last)))
    variants += [(f"sdlora_sdpa_{backend}", {}, lambda v, b=backend: setattr(v, "attention", attention_named(b)))
                 for backend in sdpa_too]
    variants += [(f"sdlora_{kind}", ADAPTER_CASES[kind], keep) for kind in adapters_too]
    for label, overrides, adjust in variants:
        held = torch.cuda.memory_allocated() if device == "cuda" else 0
        variant = Sdlora(build(family, device), train_te, batch, resolution, device, **overrides)
        adjust(variant)
        result[label] = {**measure(variant, held), "graphs": variant.step_fn.run.captured,
                         "graph_failures": [repr(e)[:300] for e in variant.fails], "trained_params": _trained(variant)}
        if profile and device == "cuda":
            variant.step_fn.run.enabled = False
            result[label]["kernels"] = kernel_profile(lambda: variant.step(ours_inputs()))
        variant = None
        _free(device)
        on_part(result)
    ours.step_fn.run.enabled = False  # count FLOPs on the eager path (a graph replay hides its kernels)
    result["sdlora"]["flops"] = flops_of(lambda: ours.step(ours_inputs()))
    if profile and device == "cuda":
        result["sdlora"]["kernels"] = kernel_profile(lambda: ours.step(ours_inputs()))

    # the same function: one step of each from the same state
    names = _lora(ours.step_fn.trained)
    with torch.no_grad():
        for k, p in names.items():
            p.copy_(shared_state[k])
    scale_fix = ours.config.alpha / RANK  # sdlora's default alpha 8 at rank 16 scales the update by 0.5, peft's by 1
    for m in ours.step_fn.trained:
        _set_scaling(m, 1.0)
    loss, grads = ours.step_fn.loss_and_grads(mean=mean, std=std, eps=eps, noise=noise.float(), timesteps=timesteps,
                                              **({"time_ids": tids} if ours.sdxl else {}),
                                              **({f"ids_{j}": i for j, i in enumerate(ids)} if train_te else
                                                 dict(zip(("hidden", "pooled"), _no_grad(ours.step_fn.family.encode, _tes(ours.pipe), ids)))))
    ours_grads = {k: g.detach().float().cpu() for k, g in zip(names, grads)}
    diffs = [(ours_grads[k] - ref_grads[k]).norm() / (ref_grads[k].norm() + 1e-12)
             for k in ours_grads]
    flat_ours = torch.cat([ours_grads[k].flatten() for k in ours_grads])
    flat_ref = torch.cat([ref_grads[k].flatten() for k in ours_grads])
    result["same_function"] = {
        "loss_reference": ref_loss.item(), "loss_sdlora": loss.item(),
        "loss_rel_diff": abs(ref_loss.item() - loss.item()) / abs(ref_loss.item()),
        "grad_rel_l2": ((flat_ours - flat_ref).norm() / flat_ref.norm()).item(),
        "grad_cosine": F.cosine_similarity(flat_ours.double(), flat_ref.double(), dim=0).item(),
        "grad_rel_l2_worst_tensor": max(diffs).item(), "tensors": len(diffs), "alpha_scale_note": scale_fix}
    ours = None
    _free(device)

    for side in ("reference", "sdlora"):
        r = result[side]
        r["images_per_s"] = batch / (r["ms_per_step"] / 1e3)
        r["tflops"] = r["flops"] / (r["ms_per_step"] / 1e3) / 1e12
        r["ceiling_fraction"] = r["tflops"] / ceiling if ceiling == ceiling else None
    result["speedup"] = result["sdlora"]["images_per_s"] / result["reference"]["images_per_s"]
    return result


def _trained(side: Sdlora) -> int:
    """Parameters the step trains (the adapters' own, with DoRA's magnitudes)."""
    return sum(p.numel() for m in side.step_fn.trained for p in m.parameters() if p.requires_grad)


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


def _tes(pipe):
    return [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]


def _lora(models) -> dict:
    return {f"{i}.{n}": p for i, m in enumerate(models) for n, p in m.named_parameters() if "lora_" in n}


def _set_scaling(model, value: float) -> None:
    for m in model.modules():
        if hasattr(m, "scaling") and isinstance(m.scaling, dict):
            for k in m.scaling:
                m.scaling[k] = value


def _peak_gb(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def _free(device) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# --- a whole run and the memory limits, through the CLI as a user runs it

def whole_run_inputs(out: Path, family: str, tiny: bool, square: bool) -> tuple[Path, Path]:
    """The whole run's base model folder (the family's architecture in fp16, as models are shared) and its 30
    captioned images at the family's resolution, made in `out` unless already there."""
    from full_size_check import draw_dataset

    resolution = 64 if tiny else {"sd1": 512, "sdxl": 1024}[family]
    base = out / f"{family}-base"
    if not base.exists():
        pipe = build(family if not tiny else "tiny", "cuda" if torch.cuda.is_available() else "cpu")
        for m in _tes(pipe) + [pipe.unet]:
            m.to(torch.float16)
        pipe.save_pretrained(base)
        del pipe
        _free("cuda" if torch.cuda.is_available() else "cpu")
    data = out / f"data-{resolution}{'-square' if square else ''}"
    if not data.exists():
        draw_dataset(data, resolution, n=30, square=square)
    return base, data


def whole_run(out: Path, steps: int, batch: int, tiny: bool, family: str = "sd1", limit_gb: float = 0.0,
              extra: tuple = (), square: bool = False, env: str = "", code: str = "", tag: str = "") -> dict:
    """`sdlora train` from the command line on 30 images: wall time from command to file, the run's own step rate,
    its picks and peak memory. With `limit_gb`, the process may use only that much GPU memory
    (torch.cuda.set_per_process_memory_fraction) and picks batch and checkpointing itself. `env`: a folder from
    bench/clean_env.py to run in; `code`: a folder holding another sdlora source tree (an earlier commit's `sdlora/`,
    e.g. from `git archive`) to run instead of this checkout's, to compare a change in the same call."""
    from sdlora.rundir import read_events

    out = out.resolve()
    base, data = whole_run_inputs(out, family, tiny, square)
    run = out / (f"run-{family}-{steps}-{batch}-{limit_gb}{'-square' if square else ''}{'-clean-env' if env else ''}"
                 f"{'-' + Path(code).name if code else ''}{tag}")
    shutil.rmtree(run, ignore_errors=True)
    args = [str(data), "--base", str(base), "--out", str(run), "--steps", str(steps), "--trigger", "zxq", "--quiet",
            *(["--batch-size", str(batch)] if batch else []), *(["--resolution", "64"] if tiny else []), *extra]
    script = "import sys, torch\n"
    if limit_gb:
        script += f"torch.cuda.set_per_process_memory_fraction({limit_gb} * 2**30 / torch.cuda.get_device_properties(0).total_memory)\n"
    script += "from sdlora.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    t = time.perf_counter()
    # env: a folder from bench/clean_env.py; the run then sees only what an install of sdlora holds
    python = [sys.executable, "-S"] if env else [sys.executable]
    source = str(Path(code).resolve()) if code else str(Path(__file__).resolve().parents[1])
    environ = {**os.environ, "PYTHONPATH": f"{env}:{source}" if env else
               f"{source}:{os.environ['PYTHONPATH']}" if os.environ.get("PYTHONPATH") else source}
    # run from `out`: `python -c` puts the working directory first on the path, where a checkout's sdlora/ would win
    proc = subprocess.run([*python, "-c", script, "train", *args], capture_output=True, text=True, env=environ,
                          cwd=out)
    wall = time.perf_counter() - t
    ran = subprocess.run([*python, "-c", "import sdlora; print(sdlora.__file__)"], capture_output=True, text=True,
                         env=environ, cwd=out).stdout.strip()  # which sdlora that command imports
    result = {"steps": steps, "family": family, "limit_gb": limit_gb, "wall_s": wall, "returncode": proc.returncode,
              "environment": env or "this machine's Python as it is", "sdlora": ran}
    if (run / "events.jsonl").exists():
        shutil.copy(run / "events.jsonl", out / f"events-{run.name}.jsonl")
    if proc.returncode:
        result["stderr"] = proc.stderr[-3000:]
        return result
    events = read_events(run)
    start = next(e for e in events if e["type"] == "start")
    progress = [e for e in events if e["type"] == "progress"]
    steady = [e for e in progress if e["step"] >= min(50, steps // 4)]
    ms, rates = _steady(events, from_step=min(50, steps // 4))
    result.update(batch=start["batch_per_gpu"], picks=[e["message"] for e in events if e["type"] == "warning"],
                  peak_gb=progress[-1]["memory_gb"], steady_ms_per_step=ms,
                  # counted by the run: a bucket's short last batch counts the images it holds
                  images_per_s=rates, images_per_step=rates * ms / 1e3,
                  final_loss=progress[-1]["loss"],
                  start_event_s=start["time"] - (time.time() - wall),
                  sampling_s=_span(events, "sample"), graphs=progress[-1].get("graphs"),
                  phases_s=_phases(events, t0=time.time() - wall, wall=wall), setup_s=start.get("setup_s"),
                  time_to_file_s=(run / "lora.safetensors").stat().st_mtime - (time.time() - wall),
                  # host time per step spent assembling batches, against the step time: the GPU waits on data
                  # only if it were larger
                  data_ms_per_step=sum(e.get("data_ms", 0) for e in steady) / len(steady))
    return result


def _steady(events, from_step: int) -> tuple[float, float]:
    """(ms per step, images/s): medians over the intervals between consecutive progress events from `from_step` that
    have no other event (a sample round, a save) between them."""
    times = [e["time"] for e in events]
    progress = [(i, e) for i, e in enumerate(events) if e["type"] == "progress" and e["step"] >= from_step]
    ms, rates = [], []
    for (i, a), (j, b) in zip(progress, progress[1:]):
        if j == i + 1 and b["step"] > a["step"]:
            ms.append(1e3 * (times[j] - times[i]) / (b["step"] - a["step"]))
            rates.append(b["images_per_s"])
    return statistics.median(ms), statistics.median(rates)


def _phases(events, t0: float, wall: float) -> dict:
    """Where a run's wall time went: until the start event (imports, loading, caches), then each gap between events
    counted to the later event's type (progress: training steps; sample; save; verify; done), then the exit."""
    start = next(i for i, e in enumerate(events) if e["type"] == "start")
    out = {"to_start": events[start]["time"] - t0}
    for prev, e in zip(events[start:], events[start + 1:]):
        out[e["type"]] = out.get(e["type"], 0.0) + e["time"] - prev["time"]
    out["exit"] = t0 + wall - events[-1]["time"]
    return {k: round(v, 2) for k, v in out.items()}


def _span(events, kind) -> float:
    """Seconds spent making samples: for each sample event, the time since the event before it."""
    return sum(e["time"] - prev["time"] for prev, e in zip(events, events[1:]) if e["type"] == kind)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="*", choices=sorted(CONFIGS), help="configurations to time (default: all)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per side and configuration")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--whole-run", type=int, default=1000, help="steps of the whole `sdlora train` run (0 = skip)")
    ap.add_argument("--whole-batch", type=int, default=8)
    ap.add_argument("--memory", action="store_true", help="also: whole runs under the memory caps of --caps")
    ap.add_argument("--caps", nargs="+", default=["sd1:6", "sdxl:12"], metavar="FAMILY:GB",
                    help="memory caps for --memory (default: SD1.5 in 6 GB and SDXL in 12 GB)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test on the tests' small model")
    ap.add_argument("--channels-last-too", action="store_true",
                    help="also time sdlora's step with the UNet in channels-last memory format")
    ap.add_argument("--whole-square", action="store_true",
                    help="the whole run's 30 images all square (one bucket: full batches but an epoch's last)")
    ap.add_argument("--whole-extra", default="", help="more `sdlora train` flags for the whole run (one string)")
    ap.add_argument("--whole-env", nargs="*", default=[""], metavar="DIR",
                    help="run the whole run once per environment: '' = this Python as it is, DIR = a folder from "
                         "bench/clean_env.py (only what an install of sdlora holds)")
    ap.add_argument("--whole-code", nargs="*", default=[""], metavar="DIR",
                    help="run the whole run once per sdlora source tree: '' = this checkout, DIR = a folder holding "
                         "an earlier commit's sdlora/ (git archive COMMIT sdlora | tar -x -C DIR)")
    ap.add_argument("--whole-repeats", type=int, default=1, help="run each whole run this many times, alternating")
    ap.add_argument("--sdpa-too", nargs="*", default=[], choices=["torch", "cudnn", "efficient", "flash"],
                    help="also time sdlora's step with attention by these SDPA backends first (then cuDNN's), or in "
                         "torch's own order (cuDNN's first on Hopper)")
    ap.add_argument("--adapters-too", nargs="*", default=[], choices=sorted(ADAPTER_CASES),
                    help="also time sdlora's step training these adapter types (time, peak memory, parameters, "
                         "whether the CUDA graph captured)")
    ap.add_argument("--profile", action="store_true", help="also: sdlora's GPU time per step by kernel family")
    ap.add_argument("--cudnn-benchmark-too", action="store_true",
                    help="also time sdlora's step with cuDNN autotuning (torch.backends.cudnn.benchmark) on")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    import diffusers
    import peft
    import transformers

    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                            "transformers": transformers.__version__, "peft": peft.__version__},
               "command": " ".join(sys.argv), "configs": [], "whole_run": [], "memory": []}
    results["bf16_matmul_tflops"] = matmul_ceiling(device)
    save = lambda: (out / "results.json").write_text(json.dumps(results, indent=2, default=str))  # noqa: E731
    names = args.only if args.only is not None else list(CONFIGS)
    if args.tiny:
        names = [n for n in names if n.startswith("sd1")]
    for name in names:
        try:
            results["configs"].append(run_config(name, args.steps, args.warmup, results["bf16_matmul_tflops"], device,
                                                 args.tiny, autotune_too=args.cudnn_benchmark_too,
                                                 channels_last_too=args.channels_last_too,
                                                 sdpa_too=tuple(args.sdpa_too), profile=args.profile,
                                                 adapters_too=tuple(args.adapters_too),
                                                 on_part=lambda r: (results.update(partial=r), save())))
            results.pop("partial", None)
        except Exception:
            import traceback

            results["configs"].append({"config": name, "error": traceback.format_exc()[-3000:]})
        print(json.dumps(results["configs"][-1], default=str)[:3000], flush=True)
        save()
    if args.whole_run:
        for repeat in range(args.whole_repeats):  # the trees and environments alternate
            for env in args.whole_env:
                for code in args.whole_code:
                    results["whole_run"].append(whole_run(
                        out, args.whole_run, args.whole_batch, args.tiny, extra=tuple(args.whole_extra.split()),
                        square=args.whole_square, env=env, code=code, tag=f"-{repeat + 1}" if repeat else ""))
                    print(json.dumps(results["whole_run"][-1])[:3000], flush=True)
                    save()
    if args.memory and device == "cuda":
        for family, limit in (cap.split(":") for cap in args.caps):
            results["memory"].append(whole_run(out, 60, 0, False, family, float(limit)))
            print(json.dumps(results["memory"][-1])[:3000], flush=True)
            save()
    print(table(results))


def table(results: dict) -> str:
    rows = ["| configuration | side | ms/step | images/s | peak GiB | GFLOP/step | TFLOP/s | of ceiling | speed-up |",
            "|---|---|---|---|---|---|---|---|---|"]
    trained = lambda s: f" ({s['trained_params'] / 1e6:.2f}M params{', eager' if s.get('graphs') == 0 else ''})" \
        if "trained_params" in s else ""  # noqa: E731
    for r in results["configs"]:
        if "error" in r:
            rows.append(f"| {r['config']} | error | | | | | | | |")
            continue
        for side in ("reference", "sdlora"):
            s = r[side]
            frac = f"{100 * s['ceiling_fraction']:.0f}%" if s.get("ceiling_fraction") else ""
            rows.append(f"| {r['config']} | {side} | {s['ms_per_step']:.1f} | {s['images_per_s']:.1f} | "
                        f"{s['peak_gb']:.2f} | {s['flops'] / 1e9:.0f} | {s['tflops']:.0f} | {frac} | "
                        f"{'%.2fx' % r['speedup'] if side == 'sdlora' else ''} |")
        for side in (k for k in r if k.startswith("sdlora_")):  # variants of sdlora's step: time and peak only
            s = r[side]
            rows.append(f"| {r['config']} | {side[7:]}{trained(s)} | {s['ms_per_step']:.1f} | "
                        f"{r['batch'] * 1e3 / s['ms_per_step']:.1f} | {s['peak_gb']:.2f} | | | | |")
        for side in (k for k in r if k.startswith("sdlora") and "kernels" in r[k]):
            k = r[side]["kernels"]
            rows.append(f"| {r['config']} | {side}: GPU ms by kernel family (eager) | {k['total_ms']:.1f} | " + ", ".join(
                f"{f} {ms:.1f}" for f, ms in sorted(k["by_family_ms"].items(), key=lambda x: -x[1])) + " | | | | | | |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
