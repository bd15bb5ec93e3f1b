"""Pretrain the embedded tiny base model from scratch on the procedural world: the autoencoder, then the UNet and
the text encoder together. Writes a diffusers folder (fp16 storage, fp32 on a plain CPU load) plus its logs.

    python -m sdlora.tiny.pretrain --out DIR [--vae-steps N --unet-steps M --batch B --seed S]

The architecture is `scripts/make_tiny.py`'s (ARCHITECTURES[--arch], TEXT, SCHEDULER). Images come from `world.make_batch`,
rendered once into a pool held on the device as uint8 (rendering is CPU-bound; the pool is made by all cores).
Besides the model folder, DIR gets `pretrain_log.json` (every logged loss, the timings and the autoencoder check)
and `vae_recon.png` (held-out images over their reconstructions).
"""

import argparse
import copy
import json
import math
import multiprocessing
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdlora.tiny import MODEL_DIR, checker, world

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from make_tiny import ARCHITECTURES, SCHEDULER, TEXT  # noqa: E402  the one description of the architecture
from make_tokenizer import compact  # noqa: E402

_CHUNK = 500  # images per pool-rendering task; chunk i is make_batch(_CHUNK, seed * 1_000_000 + i)
EVAL_SEED_BASE = 10**9  # held-out scenes (the autoencoder check here, eval.py) draw from seeds at or above this


def _render_chunk(seed: int):
    images, captions = world.make_batch(_CHUNK, seed)
    return np.stack([np.asarray(im, dtype=np.uint8) for im in images]), captions


def render_pool(n: int, seed: int, workers: int):
    """`n` world images (textures included) as a uint8 (n, 64, 64, 3) array with their captions, deterministic in `seed`."""
    seeds = [seed * 1_000_000 + i for i in range(math.ceil(n / _CHUNK))]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        parts = pool.map(_render_chunk, seeds, chunksize=4)
    images = np.concatenate([p[0] for p in parts])[:n]
    captions = [c for p in parts for c in p[1]][:n]
    return images, captions


def heldout_scenes(n: int, seed: int = 0):
    """Single-object plain scenes with full captions, from seeds the training pool never uses (plain, so the
    checker's colour and shape reading applies)."""
    rng = random.Random(EVAL_SEED_BASE + seed)
    scenes = [world.sample_scene(rng, max_objects=1) for _ in range(n)]
    return scenes, [world.caption(s) for s in scenes]


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids exactly as StableDiffusionPipeline makes them (pad to 77 with the tokenizer's pad token)."""
    unique = sorted(set(captions))
    ids = tokenizer(unique, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    row = {c: i for i, c in enumerate(unique)}
    return ids[torch.tensor([row[c] for c in captions])]


def to_pixels(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous(memory_format=torch.channels_last)


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    arr = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def save_pipeline(out: Path, vae, text_encoder, unet, tokenizer) -> None:
    """Write a diffusers folder atomically: fp16 storage, and a text-encoder config that loads as fp32."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).cpu(), text_encoder=copy.deepcopy(text_encoder).cpu(), tokenizer=tokenizer,
        # SD1.5's noise schedule, sampled with Euler: with PNDM (SD1.5's own default) this model follows prompts
        # clearly worse at 25 steps (docs/tiny-model.md)
        unet=copy.deepcopy(unet).cpu(),
        scheduler=EulerDiscreteScheduler.from_config(SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(str(tmp), safe_serialization=True)
    compact(tmp / "tokenizer")
    # transformers loads a model in its config's dtype (as make_tiny.py does): fp16 on disk, fp32 when loaded.
    te_config = tmp / "text_encoder" / "config.json"
    te_config.write_text(te_config.read_text().replace('"dtype": "float16"', '"dtype": "float32"'))
    for sub in ("unet", "vae"):  # a model loaded by --init remembers its folder; the shipped config should not
        config_path = tmp / sub / "config.json"
        config = json.loads(config_path.read_text())
        config.pop("_name_or_path", None)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for sub in tmp.iterdir():  # replace the model parts only; logs beside them in `out` stay
        dest = out / sub.name
        if dest.is_dir():
            shutil.rmtree(dest)
        elif dest.exists():
            dest.unlink()
        sub.rename(dest)
    tmp.rmdir()


def cosine_schedule(opt, warmup: int, total: list[int]):
    """Linear warm-up, then cosine to 0 at total[0] steps; total[0] may be set later (see `Budget`)."""
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total[0] - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class Budget:
    """Fits a stage into a wall-clock budget: after a few steps, and again every `refit` steps, shortens its step count
    (and so its cosine) to what the measured rate allows in the time left; it never lengthens it, so a rate that
    drops (another job on the same GPU) cannot overrun the budget. Run logs record the steps each stage made."""

    def __init__(self, steps: int, seconds: float | None, probe: tuple[int, int] = (5, 30), refit: int = 200):
        self.total, self.seconds, self.probe, self.refit, self.t0 = [steps], seconds, probe, refit, time.time()
        self.mark = None  # (step, time) the next rate is measured from

    def tick(self, step: int):
        if not self.seconds:
            return
        now = time.time()
        if step == self.probe[0]:
            self.mark = (step, now)
        elif self.mark and (step == self.probe[1] or (step > self.probe[1] and step % self.refit == 0)):
            rate = (step - self.mark[0]) / (now - self.mark[1])
            left = self.seconds - (now - self.t0)
            total = max(step + 1, min(self.total[0], step + int(rate * left)))
            if total != self.total[0] or step == self.probe[1]:
                print(f"budget: {rate:.2f} steps/s, {left:.0f} s left -> {total} steps", flush=True)
            self.total[0], self.mark = total, (step, now)


class Log:
    """Losses to stdout and to a JSON file rewritten (atomically) at every record."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.data, self.t0 = path, {"meta": meta, "records": [], "summary": {}}, time.time()

    def record(self, **rec):
        rec["elapsed_s"] = round(time.time() - self.t0, 1)
        self.data["records"].append(rec)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()), flush=True)
        self.flush()

    def summary(self, **kv):
        self.data["summary"].update(kv)
        print("summary " + json.dumps(kv), flush=True)
        self.flush()

    def flush(self):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def _grad_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between the image gradients of a and b: keeps the autoencoder's edges (and so the shapes) crisp."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return (dx(a) - dx(b)).abs().mean() + (dy(a) - dy(b)).abs().mean()


def check_autoencoder(vae, device, n: int = 200) -> dict:
    """Checker accuracy on held-out images and on their reconstructions: the ceiling the UNet can reach."""
    scenes, prompts = heldout_scenes(n, seed=7)
    originals = [world.render(s) for s in scenes]
    x = to_pixels(torch.from_numpy(np.stack([np.asarray(im) for im in originals])).to(device))
    with torch.no_grad():
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
    result = {}
    for name, images in (("orig", originals), ("recon", to_pil(recon))):
        checks = [checker.check(im, p) for im, p in zip(images, prompts)]
        for key in ("background_ok", "object_color_ok", "shape_ok"):
            result[f"{name}_{key[:-3]}"] = float(np.mean([c[key] for c in checks]))
    result.update(dataset_round_trips(vae, device))
    # Rows: held-out originals, their reconstructions, then textured world images and theirs.
    textured = to_pixels(torch.from_numpy(np.stack([np.asarray(im) for im in world.make_batch(16, EVAL_SEED_BASE)[0]]))
                         .to(device))
    with torch.no_grad():
        textured_recon = vae.decode(vae.encode(textured).latent_dist.mode()).sample
    grid = Image.new("RGB", (16 * 64, 4 * 64))
    for i, im in enumerate(to_pil(torch.cat([x[:16], recon[:16], textured, textured_recon]))):
        grid.paste(im, ((i % 16) * 64, (i // 16) * 64))
    return result, grid


DETAILS = {"style": "hatching_score", "character": "eye_pair_score"}  # each example dataset's defining detail


def dataset_round_trips(vae, device, size: int = 64) -> dict:
    """Each example dataset's detail score on its images at `size` px and on their autoencoder round trips."""
    root = Path(__file__).resolve().parents[2] / "datasets"
    result = {}
    for name, score_name in DETAILS.items():
        score = getattr(checker, score_name)
        images = [Image.open(p).convert("RGB").resize((size, size), Image.LANCZOS)
                  for p in sorted((root / name).glob("*.png"))]
        x = to_pixels(torch.from_numpy(np.stack([np.asarray(im) for im in images])).to(device))
        with torch.no_grad():
            recon = to_pil(vae.decode(vae.encode(x).latent_dist.mode()).sample)
        result[f"{name}_{score_name}_images"] = float(np.mean([score(im) for im in images]))
        result[f"{name}_{score_name}_round_trips"] = float(np.mean([score(im) for im in recon]))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="diffusers folder to write (created; model parts replaced)")
    ap.add_argument("--vae-steps", type=int, default=3000, help="autoencoder steps")
    ap.add_argument("--unet-steps", type=int, default=8000, help="UNet + text encoder steps")
    ap.add_argument("--batch", type=int, default=1024, help="UNet batch (the model is tiny: big batches are cheap)")
    ap.add_argument("--vae-batch", type=int, default=256, help="autoencoder batch")
    ap.add_argument("--lr", type=float, default=1e-3, help="UNet + text encoder peak learning rate (AdamW, cosine)")
    ap.add_argument("--vae-lr", type=float, default=1e-3, help="autoencoder peak learning rate")
    ap.add_argument("--warmup", type=int, default=300, help="linear warm-up steps, both stages")
    ap.add_argument("--kl", type=float, default=1e-6, help="KL weight (per-sample KL sum vs per-pixel mean loss)")
    ap.add_argument("--edge", type=float, default=0.5, help="weight of the image-gradient L1 in the VAE loss")
    ap.add_argument("--cfg-drop", type=float, default=0.1, help="captions replaced by '' (classifier-free guidance)")
    ap.add_argument("--offset-noise", type=float, default=0.1,
                    help="per-channel constant added to the noise, so flat backgrounds of any brightness come out "
                         "(crosslabs.org/blog/diffusion-with-offset-noise)")
    ap.add_argument("--high-noise", type=float, default=0.0,
                    help="share of each batch's timesteps drawn from the noisiest quarter of the schedule instead of "
                         "all of it (the steps multistep samplers such as PNDM extrapolate from)")
    ap.add_argument("--snr-gamma", type=float, default=5.0, help="Min-SNR loss weighting (arXiv:2303.09556); 0: off")
    ap.add_argument("--ema", type=float, default=0.999, help="EMA decay of UNet and text-encoder weights; 0: off")
    ap.add_argument("--vae-seconds", type=float, help="cap the autoencoder stage at this wall time (fewer steps)")
    ap.add_argument("--unet-seconds", type=float, help="cap the UNet stage at this wall time (fewer steps)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet and text encoder")
    ap.add_argument("--arch", default="x8", choices=list(ARCHITECTURES),
                    help="autoencoder factor (scripts/make_tiny.py): x8 (8x8 latents, shipped) or x4 (16x16)")
    ap.add_argument("--init", help="start from this diffusers folder's parts (with --vae-steps 0: keep its VAE); a "
                    "part it lacks (unet, text_encoder) starts from scratch as --arch describes it")
    ap.add_argument("--decoder-only", action="store_true",
                    help="with --init: train only the autoencoder's decoder; the latents, and so the UNet, stay valid")
    ap.add_argument("--decode-mean", action="store_true",
                    help="with --decoder-only: decode the posterior mean, as sampling does, not a sample of it (a "
                         "decoder trained on samples learns to smooth over their noise and softens thin lines)")
    ap.add_argument("--object-weight", type=float, default=4.0, help="extra VAE loss weight on object pixels")
    ap.add_argument("--texture-boost", type=float, default=3.0,
                    help="autoencoder batches draw images with a named texture or eyes this many times more often")
    ap.add_argument("--pool", type=int, default=200_000, help="world images rendered once and sampled from")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="processes rendering the pool")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--save-every", type=int, default=2000, help="UNet steps between intermediate saves")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokenizer", default=str(Path(MODEL_DIR) / "tokenizer"))
    args = ap.parse_args()
    if args.decode_mean and not args.decoder_only:
        # with the encoder training, its std would get no reconstruction signal and the KL term would widen it
        ap.error("--decode-mean needs --decoder-only (and --init)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # every shape is fixed
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    log = Log(out / "pretrain_log.json", {"args": vars(args), "argv": sys.argv,
                                          "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                                          "torch": torch.__version__})

    # Data: the pool of world images and their token ids, on the device.
    t = time.time()
    pool_np, captions = render_pool(args.pool, args.seed, args.workers)
    images = torch.from_numpy(pool_np).to(device)
    tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer)
    input_ids = tokenize(tokenizer, captions).to(device)
    empty_ids = tokenize(tokenizer, [""]).to(device)
    log.summary(pool_images=len(captions), pool_s=round(time.time() - t, 1), example_captions=captions[:5])
    gen = torch.Generator(device).manual_seed(args.seed)

    # Stage 1: the autoencoder (object-weighted reconstruction L1 + MSE, edge L1, a small KL).
    if args.init:
        vae = AutoencoderKL.from_pretrained(args.init, subfolder="vae").to(device, memory_format=torch.channels_last)
    else:
        vae = AutoencoderKL(**ARCHITECTURES[args.arch][1]).to(device, memory_format=torch.channels_last)
    if args.decoder_only:  # the encoder (and so every latent the UNet learned from) stays as it is
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=args.vae_lr, betas=(0.9, 0.99),
                            weight_decay=0.0)
    # Thin lines and eyes are the hardest part to reconstruct and a minority of the pool: show them more often.
    words = world.OBJECT_PATTERNS + world.BACKGROUND_PATTERNS + ("eyes",)
    textured = torch.tensor([any(w in c.split() for w in words) for c in captions], dtype=torch.float32)
    vae_draw = (1 + args.texture_boost * textured).to(device)
    budget = Budget(args.vae_steps, args.vae_seconds)
    lr_sched = cosine_schedule(opt, args.warmup, budget.total)
    t, step = time.time(), 0
    while step < budget.total[0]:
        step += 1
        x = to_pixels(images[torch.multinomial(vae_draw, args.vae_batch, replacement=True, generator=gen)])
        with autocast:
            posterior = vae.encode(x).latent_dist
            latents = posterior.mode() if args.decode_mean else posterior.sample(generator=gen)
            recon = vae.decode(latents).sample.float()
        # Objects and textures cover a small part of each image: weigh their pixels up so small shapes keep colour
        # and outline and thin lines stay. The background is each image's median colour (textures cover under half).
        median = x.flatten(2).median(dim=2).values[:, :, None, None]
        weight = 1 + args.object_weight * ((x - median).abs().sum(1, keepdim=True) > 0.1).float()
        err = recon - x
        l1, mse, edge = (weight * err.abs()).mean(), (weight * err**2).mean(), _grad_l1(recon, x)
        kl = posterior.kl().float().mean()
        loss = l1 + mse + args.edge * edge + args.kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in vae.parameters() if p.requires_grad], 1.0)
        opt.step()
        lr_sched.step()
        budget.tick(step)
        if step % args.log_every == 0 or step == budget.total[0]:
            log.record(stage="vae", step=step, loss=loss.item(), l1=l1.item(), mse=mse.item(), edge=edge.item(),
                       kl=kl.item(), lr=lr_sched.get_last_lr()[0], steps_per_s=round(step / (time.time() - t), 2))
    if step:
        log.summary(vae_steps=step, vae_s=round(time.time() - t, 1),
                    final_vae_loss=dict(l1=l1.item(), mse=mse.item(), edge=edge.item(), kl=kl.item()))
    vae.eval().requires_grad_(False)

    # Latents of the whole pool, once: the UNet stage samples from these posteriors and never runs the VAE. Encoded
    # under bf16 autocast on any device (on a CPU twice as fast as fp32; on a GPU what the training steps use too).
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        dists = [vae.encode(to_pixels(images[i:i + 4096])).latent_dist for i in range(0, len(images), 4096)]
    lat_mean = torch.cat([d.mean.float() for d in dists])
    lat_std = torch.cat([d.std.float() for d in dists])
    del dists
    sample = lat_mean[:20000] + lat_std[:20000] * torch.randn(lat_mean[:20000].shape, device=device, generator=gen)
    # A new encoder gets its own scaling; an --init one (or a retrained decoder only) keeps its own.
    scaling_factor = 1.0 / sample.std().item() if step and not args.decoder_only else vae.config.scaling_factor
    vae.register_to_config(scaling_factor=scaling_factor)
    ae_check, recon_grid = check_autoencoder(vae, device)
    recon_grid.save(out / "vae_recon.png")
    log.summary(scaling_factor=scaling_factor, latent_mean=sample.mean().item(),
                latent_posterior_std=lat_std.mean().item(), vae_check=ae_check)

    # Stage 2: UNet + text encoder, epsilon prediction under SD1.5's noise schedule.
    # each part --init holds goes on from there (a folder this script wrote); a part it lacks starts from scratch
    def held(part: str) -> bool:
        return bool(args.init) and (Path(args.init) / part).is_dir()
    unet = UNet2DConditionModel.from_pretrained(args.init, subfolder="unet", torch_dtype=torch.float32) \
        if held("unet") else UNet2DConditionModel(**ARCHITECTURES[args.arch][0])
    text_encoder = CLIPTextModel.from_pretrained(args.init, subfolder="text_encoder", dtype=torch.float32) \
        if held("text_encoder") else CLIPTextModel(CLIPTextConfig(**TEXT))
    unet, text_encoder = unet.to(device), text_encoder.to(device)
    noise_scheduler = DDPMScheduler(**{k: SCHEDULER[k] for k in ("num_train_timesteps", "beta_start", "beta_end",
                                                                  "beta_schedule", "prediction_type")})
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    snr_all = alphas_cumprod / (1 - alphas_cumprod)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema_params = [p.detach().clone().float() for p in params] if args.ema else None
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    budget = Budget(args.unet_steps, args.unet_seconds)
    lr_sched = cosine_schedule(opt, args.warmup, budget.total)
    # torch.compile cuts the per-op Python overhead that bounds this tiny model's steps; eager if it fails.
    unet_fwd, te_fwd = (torch.compile(unet), torch.compile(text_encoder)) if args.compile else (unet, text_encoder)

    def save(tag: str):
        if ema_params is not None:  # save the averaged weights, not the live ones
            live = [p.detach().clone() for p in params]
            torch._foreach_copy_([p.data for p in params], ema_params)
        save_pipeline(out, vae, text_encoder, unet, tokenizer)
        if ema_params is not None:
            torch._foreach_copy_([p.data for p in params], live)
        log.summary(saved=tag)

    save("after the autoencoder stage")
    t, loss_avg, step = time.time(), None, 0
    while step < budget.total[0]:
        step += 1
        idx = torch.randint(len(images), (args.batch,), device=device, generator=gen)
        latents = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, device=device, generator=gen)
        latents = latents * scaling_factor
        ids = torch.where(torch.rand(args.batch, 1, device=device, generator=gen) < args.cfg_drop,
                          empty_ids, input_ids[idx])
        noise = torch.randn(latents.shape, device=device, generator=gen)
        noise = noise + args.offset_noise * torch.randn(*latents.shape[:2], 1, 1, device=device, generator=gen)
        total_t = noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, total_t, (args.batch,), device=device, generator=gen)
        if args.high_noise:
            noisiest = torch.randint(total_t * 3 // 4, total_t, (args.batch,), device=device, generator=gen)
            timesteps = torch.where(torch.rand(args.batch, device=device, generator=gen) < args.high_noise,
                                    noisiest, timesteps)
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        def backward(te_fn, unet_fn):
            with autocast:
                encoder_hidden_states = te_fn(ids)[0]
                model_pred = unet_fn(noisy_latents, timesteps, encoder_hidden_states).sample
            loss = F.mse_loss(model_pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
            if args.snr_gamma:
                snr = snr_all[timesteps]
                loss = loss * torch.clamp(snr, max=args.snr_gamma) / snr
            loss = loss.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            return loss

        try:
            loss = backward(te_fwd, unet_fwd)
        except Exception as err:  # noqa: BLE001  only the compiled path can land here: go on eager
            if unet_fwd is unet:
                raise
            print(f"torch.compile failed ({type(err).__name__}: {str(err)[:300]}); continuing eager", flush=True)
            unet_fwd, te_fwd = unet, text_encoder
            loss = backward(te_fwd, unet_fwd)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        if ema_params is not None:
            decay = min(args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, [p.detach().float() for p in params], 1 - decay)
        budget.tick(step)
        if step % args.log_every == 0 or step == budget.total[0]:
            loss_avg = loss.item()
            log.record(stage="unet", step=step, loss=loss_avg, lr=lr_sched.get_last_lr()[0],
                       steps_per_s=round(step / (time.time() - t), 2))
        if step % args.save_every == 0 and step < budget.total[0]:
            save(f"unet step {step}")
    log.summary(unet_steps=step, unet_s=round(time.time() - t, 1), final_unet_loss=loss_avg)
    save("final")


if __name__ == "__main__":
    main()
