"""Previews: a base model plus any LoRA files at chosen strengths, one image or a grid across strengths and seeds."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from sdlora.config import SAMPLE_GUIDANCE, SAMPLE_SCHEDULER, SAMPLE_STEPS
from sdlora.errors import UserError, first_line
from sdlora.info import base_modules, check_plain_lora, fit, read_adapter
from sdlora.lora import check_lora_fits, read_lora
from sdlora.models import Base, check_sampler, load_base, sample_guidance_rescale
from sdlora.patch import Patches
from sdlora.sampling import rescale_kwargs


class Previewer:
    """A loaded base model that LoRAs can be added to and re-weighted without reloading the base."""

    keep_loaded = 8  # LoRAs kept loaded for quick switching; beyond that the least recently used is dropped

    def __init__(self, base: str | Base, device: str | None = None, *, base_config: str = "",
                 prediction_type: str = "auto", zero_terminal_snr: str = "auto"):
        """`base` as `--base` takes it (or a loaded Base); `base_config`, `prediction_type` and `zero_terminal_snr`
        as in `load_base`."""
        self.base = load_base(base, base_config=base_config, prediction_type=prediction_type,
                              zero_terminal_snr=zero_terminal_snr) if isinstance(base, str) else base
        self.pipe = self.base.pipe
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.pipe.to(self.device)
        self._loaded: dict[str, str] = {}  # file identity -> adapter name
        self._clip_skips: dict[str, int] = {}  # adapter name -> the clip skip its file says it was trained with
        self._active: list[tuple[str, float]] = []  # (adapter name, strength) in use
        # files diffusers' loader does not read whole (LoHa, LoKr, DoRA): adapter name -> sdlora.info.Adapter, put into
        # the base's weights at their strengths (sdlora.patch) instead of loaded as adapters
        self._patched: dict = {}
        self._patches = Patches(base_modules(self.pipe, self.base.family))

    def set_loras(self, loras: list[tuple[str, float]]) -> None:
        """Use these (file, strength) pairs from now on; files already loaded are only re-weighted."""
        names, weights = [], []
        for path, strength in loras:
            names.append(self._load(path))
            weights.append(float(strength))
        self._drop_unused(keep=set(names))
        self._active = list(zip(names, weights))
        self._patches.apply([(self._patched[n], w) for n, w in self._active if n in self._patched])
        loaded = [(n, w) for n, w in self._active if n not in self._patched]
        idle = [n for n in self._loaded.values() if n not in self._patched]  # diffusers' adapters, none in use
        if loaded:
            self.pipe.set_adapters([n for n, _ in loaded], adapter_weights=[w for _, w in loaded])
        elif idle:
            self.pipe.set_adapters(idle, adapter_weights=[0.0] * len(idle))

    def _load(self, path: str) -> str:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"LoRA file not found: {path}", "give the path of a .safetensors file")
        stat = p.stat()
        key = f"{p.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        if key not in self._loaded:
            name = "lora_" + hashlib.sha1(key.encode()).hexdigest()[:10]
            try:
                state, metadata = read_lora(p)
            except Exception as e:
                raise UserError(f"{p.name} is not a readable .safetensors LoRA file: {first_line(e, 200)}",
                                "give the path of a LoRA .safetensors file") from None
            check_plain_lora(p.name, state)  # say what an OFT or Tucker file is, before diffusers fails on its keys
            check_lora_fits(p.name, state, metadata, self.base)
            # SD3.5 and FLUX.1 kohya-layout files come converted (what fits no layer refused by name); every other
            # file loads as it is (with its metadata)
            loadable = self.base.fam.loadable(state, self.pipe)
            adapter = read_adapter(p)
            if adapter.plain:
                try:
                    self.pipe.load_lora_weights(str(p) if loadable is state else loadable, adapter_name=name)
                except Exception as e:  # diffusers raises ValueError/KeyError/RuntimeError for foreign files
                    raise UserError(f"{p.name} could not be loaded on this base model: {first_line(e, 200)}",
                                    "check that the LoRA was made for this model family (SD1, SD2, SDXL, SD3.5 or "
                                    "FLUX.1)") from None
            else:
                # diffusers 0.42 reads no LoHa/LoKr and drops DoRA's dora_scale: these go into the weights instead
                result = fit(adapter, self._patches.table)
                bad = adapter.stray + result["missing"] + [n for n, _, _ in result["wrong_shape"]]
                if bad:
                    raise UserError(f"{len(bad)} entries in {p.name} do not map onto this base model, e.g. {bad[0]}",
                                    f"`sdlora info {p.name} --base ...` lists them; check that it was made for "
                                    f"this model family")
                self._patched[name] = adapter
            self._loaded[key] = name
            if metadata.get("ss_clip_skip", "").isdigit():  # kohya writes "None" when it was not set
                self._clip_skips[name] = int(metadata["ss_clip_skip"])
        self._loaded[key] = self._loaded.pop(key)  # most recently used last
        return self._loaded[key]

    def _drop_unused(self, keep: set[str]) -> None:
        """Unload the least recently used LoRAs not in `keep` while more than `keep_loaded` are loaded: each one holds
        its weights in memory, and the app may try many."""
        for key in list(self._loaded):
            if len(self._loaded) <= self.keep_loaded:
                break
            if self._loaded[key] not in keep:
                name = self._loaded.pop(key)
                if self._patched.pop(name, None) is None:
                    self.pipe.delete_adapters(name)

    @torch.no_grad()
    def image(self, prompt: str, *, negative_prompt: str = "", seed: int = 0, steps: int = SAMPLE_STEPS,
              guidance_scale: float = SAMPLE_GUIDANCE, scheduler: str = SAMPLE_SCHEDULER, width: int | None = None,
              height: int | None = None, guidance_rescale: float = -1.0, clip_skip: int = 0) -> Image.Image:
        """One image; `torch.Generator("cpu").manual_seed(seed)` as the training samples use."""
        return self.images([prompt], [seed], negative_prompt=negative_prompt, steps=steps,
                           guidance_scale=guidance_scale, scheduler=scheduler, width=width, height=height,
                           guidance_rescale=guidance_rescale, clip_skip=clip_skip)[0]

    def images(self, prompts: list[str], seeds: list[int], *, negative_prompt: str = "", steps: int = SAMPLE_STEPS,
               guidance_scale: float = SAMPLE_GUIDANCE, scheduler: str = SAMPLE_SCHEDULER, width: int | None = None,
               height: int | None = None, guidance_rescale: float = -1.0, clip_skip: int = 0) -> list[Image.Image]:
        """One image per (prompt, seed), drawn as one batch: each starts from its own seed's noise, as `image`
        would draw it alone (up to the last bit of float rounding), in a fraction of the time on a CPU.

        As the training samples draw them: the scheduler keeps the base's schedule settings (a zero-terminal-SNR
        base's rescaled betas and trailing spacing); `guidance_rescale` -1 is the base's own (0.7 on a
        zero-terminal-SNR base, else 0); `clip_skip` 0 is what the LoRAs in use were trained with (their
        `ss_clip_skip`), else the base's own."""
        import diffusers

        if not hasattr(diffusers, scheduler):
            raise UserError(f"unknown scheduler {scheduler!r}", "use a diffusers scheduler class name such as EulerDiscreteScheduler")
        fam, size = self.base.fam, self.base.resolution
        scheduler = fam.sampler(scheduler)  # SD3.5: a flow-matching one
        check_sampler(scheduler, self.pipe.scheduler.config)
        self.pipe.scheduler = getattr(diffusers, scheduler).from_config(self.pipe.scheduler.config)
        trained_with = next((self._clip_skips[n] for n, s in self._active if s and n in self._clip_skips), 0)
        clip_skip = fam.resolve_clip_skip(clip_skip or trained_with)
        text = fam.prompt_kwargs(self.pipe, list(prompts), [negative_prompt] * len(prompts), self.device, clip_skip)
        rescale = rescale_kwargs(self.pipe, sample_guidance_rescale(guidance_rescale, self.pipe.scheduler.config))
        try:
            return self.pipe(**text, num_inference_steps=steps, guidance_scale=guidance_scale, **rescale,
                             width=width or size, height=height or size,
                             generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds]).images
        except ValueError as e:  # the pipeline's own checks of what was asked: sizes, steps, guidance
            multiple = fam.latent_multiple * self.pipe.vae_scale_factor
            raise UserError(f"the {fam.label} pipeline cannot draw this: {first_line(e, 200)}",
                            f"use a width and height in multiples of {multiple} px, near the model's own size "
                            f"({size} px), and at least 1 step") from None

    def strength_grid(self, lora: str, prompt: str, strengths=(0.0, 0.5, 1.0), seeds=(0, 1), **kw) -> Image.Image:
        """Rows are seeds, columns strengths; labels on top. Each column is drawn as one batch of seeds."""
        seeds = list(seeds)
        columns = []
        for s in strengths:
            self.set_loras([(lora, s)])
            columns.append(self.images([prompt] * len(seeds), seeds, **kw))
        return grid([list(row) for row in zip(*columns)], [f"{s:g}" for s in strengths])


def grid(cells: list[list[Image.Image]], labels: list[str]) -> Image.Image:
    """Paste rows of equal-size images into one image with a label above each column."""
    w, h = cells[0][0].size
    pad = 14
    out = Image.new("RGB", (w * len(cells[0]), h * len(cells) + pad), "white")
    draw = ImageDraw.Draw(out)
    for c, label in enumerate(labels):
        draw.text((c * w + 2, 1), label, fill="black")
    for r, row in enumerate(cells):
        for c, img in enumerate(row):
            out.paste(img, (c * w, pad + r * h))
    return out
