"""Samples during training: images at fixed prompts and seeds, each recorded so plain diffusers can draw it again."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from sdlora.atomic import atomic_path
from sdlora.graphs import Graphed


# The scheduler settings a sample event records beside the scheduler's name: what a plain diffusers scheduler made from
# the base's own config needs besides (`from_config(config, **scheduler_config)`) to draw the same image.
SCHEDULE_SETTINGS = ("prediction_type", "rescale_betas_zero_snr", "timestep_spacing")


class Sampler:
    """Draws the run's samples with the adapters as trained (strength 1) into `run_dir/samples`, a `sample` event
    each (prompt, seed, steps, guidance, scheduler, size: what plain diffusers needs to redo it).

    On a GPU the UNet's forward replays as CUDA graphs (`graphs`, a SampleGraphs). After an out-of-memory it draws one
    prompt per call with a tiled VAE decode and no graphs from then on (`low_memory`), as ComfyUI falls back; if even
    that does not fit, that round is skipped and training goes on.
    """

    def __init__(self, accelerator, pipe, trained, config, prompts: list[str], resolution: int, run_dir: Path, events,
                 graphs: "SampleGraphs | None" = None):
        from sdlora import families
        from sdlora.models import sample_guidance_rescale

        self.accelerator, self.pipe, self.trained, self.config = accelerator, pipe, trained, config
        # as training encodes the captions; guidance rescale as the base's schedule wants it
        self.family = families.detect(pipe)
        self.clip_skip = self.family.resolve_clip_skip(config.clip_skip)
        self.scheduler_name = self.family.sampler(config.sample_scheduler)  # SD3.5: a flow-matching one
        self.guidance_rescale = sample_guidance_rescale(config.sample_guidance_rescale, pipe.scheduler.config)
        self.prompts, self.resolution, self.run_dir, self.events = prompts, resolution, Path(run_dir), events
        self.graphs, self.low_memory = graphs, False
        self.drawn = []  # (index, prompt, image) of the last round

    @torch.no_grad()
    def __call__(self, step: int) -> None:
        import diffusers

        if not self.accelerator.is_main_process:
            return
        config, prompts, events = self.config, self.prompts, self.events
        # the trained models are the pipeline's own (adapters added in place): only the scheduler differs; it keeps the
        # base's schedule settings (a zero-terminal-SNR base's rescaled betas and trailing spacing, sdlora.models)
        scheduler = getattr(diffusers, self.scheduler_name).from_config(self.pipe.scheduler.config)
        sampler = type(self.pipe)(**{**self.pipe.components, "scheduler": scheduler})
        sampler.set_progress_bar_config(disable=True)
        for m in self.trained:
            m.eval()
        out_dir = self.run_dir / "samples"
        out_dir.mkdir(exist_ok=True)
        self.drawn = []

        # two prompts per pipeline call (a batch costs about what one image does while the UNet is overhead-bound);
        # one generator per image, so each image is what a call with its prompt and seed alone draws
        first, black = 0, []
        while first < len(prompts):
            chunk = prompts[first:first + (1 if self.low_memory else 2)]
            seeds = [config.sample_seed + first + i for i in range(len(chunk))]
            try:
                images, finite = self._draw(sampler, chunk, seeds)
            except torch.OutOfMemoryError:
                images = None
            if images is None:  # out of the except block, so the failed call's tensors are freed
                first_time = not self.low_memory
                self.low_memory, self.graphs = True, None  # the graphs' memory goes too
                torch.cuda.empty_cache()
                if first_time:
                    events.emit("warning", message="out of memory while drawing samples: drawing them one at a time "
                                                   "with a tiled VAE decode from now on")
                    continue
                events.emit("warning", message=f"samples at step {step} skipped: out of memory")
                break
            black += [first + i for i, ok in enumerate(finite) if not ok]
            for i, (prompt, seed, image) in enumerate(zip(chunk, seeds, images)):
                self.drawn.append((first + i, prompt, image))
                path = out_dir / f"step-{step:06d}-{first + i}.png"
                with atomic_path(path) as tmp:
                    image.save(tmp, format="PNG")
                events.emit("sample", step=step, path=str(path), prompt=prompt,
                            negative_prompt=config.sample_negative, seed=seed, steps=config.sample_steps,
                            guidance_scale=config.sample_guidance, scheduler=self.scheduler_name,
                            width=self.resolution, height=self.resolution, strength=1.0,
                            guidance_rescale=self.guidance_rescale, clip_skip=self.clip_skip,
                            scheduler_config={k: scheduler.config[k] for k in SCHEDULE_SETTINGS
                                              if scheduler.config.get(k) is not None})
            first += len(chunk)
        if black:  # the loss is finite (or the run would have stopped): the drawing itself overflowed
            events.emit("warning", message=f"{len(black)} of {len(prompts)} samples at step {step} came out black: the "
                        "denoiser's prediction was not a number (NaN or infinite) while drawing them. With fp16 "
                        "mixed precision the base overflows: train with --mixed-precision bf16 (or fp32); else lower "
                        "--sample-guidance", samples=black, step=step)
        for m in self.trained:
            m.train()

    def _draw(self, sampler, chunk: list[str], seeds: list[int]) -> tuple[list, list[bool]]:
        """The images of `chunk`'s prompts, and whether each one's final latents are all finite numbers."""
        config, graphs = self.config, None if self.low_memory else self.graphs
        with self.accelerator.autocast(), graphs.replaying() if graphs is not None else contextlib.nullcontext():
            text = self.family.prompt_kwargs(sampler, chunk, [config.sample_negative] * len(chunk),
                                             self.accelerator.device, self.clip_skip)
            latents = sampler(**text, num_inference_steps=config.sample_steps, guidance_scale=config.sample_guidance,
                              **rescale_kwargs(sampler, self.guidance_rescale), width=self.resolution,
                              height=self.resolution,
                              output_type="latent",
                              generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds]).images
        if latents.dim() == 3:  # FluxPipeline's latents come packed in 2x2 patches: its own unpacking
            latents = type(sampler)._unpack_latents(latents, self.resolution, self.resolution,
                                                    sampler.vae_scale_factor)
        finite = [bool(torch.isfinite(latents[i]).all()) for i in range(len(chunk))]
        return [decode(sampler, latents[i:i + 1], tiled=self.low_memory) for i in range(len(chunk))], finite


class SampleGraphs:
    """The UNet's forward, while samples are drawn, replayed as CUDA graphs (sdlora.graphs), one per input shape.

    Eager sampling is bound by Python and kernel launches: a UNet call takes several times its GPU work
    (docs/benchmarks.md). The graphs read the adapter weights where the optimizer updates them in place, so every
    round draws with the weights of its step. Inside, autocast keeps no weight cache: a graph must not hold tensors
    cached outside it. A call the graphs do not cover (other UNet arguments) runs eagerly."""

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


def rescale_kwargs(pipe, guidance_rescale: float) -> dict:
    """`guidance_rescale` for a pipeline call, where the pipeline takes it (StableDiffusion3Pipeline does not)."""
    import inspect

    return {"guidance_rescale": guidance_rescale} \
        if "guidance_rescale" in inspect.signature(type(pipe).__call__).parameters else {}


def decode(pipe, latents: torch.Tensor, tiled: bool = False):
    """The pipelines' own VAE decode, but in fp32 outside autocast: under fp16 autocast a VAE (SDXL's especially)
    overflows into black samples. `tiled`: in overlapping 512 px tiles (diffusers' tiled decode), for low memory."""
    vae = pipe.vae
    if tiled:
        kept = vae.tile_sample_min_size, vae.tile_latent_min_size
        vae.tile_sample_min_size, vae.tile_latent_min_size = 512, 512 // pipe.vae_scale_factor
        vae.enable_tiling()
    try:
        with torch.autocast(latents.device.type, enabled=False):
            # the pipelines' own unscaling: SD3's VAE also shifts its latents (shift_factor; None elsewhere)
            latents = latents.to(vae.dtype) / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0)
            image = vae.decode(latents, return_dict=False)[0]
    finally:
        if tiled:
            vae.disable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = kept
    return pipe.image_processor.postprocess(image, output_type="pil")[0]
