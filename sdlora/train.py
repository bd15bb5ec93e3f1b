"""The training loop under accelerate: caches, the step, samples, saves, resume, stop, and the run's events."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import random
import re
import shutil
import signal
import time
from collections import deque
from pathlib import Path

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer

from sdlora import dataset as ds
from sdlora.config import TrainConfig
from sdlora.errors import UserError
from sdlora.export import kohya_metadata, verify, write_diffusers_layout
from sdlora.graphs import Graphed
from sdlora.quantize import quantize_base
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
    # gradient accumulation and the all-reduce are done by hand in Step (so the step can be a CUDA graph)
    accelerator = Accelerator(mixed_precision=_precision(config.mixed_precision), cpu=not torch.cuda.is_available())
    events = EventLog(run_dir, enabled=accelerator.is_main_process, echo=progress_bar)
    if accelerator.is_main_process:
        write_atomic(run_dir / "config.json", config.to_json())
        for name in CONTROL_FILES:  # requests left over from an earlier process are stale
            (run_dir / name).unlink(missing_ok=True)
    stop = _StopSignals()
    where = {"stage": "loading the base model"}  # what the run is doing, for an out-of-memory message
    try:
        return _train(config, run_dir, accelerator, events, stop, resume, progress_bar, where)
    except UserError as e:
        _emit_error(events, e.message, e.hint)
        raise
    except torch.OutOfMemoryError:
        message = f"out of memory while {where['stage']}"
        hint = ("lower resolution, or draw fewer samples (sample_prompts, sample_every)" if "sampl" in where["stage"]
                else "lower batch_size or resolution, turn on gradient_checkpointing, or set base_precision fp8")
        events.emit("error", message=message, hint=hint)
        raise UserError(message, hint) from None
    except Exception as e:
        # a write that no save wraps (the events file): a full disk still ends in one line
        if (full := _disk_full(e, _written(e) or run_dir, 0, run_dir)) is not None:
            _emit_error(events, full.message, full.hint)
            raise full from None
        events.emit("error", message=f"{type(e).__name__}: {e}", hint="see log.txt in the run folder")
        raise
    finally:
        stop.restore()


def _train(config, run_dir, accelerator, events, stop, resume, progress_bar, where: dict) -> Path:
    started_at = time.time()
    device = accelerator.device
    # seconds per setup stage, reported in the start event; "process": from the process's start to here (imports)
    setup_s, t_setup = {"process": round(_process_age(), 2)}, time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal t_setup
        now = time.perf_counter()
        setup_s[stage], t_setup = round(now - t_setup, 2), now

    # 1. Data: every image opened and checked once; captions fixed; buckets from the base's resolution.
    data = ds.ingest(config.dataset, trigger=config.trigger, caption_template=config.caption_template)
    lap("data")
    # the frozen UNet and text encoders load as their files store them (build_step casts them where they run), the
    # VAE in fp32
    base = load_base(config.base, _weight_dtype(accelerator), vae_dtype=torch.float32, base_config=config.base_config,
                     prediction_type=config.prediction_type, as_stored=True)
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
    if not config.trigger.strip() and ds.common_first_word([r.caption for r in records]) is None:
        events.emit("warning", message=ds.NO_TRIGGER)
    tokenizer = tokenizers[0]
    long = [r.name for r in records if len(tokenizer(r.caption).input_ids) > tokenizer.model_max_length]
    if long:
        events.emit("warning", message=f"{len(long)} captions are longer than {tokenizer.model_max_length - 2} tokens "
                                       f"and will be cut (e.g. {long[0]})")

    lap("load")

    # 2. Models, adapters, optimizer, schedule and the step (bench/train_speed.py times this same step).
    where["stage"] = f"putting the model on the {device.type.upper()}"
    step_fn = build_step(accelerator, pipe, config, on_fail=lambda e: events.emit(
        "warning", message=f"CUDA graphs off, the step runs eagerly: {type(e).__name__}: {str(e)[:200]}"))
    trained, lr_scheduler, noise_scheduler = step_fn.trained, step_fn.lr_scheduler, step_fn.noise_scheduler
    lap("models")

    # 3. Caches: latents once per image (and per flip), with SDXL's size/crop conditioning; text embeddings once when
    #    the text encoder is frozen and captions don't change between steps (kohya refuses caching with shuffle for
    #    the same reason).
    #    With several processes each encodes its share and they swap results, so every cache is computed once.
    where["stage"] = "caching latents and text embeddings"
    latent_cache = _shared(accelerator, lambda share: _cache_latents(vae, records, bucket_of, config.flip, device, share)) \
        if config.cache_latents and not config.random_crop else None
    text_cache = None
    if not config.train_text_encoder and not config.shuffle_tags:
        texts = sorted({r.caption for r in records} | {""})
        text_cache = _shared(accelerator, lambda share: _cache_text(tokenizers, text_encoders, texts, device, share))
    lap("caches")

    # 4. Resume: weights, optimizer, schedule; data order and noise are functions of (seed, step), so they follow.
    step = 0
    checkpoints = run_dir / "checkpoints"
    if resume and (last := _usable_checkpoint(checkpoints, events)) is not None:
        accelerator.load_state(str(last))
        _load_adapters(trained, last / "adapters.safetensors")
        step = _checkpoint_step(last)
        saved_with = json.loads((last / "sdlora.json").read_text()).get("processes", 1)
        changed = "" if saved_with == accelerator.num_processes else \
            f"; it was saved with {saved_with} process(es), now {accelerator.num_processes}: the global batch is " \
            f"{config.batch_size * config.grad_accum * accelerator.num_processes} images instead of " \
            f"{config.batch_size * config.grad_accum * saved_with}"
        events.emit("warning", message=f"resumed from {last.name}{changed}")
    # The final check reloads the base from disk. On a GPU that load runs in a thread on the idle CPU while training
    # goes on, from a quarter of the way (at most 100 steps in): the first steps (eager calls, a CUDA graph capture
    # per bucket shape), the caches and the first samples need the host, and the load would hold Python's lock.
    fresh_base, preload_at = None, step + min(100, (config.steps - step) // 4)
    preload = device.type == "cuda" and accelerator.is_main_process
    sample_every = config.sample_every or max(1, config.steps // 4)
    # how samples are drawn: on a GPU the UNet's forward replays as CUDA graphs (int8 layers cannot be captured); after
    # an out-of-memory, one prompt at a time with a tiled decode and no graphs
    sampling = {"low_memory": False, "graphs": _SampleGraphs(unet, step_fn.weight_dtype) if device.type == "cuda"
                and config.cuda_graphs and config.base_precision in ("auto", "fp8", "nf4") else None}
    save_every = config.save_every or max(1, config.steps // 4)
    prompts = config.sample_prompts or [r.caption for r in records[:2]]
    images_per_step = config.batch_size * config.grad_accum * accelerator.num_processes
    # a bucket's last batch of an epoch may be short (one process), so an epoch is counted in batches, as kohya does
    batches_per_epoch = _batches_per_epoch(samples, bucket_of, config.batch_size * accelerator.num_processes)
    events.emit("start", config=config.__dict__, family=base.family, resolution=resolution, buckets=len(buckets),
                images=len(records), rejected=len(data.rejected), samples_per_epoch=len(samples),
                total_steps=config.steps, start_step=step, device=str(device), precision=accelerator.mixed_precision,
                batch_per_gpu=config.batch_size, global_batch=images_per_step, base_storage=step_fn.base_storage,
                epochs=round(config.steps * config.grad_accum / batches_per_epoch, 2), setup_s=setup_s,
                bucket_sizes={f"{w}x{h}": bucket_of.count((w, h)) for w, h in sorted(set(bucket_of))})

    def save(step: int, final: bool) -> Path:
        name = "lora.safetensors" if final else f"lora-step-{step:06d}.safetensors"
        path = run_dir / name
        read_losses(wait=True)  # never save weights that a NaN has already reached
        if accelerator.is_main_process:
            meta = kohya_metadata(config, family=base.family, resolution=resolution, step=step,
                                  epochs=step * config.grad_accum / batches_per_epoch, num_images=len(records),
                                  tag_frequency=ds.tag_frequency(records), started_at=started_at,
                                  title=config.title or run_dir.name, precision=accelerator.mixed_precision,
                                  prediction_type=base.prediction_type)
            state = kohya_state_dict(unet, dict(zip(base.text_encoders(), trained[1:])),
                                     sgm_unet=FAMILIES[base.family]["sgm_unet"])
            size = sum(t.numel() * t.element_size() for t in state.values())
            with _writing(run_dir, size, run_dir):
                save_lora(path, state, meta)  # a temporary name, then the rename: a failed write keeps the last file
            if final and config.export_diffusers:
                diffusers_file = run_dir / "lora-diffusers.safetensors"
                with _writing(run_dir, size, run_dir, leftovers=[diffusers_file]):  # diffusers writes it in place
                    write_diffusers_layout(diffusers_file, unet, trained[1:], config)
            events.emit("save", step=step, path=str(path))
        save_checkpoint(step)
        return path

    def save_checkpoint(step: int) -> None:
        """Write the checkpoint into a temporary folder and rename it to `step-NNNNNN` once complete, so that a kill
        or a full disk mid-save never leaves a folder that looks resumable and is not (sdlora.json lists its files)."""
        done, tmp = checkpoints / f"step-{step:06d}", checkpoints / f".step-{step:06d}.tmp"
        if accelerator.is_main_process:
            checkpoints.mkdir(parents=True, exist_ok=True)
            for stale in checkpoints.glob(".step-*"):  # left by a process killed while saving: no save runs now
                shutil.rmtree(stale, ignore_errors=True)
        accelerator.wait_for_everyone()  # no process writes into, or measures, a folder that is still being removed
        need = _checkpoint_size(checkpoints, trained)
        with _writing(checkpoints, need, run_dir, leftovers=[tmp]):
            accelerator.save_state(str(tmp))
            if accelerator.is_main_process:
                _save_adapters(trained, tmp / "adapters.safetensors")
            accelerator.wait_for_everyone()  # every process's random states are in before the folder is listed
            if accelerator.is_main_process:
                files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
                write_atomic(tmp / "sdlora.json",
                             json.dumps({"step": step, "processes": accelerator.num_processes, "files": files}))
                if done.exists():  # the same step saved again (the step a run resumed at, or a broken one)
                    shutil.rmtree(done)
                os.replace(tmp, done)
        if accelerator.is_main_process:
            # only now, with the new one in place: older ones beyond keep_checkpoints, and newer ones, which a resume
            # passed over as unreadable (it continues from the newest that loads)
            found = sorted(_checkpoint_folders(checkpoints), key=_checkpoint_step)
            for old in [c for c in found if _checkpoint_step(c) > step] + \
                    [c for c in found if _checkpoint_step(c) <= step][:-config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)

    def draw_samples(step: int) -> None:
        where["stage"] = f"drawing samples at step {step}"
        out_dir = run_dir / "samples"  # _sample writes each image to a temporary name, then renames it
        with _writing(out_dir, 3 * resolution**2 * len(prompts), run_dir,
                      leftovers=lambda: list(out_dir.glob("*.tmp.png"))):
            _sample(accelerator, pipe, trained, config, prompts, resolution, step, run_dir, events, sampling)

    def finish(step: int, kind: str, draw: bool) -> Path:
        where["stage"] = "saving the final file"
        path = save(step, final=True)
        if draw:
            draw_samples(step)
        if accelerator.is_main_process:
            t = time.perf_counter()
            result = verify(path, config.base, base_config=config.base_config,
                            prediction_type=config.prediction_type,
                            base=fresh_base.result() if fresh_base is not None else None)
            events.emit("verify", **result, seconds=round(time.perf_counter() - t, 2), preloaded=fresh_base is not None)
            if not result["ok"]:
                raise RuntimeError(f"export check failed for {path.name}: {result}")
            events.emit(kind, step=step, path=str(path))
        accelerator.wait_for_everyone()
        return path

    bar = None
    if progress_bar and accelerator.is_local_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=step, desc="training", unit="step", dynamic_ncols=True)
    # The loop never waits for the GPU to show a loss: each step's loss is copied to pinned host memory behind the
    # step and read once a CUDA event says the copy landed (a `.item()` per step, or even once a second, would stall
    # the queue of steps the host runs ahead). Only a save waits for them all: it must not keep weights a NaN reached.
    requests = _Requests(accelerator, run_dir)
    pending, recent = deque(), deque(maxlen=50)  # (step, loss, copy event or None, images seen) not read; last losses
    bad = []  # a non-finite loss seen; with several processes all of them stop at the next point they agree on
    t_last, step_last, last_good = time.perf_counter(), step, None
    seen, seen_last = 0, 0  # images trained so far (all processes; a short batch counts what it holds); at step_last
    data_s = 0.0  # host time spent assembling batches since the last progress event
    progress_every = max(1, config.steps // 100)  # steps; and at least once a second

    def keep_loss(at: int, loss: torch.Tensor, seen_at: int) -> None:
        pending.append((at, *_to_host(loss), seen_at))

    def read_losses(wait: bool = False) -> list[tuple[int, float, int]]:
        """(step, loss, images trained up to it) of the steps finished since the last read, oldest first; with `wait`,
        of every step run."""
        out = []
        while pending and (wait or pending[0][2] is None or pending[0][2].query()):
            at, loss, copied, seen_at = pending.popleft()
            if copied is not None:
                copied.synchronize()
            value = loss.item()
            if not math.isfinite(value) and not bad:
                bad.append((at, value))
            recent.append(value)
            out.append((at, value, seen_at))
        if bad and (wait or accelerator.num_processes == 1):
            at, value = bad[0]
            keep = f"; the last good save is {last_good.name}" if last_good else ""
            raise UserError(f"the loss became {value} at step {at}{keep}",
                            "lower unet_lr/text_encoder_lr, or use bf16/fp32 instead of fp16")
        return out

    for m in trained:
        m.train()
    while True:
        # Once in a while: samples (a step-0 baseline first), saves, and requests from the run folder.
        done = step >= config.steps
        stop_now, sample_now, save_now, bad_now = requests(stop.requested, step, bool(bad))
        if bad_now:  # a process saw a non-finite loss: every process reads them all and stops here
            read_losses(wait=True)
        draw = step % sample_every == 0 or done or sample_now
        if stop_now or done:  # the final file first: drawing its samples cannot lose it
            return finish(step, "stopped" if stop_now else "done", draw)
        if draw:
            draw_samples(step)
        if step > 0 and (step % save_every == 0 or save_now):
            where["stage"] = f"saving at step {step}"
            last_good = save(step, final=False)
        if preload and step >= preload_at:
            fresh_base, preload = _preload_base(config, pipe), False
        where["stage"] = f"training (step {step + 1})"

        # The step: this process's share of each micro-batch, as tensors on the device, then one update.
        t_data = time.perf_counter()
        micro_batches = []
        for micro in range(config.grad_accum):
            k = step * config.grad_accum + micro  # micro-batch index: the data position
            global_batch = batch_at(k, config, records, samples, bucket_of, accelerator.num_processes)
            seen += len(global_batch)
            mine = slice(accelerator.process_index * config.batch_size, (accelerator.process_index + 1) * config.batch_size)
            idx, captions, rngs, gens = (list(x) for x in zip(*global_batch[mine]))
            if latent_cache is not None:
                flips = [config.flip and rng.random() < 0.5 for rng in rngs]
                mean, std, time_ids = (torch.stack(t) for t in zip(*(latent_cache[(i, f)] for i, f in zip(idx, flips))))
            else:
                images = [ds.prepare_image(records[i].image, bucket_of[i], random_crop=config.random_crop,
                                           flip=config.flip, rng=rng) for i, rng in zip(idx, rngs)]
                pixels = torch.stack([im[0] for im in images]).to(device)
                time_ids = torch.stack([_time_ids(im[2], im[1], bucket_of[i]) for im, i in zip(images, idx)]).to(device)
                with torch.no_grad():
                    dist = vae.encode(pixels).latent_dist
                _check_finite(dist.mean, ", ".join(records[i].name for i in idx))
                mean, std = dist.mean, dist.std
            inputs = {"mean": mean, "std": std, **_noise(mean.shape, gens, config.noise_offset,
                                                         noise_scheduler.config.num_train_timesteps, device)}
            if sdxl:  # SDXL also conditions on each image's size, crop and target size
                inputs["time_ids"] = time_ids
            if text_cache is not None:
                inputs["hidden"] = torch.stack([text_cache[c][0] for c in captions])
                if sdxl:
                    inputs["pooled"] = torch.stack([text_cache[c][1] for c in captions])
            else:
                for j, tokenizer in enumerate(tokenizers):
                    inputs[f"ids_{j}"] = _token_ids(tokenizer, captions, device)
            micro_batches.append(inputs)
        data_s += time.perf_counter() - t_data
        keep_loss(step + 1, step_fn(micro_batches), seen)
        step += 1

        if bar is not None:
            bar.update(1)
        # A progress event for the newest finished step: at least once a second, and at least ~100 times a run so
        # that a short run still draws a loss curve. Its step is the one its loss belongs to (the GPU may be behind).
        ready = read_losses(wait=step == config.steps)
        now = time.perf_counter()
        if ready and (now - t_last >= 1.0 or any(at % progress_every == 0 for at, _, _ in ready)
                      or ready[-1][0] == config.steps):
            at, loss_value, seen_at = ready[-1]
            rate = (at - step_last) / (now - t_last)
            loss_ema = _ema(list(recent))
            if bar is not None:
                bar.set_postfix(loss=f"{loss_ema:.4f}")
            events.emit("progress", step=at, total=config.steps, loss=loss_value, loss_ema=loss_ema,
                        lr=lr_scheduler.get_last_lr()[0], images_per_s=(seen_at - seen_last) / (now - t_last),
                        eta_s=(config.steps - at) / max(rate, 1e-9), memory_gb=_memory_gb(device),
                        graphs=step_fn.run.captured,
                        # host ms per step assembling batches (noise, token ids, cache lookups): while it stays under
                        # the step time, the GPU, which runs the previous step meanwhile, never waits on data
                        data_ms=1e3 * data_s / max(at - step_last, 1))
            t_last, step_last, seen_last, data_s = now, at, seen_at, 0.0


def build_step(accelerator, pipe, config: TrainConfig, on_fail=None) -> "Step":
    """Put the base model on the device (frozen, in the compute dtype; the VAE in fp32, since fp16 VAEs overflow into
    NaNs), add the LoRA adapters (fp32 parameters: updates would vanish in fp16; initial values from the run's seed),
    and make the optimizer, the schedule and the `Step` that trains them."""
    device = accelerator.device
    unet, vae = pipe.unet, pipe.vae
    text_encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    weight_dtype = _weight_dtype(accelerator)
    vae.requires_grad_(False).to(device, torch.float32)
    # --base-precision: the frozen weights stored in fp8/int8/nf4 (sdlora.quantize); the adapters stay fp32. Quantized
    # on the CPU after loading (int8: layer by layer as each moves), then moved: the full-precision base never has to
    # fit on the GPU. Unquantized, a base loaded as its files store it is cast where it will run (_move).
    for model in (unet, *text_encoders):
        model.requires_grad_(False)
        if config.base_precision == "auto":
            _move(model, device, weight_dtype)
        else:
            model.to(weight_dtype)
    base_storage = quantize_base(unet, text_encoders, config.base_precision, device=device)
    for model in (unet, *text_encoders):
        model.to(device)  # by device only: a dtype would undo the fp8 storage

    torch.manual_seed(config.seed)
    unet_params = add_adapters(unet, UNET_TARGETS[config.targets], config.rank, config.alpha, config.lora_dropout)
    te_params = []
    if config.train_text_encoder:
        for text_encoder in text_encoders:
            te_params += add_adapters(text_encoder, TEXT_TARGETS[config.targets], config.rank, config.alpha,
                                      config.lora_dropout)
    if weight_dtype != torch.float32:
        for model in (unet, *text_encoders):
            _norms_in_compute_dtype(model)
        # peft casts each LoRA layer's input to its fp32 weights, then autocast casts it back to bf16/fp16 for the
        # matmul: two extra passes over every activation for the same result. Keep the input in the compute dtype.
        for model in (unet, *text_encoders):
            for layer in model.modules():
                if isinstance(layer, LoraLayer):
                    layer.cast_input_dtype_enabled = False
    # fp8 and nf4 save memory only with checkpointing: autograd would keep every dequantized weight otherwise. Not
    # int8: bitsandbytes' int8 layers fail under checkpointing on CUDA (TrainConfig.validate says so).
    if config.gradient_checkpointing or config.base_precision in ("fp8", "nf4"):
        # no RNG to replay (no dropout in the base), and saving CUDA's RNG state cannot be captured in a CUDA graph
        unet.enable_gradient_checkpointing(_checkpoint)
        if config.train_text_encoder:
            for text_encoder in text_encoders:
                text_encoder.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False, "preserve_rng_state": False})

    # fused AdamW on a GPU: one kernel for all LoRA tensors
    groups = [{"params": unet_params, "lr": config.unet_lr}]
    if te_params:
        groups.append({"params": te_params, "lr": config.text_encoder_lr})
    optimizer = _optimizer(config, groups, fused=device.type == "cuda")
    from diffusers.optimization import get_scheduler

    # accelerate steps a prepared schedule once per process each optimizer step, hence the factor
    n = accelerator.num_processes
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer,
                                 num_warmup_steps=round(config.warmup_fraction * config.steps) * n,
                                 num_training_steps=config.steps * n, num_cycles=config.lr_cycles)
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    return Step(accelerator, unet, text_encoders if te_params else [], unet_params, te_params, optimizer,
                lr_scheduler, _ddpm(pipe.scheduler.config), config, vae.config.scaling_factor, weight_dtype,
                len(text_encoders) > 1, cuda_graphs=device.type == "cuda" and config.cuda_graphs, on_fail=on_fail,
                base_storage=base_storage)


@torch.no_grad()
def _move(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move `model` to `device` and cast its floating tensors to `dtype` there, one tensor at a time. A base loaded
    in the dtype its files hold (fp16 or fp32, no copy on the CPU) is cast by the GPU, not by the CPU, where the cast
    is a sizeable part of the load (docs/benchmarks.md, Choices measured). One tensor at a time, the GPU never holds
    more than the model in `dtype` plus its largest tensor (an fp32 SDXL UNet, 2.6 billion parameters, moved whole
    needs 10 GB before its cast)."""
    for tensor in (*model.parameters(), *model.buffers()):
        moved = tensor.data.to(device)
        tensor.data = moved.to(dtype) if moved.is_floating_point() else moved


class _GroupNorm(torch.nn.GroupNorm):
    """A frozen base's GroupNorm run in its own dtype (bf16/fp16; the kernel keeps its statistics in fp32). Autocast
    would run it in fp32: its input cast up, its output and the activation after it written in fp32 (twice the
    bytes), and a cast back down before the next convolution, forward and backward: those casts are a large share of
    a step's GPU time (docs/benchmarks.md, Choices measured)."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x.to(self.weight.dtype), self.num_groups, self.weight, self.bias, self.eps)


class _LayerNorm(torch.nn.LayerNorm):
    """A frozen base's LayerNorm run in its own dtype, as _GroupNorm."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.to(self.weight.dtype), self.normalized_shape, self.weight, self.bias, self.eps)


def _norms_in_compute_dtype(model: torch.nn.Module) -> None:
    """Let `model`'s affine group and layer norms run in the dtype their weights are stored in (see _GroupNorm).
    The modules stay what they were to everything else: same parameters, names and state dict."""
    for module in model.modules():
        if type(module) is torch.nn.GroupNorm and module.affine:
            module.__class__ = _GroupNorm
        elif type(module) is torch.nn.LayerNorm and module.elementwise_affine and module.bias is not None:
            module.__class__ = _LayerNorm


class Step:
    """One optimizer update: the loss and LoRA gradients of each micro-batch, averaged over micro-batches and
    processes, clipped, applied. Nothing in it waits for the host, so on a GPU `loss_and_grads` replays as a CUDA
    graph per bucket shape (sdlora.graphs): no Python and no kernel launches per layer, which is what an
    overhead-bound LoRA step spends most of its time on."""

    def __init__(self, accelerator, unet, text_encoders, unet_params, te_params, optimizer, lr_scheduler,
                 noise_scheduler, config, scaling_factor: float, weight_dtype, sdxl: bool, cuda_graphs: bool,
                 on_fail=None, base_storage: str = ""):
        from accelerate.utils import AutocastKwargs

        self.accelerator, self.unet, self.text_encoders = accelerator, unet, text_encoders
        self.trained = [unet, *text_encoders]  # the models whose adapters train, in checkpoint order
        self.unet_params, self.te_params, self.params = unet_params, te_params, unet_params + te_params
        self.optimizer, self.lr_scheduler, self.noise_scheduler = optimizer, lr_scheduler, noise_scheduler
        self.config, self.scaling_factor, self.weight_dtype, self.sdxl = config, scaling_factor, weight_dtype, sdxl
        self.base_storage = base_storage  # what the frozen base takes, as sdlora.quantize reports it
        # no autocast weight cache: a CUDA graph cannot hold tensors cached outside it
        self.autocast = AutocastKwargs(cache_enabled=False)
        # keep the noise schedule on the device (diffusers moves it on first use, which a capture cannot do)
        noise_scheduler.alphas_cumprod = noise_scheduler.alphas_cumprod.to(accelerator.device)
        self.run = Graphed(self.loss_and_grads, enabled=cuda_graphs, on_fail=on_fail)
        self.cudnn_benchmark = False  # bench/train_speed.py measures both
        self.attention = None  # attention kernels' order (attention_kernels); bench/train_speed.py tries others

    def loss_and_grads(self, mean, std, eps, noise, timesteps, time_ids=None, hidden=None, pooled=None, **ids):
        """Sample the latents from their cached distribution, noise them, predict, Min-SNR-weighted MSE against
        the noise (or the velocity for v-prediction models); return (loss, gradients of the LoRA parameters)."""
        latents = ((mean + std * eps) * self.scaling_factor).to(self.weight_dtype)
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        with self.accelerator.autocast(self.autocast):
            if ids:  # the text encoders train: encode the captions' token ids here
                hidden, pooled = _encode_ids(self.text_encoders, [ids[f"ids_{j}"] for j in range(len(ids))])
            added_cond_kwargs = {"text_embeds": pooled, "time_ids": time_ids} if self.sdxl else None
            model_pred = self.unet(noisy_latents, timesteps, hidden, added_cond_kwargs=added_cond_kwargs).sample
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        loss = (loss * _min_snr_weights(self.noise_scheduler, timesteps, self.config.min_snr_gamma)).mean()
        scaler = self.accelerator.scaler  # fp16 only: scale the loss so small gradients do not underflow
        # zeros for adapters the loss does not reach (SDXL conditions on the penultimate layer of CLIP-L)
        grads = torch.autograd.grad(scaler.scale(loss) if scaler is not None else loss, self.params,
                                    allow_unused=True, materialize_grads=True)
        return loss.detach(), grads

    def __call__(self, micro_batches: list[dict]) -> torch.Tensor:
        """Update the LoRA parameters from `micro_batches` (dicts of input tensors); return the mean loss as a
        tensor on the device."""
        loss, grads = None, None
        for inputs in micro_batches:
            # cuDNN's own choice of convolution algorithms: timing them all (cudnn.benchmark) for every new bucket
            # shape costs more than it saves in a 1,000-step run (docs/benchmarks.md, Choices measured)
            benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, self.cudnn_benchmark
            try:
                with attention_kernels(self.attention):  # what a capture records; a replay runs those kernels
                    micro_loss, micro_grads = self.run(**inputs)  # the graph's outputs: overwritten by the next replay
            finally:
                torch.backends.cudnn.benchmark = benchmark
            if grads is None:
                loss = micro_loss.clone()
                grads = [g.clone() for g in micro_grads] if len(micro_batches) > 1 else list(micro_grads)
            else:
                loss += micro_loss
                torch._foreach_add_(grads, micro_grads)
        if len(micro_batches) > 1:
            loss /= len(micro_batches)
            torch._foreach_div_(grads, len(micro_batches))
        if self.accelerator.num_processes > 1:  # data parallel: one all-reduce of every LoRA gradient at once
            flat = self.accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
            grads = [g.view_as(p) for g, p in zip(flat.split([p.numel() for p in self.params]), self.params)]
            loss = self.accelerator.reduce(loss, reduction="mean")
        for p, g in zip(self.params, grads):
            p.grad = g
        self.accelerator.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.lr_scheduler.step()
        return loss


def batch_at(k: int, config: TrainConfig, records, samples: list[int], bucket_of, processes: int = 1) -> list[tuple]:
    """The global micro-batch `k` (batch_size x processes images): per image its record index, its caption, and the
    random.Random and torch.Generator for its crop, flip, noise and timestep. Process p trains slice p.

    A pure function of (seed, k, processes): epochs are shuffled per (seed, epoch) and every image draws from its own
    seeded generators, so a resumed run sees what a run without a break would have, and N processes with batch B
    see what one process with batch N x B would.
    """
    size = config.batch_size * processes
    epoch, position = divmod(k, _batches_per_epoch(samples, bucket_of, size))
    batch = ds.epoch_batches([bucket_of[i] for i in samples], size, random.Random(config.seed * 100_003 + epoch))[position]
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


def _batches_per_epoch(samples: list[int], bucket_of, size: int) -> int:
    """How many batches of `size` one epoch has: each bucket's images in batches, its last one possibly short."""
    return len(ds.epoch_batches([bucket_of[i] for i in samples], size, random.Random(0)))


def _randn(shape, generators) -> torch.Tensor:
    """One standard-normal tensor of `shape` per image, each from that image's own generator."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def _noise(shape, generators, noise_offset: float, num_timesteps: int, device) -> dict:
    """Each image's randomness from its own generator: `eps` samples its latent from the cached distribution,
    `noise` is what the model learns to predict (with offset noise, https://www.crosslabs.org/blog/diffusion-with-offset-noise),
    `timesteps` its noise level. Drawn on the host, copied without blocking."""
    eps = _randn(shape[1:], generators)
    noise = _randn(shape[1:], generators)
    if noise_offset:
        noise += noise_offset * _randn(shape[1:2] + (1, 1), generators)
    timesteps = torch.cat([torch.randint(0, num_timesteps, (1,), generator=g) for g in generators])
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in
                (("eps", eps), ("noise", noise), ("timesteps", timesteps))}
    return {"eps": eps, "noise": noise, "timesteps": timesteps}


def _ema(values: list[float], decay: float = 0.9) -> float:
    ema = values[0]
    for v in values[1:]:
        ema = decay * ema + (1 - decay) * v
    return ema


def _checkpoint(function, *args):
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, preserve_rng_state=False)


class _Requests:
    """(stop, sample, save, bad loss) as asked by a signal or a file in the run folder, or as seen by a process that
    read a non-finite loss; all processes act on the same answer at the same step.

    One process answers at once. Several agree through a collective every `every` steps; on GPUs they act on it one
    exchange later: the merged flags are copied to pinned memory behind the steps already queued and have long landed when
    read, so the host never waits for that queue to drain (reading them at once would, every exchange). A signal or a
    file therefore takes effect within 2 x `every` steps."""

    def __init__(self, accelerator, run_dir: Path, every: int = 10):
        self.accelerator, self.run_dir, self.every = accelerator, run_dir, every
        self.posted = None  # the last exchange's merged flags: (host tensor, copy event)

    def __call__(self, signalled: bool, step: int, bad: bool = False) -> tuple[bool, bool, bool, bool]:
        accelerator, n = self.accelerator, self.accelerator.num_processes
        if n > 1 and step % self.every:
            return False, False, False, False
        main = accelerator.is_main_process
        flags = [signalled or (main and take_request(self.run_dir, "STOP")),
                 main and take_request(self.run_dir, "SAMPLE"), main and take_request(self.run_dir, "SAVE"), bad]
        if n == 1:
            return tuple(flags)
        mine = torch.tensor([flags])
        if accelerator.device.type != "cuda":  # gloo on the host: no queue of steps to wait for, answer at once
            return tuple(bool(f) for f in accelerator.gather(mine).any(dim=0).tolist())
        answer = (False, False, False, False)
        if self.posted is not None:
            host, copied = self.posted
            copied.synchronize()
            answer = tuple(bool(f) for f in host.tolist())
        # pinned and non-blocking both ways: a plain copy would wait for the queued steps too
        self.posted = _to_host(accelerator.gather(mine.pin_memory().to(accelerator.device, non_blocking=True)).any(dim=0))
        return answer


def _to_host(t: torch.Tensor) -> tuple[torch.Tensor, "torch.cuda.Event | None"]:
    """A GPU tensor copied to pinned host memory behind the work queued before it, without waiting, and the event that
    says the copy landed; a host tensor as it is, with None."""
    if t.device.type != "cuda":
        return t, None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return host, copied


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


def attention_kernels(order: list | None):
    """A context in which attention (scaled_dot_product_attention) tries its kernels in `order` (SDPBackend values);
    None keeps torch's own order, which sdlora's step uses: on the GPUs measured it picks cuDNN's kernels, which ran
    the step faster than PyTorch's flash kernels first (docs/benchmarks.md, Choices measured)."""
    if order is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch before 2.6 cannot order them: its own order then
        return contextlib.nullcontext()


def _weight_dtype(accelerator) -> torch.dtype:
    """The frozen base's compute dtype under the run's mixed precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def _ddpm(scheduler_config):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler_config)


def _optimizer(config: TrainConfig, groups, fused: bool = False):
    if config.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay, fused=fused or None)


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
    """(encoder_hidden_states, pooled) for `captions`, see `_encode_ids`."""
    return _encode_ids(text_encoders, [_token_ids(tokenizer, captions, device) for tokenizer in tokenizers])


def _encode_ids(text_encoders, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(encoder_hidden_states, pooled) as the pipelines make them: SD1/SD2 the text encoder's last hidden state
    (pooled None); SDXL both encoders' penultimate hidden states side by side, and the second encoder's pooled
    projection (diffusers' StableDiffusionXLPipeline.encode_prompt)."""
    if len(text_encoders) == 1:
        return text_encoders[0](ids[0])[0], None
    hidden, pooled = [], None
    for token_ids, text_encoder in zip(ids, text_encoders):
        out = text_encoder(token_ids, output_hidden_states=True)
        pooled = out[0]  # the last encoder's is the one used: CLIPTextModelWithProjection's text_embeds
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled


def _token_ids(tokenizer, captions: list[str], device) -> torch.Tensor:
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else ids


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
    # weights before they turn into a NaN loss (kohya-ss/sd-scripts#952, Nerogar/OneTrainer#318).
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


HANDED_OVER_AT = None  # time.time() when a spare process (sdlora.runs.Spare) was handed its run


def _process_age() -> float:
    """Seconds since this process started, or since a spare process was handed its run (Linux; 0 elsewhere)."""
    if HANDED_OVER_AT is not None:
        return time.time() - HANDED_OVER_AT
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return float(Path("/proc/uptime").read_text().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


def _preload_base(config: TrainConfig, pipe):
    """Load a fresh copy of the base for the final check in a background thread, when the host has the memory for it
    (twice the model's fp32 size free); None otherwise, and the check loads it then."""
    import concurrent.futures

    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux
        return None
    need = 4 * sum(p.numel() for m in pipe.components.values() if isinstance(m, torch.nn.Module)
                   for p in m.parameters())
    if available < 2 * need:
        return None
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sdlora-verify-base")
    future = pool.submit(load_base, config.base, base_config=config.base_config,
                         prediction_type=config.prediction_type)
    pool.shutdown(wait=False)
    return future


def _free_gib(device) -> float:
    """GPU memory this process may still use: what the card has free, or less where the process is capped
    (torch.cuda.set_per_process_memory_fraction, as a shared or a smaller card behaves)."""
    device = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(device)  # torch >= 2.9
    cap = fraction * total - torch.cuda.memory_reserved(device)
    return min(free, cap) / 2**30


def _memory_defaults(config: TrainConfig, family: str, accelerator, events, run_dir: Path) -> TrainConfig:
    """On a GPU, batch_size, gradient_checkpointing and base_precision left at their defaults follow the family and
    the free memory (the least any process has, so all pick alike). The resolved values replace config.json, so a resume repeats
    them."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    free = torch.tensor([_free_gib(accelerator.device)], device=accelerator.device)
    free_gib = accelerator.gather(free).min().item()
    batch_size, checkpointing, base_precision = memory_defaults(family, free_gib)
    picked = {}
    if config.batch_size == defaults["batch_size"]:
        picked["batch_size"] = batch_size
    if config.gradient_checkpointing == defaults["gradient_checkpointing"] and config.base_precision != "int8":
        picked["gradient_checkpointing"] = checkpointing
    if config.base_precision == defaults["base_precision"]:
        picked["base_precision"] = base_precision
    resolved = dataclasses.replace(config, auto_memory=False, **picked)
    events.emit("warning", message=f"memory defaults for {FAMILIES[family]['label']} with {free_gib:.0f} GiB free: "
                                   f"batch_size {resolved.batch_size}, gradient_checkpointing "
                                   f"{'on' if resolved.gradient_checkpointing else 'off'}, precision "
                                   f"{accelerator.mixed_precision}"
                                   + (f", base stored in {resolved.base_precision}" if resolved.base_precision != "auto" else "")
                                   + " (set them, or --no-auto-memory, to choose)")
    if accelerator.is_main_process:
        write_atomic(run_dir / "config.json", resolved.to_json())
    return resolved


@torch.no_grad()
def _sample(accelerator, pipe, trained, config, prompts, resolution, step, run_dir, events, sampling: dict) -> None:
    """Sample images with the adapter as trained (strength 1), each recorded so plain diffusers can redo it.
    `sampling["graphs"]`: a _SampleGraphs to draw through, or None; `sampling["low_memory"]`: one prompt per call, a
    tiled decode and no graphs (set here after running out of memory)."""
    import diffusers

    if not accelerator.is_main_process:
        return
    # the trained models are the pipeline's own (adapters added in place): only the scheduler differs
    scheduler = getattr(diffusers, config.sample_scheduler).from_config(pipe.scheduler.config)
    sampler = type(pipe)(**{**pipe.components, "scheduler": scheduler})
    sampler.set_progress_bar_config(disable=True)
    for m in trained:
        m.eval()
    out_dir = run_dir / "samples"
    out_dir.mkdir(exist_ok=True)

    graphs = sampling["graphs"] if not sampling["low_memory"] else None

    def draw(chunk: list[str], seeds: list[int]) -> list:
        with accelerator.autocast(), graphs.replaying() if graphs is not None else contextlib.nullcontext():
            latents = sampler(chunk, negative_prompt=[config.sample_negative] * len(chunk) if config.sample_negative else None,
                              num_inference_steps=config.sample_steps, guidance_scale=config.sample_guidance,
                              width=resolution, height=resolution, output_type="latent",
                              generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds]).images
        return [_decode(sampler, latents[i:i + 1], tiled=sampling["low_memory"]) for i in range(len(chunk))]

    # two prompts per pipeline call (a batch costs about what one image does while the UNet is overhead-bound);
    # one generator per image, so each image is what a call with its prompt and seed alone draws. Out of memory (the
    # training step's CUDA graphs keep theirs): one prompt per call and a tiled VAE decode from then on, as ComfyUI
    # falls back; if even that does not fit, this round's samples are skipped and training goes on.
    first = 0
    while first < len(prompts):
        chunk = prompts[first:first + (1 if sampling["low_memory"] else 2)]
        seeds = [config.sample_seed + first + i for i in range(len(chunk))]
        try:
            images = draw(chunk, seeds)
        except torch.OutOfMemoryError:
            images = None
        if images is None:  # out of the except block, so the failed call's tensors are freed
            first_time = not sampling["low_memory"]
            sampling["low_memory"], sampling["graphs"], graphs = True, None, None  # the graphs' memory goes too
            torch.cuda.empty_cache()
            if first_time:
                events.emit("warning", message="out of memory while drawing samples: drawing them one at a time "
                                               "with a tiled VAE decode from now on")
                continue
            events.emit("warning", message=f"samples at step {step} skipped: out of memory")
            break
        for i, (prompt, seed, image) in enumerate(zip(chunk, seeds, images)):
            path = out_dir / f"step-{step:06d}-{first + i}.png"
            tmp = path.with_name(path.stem + ".tmp.png")
            image.save(tmp)
            tmp.replace(path)
            events.emit("sample", step=step, path=str(path), prompt=prompt, negative_prompt=config.sample_negative,
                        seed=seed, steps=config.sample_steps, guidance_scale=config.sample_guidance,
                        scheduler=config.sample_scheduler, width=resolution, height=resolution, strength=1.0)
        first += len(chunk)
    for m in trained:
        m.train()


class _SampleGraphs:
    """The UNet's forward, while samples are drawn, replayed as CUDA graphs (sdlora.graphs), one per input shape.

    Eager sampling is bound by Python and kernel launches: a UNet call takes several times its GPU work
    (docs/benchmarks.md, Choices measured). The graphs read the LoRA weights where the optimizer updates them in
    place, so every round draws with the weights of its step. Inside, autocast keeps no weight cache: a graph must not
    hold tensors cached outside it. A call the graphs do not cover (other UNet arguments) runs eagerly."""

    def __init__(self, unet, dtype: torch.dtype, enabled: bool = True):
        self.unet, self.dtype = unet, dtype
        self.run = Graphed(self._forward, enabled=enabled)  # disabled: the same calls, eagerly (tests on a CPU)

    def _forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if text_embeds is not None else None
        with torch.autocast("cuda", dtype=self.dtype, enabled=self.dtype != torch.float32, cache_enabled=False):
            return type(self.unet).forward(self.unet, sample, timestep, encoder_hidden_states,
                                           added_cond_kwargs=added, return_dict=False)[0]

    @contextlib.contextmanager
    def replaying(self):
        """Within: the UNet's calls go through the graphs."""
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        unet = self.unet

        def forward(sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None, return_dict=True,
                    **kwargs):
            if args or any(v is not None for v in kwargs.values()) or not torch.is_tensor(timestep):
                out = type(unet).forward(unet, sample, timestep, encoder_hidden_states, *args,
                                         added_cond_kwargs=added_cond_kwargs, return_dict=False, **kwargs)[0]
            else:
                out = self.run(sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                               **(added_cond_kwargs or {})).clone()  # the graph's output: overwritten next call
            return UNet2DConditionOutput(sample=out) if return_dict else (out,)

        previous = unet.__dict__.get("forward")
        unet.forward = forward
        try:
            yield
        finally:
            if previous is None:
                del unet.forward
            else:
                unet.forward = previous


def _decode(pipe, latents: torch.Tensor, tiled: bool = False):
    """The pipelines' own VAE decode, but in fp32 outside autocast: under fp16 autocast a VAE (SDXL's especially)
    overflows into black samples. `tiled`: in overlapping 512 px tiles (diffusers' tiled decode), for low memory."""
    vae = pipe.vae
    if tiled:
        kept = vae.tile_sample_min_size, vae.tile_latent_min_size
        vae.tile_sample_min_size, vae.tile_latent_min_size = 512, 512 // pipe.vae_scale_factor
        vae.enable_tiling()
    try:
        with torch.autocast(latents.device.type, enabled=False):
            image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    finally:
        if tiled:
            vae.disable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = kept
    return pipe.image_processor.postprocess(image, output_type="pil")[0]


def _adapter_tensors(models) -> dict:
    """The trainable (LoRA) parameters of the trained models by a stable name: what a checkpoint keeps of them."""
    return {f"{i}.{name}": p for i, m in enumerate(models) for name, p in m.named_parameters() if p.requires_grad}


def _save_adapters(models, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: p.detach().cpu().contiguous() for k, p in _adapter_tensors(models).items()}, str(path))


@torch.no_grad()
def _load_adapters(models, path: Path) -> None:
    from safetensors.torch import load_file

    saved, params = load_file(str(path)), _adapter_tensors(models)
    if saved.keys() != params.keys():
        raise UserError(f"{path.parent.name} holds another adapter (rank, targets or text encoder differ)",
                        "resume with the settings the run was started with, or start a new run")
    for name, p in params.items():
        p.copy_(saved[name])


def _checkpoint_step(folder: Path) -> int:
    return int(re.fullmatch(r"\.?step-(\d+)(\.tmp)?", folder.name)[1])


def _checkpoint_folders(checkpoints: Path) -> list[Path]:
    """The checkpoints saved whole (named `step-NNNNNN`; a save still under way is `.step-NNNNNN.tmp`)."""
    return [p for p in checkpoints.glob("step-*") if p.is_dir() and re.fullmatch(r"step-\d+", p.name)] \
        if checkpoints.is_dir() else []


def _usable_checkpoint(checkpoints: Path, events) -> Path | None:
    """The newest checkpoint that reads whole, or None (the run starts over); a warning names each newer one passed
    over: a save that did not finish (its temporary folder), or a folder that is incomplete or will not load."""
    unfinished = [p for p in checkpoints.glob(".step-*.tmp") if re.fullmatch(r"\.step-\d+\.tmp", p.name)] \
        if checkpoints.is_dir() else []
    passed, usable = [], None
    for folder in sorted(_checkpoint_folders(checkpoints) + unfinished, key=lambda p: (_checkpoint_step(p), p.name),
                         reverse=True):
        why = "a save that did not finish" if folder.name.startswith(".") else _unreadable(folder)
        if why is None:
            usable = folder
            break
        passed.append((folder, why))
    then = f"resuming from {usable.name}" if usable else "no usable checkpoint, starting from step 0"
    for folder, why in passed:
        events.emit("warning", message=f"{checkpoints.name}/{folder.name} is incomplete or unreadable ({why}); {then}")
    return usable


def _unreadable(folder: Path) -> str | None:
    """Why the checkpoint `folder` cannot be resumed from, or None. Every file is read whole before anything loads:
    accelerate's load_state would otherwise put part of a broken checkpoint into the optimizer before failing."""
    from accelerate.utils import load
    from safetensors.torch import load_file

    if not (folder / "sdlora.json").is_file():
        return "no sdlora.json"
    name = "sdlora.json"
    try:
        listed = json.loads((folder / name).read_text()).get("files")
        if listed is None:  # saved before checkpoints listed their files: what is there
            listed = {f.name: None for f in folder.iterdir() if f.name != "sdlora.json"}
        for name, size in {"adapters.safetensors": None, **listed}.items():
            file = folder / name
            if not file.is_file():
                return f"{name} is missing"
            if size is not None and file.stat().st_size != size:
                return f"{name} has {file.stat().st_size} of its {size} bytes"
            if name.endswith(".safetensors"):
                load_file(file)
            elif name.endswith(".bin"):  # as load_state reads it; it passes over random states that do not load
                load(file, map_location="cpu")
    except Exception as e:
        return f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}".rstrip(": ")
    return None


def _checkpoint_size(checkpoints: Path, models) -> int:
    """Bytes a checkpoint takes: as much as the newest one, or the adapters about four times (themselves, AdamW's two
    moments, the optimizer's copy of the schedule and step)."""
    found = sorted(_checkpoint_folders(checkpoints), key=_checkpoint_step)
    if found:
        return sum(f.stat().st_size for f in found[-1].iterdir() if f.is_file())
    return 4 * sum(p.numel() * p.element_size() for p in _adapter_tensors(models).values())


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def _writing(folder: Path, need: int, run_dir: Path, leftovers=()):
    """Around a save of about `need` bytes into `folder`: on failure what it half wrote (`leftovers`, or a function
    that lists them) is removed, and a full disk becomes a one-line UserError saying how much space to free."""
    try:
        yield
    except Exception as e:
        full = None if isinstance(e, UserError) else _disk_full(e, folder, need, run_dir)  # before the clean-up frees
        for path in leftovers() if callable(leftovers) else leftovers:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if full is None:
            raise
        raise full from None


def _disk_full(e: BaseException, folder: Path, need: int, run_dir: Path) -> UserError | None:
    """The UserError for `e` when a full disk (or quota) made writing into `folder` fail, else None. Python's writes
    say so by errno, safetensors' in its message; torch.save's say neither (a zip writer's "unexpected pos"), so a
    disk with less than `need` bytes free counts too."""
    chain, seen = [], e
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    full = any(isinstance(x, OSError) and x.errno in _DISK_FULL for x in chain) or any(
        s in str(x) for x in chain for s in ("No space left on device", "Disk quota exceeded", "(os error 28)",
                                              "(os error 122)"))
    if not full and need > 0:
        with contextlib.suppress(OSError):
            full = shutil.disk_usage(folder if folder.exists() else folder.parent).free < need
    if not full:
        return None
    size = f"{max(1, round(need / 1e6))} MB" if need < 1e9 else f"{need / 1e9:.1f} GB"
    return UserError(f"the disk is full: could not write {folder} (needs about {size} free)",
                     f"free some space, then resume: sdlora train --run-dir {run_dir} --resume")


def _written(e: BaseException) -> Path | None:
    """The folder of the file an OSError names, if it names one."""
    return Path(e.filename).parent if isinstance(e, OSError) and isinstance(e.filename, str) else None


def _emit_error(events, message: str, hint: str) -> None:
    try:
        events.emit("error", message=message, hint=hint)
    except OSError:  # a full disk takes the events file too: the error raised still says what happened
        pass


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
