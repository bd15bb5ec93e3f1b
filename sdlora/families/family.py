"""What a model family provides: the facts and the few functions in which SD1, SD2, SDXL (and later ones) differ."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from sdlora.errors import UserError, first_line
from sdlora.families import naming


@dataclass(frozen=True, eq=False)
class Family:
    """One model family. Families of one group (SD1, SD2, SD2-v) share most functions; each function gets what it
    needs as arguments, so a family is plain data that a new module can fill in."""

    # --- what it is
    name: str  # the registry key; written into events, run files and metadata, so it never changes
    label: str  # for people: "SD1.x"
    group: str  # the families that load through one pipeline and share a key layout: "SD1/SD2", "SDXL"
    arch: str  # the weights' layout, also the shipped config folder (sdlora/configs/ARCH); sd2 and sd2-v share one
    resolution: int  # native training resolution
    prediction_type: str  # "epsilon" or "v_prediction" unless the scheduler config or the checkpoint says otherwise
    cross_attention_dim: int  # width of the text states the full-size denoiser cross-attends to
    pipeline: str  # diffusers pipeline class name
    pipeline_kwargs: Mapping[str, object]  # what loading it takes besides the dtype
    text_encoders: Mapping[str, str]  # kohya key prefix -> pipeline component, in pipeline order
    text_encoder_aliases: Mapping[str, str]  # another prefix loaders take -> the prefix it stands for
    tokenizer_components: tuple[str, ...]  # pipeline components, in the text encoders' order
    sgm_unet: bool  # kohya names the UNet's modules in the original (SGM) block numbering
    # the shared file is in diffusers' peft layout (`transformer.<path>.lora_A.weight`, alpha folded into lora_B), the
    # one layout diffusers, ComfyUI and Forge all read for the family (docs/lora-format.md, SD3.5)
    peft_names: bool
    # in original single-file checkpoints: (component, its naming.TEXT_ENCODER_LAYOUTS kind, its key prefix)
    original_text_encoders: tuple[tuple[str, str, str], ...]
    added_conditioning: bool  # the denoiser takes more than the text states: time_ids/denoiser_kwargs make it
    denoiser: str  # the pipeline component that denoises: "unet", or "transformer" for the MMDiT families
    latent_multiple: int  # latent sides must be multiples of this (a UNet's three halvings: 8; a DiT's patch: 2)
    objective: str  # what the denoiser learns: "ddpm" (noise or velocity on a DDPM schedule) or "flow" (flow matching)
    frozen_text_encoders: tuple[str, ...]  # components encoded with the others but never adapted (SD3's T5)
    token_lengths: tuple[int, ...]  # per tokenizer, the token count the pipeline pads to; 0 = its model_max_length
    # CLIP skip as AUTOMATIC1111 and kohya count it (1 = the last layer, 2 = the penultimate): the layer the family's
    # pipelines condition on by default, and whether it is the only one its loaders use
    clip_skip: int
    clip_skip_fixed: bool
    memory_rows: tuple[tuple[float, int, bool, str], ...]  # (free GiB at least, batch, checkpointing, base precision)
    unet_targets: Mapping[str, list[str]]  # LoRA preset -> layer names in the denoiser
    text_targets: Mapping[str, list[str]]  # LoRA preset -> layer names in the text encoders

    # --- metadata
    base_model_version: str  # kohya's ss_base_model_version
    architecture: str  # modelspec.architecture of the base model (a LoRA for it adds "/lora")
    implementation: str  # modelspec.implementation
    v2: bool  # kohya's ss_v2

    # --- functions
    # (text_encoders, ids, clip_skip) -> (encoder_hidden_states, pooled or None), as the pipelines encode
    encode: Callable
    # (pipe, prompt(s), device, clip_skip) -> (encoder_hidden_states, pooled or None), from the text as pipelines do
    encode_prompt: Callable
    time_ids: Callable  # (original_size, crop_top_left, bucket) -> size conditioning Tensor, or None
    denoiser_kwargs: Callable  # (pooled, time_ids) -> the UNet's added_cond_kwargs, or None
    # (denoiser, noisy_latents, timesteps, encoder_hidden_states, pooled, time_ids) -> model_pred, as the pipeline calls it
    predict: Callable
    checkpoint_prediction: Callable  # (tensor) -> (prediction_type, why) read off a single file's weights, or None

    # --- detection: each returns a family name of the group, or None when it is not this group's
    detect_pipeline: Callable  # (pipe) -> the exact family of a loaded pipeline
    detect_folder: Callable  # (model_index.json as a dict) -> a family of the group (the weights tell the rest)
    detect_checkpoint: Callable  # (file name, keys, tensor(key)) -> family of an original-layout file (its arch)
    detect_denoiser: Callable  # (UNet config) -> a family of the group
    detect_lora: Callable  # (kohya module names) -> family, when the names alone show it
    read_version: Callable  # (ss_base_model_version) -> family, beyond the exact strings
    read_architecture: Callable  # (modelspec.architecture) -> family, beyond the exact strings

    # --- single files that hold the denoiser alone (FLUX.1's): (original state dict, denoiser config) -> diffusers'
    # state dict, the rest of the pipeline coming from a diffusers folder; None: diffusers' single-file loader
    denoiser_from_original: Callable | None = None
    # (kohya-layout LoRA state dict) -> the same in diffusers' peft layout, where diffusers converts the family's kohya
    # files itself (FLUX.1's); None: sdlora's own conversion of kohya's SD3 names (naming.kohya_sd3_to_peft)
    kohya_to_peft: Callable | None = None
    # denoiser modules never adapted, as a regular expression the whole module path must match (peft's
    # exclude_modules): FLUX.1's final `proj_out`, which shares its name with the single blocks' but lies outside them
    unet_exclude: str = ""
    # (device) -> the context a training step runs in, forward and backward alike (gradient checkpointing recomputes
    # blocks in the backward, which must pick the kernels the forward picked): FLUX.1's attention kernels
    step_context: Callable | None = None

    def __post_init__(self):
        for field in ("pipeline_kwargs", "text_encoders", "text_encoder_aliases", "unet_targets", "text_targets"):
            object.__setattr__(self, field, MappingProxyType(dict(getattr(self, field))))

    def tokenizers(self, pipe) -> list:
        """The pipeline's tokenizers, in the order of encoders()."""
        return [getattr(pipe, name) for name in self.tokenizer_components]

    def text_encoder_models(self, pipe) -> list:
        """The pipeline's text encoders that take adapters, in pipeline order (SDXL: CLIP-L, then OpenCLIP-G)."""
        return [getattr(pipe, name) for name in self.text_encoders.values()]

    def encoders(self, pipe) -> list:
        """Every text encoder `encode` takes: the adaptable ones, then the frozen ones (SD3: CLIP-L, CLIP-G, T5)."""
        return self.text_encoder_models(pipe) + [getattr(pipe, name) for name in self.frozen_text_encoders]

    def sampler(self, name: str) -> str:
        """The diffusers scheduler class that draws this family when `name` is asked for: `name`, except that a
        flow-matching family draws with FlowMatchEulerDiscreteScheduler unless a FlowMatch* class is asked for (a
        DDPM-schedule sampler cannot draw it)."""
        if self.objective == "flow" and not name.startswith("FlowMatch"):
            return "FlowMatchEulerDiscreteScheduler"
        return name

    def with_train_guidance(self, guidance: float) -> "Family":
        """This family with its denoiser told `guidance` while training, where `predict` takes a guidance (FLUX.1:
        dev's transformer embeds it, as diffusers' train_dreambooth_lora_flux.py --guidance_scale; schnell's has no
        embedding and ignores it); itself otherwise."""
        import dataclasses
        import functools
        import inspect

        if "guidance" not in inspect.signature(self.predict).parameters:
            return self
        return dataclasses.replace(self, predict=functools.partial(self.predict, guidance=guidance))

    def denoiser_of(self, pipe):
        """The pipeline's denoiser (its UNet or transformer)."""
        return getattr(pipe, self.denoiser)

    def memory_defaults(self, free_gib: float) -> tuple[int, bool, str]:
        """(batch_size, gradient_checkpointing, base_precision) that fit a LoRA run of this family in `free_gib` of
        GPU memory."""
        for need, batch_size, checkpointing, base_precision in self.memory_rows:
            if free_gib >= need:
                return batch_size, checkpointing, base_precision
        raise AssertionError("the last row needs 0 GiB")

    def resolve_clip_skip(self, value: int) -> int:
        """The CLIP skip a run uses: `value`, or for 0 the family's own; a UserError for one its loaders never use."""
        if value == 0:
            return self.clip_skip
        if self.clip_skip_fixed and value != self.clip_skip:
            raise UserError(f"clip_skip = {value}: {self.label} always conditions on CLIP layer {self.clip_skip} from "
                            "the end (kohya and AUTOMATIC1111 ignore clip skip there)",
                            f"use --clip-skip {self.clip_skip} or 0 for {self.label}")
        return value

    def prompt_kwargs(self, pipe, prompts: list[str], negatives: list[str], device, clip_skip: int) -> dict:
        """What a pipeline call takes for `prompts` and `negatives` at `clip_skip`: the prompts themselves at the
        family's own layer, else the embeddings encode_prompt makes (diffusers 0.42's own clip_skip fails under
        transformers 5: huggingface/diffusers#14124; it also leaves the negative prompt unskipped, and AUTOMATIC1111
        skips both)."""
        if clip_skip == self.clip_skip:
            return {"prompt": prompts, "negative_prompt": negatives if any(negatives) else None}
        hidden, pooled = self.encode_prompt(pipe, prompts, device, clip_skip)
        negative_hidden, negative_pooled = self.encode_prompt(pipe, negatives, device, clip_skip)
        out = {"prompt_embeds": hidden, "negative_prompt_embeds": negative_hidden}
        if pooled is not None:
            out.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled)
        return out

    def kohya_prefixes(self) -> dict[str, str]:
        """Every kohya text-encoder prefix a loader maps onto this family (its own, then the aliases) -> component."""
        return {**self.text_encoders, **{alias: self.text_encoders[p] for alias, p in self.text_encoder_aliases.items()}}

    def kohya_unet_name(self, module_path: str, unet_config) -> str:
        """A denoiser module's name in the family's files: kohya's (`lora_unet_...`, in this family's block naming),
        or with peft_names diffusers' (`transformer.<path>`)."""
        if self.peft_names:
            return f"{self.denoiser}.{module_path}"
        return naming.kohya_unet_name(module_path, unet_config, self.sgm_unet)

    def kohya_text_encoder_name(self, prefix: str, module_path: str) -> str:
        """A text-encoder module's name in the family's files under `prefix` (a key of text_encoders): kohya's, or
        with peft_names diffusers' (`text_encoder_2.<path>`). Either way with CLIP's `text_model` level, which
        transformers 5 dropped from CLIPTextModel and every loader still expects (diffusers reads both)."""
        if self.peft_names:
            level = "" if module_path.startswith("text_model.") else "text_model."
            return f"{self.text_encoders[prefix]}.{level}{module_path}"
        return naming.kohya_text_encoder_name(prefix, module_path)

    def loadable(self, state: dict, pipe) -> dict:
        """A LoRA file's tensors as the family's diffusers pipeline loads them: unchanged, except that with
        peft_names a kohya-layout file (fused qkv, `lora_te1_`) comes in diffusers' layout: SD3.5's by sdlora's own
        conversion (diffusers 0.42 has none), FLUX.1's by diffusers' (kohya_to_peft). A UserError names a key it
        cannot place, or quotes the converter's error for a file made for another model."""
        if not self.peft_names or not any(k.startswith(("lora_unet_", "lora_te")) for k in state):
            return state
        try:
            if self.kohya_to_peft is not None:
                return self.kohya_to_peft(state)
            out, left = self._kohya_sd3_to_peft(state, pipe)
        except (ValueError, KeyError, RuntimeError) as e:  # a file whose names or shapes are another model's
            raise UserError(f"this kohya-layout LoRA does not fit {self.label}: {first_line(e, 200)}",
                            "check that the LoRA was made for this model") from None
        if left:
            raise UserError(f"{len(left)} keys of this kohya-layout LoRA fit no {self.label} layer, e.g. {left[0]}",
                            "T5 LoRAs (lora_te3_) are not read; check that the LoRA was made for this model")
        return out

    def _kohya_sd3_to_peft(self, state: dict, pipe) -> tuple[dict, list[str]]:
        """naming.kohya_sd3_to_peft for this pipeline's denoiser and adaptable text encoders."""
        import torch

        encoders = {prefix: (component, [p for p, m in getattr(pipe, component).named_modules()
                                         if isinstance(m, torch.nn.Linear)])
                    for prefix, component in self.text_encoders.items()}
        return naming.kohya_sd3_to_peft(state, self.denoiser_of(pipe).config, encoders)

    def file_state_dict(self, state: dict) -> dict:
        """A kohya-layout state dict (sdlora.lora.kohya_state_dict, named by this family) as the family's files hold
        it: unchanged, or with peft_names in diffusers' peft layout with each alpha folded into lora_B."""
        return naming.peft_layout(state) if self.peft_names else state

    def lora_metadata(self) -> dict[str, str]:
        """The fields by which other tools tell which family a LoRA file is for."""
        return {"ss_base_model_version": self.base_model_version, "ss_v2": str(self.v2),
                "modelspec.architecture": f"{self.architecture}/lora", "modelspec.implementation": self.implementation}


def no_prediction(tensor) -> None:
    """checkpoint_prediction of families whose weights do not show the prediction type."""
    return None
