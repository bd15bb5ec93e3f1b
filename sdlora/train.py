"""The training loop under accelerate: caches, the step, samples, saves, resume, stop, and the run's events."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sdlora import dataset as ds
from sdlora.config import TrainConfig
from sdlora.errors import UserError
from sdlora.export import kohya_metadata, verify, write_diffusers_layout
from sdlora.lora import TEXT_TARGETS, UNET_TARGETS, add_adapters, kohya_state_dict, save_lora
from sdlora.models import FAMILIES, load_base, memory_defaults
from sdlora.runs import CONTROL_FILES, EventLog, take_request, write_atomic


def train(config: TrainConfig, run_dir: str | Path, *, resume: bool = False, progress_bar: bool = True) -> Path:
    """Train the LoRA that `config` describes into `run_dir`; return the path of the final adapter file.

    Stops cleanly (saving first) on SIGINT/SIGTERM or a STOP file. User errors raise `UserError` after an `error`
    event; the same config and seed give the same run, and `resume=True` continues from the last checkpoint.
    """
    from accelerate import Accelerator

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        config.validate()
    except UserError as e:  # the app and other readers learn of it from the run folder too
        EventLog(run_dir).emit("error", message=e.message, hint=e.hint)
        raise
    # cpu=True when there is no GPU: it is what makes accelerate join several CPU processes over gloo
    accelerator = Accelerator(mixed_precision=_precision(config.mixed_precision),
                              gradient_accumulation_steps=config.grad_accum, cpu=not torch.cuda.is_available())
    events = EventLog(run_dir, enabled=accelerator.is_main_process, echo=progress_bar)
    if accelerator.is_main_process:
        write_atomic(run_dir / "config.json", config.to_json())
        for name in CONTROL_FILES:  # requests left over from an earlier process are stale
            (run_dir / name).unlink(missing_ok=True)
    stop = _StopSignals()
    try:
        return _train(config, run_dir, accelerator, events, stop, resume, progress_bar)
    except UserError as e:
        events.emit("error", message=e.message, hint=e.hint)
        raise
    except torch.OutOfMemoryError:
        events.emit("error", message="out of memory", hint="lower batch_size or resolution, or turn on gradient_checkpointing")
        raise UserError("out of memory", "lower batch_size or resolution, or turn on gradient_checkpointing") from None
    except Exception as e:
        events.emit("error", message=f"{type(e).__name__}: {e}", hint="see log.txt in the run folder")
        raise
    finally:
        stop.restore()


def _train(config, run_dir, accelerator, events, stop, resume, progress_bar) -> Path:
    started_at = time.time()
    device = accelerator.device

    # 1. Data: every image opened and checked once; captions fixed; buckets from the base's resolution.
    data = ds.ingest(config.dataset, trigger=config.trigger, caption_template=config.caption_template)
    base = load_base(config.base, base_config=config.base_config, prediction_type=config.prediction_type)
    pipe = base.pipe
    vae, unet = pipe.vae, pipe.unet
    text_encoders = list(base.text_encoders().values())  # SDXL: CLIP-L and OpenCLIP-G, conditioned on together
    tokenizers = [pipe.tokenizer, pipe.tokenizer_2] if len(text_encoders) > 1 else [pipe.tokenizer]
    sdxl = base.family == "sdxl"
    if device.type == "cuda" and config.auto_memory:
        config = _memory_defaults(config, base.family, accelerator, events, run_dir)
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    resolution = config.resolution or base.resolution
    step_px = 8 * vae_factor  # latent sides must survive the UNet's three halvings
    buckets = ds.make_buckets(resolution, step=step_px)
    if resolution % step_px:
        events.emit("warning", message=f"resolution {resolution} rounded down to {resolution // step_px * step_px}")
    records = data.records
    samples = ds.expand_repeats(records)
    bucket_of = [ds.nearest_bucket(*r.image.size, buckets) for r in records]
    for w in data.warnings:
        events.emit("warning", message=w)
    for name, reason in data.rejected:
        events.emit("warning", message=f"skipped {name}: {reason}")
    tokenizer = tokenizers[0]
    long = [r.name for r in records if len(tokenizer(r.caption).input_ids) > tokenizer.model_max_length]
    if long:
        events.emit("warning", message=f"{len(long)} captions are longer than {tokenizer.model_max_length - 2} tokens "
                                       f"and will be cut (e.g. {long[0]})")

    # 2. Models: frozen base in the compute dtype; the VAE stays fp32 (fp16 VAEs overflow into NaNs).
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    noise_scheduler = _ddpm(pipe.scheduler.config)
    vae.requires_grad_(False).to(device, torch.float32)
    for text_encoder in text_encoders:
        text_encoder.requires_grad_(False).to(device, weight_dtype)
    unet.requires_grad_(False).to(device, weight_dtype)

    # 3. Adapters: fp32 LoRA parameters on top of the frozen base (updates would vanish in fp16), their initial
    #    values drawn from the run's seed.
    torch.manual_seed(config.seed)
    unet_params = add_adapters(unet, UNET_TARGETS[config.targets], config.rank, config.alpha, config.lora_dropout)
    te_params = []
    if config.train_text_encoder:
        for text_encoder in text_encoders:
            te_params += add_adapters(text_encoder, TEXT_TARGETS[config.targets], config.rank, config.alpha,
                                      config.lora_dropout)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            for text_encoder in text_encoders:
                text_encoder.gradient_checkpointing_enable()

    # 4. Caches: latents once per image (and per flip), with SDXL's size/crop conditioning; text embeddings once when
    #    the text encoder is frozen and captions don't change between steps (kohya refuses caching with shuffle for
    #    the same reason).
    #    With several processes each encodes its share and they swap results, so every cache is computed once.
    latent_cache = _shared(accelerator, lambda share: _cache_latents(vae, records, bucket_of, config.flip, device, share)) \
        if config.cache_latents and not config.random_crop else None
    text_cache = None
    if not config.train_text_encoder and not config.shuffle_tags:
        texts = sorted({r.caption for r in records} | {""})
        text_cache = _shared(accelerator, lambda share: _cache_text(tokenizers, text_encoders, texts, device, share))

    # 5. Optimizer and schedule.
    groups = [{"params": unet_params, "lr": config.unet_lr}]
    if te_params:
        groups.append({"params": te_params, "lr": config.text_encoder_lr})
    optimizer = _optimizer(config, groups)
    from diffusers.optimization import get_scheduler

    # accelerate steps a prepared schedule once per process each optimizer step, hence the factor
    n = accelerator.num_processes
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer,
                                 num_warmup_steps=round(config.warmup_fraction * config.steps) * n,
                                 num_training_steps=config.steps * n, num_cycles=config.lr_cycles)
    trained = [unet, *text_encoders] if te_params else [unet]
    prepared = accelerator.prepare(*trained, optimizer, lr_scheduler)
    trained, optimizer, lr_scheduler = list(prepared[:-2]), prepared[-2], prepared[-1]
    unet = trained[0]  # the step calls the prepared models (DistributedDataParallel on several GPUs)
    if te_params:
        text_encoders = trained[1:]
    _register_adapter_checkpointing(accelerator)

    # 6. Resume: weights, optimizer, schedule; data order and noise are functions of (seed, step), so they follow.
    step = 0
    checkpoints = run_dir / "checkpoints"
    if resume and (last := _last_checkpoint(checkpoints)) is not None:
        accelerator.load_state(str(last))
        step = int(last.name.split("-")[1])
        saved_with = json.loads((last / "sdlora.json").read_text()).get("processes", 1) \
            if (last / "sdlora.json").exists() else 1
        changed = "" if saved_with == accelerator.num_processes else \
            f"; it was saved with {saved_with} process(es), now {accelerator.num_processes}: the global batch is " \
            f"{config.batch_size * config.grad_accum * accelerator.num_processes} images instead of " \
            f"{config.batch_size * config.grad_accum * saved_with}"
        events.emit("warning", message=f"resumed from {last.name}{changed}")
    sample_every = config.sample_every or max(1, config.steps // 4)
    save_every = config.save_every or max(1, config.steps // 4)
    prompts = config.sample_prompts or [r.caption for r in records[:2]]
    images_per_step = config.batch_size * config.grad_accum * accelerator.num_processes
    events.emit("start", config=config.__dict__, family=base.family, resolution=resolution, buckets=len(buckets),
                images=len(records), rejected=len(data.rejected), samples_per_epoch=len(samples),
                total_steps=config.steps, start_step=step, device=str(device), precision=accelerator.mixed_precision,
                batch_per_gpu=config.batch_size, global_batch=images_per_step,
                epochs=round(config.steps * images_per_step / len(samples), 2))

    def save(step: int, final: bool) -> Path:
        name = "lora.safetensors" if final else f"lora-step-{step:06d}.safetensors"
        path = run_dir / name
        if accelerator.is_main_process:
            net_unet = accelerator.unwrap_model(unet)
            net_tes = [accelerator.unwrap_model(m) for m in trained[1:]]
            meta = kohya_metadata(config, family=base.family, resolution=resolution, step=step,
                                  epoch=math.ceil(step * images_per_step / len(samples)), num_images=len(records),
                                  tag_frequency=ds.tag_frequency(records), started_at=started_at,
                                  title=config.title or run_dir.name, prediction_type=base.prediction_type)
            state = kohya_state_dict(net_unet, dict(zip(base.text_encoders(), net_tes)),
                                     sgm_unet=FAMILIES[base.family]["sgm_unet"])
            save_lora(path, state, meta)
            if final and config.export_diffusers:
                write_diffusers_layout(run_dir / "lora-diffusers.safetensors", net_unet, net_tes, config)
            events.emit("save", step=step, path=str(path))
        accelerator.save_state(str(checkpoints / f"step-{step:06d}"))
        if accelerator.is_main_process:
            write_atomic(checkpoints / f"step-{step:06d}" / "sdlora.json",
                         json.dumps({"step": step, "processes": accelerator.num_processes}))
            for old in sorted(checkpoints.glob("step-*"))[:-config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    def finish(step: int, kind: str) -> Path:
        path = save(step, final=True)
        if accelerator.is_main_process:
            result = verify(path, config.base, base_config=config.base_config,
                            prediction_type=config.prediction_type)
            events.emit("verify", **result)
            if not result["ok"]:
                raise RuntimeError(f"export check failed for {path.name}: {result}")
            events.emit(kind, step=step, path=str(path))
        accelerator.wait_for_everyone()
        return path

    bar = None
    if progress_bar and accelerator.is_local_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=step, desc="training", unit="step", dynamic_ncols=True)
    loss_ema, t_last, step_last, last_good = None, time.perf_counter(), step, None
    for m in trained:
        m.train()

    while True:
        # Once in a while: samples (a step-0 baseline first), saves, and requests from the run folder.
        done = step >= config.steps
        stop_now, sample_now, save_now = _requests(accelerator, run_dir, stop.requested, step)
        if step % sample_every == 0 or done or sample_now:
            _sample(accelerator, pipe, trained, config, prompts, resolution, step, run_dir, events)
        if stop_now:
            return finish(step, "stopped")
        if done:
            return finish(step, "done")
        if step > 0 and (step % save_every == 0 or save_now):
            last_good = save(step, final=False)

        # The step: encode, add noise, predict, loss, backward, update.
        for micro in range(config.grad_accum):
            k = step * config.grad_accum + micro  # micro-batch index: the data position
            global_batch = batch_at(k, config, records, samples, bucket_of, accelerator.num_processes)
            mine = slice(accelerator.process_index * config.batch_size, (accelerator.process_index + 1) * config.batch_size)
            idx, captions, rngs, gens = (list(x) for x in zip(*global_batch[mine]))
            with accelerator.accumulate(*trained):
                if latent_cache is not None:
                    flips = [config.flip and rng.random() < 0.5 for rng in rngs]
                    cached = [latent_cache[(i, f)] for i, f in zip(idx, flips)]
                    mean, std, time_ids = (torch.stack(t) for t in zip(*cached))
                    latents = mean + std * _randn(mean.shape[1:], gens).to(device)
                else:
                    images = [ds.prepare_image(records[i].image, bucket_of[i], random_crop=config.random_crop,
                                               flip=config.flip, rng=rng) for i, rng in zip(idx, rngs)]
                    pixels = torch.stack([im[0] for im in images]).to(device)
                    time_ids = torch.stack([_time_ids(im[2], im[1], bucket_of[i]) for im, i in zip(images, idx)])
                    with torch.no_grad():
                        dist = vae.encode(pixels).latent_dist
                    _check_finite(dist.mean, ", ".join(records[i].name for i in idx))
                    latents = dist.mean + dist.std * _randn(dist.mean.shape[1:], gens).to(device)
                latents = (latents * vae.config.scaling_factor).to(weight_dtype)
                if text_cache is not None:
                    encoder_hidden_states = torch.stack([text_cache[c][0] for c in captions])
                    pooled = torch.stack([text_cache[c][1] for c in captions]) if sdxl else None
                else:
                    encoder_hidden_states, pooled = _encode_text(tokenizers, text_encoders, captions, device)
                # SDXL also conditions on the pooled text embedding and each image's size, crop and target size
                added_cond_kwargs = {"text_embeds": pooled, "time_ids": time_ids.to(device)} if sdxl else None

                noise = _randn(latents.shape[1:], gens).to(device, latents.dtype)
                if config.noise_offset:  # https://www.crosslabs.org/blog/diffusion-with-offset-noise
                    noise += config.noise_offset * _randn(latents.shape[1:2] + (1, 1), gens).to(noise)
                timesteps = torch.cat([torch.randint(0, noise_scheduler.config.num_train_timesteps, (1,), generator=g)
                                       for g in gens]).to(device)
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                if noise_scheduler.config.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    target = noise
                with accelerator.autocast():
                    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states,
                                      added_cond_kwargs=added_cond_kwargs).sample
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                loss = (loss * _min_snr_weights(noise_scheduler, timesteps, config.min_snr_gamma)).mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet_params + te_params, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

        loss_value = accelerator.gather(loss.detach()).mean().item()
        if not math.isfinite(loss_value):
            keep = f"; the last good save is {last_good.name}" if last_good else ""
            raise UserError(f"the loss became {loss_value} at step {step + 1}{keep}",
                            "lower unet_lr/text_encoder_lr, or use bf16/fp32 instead of fp16")
        step += 1
        loss_ema = loss_value if loss_ema is None else 0.9 * loss_ema + 0.1 * loss_value
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_ema:.4f}")
        now = time.perf_counter()
        # at least once a second, and at least ~100 times a run so that a short run still draws a loss curve
        if now - t_last >= 1.0 or step % max(1, config.steps // 100) == 0 or step == config.steps:
            rate = (step - step_last) / (now - t_last)
            events.emit("progress", step=step, total=config.steps, loss=loss_value, loss_ema=loss_ema,
                        lr=lr_scheduler.get_last_lr()[0], images_per_s=rate * images_per_step,
                        eta_s=(config.steps - step) / max(rate, 1e-9), memory_gb=_memory_gb(device))
            t_last, step_last = now, step


def batch_at(k: int, config: TrainConfig, records, samples: list[int], bucket_of, processes: int = 1) -> list[tuple]:
    """The global micro-batch `k` (batch_size x processes images): per image its record index, its caption, and the
    random.Random and torch.Generator for its crop, flip, noise and timestep. Process p trains slice p.

    A pure function of (seed, k, processes): epochs are shuffled per (seed, epoch) and every image draws from its own
    seeded generators, so a resumed run sees what a run without a break would have, and N processes with batch B
    see what one process with batch N x B would.
    """
    size = config.batch_size * processes
    buckets = [bucket_of[i] for i in samples]
    per_epoch = len(ds.epoch_batches(buckets, size, random.Random(0)))
    epoch, position = divmod(k, per_epoch)
    batch = ds.epoch_batches(buckets, size, random.Random(config.seed * 100_003 + epoch))[position]
    if processes > 1:  # a bucket's last batch, topped up so that no process is left without images
        batch = (batch * size)[:size]
    out = []
    for j, i in enumerate(batch):
        seed = (config.seed * 1_000_003 + k) * 4099 + j
        rng = random.Random(seed)
        caption = ds.build_caption(records[samples[i]].caption, shuffle=config.shuffle_tags,
                                   keep_tags=config.keep_tags, dropout=config.caption_dropout, rng=rng)
        out.append((samples[i], caption, rng, torch.Generator().manual_seed(seed)))
    return out


def _randn(shape, generators) -> torch.Tensor:
    """One standard-normal tensor of `shape` per image, each from that image's own generator."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def _requests(accelerator, run_dir: Path, signalled: bool, step: int, every: int = 10) -> tuple[bool, bool, bool]:
    """(stop, sample, save) as asked by a signal or a file in the run folder; all processes act on the same answer.
    With several processes they agree only every `every` steps: the exchange is a collective, and each one costs
    step time (a signal or file waits until then)."""
    if accelerator.num_processes > 1 and step % every:
        return False, False, False
    main = accelerator.is_main_process
    flags = [signalled or (main and take_request(run_dir, "STOP")), main and take_request(run_dir, "SAMPLE"),
             main and take_request(run_dir, "SAVE")]
    if accelerator.num_processes > 1:
        agreed = accelerator.gather(torch.tensor([flags], device=accelerator.device)).any(dim=0)
        flags = [bool(f) for f in agreed.tolist()]
    return tuple(flags)


def _shared(accelerator, compute):
    """Run `compute(share)` with share = (process index, process count) on every process and merge the dicts, so
    each entry is computed once; tensors come back on this process's device."""
    n = accelerator.num_processes
    part = compute((accelerator.process_index, n))
    if n == 1:
        return part
    from accelerate.utils import gather_object

    merged = {}
    for piece in gather_object([{k: tuple(None if t is None else t.cpu() for t in v) for k, v in part.items()}]):
        merged.update(piece)
    return {k: tuple(None if t is None else t.to(accelerator.device) for t in v) for k, v in merged.items()}


def _precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _ddpm(scheduler_config):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler_config)


def _optimizer(config: TrainConfig, groups):
    if config.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def _min_snr_weights(noise_scheduler, timesteps, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, https://arxiv.org/abs/2303.09556), as in diffusers' examples."""
    if not gamma:
        return torch.ones_like(timesteps, dtype=torch.float32)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.clamp(snr, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return weights / (snr + 1)
    return weights / snr


def _encode_text(tokenizers, text_encoders, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(encoder_hidden_states, pooled) as the pipelines make them: SD1/SD2 the text encoder's last hidden state
    (pooled None); SDXL both encoders' penultimate hidden states side by side, and the second encoder's pooled
    projection (diffusers' StableDiffusionXLPipeline.encode_prompt)."""
    grad = torch.is_grad_enabled() and any(p.requires_grad for te in text_encoders for p in te.parameters())
    with torch.set_grad_enabled(grad):
        if len(text_encoders) == 1:
            return text_encoders[0](_token_ids(tokenizers[0], captions, device))[0], None
        hidden, pooled = [], None
        for tokenizer, text_encoder in zip(tokenizers, text_encoders):
            out = text_encoder(_token_ids(tokenizer, captions, device), output_hidden_states=True)
            pooled = out[0]  # the last encoder's is the one used: CLIPTextModelWithProjection's text_embeds
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled


def _token_ids(tokenizer, captions: list[str], device) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


@torch.no_grad()
def _cache_text(tokenizers, text_encoders, texts: list[str], device, share=(0, 1)) -> dict:
    """caption -> (encoder_hidden_states, pooled or None) for this process's share of the captions."""
    texts = texts[share[0]::share[1]]
    if not texts:
        return {}
    hidden, pooled = _encode_text(tokenizers, text_encoders, texts, device)
    return {text: (hidden[i], None if pooled is None else pooled[i]) for i, text in enumerate(texts)}


def _time_ids(original_size, crop_top_left, bucket) -> torch.Tensor:
    """SDXL's size conditioning for one image: original (height, width), crop (top, left), target (height, width),
    in the order of diffusers' StableDiffusionXLPipeline._get_add_time_ids."""
    return torch.tensor([*original_size, *crop_top_left, bucket[1], bucket[0]], dtype=torch.float32)


def _check_finite(latents: torch.Tensor, images: str) -> None:
    # An fp16 VAE (SDXL's especially) overflows into inf/NaN; the VAE runs in fp32 here, so this catches broken VAE
    # weights before they turn into a NaN loss (field.md: kohya#952, OneTrainer#318).
    if not torch.isfinite(latents).all():
        raise UserError(f"the VAE gave NaN/inf latents for {images}",
                        "the base model's VAE weights are broken (an fp16 VAE that overflowed?); use a checkpoint "
                        "with a working VAE, or an fp16-fixed VAE baked in")


@torch.no_grad()
def _cache_latents(vae, records, bucket_of, flip: bool, device, share=(0, 1)) -> dict:
    """(record index, flipped) -> (mean, std, time_ids): the VAE's latent distribution of the image centre-cropped to
    its bucket, and its SDXL size/crop conditioning. The VAE runs in fp32."""
    cache = {}
    rng = random.Random(0)
    for i, (record, bucket) in enumerate(zip(records, bucket_of)):
        if i % share[1] != share[0]:
            continue
        pixels, crop_top_left, original_size = ds.prepare_image(record.image, bucket, random_crop=False, flip=False,
                                                                rng=rng)
        time_ids = _time_ids(original_size, crop_top_left, bucket)
        variants = [(False, pixels)] + ([(True, pixels.flip(-1))] if flip else [])
        for flipped, px in variants:
            dist = vae.encode(px[None].to(device, torch.float32)).latent_dist
            _check_finite(dist.mean, record.name)
            cache[(i, flipped)] = (dist.mean[0], dist.std[0], time_ids.to(device))
    return cache


def _memory_defaults(config: TrainConfig, family: str, accelerator, events, run_dir: Path) -> TrainConfig:
    """On a GPU, batch_size and gradient_checkpointing left at their defaults follow the family and the free memory
    (the least any process has, so all pick alike). The resolved values replace config.json, so a resume repeats
    them."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    free = torch.tensor([torch.cuda.mem_get_info(accelerator.device)[0] / 2**30], device=accelerator.device)
    free_gib = accelerator.gather(free).min().item()
    batch_size, checkpointing = memory_defaults(family, free_gib)
    picked = {}
    if config.batch_size == defaults["batch_size"]:
        picked["batch_size"] = batch_size
    if config.gradient_checkpointing == defaults["gradient_checkpointing"]:
        picked["gradient_checkpointing"] = checkpointing
    resolved = dataclasses.replace(config, auto_memory=False, **picked)
    events.emit("warning", message=f"memory defaults for {FAMILIES[family]['label']} with {free_gib:.0f} GiB free: "
                                   f"batch_size {resolved.batch_size}, gradient_checkpointing "
                                   f"{'on' if resolved.gradient_checkpointing else 'off'}, precision "
                                   f"{accelerator.mixed_precision} (set them, or --no-auto-memory, to choose)")
    if accelerator.is_main_process:
        write_atomic(run_dir / "config.json", resolved.to_json())
    return resolved


@torch.no_grad()
def _sample(accelerator, pipe, trained, config, prompts, resolution, step, run_dir, events) -> None:
    """Sample images with the adapter as trained (strength 1), each recorded so plain diffusers can redo it."""
    import diffusers

    if not accelerator.is_main_process:
        return
    scheduler = getattr(diffusers, config.sample_scheduler).from_config(pipe.scheduler.config)
    modules = {"unet": accelerator.unwrap_model(trained[0]), "scheduler": scheduler}
    for name, model in zip(("text_encoder", "text_encoder_2"), trained[1:]):
        modules[name] = accelerator.unwrap_model(model)
    sampler = type(pipe)(**{**pipe.components, **modules})
    sampler.set_progress_bar_config(disable=True)
    for m in trained:
        m.eval()
    out_dir = run_dir / "samples"
    out_dir.mkdir(exist_ok=True)
    for n, prompt in enumerate(prompts):
        seed = config.sample_seed + n
        with accelerator.autocast():
            latents = sampler(prompt, negative_prompt=config.sample_negative or None,
                              num_inference_steps=config.sample_steps, guidance_scale=config.sample_guidance,
                              width=resolution, height=resolution, output_type="latent",
                              generator=torch.Generator("cpu").manual_seed(seed)).images
        image = _decode(sampler, latents)
        path = out_dir / f"step-{step:06d}-{n}.png"
        tmp = path.with_name(path.stem + ".tmp.png")
        image.save(tmp)
        tmp.replace(path)
        events.emit("sample", step=step, path=str(path), prompt=prompt, negative_prompt=config.sample_negative,
                    seed=seed, steps=config.sample_steps, guidance_scale=config.sample_guidance,
                    scheduler=config.sample_scheduler, width=resolution, height=resolution, strength=1.0)
    for m in trained:
        m.train()


def _decode(pipe, latents: torch.Tensor):
    """The pipelines' own VAE decode, but in fp32 outside autocast: under fp16 autocast a VAE (SDXL's especially)
    overflows into black samples."""
    with torch.autocast(latents.device.type, enabled=False):
        image = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil")[0]


def _register_adapter_checkpointing(accelerator) -> None:
    """Make accelerate's save_state/load_state keep only the LoRA weights (not the frozen base) with the
    optimizer, schedule and RNG state, as diffusers' LoRA examples do."""
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        for i, model in enumerate(models):
            lora = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if "lora_" in n}
            if accelerator.is_main_process:
                save_file(lora, str(Path(output_dir) / f"adapter_{i}.safetensors"))
        weights.clear()

    def load_hook(models, input_dir):
        for i, model in enumerate(models):
            state = load_file(str(Path(input_dir) / f"adapter_{i}.safetensors"))
            result = model.load_state_dict(state, strict=False)
            assert not result.unexpected_keys, result.unexpected_keys
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _last_checkpoint(checkpoints: Path) -> Path | None:
    found = sorted(checkpoints.glob("step-*")) if checkpoints.is_dir() else []
    return found[-1] if found else None


def _memory_gb(device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


class _StopSignals:
    """SIGINT/SIGTERM set a flag the loop checks each step, so a stop always saves first."""

    def __init__(self):
        self.requested = False
        self._old = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread (e.g. called from a UI worker): rely on the STOP file
            self._old = {}

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
