"""Stable Diffusion 1.x, 2.x and 2.x v-prediction: one CLIP text encoder, a UNet conditioned on its last hidden state."""

from __future__ import annotations

import torch

from sdlora.families.family import Family, no_prediction
from sdlora.families.targets import TEXT_TARGETS, UNET_TARGETS


def encode(text_encoders: list, ids: list[torch.Tensor], clip_skip: int = 1) -> tuple[torch.Tensor, None]:
    """The text encoder's last hidden state, as StableDiffusionPipeline.encode_prompt (no pooled embedding). With
    `clip_skip` N > 1, the output of the N-th layer from the end through the final layer norm, as AUTOMATIC1111
    (sd_hijack_clip.py), kohya (train_util.get_hidden_states) and diffusers (encode_prompt's clip_skip = N - 1) do."""
    text_encoder = text_encoders[0]
    if clip_skip == 1:
        return text_encoder(ids[0])[0], None
    hidden = text_encoder(ids[0], output_hidden_states=True).hidden_states[-clip_skip]
    # transformers 5 keeps CLIPTextModel's final_layer_norm on the model itself; 4.x under text_model
    final_layer_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
    return final_layer_norm(hidden), None


def encode_prompt(pipe, prompt, device, clip_skip: int = 1) -> tuple[torch.Tensor, None]:
    """The pipeline's own encode_prompt at the default layer; at another, its tokenization and `encode`."""
    if clip_skip == 1:
        hidden, _ = pipe.encode_prompt(prompt, device, 1, False)
        return hidden, None
    tokenizer = pipe.tokenizer
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    return encode([pipe.text_encoder], [ids], clip_skip)


def time_ids(original_size, crop_top_left, bucket) -> None:
    return None  # the UNet takes no size conditioning


def denoiser_kwargs(pooled, time_ids) -> None:
    return None


def _is_open_clip(text_encoder) -> bool:
    # SD1 uses OpenAI CLIP (quick_gelu); SD2 uses OpenCLIP ViT-H (gelu). Tells small SD2-like models apart too.
    return getattr(text_encoder.config, "hidden_act", "") == "gelu"


def predict(unet, noisy_latents, timesteps, encoder_hidden_states, pooled, time_ids):
    """The UNet's prediction, as the pipelines call it."""
    return unet(noisy_latents, timesteps, encoder_hidden_states).sample


def detect_pipeline(pipe) -> str:
    """SD2 cross-attends to 1024-wide OpenCLIP states; v-prediction comes from the scheduler config, never the
    weights. Anything else is SD1 (the embedded tiny model too)."""
    if pipe.unet.config.cross_attention_dim == 1024 or _is_open_clip(pipe.text_encoder):
        return "sd2-v" if pipe.scheduler.config.get("prediction_type") == "v_prediction" else "sd2"
    return "sd1"


def detect_folder(model_index: dict) -> str:
    return "sd1"  # SD1 and SD2 folders load alike; the loaded pipeline tells them apart (detect_pipeline)


def detect_checkpoint(file_name: str, keys, tensor) -> str:
    """SD2 stores an OpenCLIP ViT-H text encoder; otherwise the width the UNet's cross-attention takes tells."""
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    to_k = tensor("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    return "sd2" if to_k is not None and to_k.shape[-1] == 1024 else "sd1"


def detect_denoiser(config) -> str:
    return "sd2" if config.get("cross_attention_dim") == 1024 else "sd1"


def detect_lora(names) -> None:
    return None  # SD1 and SD2 LoRAs share key names: the widths tell (families.of_width)


def read_version(version: str) -> str | None:
    """Any kohya version string of SD2 (`..._v`: v-prediction) or SD1."""
    if version.startswith("sd_v2"):
        return "sd2-v" if version.endswith("_v") else "sd2"
    if version.startswith("sd_v1"):
        return "sd1"
    return None


def read_architecture(architecture: str) -> str | None:
    for start, name in (("stable-diffusion-v2-768-v", "sd2-v"), ("stable-diffusion-v2", "sd2"),
                        ("stable-diffusion-v1", "sd1")):
        if architecture.startswith(start):
            return name
    return None


def sd2_prediction(tensor) -> tuple[str, str] | None:
    """ComfyUI's SD2 test (comfy/supported_models.py, SD20.model_type): the v models' last attention block has a
    norm1 bias spread far wider than the epsilon models'."""
    bias = tensor("model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias")
    if bias is not None and bias.numel() > 1:
        v = torch.std(bias.float(), unbiased=False).item() > 0.09
        return "v_prediction" if v else "epsilon", "SD2 norm-bias test (ComfyUI's heuristic)"
    return None


# Memory-aware defaults on a GPU: (free GiB at least, batch_size, gradient_checkpointing, base_precision), roomiest
# first, for a LoRA run at the family's native resolution with the base in bf16, cached latents, rank 16 and the
# text-encoder LoRA on. The thresholds follow the peaks measured for SD1.5 (bench/full_size_check.py,
# bench/train_speed.py; docs/benchmarks.md, Choices measured); SD2-v at 768 is scaled from SD1 by pixel count. Below
# the last unquantized row the frozen base is stored in fp8 (sdlora.quantize), which halves the UNet and text encoders
# (not measured on a small card). The thresholds leave headroom for the allocator and other processes: an
# out-of-memory stop costs more than checkpointing's extra compute.
MEMORY_512 = ((10, 4, False, "auto"), (6, 4, True, "auto"), (4.5, 1, True, "auto"), (0, 1, True, "fp8"))
MEMORY_768 = ((18, 4, False, "auto"), (10, 4, True, "auto"), (7, 1, True, "auto"), (0, 1, True, "fp8"))


def _family(name, label, arch, resolution, prediction_type, cross_attention_dim, text_encoder_kind, text_encoder_key,
            memory_rows, base_model_version, architecture, v2, checkpoint_prediction) -> Family:
    return Family(
        name=name, label=label, group="SD1/SD2", arch=arch, resolution=resolution, prediction_type=prediction_type,
        cross_attention_dim=cross_attention_dim, pipeline="StableDiffusionPipeline",
        pipeline_kwargs=dict(safety_checker=None, requires_safety_checker=False),
        text_encoders={"lora_te_": "text_encoder"}, text_encoder_aliases={"lora_te1_": "lora_te_"},
        tokenizer_components=("tokenizer",), sgm_unet=False, peft_names=False,
        original_text_encoders=(("text_encoder", text_encoder_kind, text_encoder_key),), added_conditioning=False,
        denoiser="unet", latent_multiple=8, objective="ddpm", frozen_text_encoders=(), token_lengths=(0,),
        # SD2's converted text encoder already ends one layer early (the original conditions on OpenCLIP's penultimate
        # layer), so its last layer, 1, is its own too; NovelAI-lineage SD1 anime models use 2
        clip_skip=1, clip_skip_fixed=False,
        memory_rows=memory_rows, unet_targets=UNET_TARGETS, text_targets=TEXT_TARGETS,
        base_model_version=base_model_version, architecture=architecture, implementation="diffusers", v2=v2,
        encode=encode, encode_prompt=encode_prompt, time_ids=time_ids, denoiser_kwargs=denoiser_kwargs,
        predict=predict, checkpoint_prediction=checkpoint_prediction, detect_pipeline=detect_pipeline, detect_folder=detect_folder,
        detect_checkpoint=detect_checkpoint, detect_denoiser=detect_denoiser, detect_lora=detect_lora,
        read_version=read_version, read_architecture=read_architecture)


# base_model_version: kohya's strings (sd-scripts' get_model_version_str_for_sd1_sd2). Single files keep SD1's OpenAI
# CLIP under cond_stage_model.transformer. and SD2's OpenCLIP under cond_stage_model.model. (the prefixes diffusers'
# single-file loader strips: diffusers/loaders/single_file_utils.py).
SD1 = _family("sd1", "SD1.x", "sd1", 512, "epsilon", 768, "clip", "cond_stage_model.transformer.", MEMORY_512,
              "sd_v1", "stable-diffusion-v1", False, no_prediction)
SD2 = _family("sd2", "SD2.x", "sd2", 512, "epsilon", 1024, "openclip", "cond_stage_model.model.", MEMORY_512,
              "sd_v2", "stable-diffusion-v2-512", True, sd2_prediction)
SD2_V = _family("sd2-v", "SD2.x v-prediction", "sd2", 768, "v_prediction", 1024, "openclip",
                "cond_stage_model.model.", MEMORY_768, "sd_v2_v", "stable-diffusion-v2-768-v", True, sd2_prediction)
FAMILIES = (SD1, SD2, SD2_V)
