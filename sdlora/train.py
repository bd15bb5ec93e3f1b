"""The training loop under accelerate: setup in reading order, then samples, saves, requests and the step, with events."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import torch

from sdlora import adapters, checkpoints
from sdlora import dataset as ds
from sdlora import evaluate
from sdlora.batches import Batches
from sdlora.check import check_dataset
from sdlora.config import PRESET_FAMILIES, TrainConfig, optimizer_warnings
from sdlora.control import Losses, Requests, StopSignals
from sdlora.diskspace import disk_full, writing, written_folder
from sdlora.ema import EMA
from sdlora.errors import UserError
from sdlora.memory import memory_defaults, on_gpu, used_gb
from sdlora.models import check_sampler, load_base
from sdlora.atomic import write_atomic
from sdlora.rundir import CONTROL_FILES, EventLog
from sdlora.sampling import SampleGraphs, Sampler
from sdlora.saves import Saves
from sdlora.step import build_step, weight_dtype


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
    trackers = {"log_with": config.log_with, "project_dir": str(run_dir / "logs")} if config.log_with else {}
    accelerator = Accelerator(mixed_precision=_precision(config.mixed_precision), cpu=not torch.cuda.is_available(),
                              **trackers)
    events = EventLog(run_dir, enabled=accelerator.is_main_process, echo=progress_bar)
    if accelerator.is_main_process:
        write_atomic(run_dir / "config.json", config.to_json())
        for name in CONTROL_FILES:  # requests left over from an earlier process are stale
            (run_dir / name).unlink(missing_ok=True)
    stop, stage = StopSignals(), _Stage()
    try:
        return _train(config, run_dir, accelerator, events, stop, resume, progress_bar, stage)
    except UserError as e:
        _emit_error(events, e.message, e.hint)
        raise
    except torch.OutOfMemoryError as e:
        message = f"out of memory while {stage.now}"
        hint = ("lower resolution, or draw fewer samples (sample_prompts, sample_every)" if "sampl" in stage.now
                else "lower batch_size or resolution, turn on gradient_checkpointing, or set base_precision fp8")
        # torch's own first sentence (how much was asked for, how much was free) and what the models held then
        detail = ". ".join(str(e).split(". ")[:3])[:300] + (f". On the GPU: {on_gpu(stage.models)}"
                                                              if torch.cuda.is_available() else "")
        print(f"sdlora: {message}: {detail}", file=sys.stderr, flush=True)
        events.emit("error", message=message, hint=hint, detail=detail)
        raise UserError(message, hint) from None
    except Exception as e:
        # a write that no save wraps (the events file): a full disk still ends in one line
        if (full := disk_full(e, written_folder(e) or run_dir, 0, run_dir)) is not None:
            _emit_error(events, full.message, full.hint)
            raise full from None
        events.emit("error", message=f"{type(e).__name__}: {e}", hint="see log.txt in the run folder")
        raise
    finally:
        stop.restore()
        if config.log_with:
            accelerator.end_training()


def _train(config, run_dir, accelerator, events, stop, resume, progress_bar, stage: "_Stage") -> Path:
    started_at, device = time.time(), accelerator.device
    setup = _SetupTimes()

    # 1. Data: every image opened and checked once; captions fixed; loss masks paired; regularisation pictures (no
    #    trigger: they show the class as the base draws it).
    data = ds.ingest(config.dataset, trigger=config.trigger, caption_template=config.caption_template,
                     alpha_mask=config.alpha_mask)
    reg = ds.ingest(config.reg_data, caption_template=config.caption_template, alpha_mask=config.alpha_mask) \
        if config.reg_data else None
    # pictures kept out of training, to measure what each save learned on (sdlora.evaluate)
    data.records, heldout = evaluate.split(data.records, config.eval_holdout, config.seed) if config.evaluate \
        else (data.records, [])
    _check_masks(config, data)
    setup.lap("data")
    # 2. The base model: the frozen UNet and text encoders load as their files store them (build_step casts them where
    #    they run), the VAE in fp32. Buckets follow its resolution; on a GPU, memory settings its family and free memory.
    stage.now = "loading the base model"
    base = load_base(config.base, weight_dtype(accelerator), vae_dtype=torch.float32, base_config=config.base_config,
                     prediction_type=config.prediction_type, zero_terminal_snr=config.zero_terminal_snr, as_stored=True)
    family, pipe = base.fam.with_train_guidance(config.train_guidance), base.pipe  # FLUX.1 dev's guidance embedding
    stage.models = dict(pipe.components)
    clip_skip = family.resolve_clip_skip(config.clip_skip)  # settings this base cannot use stop here, before any work
    _check_objective(config, family, events)
    _check_preset(config, family, events)
    check_sampler(config.sample_scheduler, pipe.scheduler.config)
    if device.type == "cuda" and config.auto_memory:
        config = memory_defaults(config, family, accelerator, events, run_dir)
    reg_records = reg.records if reg else []
    resolution, buckets, bucket_of = _buckets(config, base, data.records + reg_records, events)
    _warn_about_data(config, data, family.tokenizers(pipe)[0], events, resolution, buckets, accelerator.num_processes)
    setup.lap("load")

    # 3. Models on the device, adapters, optimizer, schedule, objective and the step (bench/train_speed.py times it).
    stage.now = f"putting the model on the {device.type.upper()}"
    step_fn = build_step(accelerator, pipe, config, family, on_fail=lambda e: events.emit(
        "warning", message=f"CUDA graphs off, the step runs eagerly: {type(e).__name__}: {str(e)[:200]}"))
    setup.lap("models")
    # 4. Batches: latents and text embeddings cached where nothing changes them between steps.
    stage.now = "caching latents and text embeddings"
    frozen = family.encoders(pipe)[len(family.text_encoders):]  # SD3's T5: 4.7B parameters the step never needs

    def texts_cached() -> None:  # the captions are encoded: off the GPU before the VAE encodes the pictures
        if device.type == "cuda":
            for model in frozen:
                model.to("cpu")

    batches = Batches(config, data.records, bucket_of, pipe, family, step_fn.objective, accelerator, reg_records,
                      texts_cached)
    if reg:
        _warn_about_reg(reg, batches, events)
    setup.lap("caches")

    # 5. Resume: weights, optimizer, schedule (and the EMA); data order and noise are functions of (seed, step).
    ema = EMA(step_fn.params, config.ema_decay, config.ema_start, config.ema_every) if config.ema_decay else None
    step = checkpoints.resume(accelerator, run_dir / "checkpoints", step_fn.trained, events,
                              config.batch_size * config.grad_accum, ema=ema) if resume else 0
    losses, requests = Losses(accelerator.num_processes), Requests(accelerator, run_dir)
    saves = Saves(accelerator, config, base, family, step_fn.trained, run_dir, events, losses, resolution=resolution,
                  num_images=len(data.records), tag_frequency=ds.tag_frequency(data.records),
                  reg_dirs=ds.dataset_dirs(reg_records, Path(reg.root).name) if reg else {},
                  epoch_batches=batches.per_epoch(), started_at=started_at, weights=step_fn.averaged_weights, ema=ema)
    # On a GPU the UNet's forward replays as CUDA graphs while sampling too (int8 layers cannot be captured).
    graphs = device.type == "cuda" and config.cuda_graphs and config.base_precision in ("auto", "fp8", "nf4") \
        and family.denoiser == "unet"  # SampleGraphs replays a UNet's call
    sampler = Sampler(accelerator, pipe, step_fn.trained, config,
                      config.sample_prompts or [r.caption for r in data.records[:2]], resolution, run_dir, events,
                      SampleGraphs(pipe.unet, step_fn.weight_dtype) if graphs else None)
    # The final check reloads the base from disk. On a GPU that load runs in a thread on the idle CPU while training
    # goes on, from a quarter of the way (at most 100 steps in): the first steps (eager calls, a CUDA graph capture
    # per bucket shape), the caches and the first samples need the host, and the load would hold Python's lock.
    preload_at = step + min(100, (config.steps - step) // 4) if device.type == "cuda" else None
    # What each save learned and broke, from the base predictions on fixed inputs (main process: forwards only).
    with _on_device(frozen, device):
        evaluator = _evaluator(config, step_fn, family, pipe, data.records, heldout, resolution, accelerator) \
            if config.evaluate and accelerator.is_main_process else None
    measures = evaluate.earlier_measures(run_dir, step) if evaluator is not None and step else []
    setup.lap("eval")
    sample_every = config.sample_every or max(1, config.steps // 4)
    save_every = config.save_every or max(1, config.steps // 4)
    progress = _Progress(config, accelerator, events, step, progress_bar)
    if config.log_with:  # tensorboard/wandb beside the events file, through accelerate's trackers
        accelerator.init_trackers(run_dir.name, config={k: v if isinstance(v, (bool, int, float, str)) else str(v)
                                                        for k, v in config.__dict__.items()})
    events.emit("start", config=config.__dict__, family=base.family, resolution=resolution,
                prediction_type=base.prediction_type, zero_terminal_snr=base.zero_terminal_snr, clip_skip=clip_skip,
                buckets=len(buckets),
                images=len(data.records), rejected=len(data.rejected), samples_per_epoch=len(batches.samples),
                held_out=len(heldout),
                masked_images=sum(r.mask is not None for r in data.records) if config.masked_loss else 0,
                reg_images=len(reg_records), reg_samples_per_epoch=sum(i >= batches.reg_from for i in batches.samples),
                total_steps=config.steps, start_step=step, device=str(device), precision=accelerator.mixed_precision,
                batch_per_gpu=config.batch_size, global_batch=config.batch_size * config.grad_accum * accelerator.num_processes,
                base_storage=step_fn.base_storage, epochs=round(config.steps * config.grad_accum / batches.per_epoch(), 2),
                setup_s=setup.times, bucket_sizes={f"{w}x{h}": bucket_of.count((w, h)) for w, h in sorted(set(bucket_of))})

    def measured(step: int, final: bool = False) -> dict:
        """Measure the adapters as they are now (an `eval` event); the save's metadata: its suggested strength, and on
        the final file the recommendation over every save."""
        if evaluator is None:
            return {}
        stage.now = f"measuring the LoRA at step {step}"
        losses.read(wait=True)  # a NaN already in the weights stops the run here, as a save would
        path = saves.path(step, final)
        t = time.perf_counter()
        with step_fn.averaged_weights():  # the frozen encoders' outputs are the evaluator's since it was made
            measure = evaluator.measure(step)
        measures.append(measure)
        events.emit("eval", **evaluate.event(measure, str(path), evaluator.on), seconds=time.perf_counter() - t)
        meta = {"sdlora_suggested_strength": f"{measure.suggested():g}"}
        if final:
            best = evaluate.recommend(measures, lambda at: evaluate.save_name(saves.path(at, at == step)))
            events.emit("recommend", path=str(saves.path(best.step, best.step == step)), step=best.step, strength=best.strength,
                        learned_share=best.learned_share, bleed=best.bleed, reason=best.reason, on=evaluator.on)
            meta["sdlora_recommendation"] = best.reason
        return meta

    def draw_samples(step: int) -> None:
        stage.now = f"drawing samples at step {step}"
        out_dir = run_dir / "samples"  # the sampler writes each image to a temporary name, then renames it
        with writing(out_dir, 3 * resolution**2 * len(sampler.prompts), run_dir,
                     leftovers=lambda: list(out_dir.glob("*.png.tmp"))), step_fn.averaged_weights(), \
                _on_device(frozen, device), \
                ema.swapped() if ema is not None and config.ema_samples else contextlib.nullcontext():
            sampler(step)
        if config.log_with:
            _log_samples(accelerator, sampler.drawn, step)

    for m in step_fn.trained:
        m.train()
    while True:
        # Once in a while: samples (a step-0 baseline first), saves, and requests from the run folder.
        done = step >= config.steps
        stop_now, sample_now, save_now, bad_now = requests(stop.requested, step, losses.bad is not None)
        if bad_now:  # a process saw a non-finite loss: every process reads them all and stops here
            losses.read(wait=True)
        draw = step % sample_every == 0 or done or sample_now
        if stop_now or done:  # the final file first: drawing its samples cannot lose it
            stage.now = "saving the final file"
            path = saves.save(step, final=True, metadata=measured(step, final=True))
            if draw:
                draw_samples(step)
            saves.check(path, "stopped" if stop_now else "done", step)
            return path
        if draw:
            draw_samples(step)
        if step > 0 and (step % save_every == 0 or save_now):
            metadata = measured(step)
            stage.now = f"saving at step {step}"
            saves.save(step, metadata=metadata)
        if preload_at is not None and step >= preload_at and accelerator.is_main_process:
            saves.preload(pipe)
            preload_at = None
        stage.now = f"training (step {step + 1})"

        # The step: this process's share of each micro-batch, as tensors on the device, then one update.
        t_data = time.perf_counter()
        micro_batches = batches.at(step)
        progress.data_s += time.perf_counter() - t_data
        losses.keep(step + 1, step_fn(micro_batches), batches.seen)
        step += 1
        if ema is not None:
            ema.update(step)
        progress(step, losses, step_fn)


def _evaluator(config, step_fn, family, pipe, records, heldout, resolution, accelerator) -> evaluate.Evaluator:
    """The run's measures (sdlora.evaluate) on its own models: strength set on the adapters in place."""
    kind = adapters.get(config.adapter)

    def set_strength(strength: float) -> None:
        for model in step_fn.trained:
            kind.set_strength(model, strength)
    return evaluate.Evaluator(
        denoiser=step_fn.unet, text_encoders=step_fn.text_encoders, tokenizers=family.tokenizers(pipe), family=family,
        vae=pipe.vae, objective=step_fn.objective, scaling=(step_fn.scaling_factor, step_fn.shift_factor),
        set_strength=set_strength,
        records=records, heldout=heldout, trigger=config.trigger, resolution=resolution, clip_skip=step_fn.clip_skip,
        seed=config.seed, device=accelerator.device, dtype=step_fn.weight_dtype, batch_size=config.batch_size,
        autocast=lambda: accelerator.autocast(step_fn.autocast), adapted_encoders=len(step_fn.trained) - 1)


class _Progress:
    """The progress bar and `progress` events: one for the newest finished step at least once a second, and at least
    ~100 times a run so that a short run still draws a loss curve. Its step is the one its loss belongs to (the GPU
    may be behind)."""

    def __init__(self, config, accelerator, events, step: int, bar: bool):
        self.config, self.events, self.accelerator, self.device = config, events, accelerator, accelerator.device
        self.every = max(1, config.steps // 100)
        self.t_last, self.step_last, self.seen_last = time.perf_counter(), step, 0
        self.data_s = 0.0  # host time spent assembling batches since the last event
        self.bar = None
        if bar and accelerator.is_local_main_process:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=config.steps, initial=step, desc="training", unit="step", dynamic_ncols=True)

    def __call__(self, step: int, losses: Losses, step_fn) -> None:
        total = self.config.steps
        if self.bar is not None:
            self.bar.update(1)
        ready = losses.read(wait=step == total)
        now = time.perf_counter()
        if not ready or not (now - self.t_last >= 1.0 or any(at % self.every == 0 for at, _, _ in ready)
                             or ready[-1][0] == total):
            return
        at, loss, seen_at = ready[-1]
        rate = (at - self.step_last) / (now - self.t_last)
        loss_ema = losses.smoothed()
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss_ema:.4f}")
        if self.config.log_with:
            self.accelerator.log({"loss": loss, "loss_ema": loss_ema, "lr": step_fn.lr_scheduler.get_last_lr()[0]},
                                 step=at)
        self.events.emit("progress", step=at, total=total, loss=loss, loss_ema=loss_ema,
                         lr=step_fn.lr_scheduler.get_last_lr()[0],
                         images_per_s=(seen_at - self.seen_last) / (now - self.t_last),
                         eta_s=(total - at) / max(rate, 1e-9), memory_gb=used_gb(self.device),
                         graphs=step_fn.run.captured,
                         # host ms per step assembling batches (noise, token ids, cache lookups): while it stays under
                         # the step time, the GPU, which runs the previous step meanwhile, never waits on data
                         data_ms=1e3 * self.data_s / max(at - self.step_last, 1))
        self.t_last, self.step_last, self.seen_last, self.data_s = now, at, seen_at, 0.0


def _log_samples(accelerator, drawn: list, step: int) -> None:
    """The samples just drawn, as images in the trackers (tensorboard takes arrays, wandb PIL images)."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({f"samples/{i}": np.asarray(image) for i, _, image in drawn}, step=step,
                               dataformats="HWC")
        else:
            tracker.log_images({f"samples/{i}": [image] for i, _, image in drawn}, step=step)


@contextlib.contextmanager
def _on_device(models: list, device):
    """Within: `models` (SD3's T5, kept off the GPU while the step runs) on `device`, for the samples' prompts."""
    away = [m for m in models if m.device != device]
    for m in away:
        m.to(device)
    try:
        yield
    finally:
        for m in away:
            m.to("cpu")


def _check_preset(config, family, events) -> None:
    """A preset made for another family still runs (its values are only a starting point), with a warning."""
    made_for = PRESET_FAMILIES.get(config.preset)
    if made_for and family.label not in made_for:
        events.emit("warning", message=f"preset {config.preset} is made for {' or '.join(made_for)}, and this base is "
                                       f"{family.label}: check its resolution, learning rate and sampling settings, "
                                       "or pick a preset for this base")


def _check_objective(config, family, events) -> None:
    """Settings of the other objective: refused where they would change what the run means, else a warning that
    they do not apply (flow matching has no SNR, so no min-SNR weights)."""
    if family.objective != "flow":
        return
    for field, value, default in (("prediction_type", config.prediction_type, "auto"),
                                  ("zero_terminal_snr", config.zero_terminal_snr, "auto")):
        if value != default:
            raise UserError(f"{field} = {value}: {family.label} is trained by flow matching (a velocity target, no "
                            "DDPM schedule)", f"leave --{field.replace('_', '-')} at auto for {family.label}")
    if config.adapter != "lora":
        raise UserError(f"adapter = {config.adapter}: {family.label} LoRA files are in diffusers' layout, which holds "
                        "plain LoRA only", f"use --adapter lora for {family.label}")
    defaults = TrainConfig(dataset="-")
    # set by hand (not the default, and not off): the DDPM defaults themselves say nothing about this run
    ignored = [f for f in ("min_snr_gamma", "debiased_estimation", "timestep_min", "timestep_max")
               if getattr(config, f) not in (getattr(defaults, f), 0, False)]
    if ignored:
        events.emit("warning", message=f"{', '.join(ignored)}: DDPM settings, unused by {family.label}'s flow matching "
                                       "(see flow_timestep_sampling and flow_loss_weighting)")
    sampler = family.sampler(config.sample_scheduler)
    if sampler != config.sample_scheduler and config.sample_scheduler != defaults.sample_scheduler:
        events.emit("warning", message=f"sample_scheduler {config.sample_scheduler} cannot draw {family.label} (a "
                                       f"flow-matching model): samples use {sampler}")


def _buckets(config, base, records, events) -> tuple[int, list, list]:
    """The training resolution, its aspect-ratio buckets (sides the VAE and the denoiser divide: a UNet's three
    halvings, a transformer's patch) and each image's bucket."""
    resolution = config.resolution or base.resolution
    vae_factor = 2 ** (len(base.pipe.vae.config.block_out_channels) - 1)
    step_px = base.fam.latent_multiple * vae_factor  # SD: 64 px; SD3.5: 16 px (VAE 8 x patch 2)
    if resolution % step_px:
        events.emit("warning", message=f"resolution {resolution} rounded down to {resolution // step_px * step_px}")
    buckets = ds.make_buckets(resolution, step=step_px)
    return resolution, buckets, [ds.nearest_bucket(*r.image.size, buckets) for r in records]


def _warn_about_data(config, data, tokenizer, events, resolution, buckets, processes=1) -> None:
    """Warnings the run's events carry about its data and settings: what ingest found and skipped, settings that
    fight the optimizer, and the dataset check's findings (sdlora.check: duplicates, small, enlarged, cropped or blurry
    pictures, the trigger word, captions the text encoder will cut, how often each picture is seen)."""
    for w in data.warnings + optimizer_warnings(config):
        events.emit("warning", message=w)
    masked = sum(r.mask is not None for r in data.records)
    if masked and not config.masked_loss:
        events.emit("warning", message=f"{masked} pictures have a mask file (NAME{ds.MASK_SUFFIX}.png) and masked_loss "
                                       "is off: they train whole (turn masked_loss on to use the masks)")
    for name, reason in data.rejected:
        events.emit("warning", message=f"skipped {name}: {reason}")
    findings = check_dataset(data, trigger=config.trigger, resolution=resolution, steps=config.steps,
                             batch_size=config.batch_size * processes, grad_accum=config.grad_accum,
                             tokenizer=tokenizer, buckets=buckets)
    for finding in findings:
        events.emit("warning", message=str(finding), check=finding.kind, severity=finding.severity,
                    files=finding.files)


def _check_masks(config, data) -> None:
    """masked_loss with no mask anywhere trains nothing differently: say so before any model loads."""
    if config.masked_loss and not ds.has_masks(data.records):
        where = "a mask file or transparency" if config.alpha_mask else "a mask file"
        raise UserError(f"masked_loss is on, but no picture in {config.dataset} has {where}",
                        f"put NAME{ds.MASK_SUFFIX}.png beside NAME.png (white = learn, black = ignore)"
                        f"{'' if config.alpha_mask else ', turn alpha_mask on for transparent pictures'}"
                        ", or turn masked_loss off")


def _warn_about_reg(reg, batches, events) -> None:
    """What ingest found and skipped in reg_data, said as for the dataset, and reg pictures an epoch leaves out (more
    of them than reg_ratio asks for; kohya warns the same)."""
    for w in reg.warnings:
        events.emit("warning", message=f"reg_data: {w}")
    for name, reason in reg.rejected:
        events.emit("warning", message=f"reg_data: skipped {name}: {reason}")
    unused = len(reg.records) - len({i for i in batches.samples if i >= batches.reg_from})
    if unused:
        events.emit("warning", message=f"reg_data: {unused} of its {len(reg.records)} pictures are never trained on "
                                       f"(reg_ratio {batches.config.reg_ratio:g} takes fewer); raise reg_ratio or "
                                       "use fewer reg pictures")


class _Stage:
    """What the run is doing and which models it holds, for an out-of-memory message."""

    now = "loading the data"
    models: dict = {}


class _SetupTimes:
    """Seconds per setup stage, reported in the start event; "process": from the process's start (or a spare
    process's hand-over) to here, the imports."""

    def __init__(self):
        self.times, self.t = {"process": round(_process_age(), 2)}, time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.times[stage], self.t = round(now - self.t, 2), now


def _process_age() -> float:
    """Seconds since this process started, or since a spare process was handed its run (SDLORA_HANDED_OVER_AT, set
    by sdlora's launcher); 0 where neither is known (not Linux)."""
    handed_over = os.environ.get("SDLORA_HANDED_OVER_AT")
    if handed_over:
        return time.time() - float(handed_over)
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return float(Path("/proc/uptime").read_text().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


def _precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _emit_error(events, message: str, hint: str) -> None:
    try:
        events.emit("error", message=message, hint=hint)
    except OSError:  # a full disk takes the events file too: the error raised still says what happened
        pass
