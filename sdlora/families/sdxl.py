"""SDXL: two CLIP text encoders side by side, a UNet also conditioned on the pooled text and each image's size."""

from __future__ import annotations

import torch

from sdlora.errors import UserError
from sdlora.families.family import Family, no_prediction
from sdlora.families.targets import TEXT_TARGETS, UNET_TARGETS


def encode(text_encoders: list, ids: list[torch.Tensor], clip_skip: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Both encoders' penultimate hidden states (clip_skip 2, the only one SDXL's loaders use) side by side, with no
    final layer norm, and the second encoder's pooled projection (diffusers' StableDiffusionXLPipeline.encode_prompt).
    """
    hidden, pooled = [], None
    for token_ids, text_encoder in zip(ids, text_encoders):
        out = text_encoder(token_ids, output_hidden_states=True)
        pooled = out[0]  # the last encoder's is the one used: CLIPTextModelWithProjection's text_embeds
        hidden.append(out.hidden_states[-clip_skip])
    return torch.cat(hidden, dim=-1), pooled


def encode_prompt(pipe, prompt, device, clip_skip: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    # diffusers counts SDXL's clip_skip from the penultimate layer (hidden_states[-(clip_skip + 2)])
    hidden, _, pooled, _ = pipe.encode_prompt(prompt, device=device, do_classifier_free_guidance=False,
                                              clip_skip=None if clip_skip == 2 else clip_skip - 2)
    return hidden, pooled


def time_ids(original_size, crop_top_left, bucket) -> torch.Tensor:
    """The size conditioning for one image: original (height, width), crop (top, left), target (height, width) from
    the bucket's (width, height), in the order of diffusers' StableDiffusionXLPipeline._get_add_time_ids."""
    return torch.tensor([*original_size, *crop_top_left, bucket[1], bucket[0]], dtype=torch.float32)


def denoiser_kwargs(pooled, time_ids) -> dict:
    return {"text_embeds": pooled, "time_ids": time_ids}


def predict(unet, noisy_latents, timesteps, encoder_hidden_states, pooled, time_ids):
    """The UNet's prediction with the pooled text and size conditioning, as the pipeline calls it."""
    return unet(noisy_latents, timesteps, encoder_hidden_states,
                added_cond_kwargs=denoiser_kwargs(pooled, time_ids)).sample


def detect_pipeline(pipe) -> str | None:
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else None


def detect_folder(model_index: dict) -> str | None:
    return "sdxl" if "text_encoder_2" in model_index else None


def detect_checkpoint(file_name: str, keys, tensor) -> str | None:
    """SGM checkpoints keep the text encoders under conditioner.embedders: CLIP-L at 0, OpenCLIP-G at 1."""
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("conditioner.") for k in keys):
        raise UserError(f"{file_name} looks like an SDXL refiner (one OpenCLIP text encoder, no CLIP-L)",
                        "train on an SDXL base checkpoint")
    return None


def detect_denoiser(config) -> str | None:
    return "sdxl" if config.get("addition_embed_type") == "text_time" else None


def detect_lora(names) -> str | None:
    """A second text encoder's keys, or UNet names in the SGM block numbering."""
    return "sdxl" if any(n.startswith("lora_te2_") or "_input_blocks_" in n for n in names) else None


def read_version(version: str) -> str | None:
    return "sdxl" if version.startswith("sdxl") else None


def read_architecture(architecture: str) -> str | None:
    return "sdxl" if architecture.startswith("stable-diffusion-xl") else None


# (free GiB at least, batch_size, gradient_checkpointing, base_precision), roomiest first, as sd.MEMORY_512: the
# thresholds follow the peaks measured for SDXL at 1024 (bench/full_size_check.py; docs/benchmarks.md).
MEMORY_1024 = ((40, 4, False, "auto"), (16, 4, True, "auto"), (12, 1, True, "auto"), (0, 1, True, "fp8"))

SDXL = Family(
    name="sdxl", label="SDXL", group="SDXL", arch="sdxl", resolution=1024, prediction_type="epsilon",
    cross_attention_dim=2048, pipeline="StableDiffusionXLPipeline", pipeline_kwargs={},
    text_encoders={"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"},
    text_encoder_aliases={"lora_te_": "lora_te1_"}, tokenizer_components=("tokenizer", "tokenizer_2"), sgm_unet=True,
    peft_names=False, denoiser="unet", latent_multiple=8, objective="ddpm", frozen_text_encoders=(), token_lengths=(0, 0),
    # the prefixes diffusers' single-file loader strips (diffusers/loaders/single_file_utils.py)
    original_text_encoders=(("text_encoder", "clip", "conditioner.embedders.0.transformer."),
                            ("text_encoder_2", "openclip", "conditioner.embedders.1.model.")),
    # SDXL was trained on both encoders' penultimate layer: kohya ignores --clip_skip for it (sdxl_train_util.py) and
    # AUTOMATIC1111 does unless an experimental option is on, so a LoRA trained on another layer would be used on this
    added_conditioning=True, clip_skip=2, clip_skip_fixed=True, memory_rows=MEMORY_1024, unet_targets=UNET_TARGETS,
    text_targets=TEXT_TARGETS,
    base_model_version="sdxl_base_v1-0", architecture="stable-diffusion-xl-v1-base",
    implementation="https://github.com/Stability-AI/generative-models", v2=False,
    encode=encode, encode_prompt=encode_prompt, time_ids=time_ids, denoiser_kwargs=denoiser_kwargs,
    predict=predict, checkpoint_prediction=no_prediction, detect_pipeline=detect_pipeline, detect_folder=detect_folder,
    detect_checkpoint=detect_checkpoint, detect_denoiser=detect_denoiser, detect_lora=detect_lora,
    read_version=read_version, read_architecture=read_architecture)
FAMILIES = (SDXL,)
