"""Full-size SD3.5 Medium, SD3.5 Large and FLUX.1-dev through sdlora on a GPU: single file in, a run under a memory
cap, kohya's module names out, and the training step against one written as diffusers' example scripts write it.

Per family, in one process (one GPU call each):

1. build: the published architecture from sdlora/configs/<family>, random init, in bf16 straight on the GPU. The
   tokenizers are the CLIP ones shipped for SDXL (SD3.5 and FLUX.1 use the same two) and a T5 tokenizer whose pieces
   are that vocabulary's words (T5's sentencepiece model does not ship, and a random T5 reads any ids alike).
2. write it as model sites serve it: SD3.5 as SAI's single file (`model.diffusion_model.*`, the VAE and
   `text_encoders.clip_l/clip_g/t5xxl`), its configs and tokenizers in a folder beside it; FLUX.1-dev as BFL's
   transformer-only file, beside a diffusers folder with the VAE, CLIP-L and T5. The folder goes to --base-config.
3. speed, in this process, on the model of 1 (no cap): sdlora's step (`sdlora.step.build_step`, its defaults: r16,
   attention targets, cached latents and text, CUDA graphs) against a step written as diffusers'
   train_dreambooth_lora_sd3.py / train_dreambooth_lora_flux.py write it, for the same job (class FlowReference),
   batch 1 at 1024: images/s and peak memory of each, and one step of each from the same LoRA weights, latents,
   noise and timesteps: the losses and LoRA gradients compared.
4. run: `sdlora train` on 8 captioned pictures, 20 steps at 1024, the hub off, in a process that
   torch.cuda.set_per_process_memory_fraction caps (12 GiB for SD3.5 Medium, 24 GiB for SD3.5 Large and FLUX.1-dev),
   so sdlora picks batch, checkpointing and base precision itself; it exports and checks the file through diffusers'
   loader as every run does. Its events file is copied beside --results.
5. names: the exported modules, placed on the single file's layers by diffusers' own single-file converter, in
   kohya's naming, against the names kohya gives the same file's layers (read off its keys).

    python bench/full_size_flow.py --out /tmp/flow --results DIR/flow-sd3.5-medium.json --families sd3.5-medium
    python bench/full_size_flow.py --out /tmp/flow --results DIR/flow-sd3.5-large.json --families sd3.5-large
    python bench/full_size_flow.py --out /tmp/flow --results DIR/flow-flux.1-dev.json --families flux.1-dev
    python bench/full_size_flow.py --out /tmp/flow-tiny --tiny    # CPU smoke test on the tests' small SD3 and FLUX

--phases speed run (default both) picks the phases. Each phase prints one timed line as it ends (the run also a line
per event as it comes), and the results file is rewritten after each; a markdown table of each family ends the
output. The single file and the folder are
deleted once the family is done.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]
os.environ["HF_HUB_OFFLINE"] = "1"  # the single files must load from what is on the disk alone
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402

from full_size_check import draw_dataset  # noqa: E402
from train_speed import _free, _lora, _peak_gb, _set_scaling, timed  # noqa: E402

CAP_GIB = {"sd3.5-medium": 12, "sd3.5-large": 24, "flux.1-dev": 24}
RESOLUTION, RANK = 1024, 16  # the speed comparison: sdlora's default rank, batch 1
# one step of each from the same state agrees to bf16's precision (8 significant bits) when the losses differ by at
# most this much, relatively, and the LoRA gradients point the same way to this cosine
LOSS_TOLERANCE, GRAD_COSINE = 1e-2, 0.999
# kohya's text-encoder prefixes (sd-scripts networks/lora_sd3.py, lora_flux.py) by pipeline component
KOHYA_TE = {"SD3": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"},
            "FLUX": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te3_"}}
# kohya's module names at sdlora's default (attention) targets: the denoiser's fused original layers, CLIP q/k/v/out
KOHYA_COUNTS = {"sd3.5-medium": {"lora_unet_": 121, "lora_te1_": 48, "lora_te2_": 128},
                "sd3.5-large": {"lora_unet_": 151, "lora_te1_": 48, "lora_te2_": 128},
                "flux.1-dev": {"lora_unet_": 114, "lora_te1_": 48}}


# --- 1, 2: the model and its files -------------------------------------------------------------------------------

def t5_tokenizer():
    """A T5 tokenizer (the class the pipelines load) whose pieces are the words of the CLIP vocabulary shipped for
    SDXL, every id inside T5's vocabulary."""
    from transformers import T5TokenizerFast

    from sdlora.models import CONFIGS_DIR

    vocab = json.loads((CONFIGS_DIR / "sdxl" / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    words = sorted({w[:-4] for w in vocab if w.endswith("</w>") and w[:-4].isascii() and w[:-4].isalpha()})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -10.0) for w in words[:31_997]]
    return T5TokenizerFast(vocab=pieces, extra_ids=100, model_max_length=512)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build(name: str, device: str, tiny: bool):
    """The family's pipeline, random weights: the published architecture in bf16 on `device`, or with `tiny` the
    tests' small model of the family (fp32, CPU). The T5 slot gets t5_tokenizer()."""
    import diffusers
    import transformers

    from sdlora.models import CONFIGS_DIR, shipped_config

    flux = name.startswith("flux")
    if tiny:
        from test_families_flux import build_flux
        from test_families_sd3 import build_sd3

        pipe = build_flux() if flux else build_sd3()
        pipe.register_modules(**{"tokenizer_2" if flux else "tokenizer_3": t5_tokenizer()})
        return pipe
    folder = Path(shipped_config(name))
    index = diffusers.DiffusionPipeline.load_config(folder)
    parts = {}
    torch.manual_seed(0)
    with torch.device(device), default_dtype(torch.bfloat16):
        for part, spec in index.items():
            if part.startswith("_") or spec[0] is None:
                continue
            library, class_name = spec
            cls = getattr(diffusers if library == "diffusers" else transformers, class_name)
            if part.startswith("tokenizer"):
                parts[part] = t5_tokenizer() if class_name.startswith("T5") else cls.from_pretrained(
                    CONFIGS_DIR / "sdxl" / part)  # CLIP-L: `tokenizer`; CLIP-G: `tokenizer_2`
            elif part == "scheduler":
                parts[part] = cls.from_pretrained(folder, subfolder=part)
            elif library == "diffusers":
                parts[part] = cls.from_config(cls.load_config(folder, subfolder=part))
            else:
                parts[part] = cls(transformers.AutoConfig.from_pretrained(folder / part))
    pipe = getattr(diffusers, index["_class_name"])(**parts)
    for model in pipe.components.values():
        if isinstance(model, torch.nn.Module):
            model.requires_grad_(False).to(torch.bfloat16)
    if not flux:  # SD3's CLIP-L projection is the identity; its single files leave it out (as tests/test_families_sd3)
        with torch.no_grad():
            pipe.text_encoder.text_projection.weight.copy_(torch.eye(pipe.text_encoder.config.hidden_size))
    return pipe


def write_base(pipe, family, out: Path) -> tuple[Path, Path]:
    """(single file, folder for --base-config): the file in the original layout in bf16, as the sites serve it
    (sdlora.families.naming.original_layout: SAI's for SD3.5, text encoders inside; BFL's transformer alone for
    FLUX.1), and a diffusers folder of every config and tokenizer, with the weights of the parts the file lacks."""
    from safetensors.torch import save_file

    from sdlora.families.naming import original_layout

    checkpoint, folder = out / f"{family.name}.safetensors", out / f"{family.name}-config"
    state = {k: v.to(torch.bfloat16).cpu().contiguous() for k, v in original_layout(pipe, family).items()}
    save_file(state, str(checkpoint))
    del state
    shutil.rmtree(folder, ignore_errors=True)
    pipe.save_config(folder)  # model_index.json
    transformer_only = family.denoiser_from_original is not None
    for part, component in pipe.components.items():
        if component is None:
            continue
        if not isinstance(component, torch.nn.Module) or (transformer_only and part != family.denoiser):
            component.save_pretrained(folder / part)  # tokenizers, scheduler, and the weights the file lacks
        elif hasattr(component, "save_config"):  # a diffusers model: config.json only
            component.save_config(folder / part)
        else:  # a transformers model
            component.config.save_pretrained(folder / part)
    return checkpoint, folder


def size_gb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 1e9, 2)


# --- 3: the step, side by side ------------------------------------------------------------------------------------

class FlowReference:
    """A LoRA step as diffusers' train_dreambooth_lora_sd3.py and train_dreambooth_lora_flux.py write it for one
    instance prompt, no text-encoder training, bf16 mixed precision: the transformer frozen in bf16 with peft LoRA
    (`add_adapter`, alpha = rank, gaussian init; its LoRA weights bf16 like the base, as those scripts leave them
    under bf16), the forward under bf16 autocast; the text embeddings computed once, the text encoders then freed;
    the VAE (fp32 for SD3, bf16 for FLUX) encoding the pictures every step; sigmas drawn by
    compute_density_for_timestep_sampling with the scripts' default scheme (SD3 logit_normal, FLUX uniform) and
    looked up in the scheduler's table; the velocity target with compute_loss_weighting_for_sd3's weights; FLUX's
    latents packed with FluxPipeline's helpers and its guidance embedding told `guidance`; gradient clipping at 1,
    torch AdamW (lr 1e-4, weight decay 1e-4); the loss read back every step, as the scripts log it.

    Two settings follow sdlora's job rather than the scripts' defaults, for the same function on both sides: the
    targets are sdlora's (the scripts' --lora_layers) and SD3 runs as with --precondition_outputs 0 (the default 1
    weighs each image's loss by sigma^2, at the same cost)."""

    def __init__(self, pipe, targets: list[str], rank: int, device: str, guidance: float):
        from diffusers import FlowMatchEulerDiscreteScheduler
        from peft import LoraConfig

        self.flux = type(pipe).__name__ == "FluxPipeline"
        self.device, self.guidance = device, guidance
        self.dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.transformer = pipe.transformer.requires_grad_(False).to(device, self.dtype)
        self.vae = pipe.vae.requires_grad_(False).to(device, self.dtype if self.flux else torch.float32)
        self.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                                target_modules=targets))
        self.params = [p for p in self.transformer.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        self.scheme = "none" if self.flux else "logit_normal"

    def sigmas(self, timesteps: torch.Tensor, dtype) -> torch.Tensor:
        """Each timestep's sigma from the scheduler's table, found by value (a host sync per image, as written)."""
        table = self.scheduler.timesteps.to(timesteps.device)
        index = [(table == t).nonzero().item() for t in timesteps]
        return self.scheduler.sigmas.to(timesteps.device, dtype)[index].reshape(-1, 1, 1, 1)

    def predict(self, noisy, timesteps, hidden, pooled):
        if not self.flux:
            return self.transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=hidden,
                                    pooled_projections=pooled, return_dict=False)[0]
        from diffusers import FluxPipeline

        from sdlora.families.flux import attention_kernels

        b, c, h, w = noisy.shape
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        guidance = torch.full((b,), self.guidance, device=noisy.device) \
            if self.transformer.config.guidance_embeds else None
        # the attention kernels sdlora's FLUX.1 step uses: with torch's own choice (cuDNN's first on Hopper) this
        # step's backward failed with an illegal memory access at 1024 px on an H200 (torch 2.11)
        with attention_kernels(noisy.device):
            out = self.transformer(
                hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w), timestep=timesteps / 1000,
                guidance=guidance, pooled_projections=pooled, encoder_hidden_states=hidden,
                txt_ids=torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=hidden.dtype),
                img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype),
                return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, height=h * factor, width=w * factor, vae_scale_factor=factor)

    def loss(self, latents, noise, timesteps, hidden, pooled) -> torch.Tensor:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        sigmas = self.sigmas(timesteps, latents.dtype)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        with torch.autocast(self.device, self.dtype, enabled=self.device == "cuda"):
            pred = self.predict(noisy, timesteps, hidden, pooled)
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=self.scheme, sigmas=sigmas)
        loss = (weighting.float() * (pred.float() - (noise - latents).float()) ** 2).reshape(latents.shape[0], -1)
        return loss.mean(1).mean()

    def step(self, pixels, hidden, pooled) -> float:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        config = self.vae.config
        with torch.no_grad():
            latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.sample()
        latents = ((latents - config.shift_factor) * config.scaling_factor).to(self.dtype)
        noise = torch.randn_like(latents)
        u = compute_density_for_timestep_sampling(weighting_scheme=self.scheme, batch_size=latents.shape[0],
                                                  logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
        timesteps = self.scheduler.timesteps[(u * self.scheduler.config.num_train_timesteps).long()]
        loss = self.loss(latents, noise, timesteps.to(latents.device), hidden, pooled)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.detach().item()


def sdlora_step(pipe, family, batch: int, resolution: int, device: str):
    """(sdlora's training step for the same job with its defaults, the CUDA-graph failures it reported), the frozen
    T5 then moved off the GPU as `sdlora train` does once the captions are cached."""
    from accelerate import Accelerator

    from sdlora.config import TrainConfig
    from sdlora.step import build_step

    config = TrainConfig(dataset="-", train_text_encoder=False, batch_size=batch, resolution=resolution, steps=10_000)
    accelerator = Accelerator(mixed_precision="bf16" if device == "cuda" else "no", cpu=device != "cuda")
    fails = []
    step = build_step(accelerator, pipe, config, family.with_train_guidance(config.train_guidance),
                      on_fail=fails.append)
    for frozen in family.encoders(pipe)[len(family.text_encoders):]:
        frozen.to("cpu")
    return step, fails


def speed(pipe, family, resolution: int, steps: int, warmup: int, device: str) -> dict:
    """Both steps on `pipe`, the reference first (its adapters then unloaded, sdlora's attached): ms/step (median of 2
    windows after `warmup` steps, CUDA events), images/s, peak memory from before the warm-up (a CUDA graph takes its
    memory at capture); and before each side is timed, one step of it from the same state (LoRA weights with B
    non-zero, latents, noise, timesteps): losses and LoRA gradients compared."""
    from sdlora.batches import step_randomness
    from sdlora.config import TrainConfig

    batch = 1
    with torch.no_grad():  # the pipeline's own prompt encoding, which the scripts and sdlora's cache reproduce
        hidden, pooled = family.encode_prompt(pipe, ["a photo of zxq, a red circle on a blue background"] * batch,
                                              device)
    for text_encoder in family.encoders(pipe):
        text_encoder.to("cpu")
    pixels = (torch.rand(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    pixels = pixels.to(device)
    result = {"resolution": resolution, "batch": batch, "rank": RANK, "targets": "attn", "text_tokens": hidden.shape[1]}

    def measure(fn, warmup_steps: int) -> dict:
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup_steps):
            fn()
        ms = timed(fn, steps, device, windows=2)
        return {"ms_per_step": statistics.median(ms), "ms_windows": ms, "peak_gb": _peak_gb(device),
                "images_per_s": batch * 1e3 / statistics.median(ms)}

    # FLUX.1 dev's guidance embedding: sdlora's default, given to the reference as the scripts' --guidance_scale
    ref = FlowReference(pipe, list(family.unet_targets["attn"]), RANK, device, TrainConfig.train_guidance)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        dist = ref.vae.encode(pixels.to(ref.vae.dtype)).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
    eps = torch.randn(mean.shape, generator=g).to(device)
    noise = torch.randn(mean.shape, generator=g).to(device, ref.dtype)
    timesteps = ref.scheduler.timesteps[torch.randint(0, 1000, (batch,), generator=g)].to(device)
    config = ref.vae.config
    latents = ((mean + std * eps - config.shift_factor) * config.scaling_factor).to(ref.dtype)
    shared = {k: (torch.randn(p.shape, generator=g) * 0.02).to(ref.dtype) for k, p in _lora([ref.transformer]).items()}
    with torch.no_grad():
        for k, p in _lora([ref.transformer]).items():
            p.copy_(shared[k])
    loss = ref.loss(latents, noise, timesteps, hidden, pooled)
    loss.backward()
    ref_loss, ref_grads = loss.item(), {k: p.grad.float().cpu() for k, p in _lora([ref.transformer]).items()}
    ref.optimizer.zero_grad()
    loss = None
    result["reference"] = measure(lambda: ref.step(pixels, hidden, pooled), warmup)
    ref.transformer.unload_lora()
    ref = None
    _free(device)

    ours, fails = sdlora_step(pipe, family, batch, resolution, device)
    names = _lora(ours.trained)
    with torch.no_grad():
        for k, p in names.items():
            p.copy_(shared[k])
    for model in ours.trained:  # peft scales by alpha / rank = 1 above, sdlora's default alpha 8 at r16 by 0.5
        _set_scaling(model, 1.0)
    loss, grads = ours.loss_and_grads(mean=mean, std=std, eps=eps, noise=noise.float(), timesteps=timesteps,
                                      hidden=hidden, pooled=pooled)
    ours_loss, ours_grads = loss.item(), {k: g.float().cpu() for k, g in zip(names, grads)}
    loss = grads = None
    for model in ours.trained:
        _set_scaling(model, TrainConfig.alpha / TrainConfig.rank)
    with torch.no_grad():  # what the latent cache holds
        dist = pipe.vae.encode(pixels.float()).latent_dist
        c_mean, c_std = dist.mean, dist.std
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
    inputs = lambda: {"mean": c_mean, "std": c_std, "hidden": hidden, "pooled": pooled,  # noqa: E731
                      **step_randomness(c_mean.shape[1:], gens, ours.objective, torch.device(device))}
    # warm-up: Graphed's eager calls, then its capture
    result["sdlora"] = {**measure(lambda: ours([inputs()]), warmup + 1), "graphs": ours.run.captured,
                        "graph_failures": [repr(e)[:300] for e in fails]}
    flat_ours = torch.cat([ours_grads[k].flatten() for k in ref_grads])
    flat_ref = torch.cat([ref_grads[k].flatten() for k in ref_grads])
    same = {"loss_reference": ref_loss, "loss_sdlora": ours_loss,
            "loss_rel_diff": abs(ref_loss - ours_loss) / abs(ref_loss),
            "grad_rel_l2": ((flat_ours - flat_ref).norm() / flat_ref.norm()).item(),
            "grad_cosine": torch.nn.functional.cosine_similarity(flat_ours.double(), flat_ref.double(), dim=0).item(),
            "tensors": len(ref_grads)}
    same["same"] = (set(ours_grads) == set(ref_grads) and same["loss_rel_diff"] <= LOSS_TOLERANCE
                    and same["grad_cosine"] >= GRAD_COSINE)
    result["same_step"] = same
    result["speedup"] = result["sdlora"]["images_per_s"] / result["reference"]["images_per_s"]
    return result


# --- 4: a whole run under the memory cap --------------------------------------------------------------------------

CHILD = """import sys, torch
cap = float(sys.argv.pop(1))
if cap and torch.cuda.is_available():
    torch.cuda.set_per_process_memory_fraction(cap * 2**30 / torch.cuda.get_device_properties(0).total_memory)
from sdlora.cli import main
sys.exit(main(sys.argv[1:]))
"""


def capped_run(checkpoint: Path, folder: Path, data: Path, run: Path, cap_gib: float, steps: int, resolution: int,
               targets: str) -> dict:
    """`sdlora train` from the command line in its own process, capped at `cap_gib` of GPU memory (0: no cap), with
    its memory-aware defaults; what its events say: picks, setup, step rate, peak memory, the check of the file."""
    from sdlora.rundir import read_events

    shutil.rmtree(run, ignore_errors=True)
    args = ["train", str(data), "--base", str(checkpoint), "--base-config", str(folder), "--out", str(run),
            "--steps", str(steps), "--resolution", str(resolution), "--targets", targets, "--trigger", "zxq",
            "--seed", "0", "--sample-every", "10000", "--save-every", "10000", "--sample-steps", "4",
            "--sample-prompt", "a red circle on a blue background", "--quiet"]
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t, t_wall = time.perf_counter(), time.time()
    # from `run`'s parent: `python -c` puts the working directory first on the path
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(cap_gib), *args], env=environ, cwd=run.parent)
    shown = 0
    while proc.poll() is None:  # the run's events as they come, so a call cut short still shows how far it got
        time.sleep(2)
        shown = _show(read_events(run), shown, t_wall)
    events = read_events(run)
    _show(events, shown, t_wall)
    returncode = proc.returncode
    result = {"returncode": returncode, "wall_s": round(time.perf_counter() - t, 1), "cap_gib": cap_gib}
    errors = [e for e in events if e["type"] == "error"]
    if errors:
        result["error"] = f"{errors[-1]['message']} ({errors[-1].get('hint', '')})" \
            + (f": {errors[-1]['detail']}" if errors[-1].get("detail") else "")
    start = next((e for e in events if e["type"] == "start"), None)
    progress = [e for e in events if e["type"] == "progress"]
    if start:
        result.update(to_start_s=round(start["time"] - t_wall, 1), setup_s=start["setup_s"],
                      batch_size=start["batch_per_gpu"], precision=start["precision"],
                      base_storage=start["base_storage"], picks=[e["message"] for e in events if e["type"] == "warning"
                                                                 and "memory defaults" in e["message"]])
    if progress:
        first_sample = max((e["time"] for e in events if e["type"] == "sample" and e["step"] == 0),
                           default=start["time"])
        train_s = progress[-1]["time"] - first_sample
        result.update(steps=progress[-1]["step"], train_steps_s=round(train_s, 1),
                      images_per_s=round(progress[-1]["step"] * start["global_batch"] / max(train_s, 1e-9), 2),
                      peak_memory_gb=max(e["memory_gb"] for e in progress), final_loss=round(progress[-1]["loss"], 4))
    verify = next((e for e in events if e["type"] == "verify"), None)
    if verify:
        result["verify"] = {k: v for k, v in verify.items() if k not in ("type", "time", "path")}
    result["fit"] = returncode == 0 and (not cap_gib or result.get("peak_memory_gb", cap_gib + 1) <= cap_gib)
    return result


def _show(events: list[dict], shown: int, t0: float) -> int:
    """Print one line per event after the first `shown` (progress: its first and every tenth step); return the count."""
    for e in events[shown:]:
        if e["type"] == "progress" and e["step"] % 10 and e["step"] != 1:
            continue
        info = {k: e[k] for k in ("step", "loss", "memory_gb", "message", "seconds", "ok", "setup_s") if k in e}
        print(f"    run {e['time'] - t0:6.1f} s: {e['type']} {json.dumps(info, default=str)[:300]}", flush=True)
    return len(events)


# --- 5: module names ----------------------------------------------------------------------------------------------

def _denoiser_keys(keys, family) -> list[str]:
    if family.denoiser_from_original is not None:  # BFL's file: the transformer alone, no prefix
        return list(keys)
    return [k for k in keys if k.startswith("model.diffusion_model.")]


def kohya_reference(checkpoint: Path, folder: Path, family, targets: str) -> set[str]:
    """kohya's module names for this single file at `targets`, read off the keys: the denoiser's original layers in
    its blocks (`lora_unet_` and the path, `_` for `.`: SD3's fused `qkv`, FLUX's `linear1`, which holds a single
    block's q, k, v and MLP input), and the CLIP encoders' layers under kohya's prefixes with CLIP's `text_model`
    level (FLUX.1's CLIP-L from the folder: BFL's file holds the transformer alone). `attn`: the attention layers;
    `attn-mlp`: every linear layer of the blocks, as kohya trains by default."""
    from safetensors import safe_open

    te_layers = r"self_attn\.(q|k|v|out)_proj" if targets == "attn" else r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"
    sources = [(checkpoint, {"text_encoders.clip_l.transformer.": "lora_te1_",
                             "text_encoders.clip_g.transformer.": "lora_te2_"})]
    if family.denoiser_from_original is not None:
        clip_l = KOHYA_TE[family.group]["text_encoder"]
        sources += [(f, {"": clip_l}) for f in (folder / "text_encoder").glob("*.safetensors")]
    names = set()
    for path, te_prefixes in sources:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
            for key in _denoiser_keys(keys, family) if path == checkpoint else []:
                layer = key.removeprefix("model.diffusion_model.").removesuffix(".weight")
                in_blocks = layer.startswith(("joint_blocks.", "double_blocks.", "single_blocks."))
                attention = re.search(r"\.(attn2?|img_attn|txt_attn)\.(qkv|proj)$|\.linear1$", layer)
                if key.endswith(".weight") and in_blocks and (attention if targets == "attn"
                                                              else len(f.get_slice(key).get_shape()) == 2):
                    names.add("lora_unet_" + layer.replace(".", "_"))
            for key in keys:
                prefix = next((p for p in te_prefixes if key.startswith(p)), None)
                layer = key[len(prefix):].removesuffix(".weight") if prefix is not None else ""
                layer = layer if layer.startswith("text_model.") else "text_model." + layer
                if key.endswith(".weight") and re.fullmatch(r"text_model\.encoder\.layers\.\d+\." + te_layers, layer):
                    names.add(te_prefixes[prefix] + layer.replace(".", "_"))
    return names


def original_layers(checkpoint: Path, family) -> dict[str, str]:
    """diffusers transformer weight -> the single file's weight it is read from, by diffusers' own single-file
    converter run on placeholders that carry each file weight's index. Placeholders of 21504 rows fit every split the
    converters make at any width (halves, thirds, and FLUX's linear1 split at 3 x 3072 + 12288)."""
    from diffusers.loaders import single_file_utils
    from safetensors import safe_open

    with safe_open(str(checkpoint), "pt") as f:
        keys = _denoiser_keys(f.keys(), family)
    convert = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers if family.group == "FLUX" \
        else single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers
    placeholders = {k: torch.tensor([i]).expand(21504) for i, k in enumerate(keys)}
    return {k: keys[int(v[0])].removeprefix("model.diffusion_model.") for k, v in convert(placeholders).items()}


def exported_names(lora: Path, checkpoint: Path, family) -> tuple[set[str], set[str]]:
    """(the file's modules, the same in kohya's naming): transformer modules named after the file's layer they are
    part of (original_layers), text-encoder modules under kohya's prefix for their component."""
    from safetensors import safe_open

    with safe_open(str(lora), "pt") as f:
        modules = {k.rsplit(".", 2)[0] for k in f.keys()}  # `<module>.lora_A.weight`, `<module>.lora_B.weight`
    origin = original_layers(checkpoint, family)
    kohya = set()
    for module in modules:
        component, _, path = module.partition(".")
        if component == family.denoiser:
            kohya.add("lora_unet_" + origin[path + ".weight"].removesuffix(".weight").replace(".", "_"))
        else:
            kohya.add(KOHYA_TE[family.group][component] + path.replace(".", "_"))
    return modules, kohya


def names(run: Path, checkpoint: Path, folder: Path, family, targets: str) -> dict:
    from safetensors import safe_open

    modules, ours = exported_names(run / "lora.safetensors", checkpoint, family)
    reference = kohya_reference(checkpoint, folder, family, targets)
    with safe_open(str(run / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    counts = {p: sum(n.startswith(p) for n in ours) for p in ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_")}
    return {"modules": len(modules), "kohya_names": {p: c for p, c in counts.items() if c},
            "kohya_reference": len(reference), "equal_to_kohya": ours == reference,
            "only_ours": sorted(ours - reference)[:5], "only_kohya": sorted(reference - ours)[:5],
            "examples": sorted(ours)[:2],
            "metadata": {k: meta.get(k) for k in ("ss_base_model_version", "modelspec.architecture",
                                                  "modelspec.prediction_type", "ss_resolution")}}


# --- the whole thing, per family ---------------------------------------------------------------------------------

def run_family(name: str, out: Path, args, result: dict, save) -> None:
    """Every phase for one family, into `result` (`save` writes it after each)."""
    from sdlora import families

    device = "cuda" if torch.cuda.is_available() else "cpu"
    family = families.get(name)
    resolution = 64 if args.tiny else RESOLUTION
    result.update(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", phases_s={}, checks={})

    def phase(label: str, t: float, **info) -> None:
        result["phases_s"][label] = round(time.perf_counter() - t, 1)
        print(f"[{name}] {label}: {result['phases_s'][label]} s " + " ".join(f"{k}={v}" for k, v in info.items()),
              flush=True)
        save()

    t = time.perf_counter()
    pipe = build(name, device, args.tiny)
    result["params_m"] = {part: round(sum(p.numel() for p in m.parameters()) / 1e6)
                          for part, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    phase("build", t, params_m=result["params_m"])
    try:
        if "run" in args.phases:
            t = time.perf_counter()
            checkpoint, folder = write_base(pipe, family, out)
            result["checkpoint_gb"], result["folder_gb"] = size_gb(checkpoint), size_gb(folder)
            phase("write", t, checkpoint_gb=result["checkpoint_gb"], folder_gb=result["folder_gb"])
        if "speed" in args.phases:
            t = time.perf_counter()
            phase("speed", t, **speed_phase(pipe, family, resolution, args, device, result))
        pipe = None
        _free(device)
        if "run" in args.phases:
            t = time.perf_counter()
            run = out / f"{name}-run"
            cap = 0 if args.tiny else CAP_GIB[name]
            result["run"] = r = capped_run(checkpoint, folder, draw_dataset(out / f"{name}-data", resolution), run, cap,
                                           args.steps, resolution, args.targets)
            if (run / "events.jsonl").exists():
                shutil.copy(run / "events.jsonl", args.results.with_name(f"{args.results.stem}-{name}-events.jsonl"))
            result["checks"].update(fit=r["fit"], verify=r.get("verify", {}).get("ok", False))
            phase("run", t, returncode=r["returncode"], picks=r.get("picks"), steps_s=r.get("train_steps_s"),
                  peak_gb=r.get("peak_memory_gb"), cap_gib=cap, verify=result["checks"]["verify"], error=r.get("error"))
            if r["returncode"] == 0:
                t = time.perf_counter()
                result["names"] = n = names(run, checkpoint, folder, family, args.targets)
                result["checks"]["equal_to_kohya"] = n["equal_to_kohya"]
                if args.targets == "attn" and not args.tiny:
                    result["checks"]["counts_as_expected"] = n["kohya_names"] == KOHYA_COUNTS[name]
                phase("names", t, modules=n["modules"], kohya=n["kohya_names"], equal=n["equal_to_kohya"])
    finally:  # tens of GB (write_base's names); the numbers are what we keep
        (out / f"{name}.safetensors").unlink(missing_ok=True)
        shutil.rmtree(out / f"{name}-config", ignore_errors=True)


def speed_phase(pipe, family, resolution: int, args, device: str, result: dict) -> dict:
    """speed() into result["speed"] and its checks; what the phase's line shows (an error is shown, not raised)."""
    try:
        result["speed"] = s = speed(pipe, family, resolution, args.speed_steps, args.warmup, device)
    except Exception as e:  # the run still goes on
        import traceback

        result["speed"] = {"error": traceback.format_exc()[-3000:]}
        result["checks"]["same_step"] = False
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    result["checks"]["same_step"] = s["same_step"]["same"]
    if not args.tiny:
        result["checks"]["speedup_2x"] = s["speedup"] >= 2
    return {"reference_ms": round(s["reference"]["ms_per_step"], 1), "sdlora_ms": round(s["sdlora"]["ms_per_step"], 1),
            "speedup": round(s["speedup"], 2), "loss_rel_diff": f"{s['same_step']['loss_rel_diff']:.1e}",
            "grad_cosine": round(s["same_step"]["grad_cosine"], 5)}


def table(r: dict) -> str:
    s, run, n = r.get("speed", {}), r.get("run", {}), r.get("names", {})
    ref, ours, same = s.get("reference", {}), s.get("sdlora", {}), s.get("same_step", {})
    rows = [("parameters (M)", ", ".join(f"{k} {v}" for k, v in r["params_m"].items())),
            ("phases (s)", ", ".join(f"{k} {v}" for k, v in r["phases_s"].items()))]
    if "checkpoint_gb" in r:
        rows.append(("single file, folder", f"{r['checkpoint_gb']} GB, {r['folder_gb']} GB (bf16)"))
    if ref:
        rows += [("step, reference / sdlora", f"{ref['ms_per_step']:.0f} / {ours['ms_per_step']:.0f} ms; "
                                              f"{ref['images_per_s']:.2f} / {ours['images_per_s']:.2f} images/s; "
                                              f"{s['speedup']:.2f}x"),
                 ("peak GPU memory, reference / sdlora", f"{ref['peak_gb']:.1f} / {ours['peak_gb']:.1f} GiB"),
                 ("same step: loss reference / sdlora", f"{same['loss_reference']:.5f} / {same['loss_sdlora']:.5f} "
                                                        f"(rel. {same['loss_rel_diff']:.1e}); gradients cosine "
                                                        f"{same['grad_cosine']:.4f}")]
    if run:
        rows += [(f"run under {run['cap_gib']} GiB", f"exit {run['returncode']}; " + "; ".join(run.get("picks", []))
                  + (f"; {run['error']}" if run.get("error") else "")),
                 (f"{run.get('steps')} steps, peak GPU memory",
                  f"{run.get('train_steps_s')} s, {run.get('images_per_s')} images/s, {run.get('peak_memory_gb')} GiB")]
    if run.get("verify"):
        v = run["verify"]
        rows.append(("keys loaded back by diffusers; strength 0", f"{v['keys_consumed']}/{v['keys_written']}; "
                                                                  f"{v['strength0_max_diff']}"))
    if n:
        rows.append(("modules; in kohya's names = kohya's", f"{n['modules']}; {n['kohya_names']}: "
                                                            f"{'yes' if n['equal_to_kohya'] else 'NO'} "
                                                            f"({n['kohya_reference']})"))
    rows.append(("checks", ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in r["checks"].items())))
    return "\n".join([f"| {r['family']} | {r['device']} |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="working folder (tens of GB at full size)")
    ap.add_argument("--results", type=Path, help="results JSON (default: OUT/results.json)")
    ap.add_argument("--families", nargs="+", default=["sd3.5-medium", "sd3.5-large", "flux.1-dev"],
                    choices=sorted(CAP_GIB))
    ap.add_argument("--phases", nargs="+", default=["speed", "run"], choices=["speed", "run"])
    ap.add_argument("--steps", type=int, default=20, help="steps of the capped run")
    ap.add_argument("--targets", default="attn", choices=["attn", "attn-mlp"], help="the capped run's LoRA targets")
    ap.add_argument("--speed-steps", type=int, default=10, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side (sdlora's one more: its capture)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test on the tests' small models at 64 px")
    args = ap.parse_args()
    if args.tiny:
        args.families = [f for f in args.families if f != "sd3.5-large"]  # one small SD3 model stands for both
        args.speed_steps, args.warmup = 2, 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.results = args.results or out / "results.json"
    args.results.parent.mkdir(parents=True, exist_ok=True)
    results = []
    save = lambda: args.results.write_text(json.dumps(results, indent=2, default=str))  # noqa: E731
    for name in args.families:
        t = time.perf_counter()
        results.append({"family": name})
        try:
            run_family(name, out, args, results[-1], save)
        except Exception as e:  # keep what the other families give
            import traceback

            results[-1].update(error=traceback.format_exc()[-3000:], checks={"ran": False})
            print(f"[{name}] failed: {type(e).__name__}: {e}", flush=True)
        save()
        print(f"[{name}] total: {time.perf_counter() - t:.1f} s", flush=True)
    for r in results:
        if "error" not in r:
            print(table(r) + "\n")
    sys.exit(0 if all(all(r["checks"].values()) for r in results) else 1)


if __name__ == "__main__":
    main()
