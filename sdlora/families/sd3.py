"""Stable Diffusion 3.5 (Medium, Large): an MMDiT transformer trained by flow matching, conditioned on CLIP-L, CLIP-G
and T5-XXL.

What differs from SD1/SDXL: the denoiser is `pipe.transformer` (SD3Transformer2DModel), called with the pooled CLIP
projections; the objective is flow matching (sdlora.objectives.FlowMatching); 16-channel latents shifted and scaled by
the VAE; latent sides a multiple of the patch size (2); the T5 encoder is encoded with the others but never adapted.
The shared file is diffusers' peft layout (`transformer.<path>`), the one layout diffusers, ComfyUI and Forge all read
for SD3 (docs/lora-format.md, SD3.5).
"""

from __future__ import annotations

import torch

from sdlora.families.family import Family, no_prediction

# The MMDiT blocks' joint attention: the image stream's q/k/v/out and the text stream's (diffusers' names; kohya
# trains the original fused `qkv`, which diffusers splits on load). MMDiT-X blocks (3.5 Medium) add `attn2`, the same
# four names. "attn-mlp" is every linear layer of the blocks, as kohya's sd-scripts trains SD3 by default
# (networks/lora_sd3.py): besides the attention, each stream's feed-forward and modulation (the original
# adaLN_modulation; the final layer's, norm_out, stays as it is).
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
MLP = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
MODULATION = ["norm1.linear", "norm1_context.linear"]
TRANSFORMER_TARGETS = {"attn": ATTENTION, "attn-mlp": ATTENTION + MLP + MODULATION}
# the two CLIP encoders (CLIPTextModelWithProjection); T5 stays frozen
TEXT_TARGETS = {"attn": ["q_proj", "k_proj", "v_proj", "out_proj"],
                "attn-mlp": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]}
T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length default


def encode(text_encoders: list, ids: list[torch.Tensor], clip_skip: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """As StableDiffusion3Pipeline.encode_prompt: both CLIPs' penultimate hidden states side by side, padded to T5's
    width and followed by T5's last hidden state along the sequence; the pooled text is both CLIPs' projections."""
    hidden, pooled = [], []
    for token_ids, text_encoder in zip(ids[:2], text_encoders[:2]):
        out = text_encoder(token_ids, output_hidden_states=True)
        pooled.append(out[0])
        hidden.append(out.hidden_states[-clip_skip])
    clip = torch.cat(hidden, dim=-1)
    t5 = text_encoders[2](ids[2])[0].to(clip.dtype)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)


def encode_prompt(pipe, prompt, device, clip_skip: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    # diffusers counts SD3's clip_skip from the penultimate layer (hidden_states[-(clip_skip + 2)])
    hidden, _, pooled, _ = pipe.encode_prompt(prompt, prompt, prompt, device=device, do_classifier_free_guidance=False,
                                              clip_skip=None if clip_skip == 2 else clip_skip - 2)
    return hidden, pooled


def time_ids(original_size, crop_top_left, bucket) -> None:
    return None  # no size conditioning


def denoiser_kwargs(pooled, time_ids) -> None:
    return None


def predict(transformer, noisy_latents, timesteps, encoder_hidden_states, pooled, time_ids):
    """The transformer's velocity, called as StableDiffusion3Pipeline calls it (timesteps 0-1000, sigma x 1000)."""
    return transformer(hidden_states=noisy_latents, timestep=timesteps, encoder_hidden_states=encoder_hidden_states,
                       pooled_projections=pooled, return_dict=False)[0]


def _large(qk_norm: bool, dual_attention: bool) -> bool:
    # kohya's test (library/sd3_utils.py): a qk-norm model without MMDiT-X blocks is 3.5 Large, with them 3.5 Medium
    return qk_norm and not dual_attention


def detect_pipeline(pipe) -> str | None:
    transformer = getattr(pipe, "transformer", None)
    if transformer is None or type(transformer).__name__ != "SD3Transformer2DModel":
        return None
    return detect_denoiser(transformer.config)


def detect_folder(model_index: dict) -> str | None:
    return "sd3.5-medium" if model_index.get("transformer", [None, None])[1] == "SD3Transformer2DModel" else None


def detect_checkpoint(file_name: str, keys, tensor) -> str | None:
    """Original SD3 files keep the MMDiT under model.diffusion_model.joint_blocks (the text encoders, when present,
    under text_encoders.clip_l/clip_g/t5xxl)."""
    if not any(k.startswith("model.diffusion_model.joint_blocks.") for k in keys):
        return None
    qk_norm = any(k.endswith(".attn.ln_q.weight") for k in keys)
    dual = any(".x_block.attn2." in k for k in keys)
    return "sd3.5-large" if _large(qk_norm, dual) else "sd3.5-medium"


def detect_denoiser(config) -> str | None:
    if "joint_attention_dim" not in config:
        return None
    large = _large(bool(config.get("qk_norm")), bool(config.get("dual_attention_layers")))
    return "sd3.5-large" if large else "sd3.5-medium"


def detect_lora(names) -> str | None:
    """diffusers' SD3 names (`transformer.transformer_blocks.N`) or kohya's (`lora_unet_joint_blocks_N`). Medium and
    Large share the names: the widths tell (3.5 Large is 2432 wide, Medium 1536)."""
    if any(n.startswith(("transformer.transformer_blocks.", "lora_unet_joint_blocks_")) for n in names):
        return "sd3.5-medium"
    return None


def read_version(version: str) -> str | None:
    if version.startswith("sd3"):
        return "sd3.5-large" if "large" in version else "sd3.5-medium"
    return None


def read_architecture(architecture: str) -> str | None:
    """kohya's `stable-diffusion-3-5-large`, `stable-diffusion-3-5-medium`, `stable-diffusion-3-medium`, and the
    `stable-diffusion-v3...` spellings other tools use."""
    if architecture.startswith(("stable-diffusion-3", "stable-diffusion-v3")):
        return "sd3.5-large" if "large" in architecture else "sd3.5-medium"
    return None


# (free GiB at least, batch_size, gradient_checkpointing, base_precision), roomiest first, as sd.MEMORY_512. Scaled
# from SDXL at 1024 by the denoiser's size (Medium 2.5B, Large 8.1B parameters), and counting T5 (4.7B): it is off the
# GPU while training (its text embeddings are cached) but on it to cache the captions and for samples, beside the
# rest, in bf16 (9.5 GB) on an unquantized base and in fp8 (4.7 GB) on a quantized one (sdlora.step.build_step).
MEMORY_MEDIUM = ((40, 4, False, "auto"), (24, 4, True, "auto"), (18, 1, True, "auto"), (0, 1, True, "fp8"))
MEMORY_LARGE = ((80, 4, False, "auto"), (48, 4, True, "auto"), (32, 1, True, "auto"), (0, 1, True, "fp8"))


def _family(name, label, memory_rows, version, architecture) -> Family:
    return Family(
        name=name, label=label, group="SD3", arch=name, resolution=1024, prediction_type="epsilon",
        cross_attention_dim=4096, pipeline="StableDiffusion3Pipeline", pipeline_kwargs={},
        text_encoders={"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}, text_encoder_aliases={},
        tokenizer_components=("tokenizer", "tokenizer_2", "tokenizer_3"), sgm_unet=False, peft_names=True,
        # the prefixes diffusers' single-file loader strips (diffusers/loaders/single_file_utils.py)
        original_text_encoders=(("text_encoder", "clip", "text_encoders.clip_l.transformer."),
                                ("text_encoder_2", "clip", "text_encoders.clip_g.transformer."),
                                ("text_encoder_3", "t5", "text_encoders.t5xxl.transformer.")),
        # no size conditioning (the pooled text goes to the transformer through `predict`); the pipelines condition on
        # both CLIPs' penultimate layer, and kohya's SD3 training does too
        added_conditioning=False, denoiser="transformer", latent_multiple=2, objective="flow",
        frozen_text_encoders=("text_encoder_3",), token_lengths=(0, 0, T5_TOKENS),
        clip_skip=2, clip_skip_fixed=True, memory_rows=memory_rows, unet_targets=TRANSFORMER_TARGETS,
        text_targets=TEXT_TARGETS, base_model_version=version, architecture=architecture,
        implementation="diffusers", v2=False,
        encode=encode, encode_prompt=encode_prompt, time_ids=time_ids, denoiser_kwargs=denoiser_kwargs,
        predict=predict, checkpoint_prediction=no_prediction, detect_pipeline=detect_pipeline,
        detect_folder=detect_folder, detect_checkpoint=detect_checkpoint, detect_denoiser=detect_denoiser,
        detect_lora=detect_lora, read_version=read_version, read_architecture=read_architecture)


# modelspec.architecture as kohya's library/sai_model_spec.py writes it ("stable-diffusion-3" + "-" + the model type
# its sd3_utils finds: "5-medium", "5-large"); ss_base_model_version: sdlora's strings (read_version reads any "sd3..."
# back)
SD35_MEDIUM = _family("sd3.5-medium", "SD3.5 Medium", MEMORY_MEDIUM, "sd3.5_medium", "stable-diffusion-3-5-medium")
SD35_LARGE = _family("sd3.5-large", "SD3.5 Large", MEMORY_LARGE, "sd3.5_large", "stable-diffusion-3-5-large")
FAMILIES = (SD35_MEDIUM, SD35_LARGE)
