"""FLUX.1 (dev, schnell): a transformer of double- and single-stream blocks trained by flow matching on packed latents,
conditioned on CLIP-L's pooled projection and T5-XXL's sequence.

What differs from SD3.5: the transformer takes its latents packed into 2x2 patches (a sequence of 64-wide tokens)
with position ids for the image and the text, and timesteps as sigma (timestep / 1000); dev also takes a guidance
embedding (guidance-distilled), schnell none. `predict` packs, calls and unpacks, as diffusers'
train_dreambooth_lora_flux.py does, so the objective, the evaluator and the verify step see plain (batch, 16, h, w)
latents. Only CLIP-L takes adapters; T5 stays frozen. The shared file is diffusers' peft layout (`transformer.<path>`),
which diffusers, ComfyUI and Forge all read (docs/lora-format.md, FLUX.1).
"""

from __future__ import annotations

import contextlib

import torch

from sdlora.families.family import Family, no_prediction
from sdlora.families.naming import flux_from_original

# The double blocks' joint attention (image stream to_q/k/v/out, text stream add_*), which the single blocks share
# (to_q/k/v only: their output goes through proj_out). "attn-mlp" is every linear layer of the blocks, as kohya's
# sd-scripts trains FLUX.1 by default (networks/lora_flux.py): besides the attention, each double-block stream's
# feed-forward and modulation (BFL's img_mod/txt_mod), the single blocks' proj_mlp, proj_out and modulation. The
# transformer's final proj_out (BFL's final_layer) is outside the blocks and stays as it is (Family.unet_exclude).
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
MLP = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"]
MODULATION = ["norm1.linear", "norm1_context.linear", "norm.linear"]
TRANSFORMER_TARGETS = {"attn": ATTENTION, "attn-mlp": ATTENTION + MLP + MODULATION}
TEXT_TARGETS = {"attn": ["q_proj", "k_proj", "v_proj", "out_proj"],
                "attn-mlp": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]}
# FluxPipeline's max_sequence_length: 512 by default; schnell was distilled at 256 (its model card and diffusers'
# docs call it with 256)
T5_TOKENS_DEV, T5_TOKENS_SCHNELL = 512, 256
# The guidance the dev transformer is told while training: 1, as diffusers' README_flux.md passes to
# train_dreambooth_lora_flux.py in every recipe (the script's own --guidance_scale default is 3.5); samples then use
# the pipeline's own 3.5
TRAIN_GUIDANCE = 1.0


def encode(text_encoders: list, ids: list[torch.Tensor], clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """As FluxPipeline.encode_prompt: T5's last hidden state is the sequence, CLIP-L's pooled output the vector."""
    pooled = text_encoders[0](ids[0], output_hidden_states=False).pooler_output
    hidden = text_encoders[1](ids[1], output_hidden_states=False)[0]
    return hidden.to(pooled.dtype), pooled


def _encode_prompt(max_sequence_length: int):
    def encode_prompt(pipe, prompt, device, clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled, _ = pipe.encode_prompt(prompt, prompt, device=device, max_sequence_length=max_sequence_length)
        return hidden, pooled
    return encode_prompt


def time_ids(original_size, crop_top_left, bucket) -> None:
    return None  # no size conditioning


def denoiser_kwargs(pooled, time_ids) -> None:
    return None


def predict(transformer, noisy_latents, timesteps, encoder_hidden_states, pooled, time_ids,
            guidance: float = TRAIN_GUIDANCE):
    """The transformer's velocity for (batch, channels, h, w) latents, in the same shape: packed into 2x2 patches with
    their position ids, timesteps as sigma, the text ids zeros, and for dev the guidance embedding at `guidance`
    (diffusers' train_dreambooth_lora_flux.py and FluxPipeline; a run sets it through Family.with_train_guidance)."""
    from diffusers import FluxPipeline

    b, c, h, w = noisy_latents.shape
    packed = FluxPipeline._pack_latents(noisy_latents, b, c, h, w)
    img_ids = image_ids(h // 2, w // 2, noisy_latents.device, noisy_latents.dtype)
    txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=noisy_latents.device, dtype=noisy_latents.dtype)
    embedded = None
    if transformer.config.guidance_embeds:
        embedded = torch.full((b,), guidance, device=noisy_latents.device, dtype=torch.float32)
    out = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=embedded, pooled_projections=pooled,
                      encoder_hidden_states=encoder_hidden_states, txt_ids=txt_ids, img_ids=img_ids,
                      return_dict=False)[0]
    # FluxPipeline._unpack_latents takes pixel sizes and the VAE's factor; with factor 1 and sides 2h, 2w it
    # unpacks to (b, c, h, w) as the pipeline's own call would
    return _unpack(out, b, c, h, w)


def image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """The packed latents' position ids (height * width, 3): zero, row, column, as
    FluxPipeline._prepare_latent_image_ids gives them, but made on `device` (the pipeline makes them on the CPU and
    copies them, which a CUDA graph cannot capture)."""
    rows = torch.arange(height, device=device, dtype=dtype)[:, None].expand(height, width)
    cols = torch.arange(width, device=device, dtype=dtype)[None, :].expand(height, width)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(height * width, 3)


def attention_kernels(device) -> contextlib.AbstractContextManager:
    """Where FLUX.1's attention may run while training (the family's step_context): flash, memory-efficient or math
    kernels, not cuDNN's. cuDNN's attention backward failed with an illegal memory access on FLUX.1-dev at 1024 px,
    batch 1 (H200, torch 2.11). The whole step runs in it: with gradient checkpointing the backward recomputes each
    block, and a kernel other than the forward's saves tensors of other shapes (torch.utils.checkpoint refuses)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _unpack(packed: torch.Tensor, b: int, c: int, h: int, w: int) -> torch.Tensor:
    x = packed.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def kohya_to_peft(state: dict) -> dict:
    """A kohya-layout FLUX.1 LoRA (sd-scripts' networks/lora_flux.py: fused `qkv`/`linear1`, `lora_te1_` for CLIP-L)
    in diffusers' peft layout, as FluxPipeline.load_lora_weights converts it (alpha folded into the weights)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
    from diffusers.utils.state_dict_utils import StateDictType, convert_state_dict_to_peft

    t5 = sorted(k for k in state if k.startswith("lora_te2_"))
    if t5:  # the converter would drop them with a warning
        raise ValueError(f"{len(t5)} T5 keys (lora_te2_) are not read, e.g. {t5[0]}")
    out = _convert_kohya_flux_lora_to_diffusers(dict(state))  # it pops what it converts: a copy
    # CLIP-L's part comes in diffusers' old names (`self_attn.to_q_lora.down`); diffusers' own loader guesses their
    # kind from an out_proj key and fails a file without one, so name them as peft does here
    text = {k: v for k, v in out.items() if k.startswith("text_encoder.")}
    if text:
        out = {**{k: v for k, v in out.items() if k not in text},
               **convert_state_dict_to_peft(text, original_type=StateDictType.DIFFUSERS_OLD)}
    return out


def _name(dev: bool) -> str:
    return "flux.1-dev" if dev else "flux.1-schnell"


def detect_pipeline(pipe) -> str | None:
    transformer = getattr(pipe, "transformer", None)
    if transformer is None or type(transformer).__name__ != "FluxTransformer2DModel":
        return None
    return detect_denoiser(transformer.config)


def detect_folder(model_index: dict) -> str | None:
    return "flux.1-dev" if model_index.get("transformer", [None, None])[1] == "FluxTransformer2DModel" else None


ORIGINAL_PREFIX = "model.diffusion_model."  # ComfyUI's saves put the BFL names under it; BFL's own files have none


def detect_checkpoint(file_name: str, keys, tensor) -> str | None:
    """BFL's files name the transformer's modules double_blocks/single_blocks (bare, or under model.diffusion_model.);
    dev has the guidance embedder (`guidance_in`), schnell none (diffusers' infer_diffusers_model_type)."""
    bare = {k.removeprefix(ORIGINAL_PREFIX) for k in keys}
    if "double_blocks.0.img_attn.qkv.weight" not in bare:
        return None
    return _name(any(k.startswith("guidance_in.") for k in bare))


def detect_denoiser(config) -> str | None:
    if "guidance_embeds" not in config or "axes_dims_rope" not in config:
        return None
    return _name(bool(config.get("guidance_embeds")))


def detect_lora(names) -> str | None:
    """diffusers' FLUX names (`transformer.single_transformer_blocks.N`) or kohya's (`lora_unet_double_blocks_N`,
    `lora_unet_single_blocks_N`). dev and schnell share the names: only the metadata tells them apart."""
    if any(n.startswith(("transformer.single_transformer_blocks.", "lora_unet_double_blocks_",
                         "lora_unet_single_blocks_")) for n in names):
        return "flux.1-dev"
    return None


def read_version(version: str) -> str | None:
    if version.startswith("flux"):  # kohya's `flux1`; other tools' flux1-dev, flux1-schnell
        return "flux.1-schnell" if "schnell" in version else "flux.1-dev"
    return None


def read_architecture(architecture: str) -> str | None:
    """kohya's `flux-1-dev`, `flux-1-schnell` (library/sai_model_spec.py)."""
    if architecture.startswith(("flux-1", "flux.1", "flux1")):
        return "flux.1-schnell" if "schnell" in architecture else "flux.1-dev"
    return None


# (free GiB at least, batch_size, gradient_checkpointing, base_precision), roomiest first. Scaled from SD3.5 Large by
# the transformer's size (12B parameters), counting T5 as there (sdlora.families.sd3): bf16 24 + 9.5 GB while the
# captions are cached, fp8 12 + 4.7 GB.
MEMORY = ((80, 2, True, "auto"), (48, 1, True, "auto"), (0, 1, True, "fp8"))


def _family(dev: bool) -> Family:
    name = _name(dev)
    return Family(
        name=name, label="FLUX.1 dev" if dev else "FLUX.1 schnell", group="FLUX", arch=name, resolution=1024,
        prediction_type="epsilon", cross_attention_dim=4096, pipeline="FluxPipeline", pipeline_kwargs={},
        text_encoders={"lora_te1_": "text_encoder"}, text_encoder_aliases={},
        tokenizer_components=("tokenizer", "tokenizer_2"), sgm_unet=False, peft_names=True,
        original_text_encoders=(),  # BFL's single files hold the transformer only
        added_conditioning=False, denoiser="transformer",
        # latent sides a multiple of 2 (the 2x2 packing): images a multiple of 16 px with the VAE's 8
        latent_multiple=2, objective="flow", frozen_text_encoders=("text_encoder_2",),
        token_lengths=(0, T5_TOKENS_DEV if dev else T5_TOKENS_SCHNELL),
        # CLIP-L's pooled output only: its last layer, whatever the skip
        clip_skip=1, clip_skip_fixed=True, memory_rows=MEMORY, unet_targets=TRANSFORMER_TARGETS,
        text_targets=TEXT_TARGETS, unet_exclude="proj_out",
        # kohya's ss_base_model_version is `flux1` for both (library/flux_utils.py MODEL_VERSION_FLUX_V1): the
        # architecture tells them apart (families.stated)
        base_model_version="flux1",
        architecture="flux-1-dev" if dev else "flux-1-schnell",
        implementation="https://github.com/black-forest-labs/flux",
        v2=False, encode=encode, encode_prompt=_encode_prompt(T5_TOKENS_DEV if dev else T5_TOKENS_SCHNELL),
        time_ids=time_ids, denoiser_kwargs=denoiser_kwargs, predict=predict, checkpoint_prediction=no_prediction,
        detect_pipeline=detect_pipeline, detect_folder=detect_folder, detect_checkpoint=detect_checkpoint,
        detect_denoiser=detect_denoiser, detect_lora=detect_lora, read_version=read_version,
        read_architecture=read_architecture, denoiser_from_original=flux_from_original, kohya_to_peft=kohya_to_peft,
        step_context=attention_kernels)


FLUX1_DEV, FLUX1_SCHNELL = _family(True), _family(False)
FAMILIES = (FLUX1_DEV, FLUX1_SCHNELL)
